"""Looking inside a model: attention maps (sample.py --attention), the learning-rate range test
(train.py --lr_find), and what a run shows as it goes (samples at evaluations, peak memory).

Models are tiny and char-level; the pictures are rendered and read back as pixels.
"""
import argparse
import ast
import json
import math
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import common
import gpt
import sample
import train
from common import UserError
from conftest import ROOT, assert_one_line_error, require, run_in_process
from gpt import GPT, GPTConfig
from tokenizer import load_tokenizer

# A 2-layer, 2-head model on 32-character windows, in fp32 on the CPU.
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--eval_iters=4",
        "--device=cpu", "--dtype=float32"]


@pytest.fixture(scope="session")
def tokenizer(char_data):
    return load_tokenizer(char_data)


def tiny_gpt(vocab_size, seed=0, block_size=32, n_layer=2, n_head=2, n_embd=32):
    torch.manual_seed(seed)
    config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    return GPT(config).eval()


def sharpen(model, factor=8.0):
    """Scale q and k up so that attention is peaked, not near uniform as at initialisation: a wrong
    scale or mask in the recomputed weights then shows."""
    with torch.no_grad():
        for block in model.transformer.h:
            C = model.config.n_embd
            block.attn.c_attn.weight[:2 * C].mul_(factor)
    return model


@pytest.fixture(scope="session")
def ckpt(tokenizer, tmp_path_factory):
    model = sharpen(tiny_gpt(tokenizer.vocab_size))
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    gpt.save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config),
                             tokenizer=tokenizer.to_dict(), config={}, iter_num=0, best_val_loss=float("inf")), path)
    return path


def load_model(path):
    return gpt.model_from_checkpoint(gpt.load_checkpoint(path)).eval()


def attention_args(**given):
    return argparse.Namespace(**{"plot": None, "layer": None, "head": None} | given)


def attention_rows(block):
    """The rows of one layer-and-head block of --attention's text: (i, token, j, attended, weight)."""
    rows = []
    for line in block.splitlines()[1:]:
        i, token, j, attended, weight = re.match(r"\s*(\d+) (.+?)\s+->\s+(\d+) (.+?)\s+([0-9.]+)$", line).groups()
        rows.append((int(i), ast.literal_eval(token), int(j), ast.literal_eval(attended), float(weight)))
    return rows


def read_png(path):
    """(height, width, the share of its pixels that are coloured, not white/grey/black)."""
    image = require("matplotlib.image").imread(path)  # (H, W, 3 or 4) floats in [0, 1]
    rgb = image[..., :3]
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.15
    return image.shape[0], image.shape[1], float(coloured.mean()), float(rgb.var())


# --- attention weights ------------------------------------------------------------------------

def test_attention_weights_times_v_is_the_layers_sdpa_output():
    """attention_weights recomputes softmax(q kᵀ/√hs + causal mask) from the model's own q and k:
    weights @ v must be what SDPA gave the layer, in fp32 to ~1e-6; rows are distributions over
    the past only; the model keeps no hook and its mode."""
    model = sharpen(tiny_gpt(vocab_size=50, n_layer=3, n_head=4, n_embd=64))
    idx = torch.randint(50, (1, 24), generator=torch.Generator().manual_seed(0))
    qkv, sdpa = [], []  # each layer's c_attn output, and SDPA's output (c_proj's input)
    hooks = [b.attn.c_attn.register_forward_hook(lambda m, args, out: qkv.append(out)) for b in model.transformer.h]
    hooks += [b.attn.c_proj.register_forward_pre_hook(lambda m, args: sdpa.append(args[0]))
              for b in model.transformer.h]
    with torch.no_grad():
        model(idx)
    for hook in hooks:
        hook.remove()
    model.train()
    weights = gpt.attention_weights(model, idx)
    assert model.training and not any(b.attn.c_attn._forward_hooks for b in model.transformer.h)
    assert weights.shape == (3, 4, 24, 24) and weights.dtype == torch.float32
    assert torch.allclose(weights.sum(-1), torch.ones(3, 4, 24))
    assert (weights.triu(diagonal=1) == 0).all()  # no token sees the future
    assert weights[:, :, 4:].max(-1).values.mean() > 0.25  # peaked (uniform: < 0.1): a wrong scale shows
    for layer in range(3):
        _, _, v = gpt.split_heads(qkv[layer], 4)  # (1, nh, T, hs)
        y = (weights[layer][None] @ v).transpose(1, 2).reshape(1, 24, 64)
        torch.testing.assert_close(y, sdpa[layer], atol=2e-6, rtol=1e-5)


