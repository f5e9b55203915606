"""serve.py: the OpenAI-compatible API and the chat page, as clients use them, on loopback only.

Each server is `python serve.py` on 127.0.0.1 with --port 0 (the port it prints), serving a tiny
char-level checkpoint built here with random weights, and is stopped at the end of the module.
Clients: the official `openai` package, raw HTTP (http.client) for bad requests and dropped
connections, and Debian's chromium driven by Playwright for the page.
"""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import common
import engine
import gpt
from conftest import ROOT, main_in_process, run_in_process
from engine import generate
from gpt import GPT, GPTConfig
from tokenizer import END, PLAIN_STOP, Tokenizer, render_chat

from conftest import require
require("fastapi", reason="serve.py needs fastapi and uvicorn (requirements-dev.txt)")
openai = require("openai")

KEY = "test-key"
PROMPT = "ROMEO:"
CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # a char model's vocabulary
CAP = 100_000  # the server's --max_tokens: high, so a stream can outlast a client


def save(model, tokenizer, path):
    gpt.save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config),
                             tokenizer=tokenizer.to_dict(), config={}, iter_num=0, best_val_loss=1.0), path)
    return path


def varied_gpt(vocab_size, seed=0):
    """A random GPT (block_size 32) whose greedy text varies: GPT-2's init repeats one token."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("transformer.wte", "transformer.wpe")):
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer("char", chars=CHARS)


@pytest.fixture(scope="module")
def ckpt(tokenizer, tmp_path_factory):
    return save(varied_gpt(tokenizer.vocab_size), tokenizer, tmp_path_factory.mktemp("serve") / "best.pt")


@pytest.fixture(scope="module")
def chat_ckpt(tokenizer, tmp_path_factory):
    """A chat-tuned vocabulary (the markers after the characters) whose model always ends its turn
    at once: the final LayerNorm outputs its bias, all ones, and <|end|>'s row of the tied
    embedding is all ones too, so <|end|> scores n_embd = 32 where any other token scores ~0.1."""
    chat = tokenizer.with_chat_specials()
    model = varied_gpt(chat.vocab_size)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[chat.specials[END]] = 1.0
    return save(model, chat, tmp_path_factory.mktemp("serve_chat") / "best.pt")


class Server:
    """`python serve.py ARGS --port 0` until stop(): its url, process and log file."""

    def __init__(self, tmp_path, *args):
        self.log = tmp_path / "server.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--device=cpu", "--dtype=float32",
                                          "--port=0", *map(str, args)], cwd=ROOT, stdout=log, stderr=log,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        while not (m := re.search(r"at http://127\.0\.0\.1:(\d+)/", self.log.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"serve.py did not start:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc.kill()  # a server that did not stop fails its test, and is not left running


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"), "--ckpt", ckpt, "--api_key", KEY, "--max_tokens", CAP)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def request(server, method, path, body=None, headers=None, raw=None):
    """(status, parsed JSON body or text) of one HTTP request; `raw` bytes are sent as they are."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Authorization": f"Bearer {KEY}",
                                                   "Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


def completion(client, **kwargs):
    return client.completions.create(model="m", **{"prompt": PROMPT, "max_tokens": 24, **kwargs})


def streamed_text(client, chat=False, **kwargs):
    """{choice index: concatenated text} and {index: finish_reason} of a streamed request."""
    if chat:
        stream = client.chat.completions.create(model="m", stream=True, **kwargs)
    else:
        stream = completion(client, stream=True, **kwargs)
    texts, reasons = {}, {}
    for chunk in stream:
        for choice in chunk.choices:
            piece = choice.delta.content if chat else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons


def load_model(path):
    return gpt.model_from_checkpoint(gpt.load_checkpoint(path)).eval()


# --- the API with the openai client -------------------------------------------------------------

