"""The server's OpenAPI document (GET /openapi.json): FastAPI's list of routes, completed with what the
handlers read themselves (they parse their bodies, so FastAPI cannot see them): the JSON bodies of
schemas.py, the multipart form of the audio endpoints, the media types answered, and the error shape of
every 4xx and 5xx. Clients can be generated from it, and tests fuzz the API from it (schemathesis)."""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from metronome.serve.reflect import ReflectionBody
from metronome.serve.responses_schemas import ResponsesBody
from metronome.serve.schemas import ChatBody, CompletionBody

OPENAPI_PATH = "/openapi.json"
REF = "#/components/schemas/{model}"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

# path -> the media types of its 200 answers
_ANSWERS = {
    "/": ("text/html",),
    "/metrics": ("text/plain",),
    "/v1/chat/completions": ("application/json", "text/event-stream"),
    "/v1/completions": ("application/json", "text/event-stream"),
    "/v1/responses": ("application/json", "text/event-stream"),
    "/v1/reflections": ("application/json", "text/event-stream"),
    "/v1/audio/transcriptions": (
        "application/json",
        "text/plain",
        "text/vtt",
        "application/x-subrip",
        "text/event-stream",
    ),
    "/v1/audio/translations": (
        "application/json",
        "text/plain",
        "text/vtt",
        "application/x-subrip",
        "text/event-stream",
    ),
}


def _null_is_default(schema: dict[str, Any]) -> None:
    """schemas.py reads an explicit null as "the default": every optional property also accepts null."""
    for sub in schema.get("$defs", {}).values():
        _null_is_default(sub)
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        if name in required:
            continue
        accepts_null = prop.get("type") == "null" or any(p.get("type") == "null" for p in prop.get("anyOf", ()))
        if not accepts_null:
            keep = {k: prop.pop(k) for k in ("default", "title", "description") if k in prop}
            schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **keep}


def _body_schema(model: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's JSON schema and its nested models, with references into components/schemas."""
    schema = copy.deepcopy(model.model_json_schema(ref_template=REF, mode="validation"))
    _null_is_default(schema)
    return schema, schema.pop("$defs", {})


def _speech_form() -> dict[str, Any]:
    from metronome.serve.audio import GRANULARITIES, ResponseFormat

    text = {"type": "string"}
    properties: dict[str, Any] = {
        "file": {"type": "string", "format": "binary", "description": "the recording (WAV, FLAC, MP3, OGG...)"},
        "model": text,
        "language": {**text, "description": "ISO-639-1 code"},
        "prompt": text,
        "response_format": {"type": "string", "enum": list(ResponseFormat.choices())},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "stream": {"type": "boolean", "description": "server-sent events: a delta per segment, then the text"},
    }
    for name in GRANULARITIES:
        properties[name] = {"type": "array", "items": {"type": "string", "enum": ["segment", "word"]}}
    return {"type": "object", "required": ["file"], "properties": properties}


def openapi_schema(app: FastAPI, models: tuple[str, ...] = ()) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app`'s routes; `models`: the names the chat model answers to (any other
    is a 404), none while it loads. Built per request of the document (milliseconds)."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes, description=__doc__.split("\n\n")[0])
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = ERROR_SCHEMA
    bodies = {"/v1/chat/completions": ChatBody, "/v1/completions": CompletionBody, "/v1/responses": ResponsesBody}
    bodies["/v1/reflections"] = ReflectionBody
    for model in bodies.values():
        schema, nested = _body_schema(model)
        components.update(nested)
        if models:
            schema["properties"]["model"] = {"anyOf": [{"type": "string", "enum": list(models)}, {"type": "null"}]}
        components[model.__name__] = schema
    error = {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}
    for path, operations in doc.get("paths", {}).items():
        for operation in operations.values():
            if path in bodies:
                ref = {"$ref": REF.format(model=bodies[path].__name__)}
                operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
            elif path.startswith("/v1/audio/"):
                content = {"multipart/form-data": {"schema": _speech_form()}}
                operation["requestBody"] = {"required": True, "content": content}
            for parameter in operation.get("parameters", ()):
                if path == "/v1/models/{model_id}" and parameter["name"] == "model_id" and models:
                    parameter["schema"] = {"type": "string", "enum": list(models)}
            answers = _ANSWERS.get(path, ("application/json",))
            operation["responses"] = {
                "200": {"description": "the answer", "content": {media: {} for media in answers}},
                "4XX": {"description": "a bad request, in OpenAI's error shape", "content": error},
                "5XX": {"description": "a server failure, in OpenAI's error shape", "content": error},
            }
    return doc
