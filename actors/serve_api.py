"""The ingress: an OpenAI-compatible HTTP API (FastAPI) and the gRPC API (actors/proto/helio.proto) on
one Serve deployment, both over actors/serve_requests.py.

HTTP: GET /health, GET /v1/models, POST /v1/completions and /v1/chat/completions (SSE with
`stream: true`), POST /v1/embeddings, POST /v1/classify. A client's mistake is a 4xx whose body is
OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`), never a 500; an overloaded
or restarting model is a 503 with Retry-After; a request past its deadline is a 504.

gRPC (through Serve's gRPC proxy, which calls the method of the same name here): helio.v1.Helio's
Complete (server streaming), Embed, Classify, and grpc.health.v1.Health's Check, which asks every
model deployment to answer a tiny forward. Errors carry INVALID_ARGUMENT, NOT_FOUND,
UNAUTHENTICATED, RESOURCE_EXHAUSTED, UNAVAILABLE or DEADLINE_EXCEEDED.
"""
# No `from __future__ import annotations` here: FastAPI reads the route signatures at run time.

import asyncio
import base64
import json
import struct
from typing import Any, AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.proto import helio_pb2 as pb
from actors.serve_requests import (ApiError, ChatRequest, ClassifyRequest, CompletionRequest, EmbeddingRequest,
                                   Frontend, Undecodable, answer, total_usage)

app = FastAPI(title="Helio", docs_url=None, redoc_url=None, openapi_url=None)  # Api serves /openapi.json
VERSION = "x-helio-version"  # header / metadata: answer with the stable or the canary version of a model


def openapi(hosted: dict[str, list[str]] | None = None) -> dict:
    """The OpenAPI document: FastAPI's routes with Helio's bodies, answers and errors
    (actors/serve_openapi.py); `hosted` (task -> model ids) names the models a body can ask for."""
    from fastapi.openapi.utils import get_openapi

    from actors.serve_openapi import document

    return document(get_openapi(title=app.title, version=app.version, routes=app.routes), hosted)


