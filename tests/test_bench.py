"""bench.py's modes run end to end on tiny shapes, inside the test process: every labelled row is
printed with finite, positive figures; figures printed twice agree (a rate and its time per token,
a speed-up and the two times it compares); and the methods compared agree on their output. The
memory planner's activation bytes are the bytes autograd saves; the GPU mode's parts that need no
GPU run on a CPU (its train.py runs, its table, its decoding check, its error without CUDA).
No speed is asserted: it depends on the machine."""
import math
import re
import sys

import pytest
import torch

import bench
import optim
from conftest import assert_one_line_error, require, run_script
from gpt import GPT, GPTConfig
from tokenizer import load_tokenizer

TINY_DECODE = ("decode", "--n_layer", 1, "--n_head", 2, "--n_embd", 32, "--vocab_size", 64,
               "--block_size", 32, "--new_tokens", 8, "--repeats", 1)


def varied_gpt(config):
    """GPT(config) whose greedy tokens vary (as tests/test_gpt.py's varied_model): GPT-2's init
    repeats one token, which any decoder, right or wrong, would repeat too."""
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("transformer.wte", "transformer.wpe")):
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture
def decoded(monkeypatch):
    """bench.py's decoding on varied_gpt's models: {method: its tokens}, filled as bench runs."""
    outputs = {}
    timed = bench.median_seconds

    def median_seconds(fns, repeats):
        seconds, results = timed(fns, repeats)
        outputs.update(results)
        return seconds, results

    monkeypatch.setattr(bench, "GPT", varied_gpt)
    monkeypatch.setattr(bench, "median_seconds", median_seconds)
    return outputs


def assert_same_varied_tokens(outputs, methods, new_tokens=8, reference="fp32"):
    """Each of `methods` gave the reference's greedy tokens, and those are not one token repeated."""
    tokens = outputs[reference]
    assert len(tokens) == new_tokens and len(set(tokens)) > 2, tokens
    for name in methods:
        assert list(outputs[name]) == list(tokens), name


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
    """{method: (tokens/s, ms/token, MB/token or None, % of read or None)} of bench.py decode's table;
    a row's % of the machine's read speed is its bytes per token times its rate over that speed."""
    read = float(re.search(r"^  memory read: ([0-9.]+) GB/s", out, re.M).group(1)) * 1e9
    rows = re.findall(r"^  (\S+) +([0-9.]+) tokens/s  \(([0-9.]+) ms/token\)(?: +([0-9.]+) MB/token +([0-9.]+)% of read)?$",
                      out, re.M)
    table = {name: (float(rate), float(ms), float(mb) if mb else None, float(share) if share else None)
             for name, rate, ms, mb, share in rows}
    assert len(table) == len(rows), out
    for name, (rate, ms, mb, share) in table.items():
        assert_positive(rate, ms)
        assert_rounds(ms, 0.01, 1000 / (rate + 0.05), 1000 / (rate - 0.05))  # 1000 / tokens/s
        if mb is not None:
            assert_rounds(share, 0.1, 100 * (mb - 5e-4) * 1e6 * (rate - 0.05) / (read + 5e7),
                          100 * (mb + 5e-4) * 1e6 * (rate + 0.05) / (read - 5e7))
    return table


def speedup(out, label):
    return float(re.search(rf"{re.escape(label)}:? +([0-9.]+)x", out).group(1))


FORMATS = {"fp32", "bf16", "fp16", "int8", "int4"}


def fp32_bytes_per_token(c):
    """fp32 bytes of every weight a token reads, counted from the shape: the tied embedding/head, and
    per block two LayerNorms and the four Linears with their biases; ln_f."""
    C = c.n_embd
    return 4 * (c.vocab_size * C + c.n_layer * (12 * C * C + 13 * C) + 2 * C)


def assert_kernel_rows(out, formats):
    """One kernel row per format whose GB/s is its MB over its time and whose % is that over the read speed."""
    read = float(re.search(r"^  memory read: ([0-9.]+) GB/s", out, re.M).group(1))
    rows = re.findall(r"^  kernel (\S+) +([0-9.]+) ms +([0-9.]+) MB +([0-9.]+) GB/s +([0-9.]+)% of read$", out, re.M)
    assert {row[0] for row in rows} == formats, out
    for _, ms, mb, gbs, share in rows:
        ms, mb, gbs, share = map(float, (ms, mb, gbs, share))
        assert_positive(ms, mb, gbs)
        assert_rounds(gbs, 0.01, (mb - 5e-4) / (ms + 5e-4), (mb + 5e-4) / (ms - 5e-4))
        assert_rounds(share, 0.1, 100 * (gbs - 0.005) / (read + 0.05), 100 * (gbs + 0.005) / (read - 0.05))