def test_completion_chat_and_models(client, ckpt, tokenizer):
    """The response shapes a client reads: ids, object, model, choices, finish_reason, usage."""
    c = completion(client, seed=1)
    assert c.id.startswith("cmpl-") and c.object == "text_completion" and c.model == str(ckpt)
    [choice] = c.choices
    assert len(choice.text) == 24 and choice.finish_reason == "length"  # a char model: no end-of-text
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (6, 24, 30)

    messages = [{"role": "system", "content": "Be"}, {"role": "user", "content": "Hi"}]  # 30 tokens: no crop
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=10, seed=1)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    ids, _ = render_chat(tokenizer, messages, add_generation_prompt=True)  # the one template
    assert r.usage.prompt_tokens == len(ids)

    [model] = client.models.list().data
    assert model.id == str(ckpt) and model.context_length == 32


def test_streamed_text_equals_unstreamed_text(client):
    """The same request with the same seed gives the same text, streamed chunk by chunk or whole
    (n=2 choices too), for completions and chat."""
    whole = completion(client, seed=5, n=2, temperature=1.0, max_tokens=30)
    texts, reasons = streamed_text(client, seed=5, n=2, temperature=1.0, max_tokens=30)
    assert texts == {c.index: c.text for c in whole.choices} and texts[0] != texts[1]
    assert reasons == {0: "length", 1: "length"}

    messages = [{"role": "user", "content": "Who are you?"}]
    whole = client.chat.completions.create(model="m", messages=messages, seed=3, max_tokens=30)
    texts, reasons = streamed_text(client, chat=True, messages=messages, seed=3, max_tokens=30)
    assert texts == {0: whole.choices[0].message.content}
    assert reasons == {0: whole.choices[0].finish_reason}


def test_seed_repeats_the_text_and_n_gives_distinct_choices(client):
    """The same seed gives the same choices; another seed, other ones; n choices differ."""
    first = completion(client, seed=7, n=2)
    again = completion(client, seed=7, n=2)
    other = completion(client, seed=8, n=2)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.text for c in first.choices] != [c.text for c in other.choices]
    assert first.choices[0].text != first.choices[1].text
    assert first.usage.completion_tokens == 48
    # A list of prompts: prompt i draws from seed + i, as a request of its own would.
    listed = completion(client, prompt=[PROMPT, PROMPT], seed=7)
    assert [c.text for c in listed.choices] == [completion(client, seed=s).choices[0].text for s in (7, 8)]


def test_stop_strings_end_the_text_before_them(client):
    """The text ends before the first stop string (of several) and says "stop"; streamed too."""
    full = completion(client, seed=2, max_tokens=40).choices[0].text
    stops = [full[20:22], full[9:11]]  # the second one comes first
    cut = full[:min(full.index(s) for s in stops)]
    c = completion(client, seed=2, max_tokens=40, stop=stops)
    assert (c.choices[0].text, c.choices[0].finish_reason) == (cut, "stop")
    assert streamed_text(client, seed=2, max_tokens=40, stop=stops) == ({0: cut}, {0: "stop"})


def test_greedy_completion_equals_sample_py(client, ckpt):
    """Two routes to one greedy text: the server and `sample.py --temperature 0` (its command line in
    this process), same checkpoint."""
    import sample
    result = run_in_process(sample.main, "--ckpt", ckpt, "--start", PROMPT, "--temperature", 0,
                            "--max_new_tokens", 30, "--device=cpu", "--dtype=float32")
    assert result.returncode == 0, result.stderr
    c = completion(client, temperature=0, max_tokens=30, echo=True)
    assert c.choices[0].text + "\n" == result.stdout


def test_penalties_reach_the_engine(client, ckpt, tokenizer):
    """frequency/presence/repetition penalties and top_k give the text engine.generate gives with them."""
    c = completion(client, temperature=0, max_tokens=20, frequency_penalty=0.7, presence_penalty=0.3,
                   extra_body={"top_k": 5, "repetition_penalty": 1.3})  # this server's extensions
    [new] = generate(load_model(ckpt), torch.tensor([tokenizer.encode(PROMPT)]), 20, temperature=0, top_k=5,
                     frequency_penalty=0.7, presence_penalty=0.3, repetition_penalty=1.3)
    assert c.choices[0].text == tokenizer.decode(new)
    plain = completion(client, temperature=0, max_tokens=20)
    assert plain.choices[0].text != c.choices[0].text


