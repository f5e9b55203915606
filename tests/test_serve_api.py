"""serve.py's HTTP API as a client reads it from /openapi.json, on loopback only.

Requests generated from the server's own schema (hypothesis: values the schema allows and their
boundaries, wrong types, extra and missing fields, tiny and huge floats, non-ASCII text, bodies that
are not objects) get a 2xx or a 4xx with OpenAI's error object, never a 5xx. The schema declares
bearer authentication exactly when there is an API key; integer fields take 7.0 as OpenAI's API does;
a 405 names the allowed methods; GET /v1/models/{id} is the model card.

The server is `python serve.py --port 0` on 127.0.0.1 serving test_serve.py's tiny char-level
checkpoint, with --max_tokens 16 (completions' default) and on one thread, so that no generated
request runs long; the values generated for max_tokens are mostly 1 to 4.
"""
import contextlib
import copy
import http.client
import json
import math

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from conftest import require
from test_serve import CHARS, PROMPT, Server, ckpt, tokenizer, varied_gpt  # noqa: F401 (ckpt, tokenizer: fixtures)

openai = require("openai")

CAP = 16  # the server's --max_tokens
ERROR_FIELDS = {"message", "type", "param", "code"}

# A stop string that ends one choice of several (of n, or of a list of prompts) while the others go
# on: the engine retires that choice's cache row between steps.
SEVERAL_CHOICES_WITH_A_STOP = [
    ("/v1/completions", {"prompt": PROMPT, "n": 8, "stop": ["a", "o"], "seed": 0}),
    ("/v1/completions", {"prompt": ["ROMEO:", "JULIET:", "A", "B"], "stop": ["a", "o"], "seed": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 8, "stop": ["a", "o"], "seed": 0}),
]


# Sampling settings at the edges of float32 (sampling computes in it): below its smallest normal
# number, products of the two beyond its largest, and a huge penalty on logits a huge temperature
# has made 0.
EXTREME_SAMPLING = [
    {"temperature": 1e-310},
    {"temperature": 1e-39},
    {"repetition_penalty": 1e-300},
    {"temperature": 1e-10, "repetition_penalty": 1e-30},
    {"temperature": 1e308, "repetition_penalty": 1e308},
]


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """Without --api_key: the schema it serves declares no authentication. One thread: a model this
    small decodes fastest on one, and the cores are shared with the other tests."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        s = Server(tmp_path_factory.mktemp("server_api"), "--ckpt", ckpt, "--max_tokens", CAP)
    yield s
    s.stop()


def call(server, method, path, body=None, raw=None):
    """(status, headers, parsed JSON body or text) of one HTTP request; `raw` bytes are sent as they are."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data is not None else {})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    try:
        return response.status, response.headers, json.loads(text)
    except ValueError:
        return response.status, response.headers, text


@pytest.fixture(scope="module")
def spec(server):
    status, _, spec = call(server, "GET", "/openapi.json")
    assert status == 200
    return spec


def assert_openai_error(answer):
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    assert set(answer["error"]) == ERROR_FIELDS and isinstance(answer["error"]["message"], str), answer
    assert answer["error"]["message"] and "Traceback" not in answer["error"]["message"]


# --- requests generated from the schema ---------------------------------------------------------

def resolve(spec, schema):
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def bounds(schema):
    """(low, high, low excluded, high excluded) of a number schema; None where unbounded."""
    low, high = schema.get("minimum"), schema.get("maximum")
    low_out, high_out = "exclusiveMinimum" in schema, "exclusiveMaximum" in schema
    return (schema.get("exclusiveMinimum", low), schema.get("exclusiveMaximum", high), low_out, high_out)


def integers(schema):
    """Small values near the bounds (most often), the bounds, anything between; each as 7 or as 7.0."""
    low, high, low_out, high_out = bounds(schema)
    low = None if low is None else math.floor(low) + 1 if low_out else math.ceil(low)
    high = None if high is None else math.ceil(high) - 1 if high_out else math.floor(high)
    start = 0 if low is None else low
    near = st.integers(start, start + 3 if high is None else min(start + 3, high))
    edges = [v for v in (low, high, -1, 0, 1, 2**31, 2**63 - 1, -2**63) if v is not None
             and (low is None or v >= low) and (high is None or v <= high)]
    values = st.one_of(near, near, near, st.sampled_from(edges), st.integers(low, high))
    return values.flatmap(lambda v: st.sampled_from([v, float(v)]))  # an integral float is the same integer