def auto_choice(out):
    """The format auto picks, from its line: one of the formats it chooses among."""
    import engine

    choice = re.search(r"^  memory read: .*; auto picks (\w+) \(auto: the fastest here", out, re.M).group(1)
    assert choice in engine.AUTO_CANDIDATES
    return choice


def test_decode_rows_and_their_agreement(monkeypatch, capsys, decoded):
    """Every weight format has its row (tokens/s, bytes read per token and that as a share of the
    measured read speed), as do recompute and Hugging Face's generate; the speed-ups are the ratios
    of the rates; fp32's bytes per token are its weights' count times 4; the fp32 methods give the
    same greedy tokens, on a model whose greedy tokens vary; and each format's kernels alone have a
    row."""
    require("transformers", reason="transformers is not installed (test-only dependency)")
    out = bench_output(monkeypatch, capsys, *TINY_DECODE, "--no_exports")
    assert "8 new tokens (greedy), median of 1 interleaved rounds; " in out.splitlines()[0]
    table = decode_rows(out)
    rates = {name: row[0] for name, row in table.items()}
    assert rates.keys() == FORMATS | {"recompute", "hf-generate"}
    assert all(table[fmt][2] is not None for fmt in FORMATS)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=32)
    assert_rounds(table["fp32"][2], 0.001, fp32_bytes_per_token(config) / 1e6, fp32_bytes_per_token(config) / 1e6)
    assert table["int4"][2] < table["int8"][2] < table["bf16"][2] == table["fp16"][2] < table["fp32"][2]
    assert_ratio(speedup(out, "fp32 vs recompute"), rates["fp32"], rates["recompute"], 0.1, 0.1)
    assert_ratio(speedup(out, "fp32 vs hf-generate"), rates["fp32"], rates["hf-generate"], 0.1, 0.1)
    auto_choice(out)
    assert "  same tokens from every fp32 method: yes" in out.splitlines()
    assert_same_varied_tokens(decoded, ["recompute", "hf-generate"])
    for fmt in FORMATS - {"fp32"}:
        assert re.search(rf"^  {fmt}: the first \d of 8 tokens are fp32's$", out, re.M)
    assert_kernel_rows(out, FORMATS)


def test_decode_rows_of_the_exports(monkeypatch, capsys, decoded):
    """export.py's ONNX graph (onnxruntime) and GGUF files (llama.cpp f32, f16, q8_0, q4_0) of the
    same weights get their rows; each of our formats and auto's choice its ratio to its llama.cpp
    counterpart; llama.cpp's f32 file holds the bytes per token of our fp32 weights; onnxruntime and
    llama.cpp's f32 give our fp32 greedy tokens."""
    for package in ("onnxruntime", "onnxscript", "gguf", "llama_cpp"):
        require(package, reason=f"{package} is not installed (pip install -r requirements-dev.txt)")
    out = bench_output(monkeypatch, capsys, *TINY_DECODE, "--no_hf", "--no_recompute")
    table = decode_rows(out)
    rates = {name: row[0] for name, row in table.items()}
    exports = {"onnxruntime", "llama.cpp-f32", "llama.cpp-f16", "llama.cpp-q8_0", "llama.cpp-q4_0"}
    assert rates.keys() == FORMATS | exports
    assert table["llama.cpp-f32"][2] == table["fp32"][2]
    assert table["llama.cpp-q4_0"][2] < table["llama.cpp-q8_0"][2] < table["llama.cpp-f16"][2] < table["llama.cpp-f32"][2]
    counterparts = {"fp32": "llama.cpp-f32", "bf16": "llama.cpp-f16", "fp16": "llama.cpp-f16",
                    "int8": "llama.cpp-q8_0", "int4": "llama.cpp-q4_0"}
    for fmt, theirs in counterparts.items():
        assert_ratio(speedup(out, f"{fmt} vs {theirs}"), rates[fmt], rates[theirs], 0.1, 0.1)
    assert_ratio(speedup(out, "auto vs llama.cpp-q8_0"), rates[auto_choice(out)], rates["llama.cpp-q8_0"], 0.1, 0.1)
    assert_ratio(speedup(out, "fp32 vs onnxruntime"), rates["fp32"], rates["onnxruntime"], 0.1, 0.1)
    assert "  same tokens from every fp32 method: yes" in out.splitlines()
    assert_same_varied_tokens(decoded, ["onnxruntime", "llama.cpp-f32"])
    for name in ("llama.cpp-f16", "llama.cpp-q8_0", "llama.cpp-q4_0"):
        assert re.search(rf"^  {re.escape(name)}: the first \d+ of 8 tokens are fp32's$", out, re.M)