def test_a_prompt_longer_than_the_context_keeps_its_end(client, ckpt, tokenizer):
    """A prompt longer than block_size is cropped to its end, usage counts the tokens used, and
    the text is what the model gives for those tokens."""
    prompt = "To be, or not to be, that is the question: whether 'tis nobler in the mind"
    c = completion(client, prompt=prompt, temperature=0, max_tokens=8)
    assert c.usage.prompt_tokens == 32  # block_size
    [new] = generate(load_model(ckpt), torch.tensor([tokenizer.encode(prompt)[-32:]]), 8, temperature=0)
    assert c.choices[0].text == tokenizer.decode(new)


def test_openapi_describes_the_requests_and_responses(server):
    """/openapi.json is generated from the request and response models the server validates with,
    so it names every field a client may send and the shapes it gets back."""
    status, spec = request(server, "GET", "/openapi.json")
    assert status == 200
    schemas = spec["components"]["schemas"]
    for name in ("CompletionRequest", "ChatRequest", "Message", "Completion", "ChatCompletion", "ModelList",
                 "ErrorResponse"):
        assert name in schemas, sorted(schemas)
    assert {"prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream", "echo",
            "frequency_penalty", "presence_penalty", "repetition_penalty"} <= set(schemas["CompletionRequest"]["properties"])
    assert "text/event-stream" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]


# --- bad requests -------------------------------------------------------------------------------

GOOD = {"prompt": PROMPT, "max_tokens": 3}
BAD = [  # (path, body or raw bytes, status, param, words in the message)
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "Field required"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "valid string"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens",
     "greater than or equal to 1"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": CAP + 1}, 400, "max_tokens", "--max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 10**30}, 400, "max_tokens", "--max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": -0.5}, 400, "temperature", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 0}, 400, "top_p", "greater than 0"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    ("/v1/completions", {"prompt": PROMPT, "n": 0}, 400, "n", "greater than or equal to 1"),
    ("/v1/completions", {"prompt": PROMPT, "n": 17}, 400, "n", "less than or equal to 16"),
    ("/v1/completions", {"prompt": [PROMPT] * 4, "n": 5}, 400, "n", "more than 16"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ""}, 400, "stop", "at least 1 character"),
    ("/v1/completions", {"prompt": PROMPT, "stream": "yes"}, 400, "stream", "valid boolean"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 6}, 400, "logprobs", "less than or equal to 5"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs", "less than or equal to 20"),
    ("/v1/completions", {"prompt": "ROMEO: ∆"}, 400, "prompt", "'∆' (U+2206)"),
    ("/v1/completions", b"x" * (5 << 20), 413, None, "larger than"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1 item"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "valid list"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", "'user'"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages", "content: Field required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "é"}]}, 400, "messages", "'é' (U+00E9)"),
    ("/v1/nothing", {}, 404, None, "Not Found"),
]


@pytest.mark.parametrize("path, body, status, param, words", BAD, ids=[f"{i}-{b[3] or b[1]!s:.20}" for i, b in enumerate(BAD)])
def test_a_bad_request_is_a_4xx_with_openais_error_object(server, path, body, status, param, words):
    """Never a 500, never a traceback, and the server goes on: a good request succeeds after it."""
    got, answer = request(server, "POST", path, **({"raw": body} if isinstance(body, bytes) else {"body": body}))
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert words in error["message"] and "Traceback" not in error["message"]
    assert request(server, "POST", "/v1/completions", GOOD)[0] == 200


def test_the_api_key_is_required(server):
    """With --api_key, /v1 needs `Authorization: Bearer KEY` (401 and OpenAI's error otherwise);
    /health stays open for a load balancer."""
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        status, answer = request(server, "POST", "/v1/completions", GOOD, headers=headers)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert request(server, "GET", "/v1/models", headers={"Authorization": ""})[0] == 401
    assert request(server, "GET", "/health", headers={"Authorization": ""})[0] == 200
    assert request(server, "POST", "/v1/completions", GOOD)[0] == 200


