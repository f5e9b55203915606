"""Serve a trained checkpoint over OpenAI's HTTP API, with a web chat page.

    python serve.py                                          # the newest out*/ run, http://127.0.0.1:8000
    python serve.py --ckpt out-small/best.pt --port 8080 --api_key SECRET
    curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "ROMEO:", "max_tokens": 50, "temperature": 0.8}'

POST /v1/completions and /v1/chat/completions (both stream with "stream": true; logprobs, echo),
GET /v1/models and /v1/models/{id}, GET /health, GET /metrics (Prometheus), and GET / : a chat
page (static/chat.html) that talks to /v1/chat/completions.
Needs FastAPI, uvicorn and prometheus_client (pip install fastapi uvicorn prometheus_client).

Design choices:
- A thin shell around the engine: engine.load_model loads the model as sample.py does,
  engine.Engine generates, engine.TextStream cuts text at stop strings, and
  tokenizer.render_chat renders a conversation. This file turns requests into those calls and
  their tokens into OpenAI's responses.
- One thread runs the model (Worker) with continuous batching (engine.Engine): every step
  decodes one token for each running request in one forward, then prefills new prompts in chunks
  of --prefill_tokens, so concurrent streams share each read of the weights. At most --max_batch
  sequences run at once (a request's n choices are n of them); up to --max_queue requests wait,
  first come first served, and beyond that a request gets a 429 with Retry-After. Each request
  draws from its own generator (from "seed"): what it gets never depends on what else runs.
- The event loop never waits on the model: the worker hands each job's text to its queue with
  call_soon_threadsafe. A client that disconnects cancels its jobs, and the engine drops them at
  its next step. Ctrl-C or SIGTERM ends every job at once (its client gets a 503).
- logprobs are log-softmax of the model's raw logits, before temperature, penalties or top-k/p.
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
    from fastapi.responses import PlainTextResponse
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
    from starlette.exceptions import HTTPException
except ImportError as e:
    sys.exit(f"error: serve.py needs {e.name}: pip install fastapi uvicorn prometheus_client")

import engine
from common import ArgumentParser, UserError, run_main
from engine import Engine, TextStream, find_checkpoint, load_model
from tokenizer import END, PLAIN_STOP, render_chat

PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
MAX_CHOICES = 16  # n x prompts of one request
MAX_BODY = 1 << 20  # bytes of a request body

# -----------------------------------------------------------------------------
# Requests and responses: OpenAI's fields, described by these models in /openapi.json.

def integral(value):
    """7.0 -> 7: a JSON number with an integral value is an integer, as OpenAI's API takes it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**bounds):
    """The type of an integer field with Field's bounds (ge, le...): it takes 7 and 7.0, not 7.5,
    "7" or true. (The bounds come before the conversion, so /openapi.json shows them.)"""
    return Annotated[int, Field(**bounds), BeforeValidator(integral)]


NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
Stop = Annotated[str, Field(min_length=1)]


class Strict(BaseModel):
    """A request body: values of the declared type only (no "1" for 1; an integer() takes 1.0); a
    null is the default; fields OpenAI has and this server does not use (user, logit_bias...) are ignored."""
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def null_is_default(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    model: str | None = Field(None, description="ignored: the server has one model")
    max_tokens: integer(ge=1) | None = Field(None, description="new tokens per choice, at most the "
                                             "server's --max_tokens (default: 16 for completions, that cap for chat)")
    temperature: NonNegative = Field(1.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; 1 = off")
    top_k: integer(ge=0) = Field(0, description="extension: sample from the k most likely tokens; 0 = off")
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False,
                                      description="extension: CTRL's penalty on every token in the context; 1 = off")
    frequency_penalty: Penalty = Field(0.0, description="logit -= count x this, over the completion's tokens")
    presence_penalty: Penalty = Field(0.0, description="logit -= this, for each token the completion holds")
    n: integer(ge=1, le=MAX_CHOICES) = Field(1, description="choices per prompt")
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = Field(
        None, description="up to 4 strings; the text ends before the first one that appears")
    seed: integer(ge=-2**63, lt=2**64) | None = Field(None, description="the same seed gives the same text")
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)]
    echo: bool = Field(False, description="put the prompt before each choice's text")
    max_tokens: integer(ge=0) | None = Field(None, description="new tokens per choice, at most the server's "
                                             "--max_tokens (default 16); 0 with echo scores the prompt only")
    logprobs: integer(ge=0, le=5) | None = Field(None, description="each token's logprob and those of "
                                                 "the most likely N alternatives")


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = Field(False, description="each token's logprob")
    top_logprobs: integer(ge=0, le=20) | None = Field(None, description="with logprobs: the N most likely "
                                                      "alternatives at each token too")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="the prompt tokens used: a prompt longer than the "
                               "context keeps its end")
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first token of an echoed prompt")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] = Field(description="where each token's text starts in the choice's text")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
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

    def __init__(self, message, param=None, status=400, type="invalid_request_error", code=None, headers=None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code
        self.headers = headers


def error_response(e: APIError):
    detail = ErrorDetail(message=e.message, type=e.type, param=e.param, code=e.code)
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=e.status, headers=e.headers)


