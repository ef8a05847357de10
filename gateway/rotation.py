"""Token secret rotation: move tokens hashed under an older secret to the current one.

`tokens.secret` lists the current secret first, then older ones. A key found
under an older secret authenticates at once, and its stored hash is rewritten
to the current secret in the background, with a write conditional on the old
hash. Once every token in use has moved, the old secret can be dropped from
the list; tokens never used meanwhile stop working at that point.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pymongo.errors import DuplicateKeyError

from gateway.errors import StoreUnavailable
from gateway.metrics import GatewayMetrics, StoreTimer
from gateway.store import TokenStore

logger = logging.getLogger(__name__)


class TokenRehasher:
    """Rewrite token hashes to the current secret, off the request path, once per token at a time."""

    def __init__(self, store: TokenStore, metrics: GatewayMetrics) -> None:
        self.store = store
        self.metrics = metrics
        self._tasks: dict[Any, asyncio.Task[None]] = {}

    def schedule(self, token_id: Any, old_hash: str, new_hash: str) -> None:
        """Start re-hashing `token_id` in a background task unless a re-hash of it is already running.

        A store failure is logged by the task and never reaches the caller.
        """
        if token_id in self._tasks:
            return
        task = asyncio.create_task(self._rehash(token_id, old_hash, new_hash), name="token-rehash")
        self._tasks[token_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(token_id, None))

    async def drain(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the running re-hashes to finish."""
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=timeout)

    async def _rehash(self, token_id: Any, old_hash: str, new_hash: str) -> None:
        try:
            with StoreTimer(self.metrics, "rehash_token"):
                changed = await self.store.replace_token_hash(token_id, old_hash, new_hash)
        except StoreUnavailable as exc:
            # The token still authenticates under the old secret; the next
            # lookup that finds it there schedules another attempt.
            logger.warning("Re-hashing token %s to the current secret failed; a later use retries: %s", token_id, exc)
            return
        except DuplicateKeyError:
            logger.error(
                "Token %s cannot be re-hashed to the current secret: another token has that hash already.", token_id
            )
            return
        if changed:
            logger.info("Re-hashed token %s from an older secret to the current one.", token_id)