# --- under load ---------------------------------------------------------------------------------

def test_concurrent_streams_each_get_what_they_get_alone(client):
    """16 clients streaming at once, each with its own seed, receive the text each receives alone:
    the engine decodes them in one batch, and no request's randomness leaks into another's."""
    alone = {seed: streamed_text(client, seed=seed, max_tokens=40)[0] for seed in range(16)}
    together, errors = {}, []

    def run(seed):
        try:
            together[seed] = streamed_text(client, seed=seed, max_tokens=40)[0]
        except Exception as e:  # reported below: an assert in a thread would be lost
            errors.append(e)
    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and together == alone


def wait_until_idle(server, timeout=10):
    deadline = time.monotonic() + timeout
    while (health := request(server, "GET", "/health")[1])["running"] or health["waiting"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)


def test_a_dropped_stream_frees_the_worker(server, client):
    """A client that disconnects mid-stream (the stream could run for 100,000 tokens) stops its
    generation: the worker is idle again at once, and the next request completes promptly."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": PROMPT, "max_tokens": CAP, "stream": True}),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    assert request(server, "GET", "/health")[1]["running"] == 1
    conn.sock.shutdown(2)
    conn.close()
    wait_until_idle(server, timeout=30)
    assert len(completion(client, max_tokens=20).choices[0].text) == 20


def metric(server, name):
    """The value of one sample in /metrics (Prometheus' text format, read by prometheus_client)."""
    from prometheus_client.parser import text_string_to_metric_families
    status, text = request(server, "GET", "/metrics")
    assert status == 200
    return next(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


def test_metrics_count_what_the_responses_report(server, client):
    """/metrics' counters grow by what usage reports: prompt and generated tokens, requests, one
    first-token latency per choice and one per-token latency for each token after it."""
    names = ["gpt_requests_total", "gpt_prompt_tokens_total", "gpt_generated_tokens_total",
             "gpt_time_to_first_token_seconds_count", "gpt_time_per_output_token_seconds_count"]
    before = {name: metric(server, name) for name in names}
    r = completion(client, prompt=["ROMEO:", "JULIET: O"], n=2, max_tokens=7, seed=1)
    after = {name: metric(server, name) for name in names}
    growth = {name: after[name] - before[name] for name in names}
    assert growth == {"gpt_requests_total": 2, "gpt_prompt_tokens_total": r.usage.prompt_tokens,
                      "gpt_generated_tokens_total": r.usage.completion_tokens,
                      "gpt_time_to_first_token_seconds_count": 4,
                      "gpt_time_per_output_token_seconds_count": r.usage.completion_tokens - 4}
    assert metric(server, "gpt_requests_running") == metric(server, "gpt_requests_waiting") == 0


def test_logprobs_parse_in_the_openai_client_streamed_and_not(client):
    """Every logprobs field parses in the openai client and means what OpenAI's API says: for
    completions tokens, token_logprobs, top_logprobs and text_offset; for chat content items with
    token, logprob, bytes and top_logprobs. Greedy text takes the most likely token each time, so
    each token's logprob is the largest of its alternatives; streamed chunks carry the same values."""
    whole = completion(client, temperature=0, max_tokens=8, logprobs=3)
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens) == whole.choices[0].text and len(lp.tokens) == 8
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and value <= 0 and top[token] == value == max(top.values())
    chunks = [c.choices[0].logprobs for c in completion(client, temperature=0, max_tokens=8, logprobs=3, stream=True)
              if c.choices and c.choices[0].logprobs]
    assert sum((c.tokens for c in chunks), []) == lp.tokens
    assert sum((c.text_offset for c in chunks), []) == lp.text_offset
    assert sum((c.token_logprobs for c in chunks), []) == pytest.approx(lp.token_logprobs, abs=1e-5)

    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=6,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(item.token for item in content).startswith(chat.choices[0].message.content) and content
    for item in content:
        assert bytes(item.bytes).decode() == item.token and len(item.top_logprobs) == 2
        assert item.logprob == item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    stream = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=6,
                                            logprobs=True, top_logprobs=2, stream=True)
    streamed = [item for c in stream if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [i.token for i in streamed] == [i.token for i in content]
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in content], abs=1e-5)
    plain = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=6)
    assert plain.choices[0].logprobs is None


