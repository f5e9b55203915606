"""sample.py: generation, chat, analysis, evaluation, benchmark and its errors, as a user runs them.

Two tiny char-level checkpoints are made in-process (no training run): one with random weights
(its samples depend on --seed), and one overfit on a short text (its perplexity there is ~1).
Most commands run sample.py's main inside the test process (`cli`), as run_main runs it; a few
run the script itself, where only a real process shows it (Ctrl-C, a clean stdout, the import).
"""
import argparse
import ast
import io
import math
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch

import common
import engine
import gpt
import sample
from conftest import ROOT, assert_one_line_error, main_in_process, run_script
from engine import beam_search, generate, quantize
from gpt import GPT, GPTConfig
from common import UserError
from tokenizer import load_tokenizer

PROMPT = "ROMEO:"
SEP = "\n" + sample.SEPARATOR + "\n"


@pytest.fixture(scope="session")
def tokenizer(tiny_corpus, tmp_path_factory):
    """The char tokenizer prepare.py makes for the tiny corpus."""
    out = tmp_path_factory.mktemp("data") / "sample_char"
    result = run_script("prepare.py", "--input", tiny_corpus, "--out", out, "--tokenizer", "char")
    assert result.returncode == 0, result.stderr
    return load_tokenizer(out)


def save(model, tokenizer, path):
    gpt.save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config),
                               tokenizer=tokenizer.to_dict(), config={}, iter_num=0,
                               best_val_loss=float("inf")), path)
    return path


def tiny_gpt(tokenizer, seed, block_size=32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32))


@pytest.fixture(scope="session")
def random_ckpt(tokenizer, tmp_path_factory):
    return save(tiny_gpt(tokenizer, 0), tokenizer, tmp_path_factory.mktemp("random") / "best.pt")


@pytest.fixture(scope="session")
def train_text(tiny_corpus):
    return tiny_corpus.read_text(encoding="utf-8")[:120]


@pytest.fixture(scope="session")
def overfit_ckpt(tokenizer, train_text, tmp_path_factory):
    """A GPT (block_size 16) trained on every window of a 120-character text until it knows it by heart."""
    model = tiny_gpt(tokenizer, 1, block_size=16)
    data = torch.tensor(tokenizer.encode(train_text))
    T = model.config.block_size
    starts = range(len(data) - T)  # every offset: positions are learned, so each must be seen
    x = torch.stack([data[i:i + T] for i in starts])
    y = torch.stack([data[i + 1:i + T + 1] for i in starts])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses time to a second thread
    try:
        for _ in range(150):
            _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    return save(model.eval(), tokenizer, tmp_path_factory.mktemp("overfit") / "best.pt")


def run(ckpt, *args, input=None):
    return run_script("sample.py", "--ckpt", ckpt, "--device=cpu", "--dtype=float32", *args, input=input)


@pytest.fixture
def cli(monkeypatch, capsys):
    """`run`, inside this process: cli(ckpt, *args, input=None)."""
    def run_cli(ckpt, *args, input=None):
        argv = ["--ckpt", ckpt, "--device=cpu", "--dtype=float32", *args]
        return main_in_process(monkeypatch, capsys, sample.main, argv, input)
    return run_cli


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def load_model(path):
    return gpt.model_from_checkpoint(gpt.load_checkpoint(path)).eval()


def varied_gpt(tokenizer, seed=1):
    """A random model whose greedy text varies: GPT-2's init repeats one character (as
    tests/test_gpt.py's varied_model)."""
    model = tiny_gpt(tokenizer, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("transformer.wte", "transformer.wpe")):
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(scope="session")
def varied_ckpt(tokenizer, tmp_path_factory):
    return save(varied_gpt(tokenizer), tokenizer, tmp_path_factory.mktemp("varied") / "best.pt")


@pytest.fixture(scope="session")
def coarse_int8_ckpt(tokenizer, tmp_path_factory):
    """varied_gpt with one dead hidden unit per MLP (input weights 0, bias -30: GELU gives exactly
    0) whose output weights are 30. fp32 never sees them; int8's per-row scale is set by them, so
    it rounds every other weight of c_proj to a few levels, and its greedy text is another."""
    model = varied_gpt(tokenizer)
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight[0] = 0.0
            block.mlp.c_fc.bias[0] = -30.0
            block.mlp.c_proj.weight[:, 0] = 30.0
    return save(model, tokenizer, tmp_path_factory.mktemp("coarse_int8") / "best.pt")


def cli_model(path):
    """The model as sample.py loads it to generate on a CPU in fp32 (its weights' layout too)."""
    return engine.load_model(path, None, "cpu", "float32").model


def recorded_generation(monkeypatch):
    """sample.generate_stream replaced by itself, recording each call: its model, prompt, settings,
    the state of its generator when called, and the tokens it yielded."""
    calls, real = [], sample.generate_stream

    def recording(model, idx, max_new_tokens, **kwargs):
        generator = kwargs["generator"]
        call = dict(kwargs, model=model, prompt=idx[0].tolist(), max_new_tokens=max_new_tokens, tokens=[],
                    state=None if generator is None else generator.get_state().clone())
        calls.append(call)
        for token in real(model, idx, max_new_tokens, **kwargs):
            call["tokens"].append(token.item())
            yield token

    monkeypatch.setattr(sample, "generate_stream", recording)
    return calls


