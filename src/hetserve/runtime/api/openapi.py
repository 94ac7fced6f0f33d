"""The server's OpenAPI document (``GET /openapi.json``): the request bodies are the JSON schemas of the
``protocol`` models the server validates with, so a client (or a fuzzer) sees what is checked."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from .limits import Access
from .protocol import ChatCompletionRequest, CompletionRequest

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_REASONS = {
    "400": "a mistake in the request (the error's param names the field)",
    "401": "no valid API key (only when the server has one)",
    "404": "unknown model or route",
    "405": "method not allowed (the Allow header lists those that are)",
    "408": "the body did not arrive in time",
    "413": "the body is too large",
    "415": "the body is not sent as application/json",
    "499": "the client disconnected",
    "500": "the engine failed while generating",
    "503": "the engine is not running, or no instance can take the request",
}


def _errors(*codes: str) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/Error"}
    return {c: {"description": _REASONS[c], "content": {"application/json": {"schema": ref}}} for c in codes}


def _json(description: str, schema: dict | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


def install_openapi(app: FastAPI, access: Access, model_name: str) -> None:
    """Make ``app.openapi()`` (served at /openapi.json) describe the bodies (``model``: the one served),
    the responses and the API key."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(
            title="hetserve",
            version="1",
            description="An OpenAI-compatible API (see docs/serve.md)",
            routes=app.routes,
        )
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas.clear()  # FastAPI's own (for path-parameter validation errors) are never sent
        for model in (CompletionRequest, ChatCompletionRequest):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schema["properties"]["model"] = {"type": "string", "enum": [model_name]}
            schemas[model.__name__] = schema
        schemas["Error"] = _ERROR
        paths = doc["paths"]
        auth = ("401",) if access.api_key else ()
        for path, model in (
            ("/v1/completions", CompletionRequest),
            ("/v1/chat/completions", ChatCompletionRequest),
        ):
            op = paths[path]["post"]
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
                },
            }
            ok = _json("the completion (or, with stream: true, server-sent events)")
            # each event: a chunk as JSON in ``data`` (an error object, or the final ``[DONE]``)
            event = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
            ok["content"]["text/event-stream"] = {"schema": event}
            op["responses"] = {
                "200": ok,
                **_errors("400", *auth, "404", "408", "413", "415", "499", "500", "503"),
            }
        paths["/v1/models"]["get"]["responses"] = {"200": _json("the served model"), **_errors(*auth)}
        for param in paths["/v1/models/{name}"]["get"].get("parameters", []):
            param["schema"] = {"type": "string", "enum": [model_name]}  # others: 404
        paths["/v1/models/{name}"]["get"]["responses"] = {
            "200": _json("the served model"),
            **_errors(*auth, "404"),
        }
        paths["/health"]["get"]["responses"] = {
            "200": _json("the engine runs"),
            "503": _json("the engine stopped, or no instance is up"),
        }
        paths["/metrics"]["get"]["responses"] = {
            "200": {
                "description": "Prometheus text format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        }
        if access.api_key:
            doc["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
            for path, item in paths.items():
                if path.startswith("/v1/"):
                    for op in item.values():
                        op["security"] = [{"apiKey": []}]
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
