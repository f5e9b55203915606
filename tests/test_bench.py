"""bench.py runs end to end (a tiny shape, seconds); it prints figures and asserts no speed."""
from conftest import run_script

TINY_DECODE = ("decode", "--n_layer", 1, "--n_head", 2, "--n_embd", 32, "--vocab_size", 64,
               "--block_size", 32, "--new_tokens", 8, "--repeats", 1)


def test_decode_smoke():
    """Every method runs (the int8 copy too) and the fp32 ones agree on the greedy tokens (HF too,
    when transformers is installed)."""
    result = run_script("bench.py", *TINY_DECODE, "--int8")
    assert result.returncode == 0, result.stderr
    for label in ("kv-cache", "recompute", "kv-cache vs recompute", "hf-generate", "kv-cache-int8 vs kv-cache"):
        assert label in result.stdout
    assert "same tokens from every float32 method: yes" in result.stdout


def test_decode_past_block_size_still_runs():
    """Both our decoders crop the context to block_size, so any length works; HF's GPT-2 cannot
    go past n_positions, so it is skipped with the reason instead of crashing the benchmark."""
    result = run_script("bench.py", *TINY_DECODE, "--prompt_tokens", 40)
    assert result.returncode == 0, result.stderr
    assert "hf-generate: skipped (the context passes block_size" in result.stdout
    assert "same tokens from every float32 method: yes" in result.stdout


def test_prepare_smoke(shakespeare_path, korean_path):
    """The prepare benchmark runs on a small corpus, and prepare.py's token count equals tiktoken's."""
    result = run_script("bench.py", "prepare", "--mb", 1, "--shakespeare", shakespeare_path,
                        "--korean", korean_path, "--korean_chars", 100_000, "--vocab_size", 512, "--repeats", 1)
    assert result.returncode == 0, result.stderr
    for label in ("prepare.py", "encode_ordinary x1", "peak RSS", "chars/token"):
        assert label in result.stdout
    assert "same token count: yes" in result.stdout


def test_train_smoke():
    """Every variant of the training benchmark runs one step on the smallest shape (compile
    included: it is the variant most likely to break with a new torch)."""
    result = run_script("bench.py", "train", "--shapes", "baby", "--steps", 1, "--repeats", 1)
    assert result.returncode == 0, result.stderr[-2000:]
    for label in ("nanoGPT", "fp32", "bf16", "fp32+compile", "bf16+compile", "ms/iter"):
        assert label in result.stdout
