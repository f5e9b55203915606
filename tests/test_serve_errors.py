"""serve.py when the model itself fails: a bug, not a bad request. The client gets a 500 with
OpenAI's error object (in a stream, the error as an event), the server's log the traceback, and
the server goes on serving the next request.

The app is serve.build_app's, served by uvicorn in a thread of the test process on 127.0.0.1
(a free port), over a tiny char-level model whose forward raises once when armed.
"""
import contextlib
import http.client
import json
import socket
import threading
import time

import pytest
import torch

from conftest import require
from engine import generate
from test_gpt import varied_model
from tokenizer import Tokenizer

require("fastapi", reason="serve.py needs fastapi and uvicorn (requirements-dev.txt)")
import serve  # noqa: E402  (after the check: serve.py exits without fastapi)
import uvicorn  # noqa: E402

PROMPT = "ROMEO:"
TOKENIZER = Tokenizer("char", chars="\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
INTERNAL_ERROR = {"message": "internal server error", "type": "server_error"}


class Failing:
    """Makes `model`'s forward raise RuntimeError the next time it runs after arm()."""

    def __init__(self, model):
        self.armed, self.forward = False, model.forward
        model.forward = self

    def arm(self):
        self.armed = True

    def __call__(self, *args, **kwargs):
        if self.armed:
            self.armed = False
            raise RuntimeError("a bug in the model")
        return self.forward(*args, **kwargs)


@pytest.fixture(scope="module")
def model():
    return varied_model(vocab_size=TOKENIZER.vocab_size, block_size=32)


@contextlib.contextmanager
def serving(app):
    """The port `app` is served on by uvicorn in a thread, on 127.0.0.1, until the block ends."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def served(model):
    """(port, Failing) of build_app's app over `model`, served until the module ends."""
    failing = Failing(model)
    with serving(serve.build_app(model, TOKENIZER, contextlib.nullcontext(), "m")) as port:
        yield port, failing


def post(port, body):
    """(status, text) of a POST /v1/completions."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def events(text):
    """The JSON objects of a server-sent event stream, before its `data: [DONE]`."""
    data = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    return [json.loads(d) for d in data if d != "[DONE]"]


def greedy_text(model, n):
    [new] = generate(model, torch.tensor([TOKENIZER.encode(PROMPT)]), n, temperature=0)
    return TOKENIZER.decode(new)


def test_a_model_error_is_a_500_with_the_error_object_and_the_server_goes_on(served, model, capsys):
    """The request whose forward raised gets a 500 and OpenAI's error object, no traceback; the
    traceback goes to the server's log (stderr); the next request gets the model's greedy text."""
    port, failing = served
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    failing.arm()
    status, text = post(port, body)
    assert status == 500, text
    assert json.loads(text) == {"error": {**INTERNAL_ERROR, "param": None, "code": None}}
    assert "Traceback" not in text and "a bug in the model" not in text
    assert "RuntimeError: a bug in the model" in capsys.readouterr().err
    status, text = post(port, body)
    assert status == 200, text
    [choice] = json.loads(text)["choices"]
    expected = greedy_text(model, 12)
    assert len(set(expected)) > 2 and choice["text"] == expected and choice["finish_reason"] == "length"


def test_a_model_error_in_a_stream_is_an_error_event_and_the_server_goes_on(served, model, capsys):
    """A stream has sent its 200 before the forward raises: the error comes as OpenAI's error
    object in an event, then [DONE]; the next stream gets the model's greedy text."""
    port, failing = served
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True}
    failing.arm()
    status, text = post(port, body)
    assert status == 200, text
    assert text.endswith("data: [DONE]\n\n") and events(text) == [{"error": INTERNAL_ERROR}], text
    assert "RuntimeError: a bug in the model" in capsys.readouterr().err
    status, text = post(port, body)
    assert status == 200 and text.endswith("data: [DONE]\n\n"), text
    assert "".join(c["text"] for e in events(text) for c in e["choices"]) == greedy_text(model, 12)
