"""The OpenAI-compatible HTTP ingress: keys, validation, tokenization, routing to the model deployments.

Routes: GET /health, GET /v1/models, POST /v1/completions (SSE with
`stream: true`), POST /v1/embeddings, POST /v1/classify. A client's mistake
is a 4xx whose body is OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`), never a 500.
"""


import asyncio
import base64
import hmac
import json
import struct
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from ray import serve
from tokenizers import Tokenizer

from actors.finetune_data import special_id
from actors.serve import stream_tokens

app = FastAPI(title="Helio", docs_url=None, redoc_url=None)
Number = StrictFloat | StrictInt


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(status: int, message: str, param: str | None, code: str | None, kind: str) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return error_body(e.status, e.message, e.param, e.code, e.kind)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    # raised by the framework itself: a body it cannot parse (invalid UTF-8), an unknown route, ...
    return error_body(e.status_code, str(e.detail), None, None, "invalid_request_error")


class Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields Helio does not use


class CompletionRequest(Strict):
    model: StrictStr
    prompt: StrictStr = Field(min_length=1)
    max_tokens: StrictInt = Field(16, ge=1, le=4096)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    n: StrictInt = Field(1, ge=1, le=1)


class EmbeddingRequest(Strict):
    model: StrictStr
    input: StrictStr | list[StrictStr]
    encoding_format: Literal["float", "base64"] = "float"
    truncate: StrictBool = False  # Helio's: cut inputs longer than the model's context instead of refusing them


class ClassifyRequest(Strict):
    model: StrictStr
    input: StrictStr | list[StrictStr]
    truncate: StrictBool = False


class Served:
    """What the ingress knows of one hosted model: its deployment handle, task and tokenizer."""

    def __init__(self, entry: dict[str, Any], handle: Any):
        self.id, self.task, self.handle = entry["id"], entry["task"], handle
        self.tokenizer = Tokenizer.from_str(entry["tokenizer_json"])
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.context = entry["context"]
        self.eos_id = special_id(self.tokenizer, ("<|endoftext|>", "</s>", "[SEP]"))


class Completion:
    """Turns generated token ids into OpenAI completion bodies: stop strings, finish reason, usage."""

    def __init__(self, served: Served, prompt_tokens: int, stops: list[str], max_tokens: int):
        self.served, self.prompt_tokens, self.stops, self.max_tokens = served, prompt_tokens, stops, max_tokens
        self.id, self.created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        self.used = 0

    def finish(self, tokens: list[int]) -> tuple[str, str | None]:
        """(text so far, cut at a stop string or the end-of-text token; finish reason or None)."""
        self.used = len(tokens)
        eos = self.served.eos_id
        ended = eos is not None and eos in tokens
        text = self.served.tokenizer.decode(tokens[:tokens.index(eos)] if ended else tokens)
        for s in self.stops:
            if s in text:
                return text[:text.index(s)], "stop"
        if ended:
            return text, "stop"
        return text, "length" if len(tokens) >= self.max_tokens else None

    def body(self, text: str, finish: str | None, chunk: bool = False) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.served.id,
               "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
        if not chunk or finish is not None:
            out["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.used,
                            "total_tokens": self.prompt_tokens + self.used}
        return out

    async def sse(self, tokens) -> Any:
        """Server-sent events: a chunk per new piece of text, a last chunk with the finish reason, [DONE]."""
        got: list[int] = []
        sent, finish = "", None
        async for t in tokens:
            got.append(t)
            text, finish = self.finish(got)
            if len(text) > len(sent) and finish is None:
                yield f"data: {json.dumps(self.body(text[len(sent):], None, chunk=True))}\n\n"
                sent = text
            if finish is not None:
                break
        text, finish = self.finish(got)
        yield f"data: {json.dumps(self.body(text[len(sent):], finish or 'length', chunk=True))}\n\n"
        yield "data: [DONE]\n\n"


