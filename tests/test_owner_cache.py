"""The owner index of the positive cache: kept in step with every way an entry leaves the cache."""

from __future__ import annotations

from gateway.owner_cache import OwnerIndexedCache


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_cache(maxsize: int = 10, ttl: float = 10.0) -> tuple[OwnerIndexedCache[str], ManualClock]:
    clock = ManualClock()
    # Values are owner names, so the owner of a value is the value itself.
    cache: OwnerIndexedCache[str] = OwnerIndexedCache(
        maxsize, lambda key, value, now: now + ttl, lambda value: value, clock
    )
    return cache, clock


def test_owner_cache_pop_owner_removes_only_that_owner() -> None:
    cache, _ = make_cache()
    cache["a1"] = "alice"
    cache["a2"] = "alice"
    cache["b1"] = "bob"

    removed = cache.pop_owner("alice")

    assert removed == 2
    assert sorted(cache) == ["b1"]
    assert cache.owner_count() == 1
    assert cache.pop_owner("alice") == 0


def test_owner_cache_lru_eviction_leaves_index() -> None:
    cache, _ = make_cache(maxsize=2)

    for index in range(100):
        cache[f"key{index}"] = f"owner{index}"

    assert len(cache) == 2
    assert cache.owner_count() == 2


def test_owner_cache_expiry_leaves_index() -> None:
    cache, clock = make_cache(ttl=1.0)
    cache["a1"] = "alice"
    cache["b1"] = "bob"

    clock.now = 5.0
    cache["c1"] = "carol"  # every insertion expires what is due first

    assert sorted(cache) == ["c1"]
    assert cache.owner_count() == 1


def test_owner_cache_deletion_leaves_index() -> None:
    cache, _ = make_cache()
    cache["a1"] = "alice"
    cache["a2"] = "alice"

    cache.pop("a1")
    del cache["a2"]

    assert cache.owner_count() == 0


def test_owner_cache_new_owner_replaces_old() -> None:
    cache, _ = make_cache()
    cache["k"] = "alice"

    cache["k"] = "bob"

    assert cache.pop_owner("alice") == 0
    assert cache.pop_owner("bob") == 1
    assert len(cache) == 0


def test_owner_cache_clear_empties_index() -> None:
    cache, _ = make_cache()
    cache["a1"] = "alice"

    cache.clear()

    assert cache.owner_count() == 0


def test_owner_cache_pop_owner_drops_expired_entry() -> None:
    cache, clock = make_cache(ttl=1.0)
    cache["a1"] = "alice"

    clock.now = 5.0
    removed = cache.pop_owner("alice")

    assert removed == 1
    assert cache.currsize == 0
