"""The ingress's OpenAPI document (GET /openapi.json): every route's request body (the pydantic models
the ingress validates with, actors/serve_requests.py), its answer and each error status with OpenAI's
error body.

The ingress reads raw bodies (size first, then the API key, then a strict parse), so FastAPI sees no
body parameter to document; this module adds them, and the response shapes below, which document
what the handlers return (they are not used to validate or filter answers).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from actors.serve_requests import ChatRequest, ClassifyRequest, CompletionRequest, EmbeddingRequest


class Doc(BaseModel):
    """An answer's documented shape: nothing else is in it (additionalProperties: false)."""
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(Doc):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(Doc):
    error: ErrorDetail


class Usage(Doc):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class Logprobs(Doc):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Doc):
    text: str
    index: int
    logprobs: Logprobs | None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None  # on the whole answer and a stream's last chunk


class ChatReply(Doc):
    role: Literal["assistant"]
    content: str


class ChatChoice(Doc):
    index: int
    message: ChatReply | None = None  # whole
    delta: ChatReply | None = None  # a stream chunk
    finish_reason: Literal["stop", "length"] | None


class ChatResponse(Doc):
    id: str
    object: Literal["chat.completion", "chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class Embedding(Doc):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32 (encoding_format)


class EmbeddingResponse(Doc):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class Classification(Doc):
    index: int
    label: str
    probabilities: dict[str, float]


class ClassifyResponse(Doc):
    object: Literal["list"]
    data: list[Classification]
    model: str
    usage: Usage


class Model(Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    task: Literal["generate", "embed", "classify"]
    context: int | None  # tokens a request may hold; None for an image classifier


class ModelList(Doc):
    object: Literal["list"]
    data: list[Model]


class Health(Doc):
    status: Literal["ok"]
    models: list[str]


# path -> (request body, whole answer, streams server-sent events)
ROUTES: dict[str, tuple[type[BaseModel] | None, type[BaseModel], bool]] = {
    "/health": (None, Health, False),
    "/v1/models": (None, ModelList, False),
    "/v1/completions": (CompletionRequest, CompletionResponse, True),
    "/v1/chat/completions": (ChatRequest, ChatResponse, True),
    "/v1/embeddings": (EmbeddingRequest, EmbeddingResponse, False),
    "/v1/classify": (ClassifyRequest, ClassifyResponse, False),
}
ERRORS = {
    400: "a field is wrong (error.param names it), or the body is not JSON",
    401: "no valid API key (Authorization: Bearer <key>)",
    404: "no model of that id, or no canary of it (x-helio-version)",
    405: "the route does not take this method (Allow lists those it takes)",
    413: "the body is over http.max_body_bytes",
    429: "the API key is over its requests_per_second or tokens_per_minute limit (Retry-After)",
    503: "the model is overloaded or restarting (Retry-After)",
    504: "the model did not answer within the request timeout",
}


def _errors(path: str) -> list[int]:
    if path == "/health":
        return [405]
    if path == "/v1/models":
        return [401, 405, 429]
    return sorted(ERRORS)

RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again",
                               "schema": {"type": "integer", "minimum": 1}}}

TASK_OF = {CompletionRequest: "generate", ChatRequest: "generate", EmbeddingRequest: "embed",
           ClassifyRequest: "classify"}


def document(base: dict[str, Any], hosted: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """FastAPI's generated document (`base`: paths and operations) with request bodies, answers and
    errors added; `hosted` (task -> model ids) makes each body's `model` one of the ids it can name."""
    models = [(m, "validation") for m, _, _ in ROUTES.values() if m] + \
             [(m, "serialization") for _, m, _ in ROUTES.values()] + [(ErrorBody, "serialization")]
    _, schemas = models_json_schema(models, ref_template="#/components/schemas/{model}")
    doc = dict(base)
    doc.setdefault("components", {}).setdefault("schemas", {}).update(schemas.get("$defs", {}))
    for body, task in TASK_OF.items():
        if (hosted or {}).get(task):
            doc["components"]["schemas"][body.__name__]["properties"]["model"]["enum"] = sorted(hosted[task])

    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                        "description": "an API key (none needed when none is set)"}}

    def ref(model: type[BaseModel]) -> dict:
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    for path, ops in doc["paths"].items():
        body, answer, streams = ROUTES[path]
        for op in ops.values():
            if path != "/health":
                op["security"] = [{"bearer": []}]
            if body is not None:
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(body)}}}
            ok = {"application/json": {"schema": ref(answer)}}
            if streams:  # stream: true: `data: <chunk JSON>` events (an answer of the same shape), then `data: [DONE]`
                ok["text/event-stream"] = {"schema": {
                    "type": "object", "required": ["data"],
                    "properties": {"data": {"type": "string", "description": f"a {answer.__name__} chunk as JSON, "
                                                                             f"an ErrorBody, or [DONE] last"},
                                   "event": {"type": "string"}}}}
            op["responses"] = {"200": {"description": "the answer" + (" (stream: true: server-sent events of "
                                                                       "the same shape, then [DONE])" if streams else ""),
                                       "content": ok}}
            op["responses"].update({str(code): {"description": ERRORS[code],
                                                "content": {"application/json": {"schema": ref(ErrorBody)}},
                                                **({"headers": RETRY_AFTER} if code in (429, 503) else {})}
                                    for code in _errors(path)})
    return doc