EXTREME_FLOATS = [0.0, -0.0, 5e-324, 1e-310, 2.2250738585072014e-308, 1e-39, 1e-30, 1e-6, 0.5, 1.0, 2.0,
                  1e6, 1e30, 1e308, 1.7976931348623157e308]
EXTREME_FLOATS += [-v for v in EXTREME_FLOATS]


def numbers(schema):
    """Any finite float in the bounds, the bounds, the floats just inside them, tiny and huge ones."""
    low, high, low_out, high_out = bounds(schema)
    inside = [v for v in (low, high) if v is not None]
    inside += [math.nextafter(low, math.inf)] if low is not None else []
    inside += [math.nextafter(high, -math.inf)] if high is not None else []
    inside = [v for v in EXTREME_FLOATS + inside
              if (low is None or v > low or (v == low and not low_out))
              and (high is None or v < high or (v == high and not high_out))]
    floats = st.floats(min_value=low, max_value=high, exclude_min=low_out and low is not None,
                       exclude_max=high_out and high is not None, allow_nan=False, allow_infinity=False)
    return st.one_of(floats, st.sampled_from(inside))


def strings(schema):
    """Text in the model's characters (most often; short, or past the context), any Unicode, the
    shortest allowed."""
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    short = st.text(st.sampled_from(CHARS), min_size=low, max_size=high or 24)
    return st.one_of(short, short, short,
                     st.text(st.sampled_from(CHARS), min_size=max(low, 40), max_size=max(high or 80, low, 40)),
                     st.text(min_size=low, max_size=high or 8),
                     st.just("x" * low))


def values(spec, schema):
    """Values that `schema` (as /openapi.json writes it) allows, with its boundaries."""
    schema = resolve(spec, schema)
    if "anyOf" in schema:
        return st.one_of([values(spec, s) for s in schema["anyOf"]])
    if "enum" in schema or "const" in schema:
        return st.sampled_from(schema.get("enum", [schema.get("const")]))
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return integers(schema)
    if kind == "number":
        return numbers(schema)
    if kind == "string":
        return strings(schema)
    if kind == "array":
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        items = values(spec, schema.get("items", {}))
        return st.one_of(st.lists(items, min_size=low, max_size=min(high or low + 3, low + 3)),
                         st.lists(items, min_size=high, max_size=high) if high is not None else st.nothing())
    if kind == "object" or "properties" in schema:
        props, required = schema.get("properties", {}), set(schema.get("required", []))
        return st.fixed_dictionaries({k: values(spec, v) for k, v in props.items() if k in required},
                                     optional={k: values(spec, v) for k, v in props.items() if k not in required})
    return ODD  # {}: any JSON value


ODD = st.one_of(  # values of every JSON type, for a field of another (a fresh copy each time)
    st.sampled_from([None, True, False, 0, -1, 7.0, 7.5, -0.0, 5e-324, 1e-310, 1e308, -1e308, 2**63, 2**64,
                     -2**63 - 1, 10**30, "", "7", "1.0", "true", "null", "ünï∆😀\u0000", [], [""], [None], {},
                     {"role": "user"}, math.nan, math.inf, -math.inf]),
    st.integers(), st.floats(), st.text(max_size=6), st.lists(st.integers(), max_size=2)).map(copy.deepcopy)


def nodes(value):
    """The objects inside a JSON value, itself included."""
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from nodes(v)
    elif isinstance(value, list):
        for v in value:
            yield from nodes(v)


@st.composite
def requests(draw, allowed):
    """A body from `allowed` (values(spec, schema)); in some, up to 3 changes that may make it
    wrong: a field of another type, an extra field, a missing one (at any depth), or a body that is
    not an object."""
    body = draw(allowed)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        node = draw(st.sampled_from(list(nodes(body)))) if isinstance(body, dict) else {}
        change = draw(st.sampled_from(["wrong type", "extra field", "missing field", "not an object"]))
        if change == "not an object":
            body = draw(ODD)
        elif change == "wrong type" and node:
            node[draw(st.sampled_from(sorted(node)))] = draw(ODD)
        elif change == "extra field":
            name = draw(st.one_of(st.sampled_from(["user", "logit_bias", "suffix", "tools"]), st.text(max_size=8)))
            node[name] = draw(ODD)
        elif node:
            del node[draw(st.sampled_from(sorted(node)))]
    return body


