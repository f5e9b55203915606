"""Serve a trained checkpoint over OpenAI's HTTP API, with a web chat page.

    python serve.py                                          # the newest out*/ run, http://127.0.0.1:8000
    python serve.py --ckpt out-small/best.pt --port 8080 --api_key SECRET
    curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "ROMEO:", "max_tokens": 50, "temperature": 0.8}'

POST /v1/completions and /v1/chat/completions (both stream with "stream": true), GET /v1/models,
GET /health, and GET / : a chat page (static/chat.html) that talks to /v1/chat/completions.
Needs FastAPI and uvicorn (pip install fastapi uvicorn); nothing else does.

Design choices:
- A thin shell around the engine: engine.load_model loads the model as sample.py does,
  gpt.generate_stream generates, engine.TextStream cuts text at stop strings, and
  tokenizer.render_chat renders a conversation. This file turns requests into those calls and
  their tokens into OpenAI's responses.
- One thread runs the model (Worker). Every request becomes a job in its list, and it takes
  turns: one token for each job, then again, so concurrent streams advance together. A job is one
  prompt's n choices, generated as n rows of one generate_stream, with its own random generator
  (from "seed"): what a request gets never depends on what else is running.
- The event loop never waits on the model: the worker hands each job's text to its queue with
  call_soon_threadsafe. A client that disconnects cancels its jobs, and the worker drops them
  before their next token. Ctrl-C or SIGTERM ends every job at once (its client gets a 503).
- A prompt longer than the context keeps its end; usage.prompt_tokens counts the tokens used.
  A chat-tuned model's reply ends at <|end|>, a base model's where the plain template's next
  "User:" turn would begin (tokenizer.PLAIN_STOP).
- A bad request is a 4xx with OpenAI's error object, never a 500: the request models are strict
  (no "1" for 1), FastAPI's 422 becomes OpenAI's 400, and a catch-all hides tracebacks.
"""
import argparse
import asyncio
import hmac
import json
import queue
import random
import re
import socket
import sys
import threading
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

try:
    import uvicorn
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, ConfigDict, Field, model_validator
    from starlette.exceptions import HTTPException
except ImportError as e:
    sys.exit(f"error: serve.py needs {e.name}: pip install fastapi uvicorn")
import torch

from common import ArgumentParser, UserError, run_main
from engine import TextStream, find_checkpoint, generate_stream, load_model
from tokenizer import END, PLAIN_STOP, render_chat

PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
MAX_CHOICES = 16  # n x prompts of one request
MAX_ROWS = 64  # sequences (a job's n each) the worker takes turns on; later jobs wait in its queue
MAX_BODY = 1 << 20  # bytes of a request body

# -----------------------------------------------------------------------------
# Requests and responses: OpenAI's fields, described by these models in /openapi.json.

NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
Stop = Annotated[str, Field(min_length=1)]


class Strict(BaseModel):
    """A request body: values of the declared type only (no "1" for 1); a null is the default;
    fields OpenAI has and this server does not use (user, logit_bias...) are ignored."""
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def null_is_default(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    model: str | None = Field(None, description="ignored: the server has one model")
    max_tokens: int | None = Field(None, ge=1, description="new tokens per choice, at most the "
                                   "server's --max_tokens (default: 16 for completions, that cap for chat)")
    temperature: NonNegative = Field(1.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; 1 = off")
    top_k: int = Field(0, ge=0, description="extension: sample from the k most likely tokens; 0 = off")
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False,
                                      description="extension: CTRL's penalty on every token in the context; 1 = off")
    frequency_penalty: Penalty = Field(0.0, description="logit -= count x this, over the completion's tokens")
    presence_penalty: Penalty = Field(0.0, description="logit -= this, for each token the completion holds")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices per prompt")
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = Field(
        None, description="up to 4 strings; the text ends before the first one that appears")
    seed: int | None = Field(None, ge=-2**63, lt=2**64, description="the same seed gives the same text")
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)]
    echo: bool = Field(False, description="put the prompt before each choice's text")
    logprobs: int | None = Field(None, description="not supported")


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = Field(False, description="not supported")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="the prompt tokens used: a prompt longer than the "
                               "context keeps its end")
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpt"
    context_length: int = Field(description="block_size: the longest context the model reads")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """A request the server refuses: OpenAI's error object with this status."""

    def __init__(self, message, param=None, status=400, type="invalid_request_error", code=None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code


def error_response(e: APIError):
    detail = ErrorDetail(message=e.message, type=e.type, param=e.param, code=e.code)
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=e.status)


