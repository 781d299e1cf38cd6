"""/openapi.json: every route and body, generated from the msgspec structs the server decodes with."""

from __future__ import annotations

from typing import Any

import msgspec

from llmc.runtime.api import protocol as p

# (method, path, summary, request body type or None, response type or None for non-JSON)
ROUTES: list[tuple[str, str, str, Any, Any]] = [
    ("get", "/health", "Liveness: 200 once the model is loaded", None, p.Health),
    ("get", "/v1/models", "The served model", None, p.ModelList),
    ("get", "/v1/models/{model}", "One model by id (404 for any but the served one)", None, p.ModelCard),
    (
        "post",
        "/v1/chat/completions",
        "Chat completion (stream: Server-Sent Events)",
        p.ChatCompletionRequest,
        p.ChatCompletion,
    ),
    ("post", "/v1/completions", "Text completion (stream: Server-Sent Events)", p.CompletionRequest, p.Completion),
    ("post", "/tokenize", "Token ids of a prompt or of chat messages", p.TokenizeRequest, p.TokenizeResponse),
    ("post", "/detokenize", "Text of token ids", p.DetokenizeRequest, p.DetokenizeResponse),
    ("get", "/metrics", "Prometheus metrics (text format)", None, None),
]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def openapi_spec(version: str, auth: bool, model_name: str) -> dict[str, Any]:
    types = [t for _, _, _, req, resp in ROUTES for t in (req, resp) if t is not None] + [p.ErrorResponse]
    (refs, components) = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    by_type = dict(zip(types, refs, strict=True))
    # The one model this server answers to: documenting it lets clients and fuzzers know it.
    for schema in components.values():
        if "model" in schema.get("properties", {}):
            schema["properties"]["model"] = {"type": "string", "enum": [model_name]}
    paths: dict[str, Any] = {}
    error = {"content": {"application/json": {"schema": by_type[p.ErrorResponse]}}}
    for method, path, summary, req, resp in ROUTES:
        responses: dict[str, Any] = {}
        if resp is None:
            responses["200"] = {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
        else:
            responses["200"] = {"description": "OK", "content": {"application/json": {"schema": by_type[resp]}}}
        if req is not None:
            responses["400"] = {"description": "Invalid request", **error}
            responses["404"] = {"description": "Unknown model", **error}
            responses["413"] = {"description": "Body too large", **error}
        if "{model}" in path:
            responses["404"] = {"description": "Unknown model", **error}
        if path == "/v1/chat/completions":
            responses["502"] = {"description": "The image caption endpoint (--vision-proxy) failed", **error}
        if auth and path != "/health":
            responses["401"] = {"description": "Missing or wrong API key", **error}
        operation: dict[str, Any] = {"summary": summary, "responses": responses}
        if "{model}" in path:
            operation["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
        if req is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": by_type[req]}}}
        if auth and path != "/health":
            operation["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[method] = operation
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "llmc", "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }
    if auth:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return spec
