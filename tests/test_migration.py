"""The legacy key migration against a real store: the command as an operator runs it, and the library."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import pty
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from bson import ObjectId
from pymongo import monitoring

from gateway.config import Config
from gateway.legacy_keys import LegacyKeyStore
from gateway.migration import LegacyKeyMigration, MigrationReport
from gateway.store import TokenStore
from tests.conftest import TEST_SECRET
from tests.support.cli import REPOSITORY_ROOT, run_cli

MIGRATE = ("migrate-legacy-keys",)


def token_hash(key: str, secret: str = TEST_SECRET) -> str:
    # Written apart from gateway.tokens on purpose: udata hashes the UTF-8 bytes of the key.
    return hmac.new(secret.encode(), key.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclasses.dataclass
class LegacyUsers:
    """Seeded users by what the migration must do with them."""

    migratable: dict[ObjectId, str] = dataclasses.field(default_factory=dict)
    shared: dict[ObjectId, str] = dataclasses.field(default_factory=dict)
    empty: list[ObjectId] = dataclasses.field(default_factory=list)
    without_field: list[ObjectId] = dataclasses.field(default_factory=list)
    invalid: list[ObjectId] = dataclasses.field(default_factory=list)
    kinds: dict[ObjectId, str] = dataclasses.field(default_factory=dict)

    @property
    def with_field(self) -> int:
        return len(self.migratable) + len(self.shared) + len(self.empty) + len(self.invalid)


def legacy_value(position: int) -> tuple[str, Any]:
    """Return the kind and legacy value of the user at `position` in a seeded mix."""
    kind = position % 20
    if kind in (0, 1):
        return "short", f"s{position:x}"[:7]
    if kind in (2, 3):
        return "non-ascii", f"clé-{position}-ünïcødé-键-🔑"
    if kind in (4, 5):
        return "long", hashlib.sha512(f"long-{position}".encode()).hexdigest() * 2
    if kind == 6:
        return "eight", f"{position:08d}"
    if kind == 7:
        return "shared", f"shared-{position}"
    if kind == 8:
        return "shared", f"shared-{position - 1}"
    if kind == 9:
        return "empty", ""
    if kind == 10:
        return "empty", None
    if kind == 11:
        return "missing", None
    if position % 1000 == 12:
        return "invalid", position
    return "plain", hashlib.sha1(f"user-{position}".encode()).hexdigest()


def seed_legacy_users(database: Any, count: int, field: str = "apikey") -> LegacyUsers:
    """Insert `count` users with a mix of legacy values in one bulk insert."""
    users = LegacyUsers()
    documents = []
    for position in range(count):
        user_id = ObjectId()
        document: dict[str, Any] = {"_id": user_id, "active": position % 50 != 13, "deleted": None}
        kind, value = legacy_value(position)
        users.kinds[user_id] = kind
        if kind != "missing":
            document[field] = value
        documents.append(document)

        if kind == "shared":
            users.shared[user_id] = value
        elif kind == "empty":
            users.empty.append(user_id)
        elif kind == "missing":
            users.without_field.append(user_id)
        elif kind == "invalid":
            users.invalid.append(user_id)
        else:
            users.migratable[user_id] = value
    database.user.insert_many(documents, ordered=False)
    return users


def assert_each_key_migrated_once(database: Any, users: LegacyUsers) -> None:
    tokens = list(database.api_token.find({}, {"token_hash": 1, "user": 1}))
    stored = {(token["token_hash"], token["user"]) for token in tokens}
    expected = {(token_hash(key), user_id) for user_id, key in users.migratable.items()}

    assert len(tokens) == len(expected)
    assert stored == expected
    shared_hashes = {token_hash(key) for key in users.shared.values()}
    assert not shared_hashes & {token["token_hash"] for token in tokens}


def users_with_field(database: Any, field: str = "apikey") -> set[ObjectId]:
    return {user["_id"] for user in database.user.find({field: {"$exists": True}}, {"_id": 1})}


def store_environment(mongodb_uri: str, database_name: str) -> dict[str, str]:
    return {
        "GATEWAY_TOKENS_SECRET": TEST_SECRET,
        "GATEWAY_STORE_URI": mongodb_uri,
        "GATEWAY_STORE_DATABASE": database_name,
    }


def summary_count(output: str, label: str) -> int:
    for line in output.splitlines():
        if line.strip().startswith(label + ":"):
            return int(line.split(":")[1].replace(",", ""))
    raise AssertionError(f"no {label!r} line in the summary:\n{output}")


@pytest.fixture
def environment(mongodb_uri: str, database_name: str) -> dict[str, str]:
    return store_environment(mongodb_uri, database_name)


def test_migrate_command_mix_migrates_each_key_once(mongo: Any, environment: dict[str, str]) -> None:
    users = seed_legacy_users(mongo, 10_000)

    result = run_cli(*MIGRATE, environ=environment)

    assert result.returncode == 1, result.stderr
    assert summary_count(result.stdout, "users with the field") == users.with_field
    assert summary_count(result.stdout, "migrated") == len(users.migratable)
    assert summary_count(result.stdout, "already present") == 0
    assert summary_count(result.stdout, "empty") == len(users.empty)
    assert summary_count(result.stdout, "conflicts") == len(users.shared)
    assert summary_count(result.stdout, "failed") == len(users.invalid)
    for user_id in [*users.shared, *users.invalid]:
        assert f"user {user_id}: " in result.stdout
    assert_each_key_migrated_once(mongo, users)


def test_migrate_command_rerun_finds_all_present(mongo: Any, environment: dict[str, str]) -> None:
    users = seed_legacy_users(mongo, 200)

    first = run_cli(*MIGRATE, environ=environment)
    second = run_cli(*MIGRATE, environ=environment)

    assert first.returncode == 1, first.stderr
    assert second.returncode == 1, second.stderr
    assert summary_count(second.stdout, "migrated") == 0
    assert summary_count(second.stdout, "already present") == len(users.migratable)
    assert summary_count(second.stdout, "conflicts") == len(users.shared)
    assert_each_key_migrated_once(mongo, users)


def test_migrate_command_stores_udata_fields(mongo: Any, environment: dict[str, str]) -> None:
    users = seed_legacy_users(mongo, 40)
    expected_prefixes = {
        "short": lambda key: "",
        "eight": lambda key: key,
        "non-ascii": lambda key: key[:8],
        "long": lambda key: key[:8],
        "plain": lambda key: key[:8],
    }

    result = run_cli(*MIGRATE, environ=environment)

    assert result.returncode == 1, result.stderr
    assert set(users.kinds.values()) >= set(expected_prefixes)
    for user_id, key in users.migratable.items():
        token = mongo.api_token.find_one({"token_hash": token_hash(key)})
        assert token is not None, f"no token for user {user_id}"
        assert token["token_prefix"] == expected_prefixes[users.kinds[user_id]](key)
        assert token["user"] == user_id
        assert token["name"] == "Migrated API key"
        assert token["scopes"] == ["admin"]
        assert token["kind"] == "api_key"
        assert token["created_at"] is not None
        assert token["last_used_at"] is None
        assert token["user_agents"] == []
        assert token["revoked_at"] is None
        assert token["expires_at"] is None
    # Without --remove-legacy-field every user keeps the field.
    assert mongo.user.count_documents({"apikey": {"$exists": True}}) == users.with_field
    for key in users.migratable.values():
        assert key not in result.stdout + result.stderr


def command_environment(mongodb_uri: str, database_name: str) -> dict[str, str]:
    """The environment of a CLI subprocess started without `run_cli`: this checkout first on the path."""
    return {**os.environ, **store_environment(mongodb_uri, database_name), "PYTHONPATH": str(REPOSITORY_ROOT)}


@pytest.mark.parametrize(
    "user_count, batch_size, removal",
    [
        pytest.param(10_000, "100", (), id="tokens"),
        # Removal writes one user at a time (about 1.5 ms each on SecantusDB), so fewer users.
        pytest.param(1_000, "20", ("--remove-legacy-field",), id="removal"),
    ],
)
def test_migrate_command_killed_run_resumes(
    mongodb_uri: str, database_name: str, mongo: Any, user_count: int, batch_size: str, removal: tuple[str, ...]
) -> None:
    users = seed_legacy_users(mongo, user_count)
    command = [sys.executable, "-m", "gateway", *MIGRATE, "--batch-size", batch_size, *removal]

    # Not a terminal, so the command prints one progress line per 5 % of the users.
    process = subprocess.Popen(
        command,
        env=command_environment(mongodb_uri, database_name),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    progress_lines = []
    try:
        while len(progress_lines) < 3:
            line = process.stderr.readline()
            assert line, f"the command ended early: {progress_lines}"
            progress_lines.append(line)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(30)
        process.stderr.close()
    tokens_after_kill = mongo.api_token.count_documents({})
    fields_removed_before = len(users.migratable) - len(users_with_field(mongo) & set(users.migratable))
    resumed = run_cli(*MIGRATE, *removal, environ=store_environment(mongodb_uri, database_name))

    assert process.returncode == -signal.SIGKILL
    assert 0 < tokens_after_kill < len(users.migratable)
    assert resumed.returncode == 1, resumed.stderr
    assert summary_count(resumed.stdout, "migrated") == len(users.migratable) - tokens_after_kill
    assert summary_count(resumed.stdout, "already present") == tokens_after_kill - fields_removed_before
    assert_each_key_migrated_once(mongo, users)
    for user_id in users.shared:
        assert mongo.user.find_one({"_id": user_id})["apikey"] == users.shared[user_id]
    if not removal:
        assert fields_removed_before == 0
        assert users_with_field(mongo) == {*users.migratable, *users.shared, *users.invalid, *users.empty}
        return
    assert summary_count(resumed.stdout, "legacy fields removed") == len(users.migratable) - fields_removed_before
    assert users_with_field(mongo) == {*users.shared, *users.invalid, *users.empty}


def test_migrate_command_dry_run_writes_nothing(mongo: Any, environment: dict[str, str]) -> None:
    users = seed_legacy_users(mongo, 10_000)
    users_before = list(mongo.user.find().sort("_id", 1))
    indexes_before = mongo.api_token.index_information()

    result = run_cli(*MIGRATE, "--dry-run", "--remove-legacy-field", environ=environment)

    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("Dry run of the legacy key migration from user.apikey; nothing was written.")
    assert summary_count(result.stdout, "would migrate") == len(users.migratable)
    assert summary_count(result.stdout, "legacy fields to remove") == len(users.migratable)
    assert summary_count(result.stdout, "conflicts") == len(users.shared)
    assert mongo.api_token.count_documents({}) == 0
    assert mongo.api_token.index_information() == indexes_before
    assert list(mongo.user.find().sort("_id", 1)) == users_before


def test_migrate_command_clean_run_exits_zero(mongo: Any, environment: dict[str, str]) -> None:
    user_id = ObjectId()
    mongo.user.insert_many([{"_id": user_id, "active": True, "apikey": "only-key-1"}, {"_id": ObjectId()}])

    result = run_cli(*MIGRATE, "--remove-legacy-field", environ=environment)

    assert result.returncode == 0, result.stderr
    assert summary_count(result.stdout, "migrated") == 1
    assert summary_count(result.stdout, "legacy fields removed") == 1
    assert mongo.api_token.find_one({"token_hash": token_hash("only-key-1")})["user"] == user_id
    assert "apikey" not in mongo.user.find_one({"_id": user_id})


def test_migrate_command_custom_collection_and_field(mongo: Any, environment: dict[str, str]) -> None:
    account_id = ObjectId()
    mongo.account.insert_one({"_id": account_id, "legacy_token": "custom-key-1"})

    result = run_cli(*MIGRATE, "--users-collection", "account", "--field", "legacy_token", environ=environment)

    assert result.returncode == 0, result.stderr
    assert "account.legacy_token" in result.stdout
    assert mongo.api_token.find_one({"token_hash": token_hash("custom-key-1")})["user"] == account_id


def test_migrate_command_draws_bar_on_terminal(mongodb_uri: str, database_name: str, mongo: Any) -> None:
    seed_legacy_users(mongo, 300)
    command = [sys.executable, "-m", "gateway", *MIGRATE, "--batch-size", "50"]
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run(
            command,
            env=command_environment(mongodb_uri, database_name),
            stdout=subprocess.PIPE,
            stderr=terminal,
            timeout=60,
        )
        os.close(terminal)
        terminal = -1
        output = b""
        while chunk := _read_available(controller):
            output += chunk
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)

    drawn = output.decode()
    assert result.returncode == 1
    assert "\r[" in drawn
    assert "[" + "#" * 30 + "]" in drawn
    assert "users/s" in drawn
    assert drawn.endswith("\n")
    assert b"Migrated the legacy keys" in result.stdout


def _read_available(descriptor: int) -> bytes:
    try:
        return os.read(descriptor, 65536)
    except OSError:
        # Linux reports EIO on the controller once the terminal side is closed and drained.
        return b""


# The library, driven in-process against the real store.


@pytest.fixture
async def token_store(make_config: Callable[..., Config]) -> Any:
    stores = []

    def connect(*listeners: monitoring.CommandListener) -> TokenStore:
        store = TokenStore.connect(make_config().store.uri, make_config().store, listeners)
        stores.append(store)
        return store

    yield connect
    for store in stores:
        await store.close()


def migration_for(store: TokenStore, secrets: tuple[str, ...] = (TEST_SECRET,), **options: Any) -> LegacyKeyMigration:
    assert store.users is not None
    return LegacyKeyMigration(store, LegacyKeyStore(store.users, "apikey"), secrets, **options)


async def test_migration_other_owner_token_is_conflict(mongo: Any, token_store: Any) -> None:
    holder, other = ObjectId(), ObjectId()
    mongo.user.insert_one({"_id": holder, "apikey": "taken-key-1"})
    mongo.api_token.insert_one({"token_hash": token_hash("taken-key-1"), "user": other})

    report = await migration_for(token_store(), remove_legacy_field=True).run()

    assert report.migrated == 0
    assert [problem.user_id for problem in report.conflicts] == [holder]
    assert str(other) in report.conflicts[0].reason
    assert mongo.api_token.count_documents({}) == 1
    assert mongo.user.find_one({"_id": holder})["apikey"] == "taken-key-1"


async def test_migration_old_secret_token_already_present(mongo: Any, token_store: Any) -> None:
    old_secret = "previous-secret-0123456789-abcdef"
    user_id = ObjectId()
    mongo.user.insert_one({"_id": user_id, "apikey": "rotated-key-1"})
    mongo.api_token.insert_one({"token_hash": token_hash("rotated-key-1", old_secret), "user": user_id})

    report = await migration_for(token_store(), (TEST_SECRET, old_secret)).run()

    assert report.already_present == 1
    assert report.migrated == 0
    assert mongo.api_token.count_documents({}) == 1


async def test_migration_key_changed_mid_run_kept(mongo: Any, token_store: Any) -> None:
    user_ids = [ObjectId() for _ in range(30)]
    mongo.user.insert_many([{"_id": user_id, "apikey": f"steady-key-{n}"} for n, user_id in enumerate(user_ids)])
    changed = user_ids[-1]

    def change_last_key(report: MigrationReport) -> None:
        # Called once between the two passes, then after each batch.
        if report.processed == 0:
            mongo.user.update_one({"_id": changed}, {"$set": {"apikey": "replaced-key"}})

    migration = migration_for(token_store(), remove_legacy_field=True, batch_size=10)
    report = await migration.run(change_last_key)

    assert report.migrated == 29
    assert [problem.user_id for problem in report.failures] == [changed]
    assert "changed during the migration" in report.failures[0].reason
    assert mongo.user.find_one({"_id": changed})["apikey"] == "replaced-key"
    assert mongo.api_token.find_one({"token_hash": token_hash("replaced-key")}) is None
    assert mongo.api_token.find_one({"token_hash": token_hash("steady-key-29")}) is None


async def test_legacy_key_store_remove_keeps_changed_key(mongo: Any, token_store: Any) -> None:
    store = token_store()
    user_id = ObjectId()
    mongo.user.insert_one({"_id": user_id, "apikey": "first-key"})
    mongo.user.update_one({"_id": user_id}, {"$set": {"apikey": "second-key"}})

    removed = await LegacyKeyStore(store.users, "apikey").remove_key(user_id, "first-key")

    assert removed is False
    assert mongo.user.find_one({"_id": user_id})["apikey"] == "second-key"


class TokenInsertedFirst(monitoring.CommandListener):
    """Store a user's token the moment the migration sends its insert, as a concurrent run would."""

    def __init__(self, database: Any, key: str, user_id: ObjectId) -> None:
        self.database = database
        self.key = key
        self.user_id = user_id

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "insert" and event.command.get("insert") == "api_token":
            self.database.api_token.insert_one({"token_hash": token_hash(self.key), "user": self.user_id})

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_migration_concurrent_insert_counts_once(mongo: Any, token_store: Any) -> None:
    user_ids = [ObjectId() for _ in range(5)]
    mongo.user.insert_many([{"_id": user_id, "apikey": f"race-key-{n}"} for n, user_id in enumerate(user_ids)])
    listener = TokenInsertedFirst(mongo, "race-key-2", user_ids[2])

    report = await migration_for(token_store(listener), remove_legacy_field=True).run()

    assert report.migrated == 4
    assert report.already_present == 1
    assert report.legacy_fields_removed == 5
    assert not report.has_problems
    for n, user_id in enumerate(user_ids):
        assert mongo.api_token.count_documents({"token_hash": token_hash(f"race-key-{n}"), "user": user_id}) == 1
    assert mongo.api_token.count_documents({}) == 5