# -----------------------------------------------------------------------------
# The model's thread

class Job:
    """One prompt's n choices: n rows of one generate_stream, with their texts and finish reasons.

    The worker thread drives it (start, take); the request's coroutine reads what it sends to
    `events`: (choice index, new text, finish reason or None, completion tokens), then None.
    `sampling`: generate_stream's keyword arguments (stop_tokens among them)."""

    def __init__(self, ids, first_index, n, max_tokens, sampling, seed, stops, events):
        self.ids, self.first_index, self.n, self.max_tokens = ids, first_index, n, max_tokens
        self.sampling, self.seed, self.stops, self.stop_tokens = sampling, seed, stops, sampling["stop_tokens"]
        self.events, self.loop = events, asyncio.get_running_loop()
        self.cancelled = threading.Event()
        self.steps = None

    def send(self, event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is stopping
            pass

    def start(self, model, tokenizer, device):
        idx = torch.tensor([self.ids] * self.n, dtype=torch.long, device=device)
        generator = torch.Generator(device).manual_seed(self.seed)
        self.steps = generate_stream(model, idx, self.max_tokens, **self.sampling, generator=generator)
        self.texts = [TextStream(tokenizer, self.stops) for _ in range(self.n)]
        self.counts, self.finished = [0] * self.n, [False] * self.n

    def take(self, tokens):
        """Turn one step's tokens (one per row) into events; False once every choice has ended."""
        for row, token in enumerate(tokens):
            if self.finished[row]:
                continue
            self.counts[row] += 1
            text = self.texts[row]
            new = "" if token in self.stop_tokens else text.add(token)
            if token in self.stop_tokens or text.stopped:
                self.end(row, new, "stop")
            elif self.counts[row] == self.max_tokens:
                self.end(row, new, "length")
            elif new:
                self.send((self.first_index + row, new, None, self.counts[row]))
        return not all(self.finished)

    def end(self, row, new, reason):
        self.finished[row] = True
        self.send((self.first_index + row, new + self.texts[row].finish(), reason, self.counts[row]))

    def close(self, error=None):
        if self.steps is not None:
            self.steps.close()
        if error is not None:
            self.send(error)
        self.send(None)


class Worker:
    """The one thread that runs the model: it takes turns on the jobs, one token each."""

    def __init__(self, model, tokenizer, device, ctx):
        self.model, self.tokenizer, self.device, self.ctx = model, tokenizer, device, ctx
        self.inbox = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, name="model", daemon=True)
        self.running = 0  # jobs being generated (GET /health shows it)

    def submit(self, job):
        self.inbox.put(job)

    def shutdown(self):
        """End every job now (their clients get a 503 error) and stop the thread."""
        self.inbox.put(None)

    def run(self):
        active = []
        with self.ctx:  # autocast is per thread: this is the thread that runs the model
            while True:
                while not active or (not self.inbox.empty() and sum(job.n for job in active) < MAX_ROWS):
                    job = self.inbox.get()  # blocks only while there is nothing to do
                    if job is None:
                        while not self.inbox.empty():
                            active.append(self.inbox.get())
                        for job in filter(None, active):
                            job.close(APIError("the server is shutting down", status=503, type="server_error"))
                        self.running = 0
                        return
                    active.append(job)
                self.running = len(active)
                active = [job for job in active if self.step(job)]
                self.running = len(active)

    def step(self, job):
        """One token for each of the job's choices; False when the job is over."""
        if job.cancelled.is_set():  # its client has gone
            job.close()
            return False
        try:
            if job.steps is None:
                job.start(self.model, self.tokenizer, self.device)
            going = job.take(next(job.steps).tolist())
        except StopIteration:  # only after max_tokens, which take() has ended already
            going = False
        except Exception as e:  # a bug, not a bad request: the client gets a 500, the log the traceback
            traceback.print_exc()
            job.close(e)
            return False
        if not going:
            job.close()
        return going


