"""export.py --to onnx: onnxruntime runs the exported graph as our model runs.

model.onnx's logits and keys/values against our forward and KVCache at two shapes and in chunks; a
greedy loop in numpy (the prompt with empty pasts, then one token per step with the presents, the
window sliding as ours) against engine.generate token for token; float16; the files beside the graph.
"""
import json
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from conftest import assert_one_line_error, main_in_process, require

import export
import engine
import gpt
from tokenizer import load_tokenizer

require("onnxscript", reason="the ONNX exporter needs onnxscript (pip install onnxscript)")
ort = require("onnxruntime", reason="the exported graphs run in onnxruntime (pip install onnxruntime)")

FP32_TOL = 1e-4  # fp32 logits of the same function through different kernels (|logits| < ~10)
PROMPT = "ROMEO:\nWhat light"


@pytest.fixture(scope="module")
def exported(trained_checkpoint, tmp_path_factory):
    """exported(kind) -> (our model, its tokenizer, the ONNX folder of its fp32 export); once per kind."""
    made = {}

    def make(kind):
        if kind not in made:
            model, tokenizer, _ = export.load_for_export(trained_checkpoint(kind))
            out = tmp_path_factory.mktemp(f"onnx_{kind}") / "onnx"
            export.export_onnx(model, tokenizer, out, "float32")
            made[kind] = model, tokenizer, out
        return made[kind]

    return make


def session(folder):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # graphs this small: more threads only add overhead
    return ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])


def run(sess, input_ids, past=None):
    """(logits, presents) of model.onnx for input_ids after the cache `past` (None: empty pasts)."""
    names = [i.name for i in sess.get_inputs()[1:]]
    if past is None:
        B, (_, n_head, _, hs) = input_ids.shape[0], sess.get_inputs()[1].shape
        dtype = np.float16 if "float16" in sess.get_inputs()[1].type else np.float32
        past = [np.zeros((B, n_head, 0, hs), dtype) for _ in names]
    logits, *present = sess.run(None, {"input_ids": input_ids, **dict(zip(names, past))})
    return logits, present


