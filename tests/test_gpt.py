"""gpt.py: the model against its definition and against transformers."""
import datetime
import math
import sys

import pytest
import torch
from torch.nn import functional as F

import gpt
from conftest import require
from engine import generate
from gpt import GPT, GPTConfig, attention


def tiny_config(**overrides):
    return GPTConfig(**{**dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32), **overrides})


def varied_model(seed=1, **overrides):
    """A tiny model whose greedy output varies. GPT-2's init (std 0.02) with tied embeddings makes a
    random model repeat one token forever, which would let cache bugs pass unseen."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("transformer.wte", "transformer.wpe")):
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def all_logits(model, idx):
    """Logits at every position (the training path: any targets make forward compute them all)."""
    logits, _ = model(idx, targets=torch.zeros_like(idx))
    return logits


# Rounding to nearest moves a value by at most this fraction of itself: bf16 keeps 8 significant
# bits, fp32 24.
BF16_ROUNDING = 2.0**-8
FP32_ROUNDING = 2.0**-24


def logits_rtol(config, rounding):
    """How far apart (as a fraction of the largest |logit|) two routes to one token's logits may
    be, computing in a format whose rounding is `rounding` (fp32 sums inside the matmuls either way).
    Along the path from a token to its logits a value is rounded 10 times per block (ln_1, c_attn,
    attention, attn.c_proj, residual add, ln_2, c_fc, GELU, mlp.c_proj, residual add) and 3 times
    outside (embeddings' sum, ln_f, lm_head). At each the routes can differ by 2 roundings (two
    routes round a value to neighbouring values when their sums differ in the last bits; against
    fp32, autocast rounds both the value and the weights it met), plus what summing up to
    4 n_embd fp32 terms in another order moves: 4 n_embd * 2 * 2^-24. Adding up in the worst case:
    (10 n_layer + 3) * (2 rounding + 8 n_embd 2^-24); at 2 layers 0.18 for bf16 (measured: 0.03)
    and 3.5e-4 for fp32 (measured: 6e-7). A cache bug (a stale, shifted or missing key) moves the
    logits by 0.65-1.1 of the largest."""
    return (10 * config.n_layer + 3) * (2 * rounding + 8 * config.n_embd * FP32_ROUNDING)


# ----------------------------------------------------------------------------------------------
# model


def test_shapes_and_last_position_logits():
    """Guards the two forward modes: all positions with targets, the last one (same values) without."""
    model = varied_model()
    idx = torch.randint(0, 64, (3, 10))
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (3, 10, 64) and loss.dim() == 0
    last, none = model(idx)
    assert last.shape == (3, 1, 64) and none is None
    torch.testing.assert_close(last[:, 0], logits[:, -1])


def test_untrained_loss_is_ln_vocab_size():
    """GPT-2's small init predicts near-uniformly; a far-off start means a broken init or loss."""
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=512))
    idx, targets = torch.randint(0, 512, (2, 4, 16))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(512)) < 0.1


def test_ignore_index_minus_one_is_left_out_of_the_loss():
    model = varied_model()
    idx = torch.randint(0, 64, (1, 8))
    targets = idx.clone()
    targets[0, 4:] = -1
    logits, loss = model(idx, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits[0, :4], targets[0, :4]))