# --- sample.py --attention ----------------------------------------------------------------------

def test_attention_text_names_the_token_each_token_attends_to_most(ckpt, tokenizer):
    """Without --plot, every layer and head lists, for each token after the first, the token it
    attends to most (itself or an earlier one) and that weight: the argmax of attention_weights."""
    text = "ROMEO: hi"
    result = run_in_process(sample.main, "--ckpt", ckpt, "--attention", text)
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.split("\n\n")[1:]
    ids = tokenizer.encode(text)
    weights = gpt.attention_weights(load_model(ckpt), torch.tensor([ids]))
    assert [block.splitlines()[0] for block in blocks] == [f"layer {l} head {h}" for l in range(2) for h in range(2)]
    for block, head_weights in zip(blocks, weights.flatten(0, 1)):
        rows = attention_rows(block)
        assert [row[0] for row in rows] == list(range(1, len(ids)))
        for i, token, j, attended, weight in rows:
            assert token == text[i] and attended == text[j]
            assert j == head_weights[i].argmax().item() and j <= i
            assert weight == pytest.approx(head_weights[i, j].item(), abs=1e-3)


def test_attention_keeps_the_end_of_a_text_longer_than_block_size(ckpt, tokenizer, capsys):
    """A text longer than block_size keeps its last block_size tokens, with a notice, as elsewhere."""
    text = "First Citizen:\nBefore we proceed any further"  # 44 characters, block_size 32
    sample.show_attention(load_model(ckpt), tokenizer, tokenizer.encode(text), attention_args(layer=1, head=0))
    out, err = capsys.readouterr()
    assert "keeping its last 32" in err
    rows = attention_rows(out.split("\n\n")[1])
    assert [row[1] for row in rows] == list(text[-31:])


def test_attention_shows_a_token_that_splits_a_character_as_its_bytes(shared_dir, capsys):
    """BPE tokens are labelled with their text, and a piece of a UTF-8 character with its bytes,
    as --analyze shows it (an emoji is three GPT-2 tokens, and so is a Hangul syllable)."""
    tok = load_tokenizer("gpt2")
    model = tiny_gpt(vocab_size=50304, n_layer=1, n_head=1, n_embd=8)
    text = "\U0001F389 ok 한"
    ids = tok.encode(text)
    sample.show_attention(model, tok, ids, attention_args())
    out = capsys.readouterr().out
    assert "\ufffd" not in out
    shown = [ast.literal_eval(sample.token_text(tok, i)) for i in ids]
    assert [row[1] for row in attention_rows(out.split("\n\n")[1])] == shown[1:]
    assert bytes in {type(s) for s in shown}
    assert b"".join(s if isinstance(s, bytes) else s.encode() for s in shown) == text.encode()


@pytest.mark.parametrize("argv, needle", [
    (["--attention", "hi", "--temperature=0.5"], "--temperature does not apply to --attention"),
    (["--attention", "hi", "--num_samples=2"], "--num_samples does not apply to --attention"),
    (["--start", "hi", "--plot", "a.png"], "--plot does not apply to plain generation"),
    (["--analyze", "hi", "--layer=0"], "--layer does not apply to --analyze"),
    (["--chat", "--head=1"], "--head does not apply to --chat"),
    (["--attention", "hi", "--head=-1"], "head must be an integer >= 0"),
])
def test_flags_that_do_not_apply_to_attention_maps_are_errors(argv, needle):
    """A flag of another mode is an error with --attention, and --plot/--layer/--head elsewhere."""
    with pytest.raises(UserError, match=re.escape(needle)):
        sample.parse_args(argv)


