"""serve.py --compile: the server's decode steps run through the compiled step and give the text
of eager decoding."""
import contextlib
import json

from test_gpt import varied_model
from test_serve_errors import PROMPT, TOKENIZER, greedy_text, post, serve, serving


def test_a_compiled_server_decodes_through_the_compiled_step_the_eager_text(compiled_steps):
    """build_app(compile=True): every decode step after the prompt's goes through
    engine.compiled_decode_rows, and a greedy completion is the text of eager generate."""
    model = varied_model(vocab_size=TOKENIZER.vocab_size, block_size=32)
    with serving(serve.build_app(model, TOKENIZER, contextlib.nullcontext(), "m", compile=True)) as port:
        status, text = post(port, {"prompt": PROMPT, "max_tokens": 20, "temperature": 0})
    assert status == 200, text
    assert len(compiled_steps) == 20 - 1  # the first token comes from the prompt's forward
    assert json.loads(text)["choices"][0]["text"] == greedy_text(model, 20)
