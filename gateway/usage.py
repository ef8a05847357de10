"""Record token usage off the request path and write it to the store in batches.

Each successful authentication notes the time and the User-Agent in memory;
a background task writes the notes every `usage_flush_seconds` with `$max`
and `$addToSet`, so a request never waits for a write. `stop()` writes what
is left, so a clean shutdown loses no record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import time
from typing import Any

from gateway.errors import StoreUnavailable
from gateway.store import MAX_USER_AGENTS, TokenStore

logger = logging.getLogger(__name__)

# Longer User-Agent values are cut: some clients send kilobytes of them.
MAX_USER_AGENT_LENGTH = 512
# How long `stop()` waits for a flush in progress, beyond one flush interval.
STOP_GRACE_SECONDS = 5.0


@dataclasses.dataclass
class _Usage:
    last_used_at: float  # a POSIX timestamp, made a datetime when written
    user_agents: set[str]


class UsageRecorder:
    """Batch `last_used_at` and User-Agent updates per token."""

    def __init__(self, store: TokenStore, flush_interval: float) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self._pending: dict[Any, _Usage] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def record(self, token_id: Any, user_agent: str | None, known_user_agents: frozenset[str]) -> None:
        """Note one successful use of `token_id` now, in memory only: no store I/O on the request path."""
        now = time.time()
        usage = self._pending.get(token_id)
        if usage is None:
            usage = self._pending[token_id] = _Usage(now, set())
        else:
            usage.last_used_at = max(usage.last_used_at, now)

        if user_agent:
            user_agent = user_agent[:MAX_USER_AGENT_LENGTH]
            is_new = user_agent not in known_user_agents and user_agent not in usage.user_agents
            if is_new and len(known_user_agents) + len(usage.user_agents) < MAX_USER_AGENTS:
                usage.user_agents.add(user_agent)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-recorder")

    async def stop(self) -> None:
        """Stop the background task and write every pending record.

        The task is asked to stop rather than cancelled: a flush cut by a
        cancellation would drop its batch, and pymongo 4.20's async
        `bulk_write` was seen to swallow a cancellation while the server was
        down, which left `stop()` waiting forever.
        """
        if self._task is not None:
            self._stopping.set()
            await asyncio.wait({self._task}, timeout=self.flush_interval + STOP_GRACE_SECONDS)
            self._task = None
        await self.flush()

    async def flush(self) -> None:
        """Write the pending records in one batch; on failure keep them for the next flush."""
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        records = [
            (token_id, datetime.datetime.fromtimestamp(usage.last_used_at, datetime.UTC), sorted(usage.user_agents))
            for token_id, usage in batch.items()
        ]
        try:
            await self.store.record_usage(records)
        except StoreUnavailable as exc:
            for token_id, usage in batch.items():
                self._merge_back(token_id, usage)
            logger.warning("Writing usage of %d tokens failed and will be retried: %s", len(batch), exc)

    def _merge_back(self, token_id: Any, usage: _Usage) -> None:
        newer = self._pending.get(token_id)
        if newer is None:
            self._pending[token_id] = usage
            return
        newer.last_used_at = max(newer.last_used_at, usage.last_used_at)
        newer.user_agents |= usage.user_agents

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.flush_interval)
            await self.flush()
