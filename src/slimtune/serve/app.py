"""The HTTP layer: OpenAI's GET /v1/models, POST /v1/completions and /v1/chat/completions (server-sent events when
`stream` is set), POST /v1/adapters and DELETE /v1/adapters/{name} to load and unload adapters while serving, and
GET /health and /stats.

Starlette on uvicorn, not FastAPI: the server needs routing, streaming responses and an ASGI server, which Starlette
and uvicorn are (FastAPI is Starlette plus pydantic models); requests are checked by `protocol`, field by field, so
that every refusal carries OpenAI's error JSON rather than a framework's own 422 format.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

from slimtune.errors import SlimtuneError
from slimtune.serve.build import Served
from slimtune.serve.engine import GenRequest, Output, Overloaded
from slimtune.serve.lora import read_lora
from slimtune.serve.protocol import (
    ApiError,
    Params,
    chat_prompt,
    completion_prompts,
    fit_context,
    get_model,
    parse_json,
    parse_params,
)
from slimtune.serve.sampling import RowSampling

KEEPALIVE_S = 2.0  # an idle stream sends an SSE comment this often (a client that left is noticed on sending)
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


def _json_response(body: dict, status: int = 200, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


def _error(e: ApiError):
    return _json_response(e.body(), e.status, {"Retry-After": "1"} if e.status in (429, 503) else None)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Generation:
    """One API request's sequences (prompts x n) in the engine, and the queue their outputs arrive on."""

    def __init__(self, served: Served, chat: bool, model: str, prompts: list[list[int]], p: Params,
                 maxes: list[int]) -> None:
        self.served, self.chat, self.model, self.p = served, chat, model, p
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        adapter = None if model == served.base_name else model
        self.reqs: list[GenRequest] = []
        for ids, mt in zip(prompts, maxes):
            for j in range(p.n):  # choice index = prompt index * n + j, as OpenAI orders them
                i = len(self.reqs)
                seed = p.seed + j if p.seed is not None else None
                self.reqs.append(GenRequest(ids, mt, lambda out, i=i: loop.call_soon_threadsafe(
                    self.queue.put_nowait, (i, out)), adapter, RowSampling(p.temperature, p.top_p, p.top_k, seed),
                    p.stop, p.stop_token_ids, p.ignore_eos))
        self.open = set(range(len(self.reqs)))
        self.prompt_tokens = sum(len(x) for x in prompts)
        self.completion_tokens = 0

    def submit(self) -> None:
        if len(self.reqs) > self.served.engine.max_queue:
            raise ApiError(400, f"the request asks for {len(self.reqs)} sequences (prompts x n); this server queues "
                                f"at most {self.served.engine.max_queue}", param="n", code="invalid_value")
        try:
            self.served.engine.submit(self.reqs)
        except Overloaded as e:
            raise ApiError(503, f"the server is at capacity: {e}; retry later", code="server_overloaded",
                           type="server_error") from None

    async def next(self, timeout: float) -> tuple[int, Output] | None:
        """The next output of any sequence, or None after `timeout` seconds without one."""
        try:
            i, out = await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if out.finish_reason is not None:
            self.open.discard(i)
            self.completion_tokens += out.completion_tokens
        return i, out

    def cancel(self) -> None:
        for i in self.open:
            self.served.engine.cancel(self.reqs[i])

    def envelope(self, choices: list[dict], chunk: bool) -> dict:
        obj = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def choice(self, i: int, text: str, finish: str | None, ids: list[int] | None, chunk: bool, first: bool = False):
        c: dict = {"index": i, "finish_reason": finish, "logprobs": None}
        if not self.chat:
            c["text"] = text
        elif chunk:
            c["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
        else:
            c["message"] = {"role": "assistant", "content": text}
        if ids is not None and self.p.return_token_ids:
            c["token_ids"] = ids
        return c


def _failed(out: Output) -> ApiError:
    if out.status == 404:
        return ApiError(404, out.error or "no such model", param="model", code="model_not_found")
    return ApiError(out.status, out.error or "generation failed", code="generation_failed", type="server_error")


async def collect(request, g: Generation):
    """The whole answer as one JSON object (the client's departure, polled each second, cancels the request)."""
    texts, ids, finish = [""] * len(g.reqs), [[] for _ in g.reqs], [None] * len(g.reqs)
    checked = time.monotonic()
    try:
        while g.open:
            got = await g.next(1.0)
            if time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return _json_response({}, 499)
            if got is None:
                continue
            i, out = got
            if out.finish_reason == "error":
                return _error(_failed(out))
            texts[i] += out.text
            ids[i] += out.token_ids
            finish[i] = out.finish_reason
    finally:
        g.cancel()
    choices = [g.choice(i, texts[i], finish[i], ids[i], chunk=False) for i in range(len(g.reqs))]
    return _json_response(g.envelope(choices, False) | {"usage": _usage(g.prompt_tokens, g.completion_tokens)})


async def stream(g: Generation):
    """Server-sent events: one chunk per new piece of text, then a usage chunk if asked, then [DONE]. Leaving early
    (the client disconnected and Starlette cancels this generator) cancels the sequences still running."""
    def event(d: dict) -> str:
        return f"data: {json.dumps(d)}\n\n"

    try:
        if g.chat:  # the assistant role comes first, as OpenAI sends it
            for i in range(len(g.reqs)):
                yield event(g.envelope([g.choice(i, "", None, None, chunk=True, first=True)], True))
        while g.open:
            got = await g.next(KEEPALIVE_S)
            if got is None:
                yield ": keep-alive\n\n"
                continue
            i, out = got
            if out.finish_reason == "error":
                yield event(_failed(out).body())
                break
            if out.text or out.finish_reason or g.p.return_token_ids:
                yield event(g.envelope([g.choice(i, out.text, out.finish_reason, out.token_ids, chunk=True)], True))
        else:
            if g.p.include_usage:
                yield event(g.envelope([], True) | {"usage": _usage(g.prompt_tokens, g.completion_tokens)})
            yield "data: [DONE]\n\n"
    finally:
        g.cancel()


class Handlers:
    """The route handlers over one `Served` (each raises ApiError for a request it refuses)."""

    def __init__(self, served: Served) -> None:
        self.served, self.engine = served, served.engine

    async def generate(self, request, chat: bool):
        from starlette.responses import StreamingResponse

        served = self.served
        body = parse_json(await request.body())
        model = get_model(body, served.model_names())
        p = parse_params(body, ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",),
                         served.vocab_size)
        prompts = [chat_prompt(body, served.tokenizer)] if chat else \
            completion_prompts(body, served.tokenizer, served.vocab_size)
        default = None if chat else COMPLETION_DEFAULT_MAX_TOKENS
        maxes = [fit_context(len(x), p, default, self.engine.max_len) for x in prompts]
        g = Generation(served, chat, model, prompts, p, maxes)
        g.submit()
        if p.stream:
            return StreamingResponse(stream(g), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await collect(request, g)

    async def completions(self, request):
        return await self.generate(request, chat=False)

    async def chat(self, request):
        return await self.generate(request, chat=True)

    async def models(self, request):
        s = self.served
        data = [{"id": n, "object": "model", "created": s.created, "owned_by": "slimtune",
                 "root": s.paths.get(n, s.base_name), "parent": None if n == s.base_name else s.base_name}
                for n in s.model_names()]
        return _json_response({"object": "list", "data": data})

    async def add_adapter(self, request):
        bank = self.engine.bank
        if bank is None:
            raise ApiError(400, "this server serves a merged model; start it without --merge to load adapters",
                           code="adapters_disabled")
        body = parse_json(await request.body())
        name, path = body.get("name", body.get("lora_name")), body.get("path", body.get("lora_path"))
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or name == self.served.base_name:
            raise ApiError(400, "`name` must be 1-128 letters, digits or ._:@+- (and not the base model's name)",
                           param="name", code="invalid_value")
        if not isinstance(path, str) or not path:
            raise ApiError(400, "`path` must be the server-side folder of a PEFT LoRA adapter", param="path",
                           code="invalid_value")
        if name in bank.names:
            raise ApiError(409, f"an adapter named {name!r} is already loaded; DELETE it first", param="name",
                           code="adapter_exists")
        try:  # read and check the files off the event loop; only the copy into the bank runs in the engine
            factors, rank = await asyncio.to_thread(read_lora, self.served.skeleton, path)
            await asyncio.wrap_future(self.engine.load_adapter(name, factors, rank))
        except SlimtuneError as e:
            raise ApiError(400, str(e), param="path", code="invalid_adapter") from None
        self.served.paths[name] = path
        return _json_response({"id": name, "object": "model", "root": path, "parent": self.served.base_name})

    async def delete_adapter(self, request):
        name = request.path_params["name"]
        if self.engine.bank is None or name not in self.engine.bank.names:
            raise ApiError(404, f"no adapter named {name!r} is loaded", param="name", code="model_not_found")
        await asyncio.wrap_future(self.engine.unload_adapter(name))
        self.served.paths.pop(name, None)
        return _json_response({"id": name, "object": "model", "deleted": True})

    async def health(self, request):
        return _json_response({"status": "ok"})

    async def stats(self, request):
        return _json_response(self.engine.status())


def create_app(served: Served, api_key: str | None = None):
    """The Starlette application serving `served`; with `api_key`, requests need 'Authorization: Bearer <key>'."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    h = Handlers(served)

    def route(path: str, methods: list[str], fn, auth: bool = True) -> Route:
        async def endpoint(request):
            try:
                if auth and api_key and request.headers.get("authorization") != f"Bearer {api_key}":
                    raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                   code="invalid_api_key")
                return await fn(request)
            except ApiError as e:
                return _error(e)
        return Route(path, endpoint, methods=methods)

    async def http_error(request, exc: HTTPException):
        return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                               code="not_found" if exc.status_code == 404 else "invalid_request"))

    async def server_error(request, exc: Exception):
        return _error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    routes = [route("/v1/models", ["GET"], h.models), route("/v1/completions", ["POST"], h.completions),
              route("/v1/chat/completions", ["POST"], h.chat), route("/v1/adapters", ["POST"], h.add_adapter),
              route("/v1/adapters/{name}", ["DELETE"], h.delete_adapter), route("/health", ["GET"], h.health, False),
              route("/stats", ["GET"], h.stats)]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