def run_chat(monkeypatch, model, tokenizer, lines, *flags):
    """sample.chat in-process on the typed `lines` (stdout is then pytest's capture)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    sample.chat(model, tokenizer, sample.parse_args(["--chat", *flags]))


# --- generation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("native_bf16", [True, False])
@pytest.mark.parametrize("faster", ["fp32", "bf16", "int8"])
def test_auto_weights_on_a_cpu_generate_in_the_chosen_format_and_score_in_fp32(
        native_bf16, faster, random_ckpt, tmp_path, monkeypatch, capsys):
    """--weights auto on a CPU generates with the format engine.choose_weights picks (stored in that
    format: autocast would re-cast every weight at every step) and says so on the loaded line;
    scores whole windows (--eval) with fp32 weights under bf16 autocast where the CPU runs it
    natively, plain fp32 elsewhere; draws attention maps in fp32. A given --dtype means fp32
    weights in that precision; a given --weights is that format. Both kinds of CPU."""
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: native_bf16)
    monkeypatch.setattr(engine, "choose_weights", lambda model, device, rows=1: (faster, "auto: stand-in"))
    text = tmp_path / "text.txt"
    text.write_text(PROMPT * 3, encoding="utf-8")
    loaded = []
    real_load = engine.load_model
    monkeypatch.setattr(sample, "load_model", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])

    def precision(*args):
        result = ok(main_in_process(monkeypatch, capsys, sample.main, ["--ckpt", random_ckpt, "--device=cpu", *args]))
        return re.search(r" on cpu, (.+)$", result.stderr.splitlines()[0]).group(1)

    def float_dtypes():
        return {t.dtype for t in loaded[-1].model.state_dict().values() if t.is_floating_point()}
    shown = {"fp32": "float32", "bf16": "bf16 weights", "int8": "int8 weights"}[faster]
    assert precision("--max_new_tokens=3") == f"{shown} (auto: stand-in)"
    assert float_dtypes() == {engine.WEIGHT_FORMATS[faster]}
    assert precision("--eval", text) == ("bfloat16 autocast" if native_bf16 else "float32")
    assert float_dtypes() == {torch.float32}  # autocast: fp32 weights
    assert precision("--dtype=bfloat16", "--max_new_tokens=3") == "bfloat16 autocast"
    assert float_dtypes() == {torch.float32}
    assert precision("--weights=bf16", "--max_new_tokens=3") == "bf16 weights"
    assert float_dtypes() == {torch.bfloat16}
    assert precision("--attention", PROMPT) == "float32"  # inspects one window: no timing, fp32


def test_samples_have_the_asked_length_and_follow_the_seed(random_ckpt, cli):
    """Guards against an unseeded generator (irreproducible) or a seed that is ignored."""
    args = ["--start", PROMPT, "--max_new_tokens=20", "--num_samples=2", "--temperature=1.0"]
    first = ok(cli(random_ckpt, *args, "--seed=1"))
    again = ok(cli(random_ckpt, *args, "--seed=1"))
    other = ok(cli(random_ckpt, *args, "--seed=2"))
    assert f"loaded {random_ckpt}" in first.stderr
    samples = first.stdout.removesuffix("\n").split(SEP)
    assert len(samples) == 2
    for text in samples:  # a char model has no end-of-text: exactly 20 new characters
        assert text.startswith(PROMPT) and len(text) == len(PROMPT) + 20
    assert samples[0] != samples[1]  # the second sample continues the random stream
    assert again.stdout == first.stdout
    assert other.stdout != first.stdout


def test_the_printed_seed_repeats_the_sample(varied_ckpt, cli):
    """Without --seed a fresh seed is printed on stderr, and --seed with that value gives the same
    text again. Two runs without --seed draw two seeds, so two texts (this model's samples vary)."""
    args = ["--start", PROMPT, "--max_new_tokens=30", "--temperature=1"]
    runs = [ok(cli(varied_ckpt, *args)) for _ in range(2)]
    seeds = [re.search(r"^seed (\d+) \(--seed \1 repeats this run\)$", run.stderr, re.M).group(1) for run in runs]
    assert seeds[0] != seeds[1] and runs[0].stdout != runs[1].stdout
    again = ok(cli(varied_ckpt, *args, f"--seed={seeds[0]}"))
    assert again.stdout == runs[0].stdout and "seed" not in again.stderr


def test_greedy_is_gpt_generate_at_temperature_0(random_ckpt, tokenizer):
    """Two routes to greedy text, the CLI's stream and engine.generate in-process: guards against a
    setting lost on the way to the engine, and against diagnostics mixed into stdout."""
    result = ok(run(random_ckpt, "--start", PROMPT, "--max_new_tokens=30", "--temperature=0"))
    idx = torch.tensor([tokenizer.encode(PROMPT)])
    [new] = generate(load_model(random_ckpt), idx, 30, temperature=0)
    assert result.stdout == PROMPT + tokenizer.decode(new) + "\n"


def test_compile_decodes_through_the_compiled_step_the_eager_text(random_ckpt, tokenizer, cli, monkeypatch,
                                                                   compiled_steps):
    """--compile reaches the engine: every decode step after the prompt's goes through
    engine.compiled_decode_rows, and the greedy text is eager generate's; a chat reply decodes
    through it too."""
    result = ok(cli(random_ckpt, "--start", PROMPT, "--max_new_tokens=12", "--temperature=0", "--compile"))
    assert len(compiled_steps) == 12 - 1  # the first token comes from the prompt's forward
    [new] = generate(cli_model(random_ckpt), torch.tensor([tokenizer.encode(PROMPT)]), 12, temperature=0)
    assert result.stdout == PROMPT + tokenizer.decode(new) + "\n"
    compiled_steps.clear()
    run_chat(monkeypatch, cli_model(random_ckpt), tokenizer, ["ROMEO:"], "--max_new_tokens=5", "--temperature=0",
             "--compile")
    assert len(compiled_steps) == 5 - 1


def test_compile_where_torch_compile_fails_is_one_line(random_ckpt, cli, monkeypatch):
    """--compile where torch.compile cannot build (no C++ compiler) is one `error:` line naming the
    remedy, before anything is generated."""
    def no_compiler(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", no_compiler)
    result = cli(random_ckpt, "--start", PROMPT, "--max_new_tokens=3", "--compile")
    assert_one_line_error(result, "--compile: torch.compile does not work here", "run without --compile")
    assert result.stdout == ""


def test_int8_greedy_is_generate_of_the_quantized_model(coarse_int8_ckpt, tokenizer, monkeypatch, capsys):
    """--weights int8 must reach the engine as engine.quantize's int8 model (not be ignored, not quantize
    something else), and the loaded line must say so. Both routes run the same int8 kernels on
    the same inputs, so their tokens are equal by construction; on this model int8's greedy text
    is not fp32's, so an fp32 model passed off as int8 would show."""
    calls = recorded_generation(monkeypatch)
    result = ok(main_in_process(monkeypatch, capsys, sample.main, ["--ckpt", coarse_int8_ckpt, "--device=cpu",
                                                                   "--start", PROMPT, "--max_new_tokens=30",
                                                                   "--temperature=0", "--weights=int8"]))
    assert "int8 weights" in result.stderr
    [call] = calls
    linears = [m for m in call["model"].modules() if isinstance(m, (torch.nn.Linear, engine.Int8Linear))]
    assert len(linears) == 4 * 2 + 1  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block; the head
    assert all(isinstance(m, engine.Int8Linear) and m.weight.dtype == torch.int8 for m in linears)
    idx = torch.tensor([tokenizer.encode(PROMPT)])
    [new] = generate(quantize(load_model(coarse_int8_ckpt), "int8"), idx, 30, temperature=0)
    assert result.stdout == PROMPT + tokenizer.decode(new) + "\n"
    [fp32] = generate(load_model(coarse_int8_ckpt), idx, 30, temperature=0)
    assert len(set(fp32)) > 2 and new != fp32


def test_beam_search_prints_gpt_beam_search(random_ckpt, tokenizer, cli):
    """Guards against --num_beams being ignored (falling back to sampling)."""
    result = ok(cli(random_ckpt, "--start", PROMPT, "--max_new_tokens=8", "--num_beams=3"))
    idx = torch.tensor([tokenizer.encode(PROMPT)])
    new = beam_search(load_model(random_ckpt), idx, 8, 3)
    assert result.stdout == PROMPT + tokenizer.decode(new) + "\n"


class ByteTokenizer:
    """Token i is byte i: any multi-byte character is split across tokens."""
    eot_id = None

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def encode(self, text):
        return list(text.encode())


class PieceTokenizer:
    """Tokens of several characters each: the single characters (ids 0-255), then `pieces`."""
    eot_id = None

    def __init__(self, pieces):
        self.pieces = [chr(i) for i in range(256)] + list(pieces)

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)

    def encode(self, text):
        return [ord(c) for c in text]


def fake_engine(tokens, taken, interrupt=False):
    """A generate_stream that yields `tokens` (counting them in `taken`), then maybe a Ctrl-C."""
    def generate_stream(model, idx, max_new_tokens, **kwargs):
        for t in tokens[:max_new_tokens]:
            taken.append(t)
            yield torch.tensor([t])
        if interrupt:
            raise KeyboardInterrupt
    return generate_stream


class Writes(list):
    """A stdout that keeps each write apart."""
    def write(self, text):
        self.append(text)

    def flush(self):
        pass


def streamed(monkeypatch, text, stop=None, tokenizer=ByteTokenizer(), tokens=None, interrupt=False):
    """(writes, returned tokens, tokens taken from the engine) of sample.stream while the engine
    'generates' `tokens` (default: the bytes of `text`), then maybe a Ctrl-C."""
    writes, taken = Writes(), []
    tokens = list(text.encode()) if tokens is None else tokens
    monkeypatch.setattr(sample, "generate_stream", fake_engine(tokens, taken, interrupt))
    monkeypatch.setattr(sys, "stdout", writes)
    settings = dict(max_new_tokens=1000, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    new = sample.stream(torch.nn.Linear(1, 1), tokenizer, [0], settings, None, stop, interruptible=interrupt)
    return [w for w in writes if w], new, taken


def test_streaming_never_prints_half_a_character(monkeypatch):
    """A byte-level token can end inside a UTF-8 character; printing it would show U+FFFD."""
    text = "안녕하세요, GPT! ünïcödé 🙂 done"
    writes, new, _ = streamed(monkeypatch, text)
    assert "".join(writes) == text
    assert not any("\ufffd" in w for w in writes)
    assert bytes(new).decode() == text


def test_stop_string_ends_the_text_and_is_not_printed(monkeypatch):
    """The stop string may arrive token by token; none of it may reach stdout."""
    writes, new, taken = streamed(monkeypatch, "Hello there.\n\nSecond part", stop="\n\n")
    assert "".join(writes) == "Hello there."
    assert bytes(taken).decode() == "Hello there.\n\n"  # generation stopped right there
    assert bytes(new).decode() == "Hello there."  # the tokens of the text shown (chat's context)


def test_stop_inside_a_token_returns_the_tokens_of_the_text_shown(monkeypatch):
    """The tokens returned (a chat's context) are those of the text shown: not the tokens that
    completed the stop string, nor what followed it inside them. The stop string here starts
    inside one token and ends inside the next."""
    tokenizer = PieceTokenizer(["Hel", "lo th", "ere.\n", "\nSec", "ond"])
    tokens = [256, 257, 258, 259, 260]
    writes, new, taken = streamed(monkeypatch, "", stop="\n\n", tokenizer=tokenizer, tokens=tokens)
    assert "".join(writes) == "Hello there."
    assert taken == tokens[:4]
    assert tokenizer.decode(new) == "Hello there."
    assert new[:2] == tokens[:2]  # the model's own tokens while they fit the text shown


def test_ctrl_c_in_an_interruptible_stream_keeps_what_was_shown(monkeypatch):
    """A chat reply stopped by Ctrl-C returns the tokens of the text printed so far (held-back text
    included: it is printed then) and the program goes on; outside a chat Ctrl-C propagates
    (run_main exits 130)."""
    text = "Hello there.\n"
    writes, new, taken = streamed(monkeypatch, text, stop="\n\n", interrupt=True)
    assert "".join(writes) == text and bytes(new).decode() == text and bytes(taken).decode() == text
    monkeypatch.setattr(sample, "generate_stream", fake_engine(list(b"Hi"), [], interrupt=True))
    with pytest.raises(KeyboardInterrupt):
        sample.stream(torch.nn.Linear(1, 1), ByteTokenizer(), [0], dict(
            max_new_tokens=9, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0), None, None)


def start_sample(ckpt, *args):
    """sample.py as a running process (to send it Ctrl-C): stdin a pipe, stdout unbuffered."""
    return subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(ckpt), "--device=cpu",
                             "--dtype=float32", *map(str, args)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def read_until(proc, done, timeout=120):
    """proc's stdout so far, read until done(it) holds."""
    out, deadline = b"", time.monotonic() + timeout
    while not done(out.decode(errors="replace")):
        assert time.monotonic() < deadline, out
        if select.select([proc.stdout], [], [], 1)[0]:
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            assert chunk, proc.communicate()[1].decode()  # end of output: the process ended
            out += chunk
    return out.decode(errors="replace")


HUGE = "--max_new_tokens=1000000000000"  # a user's "until --stop, end-of-text or Ctrl-C"


def test_huge_max_new_tokens_generates_until_the_stop_string(random_ckpt, tokenizer, cli):
    """--max_new_tokens 10**12 allocates nothing in proportion to it, and with --stop gives the
    text engine.generate gives for the same seed with the stop string's token as a stop token: the
    same draws, cut where the stop string begins."""
    result = ok(cli(random_ckpt, "--start", PROMPT, HUGE, "--stop=e", "--seed=3", "--temperature=1"))
    idx = torch.tensor([tokenizer.encode(PROMPT)])
    [new] = generate(load_model(random_ckpt), idx, 10**12, temperature=1.0, stop_tokens=tokenizer.encode("e"),
                     generator=torch.Generator().manual_seed(3))
    assert len(new) > 3  # the stop string did not come at once
    assert result.stdout == PROMPT + tokenizer.decode(new) + "\n"


@pytest.mark.slow
def test_ctrl_c_ends_an_endless_generation_with_exit_130(random_ckpt):
    """Without --stop, a huge --max_new_tokens runs until Ctrl-C, which ends sample.py with exit
    status 130, "interrupted" and no traceback."""
    proc = start_sample(random_ckpt, "--start", PROMPT, HUGE, "--seed=0")
    read_until(proc, lambda out: len(out) > len(PROMPT) + 50)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err.decode() and "Traceback" not in err.decode()


def test_a_closed_stdout_pipe_ends_quietly(random_ckpt):
    """`python sample.py ... | head -c 20`: once the reader has gone, an endless generation stops at
    its next write, quietly: no traceback (nor Python's "Exception ignored" at exit) on stderr,
    exit status 141 (128 + SIGPIPE, what a shell shows for cat in the same place). stdout is
    buffered, as in a user's pipe: the write that fails leaves text in the buffer, which Python
    would try to flush again at exit."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(random_ckpt), "--device=cpu",
                             "--dtype=float32", "--start", PROMPT, HUGE, "--seed=0"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    head = read_until(proc, lambda out: len(out) >= 20)
    proc.stdout.close()  # what head does after its 20 bytes
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert head.startswith(PROMPT)
    assert proc.returncode == 141, err.decode()
    assert err.decode().splitlines() == [f"loaded {random_ckpt} (iter 0, 0.03M parameters, block_size 32, char "
                                         "tokenizer) on cpu, float32"]


def test_prompt_longer_than_block_size_is_cropped_with_a_notice(random_ckpt, cli):
    """Guards against a position-embedding IndexError on a long prompt, or a silent crop."""
    result = ok(cli(random_ckpt, "--start", "ROMEO: " * 10, "--max_new_tokens=3", "--seed=0"))
    assert "notice: the prompt is 70 tokens; keeping its last 32" in result.stderr
    assert len(result.stdout) == 70 + 3 + 1


# --- chat ---------------------------------------------------------------------------------------

def test_chat_commands_change_their_settings_and_quit_exits_0(random_ckpt, cli):
    """Each command must change the setting it names; a bad value is an error line, not an exit."""
    script = ["/temp 0.5", "/tokens 5", "/topk 3", "/topp 0.9", "/penalty 1.2", "/seed 7",
              "/temp -1", "/topp 2", "/tokens many", "/frobnicate", "/reset", "/help",
              "/temp 0", "ROMEO:", "quit", "/temp 0.25"]
    result = ok(cli(random_ckpt, "--chat", input="\n".join(script) + "\n"))
    out = result.stdout.splitlines()
    for line in ["temperature = 0.5", "max_new_tokens = 5", "top_k = 3", "top_p = 0.9",
                 "repetition_penalty = 1.2", "seed = 7", "context cleared", "temperature = 0.0"]:
        assert line in out
    assert "/reset" in result.stdout  # the /help text
    assert "temperature = 0.25" not in out  # nothing is read after quit
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 4 and "temperature must be" in errors[0] and "top_p must be" in errors[1]
    assert "max_new_tokens must be" in errors[2] and "unknown command /frobnicate" in errors[3]
    reply = result.stdout.split("temperature = 0.0\n")[1]
    assert len(reply) == 5 + 1  # the reply after /tokens 5 (a char model never stops early)


def test_chat_keeps_the_conversation_and_ends_at_end_of_input(varied_ckpt, tokenizer, cli):
    """The second reply continues the whole conversation, not the second line alone (greedy, so
    comparable with engine.generate on the model as the CLI loads it; this model's replies to the
    two contexts differ); the chat ends at the end of its input."""
    result = ok(cli(varied_ckpt, "--chat", "--temperature=0", "--max_new_tokens=6", input="ROMEO:\nJULIET:\n"))
    model = cli_model(varied_ckpt)
    greedy = lambda ids: generate(model, torch.tensor([ids]), 6, temperature=0)[0]
    first = greedy(tokenizer.encode("ROMEO:"))
    second = greedy(tokenizer.encode("ROMEO:") + first + tokenizer.encode("\nJULIET:"))
    alone = greedy(tokenizer.encode("JULIET:"))
    assert len(set(first + second)) > 2 and second != alone
    assert result.stdout == tokenizer.decode(first) + "\n" + tokenizer.decode(second) + "\n"


def test_chat_commands_reach_the_generation(varied_ckpt, tokenizer, monkeypatch, capsys):
    """/temp /tokens /topk /topp /penalty set what the next reply is generated with (top_k 0 and
    top_p 1 are off: None), and /seed S restarts the random generator from S: after /reset, the
    same line after /seed S again gets the same reply; without it, the generator goes on and the
    reply differs (this model's samples vary)."""
    calls = recorded_generation(monkeypatch)
    run_chat(monkeypatch, cli_model(varied_ckpt), tokenizer,
             ["/temp 1.5", "/tokens 12", "/topk 20", "/topp 0.95", "/penalty 1.3", "/seed 7", "ROMEO:",
              "/reset", "/seed 7", "ROMEO:", "/reset", "ROMEO:",
              "/topk 0", "/topp 1", "/penalty 1", "/temp 0", "ROMEO:"], "--max_new_tokens=5")
    seeded = torch.Generator().manual_seed(7).get_state()
    assert len(calls) == 4 and all(call["prompt"] == tokenizer.encode("ROMEO:") for call in calls[:3])
    for call in calls[:3]:
        settings = {k: call[k] for k in ("temperature", "max_new_tokens", "top_k", "top_p", "repetition_penalty")}
        assert settings == dict(temperature=1.5, max_new_tokens=12, top_k=20, top_p=0.95, repetition_penalty=1.3)
    assert torch.equal(calls[0]["state"], seeded) and torch.equal(calls[1]["state"], seeded)
    assert calls[1]["tokens"] == calls[0]["tokens"] and len(calls[0]["tokens"]) == 12
    assert not torch.equal(calls[2]["state"], seeded) and calls[2]["tokens"] != calls[0]["tokens"]
    off = {k: calls[3][k] for k in ("temperature", "max_new_tokens", "top_k", "top_p", "repetition_penalty")}
    assert off == dict(temperature=0.0, max_new_tokens=12, top_k=None, top_p=None, repetition_penalty=1.0)


def test_chat_context_is_the_text_shown_cut_at_the_stop_string(monkeypatch, capsys, tokenizer):
    """After a reply cut by --stop, the context is the text shown, without the stop string's tokens
    (the user never saw them): the next reply continues the text shown (greedy, so comparable with
    engine.generate)."""
    model = varied_gpt(tokenizer)
    run_chat(monkeypatch, model, tokenizer, ["ROMEO:", "JULIET:"], "--temperature=0", "--max_new_tokens=12",
             "--stop=j")
    context = tokenizer.encode("ROMEO:")
    [first] = generate(model, torch.tensor([context]), 12, temperature=0)
    shown = tokenizer.decode(first).split("j")[0]
    assert 0 < len(shown) < 12  # the stop string did cut this reply
    context += tokenizer.encode(shown + "\nJULIET:")
    [second] = generate(model, torch.tensor([context]), 12, temperature=0)
    assert capsys.readouterr().out == shown + "\n" + tokenizer.decode(second).split("j")[0] + "\n"


@pytest.mark.slow
def test_ctrl_c_stops_a_chat_reply_and_at_the_prompt_quits(random_ckpt):
    """Ctrl-C during a chat reply ends the reply (endless here: a char model has no end-of-text),
    not the chat, which reads the next line; Ctrl-C at the prompt exits 130, quietly."""
    proc = start_sample(random_ckpt, "--chat", "--max_new_tokens=1000000000000", "--seed=0")
    proc.stdin.write(b"ROMEO:\n")
    proc.stdin.flush()
    read_until(proc, lambda out: len(out) > 50)
    proc.send_signal(signal.SIGINT)
    proc.stdin.write(b"/temp 0.5\n")
    proc.stdin.flush()
    out = read_until(proc, lambda out: "temperature = 0.5\n" in out)
    assert out.endswith("\ntemperature = 0.5\n")  # the reply ended with its line, then the command ran
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err.decode() and "Traceback" not in err.decode()


def test_the_seed_line_is_printed_only_when_sampling(random_ckpt, tokenizer, monkeypatch, capsys):
    """"seed N (--seed N repeats this run)" is printed by a run that draws random numbers, never by
    greedy decoding or beam search; a chat prints it at its first sampled reply."""
    model = load_model(random_ckpt)
    for flags, seeded in [(["--temperature=0"], False), (["--num_beams=2"], False), ([], True)]:
        args = sample.parse_args(["--max_new_tokens=3", *flags])
        sample.sample(model, tokenizer, args, PROMPT, tokenizer.encode(PROMPT))
        assert ("--seed" in capsys.readouterr().err) == seeded, flags
    run_chat(monkeypatch, model, tokenizer, ["ROMEO:"], "--temperature=0", "--max_new_tokens=3")
    assert "--seed" not in capsys.readouterr().err
    run_chat(monkeypatch, model, tokenizer, ["ROMEO:", "/temp 0.5", "JULIET:"], "--temperature=0",
             "--max_new_tokens=3")
    assert capsys.readouterr().err.count("--seed") == 1


@pytest.fixture(scope="session")
def no_newline_ckpt(tokenizer, tmp_path_factory):
    """A char model whose characters include no newline (as from a corpus of one line)."""
    chars = load_tokenizer({"kind": "char", "chars": [c for c in tokenizer.chars if c != "\n"]})
    return save(tiny_gpt(chars, 0), chars, tmp_path_factory.mktemp("no_newline") / "best.pt")


def test_a_char_model_without_newline_asks_for_a_prompt(no_newline_ckpt, monkeypatch, capsys, cli):
    """An empty prompt starts a char model from a newline; a model without one in its characters
    asks for a prompt (one error line, before anything else is printed) rather than naming a
    newline the user never typed; in a chat an empty line gets the same hint and the chat goes on."""
    assert_one_line_error(cli(no_newline_ckpt, "--max_new_tokens=5"), "--start TEXT")
    run_chat(monkeypatch, load_model(no_newline_ckpt), load_tokenizer(no_newline_ckpt),
             ["", "ROMEO:", "JULIET:"], "--max_new_tokens=5", "--seed=0")
    out, err = capsys.readouterr()
    assert "error: an empty prompt starts from a newline" in err and "type some text" in err
    assert err.count("error:") == 1  # the second line joins the chat without a newline
    assert len(out) == 2 * (5 + 1)  # the replies to ROMEO: and JULIET:


# --- analyze and eval ---------------------------------------------------------------------------

def test_analyze_table_is_sorted_and_surprisal_matches_the_model_loss(random_ckpt, tokenizer, cli):
    """Candidates sorted, probabilities <= 1 in total; mean surprisal = the model's own loss."""
    text = "ROMEO: hi"
    result = ok(cli(random_ckpt, "--analyze", text, "--top_k=7"))
    candidates, surprisal = result.stdout.split("\n\n")
    rows = [line.split() for line in candidates.splitlines()[2:]]
    probs = [float(row[1]) for row in rows]
    assert [int(row[0]) for row in rows] == list(range(1, 8))
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    assert "the first token has no context" in surprisal  # char vocabulary: no end-of-text to start from
    rows = [line.split() for line in surprisal.splitlines()[2:-1]]
    assert len(rows) == len(text) and rows[0][2] == "-"
    nats = [float(row[3]) for row in rows[1:]]
    ids = torch.tensor([tokenizer.encode(text)])
    _, loss = load_model(random_ckpt)(ids[:, :-1], ids[:, 1:])
    mean = float(re.search(r"mean ([0-9.]+) nats", surprisal).group(1))
    assert mean == pytest.approx(loss.item(), abs=1e-3)
    assert sum(nats) / len(nats) == pytest.approx(loss.item(), abs=2e-3)


@pytest.fixture(scope="session")
def gpt2_tokenizer(shared_dir):
    return load_tokenizer("gpt2")  # tiktoken reads its files from ../shared/tiktoken


def test_analyze_scores_the_first_token_after_end_of_text(gpt2_tokenizer, capsys):
    """With an end-of-text id every token of the text is scored; the mean is the model's loss."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=1, n_embd=8)).eval()
    ids = gpt2_tokenizer.encode("Hello, how are you")
    sample.analyze(model, gpt2_tokenizer, ids, top_k=3)
    out = capsys.readouterr().out
    assert "the first token is given end-of-text" in out
    rows = [line.split() for line in out.split("\n\n")[1].splitlines()[2:-1]]
    assert [int(row[0]) for row in rows] == list(range(len(ids)))
    assert [int(row[1]) for row in rows] == ids
    seq = torch.tensor([[gpt2_tokenizer.eot_id] + ids])
    _, loss = model(seq[:, :-1], seq[:, 1:])
    assert float(re.search(r"mean ([0-9.]+) nats", out).group(1)) == pytest.approx(loss.item(), abs=1e-3)


def test_analyze_shows_a_token_that_splits_a_character_as_its_bytes(gpt2_tokenizer, capsys):
    """A byte-level token that is not whole UTF-8 characters is shown as its bytes (not as
    '\\ufffd', which would make the pieces of one emoji identical rows), and the pieces together
    are the text's bytes."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=1, n_embd=8)).eval()
    text = "\U0001F389 ok"  # the emoji is three GPT-2 tokens
    sample.analyze(model, gpt2_tokenizer, gpt2_tokenizer.encode(text), top_k=3)
    out = capsys.readouterr().out
    assert "\ufffd" not in out
    rows = out.split("\n\n")[1].splitlines()[2:-1]
    shown = [ast.literal_eval(row.split(None, 5)[5]) for row in rows]  # pos id p nats bits token
    assert [type(s) for s in shown] == [bytes, bytes, bytes, str]
    assert b"".join(s if isinstance(s, bytes) else s.encode() for s in shown) == text.encode()


def test_an_empty_prompt_starts_from_end_of_text_or_a_newline(tokenizer, gpt2_tokenizer):
    assert sample.start_ids(gpt2_tokenizer) == [gpt2_tokenizer.eot_id]
    assert sample.start_ids(tokenizer) == tokenizer.encode("\n")  # char: no end-of-text id


def test_eval_of_an_overfit_model_on_its_training_text_is_near_1(overfit_ckpt, train_text, tmp_path, cli):
    path = tmp_path / "train.txt"
    path.write_text(train_text, encoding="utf-8")
    result = ok(cli(overfit_ckpt, "--eval", path, "--stride=4"))
    assert f"{len(train_text) - 1} tokens scored" in result.stdout
    ppl = float(re.search(r"perplexity ([0-9.]+)", result.stdout).group(1))
    acc = float(re.search(r"accuracy ([0-9.]+)", result.stdout).group(1))
    assert ppl < 1.15 and acc > 0.95


@pytest.mark.parametrize("n, T, stride", [(2, 8, 8), (9, 8, 8), (10, 8, 8), (50, 8, 3), (50, 8, 1), (5, 8, 4)])
def test_windows_score_every_token_once(n, T, stride):
    """Guards against tokens scored twice (overlap) or never (a short last window, a gap)."""
    spans = sample.windows(n, T, stride)
    scored = [t for begin, end, first in spans for t in range(first + 1, end + 1)]
    assert scored == list(range(1, n))  # targets 1..n-1, each once, in order
    for begin, end, first in spans:
        assert end - begin == min(T, n - 1) and begin <= first  # full windows; context for each target


def test_eval_with_stride_block_size_is_the_mean_loss_over_chunks(overfit_ckpt, tokenizer, train_text):
    """The sliding-window loss at stride = block_size is train.py's loss on the same chunks; a
    smaller stride gives more context, so a lower loss, and still scores every token once."""
    model = load_model(overfit_ckpt)
    T = model.config.block_size
    tokens = tokenizer.encode(train_text[:5 * T + 1])
    data = torch.tensor(tokens)
    x, y = data[:-1].view(5, T), data[1:].view(5, T)
    with torch.no_grad():
        logits, direct = model(x, y)
    loss, acc, count = sample.evaluate(model, tokens, stride=T)
    assert count == len(tokens) - 1
    assert loss == pytest.approx(direct.item(), rel=1e-5)
    assert acc == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    overlapping, _, count = sample.evaluate(model, tokens, stride=T // 4)
    assert count == len(tokens) - 1
    assert overlapping < loss  # the memorised text is ambiguous only with little context


def test_eval_stride_above_block_size_is_refused(random_ckpt, tmp_path, cli):
    """Windows that end more than block_size tokens apart would leave the tokens between them
    unscored (a loss of fewer tokens than said): one error line; block_size itself is accepted."""
    path = tmp_path / "text.txt"
    path.write_text(PROMPT * 20, encoding="utf-8")
    assert_one_line_error(cli(random_ckpt, "--eval", path, "--stride=33"), "--stride 33", "block_size 32")
    assert f"{len(PROMPT) * 20 - 1} tokens scored" in ok(cli(random_ckpt, "--eval", path, "--stride=32")).stdout


@pytest.mark.parametrize("text", ["R", ""])
def test_eval_of_a_file_of_fewer_than_two_tokens_is_one_line(random_ckpt, tmp_path, cli, text):
    """A token is scored given the one before it: a file of one token (or none) has nothing to
    score, which is one error line naming the file and its count."""
    path = tmp_path / "short.txt"
    path.write_text(text, encoding="utf-8")
    assert_one_line_error(cli(random_ckpt, "--eval", path), str(path), f"holds {len(text)} token(s)", "at least 2")


def test_benchmark_prints_prefill_and_decode_rates(random_ckpt, cli):
    """--benchmark times half a block of prompt, then new tokens to the end of the block: its
    lines say so and give finite, positive rates, and decode's ms/token is 1000 / its tokens/s."""
    lines = ok(cli(random_ckpt, "--benchmark")).stdout.splitlines()
    assert lines[0] == "benchmark on cpu: batch 1, 16 prompt tokens then 16 new tokens, median of 5 runs"
    prefill = re.fullmatch(r"prefill ([0-9,]+) tokens/s", lines[1])
    decode = re.fullmatch(r"decode ([0-9,]+) tokens/s \(([0-9.]+) ms/token\)", lines[2])
    assert prefill and decode and len(lines) == 3, lines
    rates = [float(m.group(1).replace(",", "")) for m in (prefill, decode)]
    assert all(0 < rate < math.inf for rate in rates)
    # ms/token (printed to 0.01) is 1000 / tokens/s, which is printed to 1: off by up to 0.5
    low, high = 1000 / (rates[1] + 0.5), 1000 / (rates[1] - 0.5)
    assert low - 0.005 - 1e-9 <= float(decode.group(2)) <= high + 0.005 + 1e-9, (decode.group(0), low, high)


# --- choosing the checkpoint --------------------------------------------------------------------

def test_checkpoint_choice(tmp_path, monkeypatch):
    """--ckpt, else --out_dir's best.pt then ckpt.pt, else the newest run under out*/."""
    monkeypatch.chdir(tmp_path)
    # out-b holds the newest file (its ckpt.pt), and there best.pt is preferred.
    for path, stamp in [("out/ckpt.pt", 1000), ("out-b/best.pt", 1010), ("out-b/ckpt.pt", 1030),
                        ("out-c/ckpt.pt", 1020)]:
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_bytes(b"")
        os.utime(tmp_path / path, (stamp, stamp))
    assert str(engine.find_checkpoint(None, None)) == "out-b/best.pt"
    assert str(engine.find_checkpoint(None, "out")) == "out/ckpt.pt"
    assert str(engine.find_checkpoint("x.pt", "out")) == "x.pt"
    with pytest.raises(UserError, match="no best.pt or ckpt.pt"):
        engine.find_checkpoint(None, "elsewhere")
    monkeypatch.chdir(tmp_path / "out")
    with pytest.raises(UserError, match="no checkpoint found"):
        engine.find_checkpoint(None, None)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["--top_p=0"], "top_p must be"),
    (["--top_p=1.5"], "top_p must be"),
    (["--temperature=-1"], "temperature must be"),
    (["--temperature=nan"], "temperature must be"),
    (["--num_beams=0"], "num_beams must be"),
    (["--num_samples=0"], "num_samples must be"),
    (["--repetition_penalty=0"], "repetition_penalty must be"),
    (["--top_k=-2"], "top_k must be"),
    (["--num_beams=2", "--num_samples=2"], "beam search is deterministic"),
    (["--stride=4"], "only to --eval"),
    # a flag the chosen mode does not use is an error, even at its default value
    (["--chat", "--num_beams=2"], "--num_beams does not apply to --chat"),
    (["--chat", "--num_samples=2"], "--num_samples does not apply to --chat"),
    (["--eval", "x.txt", "--temperature=0.8"], "--temperature does not apply to --eval"),
    (["--eval", "x.txt", "--top_k=5"], "--top_k does not apply to --eval"),
    (["--eval", "x.txt", "--max_new_tokens=5"], "--max_new_tokens does not apply to --eval"),
    (["--eval", "x.txt", "--stop=a"], "--stop does not apply to --eval"),
    (["--analyze", "x", "--top_p=0.9"], "--top_p does not apply to --analyze"),
    (["--analyze", "x", "--repetition_penalty=1.2"], "--repetition_penalty does not apply to --analyze"),
    (["--analyze", "x", "--num_beams=2"], "--num_beams does not apply to --analyze"),
    (["--analyze", "x", "--num_samples=2"], "--num_samples does not apply to --analyze"),
    (["--benchmark", "--seed=1"], "--seed does not apply to --benchmark"),
    (["--eval", "x.txt", "--compile"], "--compile does not apply to --eval"),
    (["--num_beams=2", "--compile"], "beam search runs eagerly"),
    # --dtype is the precision of fp32 weights; int8 computes in bf16, and groups are int4's
    (["--weights=int8", "--dtype=float32"], "--dtype sets the autocast precision of fp32 weights"),
    (["--weights=int8", "--group_size=32"], "--group_size 32 applies to --weights int4"),
    (["--attention", "x", "--weights=int8"], "--weights does not apply to --attention"),
    (["--chat", "--benchmark"], "not allowed with"),
    (["--temprature=1"], "unknown flag --temprature. Did you mean --temperature?"),
])
def test_bad_flag_values_are_user_errors(argv, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        sample.parse_args(argv)


def test_help_shows_the_defaults_that_apply(capsys):
    """--help shows every sampling setting's default, the value parse_args applies; that --top_k
    also sets --analyze's candidate count; and where the formats' figures are."""
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    out = capsys.readouterr().out
    entries = {m[1]: " ".join(m[2].split()) for m in re.finditer(r"^  (--\w+)(.*?)(?=^  -|\Z)", out, re.M | re.S)}
    args = sample.parse_args([])
    for name in ["num_samples", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams"]:
        assert f"(default {getattr(args, name)})" in entries[f"--{name}"], entries[f"--{name}"]
    assert "--analyze" in entries["--top_k"] and "BENCHMARKS.md" in entries["--weights"]
    assert sample.parse_args(["--analyze", "hi", "--top_k=5"]).top_k == 5  # --top_k applies there
    assert sample.parse_args(["--weights=int4", "--group_size=32"]).group_size == 32


@pytest.fixture
def pickled_ckpt(random_ckpt, tmp_path):
    ckpt = gpt.load_checkpoint(random_ckpt)
    path = tmp_path / "pickled.pt"
    torch.save({**ckpt, "config": argparse.Namespace(lr=1)}, path)  # needs pickle to load
    return path


@pytest.fixture
def mismatched_ckpt(random_ckpt, tmp_path):
    ckpt = gpt.load_checkpoint(random_ckpt)
    path = tmp_path / "bad.pt"
    gpt.save_checkpoint({**ckpt, "model_args": {**ckpt["model_args"], "n_embd": 64}}, path)
    return path


def test_missing_checkpoint(tmp_path, cli):
    assert_one_line_error(cli(tmp_path / "none.pt"), "checkpoint not found")


def test_a_directory_as_ckpt_points_to_out_dir(random_ckpt, cli):
    """--ckpt naming a run's directory says to pass it as --out_dir (not "checkpoint not found"
    about a directory that is there)."""
    assert_one_line_error(cli(random_ckpt.parent), "--out_dir")


def test_corrupt_checkpoint(tmp_path, cli):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip" * 10)
    assert_one_line_error(cli(path), "cannot read checkpoint")


def test_checkpoint_with_pickled_objects_is_refused(pickled_ckpt, cli):
    assert_one_line_error(cli(pickled_ckpt), "pickled Python objects")


def test_checkpoint_whose_weights_do_not_match_its_args(mismatched_ckpt, cli):
    assert_one_line_error(cli(mismatched_ckpt), "do not match")


def test_unknown_character_for_a_char_vocabulary(random_ckpt, cli):
    assert_one_line_error(cli(random_ckpt, "--start", "ROMEO: ∆"), "∆")


def test_bad_flag_value_is_one_line(random_ckpt, cli):
    assert_one_line_error(cli(random_ckpt, "--top_p=1.5"), "top_p must be")


def test_eval_of_a_missing_file(random_ckpt, tmp_path, cli):
    assert_one_line_error(cli(random_ckpt, "--eval", tmp_path / "none.txt"), "cannot read")


def test_a_misspelt_flag_is_one_line_naming_the_closest_flag(random_ckpt):
    """`python sample.py --temprature 0.5`: one error line, no usage text, no traceback, that
    names the flag meant."""
    result = run(random_ckpt, "--temprature", "0.5")
    assert_one_line_error(result, "unknown flag --temprature", "Did you mean --temperature?")
    assert result.stdout == ""


@pytest.mark.parametrize("settings", [["--temperature", "1e-310"], ["--repetition_penalty", "1e-300"],
                                      ["--temperature", "1e300", "--top_p", "1e-300"],
                                      ["--repetition_penalty", "1e300", "--top_k", "1"]])
def test_every_setting_the_cli_accepts_samples(varied_ckpt, cli, settings):
    """An extreme value that parses (a subnormal temperature, a penalty of 1e-300 or 1e300) still
    samples: 12 new characters and exit 0, never a traceback about inf or nan probabilities. A
    temperature of 1e-310 is greedy in effect."""
    result = ok(cli(varied_ckpt, "--start", PROMPT, "--max_new_tokens", 12, "--seed", 1, *settings))
    assert len(result.stdout) == len(PROMPT) + 12 + 1  # the prompt, the sample, a newline
    if settings == ["--temperature", "1e-310"]:
        greedy = ok(cli(varied_ckpt, "--start", PROMPT, "--max_new_tokens", 12, "--temperature", 0))
        assert result.stdout == greedy.stdout
