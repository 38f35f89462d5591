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
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Literal, NamedTuple

import grpc
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from actors.chat import ChatFormat
from actors.monitor import routing_path
from actors.serve_images import DATA_URL, ImageError, pixels_of
from actors.serve_limits import ANONYMOUS, Limiter, Limits, key_id
from actors.token_scores import Scored
from cluster.config import from_dict
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
    stop: Annotated[StrictStr, Field(min_length=1)] | Annotated[list[Annotated[StrictStr, Field(min_length=1)]],
                                                                Field(max_length=4)] | None = None
    stream: StrictBool = False
    n: StrictInt = Field(1, ge=1, le=1)


MAX_LOGPROBS = 20  # alternatives per token (vLLM's default max_logprobs; OpenAI's legacy API took 5)


class CompletionRequest(Sampling):
    # one text or one token-id list, or several of either (one choice each, as OpenAI's legacy API)
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt = Field(16, ge=0, le=4096)  # 0 only with echo: the prompt scored, nothing generated
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False


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
        self.modality = entry.get("modality", "text")  # image: an image classifier (actors/serve_images.py)
        self.image = (entry["image_size"], entry["channels"]) if self.modality == "image" else None
        self.context = entry["context"]
        if self.modality == "text":
            self.chat = ChatFormat(entry["tokenizer_files"])
            self.tokenizer = self.chat.tokenizer
            self.eos_ids = self.chat.eos_ids  # a reply ends at any of them
            self.imported = "tokenizer_config.json" in entry["tokenizer_files"]  # a checkpoint's own format

    def as_version(self, version: str) -> "Served":
        view = copy.copy(self)
        view.version, view.handle = version, self.canary if version == "canary" else self.handle
        return view

    def fingerprint(self) -> str:
        return f"helio:{self.version}:{self.artifacts[self.version]}"