def test_echo_logprobs_score_a_text_as_sample_eval_does(client, ckpt, tmp_path, monkeypatch, capsys):
    """Two routes to a text's loss: /v1/completions with echo, logprobs and max_tokens 0 (how
    lm-evaluation-harness scores text; the first token's logprob is null) and sample.py --eval."""
    import sample
    text = "ROMEO: But soft, what light."  # 28 characters: within one context of 32
    r = client.completions.create(model="m", prompt=text, max_tokens=0, echo=True, logprobs=1)
    [choice] = r.choices
    lp = choice.logprobs
    assert choice.text == text and "".join(lp.tokens) == text and r.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(text)
    assert lp.text_offset == list(range(len(text)))  # one character per token
    mean = -sum(lp.token_logprobs[1:]) / (len(text) - 1)
    (tmp_path / "text.txt").write_text(text)
    result = main_in_process(monkeypatch, capsys, sample.main, ["--ckpt", ckpt, "--eval", tmp_path / "text.txt",
                                                                "--device", "cpu", "--dtype", "float32"])
    loss = float(re.search(r"loss ([\d.]+) nats/token", result.stdout).group(1))
    assert abs(mean - loss) <= 1e-5 * loss  # the printed loss has 6 decimals


def test_top_p_narrows_the_samples(client):
    """top_p keeps the fewest most likely tokens reaching it: a tiny top_p leaves only the most
    likely, so any seed samples the greedy text, while top_p=1 samples other texts."""
    greedy = completion(client, temperature=0, max_tokens=20).choices[0].text
    narrow = {completion(client, temperature=1.0, top_p=1e-6, seed=s, max_tokens=20).choices[0].text for s in range(4)}
    wide = {completion(client, temperature=1.0, top_p=1.0, seed=s, max_tokens=20).choices[0].text for s in range(4)}
    assert narrow == {greedy} and len(wide) == 4


def post_stream(server, body):
    """A streaming POST whose response is left unread (the server generates into the socket)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    return conn


def test_past_the_queue_a_request_gets_429_and_the_server_stays_healthy(ckpt, tmp_path):
    """With one row and a queue of two, a fourth request while three stream gets 429 with
    OpenAI's error object and Retry-After; once the clients leave, requests succeed again."""
    server = Server(tmp_path, "--ckpt", ckpt, "--max_tokens", CAP, "--max_batch", 1, "--max_queue", 2)
    try:
        body = {"prompt": PROMPT, "max_tokens": CAP}
        running = post_stream(server, body)
        deadline = time.monotonic() + 30
        while request(server, "GET", "/health")[1]["running"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        waiting = [post_stream(server, body) for _ in range(2)]
        while request(server, "GET", "/health")[1]["waiting"] != 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": PROMPT, "max_tokens": 3}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == 429 and response.getheader("Retry-After") == "1"
        assert error["type"] == "rate_limit_error" and "--max_queue 2" in error["message"]
        for c in [running, *waiting]:
            c.sock.shutdown(socket.SHUT_RDWR)
            c.close()
        wait_until_idle(server, timeout=60)
        status, answer = request(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
        assert status == 200 and len(answer["choices"][0]["text"]) == 3
    finally:
        server.stop()


# --- chat-tuned model, signals, command line ----------------------------------------------------

def test_a_chat_tuned_model_ends_its_turn_at_end_token(chat_ckpt, tmp_path):
    """The chat is rendered with the markers, and the reply ends at <|end|> (not shown), which
    this model emits first; the base template's "User:" stop does not apply."""
    server = Server(tmp_path, "--ckpt", chat_ckpt)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        messages = [{"role": "user", "content": "Hello"}]
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=10)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("", "stop")
        chat = Tokenizer("char", chars=CHARS).with_chat_specials()
        assert r.usage.prompt_tokens == len(render_chat(chat, messages, add_generation_prompt=True)[0])
        assert r.usage.completion_tokens == 1
    finally:
        assert server.stop() in (0, -signal.SIGTERM)


def test_a_base_models_chat_is_the_plain_template_continued_until_the_next_turn(client, tokenizer):
    """Two routes to one reply: a chat completion, and a completion of render_chat's plain text
    with the next turn's "User:" (PLAIN_STOP) as its stop string; and that stop cuts a reply."""
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model="m", messages=messages, seed=4, max_tokens=30)
    prompt = tokenizer.decode(render_chat(tokenizer, messages, add_generation_prompt=True)[0])
    assert prompt == "User: Hi\nAssistant:"
    plain = completion(client, prompt=prompt, seed=4, max_tokens=30, stop=[PLAIN_STOP])
    assert chat.choices[0].message.content == plain.choices[0].text
    text = engine.TextStream(tokenizer, [PLAIN_STOP])
    shown = "".join(text.add(t) for t in tokenizer.encode(" Fine, thanks.\nUser: and") if not text.stopped)
    assert shown + text.finish() == " Fine, thanks." and text.stopped


