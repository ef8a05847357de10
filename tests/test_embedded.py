"""The embedded store: who starts the SecantusDB server of a data folder, and who borrows it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pymongo
import pytest

from gateway import embedded
from gateway.embedded import EmbeddedStore
from gateway.errors import StoreUnavailable


def ping(uri: str) -> bool:
    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(uri, serverSelectionTimeoutMS=2000)
    try:
        return bool(client.admin.command("ping")["ok"])
    finally:
        client.close()


def test_embedded_second_process_borrows_running_store(tmp_path: Path) -> None:
    with EmbeddedStore(tmp_path) as owner:
        borrower = EmbeddedStore(tmp_path)
        borrowed_uri = borrower.start()

        assert borrowed_uri == owner.uri
        assert borrower.process is None
        assert ping(borrowed_uri)


def test_embedded_owner_refuses_folder_kept_by_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "OWNER_WAIT_SECONDS", 0.5)

    with EmbeddedStore(tmp_path), pytest.raises(StoreUnavailable, match="only one `gateway serve`"):
        EmbeddedStore(tmp_path, must_own=True).start()


def test_embedded_owner_waits_for_short_holder(tmp_path: Path) -> None:
    holder = EmbeddedStore(tmp_path)
    holder.start()
    releaser = threading.Timer(1.0, holder.stop)
    releaser.start()

    owner = EmbeddedStore(tmp_path, must_own=True)
    try:
        started = time.monotonic()
        uri = owner.start()

        assert owner.process is not None
        assert time.monotonic() - started >= 0.9
        assert ping(uri)
    finally:
        releaser.join()
        owner.stop()