@pytest.mark.parametrize("argv, needle", [
    (["--layer=2"], "--layer 2 does not exist: this model has 2 layers"),
    (["--head=5"], "--head 5 does not exist: this model has 2 heads"),
])
def test_a_layer_or_head_the_model_lacks_is_one_line(ckpt, argv, needle):
    """--layer and --head count from 0 below the model's n_layer and n_head; beyond is one line."""
    assert_one_line_error(run_in_process(sample.main, "--ckpt", ckpt, "--attention", "hi", *argv), needle)


def test_attention_of_no_text_is_one_line(ckpt):
    """There are no maps of no tokens: an empty --attention is one error line."""
    assert_one_line_error(run_in_process(sample.main, "--ckpt", ckpt, "--attention", ""), "--attention needs some text")


def test_attention_plot_without_matplotlib_names_the_install_command(monkeypatch, tmp_path):
    """--plot stops before any work with one line naming `pip install matplotlib`; the text
    output needs no matplotlib."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    model = tiny_gpt(vocab_size=10)
    with pytest.raises(UserError, match=re.escape("pip install matplotlib")):
        sample.check_attention_args(model, attention_args(plot=str(tmp_path / "a.png")), [1, 2])
    sample.check_attention_args(model, attention_args(), [1, 2])


def test_attention_maps_are_drawn_as_a_grid_and_as_one_large_map(ckpt, tmp_path):
    """--plot draws one heatmap per layer x head, labelled with the tokens; --layer and --head
    draw one map, larger. Both images are real pictures: sized, and coloured by the maps."""
    require("matplotlib")
    text = "To be, or not to be"
    grid, one = tmp_path / "grid.png", tmp_path / "one.png"
    for args in (["--plot", grid], ["--plot", one, "--layer", "1", "--head", "0"]):
        result = run_in_process(sample.main, "--ckpt", ckpt, "--attention", text, *args)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "" and f"wrote {args[1]}" in result.stderr
    grid_h, grid_w, grid_coloured, grid_var = read_png(grid)
    one_h, one_w, one_coloured, one_var = read_png(one)
    assert grid_h > 600 and grid_w > 600 and one_h > 300 and one_w > 300
    assert grid_var > 0 and one_var > 0
    assert grid_coloured > 0.1 and one_coloured > 0.1  # the heatmaps, not only axes on white
    assert one_w < grid_w  # one map, not four


def test_korean_tokens_are_drawn_with_a_hangul_font_or_one_line_says_there_is_none(tmp_path, monkeypatch, capsys):
    """Hangul labels are drawn in an installed font that has Hangul (never matplotlib's Last Resort,
    which has a box for every character); without one, one line on stderr says so."""
    require("matplotlib")
    labels = [repr(c) for c in "한국어 모델"]
    weights = torch.rand(1, 1, len(labels), len(labels)).tril().softmax(-1)
    installed = sample.font_with_hangul()
    assert installed is None or not installed.startswith("Last Resort")
    sample.plot_attention(weights, labels, [0], [0], tmp_path / "ko.png")
    err = capsys.readouterr().err
    if installed is None:
        assert err.count("\n") == 1 and "no installed font has Hangul" in err
    else:
        assert err == ""
    assert read_png(tmp_path / "ko.png")[2] > 0.1
    monkeypatch.setattr(sample, "font_with_hangul", lambda: "DejaVu Sans")  # as if one were installed
    sample.plot_attention(weights, labels, [0], [0], tmp_path / "ko2.png")
    assert capsys.readouterr().err == ""
    sample.plot_attention(weights, [repr(c) for c in "hello!"], [0], [0], tmp_path / "en.png")
    assert capsys.readouterr().err == ""  # no Hangul, no notice


def test_a_plot_that_cannot_be_written_is_one_line(ckpt, tmp_path):
    """An image path in a missing folder is an error naming the path, not a traceback."""
    require("matplotlib")
    result = run_in_process(sample.main, "--ckpt", ckpt, "--attention", "hi", "--plot", tmp_path / "no" / "a.png")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot write {tmp_path / 'no' / 'a.png'}")


# --- train.py --lr_find -------------------------------------------------------------------------

def suggested_lr(stdout):
    return float(re.search(r"suggested learning_rate: ([0-9.e+-]+)", stdout).group(1))


def final_val_loss(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if "val_loss" in r][-1]


@pytest.mark.slow
def test_lr_find_suggests_a_rate_that_trains_better_than_30x_lower_or_higher(char_data, tmp_path):
    """The range test's suggestion is a good learning rate: a short run at it ends at a lower val
    loss than runs at 1/30 and 30 times it (same seed, data order and steps, fp32). It draws the
    loss against the LR into out_dir/lr_find.png."""
    result = run_in_process(train.main, *TINY, f"--dataset={char_data}", f"--out_dir={tmp_path / 'find'}", "--lr_find")
    assert result.returncode == 0, result.stderr[-3000:]
    lr = suggested_lr(result.stdout)
    assert "for reference, the minimum-loss lr / 10" in result.stdout
    assert 1e-7 < lr < 1
    assert sorted(p.name for p in (tmp_path / "find").iterdir()) == ["lr_find.png"]  # no run written
    h, w, coloured, var = read_png(tmp_path / "find" / "lr_find.png")
    assert h > 300 and w > 500 and var > 0 and coloured > 0.002  # the curve and the marks
    finals = {}
    for factor in (1 / 30, 1, 30):
        out = tmp_path / f"x{factor:g}"
        run = run_in_process(train.main, *TINY, f"--dataset={char_data}", f"--out_dir={out}", "--decay_lr=False",
                         f"--learning_rate={lr * factor}", "--max_iters=150", "--eval_interval=150", "--eval_iters=20")
        assert run.returncode == 0, run.stderr[-3000:]
        finals[factor] = final_val_loss(out)
    assert finals[1] < finals[1 / 30] and finals[1] < finals[30], finals


def test_lr_find_leaves_a_run_in_out_dir_as_it_is(char_data, tmp_path):
    """--lr_find in the out_dir of a run writes only lr_find.png: ckpt.pt, best.pt, metrics.jsonl
    and config.json keep their bytes."""
    out = tmp_path / "out"
    result = run_in_process(train.main, *TINY, f"--dataset={char_data}", f"--out_dir={out}", "--max_iters=2")
    assert result.returncode == 0, result.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "ckpt.pt" in before
    result = run_in_process(train.main, *TINY, f"--dataset={char_data}", f"--out_dir={out}", "--lr_find",
                        "--lr_find_iters=10")
    assert result.returncode == 0, result.stderr[-3000:]
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() - before.keys() <= {"lr_find.png"}
    assert {name: after[name] for name in before} == before


@pytest.mark.slow
def test_lr_find_under_torchrun_matches_one_process(char_data, tmp_path):
    """2 gloo ranks share the batch stream as in training: the range test's losses and suggestion
    are those of 1 process with the same global batch, printed once. (Past lr ~0.1 this tiny
    model's training is chaotic: there rounding differences grow, so the curves are compared below.)"""
    settings = [*TINY, f"--dataset={char_data}", "--lr_find", "--lr_find_iters=40", "--gradient_accumulation_steps=2"]
    one = run_in_process(train.main, *settings, f"--out_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train.py"), *settings, f"--out_dir={tmp_path / 'two'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("suggested learning_rate") == 1  # rank 0 prints
    curve = lambda out: {float(lr): float(loss)
                         for lr, loss in re.findall(r"lr ([0-9.e+-]+), smoothed loss ([0-9.]+)", out)}
    below = {lr: loss for lr, loss in curve(one.stdout).items() if lr < 0.1}
    assert len(below) >= 8 and {lr: curve(two.stdout)[lr] for lr in below} == pytest.approx(below, abs=2e-4)
    step = math.log(1e7) / 39  # one step of the LR grid, in log units
    assert abs(math.log(suggested_lr(two.stdout) / suggested_lr(one.stdout))) <= 1.01 * step
    assert (tmp_path / "two" / "lr_find.png").is_file()


@pytest.mark.parametrize("argv, needle", [
    (["--lr_find", "--init_from=resume"], "--lr_find starts from a run's initial weights"),
    (["--lr_find_min=0.1", "--lr_find_max=0.01"], "0 < lr_find_min < lr_find_max"),
    (["--lr_find_iters=1"], "lr_find_iters must be >= 2"),
])
def test_lr_find_settings_that_make_no_sense_are_errors(argv, needle):
    """The range test starts no resume and needs a rising range of at least two steps."""
    with pytest.raises(UserError, match=re.escape(needle)):
        train.load_config(argv)


# --- samples at evaluations, peak memory --------------------------------------------------------

def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_samples_at_evaluations_leave_the_training_exactly_as_without(char_data, tmp_path):
    """eval_sample_tokens draws from a generator of its own with dropout off: a run with samples
    logs exactly the losses of one without. Each evaluation prints its sample and records it;
    every record and log line carries peak_mem_mb."""
    common_args = [*TINY, f"--dataset={char_data}", "--max_iters=12", "--eval_interval=4", "--log_interval=1",
                   "--dropout=0.1"]
    runs = {}
    for name, extra in (("off", []), ("on", ["--eval_sample_tokens=20", "--eval_sample_prompt=ROMEO:"])):
        result = run_in_process(train.main, *common_args, f"--out_dir={tmp_path / name}", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = result.stdout
    logged = {name: {r["iter"]: r["loss"] for r in metrics(tmp_path / name) if "loss" in r} for name in runs}
    assert sorted(logged["on"]) == list(range(1, 13)) and logged["on"] == logged["off"]  # exactly
    evals = [r for r in metrics(tmp_path / "on") if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 4, 8, 12]
    for r in evals:
        assert r["sample"].startswith("ROMEO:") and len(r["sample"]) > len("ROMEO:")
        assert f"sample at iter {r['iter']}: {r['sample']!r}" in runs["on"]
    assert "sample at" not in runs["off"] and not any("sample" in r for r in metrics(tmp_path / "off"))
    for r in metrics(tmp_path / "on"):
        assert r["peak_mem_mb"] > 10
    lines = [line for line in runs["on"].splitlines() if line.startswith("iter ")]
    assert len(lines) == 12 + 4 and all(re.search(r"peak mem [0-9,]+ MB", line) for line in lines)


def test_an_empty_sample_prompt_starts_from_end_of_text_or_a_newline(tokenizer):
    """Samples continue eval_sample_prompt (its last block_size tokens) or, when it is empty, what
    sample.py starts from (a newline for a char model); a prompt the vocabulary lacks is an error."""
    cfg = train.DEFAULTS | {"eval_sample_tokens": 10}
    assert train.eval_sample_prompt(cfg, tokenizer, 32) == tokenizer.encode("\n")
    assert train.eval_sample_prompt(cfg | {"eval_sample_prompt": "x" * 40}, tokenizer, 32) == tokenizer.encode("x" * 32)
    assert train.eval_sample_prompt(train.DEFAULTS, tokenizer, 32) is None  # samples off
    with pytest.raises(UserError, match="eval_sample_prompt: character '∆'"):
        train.eval_sample_prompt(cfg | {"eval_sample_prompt": "∆"}, tokenizer, 32)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc")
def test_peak_memory_on_a_cpu_is_the_processes_peak_resident_set():
    """On a CPU, peak_mem_mb is the process's high-water mark of resident memory (VmHWM), in MiB."""
    hwm_kb = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
    assert common.peak_memory_mb("cpu") == pytest.approx(hwm_kb / 1024, rel=0.05)