def test_a_port_in_use_is_one_line(ckpt, monkeypatch, capsys):
    """A port another program holds is one error line naming the address, not a traceback."""
    import serve
    with serve.socket.create_server(("127.0.0.1", 0)) as taken:
        status, err = serve_main(monkeypatch, capsys, "--ckpt", ckpt, "--port", taken.getsockname()[1])
    assert status == 1 and err.startswith("error: cannot listen on 127.0.0.1:") and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_stop_the_server_cleanly_mid_stream(ckpt, tmp_path, signum, status):
    """A signal while a stream runs: the server stops within seconds, by the signal (Ctrl-C: exit
    130), with no traceback."""
    server = Server(tmp_path, "--ckpt", ckpt, "--max_tokens", CAP)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": PROMPT, "max_tokens": CAP, "stream": True}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.readline().startswith(b"data: ")
        server.proc.send_signal(signum)
        assert server.proc.wait(timeout=30) == status  # mid-stream: a stream of CAP tokens would take minutes
        assert "Traceback" not in server.log.read_text(), server.log.read_text()
        conn.close()
    finally:
        server.stop()


def serve_main(monkeypatch, capsys, *argv):
    """serve.py's main in this process with uvicorn's run replaced: (exit status, stderr)."""
    import serve
    monkeypatch.setattr(sys, "argv", ["serve.py", *map(str, argv)])
    monkeypatch.setattr(serve.uvicorn.Server, "run", lambda self, sockets: sockets[0].close())
    try:
        common.run_main(serve.main)
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def test_listening_beyond_this_machine_warns(ckpt, monkeypatch, capsys):
    """--host 0.0.0.0 warns that other machines can use the model (and names --api_key); the
    loopback default does not."""
    import serve
    monkeypatch.setattr(serve, "listen", lambda host, port: serve.socket.create_server(("127.0.0.1", 0)))
    status, err = serve_main(monkeypatch, capsys, "--ckpt", ckpt, "--host", "0.0.0.0", "--port", 0)
    assert status == 0 and "warning: --host 0.0.0.0 serves the model to every machine" in err
    assert "--api_key" in err
    status, err = serve_main(monkeypatch, capsys, "--ckpt", ckpt, "--port", 0)
    assert status == 0 and "warning" not in err


@pytest.mark.parametrize("argv, words", [
    (["--ckpt", "none.pt"], "checkpoint not found"),
    (["--max_tokens", "0"], "--max_tokens must be"),
    (["--api-key", "x"], "Did you mean --api_key?"),
])
def test_command_line_mistakes_are_one_line(ckpt, monkeypatch, capsys, argv, words):
    """A bad checkpoint, flag value or misspelt flag is one `error:` line and exit status 1."""
    status, err = serve_main(monkeypatch, capsys, *(["--ckpt", ckpt] if "--ckpt" not in argv else []), *argv)
    assert status == 1 and err.startswith("error:") and words in err and len(err.strip().splitlines()) == 1, err