# -----------------------------------------------------------------------------
# The model's thread

class Job:
    """One prompt's n choices: an engine Request, and the text of each choice as it is generated.

    The worker thread hands it each Output of its request (take, which returns the events to
    send); the request's coroutine reads from `events`: (choice index, new text, finish reason or
    None, completion tokens, logprob entries of the new tokens), then None at the end, or an
    Exception."""

    def __init__(self, request, first_index, tokenizer, stops, events):
        self.request, self.first_index = request, first_index
        self.request.job = self
        self.events, self.loop = events, asyncio.get_running_loop()
        self.texts = [TextStream(tokenizer, stops) for _ in range(request.n)]
        self.counts = [0] * request.n
        self.submitted = time.perf_counter()
        self.last_token = [None] * request.n  # when each choice's latest token came (metrics)
        self.ended = 0  # choices whose last event is sent

    def send(self, event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is stopping
            pass

    def take(self, out, engine, metrics):
        """One Output of the engine: the events of its text (cut at a stop string, which ends the choice)."""
        i, token, reason = out.index, out.token, out.finish_reason
        now = time.perf_counter()
        if token is not None:
            metrics.observe_token(now - (self.last_token[i] or self.submitted), first=self.last_token[i] is None)
            self.last_token[i] = now
            self.counts[i] += 1
        entries = []
        text = self.texts[i]
        if token is not None and token not in self.request.stop_tokens:
            new = text.add(token)
            if out.logprob is not None:
                entries.append((token, out.logprob, out.top_logprobs))
            if text.stopped:  # a stop string: the choice ends here
                reason = "stop"
                engine.finish(self.request, i)
        else:
            new = ""
        if reason:
            self.ended += 1
            last = [None] if self.ended == self.request.n else []
            return [(self.first_index + i, new + text.finish(), reason, self.counts[i], entries)] + last
        if new or entries:
            return [(self.first_index + i, new, None, self.counts[i], entries)]
        return []

    def close(self, error=None):
        self.request.cancel()
        if error is not None:
            self.send(error)
        self.send(None)


def deliver(outbox):
    """Put each (job, event) of `outbox` into its job's queue, from the worker thread (every job
    belongs to the server's one event loop)."""
    def put_all():
        for job, event in outbox:
            job.events.put_nowait(event)
    try:
        outbox[0][0].loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # the event loop has closed: the server is stopping
        pass


class Metrics:
    """What /metrics reports, in Prometheus' text format (prometheus_client's registry)."""

    def __init__(self, worker):
        self.registry = CollectorRegistry()
        Gauge("gpt_requests_running", "requests being generated", registry=self.registry).set_function(
            lambda: worker.engine.running())
        Gauge("gpt_requests_waiting", "requests waiting for rows of the batch", registry=self.registry).set_function(
            worker.waiting)
        self.requests = Counter("gpt_requests", "requests received", registry=self.registry)
        self.prompt_tokens = Counter("gpt_prompt_tokens", "prompt tokens received", registry=self.registry)
        self.tokens = Counter("gpt_generated_tokens", "tokens generated", registry=self.registry)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.first_token = Histogram("gpt_time_to_first_token_seconds", "from a request's arrival to its "
                                     "first token", buckets=buckets, registry=self.registry)
        self.per_token = Histogram("gpt_time_per_output_token_seconds", "between two tokens of a choice",
                                   buckets=buckets, registry=self.registry)

    def observe_token(self, seconds, first):
        self.tokens.inc()
        (self.first_token if first else self.per_token).observe(seconds)

    def text(self):
        return generate_latest(self.registry)


class Worker:
    """The one thread that runs the model. It owns the Engine: between steps it admits the jobs
    submitted, and hands every Output of a step to its job. At most max_queue requests wait for
    rows; beyond them submit refuses with 429."""

    def __init__(self, model, ctx, max_batch, prefill_tokens, max_queue, compile=False):
        self.ctx, self.max_queue, self.compile = ctx, max_queue, compile
        self.engine = Engine(model, max_rows=max_batch, prefill_tokens=prefill_tokens, compile=compile)
        self.inbox = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, name="model", daemon=True)
        self.metrics = Metrics(self)
        self.stopping = False

    def waiting(self):
        """Requests submitted and not admitted yet (read from other threads: a close count)."""
        return self.inbox.qsize() + len(self.engine.waiting)

    def submit(self, jobs):
        if self.stopping or not self.thread.is_alive():
            raise APIError("the server is shutting down", status=503, type="server_error")
        if self.waiting() + len(jobs) > self.max_queue:
            raise APIError(f"the server is busy: {self.waiting()} requests are waiting (--max_queue "
                           f"{self.max_queue}); retry shortly", status=429, type="rate_limit_error",
                           code="server_busy", headers={"Retry-After": "1"})
        for job in jobs:
            self.inbox.put(job)

    def shutdown(self):
        """End every job now (their clients get a 503 error) and stop the thread."""
        self.stopping = True
        self.inbox.put(None)

    def run(self):
        jobs = {}  # the jobs the engine holds, by request
        with self.ctx:  # autocast is per thread: this is the thread that runs the model
            while True:
                while not self.engine.has_work() or not self.inbox.empty():
                    job = self.inbox.get()  # blocks only while there is nothing to do
                    if job is None:
                        return self.close_all(list(jobs.values()), APIError(
                            "the server is shutting down", status=503, type="server_error"))
                    try:
                        self.engine.add(job.request)
                        jobs[id(job.request)] = job
                    except ValueError as e:  # more choices than rows, a prompt too long to score
                        job.close(APIError(str(e)))
                try:
                    # One call into the event loop per step, not per token: each wakes it through a pipe.
                    outbox = [(job, event) for out in self.engine.step()
                              for job in [out.request.job] for event in job.take(out, self.engine, self.metrics)]
                    if outbox:
                        deliver(outbox)
                except Exception as e:  # a bug, not a bad request: each client gets a 500, the log the traceback
                    traceback.print_exc()
                    self.close_all(list(jobs.values()), e)
                    self.engine = Engine(self.engine.model, self.engine.max_rows, self.engine.prefill_tokens,
                                         compile=self.compile)
                jobs = {key: job for key, job in jobs.items() if not (job.request.done or job.request.cancelled)}

    def close_all(self, jobs, error):
        while not self.inbox.empty():
            job = self.inbox.get()
            if job is not None:
                jobs.append(job)
        for job in jobs:
            if not job.request.done:
                job.close(error)