# -----------------------------------------------------------------------------
# The HTTP API

def build_app(model, tokenizer, device, ctx, name, api_key=None, max_tokens=1024):
    """The FastAPI app serving `model` under the id `name`, its worker started and stopped with it."""
    worker = Worker(model, tokenizer, device, ctx)
    block_size = model.config.block_size
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.thread.start()
        yield
        worker.shutdown()

    app = FastAPI(title="gpt", summary="OpenAI-compatible API for one GPT checkpoint", lifespan=lifespan,
                  responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}})
    app.add_middleware(BodyLimit, limit=MAX_BODY)
    app.state.worker = worker  # Server.handle_exit stops it at a signal
    bearer = HTTPBearer(auto_error=False)

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if api_key is None:
            return
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError("invalid or missing API key: send the header 'Authorization: Bearer KEY'",
                           status=401, code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, e):  # FastAPI's 422 -> OpenAI's 400
        return error_response(validation_error(e.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # 404, 405...
        return error_response(APIError(str(e.detail), status=e.status_code))

    @app.exception_handler(Exception)
    async def internal_error(request, e):  # the traceback goes to the server's log, never to the client
        return error_response(APIError("internal server error", status=500, type="server_error"))

    # A chat-tuned model ends its turn with <|end|>; every model ends a document with end-of-text.
    stop_tokens = tuple(t for t in (tokenizer.specials.get(END), tokenizer.eot_id) if t is not None)

    def sampling(req):
        """(max_tokens, generate_stream's keyword arguments, seed, stop strings) of a request, checked."""
        limit = req.max_tokens or (max_tokens if isinstance(req, ChatRequest) else 16)  # OpenAI's defaults
        if limit > max_tokens:
            raise APIError(f"max_tokens must be at most {max_tokens} (the server's --max_tokens), got {limit}",
                           param="max_tokens")
        if req.logprobs is not None and req.logprobs is not False:
            raise APIError("logprobs is not supported by this server", param="logprobs")
        settings = dict(temperature=req.temperature, top_k=req.top_k or None,
                        top_p=req.top_p if req.top_p < 1 else None, repetition_penalty=req.repetition_penalty,
                        frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
                        stop_tokens=stop_tokens)
        seed = random.randrange(2**63) if req.seed is None else req.seed
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return limit, settings, seed, stops

    def encode(text, param):
        try:
            return tokenizer.encode(text)
        except UserError as e:  # a character a char-level model does not know
            raise APIError(str(e), param=param) from None

    def start_jobs(prompts, req, stops):
        """Submit one job per prompt (token lists); returns (jobs, their event queue, prompt tokens used)."""
        if not worker.thread.is_alive():
            raise APIError("the server is shutting down", status=503, type="server_error")
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(f"{len(prompts)} prompts x n={req.n} choices is more than {MAX_CHOICES}", param="n")
        limit, settings, seed, more_stops = sampling(req)
        events = asyncio.Queue()
        # A prompt longer than the context keeps its end; prompt i draws from seed + i.
        jobs = [Job(ids[-block_size:], i * req.n, req.n, limit, settings, (seed + i) % 2**64, stops + more_stops, events)
                for i, ids in enumerate(prompts)]
        for job in jobs:
            worker.submit(job)
        return jobs, events, sum(len(job.ids) for job in jobs)

    async def results(jobs, events, request):
        """Each event of the jobs until all have ended; cancels them if the client goes away."""
        running = len(jobs)
        try:
            while running:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:  # a long prefill, or a long queue: is the client still there?
                    if await request.is_disconnected():
                        raise APIError("the client closed the connection", status=499) from None
                    continue
                if event is None:
                    running -= 1
                elif isinstance(event, Exception):
                    raise event
                else:
                    yield event
        finally:
            for job in jobs:
                job.cancelled.set()

    # --- routes ------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": worker.running, "queued": worker.inbox.qsize()}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=started, context_length=block_size)])

    @app.post("/v1/completions", dependencies=[Depends(authorize)], response_model=Completion,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "a Completion, or with stream: Completion chunks as server-sent events"}})
    async def completions(req: CompletionRequest, request: Request):
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        prompts = [encode(text, "prompt") or tokenizer.start_ids() for text in texts]
        if not all(prompts):  # an empty prompt starts from end-of-text, or a char model's newline
            raise APIError("an empty prompt starts from a newline, and this model's characters include none",
                           param="prompt")
        jobs, events, used = start_jobs(prompts, req, [])
        head = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()), model=name)
        echo = [texts[i // req.n] if req.echo else "" for i in range(len(prompts) * req.n)]
        if req.stream:
            async def chunks():
                completion_tokens = 0
                for i, text in enumerate(echo):
                    if text:
                        yield {**head, "choices": [dict(index=i, text=text, logprobs=None, finish_reason=None)]}
                async for i, text, reason, count in results(jobs, events, request):
                    completion_tokens += count if reason else 0
                    yield {**head, "choices": [dict(index=i, text=text, logprobs=None, finish_reason=reason)]}
                if req.stream_options and req.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": usage(used, completion_tokens)}
            return event_stream(chunks())
        texts, reasons, completion_tokens = await collect(results(jobs, events, request), echo)
        choices = [CompletionChoice(index=i, text=text, finish_reason=reason)
                   for i, (text, reason) in enumerate(zip(texts, reasons))]
        return Completion(**head, choices=choices, usage=usage(used, completion_tokens))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], response_model=ChatCompletion,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "a ChatCompletion, or with stream: chat.completion.chunk "
                               "objects as server-sent events"}})
    async def chat_completions(req: ChatRequest, request: Request):
        try:
            ids, _ = render_chat(tokenizer, [m.model_dump() for m in req.messages], add_generation_prompt=True)
        except UserError as e:  # a character a char-level model does not know
            raise APIError(str(e), param="messages") from None
        stops = [] if tokenizer.is_chat else [PLAIN_STOP]  # a base model's reply ends where it starts the next turn
        jobs, events, used = start_jobs([ids], req, stops)
        head = dict(id=f"chatcmpl-{uuid.uuid4().hex}", object="chat.completion.chunk",
                    created=int(time.time()), model=name)
        if req.stream:
            async def chunks():
                completion_tokens = 0
                for i in range(req.n):
                    yield {**head, "choices": [dict(index=i, delta=dict(role="assistant", content=""),
                                                    logprobs=None, finish_reason=None)]}
                async for i, text, reason, count in results(jobs, events, request):
                    if text:
                        yield {**head, "choices": [dict(index=i, delta=dict(content=text), logprobs=None,
                                                        finish_reason=None)]}
                    if reason:
                        completion_tokens += count
                        yield {**head, "choices": [dict(index=i, delta={}, logprobs=None, finish_reason=reason)]}
                if req.stream_options and req.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": usage(used, completion_tokens)}
            return event_stream(chunks())
        texts, reasons, completion_tokens = await collect(results(jobs, events, request), [""] * req.n)
        choices = [ChatChoice(index=i, message=ChatMessage(content=text), finish_reason=reason)
                   for i, (text, reason) in enumerate(zip(texts, reasons))]
        return ChatCompletion(id=head["id"], created=head["created"], model=name, choices=choices,
                              usage=usage(used, completion_tokens))

    return app


