"""TokenManager against a real store: creation, listing and revocation rules."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
from collections.abc import AsyncIterator
from typing import Any

import pytest
from bson import ObjectId

from gateway.store import TokenStore
from gateway.token_manager import RevokeOutcome, TokenManager
from tests.conftest import TEST_SECRET


@pytest.fixture
async def manager(make_config: Any, mongo: Any) -> AsyncIterator[TokenManager]:
    config = make_config()
    store = TokenStore.connect(config.store.uri, config.store)
    yield TokenManager(store, config.tokens)
    await store.close()


async def test_create_hash_matches_udata_scheme(manager: TokenManager, mongo: Any) -> None:
    user = ObjectId()

    plaintext, document = await manager.create(user, "ci", None, ["admin"])

    stored = mongo.api_token.find_one({"_id": document["_id"]})
    assert stored["token_hash"] == hmac.new(TEST_SECRET.encode(), plaintext.encode(), hashlib.sha256).hexdigest()
    assert stored["token_prefix"] == plaintext[: len("udata_") + 8]
    assert stored["user"] == user
    assert stored["revoked_at"] is None
    assert plaintext not in str(stored)


async def test_list_newest_first_skips_revoked(manager: TokenManager) -> None:
    user = ObjectId()
    await manager.create(user, "older")
    await manager.create(user, "newer")
    _, revoked = await manager.create(user, "revoked")
    await manager.create(ObjectId(), "another user's")
    await manager.revoke(revoked["_id"], user)

    listed = await manager.list(user)

    assert [document["name"] for document in listed] == ["newer", "older"]
    assert all("token_hash" not in document for document in listed)


async def test_list_string_user(manager: TokenManager) -> None:
    await manager.create("robot-1", "service")

    listed = await manager.list("robot-1")

    assert [document["name"] for document in listed] == ["service"]


async def test_revoke_outcomes(manager: TokenManager, mongo: Any) -> None:
    user = ObjectId()
    _, document = await manager.create(user)

    first = await manager.revoke(document["_id"], user)
    second = await manager.revoke(document["_id"], user)
    unknown = await manager.revoke(ObjectId(), user)

    assert first.outcome is RevokeOutcome.REVOKED
    assert second.outcome is RevokeOutcome.ALREADY_REVOKED
    assert unknown.outcome is RevokeOutcome.NOT_FOUND
    assert unknown.document is None
    stored = mongo.api_token.find_one({"_id": document["_id"]})
    assert isinstance(stored["revoked_at"], datetime.datetime)
    assert first.document is not None
    assert first.document["revoked_at"] == stored["revoked_at"]
    assert second.document is not None
    assert second.document["revoked_at"] == stored["revoked_at"]


async def test_revoke_other_users_token_not_found(manager: TokenManager, mongo: Any) -> None:
    owner, intruder = ObjectId(), ObjectId()
    _, document = await manager.create(owner)

    revocation = await manager.revoke(document["_id"], intruder)

    assert revocation.outcome is RevokeOutcome.NOT_FOUND
    assert mongo.api_token.find_one({"_id": document["_id"]})["revoked_at"] is None


async def test_revoke_without_user_any_owner(manager: TokenManager) -> None:
    _, document = await manager.create("robot-2")

    revocation = await manager.revoke(document["_id"])

    assert revocation.outcome is RevokeOutcome.REVOKED
    assert revocation.document is not None
    assert revocation.document["user"] == "robot-2"
    assert "token_hash" not in revocation.document


async def test_revoke_udata_document_without_revoked_field(manager: TokenManager, mongo: Any) -> None:
    # Documents written by other tools may lack the field instead of holding null.
    token_id = mongo.api_token.insert_one({"token_hash": "f" * 64, "user": "u"}).inserted_id

    revocation = await manager.revoke(token_id, "u")

    assert revocation.outcome is RevokeOutcome.REVOKED
    assert isinstance(mongo.api_token.find_one({"_id": token_id})["revoked_at"], datetime.datetime)


async def test_revoke_concurrent_exactly_one_wins(manager: TokenManager, mongo: Any) -> None:
    user = ObjectId()
    _, document = await manager.create(user)

    revocations = await asyncio.gather(*(manager.revoke(document["_id"], user) for _ in range(10)))

    outcomes = [revocation.outcome for revocation in revocations]
    assert outcomes.count(RevokeOutcome.REVOKED) == 1
    assert outcomes.count(RevokeOutcome.ALREADY_REVOKED) == 9
    assert mongo.api_token.count_documents({"_id": document["_id"]}) == 1