# -----------------------------------------------------------------------------
# The HTTP API

def build_app(model, tokenizer, ctx, name, api_key=None, max_tokens=1024, max_batch=16, prefill_tokens=256,
              max_queue=64, compile=False):
    """The FastAPI app serving `model` under the id `name`, its worker started and stopped with it."""
    worker = Worker(model, ctx, max_batch, prefill_tokens, max_queue, compile)
    block_size = model.config.block_size
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.thread.start()
        yield
        worker.shutdown()

    errors = {400: {"model": ErrorResponse}, **({401: {"model": ErrorResponse}} if api_key is not None else {})}
    app = FastAPI(title="gpt", summary="OpenAI-compatible API for one GPT checkpoint", lifespan=lifespan,
                  responses=errors)
    app.add_middleware(BodyLimit, limit=MAX_BODY)
    schema = app.openapi

    def openapi():  # FastAPI lists a 422 on every route; this server answers a bad body with 400
        for route in schema()["paths"].values():
            for operation in route.values():
                operation["responses"].pop("422", None)
        return app.openapi_schema
    app.openapi = openapi
    app.state.worker = worker  # Server.handle_exit stops it at a signal
    def open_access():  # no --api_key: nothing to check, and /openapi.json declares no authentication
        pass

    def key_required(credentials: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False))):
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError("invalid or missing API key: send the header 'Authorization: Bearer KEY'",
                           status=401, code="invalid_api_key")

    authorize = open_access if api_key is None else key_required  # the /v1 routes' dependency

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, e):  # FastAPI's 422 -> OpenAI's 400
        return error_response(validation_error(e.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # 404, 405 (with its Allow header)...
        response = error_response(APIError(str(e.detail), status=e.status_code))
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(Exception)
    async def internal_error(request, e):  # the traceback goes to the server's log, never to the client
        return error_response(APIError("internal server error", status=500, type="server_error"))

    # A chat-tuned model ends its turn with <|end|>; every model ends a document with end-of-text.
    stop_tokens = tuple(t for t in (tokenizer.specials.get(END), tokenizer.eot_id) if t is not None)

    def settings(req):
        """(max_tokens, engine.Sampling, seed, stop strings) of a request, checked."""
        limit = max_tokens if isinstance(req, ChatRequest) else 16  # OpenAI's defaults
        limit = limit if req.max_tokens is None else req.max_tokens
        if limit > max_tokens:
            raise APIError(f"max_tokens must be at most {max_tokens} (the server's --max_tokens), got {limit}",
                           param="max_tokens")
        sampling = engine.Sampling(temperature=req.temperature, top_k=req.top_k or None,
                                   top_p=req.top_p if req.top_p < 1 else None,
                                   repetition_penalty=req.repetition_penalty,
                                   frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty)
        seed = random.randrange(2**63) if req.seed is None else req.seed
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return limit, sampling, seed, stops

    def encode(text, param):
        try:
            return tokenizer.encode(text)
        except UserError as e:  # a character a char-level model does not know
            raise APIError(str(e), param=param) from None

    def start_jobs(prompts, req, stops, logprobs=None, prompt_logprobs=False):
        """Submit one job per prompt (token lists); returns (jobs, their event queue, prompt tokens used)."""
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(f"{len(prompts)} prompts x n={req.n} choices is more than {MAX_CHOICES}", param="n")
        limit, sampling, seed, more_stops = settings(req)
        events = asyncio.Queue()
        # A prompt longer than the context keeps its end; prompt i draws from seed + i.
        jobs = [Job(engine.Request(ids[-block_size:], limit, n=req.n, sampling=sampling, stop_tokens=stop_tokens,
                                   seed=(seed + i) % 2**64, logprobs=logprobs, prompt_logprobs=prompt_logprobs),
                    i * req.n, tokenizer, stops + more_stops, events)
                for i, ids in enumerate(prompts)]
        worker.submit(jobs)
        worker.metrics.requests.inc(len(jobs))
        used = sum(len(job.request.prompt) for job in jobs)
        worker.metrics.prompt_tokens.inc(used)
        return jobs, events, used

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
                job.request.cancel()

    def text_of(token):
        return tokenizer.decode([token])

    def completion_logprobs(entries, offset=0):
        """OpenAI's completions logprobs object of (token, logprob, top) entries; offset: where the first starts."""
        tokens = [text_of(token) for token, _, _ in entries]
        offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return dict(tokens=tokens, token_logprobs=[lp for _, lp, _ in entries],
                    top_logprobs=[None if top is None else {text_of(t): lp for t, lp in top} for _, _, top in entries],
                    text_offset=offsets)

    def chat_logprobs(entries):
        """OpenAI's chat logprobs object ({"content": [...]}) of (token, logprob, top) entries."""
        def item(token, logprob):
            return dict(token=text_of(token), logprob=logprob, bytes=list(text_of(token).encode()))
        return dict(content=[{**item(token, lp), "top_logprobs": [item(t, tlp) for t, tlp in top]}
                             for token, lp, top in entries])

    # --- routes ------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": worker.engine.running(), "waiting": worker.waiting()}

    @app.get("/metrics", response_class=PlainTextResponse,
             description="Prometheus' text format: requests running and waiting, tokens, latencies")
    async def metrics():
        return PlainTextResponse(worker.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=started, context_length=block_size)])

    @app.get("/v1/models/{model:path}", dependencies=[Depends(authorize)], responses={404: {"model": ErrorResponse}})
    async def model_card(model: str) -> ModelCard:  # an id may have slashes, as a checkpoint's path does
        if model != name:
            raise APIError(f"the model '{model}' does not exist: this server has '{name}'", param="model",
                           status=404, code="model_not_found")
        return ModelCard(id=name, created=started, context_length=block_size)

    @app.post("/v1/completions", dependencies=[Depends(authorize)], response_model=Completion,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "a Completion, or with stream: Completion chunks as server-sent events"}})
    async def completions(req: CompletionRequest, request: Request):
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        prompts = [encode(text, "prompt") or tokenizer.start_ids() for text in texts]
        if not all(prompts):  # an empty prompt starts from end-of-text, or a char model's newline
            raise APIError("an empty prompt starts from a newline, and this model's characters include none",
                           param="prompt")
        scored = req.echo and req.logprobs is not None  # the prompt's own logprobs (lm-evaluation-harness)
        jobs, events, used = start_jobs(prompts, req, [], req.logprobs, prompt_logprobs=scored)
        head = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()), model=name)
        echo = [texts[i // req.n] if req.echo else "" for i in range(len(prompts) * req.n)]

        def prompt_entries(i):  # the echoed prompt's (token, logprob, top) entries, once it is scored
            request_ = jobs[i // req.n].request
            return [(t, lp, top) for t, (lp, top) in zip(request_.prompt, request_.prompt_logprobs)] if scored else []

        if req.stream:
            async def chunks():
                completion_tokens, offsets = 0, [len(text) for text in echo]
                async for i, text, reason, count, entries in results(jobs, events, request):
                    if echo[i] is not None:  # the echoed prompt first, once its logprobs exist
                        first = prompt_entries(i)
                        logprobs = completion_logprobs(first) if req.logprobs is not None else None
                        if echo[i] or first:
                            yield {**head, "choices": [dict(index=i, text=echo[i], logprobs=logprobs, finish_reason=None)]}
                        echo[i] = None
                    completion_tokens += count if reason else 0
                    logprobs = completion_logprobs(entries, offsets[i]) if req.logprobs is not None else None
                    offsets[i] += sum(len(text_of(t)) for t, _, _ in entries)
                    yield {**head, "choices": [dict(index=i, text=text, logprobs=logprobs, finish_reason=reason)]}
                if req.stream_options and req.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": usage(used, completion_tokens)}
            return event_stream(chunks())
        texts, reasons, completion_tokens, entries = await collect(results(jobs, events, request), echo)
        choices = []
        for i, (text, reason) in enumerate(zip(texts, reasons)):
            logprobs = None
            if req.logprobs is not None:
                first = prompt_entries(i)
                logprobs = completion_logprobs(first + entries[i], len(echo[i]) - sum(len(text_of(t)) for t, _, _ in first))
            choices.append(CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=reason))
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
        top = (req.top_logprobs or 0) if req.logprobs else None
        jobs, events, used = start_jobs([ids], req, stops, top)
        head = dict(id=f"chatcmpl-{uuid.uuid4().hex}", object="chat.completion.chunk",
                    created=int(time.time()), model=name)
        if req.stream:
            async def chunks():
                completion_tokens = 0
                for i in range(req.n):
                    yield {**head, "choices": [dict(index=i, delta=dict(role="assistant", content=""),
                                                    logprobs=None, finish_reason=None)]}
                async for i, text, reason, count, entries in results(jobs, events, request):
                    logprobs = chat_logprobs(entries) if req.logprobs else None
                    if text or entries:
                        yield {**head, "choices": [dict(index=i, delta=dict(content=text), logprobs=logprobs,
                                                        finish_reason=None)]}
                    if reason:
                        completion_tokens += count
                        yield {**head, "choices": [dict(index=i, delta={}, logprobs=None, finish_reason=reason)]}
                if req.stream_options and req.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": usage(used, completion_tokens)}
            return event_stream(chunks())
        texts, reasons, completion_tokens, entries = await collect(results(jobs, events, request), [""] * req.n)
        choices = [ChatChoice(index=i, message=ChatMessage(content=text), finish_reason=reason,
                              logprobs=chat_logprobs(entries[i]) if req.logprobs else None)
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
    """(texts, finish reasons, completion tokens, logprob entries) of whole choices from their
    events; texts: each choice's start."""
    texts, reasons, tokens, entries = list(texts), [None] * len(texts), 0, [[] for _ in texts]
    async for i, text, reason, count, new_entries in events:
        texts[i] += text
        entries[i] += new_entries
        if reason:
            reasons[i], tokens = reason, tokens + count
    return texts, reasons, tokens, entries


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
    p.add_argument("--weights", default="auto", choices=["auto", *engine.WEIGHT_FORMATS], metavar="FORMAT",
                   help="the format the weights are stored in, as sample.py --weights: auto | fp32 | bf16 | fp16 | "
                   "int8 | int4 (default auto: the fastest whose loss stays within 0.01 of fp32's, measured once "
                   "per machine)")
    p.add_argument("--group_size", type=int, choices=engine.INT4_GROUP_SIZES, metavar="G",
                   help=f"--weights int4: weights per scale along a row (default {engine.INT4_GROUP_SIZE})")
    p.add_argument("--dtype", default="auto", help="the precision fp32 weights compute in (autocast): auto | "
                   "float32 | bfloat16 | float16; given, it means fp32 weights (default auto)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this "
                   "machine only; 0.0.0.0 is every network interface)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--api_key", metavar="KEY", help="require the header 'Authorization: Bearer KEY'")
    p.add_argument("--max_tokens", type=int, default=1024, metavar="N",
                   help="the most new tokens a request may ask for per choice (default 1024)")
    p.add_argument("--max_batch", type=int, default=16, metavar="N",
                   help="the most sequences decoded together, each a request's choice (default 16; fewer "
                   "if their KV cache passes --kv_cache_gb)")
    p.add_argument("--kv_cache_gb", type=float, default=4.0, metavar="GB",
                   help="memory for the KV cache: each sequence takes a whole context's keys and values "
                   "(default 4)")
    p.add_argument("--prefill_tokens", type=int, default=256, metavar="N",
                   help="prompt tokens prefilled per step beside the decoding ones: a long prompt takes "
                   "several steps instead of stalling the streams (default 256)")
    p.add_argument("--max_queue", type=int, default=64, metavar="N",
                   help="requests that may wait for a row; beyond them a request gets 429 (default 64)")
    p.add_argument("--compile", action="store_true",
                   help="decode steps through torch.compile: up to ~20%% faster per token on a CPU, "
                   "after seconds to half a minute of compiling at the first request (BENCHMARKS.md, Decode step)")
    args = p.parse_args(argv)
    for name in ("max_tokens", "max_batch", "prefill_tokens", "max_queue"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be an integer >= 1, got {getattr(args, name)}")
    if not args.kv_cache_gb > 0:
        raise UserError(f"--kv_cache_gb must be > 0, got {args.kv_cache_gb}")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    engine.check_weight_settings(args.weights, args.dtype, args.group_size)
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
    # auto weights: the format fastest for a full batch of rows (fp16 is fast for one row, slow for 16)
    model, tokenizer, device, ctx, loaded = load_model(path, None, args.device, args.dtype, args.weights, args.group_size,
                                                       rows=args.max_batch)
    if args.compile:
        engine.check_compile(device)
    row_gb = engine.cache_bytes_per_row(model.config) / 2**30
    max_batch = min(args.max_batch, int(args.kv_cache_gb / row_gb))
    if max_batch < 1:
        raise UserError(f"--kv_cache_gb {args.kv_cache_gb:g} holds no sequence of this model ({row_gb:.2f} GB each)")
    sock = listen(args.host, args.port)
    print(loaded, file=sys.stderr)
    print(f"batching up to {max_batch} sequences ({max_batch * row_gb:.2f} GB of KV cache), prefilling "
          f"{args.prefill_tokens} prompt tokens per step, {args.max_queue} requests waiting at most", file=sys.stderr)
    if not is_loopback(args.host):
        print(f"warning: --host {args.host} serves the model to every machine that can reach this one"
              f"{'' if args.api_key else '; --api_key KEY makes clients send a key'}", file=sys.stderr)
    app = build_app(model, tokenizer, ctx, str(path), args.api_key, args.max_tokens, max_batch,
                    args.prefill_tokens, args.max_queue, args.compile)
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
