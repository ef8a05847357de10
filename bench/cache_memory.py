"""Measure the memory of the gateway's positive cache per entry, in a process of its own.

Run as `python -m bench.cache_memory ENTRIES`: fills the `Authenticator`'s
TLRU cache with `ENTRIES` identities built by the gateway's own conversion
from token documents (a 64-digit hash as the key, an ObjectId token id and
user, a display prefix, one scope, no User-Agent yet) and prints a JSON
object with the resident memory before and after. Every entry gets its own
objects, as entries built from store documents do.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

from bson import ObjectId

from gateway.authenticator import Authenticator, Identity, _identity_from
from gateway.config import CacheConfig, StoreConfig
from gateway.store import TokenStore
from gateway.tokens import hash_token

SECRET = "bench-cache-secret-0123456789"


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_identity(index: int) -> Identity:
    # The document as the store returns it; the gateway's own conversion builds the entry.
    document = {
        "_id": ObjectId(),
        "user": ObjectId(),
        "token_prefix": f"udata_{index:08x}"[:14],
        "scopes": ["admin"],
        "expires_at": None,
        "user_agents": [],
    }
    return _identity_from(document)


def measure(entries: int) -> dict[str, float]:
    # The client connects lazily and this process never queries it.
    store = TokenStore.connect("mongodb://127.0.0.1:1/?directConnection=true", StoreConfig())
    authenticator = Authenticator(store, [SECRET], CacheConfig(max_entries=entries, ttl_seconds=3600.0))
    keys = [hash_token(SECRET, f"udata_key_{index}") for index in range(entries)]
    gc.collect()
    before = resident_bytes()

    started = time.perf_counter()
    for index, key in enumerate(keys):
        authenticator.cache_identity(key, make_identity(index))
    fill_seconds = time.perf_counter() - started
    gc.collect()
    after = resident_bytes()

    if len(authenticator.positive) != entries:
        raise RuntimeError(f"The cache kept {len(authenticator.positive)} of {entries} entries.")
    # The keys were allocated before the first reading, so they are added back here.
    key_bytes = sum(sys.getsizeof(key) for key in keys)
    return {
        "entries": entries,
        "bytes_per_entry": (after - before + key_bytes) / entries,
        "resident_mib": after / 2**20,
        "fill_seconds": fill_seconds,
    }


def main() -> None:
    print(json.dumps(measure(int(sys.argv[1]))))


if __name__ == "__main__":
    main()
