"""OpenAPI paths of the admin API and the usage endpoint (merged into the document by ``openapi.py``)."""

from __future__ import annotations

from typing import Any

_ERR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
_OBJ = {"application/json": {"schema": {"type": "object"}}}
_ADMIN: list[dict[str, list[str]]] = [{"AdminToken": []}]
_TEXT = {
    400: "Invalid body or parameters; the message names the field. Nothing changed.",
    401: "Missing or wrong credentials (admin: `Authorization: Bearer <TEXTGEN_ADMIN_TOKEN>`).",
    403: "The account is disabled.",
    404: "No such account or key, or the admin API is off (TEXTGEN_ADMIN_TOKEN unset).",
    429: "Rate limit exceeded; see Retry-After.",
    503: "Temporarily unavailable; see Retry-After.",
}
ADMIN_SECURITY_SCHEME = {
    "AdminToken": {"type": "http", "scheme": "bearer", "description": "the value of TEXTGEN_ADMIN_TOKEN"}
}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": _TEXT[c], "content": _ERR} for c in codes}


def _body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return {"required": bool(required), "content": {"application/json": {"schema": schema}}}


def _op(summary: str, op_id: str, ok: int, what: str, *errors: int, **extra: Any) -> dict[str, Any]:
    return {
        "summary": summary,
        "operationId": op_id,
        "security": _ADMIN,
        "responses": {str(ok): {"description": what, "content": _OBJ}, **_errors(401, 404, *errors)},
        **extra,
    }


_API_ID = {"name": "api_id", "in": "path", "required": True, "schema": {"type": "string"}}
_KEY_ID = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}
_CREDITS = {"type": "number", "description": "credits; finite"}


def admin_paths(account_auth: list[dict[str, list[str]]]) -> dict[str, Any]:
    paths = _paths(account_auth)
    for item in paths.values():  # path parameters go on each operation
        shared = item.pop("parameters", [])
        for op in item.values():
            op["parameters"] = shared + op.get("parameters", [])
    return paths


def _paths(account_auth: list[dict[str, list[str]]]) -> dict[str, Any]:
    account = "/admin/accounts/{api_id}/"
    return {
        "/api/usage/": {
            "get": {
                "summary": "This account's usage: tasks by status, tokens and credits, by day or model",
                "description": "Over the account's whole history (no `from`/`to`), credits_added - "
                "credits_used - credits_reserved equals remaining_credits exactly. `from`/`to`: ISO 8601 "
                "dates (`to` includes that day) or date-times (UTC when no offset); tasks count by creation.",
                "operationId": "usage_get",
                "security": account_auth,
                "parameters": [
                    {"name": "from", "in": "query", "schema": {"type": "string"}},
                    {"name": "to", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "group_by",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["day", "model"]},
                    },
                ],
                "responses": {
                    "200": {"description": "Usage report.", "content": _OBJ},
                    **_errors(400, 401, 403, 429, 503),
                },
            }
        },
        "/admin/accounts/": {
            "post": _op(
                "Create an account (its first API key is in the response, shown once)",
                "admin_accounts_create",
                201,
                "The account, with api_key and key_id.",
                400,
                requestBody=_body(
                    {
                        "name": {"type": "string", "maxLength": 255},
                        "credits": {**_CREDITS, "minimum": 0},
                        "rate_limit": {"type": "integer", "minimum": 1, "maximum": 1000000000},
                    },
                    ["name"],
                ),
            ),
            "get": _op(
                "List accounts (oldest first, cursor-paginated: follow `next`)",
                "admin_accounts_list",
                200,
                "A page of accounts.",
                400,
                parameters=[
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
            ),
        },
        account: {
            "parameters": [_API_ID],
            "get": _op("Show an account and its keys", "admin_accounts_show", 200, "The account."),
            "patch": _op(
                "Set the rate limit, disable or enable (disabling fails its pending tasks)",
                "admin_accounts_update",
                200,
                "The account.",
                400,
                requestBody=_body(
                    {"rate_limit": {"type": "integer", "minimum": 1}, "disabled": {"type": "boolean"}}, []
                ),
            ),
        },
        account + "credits/": {
            "parameters": [_API_ID],
            "post": _op(
                "Credit (positive) or debit (negative) with a reason; never below zero",
                "admin_accounts_credit",
                200,
                "The account.",
                400,
                requestBody=_body({"amount": _CREDITS, "reason": {"type": "string"}}, ["amount", "reason"]),
            ),
        },
        account + "keys/": {
            "parameters": [_API_ID],
            "post": _op(
                "Create an API key (shown once)", "admin_keys_create", 201, "key_id, api_key, prefix."
            ),
            "get": _op(
                "List the account's keys", "admin_keys_list", 200, "Keys: prefix, created, last used."
            ),
        },
        account + "keys/{key_id}/": {
            "parameters": [_API_ID, _KEY_ID],
            "delete": _op("Revoke a key", "admin_keys_revoke", 200, "The revoked key."),
        },
        account + "webhook-secret/": {
            "parameters": [_API_ID],
            "post": _op(
                "Rotate the webhook signing secret (the previous one signs too during the grace period)",
                "admin_webhook_secret_rotate",
                200,
                "The account with its new secret.",
            ),
        },
    }
