"""The OpenAPI 3.1 document of the token-management routes.

The document is built once at start-up from the configuration (route
prefixes, key header, allowed scopes), so it describes exactly what this
gateway serves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.token_manager import MAX_NAME_LENGTH
from gateway.token_request import MAX_BODY_BYTES

OPENAPI_VERSION = "3.1.0"
SECURITY_SCHEME = "apiKey"

# The characters `token_request` rejects in a name, as a JSON Schema pattern:
# C0 and C1 control characters, DEL, and the line and paragraph separators.
NAME_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029]*$"

_NULLABLE_DATE_TIME = {"type": ["string", "null"], "format": "date-time"}

REVOCATION_DELAY_NOTE = (
    "The gateway that answers the revocation stops accepting the token at once. Other gateway "
    "processes sharing the store stop accepting it within their `cache.ttl_seconds` at most."
)


def build_openapi_document(
    prefixes: Sequence[str], key_header: str, allowed_scopes: Sequence[str], cache_ttl: float
) -> dict[str, Any]:
    """Return the OpenAPI document for the management routes under each of `prefixes`."""
    paths: dict[str, Any] = {}
    for index, prefix in enumerate(prefixes):
        suffix = "" if index == 0 else f"_under_{prefix.strip('/').replace('/', '_')}"
        paths[prefix] = {"get": _list_operation(suffix), "post": _create_operation(suffix)}
        paths[prefix + "{token_id}/"] = {"delete": _revoke_operation(suffix, cache_ttl)}

    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "API key gateway: token management",
            "version": "1",
            "description": "API tokens of the caller, who authenticates with one of their own tokens.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {SECURITY_SCHEME: {"type": "apiKey", "in": "header", "name": key_header}},
            "schemas": _schemas(allowed_scopes),
            "responses": _shared_responses(key_header),
        },
        "security": [{SECURITY_SCHEME: []}],
    }


def _list_operation(suffix: str) -> dict[str, Any]:
    return {
        "operationId": "listTokens" + suffix,
        "summary": "List the caller's tokens that are not revoked, newest first",
        "description": "Expired tokens are listed with `expired: true`. Token hashes are never returned.",
        "responses": {
            "200": _json_response("The caller's tokens", {"$ref": "#/components/schemas/TokenList"}),
            "401": {"$ref": "#/components/responses/Unauthorized"},
            "403": {"$ref": "#/components/responses/Forbidden"},
            "503": {"$ref": "#/components/responses/StoreUnavailable"},
        },
    }


def _create_operation(suffix: str) -> dict[str, Any]:
    return {
        "operationId": "createToken" + suffix,
        "summary": "Create a token for the caller",
        "description": (
            "Every field is optional; an empty body creates a token without a name or expiry, with the "
            f"`admin` scope. The body may hold at most {MAX_BODY_BYTES} bytes. The plaintext token is "
            "returned under `token` in this response only."
        ),
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TokenCreateRequest"}}},
        },
        "responses": {
            "201": _json_response("The token was created", {"$ref": "#/components/schemas/CreatedToken"}),
            "400": _json_response("The body is not JSON, not an object, or a field is invalid", _error_ref()),
            "401": {"$ref": "#/components/responses/Unauthorized"},
            "403": _json_response(
                "The calling token lacks a requested scope, or has none of `auth.required_scopes`", _error_ref()
            ),
            "413": _json_response(f"The body is larger than {MAX_BODY_BYTES} bytes", _error_ref()),
            "503": {"$ref": "#/components/responses/StoreUnavailable"},
        },
    }


def _revoke_operation(suffix: str, cache_ttl: float) -> dict[str, Any]:
    return {
        "operationId": "revokeToken" + suffix,
        "summary": "Revoke one of the caller's tokens",
        "description": (
            "The token is kept for audit with `revoked_at` set. "
            + REVOCATION_DELAY_NOTE
            + f" This gateway's `cache.ttl_seconds` is {cache_ttl:g}."
        ),
        "parameters": [
            {
                "name": "token_id",
                "in": "path",
                "required": True,
                "description": "The token's `id` as listed: 24 hexadecimal digits.",
                "schema": {"type": "string"},
            }
        ],
        "responses": {
            "204": {"description": "The token is revoked"},
            "401": {"$ref": "#/components/responses/Unauthorized"},
            "403": {"$ref": "#/components/responses/Forbidden"},
            "404": _json_response(
                "No token of the caller has this id: the id is unknown, malformed or another user's",
                _error_ref(),
            ),
            "410": _json_response("The token was already revoked", _error_ref()),
            "503": {"$ref": "#/components/responses/StoreUnavailable"},
        },
    }


def _schemas(allowed_scopes: Sequence[str]) -> dict[str, Any]:
    scopes = {"type": "array", "items": {"type": "string", "enum": list(allowed_scopes)}}
    metadata = {
        "id": {"type": "string", "pattern": "^[0-9a-f]{24}$"},
        "name": {"type": ["string", "null"]},
        "token_prefix": {"type": "string"},
        "scopes": {"type": "array", "items": {"type": "string"}},
        "kind": {"type": "string"},
        "created_at": _NULLABLE_DATE_TIME,
        "expires_at": _NULLABLE_DATE_TIME,
    }
    return {
        "TokenCreateRequest": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "name": {"type": ["string", "null"], "maxLength": MAX_NAME_LENGTH, "pattern": NAME_PATTERN},
                "expires_at": {**_NULLABLE_DATE_TIME, "description": "Must be in the future; no offset means UTC."},
                "scopes": {**scopes, "type": ["array", "null"], "minItems": 1},
            },
        },
        "CreatedToken": _closed_object(
            {**metadata, "token": {"type": "string", "description": "The plaintext token, shown only once."}}
        ),
        "Token": _closed_object(
            {
                **metadata,
                "last_used_at": _NULLABLE_DATE_TIME,
                "user_agents": {"type": "array", "items": {"type": "string"}, "maxItems": 20},
                "expired": {"type": "boolean"},
            }
        ),
        "TokenList": {"type": "array", "items": {"$ref": "#/components/schemas/Token"}},
        "Error": {
            "type": "object",
            "required": ["message"],
            "properties": {
                "message": {"type": "string"},
                "errors": {
                    "type": "object",
                    "description": "Each invalid field with its problem.",
                    "additionalProperties": {"type": "string"},
                },
            },
        },
    }


def _shared_responses(key_header: str) -> dict[str, Any]:
    return {
        "Unauthorized": {
            **_json_response(f"The {key_header} header is missing or does not authenticate", _error_ref()),
            "headers": {
                "WWW-Authenticate": {"schema": {"type": "string"}},
                "X-Auth-Error": {
                    "schema": {"type": "string", "enum": ["invalid", "revoked", "expired", "inactive_user", "missing"]}
                },
            },
        },
        "Forbidden": _json_response("The calling token has none of the scopes in `auth.required_scopes`", _error_ref()),
        "StoreUnavailable": {
            **_json_response("The token store did not answer in time", _error_ref()),
            "headers": {"Retry-After": {"schema": {"type": "string"}}},
        },
    }


def _closed_object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": list(properties), "properties": properties}


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error_ref() -> dict[str, Any]:
    return {"$ref": "#/components/schemas/Error"}