def error_response(e: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if e.retry_after_s is not None:
        headers["retry-after"] = str(int(-(-e.retry_after_s // 1)))
    return JSONResponse(status_code=e.status, content=e.body(), headers=headers or None)


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return error_response(e)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    # raised by the framework itself: a body it cannot parse (invalid UTF-8), an unknown route, a method the
    # route does not take (405, whose Allow header RFC 9110 requires goes along)
    return error_response(ApiError(e.status_code, str(e.detail)), getattr(e, "headers", None))


async def sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Server-sent events, ending in `data: [DONE]`; an error after the first byte is an error event."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
    except ApiError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"


def grpc_fields(message: Any) -> dict:
    """The fields a client set on a request message, as the HTTP schema's dict."""
    return {f.name: v if isinstance(v, str | int | float | bool) else list(v) for f, v in message.ListFields()}


def grpc_logprobs(body: dict | None) -> list[pb.TokenLogprob]:
    """OpenAI's legacy logprobs object -> the chunk's TokenLogprob messages (none if not asked for)."""
    if body is None:
        return []
    return [pb.TokenLogprob(token=t, logprob=lp, text_offset=o,
                            top=[pb.TopLogprob(token=k, logprob=v) for k, v in (top or {}).items()])
            for t, lp, top, o in zip(body["tokens"], body["token_logprobs"], body["top_logprobs"],
                                     body["text_offset"])]


@serve.deployment
@serve.ingress(app)
class Api(Frontend):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.openapi_document: dict | None = None

    # ---- HTTP ----

    @app.get("/openapi.json", include_in_schema=False)
    async def http_openapi(self) -> dict:
        """The document, naming this application's models (a request for another is a 404)."""
        if self.openapi_document is None:
            hosted: dict[str, list[str]] = {}
            for m in self.models.values():
                hosted.setdefault(m.task, []).append(m.id)
            self.openapi_document = openapi(hosted)
        return self.openapi_document

    async def _body(self, request: Request, schema: type) -> tuple[Any, str]:
        """(the body, the caller's key id): the declared size, then the API key and its limits, then the
        body; nothing is read before the key is checked."""
        size = request.headers.get("content-length")
        if size is not None and size.isdigit():
            self.check_size(int(size))
        caller = self.authorize(request.headers.get("authorization", ""), request.url.path)
        raw = await request.body()
        self.check_size(len(raw))
        return self.validate(schema, raw), caller

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "models": sorted(self.models)}

    @app.get("/v1/models")
    async def http_models(self, request: Request) -> dict:
        self.authorize(request.headers.get("authorization", ""), request.url.path)
        return {"object": "list", "data": self.list_models()}

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> dict:
        body, caller = await self._body(request, EmbeddingRequest)
        served, vectors, usage = await self.per_input(body, "embed", request.headers.get(VERSION))
        self.charge(caller, usage)
        data = [{"object": "embedding", "index": i,
                 "embedding": v if body.encoding_format == "float" else
                 base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": served.id, "usage": usage}

    @app.post("/v1/classify")
    async def http_classify(self, request: Request) -> dict:
        body, caller = await self._body(request, ClassifyRequest)
        served, results, usage = await self.per_input(body, "classify", request.headers.get(VERSION))
        self.charge(caller, usage)
        data = [{"index": i, "label": max(p, key=p.get), "probabilities": p} for i, p in enumerate(results)]
        return {"object": "list", "data": data, "model": served.id, "usage": usage}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._complete(*await self._body(request, CompletionRequest), request.headers.get(VERSION))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._complete(*await self._body(request, ChatRequest), request.headers.get(VERSION))

    async def _complete(self, body: CompletionRequest | ChatRequest, caller: str, asked: str | None):
        served, prompts = self.completion(body, asked)
        if not body.stream:  # every prompt at once: they share the replica's decode steps
            answers = await asyncio.gather(*(self.generate(served, ids, params) for ids, params, _ in prompts))
            completions = [c for _, _, c in prompts]
            choices = [c.whole(items, i) for i, (c, items) in enumerate(zip(completions, answers))]
            self.charge(caller, usage := total_usage(completions))
            return completions[0].body(choices, usage=usage)
        [(ids, params, completion)] = prompts
        tokens = self.stream(served, ids, params)
        first = await anext(tokens, None)  # a failure before the first token is still a status code

        async def chunks() -> AsyncIterator[dict]:
            async def again() -> AsyncIterator[list]:
                if first is not None:
                    yield first
                async for piece in tokens:
                    yield piece

            try:
                async for text, finish, logprobs in completion.pieces(again()):
                    yield completion.body([completion.choice(text, finish, logprobs, chunk=True)], chunk=True,
                                          usage=completion.usage() if finish is not None else None)
            finally:  # what was generated, also for a client that went away
                self.charge(caller, completion.usage())

        return StreamingResponse(sse(chunks()), media_type="text/event-stream")

    # ---- gRPC ----

    def _grpc(self, context: RayServegRPCContext, e: ApiError) -> ApiError:
        context.set_code(e.grpc_code)
        context.set_details(e.message)  # a 429's names its wait: Serve's proxy drops a failed call's trailers
        return e

    def _grpc_request(self, context: RayServegRPCContext, message: Any, schema: type,
                      method: str) -> tuple[Any, str | None, str]:
        """(the validated request, the version asked for in the metadata, the caller's key id)."""
        if isinstance(message, Undecodable):
            raise ApiError(400, f"the request is not a valid {schema.__name__} message ({message.error[:200]})")
        self.check_size(message.ByteSize())
        metadata = dict(context.invocation_metadata())
        caller = self.authorize(metadata.get("authorization", ""), f"grpc/{method}")
        return self.validate(schema, grpc_fields(message)), metadata.get(VERSION), caller

    async def Complete(self, request: pb.CompleteRequest, grpc_context: RayServegRPCContext
                       ) -> AsyncIterator[pb.CompleteChunk]:
        try:
            body, asked, caller = self._grpc_request(grpc_context, request, CompletionRequest, "Complete")
            served, [(ids, params, completion)] = self.completion(body, asked)
            try:
                async for text, finish, logprobs in completion.pieces(self.stream(served, ids, params)):
                    last = finish is not None
                    yield pb.CompleteChunk(text=text, finish_reason=finish or "",
                                           usage=pb.Usage(**completion.usage()) if last else None,
                                           logprobs=grpc_logprobs(logprobs))
            finally:
                self.charge(caller, completion.usage())
        except ApiError as e:
            raise self._grpc(grpc_context, e) from None

    async def _grpc_per_input(self, context: RayServegRPCContext, message: Any, schema: type,
                              task: str, method: str) -> tuple[list, Any]:
        """Embed / Classify: (one answer per input, usage), or the error's status code on the context."""
        try:
            body, asked, caller = self._grpc_request(context, message, schema, method)
            _, answers, usage = await self.per_input(body, task, asked)
            self.charge(caller, usage)
        except ApiError as e:
            raise self._grpc(context, e) from None
        return answers, pb.Usage(**usage)

    async def Embed(self, request: pb.EmbedRequest, grpc_context: RayServegRPCContext) -> pb.EmbedReply:
        vectors, usage = await self._grpc_per_input(grpc_context, request, EmbeddingRequest, "embed", "Embed")
        return pb.EmbedReply(data=[pb.Embedding(values=v) for v in vectors], usage=usage)

    async def Classify(self, request: pb.ClassifyRequest, grpc_context: RayServegRPCContext) -> pb.ClassifyReply:
        results, usage = await self._grpc_per_input(grpc_context, request, ClassifyRequest, "classify", "Classify")
        return pb.ClassifyReply(data=[pb.Classification(label=max(p, key=p.get), probabilities=p) for p in results],
                                usage=usage)

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
                    ) -> health_pb2.HealthCheckResponse:
        """The standard health check: service '' (or helio.v1.Helio) is every model, a model id is that
        model; SERVING when each answers its tiny forward in time."""
        service = request.service
        if service in ("", "helio.v1.Helio"):
            names = list(self.models)
        elif service in self.models:
            names = [service]
        else:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service '{service}': '' , helio.v1.Helio or a model id")
            return health_pb2.HealthCheckResponse()
        try:
            await answer(asyncio.gather(*(self.models[n].handle.check_health.remote() for n in names)),
                         self.deadline())
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception as e:  # noqa: BLE001 - any failure of a probe means not serving
            self.note_caught("gRPC health check", e, f"the gRPC health check of {', '.join(names)}")
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)