def test_decode_compile_adds_a_compiled_row_per_format(monkeypatch, capsys, decoded, compiled_steps):
    """--compile times each --weights format again with its decode steps compiled: a row of its own
    with the format's bytes per token and, in fp32, the eager greedy tokens (on a model whose greedy
    tokens vary), decoded through engine.compiled_decode_rows."""
    out = bench_output(monkeypatch, capsys, *TINY_DECODE, "--weights", "fp32", "--compile", "--no_hf",
                       "--no_recompute", "--no_exports")
    assert len(compiled_steps) == 2 * (8 - 1)  # the untimed round and the timed one, after each prompt
    table = decode_rows(out)
    assert table.keys() == {"fp32", "fp32-compiled", auto_choice(out)}
    assert table["fp32-compiled"][2] == table["fp32"][2]
    assert "  same tokens from every fp32 method: yes" in out.splitlines()
    assert_same_varied_tokens(decoded, ["fp32-compiled"])


def test_decode_past_block_size_skips_only_hugging_face(monkeypatch, capsys, decoded):
    """Our decoders crop the context to block_size, in every weight format, so any length works, and
    fp32 and recompute still agree (on a model whose greedy tokens vary); HF's GPT-2 cannot go past
    n_positions, so it is skipped with the reason instead of crashing, as are the exports."""
    out = bench_output(monkeypatch, capsys, *TINY_DECODE, "--prompt_tokens", 40)
    rates = {name: row[0] for name, row in decode_rows(out).items()}
    assert rates.keys() == FORMATS | {"recompute"}
    assert_ratio(speedup(out, "fp32 vs recompute"), rates["fp32"], rates["recompute"], 0.1, 0.1)
    assert "  hf-generate: skipped (the context passes block_size, and HF's GPT-2 cannot slide its window)" in out
    assert "  exports: skipped (the context passes block_size, and the exported graphs do not slide it)" in out
    assert "  same tokens from every fp32 method: yes" in out.splitlines()
    assert_same_varied_tokens(decoded, ["recompute"])


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


TRAIN_VARIANTS = ("nanoGPT", "fp32", "bf16", "fp32+compile", "bf16+compile", "fp32+muon", "bf16+muon")


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
    muon_dtypes, muon_step = [], optim.Muon.step
    monkeypatch.setattr(optim.Muon, "step", lambda self: muon_dtypes.append(self.ns_dtype) or muon_step(self))
    out = bench_output(monkeypatch, capsys, "train", "--shapes", "tiny", "--steps", 1, "--repeats", 1)
    assert muon_dtypes == [torch.float32, torch.bfloat16] * 2  # the muon rows step Muon: a warm-up and a timed round
    assert "torch.compile failed" not in out
    assert "  measured matmul peak: float32 1 GFLOP/s, bfloat16 2 GFLOP/s" in out.splitlines()
    rows = re.findall(r"^    (\S+) +(adamw|muon) +([0-9.]+) ms/iter +([0-9,]+) tok/s +MFU +([0-9.]+)% of (\w+) peak +"
                      r"([0-9.]+)x nanoGPT$", out, re.M)
    assert [row[0] for row in rows] == list(TRAIN_VARIANTS), out
    assert [row[1] for row in rows] == ["muon" if name.endswith("+muon") else "adamw" for name in TRAIN_VARIANTS]
    rows = [(name, *rest) for name, _, *rest in rows]
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


