"""The command line as an operator runs it: a subprocess with a real store."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

from bson import ObjectId

from tests.conftest import TEST_SECRET
from tests.support.cli import run_cli


def store_environment(mongodb_uri: str, database_name: str) -> dict[str, str]:
    return {
        "GATEWAY_TOKENS_SECRET": TEST_SECRET,
        "GATEWAY_STORE_URI": mongodb_uri,
        "GATEWAY_STORE_DATABASE": database_name,
    }


def test_tokens_create_prints_plaintext_alone(mongodb_uri: str, database_name: str, mongo: Any) -> None:
    user = ObjectId()

    result = run_cli(
        "tokens", "create", "--user", str(user), "--name", "ci", environ=store_environment(mongodb_uri, database_name)
    )

    assert result.returncode == 0, result.stderr
    plaintext = result.stdout.strip()
    assert result.stdout == plaintext + "\n"
    assert plaintext.startswith("udata_")
    assert len(plaintext) == len("udata_") + 64
    document = mongo.api_token.find_one({"user": user})
    assert document["token_hash"] == hmac.new(TEST_SECRET.encode(), plaintext.encode(), hashlib.sha256).hexdigest()
    assert document["token_prefix"] == plaintext[:14]
    assert document["name"] == "ci"
    assert str(document["_id"]) in result.stderr
    assert plaintext not in result.stderr


def test_tokens_create_string_user_kept_as_string(mongodb_uri: str, database_name: str, mongo: Any) -> None:
    result = run_cli("tokens", "create", "--user", "robot-1", environ=store_environment(mongodb_uri, database_name))

    assert result.returncode == 0, result.stderr
    assert mongo.api_token.find_one({"user": "robot-1"}) is not None


def test_tokens_create_rejects_past_expiry(mongodb_uri: str, database_name: str, mongo: Any) -> None:
    environ = store_environment(mongodb_uri, database_name)

    result = run_cli("tokens", "create", "--user", "u", "--expires-at", "2020-01-01T00:00:00", environ=environ)

    assert result.returncode == 2
    assert "in the past" in result.stderr
    assert mongo.api_token.count_documents({}) == 0


def test_check_config_lists_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[server]\nport = "eighty"\nbogus = 1\n[cache]\nttl_seconds = -1\n')

    result = run_cli("check-config", "--config", str(config), environ={"GATEWAY_TOKENS_SECRET": ""})

    assert result.returncode == 2
    assert "server.port = 'eighty' is invalid: must be an integer" in result.stderr
    assert "server.bogus is not a known setting of [server]" in result.stderr
    assert "cache.ttl_seconds = -1.0 is invalid: must be 0 or greater" in result.stderr
    assert "tokens.secret" in result.stderr


def test_check_config_accepts_example(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "config.example.toml"

    result = run_cli("check-config", "--config", str(example), environ={"GATEWAY_TOKENS_SECRET": TEST_SECRET})

    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_embedded_store_keeps_tokens_across_runs(tmp_path: Path) -> None:
    environ = {
        "GATEWAY_TOKENS_SECRET": TEST_SECRET,
        "GATEWAY_STORE_URI": "embedded",
        "GATEWAY_STORE_EMBEDDED_PATH": str(tmp_path / "store"),
    }

    first = run_cli("tokens", "create", "--user", "u1", "--json", environ=environ)
    second = run_cli("tokens", "create", "--user", "u2", "--json", environ=environ)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "store" / "data").is_dir()
    assert not (tmp_path / "store" / "server.json").exists()


def test_tokens_list_prints_table_and_json(mongodb_uri: str, database_name: str, mongo: Any) -> None:
    environ = store_environment(mongodb_uri, database_name)
    user = ObjectId()
    now = datetime.datetime.now(datetime.UTC)
    mongo.api_token.insert_many(
        [
            {"token_hash": "1" * 64, "token_prefix": "udata_old", "user": user, "name": "old", "created_at": now},
            {
                "token_hash": "2" * 64,
                "token_prefix": "udata_new",
                "user": user,
                "name": "new\x1b[31m",
                "created_at": now + datetime.timedelta(seconds=1),
                "last_used_at": now,
                "user_agents": ["curl/8"],
                "expires_at": datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
            },
            {"token_hash": "3" * 64, "user": user, "name": "gone", "created_at": now, "revoked_at": now},
        ]
    )

    human = run_cli("tokens", "list", "--user", str(user), environ=environ)
    machine = run_cli("tokens", "list", "--user", str(user), "--json", environ=environ)

    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "PREFIX", "NAME"]
    assert "new\\x1b[31m" in lines[1]
    assert "\x1b" not in human.stdout
    assert "2024-01-01 00:00 UTC (expired)" in lines[1]
    assert "never" in lines[2]
    assert len(lines) == 3
    assert machine.returncode == 0, machine.stderr
    tokens = json.loads(machine.stdout)
    assert [token["name"] for token in tokens] == ["new\x1b[31m", "old"]
    assert tokens[0]["expired"] is True
    assert tokens[0]["user_agents"] == ["curl/8"]
    assert "token_hash" not in machine.stdout
    assert "1" * 64 not in machine.stdout


def test_tokens_list_empty_user(mongodb_uri: str, database_name: str, mongo: Any) -> None:
    result = run_cli("tokens", "list", "--user", "nobody", environ=store_environment(mongodb_uri, database_name))

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "no tokens" in result.stderr


def test_tokens_revoke_outcomes(mongodb_uri: str, database_name: str, mongo: Any) -> None:
    environ = store_environment(mongodb_uri, database_name)
    token_id = mongo.api_token.insert_one(
        {"token_hash": "4" * 64, "token_prefix": "udata_abcdefgh", "user": "robot-1", "revoked_at": None}
    ).inserted_id

    first = run_cli("tokens", "revoke", str(token_id), environ=environ)
    second = run_cli("tokens", "revoke", str(token_id), "--json", environ=environ)
    unknown = run_cli("tokens", "revoke", str(ObjectId()), environ=environ)
    malformed = run_cli("tokens", "revoke", "not-an-id", environ=environ)

    assert first.returncode == 0, first.stderr
    assert f"Revoked token {token_id} (udata_abcdefgh...) of user robot-1" in first.stderr
    assert "once their change stream reports the write" in first.stderr
    assert "within cache.ttl_seconds (10 s) without a change stream" in first.stderr
    stored = mongo.api_token.find_one({"_id": token_id})
    assert stored["revoked_at"] is not None
    assert second.returncode == 0, second.stderr
    outcome = json.loads(second.stdout)
    assert outcome["outcome"] == "already_revoked"
    assert outcome["user"] == "robot-1"
    assert outcome["revoked_at"] == stored["revoked_at"].isoformat(timespec="milliseconds")
    assert "already revoked" in second.stderr
    assert unknown.returncode == 1
    assert "no token has the id" in unknown.stderr
    assert malformed.returncode == 2
    assert "24 hexadecimal digits" in malformed.stderr


def test_tokens_revoke_hides_pasted_token(mongodb_uri: str, database_name: str) -> None:
    plaintext = "udata_" + "p" * 64

    result = run_cli("tokens", "revoke", plaintext, environ=store_environment(mongodb_uri, database_name))

    assert result.returncode == 2
    assert "24 hexadecimal digits" in result.stderr
    assert "p" * 64 not in result.stderr + result.stdout


def test_serve_rejects_invalid_port_and_workers(tmp_path: Path) -> None:
    environ = {"GATEWAY_TOKENS_SECRET": TEST_SECRET, "GATEWAY_STORE_EMBEDDED_PATH": str(tmp_path)}

    port = run_cli("serve", "--port", "-1", environ=environ, timeout=20)
    workers = run_cli("serve", "--workers", "0", environ=environ, timeout=20)

    assert port.returncode == 2
    assert "is not a TCP port" in port.stderr
    assert workers.returncode == 2
    assert "is not a positive integer" in workers.stderr


def test_tokens_create_scope_checked(mongodb_uri: str, database_name: str, mongo: Any) -> None:
    environ = {**store_environment(mongodb_uri, database_name), "GATEWAY_MANAGEMENT_ALLOWED_SCOPES": "admin,read"}

    allowed = run_cli("tokens", "create", "--user", "u", "--scope", "read", "--json", environ=environ)
    rejected = run_cli("tokens", "create", "--user", "u", "--scope", "superuser", environ=environ)

    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["scopes"] == ["read"]
    assert mongo.api_token.find_one({"user": "u"})["scopes"] == ["read"]
    assert rejected.returncode == 2
    assert "superuser is not allowed" in rejected.stderr
    assert mongo.api_token.count_documents({}) == 1


def test_tokens_create_rejects_unusable_user(mongodb_uri: str, database_name: str, mongo: Any) -> None:
    environ = store_environment(mongodb_uri, database_name)

    for user in ["", "   ", "robot\r\nX-Admin: 1", "robot 7"]:
        result = run_cli("tokens", "create", "--user", user, environ=environ)

        assert result.returncode == 2, user
        assert "is not a user id" in result.stderr
    assert mongo.api_token.count_documents({}) == 0


def test_tokens_create_checks_name_as_routes_do(mongodb_uri: str, database_name: str, mongo: Any) -> None:
    environ = store_environment(mongodb_uri, database_name)

    too_long = run_cli("tokens", "create", "--user", "robot", "--name", "n" * 256, environ=environ)
    escape = run_cli("tokens", "create", "--user", "robot", "--name", "\x1b[31mred", environ=environ)
    longest = run_cli("tokens", "create", "--user", "robot", "--name", "n" * 255, environ=environ)

    assert too_long.returncode == 2
    assert "at most 255 characters" in too_long.stderr
    assert escape.returncode == 2
    assert "U+001B" in escape.stderr
    assert longest.returncode == 0, longest.stderr
    assert mongo.api_token.count_documents({}) == 1


def test_unusable_embedded_path_reported_plainly(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    environ = {
        "GATEWAY_TOKENS_SECRET": TEST_SECRET,
        "GATEWAY_STORE_URI": "embedded",
        "GATEWAY_STORE_EMBEDDED_PATH": str(blocker / "store"),
    }

    result = run_cli("tokens", "list", "--user", "robot", environ=environ)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"error: The embedded store folder {str(blocker / 'store')!r} cannot be used" in result.stderr
