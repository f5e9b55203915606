"""bench.py's three modes run end to end on tiny shapes, inside the test process: every labelled
row is printed with finite, positive figures; figures printed twice agree (a rate and its time per
token, a speed-up and the two times it compares); and the methods compared agree on their output.
No speed is asserted: it depends on the machine."""
import math
import re
import sys

import pytest
import torch

import bench
from gpt import GPT, GPTConfig
from tokenizer import load_tokenizer

TINY_DECODE = ("decode", "--n_layer", 1, "--n_head", 2, "--n_embd", 32, "--vocab_size", 64,
               "--block_size", 32, "--new_tokens", 8, "--repeats", 1)


def bench_output(monkeypatch, capsys, *argv):
    """What `python bench.py *argv` prints, run inside this process."""
    monkeypatch.setattr(sys, "argv", ["bench.py", *map(str, argv)])
    capsys.readouterr()
    bench.main()
    return capsys.readouterr().out


def number(text):
    return float(text.replace(",", ""))


def assert_positive(*figures):
    assert all(0 < f < math.inf for f in figures), figures


def assert_rounds(printed, step, low, high):
    """`printed`, rounded to `step`, is the rounding of a value between low and high."""
    assert low - step / 2 - 1e-9 <= printed <= high + step / 2 + 1e-9, (printed, low, high)


def assert_ratio(printed, a, b, step_a, step_b):
    """printed (to 0.01) is a / b, where a and b were printed to step_a and step_b (each is off
    by up to half its step)."""
    half_a, half_b = step_a / 2, step_b / 2
    assert_rounds(printed, 0.01, (a - half_a) / (b + half_b), (a + half_a) / (b - half_b))


def decode_rows(out):
    """{method: (tokens/s, ms/token)} of bench.py decode's table."""
    rows = re.findall(r"^  (\S+) +([0-9.]+) tokens/s  \(([0-9.]+) ms/token\)$", out, re.M)
    table = {name: (float(rate), float(ms)) for name, rate, ms in rows}
    assert len(table) == len(rows), out
    for name, (rate, ms) in table.items():
        assert_positive(rate, ms)
        assert_rounds(ms, 0.01, 1000 / (rate + 0.05), 1000 / (rate - 0.05))  # 1000 / tokens/s
    return table


def speedup(out, label):
    return float(re.search(rf"{re.escape(label)}:? +([0-9.]+)x", out).group(1))


def test_decode_rows_and_their_agreement(monkeypatch, capsys):
    """Every method has its row (the int8 copy and Hugging Face's generate too); the speed-ups are
    the ratios of the rates; the float32 methods give the same greedy tokens."""
    pytest.importorskip("transformers", reason="transformers is not installed (test-only dependency)")
    out = bench_output(monkeypatch, capsys, *TINY_DECODE, "--int8")
    assert "8 new tokens (greedy), float32" in out.splitlines()[0]
    rates = {name: rate for name, (rate, _) in decode_rows(out).items()}
    assert rates.keys() == {"kv-cache", "recompute", "hf-generate", "kv-cache-int8"}
    assert_ratio(speedup(out, "kv-cache vs recompute"), rates["kv-cache"], rates["recompute"], 0.1, 0.1)
    assert_ratio(speedup(out, "kv-cache vs hf-generate"), rates["kv-cache"], rates["hf-generate"], 0.1, 0.1)
    int8_line = re.search(r"^  kv-cache-int8 vs .*$", out, re.M).group(0)
    for other in ("kv-cache", "recompute", "hf-generate"):
        assert_ratio(speedup(int8_line, f"vs {other}"), rates["kv-cache-int8"], rates[other], 0.1, 0.1)
    assert "  same tokens from every float32 method: yes" in out.splitlines()


def test_decode_past_block_size_skips_only_hugging_face(monkeypatch, capsys):
    """Both our decoders crop the context to block_size, so any length works, and still agree;
    HF's GPT-2 cannot go past n_positions, so it is skipped with the reason instead of crashing."""
    out = bench_output(monkeypatch, capsys, *TINY_DECODE, "--prompt_tokens", 40)
    rates = {name: rate for name, (rate, _) in decode_rows(out).items()}
    assert rates.keys() == {"kv-cache", "recompute"}
    assert_ratio(speedup(out, "kv-cache vs recompute"), rates["kv-cache"], rates["recompute"], 0.1, 0.1)
    assert "  hf-generate: skipped (the context passes block_size, and HF's GPT-2 cannot slide its window)" in out
    assert "  same tokens from every float32 method: yes" in out.splitlines()