def test_compile_where_torch_compile_fails_is_one_line_at_startup(ckpt, monkeypatch, capsys):
    """--compile where torch.compile cannot build (no C++ compiler) is one `error:` line at startup,
    naming the remedy, not a 500 at every request; with a working torch.compile the server starts."""
    status, err = serve_main(monkeypatch, capsys, "--ckpt", ckpt, "--port", 0, "--compile")
    assert status == 0 and "error" not in err, err

    def no_compiler(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore details")
        return run

    monkeypatch.setattr(torch, "compile", no_compiler)
    status, err = serve_main(monkeypatch, capsys, "--ckpt", ckpt, "--port", 0, "--compile")
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: --compile: torch.compile does not work here (RuntimeError: InvalidCxxCompiler: "
                          "No working C++ compiler found); run without --compile"), err


def test_without_fastapi_one_line_names_the_install():
    """FastAPI and uvicorn are optional dependencies: without them serve.py says how to install
    them in one line, and no other script needs them."""
    code = f"import sys; sys.modules['fastapi'] = None; sys.argv = ['serve.py']; exec(open({str(ROOT / 'serve.py')!r}).read())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: serve.py needs fastapi: pip install fastapi uvicorn prometheus_client"
    for name in ("gpt", "engine", "tokenizer", "common", "prepare", "train", "sample", "bench"):
        assert not re.search(r"^\s*(import|from) (fastapi|uvicorn)", (ROOT / f"{name}.py").read_text(), re.M), name


def test_a_hugging_face_folder_loads_with_gpt2s_tokenizer(shared_dir, tmp_path):
    """--ckpt DIR with config.json (GPT.save_pretrained's layout) is GPT-2's architecture with
    GPT-2's BPE: the loader takes it as sample.py and serve.py share it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    model.save_pretrained(tmp_path / "hf")
    loaded = engine.load_model(tmp_path / "hf", device="cpu", dtype="float32")
    assert loaded.tokenizer.kind == "gpt2" and "Hugging Face GPT-2" in loaded.description
    x = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded.model(x)[0], model.eval()(x)[0], atol=1e-6)


# --- the page in a browser ----------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, driven by Playwright (`apt-get install chromium`; Playwright's
    own browser downloads are not used). Absent: a failure on CI, a skip elsewhere."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package (pip install -r requirements-dev.txt)"
    else:
        missing = None if CHROMIUM.exists() else f"{CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the page test needs {missing}")
        pytest.skip(f"the page test needs {missing}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


def test_the_chat_page_streams_a_reply_and_stops_it(server, browser):
    """Type a message, see the reply grow as it streams, press Stop: the reply stays, the server
    stops generating it, and New chat clears the conversation. The page asks for the API key."""
    page = browser.new_page()
    page.on("dialog", lambda dialog: dialog.accept(KEY))
    page.goto(server.url + "/")
    page.fill("#max_tokens", str(CAP))  # a reply that would outlast the test
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant")
    page.wait_for_function("document.querySelector('.msg.assistant')?.textContent.length > 20", timeout=30_000)
    assert page.locator(".msg.user").inner_text() == "Hello there"
    first = len(reply.inner_text())
    page.wait_for_function(f"document.querySelector('.msg.assistant').textContent.length > {first}", timeout=30_000)
    page.click("#stop")
    page.wait_for_function("document.querySelector('#send').disabled === false", timeout=10_000)
    wait_until_idle(server, timeout=5)  # the server dropped the generation
    stopped = reply.inner_text()
    page.evaluate("fetch('/health').then(r => r.json())")  # the page's events queued before this have run
    assert reply.inner_text() == stopped and len(stopped) > first
    assert page.locator("#stop").is_disabled()
    page.click("#new")
    assert page.locator(".msg").count() == 0
    page.close()