class Pieces:
    """Each token's share of a decoded text: a token's piece is what decoding it after the tokens before
    it (up to WINDOW of them) adds, so a tokenizer that drops a word's leading space at the start of a
    text, or a character split over several byte-level tokens, still gives pieces that add up to the
    decoded text (a token ending inside a character gets "", the one completing it the character)."""

    WINDOW = 8

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.ids, self.pieces = tokenizer, [], []
        self.single: dict[int, str] = {}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False).rstrip("\ufffd")

    def of(self, ids: list[int]) -> list[str]:
        """The pieces of `ids` (a sequence that only grows between calls)."""
        if ids[:len(self.ids)] != self.ids:
            self.ids, self.pieces = [], []
        for i in range(len(self.ids), len(ids)):
            lo = max(0, i - self.WINDOW)
            before, after = self._decode(ids[lo:i]), self._decode(ids[lo:i + 1])
            same = next((k for k, (x, y) in enumerate(zip(before, after)) if x != y), min(len(before), len(after)))
            self.pieces.append(after[same:])  # after extends before, but for a tokenizer that rewrites it
        self.ids = list(ids)
        return self.pieces[:len(ids)]

    def alone(self, token: int) -> str:
        """A token's own text, decoded alone (how an alternative is named)."""
        if token not in self.single:
            self.single[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self.single[token]


class Completion:
    """One prompt's answer: generated token ids (or Scored tokens, with log-probabilities) -> text, cut at
    stop strings, with finish reason and usage; OpenAI's bodies for completions and chat completions,
    whole or as stream chunks. With `echo` the text starts with the prompt (and, with `logprobs`, the
    prompt's tokens come first from the engine, scored)."""

    def __init__(self, served: Served, prompt_ids: list[int], stops: list[str], max_tokens: int, chat: bool,
                 prompt_text: str = "", echo: bool = False, logprobs: int | None = None):
        self.served, self.prompt_tokens, self.stops, self.max_tokens = served, len(prompt_ids), stops, max_tokens
        self.chat, self.echo, self.logprobs = chat, echo, logprobs
        self.prefix = prompt_text if echo else ""
        self.id, self.created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        self.used = 0
        self.tokens: list[int] = []  # generated
        self.scored: list[Scored] = []  # the prompt's (with echo), then the generated ones
        self.prompt_scored = bool(prompt_ids) and echo and logprobs is not None
        self.kept, self.cut = 0, None  # generated tokens before the first end-of-text; where a stop string cut
        self.ended = False  # on an end-of-text token (listed in the log-probabilities, as vLLM does)
        self.texts: dict[str, Pieces] = {"prompt": Pieces(served.tokenizer), "reply": Pieces(served.tokenizer)}
        self.logged = 0  # log-probability entries sent (streaming)

    def add(self, items: list) -> None:
        """The engine's output: token ids, or Scored tokens when log-probabilities were asked for."""
        for item in items:
            if isinstance(item, tuple):
                self.scored.append(Scored(*item))
                if len(self.scored) <= self.prompt_tokens and self.prompt_scored:
                    continue  # the prompt's own
                item = item[0]
            self.tokens.append(item)

    def finish(self, tokens: list[int] | None = None) -> tuple[str, str | None]:
        """(generated text so far, cut at a stop string or the end-of-text token; finish reason or None)."""
        tokens = self.tokens if tokens is None else tokens
        self.used = len(tokens)
        end = next((i for i, t in enumerate(tokens) if t in self.served.eos_ids), None)
        ended = self.ended = end is not None
        self.kept = end if ended else len(tokens)
        text = self.served.tokenizer.decode(tokens[:self.kept])
        self.cut = None
        for s in self.stops:
            if s in text:
                self.cut = text.index(s)
                return text[:self.cut], "stop"
        if ended:
            return text, "stop"
        return text, "length" if len(tokens) >= self.max_tokens else None

    async def pieces(self, tokens: AsyncIterator[list]) -> AsyncIterator[tuple[str, str | None, dict | None]]:
        """(new text, None, its log-probabilities) as it grows, then (the rest, finish reason, ...) once;
        the echoed prompt comes first, in the first piece."""
        sent, finish, first = "", None, self.prefix
        async for piece in tokens:
            self.add(piece)
            text, finish = self.finish()
            if finish is not None:
                break
            if len(text) > len(sent) or first:  # a piece that decodes to nothing new (part of a character) waits
                yield first + text[len(sent):], None, self.new_logprobs()
                sent, first = text, ""
        text, finish = self.finish()
        yield first + text[len(sent):], finish or "length", self.new_logprobs()

    def _entries(self) -> list[tuple[str, float | None, dict[str, float] | None, int]]:
        """(token text, log-probability, top alternatives, offset into the choice's text) per token the
        text holds: the echoed prompt's, then the generated ones up to a stop string, or through the
        end-of-text token. Top alternatives hold the likeliest `logprobs` tokens and the chosen one (as
        vLLM's), each as its own text."""
        n_prompt = self.prompt_tokens if self.prompt_scored else 0
        prompt, reply = self.scored[:n_prompt], self.scored[n_prompt:n_prompt + self.kept + self.ended]
        out: list[tuple[str, float | None, dict[str, float] | None, int]] = []
        for part, items, offset in (("prompt", prompt, 0), ("reply", reply, len(self.prefix))):
            texts = self.texts[part].of([item.token for item in items])
            for item, piece in zip(items, texts):
                if part == "reply" and self.cut is not None and offset >= len(self.prefix) + self.cut:
                    break
                top = None
                if item.logprob is not None:
                    top = {self.texts[part].alone(item.token): item.logprob}
                    for t, lp in item.top:
                        key = self.texts[part].alone(t)
                        top[key] = max(lp, top.get(key, float("-inf")))
                out.append((piece, item.logprob, top, offset))
                offset += len(piece)
        return out

    def logprobs_body(self, entries: list) -> dict:
        """OpenAI's legacy `logprobs` object."""
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries], "text_offset": [e[3] for e in entries]}

    def new_logprobs(self) -> dict | None:
        """The log-probabilities of the tokens not yet sent (streaming), None if not asked for."""
        if self.logprobs is None:
            return None
        entries = self._entries()
        new, self.logged = entries[self.logged:], len(entries)
        return self.logprobs_body(new)

    def whole(self, items: list, index: int = 0) -> dict:
        """The whole answer's choice, from everything the engine sent."""
        self.add(items)
        text, finish = self.finish()
        return self.choice(self.prefix + text, finish, None if self.logprobs is None else
                           self.logprobs_body(self._entries()), index)

    def choice(self, text: str, finish: str | None, logprobs: dict | None = None, index: int = 0,
               chunk: bool = False) -> dict:
        if self.chat:
            return {"index": index, ("delta" if chunk else "message"): {"role": "assistant", "content": text},
                    "finish_reason": finish}
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.used,
                "total_tokens": self.prompt_tokens + self.used}

    def body(self, choices: list[dict], chunk: bool = False, usage: dict | None = None) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.served.id,
               "system_fingerprint": self.served.fingerprint(), "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out


