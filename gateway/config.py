"""Configuration: a TOML file and `GATEWAY_<SECTION>_<KEY>` environment overrides.

`load_config` returns a frozen `Config` or raises `ConfigError` listing every
problem at once, each naming the key, the value and the rule it breaks.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError
from gateway.headers import fold_header_name

ENV_PREFIX = "GATEWAY_"
DEFAULT_PORT = 8080
# nginx's default large_client_header_buffers (4 buffers of 8 KiB) admits
# about as much; uvicorn with httptools sets no limit at all.
DEFAULT_MAX_HEADER_BYTES = 32 * 1024
# Largest `server.max_header_bytes` accepted. Under uvicorn the server
# protocol rejects longer heads itself (`gateway.coalescing.MAX_HEAD_BYTES`).
MAX_HEADER_BYTES_LIMIT = 64 * 1024
# nginx's default `send_timeout`.
DEFAULT_SEND_TIMEOUT_SECONDS = 60.0
DEFAULT_CACHE_TTL_SECONDS = 10.0
DEFAULT_NEGATIVE_TTL_SECONDS = 2.0
DEFAULT_STORE_TIMEOUT_SECONDS = 2.0
DEFAULT_FAILED_LOOKUP_RATE = 1.0
DEFAULT_FAILED_LOOKUP_BURST = 20
DEFAULT_FAILED_LOOKUP_CLIENTS = 10_000
MIN_SECRET_LENGTH = 16

Check = Callable[[Any], str | None]


def _setting(default: Any, *checks: Check) -> Any:
    """Declare a setting with a default and the checks its value must pass."""
    factory = (lambda: list(default)) if isinstance(default, list) else None
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"checks": checks})
    return dataclasses.field(default=default, metadata={"checks": checks})


def _positive(value: float) -> str | None:
    if not math.isfinite(value):
        return "must be a finite number"
    return None if value > 0 else "must be greater than 0"


def _header_limit(value: int) -> str | None:
    if value > MAX_HEADER_BYTES_LIMIT:
        return f"must be at most {MAX_HEADER_BYTES_LIMIT}"
    return _positive(value)


def _not_negative(value: float) -> str | None:
    if not math.isfinite(value):
        return "must be a finite number"
    return None if value >= 0 else "must be 0 or greater"


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be between 0 and 65535"


def _http_url(value: str) -> str | None:
    if value == "":
        return None
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host, or empty"
    if parts.query or parts.fragment:
        return "must not contain a query or a fragment"
    return None


def _header_name(value: str) -> str | None:
    allowed = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    if value and set(value) <= allowed:
        return None
    return "must be a non-empty HTTP header name (RFC 9110 token characters)"


def _path_prefix(value: str) -> str | None:
    if value.startswith("/") and value.endswith("/") and "?" not in value:
        return None
    return "must start and end with '/'"


def _path(value: str) -> str | None:
    return None if value.startswith("/") and "?" not in value else "must start with '/'"


def _networks(values: list[str]) -> str | None:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"{value!r} is not an IP address or CIDR network"
    return None


def _secrets(values: list[str]) -> str | None:
    if not values:
        return (
            "is required: set it in [tokens] secret or in GATEWAY_TOKENS_SECRET, "
            "for example to the output of `python -c 'import secrets; print(secrets.token_urlsafe(48))'`"
        )
    if any(len(value) < MIN_SECRET_LENGTH for value in values):
        return f"each secret must have at least {MIN_SECRET_LENGTH} characters"
    return None


def _field_name(value: str) -> str | None:
    if value and not value.startswith("$") and not set(value) & {".", "\0"}:
        return None
    return "must be a top-level MongoDB field name: not empty, no '.', and no '$' at the start"


def _one_of(*choices: str) -> Check:
    def check(value: str) -> str | None:
        return None if value in choices else "must be one of " + ", ".join(choices)

    return check


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = _setting("127.0.0.1")
    port: int = _setting(DEFAULT_PORT, _port)
    trusted_proxies: list[str] = _setting([], _networks)
    server: str = _setting("uvicorn", _one_of("uvicorn", "granian"))
    workers: int = _setting(1, _positive)
    shutdown_timeout_seconds: float = _setting(10.0, _positive)
    max_header_bytes: int = _setting(DEFAULT_MAX_HEADER_BYTES, _header_limit)
    send_timeout_seconds: float = _setting(DEFAULT_SEND_TIMEOUT_SECONDS, _positive)


@dataclasses.dataclass(frozen=True)
class UpstreamConfig:
    url: str = _setting("", _http_url)
    connect_timeout_seconds: float = _setting(5.0, _positive)
    read_timeout_seconds: float = _setting(30.0, _positive)
    stream_read_timeout_seconds: float = _setting(300.0, _positive)
    pool_timeout_seconds: float = _setting(5.0, _positive)
    max_connections: int = _setting(100, _positive)
    idle_timeout_seconds: float = _setting(4.0, _positive)
    forward_api_key: bool = _setting(False)


@dataclasses.dataclass(frozen=True)
class TokensConfig:
    secret: list[str] = _setting([], _secrets)
    prefix: str = _setting("udata_")


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    header: str = _setting("X-API-KEY", _header_name)
    user_header: str = _setting("X-Authenticated-User", _header_name)
    require_key: bool = _setting(False)
    legacy_fallback: bool = _setting(False)
    legacy_field: str = _setting("apikey", _field_name)
    auth_request_path: str = _setting("/_auth", _path)
    required_scopes: list[str] = _setting([])
    failed_lookup_rate: float = _setting(DEFAULT_FAILED_LOOKUP_RATE, _not_negative)
    failed_lookup_burst: int = _setting(DEFAULT_FAILED_LOOKUP_BURST, _positive)
    failed_lookup_clients: int = _setting(DEFAULT_FAILED_LOOKUP_CLIENTS, _positive)


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    ttl_seconds: float = _setting(DEFAULT_CACHE_TTL_SECONDS, _not_negative)
    max_entries: int = _setting(100_000, _positive)
    negative_ttl_seconds: float = _setting(DEFAULT_NEGATIVE_TTL_SECONDS, _not_negative)
    negative_max_entries: int = _setting(10_000, _positive)
    stale_if_error_seconds: float = _setting(0.0, _not_negative)


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    uri: str = _setting("embedded")
    database: str = _setting("udata")
    tokens_collection: str = _setting("api_token")
    users_collection: str = _setting("user")
    embedded_path: str = _setting("./gateway-data")
    timeout_seconds: float = _setting(DEFAULT_STORE_TIMEOUT_SECONDS, _positive)
    watch_changes: bool = _setting(True)


@dataclasses.dataclass(frozen=True)
class ManagementConfig:
    prefix: str = _setting("/api/1/me/tokens/", _path_prefix)
    allowed_scopes: list[str] = _setting(["admin"])
    usage_flush_seconds: float = _setting(1.0, _positive)
    openapi_path: str = _setting("/_gateway/openapi.json", _path)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    level: str = _setting("info", _one_of("debug", "info", "warning", "error"))
    format: str = _setting("text", _one_of("text", "json"))
    health_path: str = _setting("/healthz", _path)
    ready_path: str = _setting("/readyz", _path)
    metrics_path: str = _setting("/metrics", _path)
    access_log: bool = _setting(True)
    audit_log: bool = _setting(True)
    request_id_header: str = _setting("X-Request-ID", _header_name)
    metrics_allowed_networks: list[str] = _setting(["127.0.0.1/32", "::1/128"], _networks)


@dataclasses.dataclass(frozen=True)
class Config:
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    upstream: UpstreamConfig = dataclasses.field(default_factory=UpstreamConfig)
    tokens: TokensConfig = dataclasses.field(default_factory=TokensConfig)
    auth: AuthConfig = dataclasses.field(default_factory=AuthConfig)
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    store: StoreConfig = dataclasses.field(default_factory=StoreConfig)
    management: ManagementConfig = dataclasses.field(default_factory=ManagementConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def __repr__(self) -> str:
        # The token secrets must never reach a log line through a repr.
        return f"Config(upstream={mask_password(self.upstream.url)!r}, store={mask_password(self.store.uri)!r})"


_SECTION_TYPES = typing.get_type_hints(Config)


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read `path` (optional) and the `GATEWAY_*` variables of `environ`.

    Raises `ConfigError` with every problem found: unknown sections or keys,
    values of the wrong type and values that break a rule.
    """
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    raw = _read_file(path, problems)
    _apply_environment(raw, environ, problems)

    sections = {}
    for name, section_type in _SECTION_TYPES.items():
        values = raw.pop(name, {})
        if not isinstance(values, dict):
            problems.append(f"[{name}] must be a table, got {type(values).__name__}")
            values = {}
        sections[name] = _build_section(name, section_type, values, problems)
    problems.extend(f"[{name}] is not a known section" for name in raw)
    problems.extend(_combination_problems(sections))

    if problems:
        raise ConfigError(problems)
    return Config(**sections)