def test_optim_trains_both_optimizers_and_reports_where_each_reaches_adamws_final_loss(
        monkeypatch, capsys, char_data, tmp_path):
    """`bench.py optim` runs train.py with AdamW and with Muon for the same steps and prints a row
    each: the final val losses are the runs' own metrics, AdamW reaches its final loss at its last
    step, and the steps and seconds to it are where the curve crosses it, drawn into the PNG."""
    require("matplotlib")
    shape = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, learning_rate=3e-3, min_lr=3e-4,
                 beta2=0.99, warmup_iters=2, steps=12)
    monkeypatch.setitem(bench.OPTIM_SHAPES, "tiny", shape)
    runs = {}
    training_run = bench.training_run

    def kept(settings, *args, **kwargs):
        records, error = training_run(settings, *args, **kwargs)
        runs[settings["optimizer"]] = records
        return records, error

    monkeypatch.setattr(bench, "training_run", kept)
    png = tmp_path / "optim.png"
    out = bench_output(monkeypatch, capsys, "optim", "--shapes", "tiny", "--dataset", char_data, "--evals", 4,
                       "--dtype", "float32", "--plot", png)
    rows = re.findall(r"^    (adamw|muon) +([0-9.]+) +([0-9.]+) +(?:([0-9,]+) +([0-9.]+)|not reached +-)$", out, re.M)
    assert [row[0] for row in rows] == ["adamw", "muon"], out
    for optimizer, ms, final, steps, seconds in rows:
        curve = bench.optim_curve(runs[optimizer])
        assert [it for it, _, _ in curve] == [0, 3, 6, 9, 12]
        assert float(final) == pytest.approx(curve[-1][2], abs=5e-5)
        assert_positive(float(ms))
        if optimizer == "adamw":
            assert (int(steps), float(seconds)) == (12, pytest.approx(curve[-1][1], abs=0.05))
    assert png.stat().st_size > 0


def test_crossing_interpolates_between_the_evaluations_around_the_target():
    """The first evaluation at or below the target, interpolated linearly from the one before it."""
    evals = [(0, 0.0, 4.0), (10, 1.0, 3.0), (20, 2.0, 2.0), (30, 3.0, 2.5), (40, 4.0, 1.0)]
    assert bench.crossing(evals, 2.5) == (15, 1.5)
    assert bench.crossing(evals, 2.0) == (20, 2.0)
    assert bench.crossing(evals, 1.5) == (pytest.approx(36.6667, abs=1e-3), pytest.approx(3.66667, abs=1e-4))
    assert bench.crossing(evals, 0.5) is None


def test_serve_smoke(monkeypatch, capsys):
    """The serving benchmark starts serve.py, streams from 1 and 2 concurrent clients (a burst,
    then spread arrivals), then 2 clients on --max_batch 1, and prints one row each: total
    tokens/s, its ratio to one client's, first-token and per-token latencies (p50, p99)."""
    out = bench_output(monkeypatch, capsys, "serve", "--shapes", "tiny", "--clients", 1, 2, "--new_tokens", 4,
                       "--repeats", 1, "--spread_s", 0.1)
    rows = re.findall(r"^ +--max_batch (\d+) +(\d+) +(burst|spread) +([0-9,.]+) +([0-9.]+)x +([0-9,]+) ms +([0-9,]+) ms "
                      r"+([0-9,.]+) ms +([0-9,.]+) ms$", out, re.M)
    assert [row[:3] for row in rows] == [("16", "1", "burst"), ("16", "2", "burst"), ("16", "1", "spread"),
                                         ("16", "2", "spread"), ("1", "2", "burst")], out
    for _, _, _, total, ratio, *latencies in rows:
        assert_positive(number(total), number(ratio))
        assert all(0 <= number(latency) < math.inf for latency in latencies)  # < 0.5 ms prints 0
        assert number(latencies[0]) <= number(latencies[1]) and number(latencies[2]) <= number(latencies[3])


# ----------------------------------------------------------------------------------------------
# memory

LOSS_SCALARS = 4 + 8  # cross-entropy's total weight (fp32) and the count of targets (int64): left out of the plan


