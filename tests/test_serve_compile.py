"""serve.py --compile: the server's decode steps run through the compiled step and give the text
of eager decoding."""
import contextlib
import json

import engine
from test_gpt import varied_model
from test_serve_errors import PROMPT, TOKENIZER, greedy_text, post, serve, serving


def test_a_compiled_server_decodes_through_the_compiled_step_the_eager_text(monkeypatch):
    """build_app(compile=True): every decode step after the prompt's goes through
    engine.compiled_decode_rows, and a greedy completion is the text of eager generate."""
    calls = []
    compile_step = engine.compiled_decode_rows

    def counted():
        step = compile_step()
        return lambda *args: calls.append(1) or step(*args)

    monkeypatch.setattr(engine, "compiled_decode_rows", counted)
    model = varied_model(vocab_size=TOKENIZER.vocab_size, block_size=32)
    with serving(serve.build_app(model, TOKENIZER, contextlib.nullcontext(), "m", compile=True)) as port:
        status, text = post(port, {"prompt": PROMPT, "max_tokens": 20, "temperature": 0})
    assert status == 200, text
    assert len(calls) == 20 - 1  # the first token comes from the prompt's forward
    assert json.loads(text)["choices"][0]["text"] == greedy_text(model, 20)