@serve.deployment
@serve.ingress(app)
class Api:
    def __init__(self, models: list[dict[str, Any]], handles: dict[str, Any], api_keys: list[str],
                 max_items: int, max_body_bytes: int):
        self.models = {m["id"]: Served(m, handles[m["id"]]) for m in models}
        self.keys = [k.encode() for k in api_keys]
        self.max_items, self.max_body_bytes = max_items, max_body_bytes
        self.created = int(time.time())

    # ---- checks every request goes through, in this order ----

    def _check(self, request: Request) -> None:
        """The body's declared size, then the API key: before anything is read or parsed."""
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            raise ApiError(413, f"the request body has {size} bytes, more than the limit of {self.max_body_bytes}",
                           code="body_too_large")
        if self.keys:
            auth = request.headers.get("authorization", "")
            token = auth[7:].encode() if auth.lower().startswith("bearer ") else b""
            if not any(hmac.compare_digest(token, k) for k in self.keys):
                raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", kind="authentication_error")

    async def _parse(self, request: Request, schema: type[BaseModel]) -> Any:
        self._check(request)
        raw = await request.body()
        if len(raw) > self.max_body_bytes:
            raise ApiError(413, f"the request body is over the limit of {self.max_body_bytes} bytes",
                           code="body_too_large")
        try:
            return schema.model_validate_json(raw)
        except ValidationError as e:
            first = e.errors()[0]
            if first.get("type") == "json_invalid":
                raise ApiError(400, "the request body is not valid JSON (in UTF-8)", code="invalid_json") from None
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param, first.get("type")) \
                from None

    def _model(self, name: str, task: str) -> Served:
        served = self.models.get(name)
        if served is None:
            raise ApiError(404, f"model '{name}' does not exist; GET /v1/models lists the hosted ones", "model",
                           "model_not_found")
        if served.task != task:
            raise ApiError(400, f"model '{name}' serves {served.task}, not {task}", "model", "wrong_task")
        return served

    def _encode(self, served: Served, texts: list[str], truncate: bool) -> list[list[int]]:
        if not texts:
            raise ApiError(400, "input: must hold at least one string", "input")
        if len(texts) > self.max_items:
            raise ApiError(400, f"input: {len(texts)} items, more than the limit of {self.max_items}", "input")
        rows = []
        for i, enc in enumerate(served.tokenizer.encode_batch(texts)):
            if not texts[i].strip():
                raise ApiError(400, f"input[{i}]: is empty", "input")
            ids = enc.ids
            if len(ids) > served.context:
                if not truncate:
                    raise ApiError(400, f"input[{i}]: {len(ids)} tokens, longer than the model's context of "
                                        f"{served.context}; send truncate: true to cut it", "input",
                                   "context_length_exceeded")
                ids = ids[:served.context - 1] + ids[-1:]  # keep the closing special token ([SEP])
            rows.append(ids)
        return rows

    # ---- routes ----

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "models": sorted(self.models)}

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._check(request)
        return {"object": "list", "data": [{"id": m.id, "object": "model", "created": self.created,
                                            "owned_by": "helio", "task": m.task} for m in self.models.values()]}

    async def _per_input(self, request: Request, schema: type[BaseModel], task: str) -> tuple[Any, Served, list, dict]:
        """Parses a request whose `input` is a text or a list of texts and sends every text to the model's
        batched method: (request, model, one answer per text, usage)."""
        body = await self._parse(request, schema)
        served = self._model(body.model, task)
        rows = self._encode(served, [body.input] if isinstance(body.input, str) else body.input, body.truncate)
        method = getattr(served.handle, task)  # embed / classify, each row joins the replica's next batch
        answers = list(await asyncio.gather(*(method.remote(r) for r in rows)))
        tokens = sum(len(r) for r in rows)
        return body, served, answers, {"prompt_tokens": tokens, "total_tokens": tokens}

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> dict:
        body, served, vectors, usage = await self._per_input(request, EmbeddingRequest, "embed")
        data = [{"object": "embedding", "index": i,
                 "embedding": v if body.encoding_format == "float" else
                 base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": served.id, "usage": usage}

    @app.post("/v1/classify")
    async def classify(self, request: Request) -> dict:
        _, served, results, usage = await self._per_input(request, ClassifyRequest, "classify")
        data = [{"index": i, "label": max(p, key=p.get), "probabilities": p} for i, p in enumerate(results)]
        return {"object": "list", "data": data, "model": served.id, "usage": usage}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        body = await self._parse(request, CompletionRequest)
        served = self._model(body.model, "generate")
        ids = served.tokenizer.encode(body.prompt, add_special_tokens=False).ids
        if len(ids) >= served.context:
            raise ApiError(400, f"prompt: {len(ids)} tokens, the model's context is {served.context}", "prompt",
                           "context_length_exceeded")
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: at most 4 non-empty strings", "stop")
        params = {"max_tokens": min(body.max_tokens, served.context - len(ids)), "temperature": float(body.temperature),
                  "top_p": float(body.top_p) if body.top_p < 1 else None, "top_k": body.top_k, "seed": body.seed,
                  "stop_ids": [served.eos_id] if served.eos_id is not None else []}
        completion = Completion(served, len(ids), stops, params["max_tokens"])
        if body.stream:
            return StreamingResponse(completion.sse(stream_tokens(served.handle, ids, params)),
                                     media_type="text/event-stream")
        tokens = await served.handle.generate.remote(ids, params)
        text, finish = completion.finish(tokens)
        return completion.body(text, finish)
