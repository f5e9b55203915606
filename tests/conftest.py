"""Shared fixtures: where ../shared is, a tiny corpus, a temp out_dir, and a script runner; and a
torch.compile cache of its own for each setting of the variables that limit the CPU.

Tests read corpora and the GPT-2 BPE files from ../shared (beside the project root), never from
the network. On CI its absence is a failure; elsewhere the tests that need it are skipped. A
missing optional package of requirements-dev.txt is the same (require): a skip, and on CI a failure.
"""
import contextlib
import getpass
import importlib
import io
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# tiktoken.get_encoding("gpt2") reads its two files from here instead of downloading them.
# Set before anything imports tiktoken; subprocesses inherit it.
if (SHARED / "tiktoken").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))

# --weights auto's measured choice (engine.weights_cache_path): a cache of the test run's own, not
# the user's. Subprocesses inherit it.
os.environ.setdefault("GPT_CACHE_DIR", tempfile.mkdtemp(prefix="gpt_cache_"))

# torch.compile's on-disk cache (/tmp/torchinductor_$USER) keys compiled code without the
# instruction set that ATEN_CPU_CAPABILITY chooses for it: code compiled under one setting and
# loaded under another (as when emulating an AVX2-only CPU on this one) crashes with a segfault.
# So each setting of the variables that limit the CPU gets its own cache; subprocesses inherit it.
CPU_LIMITS = [os.environ.get(name, "") for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                     "MKL_ENABLE_INSTRUCTIONS")]
if any(CPU_LIMITS) and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(
        Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}_{'_'.join(CPU_LIMITS).lower()}")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A shell that starts a job in the background (`cmd &`) ignores SIGINT in it, and an ignored signal
# stays ignored in every process it starts: the tests that press Ctrl-C need it delivered.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared; a failure on CI when absent, a skip elsewhere."""
    if not (SHARED / "data").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED} is missing on CI: the tests need its corpora")
        pytest.skip(f"{SHARED}/data not found (it holds the test corpora)")
    return SHARED


def require(module: str, reason: str | None = None):
    """pytest.importorskip for the optional packages of requirements-dev.txt: the module, or a skip;
    on CI (CI set) a failure, since CI installs them all. Also at a test module's top."""
    if not os.environ.get("CI"):
        return pytest.importorskip(module, reason=reason)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = e
    pytest.fail(f"{module} is missing on CI ({missing}): {reason or 'pip install -r requirements-dev.txt'}",
                pytrace=False)


@pytest.fixture(scope="session")
def shakespeare_path(shared_dir) -> Path:
    return shared_dir / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def verdict_path(shared_dir) -> Path:
    return shared_dir / "data" / "the-verdict.txt"


@pytest.fixture(scope="session")
def korean_path(shared_dir) -> Path:
    return shared_dir / "data" / "nsmc_ko.txt"


@pytest.fixture(scope="session")
def tiny_corpus(shakespeare_path, tmp_path_factory) -> Path:
    """The first 40,000 characters of tiny shakespeare: enough for a few hundred blocks of 32."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(shakespeare_path.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def char_data(tiny_corpus, tmp_path_factory) -> Path:
    """A char-level dataset made by prepare.py from the tiny corpus."""
    out = tmp_path_factory.mktemp("data") / "tiny_char"
    result = run_script("prepare.py", "--input", tiny_corpus, "--out", out, "--tokenizer", "char")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """A fresh output directory (not yet created, as a user's out_dir would be)."""
    return tmp_path / "out"


def run_script(script: str, *args, input: str | None = None, timeout: float = 300, env=None):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=ROOT, input=input, capture_output=True, text=True, timeout=timeout, env=full_env,
    )


def run_in_process(script_main, *args, input: str | None = None):
    """A script's command line inside this process, as run_main runs it (without the ~2.5 s of
    starting Python and importing torch): a CompletedProcess with its exit status and output.
    sys.argv, stdin and the signal handlers a script installs are put back afterwards."""
    import common

    saved = sys.argv, sys.stdin, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.argv, sys.stdin = ["script.py", *map(str, args)], io.StringIO(input or "")
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                common.run_main(script_main)
                status = 0
            except SystemExit as e:
                status = e.code
    finally:
        sys.argv, sys.stdin, handlers = saved
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return subprocess.CompletedProcess(["script.py", *map(str, args)], status, out.getvalue(), err.getvalue())


def main_in_process(monkeypatch, capsys, script_main, argv, input=None):
    """run_in_process for tests that hold pytest's monkeypatch and capsys."""
    return run_in_process(script_main, *argv, input=input)


def assert_one_line_error(result, *needles):
    """A user's mistake: non-zero exit, no traceback, one `error:` line naming what is wrong."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_corpus, tmp_path_factory):
    """trained_checkpoint(kind) -> best.pt of a tiny GPT (2 layers, n_embd 32, block 32) trained
    with AdamW on the tiny corpus with a `kind` tokenizer: "char", "bpe" (a 384-token byte-level
    BPE trained by prepare.py) or "gpt2" (fewer, smaller steps: its 50,257-way head dominates). Trained, not random, so that greedy decoding
    meets few near-ties; made once per kind and shared by every test that exports or runs one."""
    import torch
    from dataclasses import asdict

    import gpt
    from tokenizer import load_tokenizer

    made = {}

    def make(kind):
        if kind in made:
            return made[kind]
        folder = tmp_path_factory.mktemp(f"trained_{kind}")
        flags = ["--vocab_size", "384"] if kind == "bpe" else []
        result = run_script("prepare.py", "--input", tiny_corpus, "--out", folder / "data", "--tokenizer", kind, *flags)
        assert result.returncode == 0, result.stderr
        tokenizer = load_tokenizer(folder / "data")
        data = torch.tensor(tokenizer.encode(tiny_corpus.read_text(encoding="utf-8")))
        torch.manual_seed(0)
        config = gpt.GPTConfig(block_size=32, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32)
        model = gpt.GPT(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        generator = torch.Generator().manual_seed(0)
        steps, batch = (20, 8) if kind == "gpt2" else (60, 16)
        for _ in range(steps):
            starts = torch.randint(len(data) - 33, (batch,), generator=generator)
            x = torch.stack([data[i:i + 32] for i in starts])
            y = torch.stack([data[i + 1:i + 33] for i in starts])
            _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        path = folder / "best.pt"
        gpt.save_checkpoint(dict(model=model.state_dict(), model_args=asdict(config), tokenizer=tokenizer.to_dict(),
                                 config={}, iter_num=steps, best_val_loss=loss.item()), path)
        made[kind] = path
        return path

    return make


@pytest.fixture
def compiled_steps(monkeypatch):
    """A list that gets one entry per call of a compiled decode step (engine.compiled_decode_rows's
    function) made while the test runs: evidence that decoding went through the compiled step."""
    import engine

    calls, compile_step = [], engine.compiled_decode_rows

    def counted():
        step = compile_step()
        return lambda *args: calls.append(1) or step(*args)

    monkeypatch.setattr(engine, "compiled_decode_rows", counted)
    return calls
