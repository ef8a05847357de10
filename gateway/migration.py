"""Migrate the users' plaintext legacy keys into hashed `api_token` documents.

The migration reads the users twice. The first pass hashes every legacy key
to find the keys that several users share: those are conflicts, migrated for
none of their holders. The second pass works in batches: it looks the hashes
up in `api_token`, inserts the missing tokens in one unordered bulk insert
and, when asked, removes each user's legacy field once that user's token has
been read back.

Every step is safe to repeat. The unique index on `token_hash` rejects a
second token for a key, and a token already stored for the same user counts
as already present. So a run killed at any moment and started again ends
with every key migrated exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pymongo.errors import BulkWriteError, PyMongoError

from gateway.errors import StoreUnavailable
from gateway.legacy_keys import LegacyKeyStore, migrated_token
from gateway.store import TokenStore
from gateway.tokens import hash_token

DEFAULT_BATCH_SIZE = 500
# SecantusDB 0.7 takes about 7 ms for an `$in` of 50 hashes but 540 ms for one
# of 500 (7,500 stored tokens, timed with pymongo on a shared 2-core VM), so
# token lookups send the hashes in slices of this size.
LOOKUP_SLICE_SIZE = 50
DUPLICATE_KEY_ERROR_CODE = 11000


@dataclasses.dataclass(frozen=True)
class Problem:
    """A user whose key was not migrated or whose legacy field was kept, and why. Never the key."""

    user_id: Any
    reason: str


@dataclasses.dataclass
class MigrationReport:
    """Counts of users by outcome, updated as the migration goes.

    `total` is the number of users with the legacy field, `processed` how many
    of them have been handled. In a dry run, `migrated` and
    `legacy_fields_removed` count what a real run would do.
    """

    dry_run: bool
    total: int = 0
    processed: int = 0
    migrated: int = 0
    already_present: int = 0
    empty: int = 0
    legacy_fields_removed: int = 0
    conflicts: list[Problem] = dataclasses.field(default_factory=list)
    failures: list[Problem] = dataclasses.field(default_factory=list)

    @property
    def has_problems(self) -> bool:
        """Whether some key was left unmigrated or some legacy field could not be removed."""
        return bool(self.conflicts or self.failures)

    def counts(self) -> dict[str, int]:
        return {
            "migrated": self.migrated,
            "already present": self.already_present,
            "empty": self.empty,
            "conflicts": len(self.conflicts),
            "failed": len(self.failures),
        }


ProgressCallback = Callable[[MigrationReport], None]


@dataclasses.dataclass(frozen=True)
class _Candidate:
    user_id: Any
    key: str
    # Hashes of the key under every configured secret; the first is the one a new token gets.
    hashes: tuple[str, ...]


@dataclasses.dataclass
class _KeyIndex:
    """The result of the first pass: the first user with each key hash, and the hashes several users share."""

    first_holder: dict[str, Any] = dataclasses.field(default_factory=dict)
    shared: dict[str, list[Any]] = dataclasses.field(default_factory=dict)


class LegacyKeyMigration:
    """Move every legacy key of a users collection into `api_token`.

    `secrets` are the configured token secrets: new tokens are hashed with the
    first, and a key stored under any of them counts as already migrated.
    The first pass keeps one hash and one user id per user in memory.
    """

    def __init__(
        self,
        store: TokenStore,
        legacy_keys: LegacyKeyStore,
        secrets: Sequence[str],
        *,
        dry_run: bool = False,
        remove_legacy_field: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        self.store = store
        self.legacy_keys = legacy_keys
        self.secrets = tuple(secrets)
        self.dry_run = dry_run
        self.remove_legacy_field = remove_legacy_field
        self.batch_size = batch_size

    async def run(self, on_progress: ProgressCallback | None = None) -> MigrationReport:
        """Migrate every user's key and return the report.

        `on_progress` gets the report once the total is known, then after each batch.

        A dry run writes nothing. Raises `StoreUnavailable` when the
        store fails; running again resumes where the failed run stopped.
        """
        report = MigrationReport(dry_run=self.dry_run)
        if not self.dry_run:
            # The unique index on token_hash is what turns a repeated insert into an error.
            await self.store.ensure_indexes()
        index = await self._index_keys(report)
        if on_progress is not None:
            on_progress(report)

        async with contextlib.aclosing(self.legacy_keys.scan(self.batch_size)) as batches:
            async for batch in batches:
                await self._migrate_batch(batch, index, report)
                if on_progress is not None:
                    on_progress(report)
        return report

    async def _index_keys(self, report: MigrationReport) -> _KeyIndex:
        index = _KeyIndex()
        async with contextlib.aclosing(self.legacy_keys.scan(self.batch_size)) as batches:
            async for batch in batches:
                report.total += len(batch)
                for user_id, value in batch:
                    if not isinstance(value, str) or not value:
                        continue
                    token_hash = hash_token(self.secrets[0], value)
                    holder = index.first_holder.setdefault(token_hash, user_id)
                    if holder != user_id:
                        index.shared.setdefault(token_hash, [holder]).append(user_id)
        return index

    async def _migrate_batch(self, batch: list[tuple[Any, Any]], index: _KeyIndex, report: MigrationReport) -> None:
        candidates = self._sort_out(batch, index, report)

        stored = await self._stored_owners(candidates)
        present, missing = self._match_stored(candidates, stored, report)
        report.already_present += len(present)

        inserted = await self._insert(missing, report)

        if self.remove_legacy_field:
            await self._remove_legacy_fields(present + inserted, report)
        report.processed += len(batch)

    def _sort_out(self, batch: list[tuple[Any, Any]], index: _KeyIndex, report: MigrationReport) -> list[_Candidate]:
        """Count empty values and report invalid and shared keys; return the keys to migrate."""
        candidates = []
        for user_id, value in batch:
            if value is None or value == "":
                report.empty += 1
                continue
            if not isinstance(value, str):
                report.failures.append(Problem(user_id, f"the legacy key is not a string but {type(value).__name__}"))
                continue

            hashes = tuple(hash_token(secret, value) for secret in self.secrets)
            holder = index.first_holder.get(hashes[0])
            if hashes[0] in index.shared:
                others = [other for other in index.shared[hashes[0]] if other != user_id]
                report.conflicts.append(Problem(user_id, _shared_reason(others)))
            elif holder is None:
                report.failures.append(
                    Problem(user_id, "the legacy key changed during the migration, so run the migration again")
                )
            elif holder != user_id:
                report.conflicts.append(Problem(user_id, _shared_reason([holder])))
            else:
                candidates.append(_Candidate(user_id, value, hashes))
        return candidates

    async def _stored_owners(self, candidates: Iterable[_Candidate]) -> dict[str, Any]:
        """Return the owner of each stored token whose hash is one of the candidates' hashes."""
        hashes = [token_hash for candidate in candidates for token_hash in candidate.hashes]
        owners: dict[str, Any] = {}
        for start in range(0, len(hashes), LOOKUP_SLICE_SIZE):
            query = {"token_hash": {"$in": hashes[start : start + LOOKUP_SLICE_SIZE]}}
            try:
                tokens = await self.store.tokens.find(query, {"token_hash": 1, "user": 1}).to_list(None)
            except PyMongoError as exc:
                raise StoreUnavailable(f"Looking up migrated tokens failed: {type(exc).__name__}.") from exc
            owners.update((token["token_hash"], token.get("user")) for token in tokens)
        return owners

    def _match_stored(
        self, candidates: list[_Candidate], stored: dict[str, Any], report: MigrationReport
    ) -> tuple[list[_Candidate], list[_Candidate]]:
        """Split the candidates into those with a token of their own and those without one.

        A key whose token belongs to another user is a conflict.
        """
        present, missing = [], []
        for candidate in candidates:
            owners = {stored[token_hash] for token_hash in candidate.hashes if token_hash in stored}
            if not owners:
                missing.append(candidate)
            elif owners == {candidate.user_id}:
                present.append(candidate)
            else:
                others = sorted(str(owner) for owner in owners - {candidate.user_id})
                reason = f"a token for this legacy key already belongs to user {', '.join(others)}"
                report.conflicts.append(Problem(candidate.user_id, reason))
        return present, missing

    async def _insert(self, candidates: list[_Candidate], report: MigrationReport) -> list[_Candidate]:
        """Insert a token for each candidate; return those whose token is now stored for them."""
        if not candidates:
            return []
        if self.dry_run:
            report.migrated += len(candidates)
            return candidates

        now = datetime.datetime.now(datetime.UTC)
        documents = [migrated_token(c.user_id, c.key, self.secrets[0], now) for c in candidates]
        error_codes = await self._insert_many(documents)
        inserted = [candidate for position, candidate in enumerate(candidates) if position not in error_codes]
        report.migrated += len(inserted)

        duplicates = []
        for position, code in sorted(error_codes.items()):
            if code == DUPLICATE_KEY_ERROR_CODE:
                duplicates.append(candidates[position])
            else:
                reason = f"storing the token failed with error code {code}"
                report.failures.append(Problem(candidates[position].user_id, reason))
        return inserted + await self._recheck_duplicates(duplicates, report)

    async def _insert_many(self, documents: list[dict[str, Any]]) -> dict[int, int]:
        """Insert `documents` in one unordered bulk write; return the error code of each failed one by position."""
        try:
            await self.store.tokens.insert_many(documents, ordered=False)
        except BulkWriteError as exc:
            # The error messages quote the duplicate hash: keep only positions and codes.
            return {error["index"]: error["code"] for error in exc.details.get("writeErrors", [])}
        except PyMongoError as exc:
            raise StoreUnavailable(f"Storing migrated tokens failed: {type(exc).__name__}.") from exc
        return {}

    async def _recheck_duplicates(self, candidates: list[_Candidate], report: MigrationReport) -> list[_Candidate]:
        """Sort out the keys whose insert hit the unique index, because another process stored them after our lookup."""
        stored = await self._stored_owners(candidates)
        present, missing = self._match_stored(candidates, stored, report)
        report.already_present += len(present)
        for candidate in missing:
            reason = "the token was stored by another process and then deleted; run the migration again"
            report.failures.append(Problem(candidate.user_id, reason))
        return present

    async def _remove_legacy_fields(self, candidates: list[_Candidate], report: MigrationReport) -> None:
        """Remove each user's legacy field once a fresh read shows their token with the key's hash."""
        if not candidates:
            return
        if self.dry_run:
            report.legacy_fields_removed += len(candidates)
            return

        stored = await self._stored_owners(candidates)
        for candidate in candidates:
            if not any(stored.get(token_hash) == candidate.user_id for token_hash in candidate.hashes):
                reason = "its token could not be read back, so the legacy field was kept"
                report.failures.append(Problem(candidate.user_id, reason))
            elif await self.legacy_keys.remove_key(candidate.user_id, candidate.key):
                report.legacy_fields_removed += 1
            else:
                reason = "the legacy key changed or was removed during the migration, so the field was left as found"
                report.failures.append(Problem(candidate.user_id, reason))


def _shared_reason(other_holders: Iterable[Any]) -> str:
    return "the same legacy key is held by user " + ", ".join(str(holder) for holder in other_holders)