def event_stream(chunks):
    """Server-sent events: each chunk (a dict) as `data: JSON`, then `data: [DONE]`. The status
    (200) is sent before the first chunk, so an error after it is OpenAI's error object as an event."""
    async def events():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps({'error': ErrorDetail(message=e.message, type=e.type).model_dump()})}\n\n"
        except Exception:
            traceback.print_exc()
            yield f"data: {json.dumps({'error': {'message': 'internal server error', 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


async def collect(events, texts):
    """(texts, finish reasons, completion tokens) of whole choices from their events; texts: each choice's start."""
    texts, reasons, tokens = list(texts), [None] * len(texts), 0
    async for i, text, reason, count in events:
        texts[i] += text
        if reason:
            reasons[i], tokens = reason, tokens + count
    return texts, reasons, tokens


def usage(prompt_tokens, completion_tokens):
    return dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens)


TYPE_TAG = re.compile(r"^(str|int|float|bool|constrained-\w+|list\[.*\]|dict\[.*\])$")  # pydantic's union branches in a loc


def validation_error(errors):
    """OpenAI's 400 for FastAPI's validation errors: the first field named, with what it should be."""
    if errors and errors[0]["type"] == "json_invalid":
        return APIError(f"the body is not valid JSON ({errors[0].get('ctx', {}).get('error', 'parse error')})")
    loc = [str(part) for part in errors[0]["loc"][1:] if not TYPE_TAG.match(str(part))]  # [0] is "body"
    if not loc:
        return APIError(f"the body must be a JSON object: {errors[0]['msg']}")
    same = [e["msg"] for e in errors if [str(p) for p in e["loc"][1:] if not TYPE_TAG.match(str(p))] == loc]
    message = " or ".join(m if i == 0 else m.removeprefix("Input should be ") for i, m in enumerate(dict.fromkeys(same)))
    return APIError(f"{'.'.join(loc)}: {message}", param=loc[0])


class BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes is a 413, read no further."""

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_large = declared.isdigit() and int(declared) > self.limit
        body, more = b"", True
        while more and not too_large:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            too_large = len(body) > self.limit
        if too_large:
            error = APIError(f"the request body is larger than {self.limit} bytes", status=413)
            return await error_response(error)(scope, receive, send)
        replayed = False

        async def replay():  # the body once, then the client's own messages (a disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, replay, send)


# -----------------------------------------------------------------------------

def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", help="use best.pt (else ckpt.pt) of this training run")
    p.add_argument("--ckpt", help="use this checkpoint file, a Hugging Face GPT-2 folder or Hub id (gpt2, OWNER/NAME)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where native; fp32 on a CPU) | float32 | "
                   "bfloat16 | float16 (default auto)")
    p.add_argument("--int8", action="store_true", help="CPU: int8 weights, bf16 activations (as sample.py --int8)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this "
                   "machine only; 0.0.0.0 is every network interface)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--api_key", metavar="KEY", help="require the header 'Authorization: Bearer KEY'")
    p.add_argument("--max_tokens", type=int, default=1024, metavar="N",
                   help="the most new tokens a request may ask for per choice (default 1024)")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        raise UserError(f"--max_tokens must be an integer >= 1, got {args.max_tokens}")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    if args.int8 and args.dtype not in ("auto", "bfloat16"):
        raise UserError(f"--int8 runs in bfloat16 (torch's int8 kernel takes bf16 activations); drop --dtype {args.dtype}")
    return args


def is_loopback(host):
    return host == "localhost" or host == "::1" or host.startswith("127.")


def listen(host, port):
    """A socket bound to host:port (port 0: a free one), or a UserError saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e} (another --port or --host?)") from None
    return sock


def main():
    args = parse_args(sys.argv[1:])
    path = find_checkpoint(args.ckpt, args.out_dir)
    model, tokenizer, device, ctx, loaded = load_model(path, None, args.device, args.dtype, args.int8)
    sock = listen(args.host, args.port)
    print(loaded, file=sys.stderr)
    if not is_loopback(args.host):
        print(f"warning: --host {args.host} serves the model to every machine that can reach this one"
              f"{'' if args.api_key else '; --api_key KEY makes clients send a key'}", file=sys.stderr)
    app = build_app(model, tokenizer, device, ctx, str(path), args.api_key, args.max_tokens)
    host, port = sock.getsockname()[:2]
    print(f"serving {path} at http://{host}:{port}/ (chat page) and http://{host}:{port}/v1 (OpenAI API); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)).run(sockets=[sock])


class Server(uvicorn.Server):
    """uvicorn's server, which on Ctrl-C or SIGTERM stops taking requests, waits for those open,
    and then ends by the signal (Ctrl-C: run_main's exit 130). Here the worker ends every job at
    the signal, so open streams end at once (with an error event) instead of being cut after
    timeout_graceful_shutdown."""

    def handle_exit(self, sig, frame):
        self.config.app.state.worker.shutdown()
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    run_main(main)
