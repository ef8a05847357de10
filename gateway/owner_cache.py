"""A TLRU cache that can drop every entry of one owner at once.

`OwnerIndexedCache` is a cachetools `TLRUCache` that also keeps an index from
each value's owner to the keys holding that owner's values. The index is
updated on every write path of the cache (insertion, deletion, expiry,
eviction of the least recently used entry, clearing), so an entry leaves the
index when it leaves the cache and the index never outgrows the cache.
Reads (`cache[key]`, `get`, `in`) are cachetools' own and never touch the index.

An owner with one key is indexed by that key alone; only owners with several
keys get a set. A set costs 216 bytes even when it contains one string
(`sys.getsizeof`, CPython 3.11), and most owners hold one key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from time import monotonic
from typing import TypeVar

from cachetools import Cache, TLRUCache

ValueT = TypeVar("ValueT")


class OwnerIndexedCache(TLRUCache[str, ValueT]):
    """A `TLRUCache` from string keys to values, indexed by `owner_of(value)`.

    `pop_owner` removes every entry of one owner. Every other method behaves
    as `TLRUCache`'s.
    """

    def __init__(
        self,
        maxsize: int,
        ttu: Callable[[str, ValueT, float], float],
        owner_of: Callable[[ValueT], str],
        timer: Callable[[], float] = monotonic,
    ) -> None:
        super().__init__(maxsize, ttu, timer)
        self.owner_of = owner_of
        self._keys_by_owner: dict[str, str | set[str]] = {}

    def pop_owner(self, owner: str) -> int:
        """Remove every entry whose value belongs to `owner`; return how many were removed, expired ones included."""
        keys = self._keys_by_owner.pop(owner, None)
        if keys is None:
            return 0

        removed = [keys] if isinstance(keys, str) else list(keys)
        for key in removed:
            # TLRUCache removes an expired entry and then raises KeyError for it.
            with contextlib.suppress(KeyError):
                del self[key]
        return len(removed)

    def owner_count(self) -> int:
        """Return the number of owners in the index."""
        return len(self._keys_by_owner)

    def __setitem__(self, key: str, value: ValueT) -> None:
        # The previous value of `key` leaves the index first: TLRUCache may
        # drop it without calling __delitem__ when the new value is already expired.
        self._unindex_stored(key)
        super().__setitem__(key, value)
        if Cache.__contains__(self, key):
            self._index(key, self.owner_of(value))

    def __delitem__(self, key: str) -> None:
        value = Cache.__getitem__(self, key)
        try:
            super().__delitem__(key)
        finally:
            self._unindex(key, self.owner_of(value))

    def expire(self, time: float | None = None) -> list[tuple[str, ValueT]]:
        expired = super().expire(time)
        for key, value in expired:
            self._unindex(key, self.owner_of(value))
        return expired

    def clear(self) -> None:
        super().clear()
        self._keys_by_owner.clear()

    def _unindex_stored(self, key: str) -> None:
        # Cache.__contains__ also counts an expired entry that TLRUCache still stores.
        if Cache.__contains__(self, key):
            self._unindex(key, self.owner_of(Cache.__getitem__(self, key)))

    def _index(self, key: str, owner: str) -> None:
        keys = self._keys_by_owner.get(owner)
        if keys is None:
            self._keys_by_owner[owner] = key
        elif isinstance(keys, set):
            keys.add(key)
        elif keys != key:
            self._keys_by_owner[owner] = {keys, key}

    def _unindex(self, key: str, owner: str) -> None:
        keys = self._keys_by_owner.get(owner)
        if keys is None:
            return
        if isinstance(keys, str):
            if keys == key:
                del self._keys_by_owner[owner]
            return

        keys.discard(key)
        if len(keys) == 1:
            self._keys_by_owner[owner] = keys.pop()
        elif not keys:
            del self._keys_by_owner[owner]
