"""A TCP relay between the gateways and the store that counts token lookups exactly.

`serverStatus` opcounters lump the lookup (an `aggregate`) together with
driver heartbeats and usage writes, so the benchmark reads the commands off
the wire instead. Each OP_MSG (MongoDB wire protocol, opcode 2013) opens with
a section of kind 0 whose BSON document names the command as its first key
and the collection as that key's string value. Compressed messages are not
parsed: the gateway's client does not enable compression.
"""

from __future__ import annotations

import asyncio
import collections
import threading

from gateway.embedded import free_port

OP_MSG = 2013
HEADER_SIZE = 16
BSON_STRING = 0x02
LOOKUP_COMMANDS = ("aggregate", "find")
TOKENS_COLLECTION = "api_token"


def command_of(message: bytes) -> tuple[str, str] | None:
    """Return (command, collection) of one OP_MSG message, or None for any other message."""
    opcode = int.from_bytes(message[12:16], "little")
    if opcode != OP_MSG or len(message) < HEADER_SIZE + 10 or message[HEADER_SIZE + 4] != 0:
        return None
    document = HEADER_SIZE + 5
    element_type = message[document + 4]
    name_end = message.index(b"\0", document + 5)
    name = message[document + 5 : name_end].decode("utf-8", "replace")
    if element_type != BSON_STRING:
        return name, ""
    length = int.from_bytes(message[name_end + 1 : name_end + 5], "little")
    value = message[name_end + 5 : name_end + 4 + length].decode("utf-8", "replace")
    return name, value


class StoreRelay:
    """Relay 127.0.0.1:`port` to the store at `store_port` in a background thread, counting commands."""

    def __init__(self, store_port: int) -> None:
        self.store_port = store_port
        self.port = free_port()
        self.commands: collections.Counter[tuple[str, str]] = collections.Counter()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="store-relay", daemon=True)

    def start(self) -> StoreRelay:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self._server = future.result(10)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def token_lookups(self) -> int:
        """Return how many lookups reached the `api_token` collection so far."""
        return sum(self.commands[(command, TOKENS_COLLECTION)] for command in LOOKUP_COMMANDS)

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            store_reader, store_writer = await asyncio.open_connection("127.0.0.1", self.store_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            self._copy_messages(client_reader, store_writer),
            self._copy_bytes(store_reader, client_writer),
            return_exceptions=True,
        )

    async def _copy_messages(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(4)
                length = int.from_bytes(header, "little")
                message = header + await reader.readexactly(length - 4)
                command = command_of(message)
                if command is not None:
                    self.commands[command] += 1
                writer.write(message)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _copy_bytes(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def relayed_uri(store_uri: str, relay: StoreRelay) -> str:
    """Return `store_uri` pointing at the relay instead of the store."""
    return store_uri.replace(f":{relay.store_port}/", f":{relay.port}/")