def _combination_problems(sections: dict[str, Any]) -> list[str]:
    """Return the problems of settings that are valid alone but not together."""
    auth, store, management = sections["auth"], sections["store"], sections["management"]
    logging_config = sections["logging"]
    problems = []
    if auth.legacy_fallback and not store.users_collection:
        problems.append(
            "auth.legacy_fallback = true is invalid: it needs store.users_collection, which holds the legacy keys"
        )
    if fold_header_name(auth.user_header.encode()) == fold_header_name(auth.header.encode()):
        # WSGI, PHP and CGI servers fold both names into one variable, so the
        # upstream could read a key where it expects a user id.
        problems.append(
            f"auth.user_header = {auth.user_header!r} is invalid: it names the same header as "
            f"auth.header ({auth.header!r}) once case and every character other than letters and digits are ignored"
        )

    # The gateway answers each of these paths itself, so two settings on one
    # path would silently hide one of the endpoints.
    own_paths = {
        "logging.health_path": logging_config.health_path,
        "logging.ready_path": logging_config.ready_path,
        "auth.auth_request_path": auth.auth_request_path,
        "management.openapi_path": management.openapi_path,
    }
    seen: dict[str, str] = {}
    for key, path in own_paths.items():
        if path in seen:
            problems.append(f"{key} = {path!r} is invalid: {seen[path]} uses the same path")
        seen.setdefault(path, key)

    if management.prefix == "/":
        problems.append(
            "management.prefix = '/' is invalid: every request would go to the token-management routes "
            "and none to the upstream"
        )
    return problems


