"""Configuration loading: values that pass every per-key check but cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from tests.conftest import TEST_SECRET


def problems_for(**variables: str) -> list[str]:
    try:
        load_config(None, {"GATEWAY_TOKENS_SECRET": TEST_SECRET, **variables})
    except ConfigError as exc:
        return exc.problems
    return []


@pytest.mark.parametrize(
    "variable",
    [
        "GATEWAY_STORE_TIMEOUT_SECONDS",
        "GATEWAY_SERVER_SHUTDOWN_TIMEOUT_SECONDS",
        "GATEWAY_CACHE_TTL_SECONDS",
        "GATEWAY_UPSTREAM_READ_TIMEOUT_SECONDS",
    ],
)
@pytest.mark.parametrize("text", ["inf", "-inf", "nan"])
def test_config_rejects_nonfinite_durations(variable: str, text: str) -> None:
    problems = problems_for(**{variable: text})

    assert len(problems) == 1
    assert "must be a finite number" in problems[0]


def test_config_rejects_infinity_in_toml(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("[store]\ntimeout_seconds = inf\n")

    with pytest.raises(ConfigError) as raised:
        load_config(path, {"GATEWAY_TOKENS_SECRET": TEST_SECRET})

    assert raised.value.problems == ["store.timeout_seconds = inf is invalid: must be a finite number"]


@pytest.mark.parametrize("user_header", ["X-API-KEY", "x_api_key", "X.Api.Key"])
def test_config_rejects_user_header_folding_to_key(user_header: str) -> None:
    problems = problems_for(GATEWAY_AUTH_USER_HEADER=user_header)

    assert len(problems) == 1
    assert problems[0].startswith(f"auth.user_header = {user_header!r} is invalid")
    assert "auth.header" in problems[0]


def test_config_rejects_shared_gateway_paths() -> None:
    problems = problems_for(GATEWAY_AUTH_AUTH_REQUEST_PATH="/healthz")

    assert problems == ["auth.auth_request_path = '/healthz' is invalid: logging.health_path uses the same path"]


def test_config_rejects_root_management_prefix() -> None:
    problems = problems_for(GATEWAY_MANAGEMENT_PREFIX="/")

    assert len(problems) == 1
    assert problems[0].startswith("management.prefix = '/' is invalid")


def test_config_accepts_defaults() -> None:
    assert problems_for() == []


def test_config_problem_masks_upstream_password() -> None:
    problems = problems_for(GATEWAY_UPSTREAM_URL="http://svc:upstream-password@127.0.0.1:8000/?x")

    assert problems == [
        "upstream.url = 'http://svc:[secure]@127.0.0.1:8000/?x' is invalid: must not contain a query or a fragment"
    ]


def test_config_repr_masks_upstream_password() -> None:
    config = load_config(
        None,
        {"GATEWAY_TOKENS_SECRET": TEST_SECRET, "GATEWAY_UPSTREAM_URL": "http://svc:upstream-password@127.0.0.1:8000"},
    )

    assert "upstream-password" not in repr(config)
    assert "http://svc:[secure]@127.0.0.1:8000" in repr(config)


def test_config_rejects_header_limit_over_64_kib() -> None:
    problems = problems_for(GATEWAY_SERVER_MAX_HEADER_BYTES="65537")

    assert len(problems) == 1
    assert "must be at most 65536" in problems[0]
    assert problems_for(GATEWAY_SERVER_MAX_HEADER_BYTES="65536") == []