def total_usage(completions: list[Completion]) -> dict[str, int]:
    return {k: sum(c.usage()[k] for c in completions) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


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


class Undecodable(NamedTuple):
    """Request bytes that are not a valid message of the method's type (tolerant_handlers)."""
    error: str


def add_helio_servicer(servicer: Any, server: Any) -> None:
    """The generated `add_HelioServicer_to_server` (the gRPC proxy's servicer function), with request
    bytes that do not decode handed to the method as Undecodable, which answers INVALID_ARGUMENT; left
    to grpc, a decoding failure is UNKNOWN, which says nothing to the client."""
    from actors.proto import helio_pb2_grpc

    helio_pb2_grpc.add_HelioServicer_to_server(servicer, _Tolerant(server))


class _Tolerant:
    """A server whose method handlers get tolerant request deserializers on their way in."""

    def __init__(self, server: Any):
        self.server = server

    @staticmethod
    def _handler(handler: Any) -> Any:
        decode = handler.request_deserializer

        def tolerant(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, or anything a decoder raises
                return Undecodable(str(e) or type(e).__name__)

        return handler._replace(request_deserializer=tolerant) if decode else handler

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        for h in handlers:
            h._method_handlers = {k: self._handler(v) for k, v in h._method_handlers.items()}
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        add = getattr(self.server, "add_registered_method_handlers", None)
        if add is not None:
            add(service, {k: self._handler(v) for k, v in handlers.items()})


def read_key_file(path: str) -> list[str]:
    """The keys in a key file: one per line; blank lines and lines starting with # are skipped. One
    sentence if it cannot be read or holds none."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"api_key_file: cannot read {path}: {e.strerror or e}") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"api_key_file: {path} holds no key (one per line)")
    return keys


class Frontend:
    """Keys, validation and routing, whatever the transport."""

    def __init__(self, models: list[dict[str, Any]], handles: dict[str, Any], api_keys: list[str],
                 max_items: int, max_body_bytes: int, request_timeout_s: float, storage: str, app: str,
                 key_file: str = "", auth: str = "keys", limits: dict | None = None,
                 max_image_pixels: int = 1 << 24):
        self.models = {m["id"]: Served(m, handles[m["id"]], handles.get(f"{m['id']}@canary")) for m in models}
        self.keys = {k.encode(): key_id(k) for k in api_keys + (read_key_file(key_file) if key_file else [])}
        if not self.keys:
            log.warning("application %s answers every request without an API key (%s)", app,
                        "auth: none" if auth == "none" else "no key set; its HTTP host is loopback")
        else:
            log.info("application %s takes %d API key(s), ids %s", app, len(self.keys), ", ".join(self.keys.values()))
        self.limiter = Limiter(from_dict(Limits, limits or {}, "limits"))
        if unknown := set(self.limiter.limits.keys) - set(self.keys.values()) - {ANONYMOUS}:
            log.warning("application %s: limits.keys names %s, which is no key's id", app, ", ".join(sorted(unknown)))
        self.max_items, self.max_body_bytes, self.timeout = max_items, max_body_bytes, request_timeout_s
        self.max_image_pixels = max_image_pixels
        self.created = int(time.time())
        self.store, self.routing_file = Storage(storage), routing_path(app)
        self.routing: dict[str, Any] = {}
        self.routing_read = float("-inf")
        self.app_name = app
        self.caught: Counter[str] = Counter()  # exceptions carried on from, by where (logged as they happen)
        self._metrics()

    def _metrics(self) -> None:
        from ray.util import metrics

        # On Ray's Prometheus endpoint as ray_helio_api_requests_total and ray_helio_api_tokens_total.
        self.m_requests = metrics.Counter("helio_api_requests", "Requests with a valid key (or to an app that takes "
                                          "none), by key id, route and whether they were admitted or throttled.",
                                          ("app", "key", "route", "result"))
        self.m_tokens = metrics.Counter("helio_api_tokens", "Tokens of answered requests, by key id and kind "
                                        "(prompt, completion).", ("app", "key", "kind"))

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

    def authorize(self, authorization: str, route: str) -> str:
        """The caller's key id, once its key is valid and its limits let the request through (401 and 429
        otherwise). `authorization` is the HTTP header or the gRPC metadata value: `Bearer <key>`."""
        caller = ANONYMOUS
        if self.keys:
            token = authorization[7:].encode() if authorization.lower().startswith("bearer ") else b""
            # every key compared in constant time, whichever matches
            matches = [name for k, name in self.keys.items() if hmac.compare_digest(token, k)]
            if not matches:
                raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", kind="authentication_error")
            caller = matches[0]
        over = self.limiter.admit(caller)
        tags = {"app": self.app_name, "key": caller, "route": route}
        self.m_requests.inc(tags={**tags, "result": "throttled" if over else "admitted"})
        if over:
            limit, wait = over
            raise ApiError(429, f"API key {caller} is over its {limit} limit; retry in {wait:.1f} s",
                           code="rate_limit_exceeded", kind="rate_limit_error", retry_after_s=wait)
        return caller

    def charge(self, caller: str, usage: dict[str, int]) -> None:
        """Counts an answered request's tokens against its caller's tokens_per_minute, and in the metrics."""
        self.limiter.charge(caller, usage["total_tokens"])
        for kind in ("prompt", "completion"):
            if usage.get(f"{kind}_tokens"):
                self.m_tokens.inc(usage[f"{kind}_tokens"], tags={"app": self.app_name, "key": caller, "kind": kind})

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
        return [{"id": m.id, "object": "model", "created": self.created, "owned_by": "helio", "task": m.task,
                 "context": m.context} for m in self.models.values()]

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
        inputs = [body.input] if isinstance(body.input, str) else body.input
        method = getattr(served.handle, task)  # embed / classify
        if served.modality == "image":
            images = self._images(served, inputs)
            answers = await answer(asyncio.gather(*(method.remote(px) for px in images)), self.deadline())
            return served, list(answers), {"prompt_tokens": 0, "total_tokens": 0}  # images are not tokens
        looks_like_image = next((i for i, t in enumerate(inputs) if DATA_URL.match(t)), None)
        if looks_like_image is not None:
            raise ApiError(400, f"input[{looks_like_image}]: is an image, and model '{served.id}' classifies text",
                           "input", "wrong_modality")
        rows = self._encode(served, inputs, body.truncate)
        answers = await answer(asyncio.gather(*(method.remote(r) for r in rows)), self.deadline())
        tokens = sum(len(r) for r in rows)
        return served, list(answers), {"prompt_tokens": tokens, "total_tokens": tokens}

    def _images(self, served: Served, inputs: list[str]) -> list[bytes]:
        """Each input decoded to the model's pixels; a 400 or 413 naming the first that is not an image."""
        if not inputs:
            raise ApiError(400, "input: must hold at least one image", "input")
        if len(inputs) > self.max_items:
            raise ApiError(400, f"input: {len(inputs)} items, more than the limit of {self.max_items}", "input")
        size, channels = served.image
        try:
            return [pixels_of(text, i, size, channels, self.max_image_pixels) for i, text in enumerate(inputs)]
        except ImageError as e:
            raise ApiError(e.status, str(e), "input", "invalid_image" if e.status == 400 else "image_too_large") \
                from None

    def completion(self, body: CompletionRequest | ChatRequest,
                   asked: str | None = None) -> tuple[Served, list[tuple[list[int], dict, Completion]]]:
        """A completion or chat request -> (model, [(prompt ids, sampling parameters, its Completion)]
        per prompt: a chat has one, a completion one per prompt it lists)."""
        served = self.model(body.model, "generate", asked)
        chat = isinstance(body, ChatRequest)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: at most 4 non-empty strings", "stop")
        if chat:
            prompts = [("messages", served.tokenizer.encode(self.prompt_text(served, body),
                                                            add_special_tokens=False).ids, "")]
            echo, logprobs = False, None
        else:
            prompts = self.prompts(served, body)
            echo, logprobs = body.echo, body.logprobs
            if body.max_tokens == 0 and not echo:
                raise ApiError(400, "max_tokens: 0 only with echo (to score the prompt); otherwise at least 1",
                               "max_tokens")
        out = []
        for field, ids, text in prompts:
            if len(ids) >= served.context:
                raise ApiError(400, f"{field}: {len(ids)} tokens, the model's context is {served.context}", field,
                               "context_length_exceeded")
            params = {"max_tokens": min(body.max_tokens, served.context - len(ids)),
                      "temperature": float(body.temperature), "top_p": float(body.top_p) if body.top_p < 1 else None,
                      "top_k": body.top_k, "seed": body.seed, "stop_ids": list(served.eos_ids),
                      "logprobs": logprobs, "prompt_logprobs": echo and logprobs is not None}
            transcript = chat and not served.chat.templated  # Helio's own format ends where the next turn starts
            out.append((ids, params, Completion(served, ids, stops + ([CHAT_STOP] if transcript else []),
                                                params["max_tokens"], chat, text, echo, logprobs)))
        return served, out

    def prompts(self, served: Served, body: CompletionRequest) -> list[tuple[str, list[int], str]]:
        """A completion request's prompts: (field name, token ids, text) each. A prompt is a text or a
        list of token ids (what lm-evaluation-harness sends), one or several."""
        p = body.prompt
        several = isinstance(p, list) and bool(p) and not isinstance(p[0], int)
        items = list(p) if several else [p]
        if isinstance(p, list) and not p:
            raise ApiError(400, "prompt: must not be empty", "prompt")
        if len(items) > self.max_items:
            raise ApiError(400, f"prompt: {len(items)} prompts, more than the limit of {self.max_items}", "prompt")
        if len(items) > 1 and body.stream:
            raise ApiError(400, "prompt: a streamed request takes one prompt", "prompt")
        vocab = served.tokenizer.get_vocab_size(with_added_tokens=True)
        out = []
        for i, item in enumerate(items):
            field = f"prompt[{i}]" if several else "prompt"
            if not item:
                raise ApiError(400, f"{field}: is empty", "prompt")
            if isinstance(item, str):
                out.append((field, served.tokenizer.encode(item, add_special_tokens=False).ids, item))
                continue
            if (bad := next((t for t in item if not 0 <= t < vocab), None)) is not None:
                raise ApiError(400, f"{field}: token id {bad} is not in the model's vocabulary (0 to {vocab - 1})",
                               "prompt")
            out.append((field, list(item), served.tokenizer.decode(item, skip_special_tokens=False)))
        return out

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

    async def generate(self, served: Served, ids: list[int], params: dict) -> list:
        """The generated tokens (Scored ones with log-probabilities), whole; with prompt_logprobs and
        max_tokens 0, only the scored prompt."""
        if params["max_tokens"] == 0 and not params["prompt_logprobs"]:  # echo alone: nothing to compute
            return []
        return await answer(served.handle.generate.remote(ids, params), self.deadline())

    async def stream(self, served: Served, ids: list[int], params: dict) -> AsyncIterator[list[int]]:
        """The generated tokens as the replica samples them (in pieces), until the request's deadline."""
        if params["max_tokens"] == 0 and not params["prompt_logprobs"]:
            return
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