def test_prepare_rows_and_the_token_count(monkeypatch, capsys, shakespeare_path, korean_path):
    """prepare.py's and one tiktoken thread's rates, their ratio, the rates and peak RSS of JSON
    Lines and Parquet inputs, and the BPE's chars/token are printed; the token count both agree
    on is GPT-2's count of the corpus, counted here."""
    out = bench_output(monkeypatch, capsys, "prepare", "--mb", 1, "--shakespeare", shakespeare_path,
                       "--korean", korean_path, "--korean_chars", 100_000, "--vocab_size", 512, "--repeats", 1)
    whole = re.search(r"^  prepare\.py +([0-9.]+) MB/s  \(([0-9.]+) s wall for the whole run, ([0-9.]+) s CPU; "
                      r"peak RSS ([0-9]+) MB\)$", out, re.M)
    single = re.search(r"^  encode_ordinary x1 +([0-9.]+) MB/s  \(([0-9.]+) s inside tiktoken, one thread\)$", out, re.M)
    ratio = re.search(r"^  prepare\.py / single-thread encode_ordinary: ([0-9.]+)x \(its CPU: ([0-9.]+)x", out, re.M)
    count = re.search(r"^  same token count: (\w+) \(([0-9,]+)\)$", out, re.M)
    records = re.findall(r"^  (jsonl|parquet) records +([0-9.]+) MB/s  \(([0-9.,]+) MB file, ([0-9.]+) s wall, "
                         r"([0-9.]+) s CPU; peak RSS ([0-9]+) MB\)$", out, re.M)
    assert [r[0] for r in records] == ["jsonl", "parquet"], out
    for _, rate, size, wall, cpu, rss in records:
        assert_positive(float(rate), number(size), float(rss))
        assert 0 <= float(wall) < math.inf and 0 <= float(cpu) < math.inf  # printed to 0.1 s
    bpe = re.search(r"^bpe: trained on ([0-9,]+) lines .* vocab_size 512: ([0-9.]+) s$", out, re.M)
    chars = re.search(r"^  chars/token on ([0-9,]+) held-out lines: ([0-9.]+) \(GPT-2 BPE: ([0-9.]+)\)$", out, re.M)
    assert whole and single and ratio and count and bpe and chars, out
    rate, single_rate = float(whole.group(1)), float(single.group(1))
    assert_positive(rate, float(whole.group(3)), float(whole.group(4)), single_rate, float(ratio.group(2)),
                    number(bpe.group(1)), number(chars.group(1)), float(chars.group(2)), float(chars.group(3)))
    # wall and training times are printed to 0.1 s, and a tiny run may round to 0.0
    assert 0 <= float(whole.group(2)) < math.inf and 0 <= float(bpe.group(2)) < math.inf
    assert_ratio(float(ratio.group(1)), rate, single_rate, 0.1, 0.1)
    text = shakespeare_path.read_text(encoding="utf-8")
    assert count.groups() == ("yes", f"{len(load_tokenizer('gpt2').encode(text)):,}")


TRAIN_VARIANTS = ("nanoGPT", "fp32", "bf16", "fp32+compile", "bf16+compile")


@pytest.mark.slow
def test_train_rows_and_their_agreement(monkeypatch, capsys):
    """Every variant of the training benchmark runs one step (compile included: it is the variant
    most likely to break with a new torch) and has its row: tokens/s is batch x block / the step
    time, MFU is the model's FLOPs at that rate over its dtype's peak, and the speed-up is the
    ratio of the step times. The shape is a 1-layer one (compiling takes a third less time than
    for the 4-layer "baby"); the peak is given (a measured bf16 peak takes minutes on a CPU
    without native bf16, where torch runs bf16 matmuls at ~0.4 GFLOP/s)."""
    peaks = {torch.float32: 1e9, torch.bfloat16: 2e9}  # low: a 1-layer model's MFU must not print as 0.0%
    monkeypatch.setattr(bench, "measure_peak_flops", lambda device, dtype: peaks[dtype])
    monkeypatch.setitem(bench.TRAIN_SHAPES, "tiny", dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4))
    out = bench_output(monkeypatch, capsys, "train", "--shapes", "tiny", "--steps", 1, "--repeats", 1)
    assert "torch.compile failed" not in out
    assert "  measured matmul peak: float32 1 GFLOP/s, bfloat16 2 GFLOP/s" in out.splitlines()
    rows = re.findall(r"^    (\S+) +([0-9.]+) ms/iter +([0-9,]+) tok/s +MFU +([0-9.]+)% of (\w+) peak +"
                      r"([0-9.]+)x nanoGPT$", out, re.M)
    assert [row[0] for row in rows] == list(TRAIN_VARIANTS), out
    shape = bench.TRAIN_SHAPES["tiny"]
    tokens = shape["batch_size"] * shape["block_size"]
    config = GPTConfig(vocab_size=65, **{k: v for k, v in shape.items() if k != "batch_size"})
    with torch.device("meta"):
        flops = {"ours": GPT(config).flops_per_token(), "nanoGPT": bench.nanogpt_model(config).flops_per_token()}
    ms = {name: float(step) for name, step, *_ in rows}
    for name, step, tok_s, mfu, dtype, ratio in rows:
        step, tok_s, mfu, ratio = float(step), number(tok_s), float(mfu), float(ratio)
        assert_positive(step, tok_s, mfu, ratio)
        assert dtype == ("bfloat16" if name.startswith("bf16") else "float32")
        assert_rounds(tok_s, 1, tokens * 1000 / (step + 0.05), tokens * 1000 / (step - 0.05))
        per_tok_s = flops["nanoGPT" if name == "nanoGPT" else "ours"] / peaks[getattr(torch, dtype)] * 100
        assert_rounds(mfu, 0.1, per_tok_s * (tok_s - 0.5), per_tok_s * (tok_s + 0.5))
        assert_ratio(ratio, ms["nanoGPT"], step, 0.1, 0.1)


def test_serve_smoke(monkeypatch, capsys):
    """The serving benchmark starts serve.py, streams from 1 and 2 concurrent clients, then one
    request of n=2 choices, and prints one row each: time to first token, tokens/s of all
    clients together and of each choice."""
    out = bench_output(monkeypatch, capsys, "serve", "--shapes", "tiny", "--clients", 1, 2, "--new_tokens", 4,
                       "--repeats", 1)
    rows = re.findall(r"^ +(\d+|1, n=2) +([0-9,]+) ms +([0-9,]+) +([0-9,]+)$", out, re.M)
    assert [row[0] for row in rows] == ["1", "2", "1, n=2"], out
    for _, first, total, each in rows:
        assert 0 <= number(first) < math.inf  # a first token may take < 0.5 ms, printed as 0
        assert_positive(number(total), number(each))