def test_longer_than_block_size_is_a_clear_error():
    model = varied_model()
    with pytest.raises(ValueError, match="block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_causality():
    """Changing token t must never change the logits before t (a leaking mask fails this)."""
    model = varied_model()
    idx = torch.randint(0, 64, (1, 16))
    base = all_logits(model, idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[0, t] = (idx[0, t] + 1) % 64
        logits = all_logits(model, changed)
        torch.testing.assert_close(logits[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert not torch.allclose(logits[:, t], base[:, t])


def test_init_follows_gpt2():
    """Normal(0, 0.02) weights, residual projections 0.02/sqrt(2 n_layer), zero biases, tied head."""
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=4, n_embd=128, n_head=4, vocab_size=1024))
    h0 = model.transformer.h[0]
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(h0.attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(h0.mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert torch.all(h0.attn.c_attn.bias == 0) and torch.all(h0.ln_1.weight == 1)


def test_param_count_and_flops_of_gpt2_small(monkeypatch):
    """GPT-2 small has 124,439,808 parameters (the published count), 85M of them in the blocks; and
    flops_per_token is the training cost of the matmuls a forward at T = block_size really runs,
    counted from their shapes: 2 FLOPs per multiply-add forward, twice that backward (the gradients
    of the input and of the weight), plus 6 per bias and LayerNorm parameter."""
    with torch.device("meta"):  # shapes only: no memory, no init cost, no arithmetic
        model = GPT(GPTConfig(vocab_size=50257))
    assert model.num_params(non_embedding=False) == 124_439_808
    assert model.num_params() == 124_439_808 - 1024 * 768
    assert sum(p.numel() for p in model.transformer.h.parameters()) == 85_054_464

    forward_flops = []  # of one forward over a (1, block_size) batch
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):  # (N, in) @ (in, out): N * in * out multiply-adds
            module.register_forward_hook(lambda m, inputs, _: forward_flops.append(
                2 * inputs[0].numel() * m.out_features))
    sdpa = gpt.attention

    def counted_attention(q, k, v, *args, **kwargs):  # q @ k^T, then the weights @ v, per head
        B, nh, T, hs = q.shape
        forward_flops.append(2 * 2 * B * nh * T * k.size(-2) * hs)
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(gpt, "attention", counted_attention)
    T = model.config.block_size
    idx = torch.zeros(1, T, dtype=torch.long, device="meta")
    model(idx, targets=idx)  # with targets: the head runs at every position, as in training
    assert len(forward_flops) == 12 * 5 + 1  # 4 Linears and attention per block, and the head
    small_params = sum(p.numel() for p in model.parameters() if p.dim() == 1)  # biases, LayerNorm
    assert model.flops_per_token() == 3 * sum(forward_flops) // T + 6 * small_params
    assert model.flops_per_token() == pytest.approx(0.855e9, rel=1e-3)


def test_configure_optimizers_decays_exactly_the_matrices():
    """Decaying LayerNorm gains or biases (1-D) pulls activations toward zero; every >= 2-D tensor
    (matmul weights, embeddings) and nothing else belongs in the decay group, each tensor once."""
    model = varied_model()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    params = list(model.parameters())
    assert {id(p) for p in decay["params"]} == {id(p) for p in params if p.dim() >= 2}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in params if p.dim() < 2}
    assert len(decay["params"]) + len(no_decay["params"]) == len(params)  # tied wte/lm_head once


def test_tiny_model_overfits_one_batch():
    """End to end: forward, loss, backward and the optimizer together can fit a batch."""
    torch.manual_seed(0)
    model = GPT(tiny_config())
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    idx = torch.randint(0, 64, (4, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    for _ in range(50):  # reaches ~0.01 at this learning rate
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_dropout_acts_at_gpt2s_sites_in_training_and_nowhere_in_eval(monkeypatch):
    """GPT-2 drops out the embeddings' sum and each attention and MLP output (and attention
    weights, inside SDPA); losing a site, or dropping in eval, changes what a model learns/says."""
    model = varied_model(dropout=0.5)
    plain = GPT(tiny_config()).eval()
    plain.load_state_dict(model.state_dict())
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(all_logits(model.eval(), idx), all_logits(plain, idx))

    model.train()
    runs = {}
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.setdefault(seed, []).append(all_logits(model, idx))
    assert torch.equal(*runs[0]) and not torch.allclose(runs[0][0], runs[1][0])

    calls = []
    dropout = F.dropout
    monkeypatch.setattr(F, "dropout", lambda x, p, training: calls.append((p, training)) or dropout(x, p, training))
    all_logits(model, idx)
    assert calls == [(0.5, True)] * (1 + 2 * model.config.n_layer)


@pytest.mark.parametrize("T", [64, 192])  # 64: attention's fp32 detour; 192: SDPA in bf16
def test_bf16_training_attention_matches_float64(T):
    """Under bf16 autocast on a CPU, `attention` (which runs in fp32 at short sequences) returns
    bf16 like SDPA, its gradients reach q, k and v in bf16, and both agree with float64 attention
    of the same inputs to bf16 accuracy. Guards the detour against autocast re-casting q, k, v, a
    float32 result leaking into the bf16 residual stream, or a result cut off from autograd."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad_y = torch.randn(2, 3, T, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attention(q, k, v, None, True, 0.0)
    y.backward(grad_y)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    y64 = F.scaled_dot_product_attention(*exact, is_causal=True)
    y64.backward(grad_y.double())
    assert y.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in (q, k, v))
    # The inputs are bf16 already (exact in float64). The fp32 detour rounds each result to bf16
    # once; SDPA in bf16 also rounds its attention weights (forward) and the weights' gradient
    # (backward) before multiplying with them: at most 3 roundings of 2^-8 on any path.
    for ours, ref in [(y, y64)] + [(t.grad, e.grad) for t, e in zip((q, k, v), exact)]:
        err = (ours.double() - ref).norm() / ref.norm()
        assert err < 3 * BF16_ROUNDING, err.item()  # measured: 0.4-0.8 * 2^-8



# ----------------------------------------------------------------------------------------------
# Hugging Face GPT-2 directories


def test_save_then_load_gives_identical_logits(tmp_path):
    model = varied_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = GPT.from_pretrained(tmp_path, dropout=0.1)
    assert loaded.config == GPTConfig(**{**vars(model.config), "dropout": 0.1})
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(all_logits(loaded.eval(), idx), all_logits(model, idx))


def test_bias_free_model_saves_as_zero_biases(tmp_path):
    """HF's GPT-2 always has biases; zeros make the bias=False model the same function there."""
    model = varied_model(bias=False)
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path).eval()
    assert loaded.config.bias and torch.all(loaded.transformer.h[0].attn.c_attn.bias == 0)
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(all_logits(loaded, idx), all_logits(model, idx), atol=1e-6, rtol=1e-6)


def test_without_safetensors_weights_go_to_pytorch_model_bin(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails as if not installed
    model = varied_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "pytorch_model.bin").is_file() and not (tmp_path / "model.safetensors").exists()
    idx = torch.randint(0, 64, (1, 8))
    assert torch.equal(all_logits(GPT.from_pretrained(tmp_path).eval(), idx), all_logits(model, idx))


def test_original_gpt2_file_layout_loads(tmp_path):
    """OpenAI's GPT-2 files on the hub have no `transformer.` prefix, carry attn.bias/masked_bias
    mask buffers and may hold lm_head.weight: all must load into the same model."""
    from safetensors.torch import load_file, save_file
    model = varied_model()
    model.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
    state["h.0.attn.bias"] = torch.ones(1, 1, 16, 16).tril()
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["wte.weight"].clone()
    save_file(state, tmp_path / "model.safetensors")
    idx = torch.randint(0, 64, (1, 8))
    assert torch.equal(all_logits(GPT.from_pretrained(tmp_path).eval(), idx), all_logits(model, idx))


def test_weights_file_that_needs_pickle_is_refused(tmp_path):
    """torch.load without weights_only runs code from the file; ours must refuse, not execute."""
    varied_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": torch.zeros(64, 32), "made": datetime.date(2020, 1, 1)},
               tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="needs pickle"):
        GPT.from_pretrained(tmp_path)


def test_mismatched_weights_and_configs_are_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    varied_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "transformer.h.1.ln_2.weight"}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['transformer.h.1.ln_2.weight'\]"):
        GPT.from_pretrained(tmp_path)
    save_file({**state, "transformer.h.2.ln_1.weight": torch.ones(32)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected"):
        GPT.from_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(config.replace('"gelu_new"', '"relu"'))
    with pytest.raises(ValueError, match="activation_function"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(config.replace('"n_layer"', '"n_layers"'))
    with pytest.raises(ValueError, match=r"lacks \['n_layer'\]"):
        GPT.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        GPT.from_pretrained(tmp_path / "nowhere")


def test_transformers_gives_the_same_logits_and_greedy_tokens(tmp_path):
    """Our GPT-2 against the reference implementation, on the same random weights: guards the
    architecture (GELU flavour, LayerNorm eps, head split) and the saved layout (Conv1D transposes)."""
    transformers = require("transformers", reason="transformers is not installed (test-only dependency)")
    for bias in (True, False):
        model = varied_model(bias=bias)
        model.save_pretrained(tmp_path / str(bias))
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / str(bias)).eval()
        idx = torch.randint(0, 64, (2, 16))
        with torch.no_grad():
            torch.testing.assert_close(hf(idx).logits, all_logits(model, idx), atol=1e-5, rtol=1e-5)
            hf_tokens = hf.generate(idx[:1, :6], attention_mask=torch.ones(1, 6, dtype=torch.long),
                                    max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert hf_tokens[0, 6:].tolist() == generate(model, idx[:1, :6], 10, temperature=0)[0]


def test_directory_written_by_transformers_loads_with_the_same_logits(tmp_path):
    """The other direction: GPT2LMHeadModel.save_pretrained's layout (its key names, Conv1D
    shapes, no lm_head) must load into our GPT and compute the same function."""
    transformers = require("transformers", reason="transformers is not installed (test-only dependency)")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     initializer_range=0.3)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(all_logits(ours, idx), hf(idx).logits, atol=1e-5, rtol=1e-5)
