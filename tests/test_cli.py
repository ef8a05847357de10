"""The command line as an operator runs it: a subprocess with a real store."""

from __future__ import annotations

import hashlib
import hmac
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