def onnx_greedy(folder, prompt, steps):
    """Greedy decoding in numpy and onnxruntime alone, shapes from export.json: model.onnx on the
    prompt with empty pasts, then on each new token with the presents; when the cache holds
    block_size tokens, the last block_size again with empty pasts (engine.next_logits's sliding
    window). Returns (tokens (B, steps), each step's (B, V) logits, each step's window)."""
    meta = json.loads((folder / "export.json").read_text(encoding="utf-8"))
    sess = session(folder)
    tokens, logits_seen, windows = prompt, [], []
    present = None
    for _ in range(steps):
        window = tokens[:, -meta["block_size"]:]
        if present is None or present[0].shape[2] == meta["block_size"]:
            logits, present = run(sess, window)
        else:
            logits, present = run(sess, tokens[:, -1:], present)
        logits_seen.append(logits[:, -1])
        windows.append(window)
        tokens = np.concatenate([tokens, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return tokens[:, prompt.shape[1]:], logits_seen, windows


def test_logits_and_cache_match_ours_at_any_batch_and_length(exported):
    """model.onnx's axes are dynamic (not fixed to the example the exporter traced): its logits at
    every position and its keys/values are our forward's and our KVCache's, and a sequence fed in
    two chunks (the second after a cache of the first) gives the logits of feeding it whole."""
    model, _, folder = exported("char")
    sess = session(folder)
    V, block_size = model.config.vocab_size, model.config.block_size
    for B, T in ((1, 5), (3, block_size)):
        idx = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(T))
        logits, present = run(sess, idx.numpy())
        with torch.no_grad():
            ours, _ = model(idx, targets=idx)  # with targets: logits at every position
            cache = engine.KVCache(model.config.n_layer, T, rows=B)
            model(idx, kv_cache=cache)
        assert logits.shape == (B, T, V)
        np.testing.assert_allclose(logits, ours.numpy(), rtol=0, atol=FP32_TOL)
        for layer in range(model.config.n_layer):
            np.testing.assert_allclose(present[2 * layer], cache.k[layer, :, :, :T].numpy(), rtol=0, atol=FP32_TOL)
            np.testing.assert_allclose(present[2 * layer + 1], cache.v[layer, :, :, :T].numpy(), rtol=0, atol=FP32_TOL)
        first, rest = idx[:, :2].numpy(), idx[:, 2:].numpy()
        chunked, _ = run(sess, rest, run(sess, first)[1])
        np.testing.assert_allclose(chunked, ours[:, 2:].numpy(), rtol=0, atol=FP32_TOL)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_cached_onnx_loop_gives_our_greedy_tokens(exported, kind):
    """64 greedy steps past block_size 32 through model.onnx's cache (the window sliding as ours)
    give engine.generate's tokens for two prompts at once, and every step's logits are model.onnx's
    on the whole window without a cache: the cache is not stale, the positions not shifted."""
    model, tokenizer, folder = exported(kind)
    ids = tokenizer.encode(PROMPT)
    prompt = torch.tensor([ids, ids[::-1]])  # two different rows of one length
    ours = engine.generate(model, prompt, 64, temperature=0)
    tokens, step_logits, windows = onnx_greedy(folder, prompt.numpy(), 64)
    assert tokens.tolist() == ours
    sess = session(folder)
    for logits, window in zip(step_logits, windows):
        np.testing.assert_allclose(logits, run(sess, window)[0][:, -1], rtol=0, atol=FP32_TOL)


def test_export_folder_describes_itself(exported):
    """export.json names the graph's real inputs and outputs and the model's shape, and both
    tokenizer files encode as ours: tokenizer_meta.json through load_tokenizer (bpe: its merge ranks
    travel with it), tokenizer.json through Hugging Face's tokenizers (what other languages read)."""
    model, tokenizer, folder = exported("bpe")
    meta = json.loads((folder / "export.json").read_text(encoding="utf-8"))
    sess = session(folder)
    assert (folder / meta["model"]).is_file()
    cfg = model.config
    assert [i.name for i in sess.get_inputs()] == meta["inputs"] and len(meta["inputs"]) == 1 + 2 * cfg.n_layer
    assert [o.name for o in sess.get_outputs()] == meta["outputs"] and len(meta["outputs"]) == 1 + 2 * cfg.n_layer
    assert (meta["n_layer"], meta["n_head"], meta["head_size"]) == (cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head)
    assert (meta["block_size"], meta["vocab_size"]) == (cfg.block_size, cfg.vocab_size)
    assert meta["eot_id"] == tokenizer.eot_id
    assert sess.get_inputs()[1].shape == ["batch", meta["n_head"], "past", meta["head_size"]]
    assert meta["kv_shape"] == ["batch", "n_head", "past", "head_size"]
    text = "O Romeo, Romeo! wherefore art thou Romeo?"
    assert load_tokenizer(folder / meta["tokenizer_meta"]).encode(text) == tokenizer.encode(text)
    assert Tokenizer.from_file(str(folder / meta["tokenizer"])).encode(text).ids == tokenizer.encode(text)


def test_float16_export_runs_on_the_cpu_provider(trained_checkpoint, tmp_path, monkeypatch, capsys):
    """--dtype float16 through the command line: the graph takes and gives fp16 and runs on
    onnxruntime's CPU provider, prompt and cached step within fp16's rounding of our fp32 logits,
    and the export says on stderr what it is doing."""
    out = tmp_path / "onnx16"
    result = main_in_process(monkeypatch, capsys, export.main,
                             [trained_checkpoint("char"), "--to", "onnx", "--out", out, "--dtype", "float16"])
    assert result.returncode == 0, result.stderr
    assert "exporting model.onnx" in result.stderr and f"wrote {out}" in result.stdout
    model, tokenizer, _ = export.load_for_export(trained_checkpoint("char"))
    sess = session(out)
    idx = torch.tensor([tokenizer.encode(PROMPT)])
    logits, present = run(sess, idx.numpy())
    step, _ = run(sess, idx[:, :1].numpy(), present)
    assert logits.dtype == step.dtype == present[0].dtype == np.float16
    with torch.no_grad():
        ours, _ = model(idx, targets=idx)
        ours_step, _ = model(torch.cat([idx, idx[:, :1]], dim=1))
    # fp16 keeps 11 significant bits (unit roundoff 2**-11): 16 roundings at the logits' scale, several
    # times the error of two fp16 layers, far below the ~1 of a wrong weight or position.
    tol = 2 ** -11 * 16 * max(1.0, float(ours.abs().max()))
    np.testing.assert_allclose(logits.astype(np.float32), ours.numpy(), rtol=0, atol=tol)
    np.testing.assert_allclose(step[:, -1].astype(np.float32), ours_step[:, -1].numpy(), rtol=0, atol=tol)


def test_missing_exporter_package_is_one_line_naming_the_pip_command(trained_checkpoint, tmp_path, monkeypatch,
                                                                     capsys):
    """Without onnxscript, --to onnx stops with one line saying what to install, and writes nothing."""
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` raises ImportError
    out = tmp_path / "onnx"
    result = main_in_process(monkeypatch, capsys, export.main,
                             [trained_checkpoint("char"), "--to", "onnx", "--out", out])
    assert_one_line_error(result, "pip install onnx onnxscript")
    assert not out.exists() and not list(tmp_path.iterdir())
