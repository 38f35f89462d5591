"""What the HTTP and gRPC front ends share: request schemas, validation, auth, tokenization, routing to
the model deployments, and the mapping of every failure to one status (a 4xx for a client's mistake).

The front ends (actors/serve_api.py) only translate their transport to and from these calls, so a
request means the same, and fails the same way, over either.
"""

import asyncio
import copy
import hmac
import logging
import random
import time
import uuid
from collections import Counter
from typing import Any, AsyncIterator, Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from actors.chat import ChatFormat
from actors.monitor import routing_path
from cluster.storage import Storage

log = logging.getLogger("helio.serve")
Number = StrictFloat | StrictInt
GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
              413: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
              503: grpc.StatusCode.RESOURCE_EXHAUSTED, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


class ApiError(Exception):
    """A request that cannot be answered: an HTTP status, OpenAI's error fields, and the gRPC code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", retry_after_s: float | None = None,
                 grpc_code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after_s = retry_after_s
        self.grpc_code = grpc_code or GRPC_CODES.get(status, grpc.StatusCode.INTERNAL)

    def __reduce__(self):  # crosses process boundaries whole (Serve hands a gRPC method's error to its proxy)
        return ApiError, (self.status, self.message, self.param, self.code, self.kind, self.retry_after_s,
                          self.grpc_code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- request schemas (OpenAI's fields; extra fields that OpenAI clients send are ignored) ----

class Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Sampling(Strict):
    model: StrictStr
    max_tokens: StrictInt = Field(16, ge=1, le=4096)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    n: StrictInt = Field(1, ge=1, le=1)


class CompletionRequest(Sampling):
    prompt: StrictStr = Field(min_length=1)


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class EmbeddingRequest(Strict):
    model: StrictStr
    input: StrictStr | list[StrictStr]
    encoding_format: Literal["float", "base64"] = "float"
    truncate: StrictBool = False  # Helio's: cut inputs longer than the model's context instead of refusing them


class ClassifyRequest(Strict):
    model: StrictStr
    input: StrictStr | list[StrictStr]
    truncate: StrictBool = False


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The chat template: one `role: content` line per message, then `assistant:` for the reply. A GPT
    pretrained on plain text has no chat format of its own; this one reads as a transcript."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


CHAT_STOP = "\nuser:"  # the reply ends where the model starts the user's next turn


class Served:
    """What the front end knows of one hosted model: its deployment handle (and its canary's, during a
    rollout), task and tokenizer. `as_version` is the view one request is answered by."""

    def __init__(self, entry: dict[str, Any], handle: Any, canary: Any = None):
        self.id, self.task, self.handle, self.canary = entry["id"], entry["task"], handle, canary
        self.artifacts = {"stable": entry["artifact"], "canary": entry.get("canary_artifact")}
        self.version = "stable"
        self.chat = ChatFormat(entry["tokenizer_files"])
        self.tokenizer = self.chat.tokenizer
        self.context = entry["context"]
        self.eos_ids = self.chat.eos_ids  # a reply ends at any of them
        self.imported = "tokenizer_config.json" in entry["tokenizer_files"]  # a checkpoint's own format, not Helio's

    def as_version(self, version: str) -> "Served":
        view = copy.copy(self)
        view.version, view.handle = version, self.canary if version == "canary" else self.handle
        return view

    def fingerprint(self) -> str:
        return f"helio:{self.version}:{self.artifacts[self.version]}"


class Completion:
    """Turns generated token ids into text: stop strings, finish reason, usage; OpenAI's bodies for
    completions and chat completions, whole or as stream chunks."""

    def __init__(self, served: Served, prompt_tokens: int, stops: list[str], max_tokens: int, chat: bool):
        self.served, self.prompt_tokens, self.stops, self.max_tokens = served, prompt_tokens, stops, max_tokens
        self.chat = chat
        self.id, self.created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        self.used = 0

    def finish(self, tokens: list[int]) -> tuple[str, str | None]:
        """(text so far, cut at a stop string or the end-of-text token; finish reason or None)."""
        self.used = len(tokens)
        end = next((i for i, t in enumerate(tokens) if t in self.served.eos_ids), None)
        ended = end is not None
        text = self.served.tokenizer.decode(tokens[:end] if ended else tokens)
        for s in self.stops:
            if s in text:
                return text[:text.index(s)], "stop"
        if ended:
            return text, "stop"
        return text, "length" if len(tokens) >= self.max_tokens else None

    async def pieces(self, tokens: AsyncIterator[list[int]]) -> AsyncIterator[tuple[str, str | None]]:
        """(new text, None) as it grows, then (the rest, finish reason) once."""
        got: list[int] = []
        sent, finish = "", None
        async for piece in tokens:
            got += piece
            text, finish = self.finish(got)
            if finish is not None:
                break
            if len(text) > len(sent):  # a piece that decodes to nothing new (part of a character) waits
                yield text[len(sent):], None
                sent = text
        text, finish = self.finish(got)
        yield text[len(sent):], finish or "length"

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.used,
                "total_tokens": self.prompt_tokens + self.used}

    def body(self, text: str, finish: str | None, chunk: bool = False) -> dict:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
            choice = {"index": 0, ("delta" if chunk else "message"): {"role": "assistant", "content": text},
                      "finish_reason": finish}
        else:
            kind, choice = "text_completion", {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.served.id,
               "system_fingerprint": self.served.fingerprint(), "choices": [choice]}
        if not chunk or finish is not None:
            out["usage"] = self.usage()
        return out


async def answer(call: Any, deadline: float) -> Any:
    """Awaits a deployment call until the deadline (event-loop time); every failure becomes an ApiError."""
    try:
        return await asyncio.wait_for(call, max(0.001, deadline - asyncio.get_running_loop().time()))
    except BaseException as e:  # noqa: BLE001 - mapped to a status, or re-raised
        raise failure(e) from None


def failure(e: BaseException) -> BaseException:
    """A deployment call's exception -> the ApiError a client gets (the exception itself when it is
    not one of the expected ones: a bug, which is then a 500)."""
    if isinstance(e, ApiError | asyncio.CancelledError):
        return e
    if isinstance(e, TimeoutError):
        return ApiError(504, "the model did not answer within the request timeout", code="timeout",
                        kind="timeout_error")
    cause = getattr(e, "cause", None) or e  # a RayTaskError wraps what its replica raised
    if isinstance(cause, BackPressureError):
        return ApiError(cause.status_code, f"the model is overloaded: {cause.message} Retry later.",
                        code="overloaded", kind="server_error", retry_after_s=cause.retry_after_s or 1)
    if isinstance(cause, DeploymentUnavailableError | RayActorError):
        return ApiError(503, "the model's replica is unavailable (restarting); retry", code="unavailable",
                        kind="server_error", retry_after_s=1, grpc_code=grpc.StatusCode.UNAVAILABLE)
    if isinstance(cause, ValueError):  # the model refused the input (checked here first; a last line)
        return ApiError(400, str(cause).splitlines()[0])
    return e


class Frontend:
    """Keys, validation and routing, whatever the transport."""

    def __init__(self, models: list[dict[str, Any]], handles: dict[str, Any], api_keys: list[str],
                 max_items: int, max_body_bytes: int, request_timeout_s: float, storage: str, app: str):
        self.models = {m["id"]: Served(m, handles[m["id"]], handles.get(f"{m['id']}@canary")) for m in models}
        self.keys = [k.encode() for k in api_keys]
        self.max_items, self.max_body_bytes, self.timeout = max_items, max_body_bytes, request_timeout_s
        self.created = int(time.time())
        self.store, self.routing_file = Storage(storage), routing_path(app)
        self.routing: dict[str, Any] = {}
        self.routing_read = float("-inf")
        self.app_name = app
        self.caught: Counter[str] = Counter()  # exceptions carried on from, by where (logged as they happen)

    def note_caught(self, where: str, e: BaseException, detail: str = "") -> None:
        """An exception the front end carries on from: logged, and counted in `caught` by `where`."""
        self.caught[where] += 1
        log.warning("ingress of %s: %s failed (%d so far): %s: %s", self.app_name, detail or where,
                    self.caught[where], type(e).__name__, e)

    def canary_share(self, model_id: str) -> float:
        """The share of a model's traffic its canary gets now: from the routing file that jobs.serve,
        jobs.rollout and the monitor write, read at most once a second."""
        if time.monotonic() - self.routing_read > 1.0:
            self.routing_read = time.monotonic()
            try:
                self.routing = (self.store.read_json(self.routing_file) or {}).get("models", {})
            except Exception as e:  # noqa: BLE001 - keep the last good routing; the next read may succeed
                self.note_caught("routing read", e)
        return float(self.routing.get(model_id, {}).get("share", 0.0))

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.timeout

    def authorize(self, authorization: str) -> None:
        """`authorization` is the HTTP header or the gRPC metadata value: `Bearer <key>`."""
        if not self.keys:
            return
        token = authorization[7:].encode() if authorization.lower().startswith("bearer ") else b""
        if not any(hmac.compare_digest(token, k) for k in self.keys):
            raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", kind="authentication_error")

    def check_size(self, size: int) -> None:
        if size > self.max_body_bytes:
            raise ApiError(413, f"the request body has {size} bytes, more than the limit of {self.max_body_bytes}",
                           code="body_too_large")

    @staticmethod
    def validate(schema: type[BaseModel], data: bytes | dict) -> Any:
        """JSON bytes or a dict -> the schema's object, or a 400 naming the first wrong field."""
        try:
            return schema.model_validate_json(data) if isinstance(data, bytes) else schema.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            if first.get("type") == "json_invalid":
                raise ApiError(400, "the request body is not valid JSON (in UTF-8)", code="invalid_json") from None
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param, first.get("type")) \
                from None

    def model(self, name: str, task: str, asked: str | None = None) -> Served:
        """The model a request names, as the version that answers it: the one `asked` for (the
        x-helio-version header or gRPC metadata: stable or canary), else its canary for the routed share
        of requests."""
        served = self.models.get(name)
        if served is None:
            raise ApiError(404, f"model '{name}' does not exist; GET /v1/models lists the hosted ones", "model",
                           "model_not_found")
        if served.task != task:
            raise ApiError(400, f"model '{name}' serves {served.task}, not {task}", "model", "wrong_task")
        if asked not in (None, "", "stable", "canary"):
            raise ApiError(400, f"x-helio-version: must be stable or canary, not {asked!r}", "x-helio-version")
        if served.canary is None:
            if asked == "canary":
                raise ApiError(404, f"model '{name}' has no canary version", "x-helio-version", "no_canary")
            return served
        version = asked or ("canary" if random.random() < self.canary_share(name) else "stable")
        return served.as_version(version)

    def list_models(self) -> list[dict]:
        return [{"id": m.id, "object": "model", "created": self.created, "owned_by": "helio", "task": m.task}
                for m in self.models.values()]

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

    async def per_input(self, body: EmbeddingRequest | ClassifyRequest, task: str,
                        asked: str | None = None) -> tuple[Served, list, dict]:
        """Sends every text of `input` to the model's batched method (each joins the replica's next batch):
        (model, one answer per text, usage)."""
        served = self.model(body.model, task, asked)
        rows = self._encode(served, [body.input] if isinstance(body.input, str) else body.input, body.truncate)
        method = getattr(served.handle, task)  # embed / classify
        answers = await answer(asyncio.gather(*(method.remote(r) for r in rows)), self.deadline())
        tokens = sum(len(r) for r in rows)
        return served, list(answers), {"prompt_tokens": tokens, "total_tokens": tokens}

    def completion(self, body: CompletionRequest | ChatRequest,
                   asked: str | None = None) -> tuple[Served, list[int], dict, Completion]:
        """A completion or chat request -> (model, prompt ids, sampling parameters, its Completion)."""
        served = self.model(body.model, "generate", asked)
        chat = isinstance(body, ChatRequest)
        field = "messages" if chat else "prompt"
        ids = served.tokenizer.encode(self.prompt_text(served, body) if chat else body.prompt,
                                      add_special_tokens=False).ids
        if len(ids) >= served.context:
            raise ApiError(400, f"{field}: {len(ids)} tokens, the model's context is {served.context}", field,
                           "context_length_exceeded")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: at most 4 non-empty strings", "stop")
        params = {"max_tokens": min(body.max_tokens, served.context - len(ids)), "temperature": float(body.temperature),
                  "top_p": float(body.top_p) if body.top_p < 1 else None, "top_k": body.top_k, "seed": body.seed,
                  "stop_ids": list(served.eos_ids)}
        transcript = chat and not served.chat.templated  # Helio's own format ends where the next turn starts
        return served, ids, params, Completion(served, len(ids), stops + ([CHAT_STOP] if transcript else []),
                                               params["max_tokens"], chat)

    @staticmethod
    def prompt_text(served: Served, body: ChatRequest) -> str:
        """The conversation as the model reads it: its checkpoint's chat template, or Helio's transcript
        for a model Helio trained; an imported checkpoint without a template has no chat format."""
        if served.chat.templated:
            return served.chat.render([{"role": m.role, "content": m.content} for m in body.messages])
        if served.imported:
            raise ApiError(400, f"model '{served.id}' has no chat template (its tokenizer_config.json sets none): "
                                f"use /v1/completions with a prompt", "messages")
        return chat_prompt(body.messages)

    async def generate(self, served: Served, ids: list[int], params: dict) -> list[int]:
        return await answer(served.handle.generate.remote(ids, params), self.deadline())

    async def stream(self, served: Served, ids: list[int], params: dict) -> AsyncIterator[list[int]]:
        """The generated tokens as the replica samples them (in pieces), until the request's deadline."""
        deadline = self.deadline()
        response = served.handle.options(stream=True).stream.remote(ids, params)
        tokens, finished = response.__aiter__(), False
        try:
            while True:
                try:
                    yield await answer(tokens.__anext__(), deadline)
                except StopAsyncIteration:
                    finished = True
                    return
        finally:
            if not finished:  # a deadline, an error or a caller that left: the replica stops generating
                response.cancel()
