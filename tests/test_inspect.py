"""Looking inside a model: attention maps (sample.py --attention).

Models are tiny and char-level; the pictures are rendered and read back as pixels.
"""
import argparse
import ast
import re
import sys
from dataclasses import asdict

import pytest
import torch

import gpt
import sample
from common import UserError
from conftest import assert_one_line_error, run_script
from gpt import GPT, GPTConfig
from tokenizer import load_tokenizer

# A 2-layer, 2-head model on 32-character windows, in fp32 on the CPU.
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--eval_iters=4",
        "--device=cpu", "--dtype=float32"]


@pytest.fixture(scope="session")
def char_data(tiny_corpus, tmp_path_factory):
    """A char-level dataset made by prepare.py from the tiny corpus."""
    out = tmp_path_factory.mktemp("data") / "inspect_char"
    result = run_script("prepare.py", "--input", tiny_corpus, "--out", out, "--tokenizer", "char")
    assert result.returncode == 0, result.stderr
    return out


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
    image = pytest.importorskip("matplotlib.image").imread(path)  # (H, W, 3 or 4) floats in [0, 1]
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
    result = run_script("sample.py", "--ckpt", ckpt, "--attention", text)
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
    with pytest.raises(UserError, match=re.escape(needle)):
        sample.parse_args(argv)


@pytest.mark.parametrize("argv, needle", [
    (["--layer=2"], "--layer 2 does not exist: this model has 2 layers"),
    (["--head=5"], "--head 5 does not exist: this model has 2 heads"),
])
def test_a_layer_or_head_the_model_lacks_is_one_line(ckpt, argv, needle):
    assert_one_line_error(run_script("sample.py", "--ckpt", ckpt, "--attention", "hi", *argv), needle)


def test_attention_of_no_text_is_one_line(ckpt):
    assert_one_line_error(run_script("sample.py", "--ckpt", ckpt, "--attention", ""), "--attention needs some text")


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
    pytest.importorskip("matplotlib")
    text = "To be, or not to be"
    grid, one = tmp_path / "grid.png", tmp_path / "one.png"
    for args in (["--plot", grid], ["--plot", one, "--layer", "1", "--head", "0"]):
        result = run_script("sample.py", "--ckpt", ckpt, "--attention", text, *args)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "" and f"wrote {args[1]}" in result.stderr
    grid_h, grid_w, grid_coloured, grid_var = read_png(grid)
    one_h, one_w, one_coloured, one_var = read_png(one)
    assert grid_h > 600 and grid_w > 600 and one_h > 300 and one_w > 300
    assert grid_var > 0 and one_var > 0
    assert grid_coloured > 0.1 and one_coloured > 0.1  # the heatmaps, not only axes on white
    assert one_w < grid_w  # one map, not four


def test_korean_tokens_are_drawn_with_a_hangul_font_or_one_line_says_there_is_none(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    labels = [repr(c) for c in "한국어 모델"]
    weights = torch.rand(1, 1, len(labels), len(labels)).tril().softmax(-1)
    installed = sample.font_with_hangul()
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
    pytest.importorskip("matplotlib")
    result = run_script("sample.py", "--ckpt", ckpt, "--attention", "hi", "--plot", tmp_path / "no" / "a.png")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot write {tmp_path / 'no' / 'a.png'}")