def assert_openai_answer(status, headers, answer, text):
    """2xx: a JSON response with choices, or server-sent events that end with [DONE] and carry no
    error (an error after the 200 status is a failure too); 4xx: OpenAI's error object."""
    assert status < 500, answer
    if status >= 400:
        assert_openai_error(answer)
        return
    assert 200 <= status < 300, answer
    if headers.get_content_type() == "text/event-stream":
        events = [chunk.removeprefix("data: ") for chunk in text.split("\n\n") if chunk]
        assert events[-1] == "[DONE]", text
        for chunk in events[:-1]:
            assert "error" not in json.loads(chunk), chunk
    else:
        assert isinstance(answer, dict) and isinstance(answer.get("choices"), list), answer


def request_schema(spec, path):
    return resolve(spec, spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])


@pytest.fixture(scope="module")
def bodies(spec):
    """{path: a strategy of request bodies for it}, from /openapi.json."""
    return {path: requests(values(spec, request_schema(spec, path)))
            for path in ("/v1/completions", "/v1/chat/completions")}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_requests_generated_from_the_schema_get_a_2xx_or_an_openai_error(server, bodies, path, data):
    """Whatever body a client builds from /openapi.json's request schema (right or wrong), the answer
    is a 2xx, or a 4xx whose body is OpenAI's error object: never a 5xx, never an error inside a
    stream."""
    body = data.draw(bodies[path], label="body")
    raw = json.dumps(body, ensure_ascii=data.draw(st.booleans(), label="ascii")).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    try:
        answer = json.loads(text)
    except ValueError:
        answer = text
    event(f"status {response.status}")
    assert_openai_answer(response.status, response.headers, answer, text)


@pytest.mark.parametrize("path, body", SEVERAL_CHOICES_WITH_A_STOP, ids=[json.dumps(b) for _, b in SEVERAL_CHOICES_WITH_A_STOP])
@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_that_ends_one_choice_of_several(server, path, body, stream):
    """A stop string that ends one choice of several leaves the others going: a 200 with every
    choice, never a 500 or an error event."""
    status, headers, answer = call(server, "POST", path, {**body, "stream": stream})
    assert status == 200, answer
    assert_openai_answer(status, headers, answer, answer if isinstance(answer, str) else json.dumps(answer))


@pytest.mark.parametrize("extreme", EXTREME_SAMPLING, ids=[json.dumps(b) for b in EXTREME_SAMPLING])
@pytest.mark.parametrize("stream", [False, True])
def test_extreme_sampling_settings_give_a_sample(server, extreme, stream):
    """Every finite temperature and repetition_penalty the API accepts gives a sample, streamed or
    not: never a 500, never an error event."""
    status, headers, answer = call(server, "POST", "/v1/completions",
                                   {"prompt": PROMPT, "max_tokens": CAP, "seed": 0, "stream": stream, **extreme})
    assert status == 200, answer
    assert_openai_answer(status, headers, answer, answer if isinstance(answer, str) else json.dumps(answer))


# --- the schema, integers, 405, model cards -----------------------------------------------------

def operations(spec):
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_the_schema_declares_no_422(spec):
    """A bad body gets a 400 with OpenAI's error object, so no route declares FastAPI's 422."""
    declared = {(path, method): set(op["responses"]) for path, method, op in operations(spec)}
    assert all("422" not in codes for codes in declared.values()), declared
    assert "400" in declared[("/v1/completions", "post")]


def app_schema(tokenizer, api_key):
    import serve
    app = serve.build_app(model=varied_gpt(tokenizer.vocab_size), tokenizer=tokenizer, ctx=contextlib.nullcontext(),
                          name="m", api_key=api_key)
    return app.openapi()


def test_the_schema_declares_bearer_auth_exactly_when_there_is_a_key(spec, tokenizer):
    """Without an API key, /openapi.json declares no authentication (a client would send, and a
    generator expect, a key the server ignores) and no 401; with one, every /v1 route requires
    HTTP bearer authentication and may answer 401, and /health stays open."""
    for schema in (spec, app_schema(tokenizer, None)):
        assert "securitySchemes" not in schema.get("components", {})
        for path, method, operation in operations(schema):
            assert "security" not in operation and "401" not in operation["responses"], (path, method)

    keyed = app_schema(tokenizer, "k")
    [(scheme_name, scheme)] = keyed["components"]["securitySchemes"].items()
    assert scheme == {"type": "http", "scheme": "bearer"}
    v1 = [(path, operation) for path, _, operation in operations(keyed) if path.startswith("/v1/")]
    assert {path for path, _ in v1} >= {"/v1/models", "/v1/models/{model}", "/v1/completions", "/v1/chat/completions"}
    for path, operation in v1:
        assert operation["security"] == [{scheme_name: []}] and "401" in operation["responses"], path
    assert "security" not in keyed["paths"]["/health"]["get"]