def measured_saved_bytes(model, idx, targets):
    """Bytes that autograd saves for the backward of model(idx, targets), as packed by
    saved_tensors_hooks: each storage once (q, k and v are views of one tensor, attention's
    output is c_proj's input), the parameters' storages left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, targets)
    return sum(storages.values())


@pytest.mark.parametrize("grad_checkpoint", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("n_layer, n_head, n_embd, B, T", [(1, 2, 32, 3, 12), (2, 4, 64, 2, 8)])
def test_planned_activations_are_the_bytes_autograd_saves(n_layer, n_head, n_embd, B, T, dropout, grad_checkpoint):
    """The planner's activation bytes are what autograd saves, counted on a CPU in fp32: exactly,
    but for the loss's two scalars. Without checkpointing that checks every Block's items (fused
    attention at dropout 0, SDPA's math path with it) and the head's; with it, each Block's input.
    T differs from the head size, so a (T, T) term cannot pass for a (T, hs) one."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=T, vocab_size=40, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout)
    model = GPT(config)
    model.grad_checkpoint = grad_checkpoint
    idx, targets = torch.randint(0, 40, (B, T)), torch.randint(0, 40, (B, T))  # two storages, as a batch has
    planned = bench.saved_activation_bytes(config, B, T, "float32", "cpu", grad_checkpoint)
    assert measured_saved_bytes(model, idx, targets) == planned + LOSS_SCALARS


def test_planned_bf16_activations_are_what_cpu_autocast_saves():
    """The plan's bf16 rules (the GPU's) are what bf16 autocast saves on a CPU at T > 128, where
    attention runs in bf16 too (gpt.attention): the same fp32 LayerNorm inputs, bf16 matmul inputs,
    fp32 log-probs; beside them autocast's bf16 copy of every Linear weight (the biases' copies
    are not saved), and the loss's two scalars. Dropout is 0: a CPU keeps its masks in bf16."""
    torch.manual_seed(0)
    B, T = 2, 160
    config = GPTConfig(block_size=T, vocab_size=40, n_layer=2, n_head=2, n_embd=64)
    model = GPT(config)
    idx, targets = torch.randint(0, 40, (B, T)), torch.randint(0, 40, (B, T))  # two storages, as a batch has
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = measured_saved_bytes(model, idx, targets)
    weight_copies = 2 * sum({id(m.weight): m.weight.numel() for m in model.modules()
                             if isinstance(m, torch.nn.Linear)}.values())
    planned = bench.saved_activation_bytes(config, B, T, "bfloat16", "cuda")
    assert measured == planned + weight_copies + LOSS_SCALARS


@pytest.mark.parametrize("bias", [True, False])
def test_planned_parameter_counts_are_the_models(bias):
    """The planner's parameter arithmetic counts what GPT builds: all, the root's (embeddings and
    ln_f), one Block's, and the Linears' with the tied embedding once."""
    config = GPTConfig(block_size=24, vocab_size=50, n_layer=3, n_head=2, n_embd=16, bias=bias)
    with torch.device("meta"):
        model = GPT(config)
    blocks = model.transformer.h
    linear = {id(p): p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
    total = model.num_params(non_embedding=False)
    assert bench.param_counts(config) == (total, total - sum(p.numel() for p in blocks.parameters()),
                                          sum(p.numel() for p in blocks[0].parameters()), sum(linear.values()))


def memory_rows(out):
    """{(size, strategy): (params, grads, AdamW, in-flight, activations, total, max micro-batch)}."""
    rows, size = {}, None
    for line in out.splitlines():
        if m := re.match(r"^  GPT-2 (\S+) \(", line):
            size = m.group(1)
        elif m := re.match(r"^    (\S+(?: \+ ckpt)?) +((?:[0-9.]+ +){6})(\d+)$", line):
            rows[size, m.group(1)] = (*map(float, m.group(2).split()), int(m.group(3)))
    return rows


def test_memory_table_adds_up_and_its_micro_batch_is_the_largest_that_fits(monkeypatch, capsys):
    """Every size and strategy has its row; the total is the sum of its parts (each rounded to
    0.01) and the plan of the micro-batch asked for; parameters are 4 bytes, gradients 4 (and DDP's
    bucket copy), AdamW's moments 8, FSDP dividing all three by the GPUs; checkpointing never costs
    more; the max micro-batch fits 90% of the GPU's memory, and one more sequence would not."""
    out = bench_output(monkeypatch, capsys, "memory", "--gpus", 4, "--gpu_memory_gb", 40, "--batch_size", 2)
    rows = memory_rows(out)
    assert set(rows) == {(size, s) for size in bench.GPT2_SIZES for s in bench.STRATEGIES}, out
    for (size, strategy), (params, grads, adamw, in_flight, activations, total, fits) in rows.items():
        assert_rounds(total, 0.01, params + grads + adamw + in_flight + activations - 0.025,
                      params + grads + adamw + in_flight + activations + 0.025)
        n_layer, n_head, n_embd = bench.GPT2_SIZES[size]
        config = GPTConfig(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        with torch.device("meta"):
            P = GPT(config).num_params(non_embedding=False) / 1e9
        fsdp, ckpt = bench.STRATEGIES[strategy]
        shards = 4 if fsdp else 1
        for printed, bytes_per_param in ((params, 4), (grads, 4 if fsdp else 8), (adamw, 8)):
            assert_rounds(printed, 0.01, bytes_per_param * P / shards, bytes_per_param * P / shards)
        plan = lambda B: bench.memory_plan(config, B, 1024, "bfloat16", 4, fsdp, ckpt)["total"]
        assert_rounds(total, 0.01, plan(2) / 1e9, plan(2) / 1e9)
        assert plan(fits) <= 0.9 * 40e9 < plan(fits + 1)
    for size in bench.GPT2_SIZES:
        assert rows[size, "DDP + ckpt"][5] <= rows[size, "DDP"][5]
        assert rows[size, "FSDP + ckpt"][5] <= rows[size, "FSDP"][5]


# ----------------------------------------------------------------------------------------------
# gpu

TINY_MODEL = dict(n_layer=1, n_head=2, n_embd=32, block_size=16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_gpu_without_cuda_is_one_line():
    assert_one_line_error(run_script("bench.py", "gpu"), "needs a CUDA GPU")


def test_training_row_fails_on_an_error_a_nonfinite_loss_or_one_that_does_not_fall():
    """A row is "ok" only for a run that ended well, logged finite losses and evaluated twice,
    with both the training and validation loss lower at the end; a run that wrote nothing still
    gets a row, blank where it has no figures."""
    def records(losses, val_losses):
        logs = [dict(iter=5 * (i + 1), loss=loss, ms_per_iter=10.0, tokens_per_s=100.0, peak_mem_mb=1.0)
                for i, loss in enumerate(losses)]
        return [dict(iter=0, val_loss=val_losses[0], peak_mem_mb=1.0), *logs,
                dict(iter=5 * len(losses), val_loss=val_losses[1], peak_mem_mb=1.0)]

    def result(records, error=None):
        return bench.training_row("run", records, error, 1e6, 1e9, 1e9)["result"]
    assert result(records([3.0, 2.0], [3.0, 2.5])) == "ok"
    assert result(records([3.0, 2.0], [3.0, 2.5]), "error: out of memory") == "FAIL: error: out of memory"
    assert result(records([3.0, math.nan], [3.0, 2.5])) == "FAIL: a loss is not finite"
    assert result(records([3.0, 2.0], [3.0, math.inf])) == "FAIL: a loss is not finite"
    assert result(records([3.0, 3.0], [3.0, 2.5])).startswith("FAIL: the loss did not fall")
    assert result(records([3.0, 2.0], [3.0, 3.5])).startswith("FAIL: the loss did not fall")
    assert result(records([3.0], [3.0, 2.5])).startswith("FAIL: 1 log lines and 2 evaluations")
    empty = bench.training_row("crashed", [], "error: boom", 1e6, 1e9, 1e9)
    header, line = bench.gpu_table([empty])
    assert line.split() == ["crashed", "1.0", "FAIL:", "error:", "boom"]  # only the planned GB besides


def test_gpu_decode_rows_agree_with_recompute(decoded):
    """The decoding check's KV cache gives recomputing's greedy tokens (fp32, on a CPU here; past
    block_size, on a model whose greedy tokens vary), its row says so, and each row's ms per
    token is its rate's inverse."""
    torch.manual_seed(0)
    model = varied_gpt(GPTConfig(vocab_size=64, **TINY_MODEL)).eval()
    rows = bench.gpu_decode_rows(model, new_tokens=8, repeats=1)
    assert [row["run"] for row in rows] == ["decode fp32, KV cache", "decode fp32, recompute", "decode bf16, KV cache"]
    assert rows[0]["result"] == "ok: = recompute"
    assert_same_varied_tokens(decoded, ["decode fp32, recompute"], reference="decode fp32, KV cache")
    for row in rows:
        assert row["ms"] == pytest.approx(1000 / row["tokens_per_s"], rel=1e-9)