def _read_file(path: str | Path | None, problems: list[str]) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        problems.append(f"configuration file {str(path)!r} cannot be read: {exc.strerror}")
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"configuration file {str(path)!r} is not valid TOML: {exc}")
    return {}


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str], problems: list[str]) -> None:
    for variable, text in environ.items():
        if not variable.startswith(ENV_PREFIX):
            continue
        section, _, key = variable[len(ENV_PREFIX) :].lower().partition("_")
        section_type = _SECTION_TYPES.get(section)
        if section_type is None:
            # Variables such as GATEWAY_TEST_MONGODB_URI belong to other tools.
            continue
        field_types = typing.get_type_hints(section_type)
        if key not in field_types:
            problems.append(f"{variable} does not name a setting of [{section}]")
            continue
        value = _parse_environment_value(variable, text, field_types[key], problems)
        if value is not None:
            raw.setdefault(section, {})[key] = value


def _parse_environment_value(variable: str, text: str, field_type: Any, problems: list[str]) -> Any:
    if field_type is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        problems.append(f"{variable}={text!r} is invalid: must be true or false")
        return None
    if field_type in (int, float):
        try:
            return field_type(text)
        except ValueError:
            problems.append(f"{variable}={text!r} is invalid: must be a number")
            return None
    if typing.get_origin(field_type) is list:
        return _parse_environment_list(variable, text, problems)
    return text


def _parse_environment_list(variable: str, text: str, problems: list[str]) -> list[str] | None:
    # A TOML array allows items that contain commas, such as secrets.
    if text.lstrip().startswith("["):
        try:
            value = tomllib.loads(f"value = {text}")["value"]
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"{variable} is not a valid TOML array: {exc}")
            return None
        return list(value)
    return [item.strip() for item in text.split(",") if item.strip()]


def _build_section(name: str, section_type: type, values: dict[str, Any], problems: list[str]) -> Any:
    field_types = typing.get_type_hints(section_type)
    accepted = {}
    for key, value in values.items():
        if key not in field_types:
            problems.append(f"{name}.{key} is not a known setting of [{name}]")
            continue
        expected = field_types[key]
        if key == "secret" and isinstance(value, str):
            value = [value]
        type_problem = _type_problem(value, expected)
        if type_problem:
            problems.append(f"{name}.{key} = {_shown(name, key, value)} is invalid: {type_problem}")
            continue
        accepted[key] = float(value) if expected is float else value

    section = section_type(**accepted)
    for field in dataclasses.fields(section_type):
        value = getattr(section, field.name)
        for check in field.metadata.get("checks", ()):
            rule = check(value)
            if rule:
                problems.append(f"{name}.{field.name} = {_shown(name, field.name, value)} is invalid: {rule}")
    return section


def _type_problem(value: Any, expected: Any) -> str | None:
    if expected is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if expected is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if expected is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "must be a number"
    if expected is str:
        return None if isinstance(value, str) else "must be a string"
    if typing.get_origin(expected) is list or isinstance(expected, types.GenericAlias):
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return None
        return "must be a list of strings"
    return None


def _shown(section: str, key: str, value: Any) -> str:
    if section == "tokens" and key == "secret":
        return "[secret]" if value else "[]"
    if (section, key) in (("store", "uri"), ("upstream", "url")) and isinstance(value, str):
        return repr(mask_password(value))
    return repr(value)


def mask_password(uri: str) -> str:
    """Hide the password of a URI such as mongodb://user:password@host/ or http://user:password@host/."""
    scheme, separator, rest = uri.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not separator or not at or ":" not in credentials:
        return uri
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:[secure]@{host}"