def integer_fields(spec, path):
    """The request body's integer fields (by /openapi.json) at `path`, with their lowest valid value."""
    for name, field in request_schema(spec, path)["properties"].items():
        for option in field.get("anyOf", [field]):
            if option.get("type") == "integer":
                yield name, max(1, math.ceil(option.get("minimum", 1)))


def test_integer_fields_take_integral_floats(server, spec):
    """As in OpenAI's API, a JSON number with an integral value (7.0) is that integer wherever the
    schema says "integer": the same answer as 7 (a greedy text, or the same error); 7.5, "7" and
    true are 400s naming the field."""
    short = {"max_tokens": 2, "temperature": 0}
    bases = {"/v1/completions": {"prompt": PROMPT, **short},
             "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], **short}}
    for path, base in bases.items():
        fields = dict(integer_fields(spec, path))
        assert {"max_tokens", "n", "top_k", "seed"} <= set(fields), fields
        for name, value in fields.items():
            as_int = call(server, "POST", path, {**base, name: value})
            as_float = call(server, "POST", path, {**base, name: float(value)})
            assert as_float[0] == as_int[0], (name, as_int, as_float)
            if as_int[0] == 200:
                assert [c.get("text", c.get("message")) for c in as_float[2]["choices"]] == \
                       [c.get("text", c.get("message")) for c in as_int[2]["choices"]], name
            else:
                assert as_float[2] == as_int[2], name
            for wrong in (value + 0.5, str(value), True):
                status, _, answer = call(server, "POST", path, {**base, name: wrong})
                assert status == 400, (name, wrong, answer)
                assert_openai_error(answer)
                assert answer["error"]["param"] == name and "valid integer" in answer["error"]["message"]

    greedy = {"max_tokens": CAP, "temperature": 0, "top_k": 7, "n": 2, "seed": 7}
    as_int = call(server, "POST", "/v1/completions", {"prompt": PROMPT, **greedy})
    as_float = call(server, "POST", "/v1/completions", {"prompt": PROMPT, **{k: float(greedy[k]) for k in greedy}})
    assert as_int[0] == as_float[0] == 200
    assert [c["text"] for c in as_float[2]["choices"]] == [c["text"] for c in as_int[2]["choices"]]
    assert len(as_int[2]["choices"]) == 2 and len(as_int[2]["choices"][0]["text"]) == CAP


@pytest.mark.parametrize("method, path, allowed", [
    ("GET", "/v1/completions", "POST"), ("PUT", "/v1/chat/completions", "POST"), ("POST", "/v1/models", "GET"),
    ("DELETE", "/health", "GET"),
])
def test_a_405_names_the_allowed_methods(server, method, path, allowed):
    """A method a route does not take is a 405 with an `Allow` header listing those it takes, and
    OpenAI's error object."""
    status, headers, answer = call(server, method, path)
    assert status == 405 and headers["Allow"] == allowed
    assert_openai_error(answer)


def test_a_model_card_by_id(server, ckpt):
    """GET /v1/models/{id} is the card /v1/models lists, for the served id (a checkpoint path, with
    its slashes, as they are or as the openai client sends them, %2F); any other id is a 404 with
    OpenAI's error object, code model_not_found."""
    _, _, listed = call(server, "GET", "/v1/models")
    [card] = listed["data"]
    assert card["id"] == str(ckpt) and "/" in card["id"]
    for path in (f"/v1/models/{ckpt}", f"/v1/models/{str(ckpt).replace('/', '%2F')}"):
        status, _, answer = call(server, "GET", path)
        assert (status, answer) == (200, card)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    assert client.models.retrieve(str(ckpt)).model_dump(exclude_none=True) == card
    for other in ("gpt-4", "a/b/c", str(ckpt)[1:], f"{ckpt}/more"):
        status, _, answer = call(server, "GET", f"/v1/models/{other}")
        assert status == 404, (other, answer)
        assert_openai_error(answer)
        assert answer["error"]["code"] == "model_not_found" and other in answer["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
