"""gpt.py: the model against its definition and against transformers, the engine against recomputation."""
import datetime
import math
import sys

import pytest
import torch
from torch.nn import functional as F

import gpt
from gpt import (GPT, GPTConfig, Int8Linear, KVCache, attention, beam_search, generate, generate_stream,
                 next_logits, quantize_int8, sample_next_token, store_linear_weights_transposed)


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


def cached_greedy_route(model, prompt, max_new_tokens):
    """generate's greedy tokens after prompt (1, T), and the logits the KV-cache route gave before
    each of them ((max_new_tokens, V) float32), replayed with next_logits and a KVCache as generate
    uses them. The replay does generate's arithmetic, so each token is exactly its logits' argmax."""
    [new] = generate(model, prompt, max_new_tokens, temperature=0)
    T = prompt.size(1)
    tokens = torch.cat([prompt, torch.tensor([new])], dim=1)
    kv_cache = KVCache(model.config.n_layer, min(model.config.block_size, T + max_new_tokens))
    with torch.inference_mode():
        logits = torch.stack([next_logits(model, tokens, n, kv_cache)[0].float() for n in range(T, T + len(new))])
    assert logits.argmax(dim=-1).tolist() == new
    return tokens, logits, kv_cache


def assert_recompute_follows(reference, tokens, cached_logits, rtol):
    """Teacher-force `reference` without a cache (context cropped to its block_size) on the cached
    route's tokens: before each new token its logits must be within rtol * max|logit| of the cached
    route's. Comparing along one token path keeps a near-tie, which two bf16 routes may break
    differently, from sending them down different continuations."""
    block_size = reference.config.block_size
    start = tokens.size(1) - len(cached_logits)
    with torch.no_grad():
        for step, n in enumerate(range(start, tokens.size(1))):
            expected = reference(tokens[:, max(0, n - block_size):n])[0][0, -1].float()
            error = (cached_logits[step] - expected).abs().max().item()
            assert error <= rtol * expected.abs().max().item(), (step, error, expected.abs().max().item())


def kept_tokens(logits, draws=2000, **kwargs):
    """The set of tokens sample_next_token ever draws from one row of logits (many draws at once)."""
    g = torch.Generator().manual_seed(0)
    batch = torch.tensor([logits], dtype=torch.float32).expand(draws, -1)
    return set(sample_next_token(batch, generator=g, **kwargs).tolist())


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


# ----------------------------------------------------------------------------------------------
# KV cache and generation


@pytest.mark.parametrize("prompt_len, new_tokens", [(5, 8), (5, 40), (20, 6)])
def test_kv_cache_greedy_decoding_follows_recompute(prompt_len, new_tokens):
    """Cached decoding gives recomputation's logits (to fp32 rounding) on the tokens it chooses:
    within block_size (16), far past it (sliding window), and for a prompt longer than
    block_size. Wrong positions after the slide, a stale cache or an off-by-one in the cache
    slots all move the logits by most of their size."""
    model = varied_model()
    idx = torch.randint(0, 64, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    tokens, logits, _ = cached_greedy_route(model, idx, new_tokens)
    assert len(set(tokens[0, prompt_len:].tolist())) > 3  # the check means something only if the output varies
    assert_recompute_follows(model, tokens, logits, logits_rtol(model.config, FP32_ROUNDING))


def test_cached_logits_equal_recomputed_logits_at_every_step():
    """The same, on logits and on arbitrary (not model-chosen) tokens, through block_size and past it."""
    model = varied_model()
    tokens = torch.randint(0, 64, (2, 40))
    kv_cache = KVCache(model.config.n_layer, model.config.block_size)
    with torch.inference_mode():
        for n in range(3, 40):
            cached = next_logits(model, tokens, n, kv_cache)
            recomputed = model(tokens[:, max(0, n - 16):n])[0][:, -1]
            torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_after_cached_tokens():
    """Several new tokens on top of a non-empty cache need a shifted causal mask (SDPA's is_causal
    would align it wrongly); the result must equal one forward over everything."""
    model = varied_model()
    idx = torch.randint(0, 64, (2, 12))
    kv_cache = KVCache(model.config.n_layer, 16)
    with torch.inference_mode():
        model(idx[:, :5], kv_cache=kv_cache)
        model(idx[:, 5:7], kv_cache=kv_cache)
        logits, _ = model(idx[:, 7:], kv_cache=kv_cache)
        torch.testing.assert_close(logits, model(idx)[0], atol=1e-5, rtol=1e-5)


def test_batch_of_two_equals_each_alone():
    """Rows of a batch must not see each other (cache slots, stop handling)."""
    model = varied_model()
    idx = torch.randint(0, 64, (2, 6))
    both = generate(model, idx, 20, temperature=0)
    assert both == generate(model, idx[:1], 20, temperature=0) + generate(model, idx[1:], 20, temperature=0)


def test_stop_tokens_end_generation():
    """Output is cut before the first stop token; the stream yields it, keeps yielding it for a row
    that stopped while others continue, and ends once every row has stopped."""
    model = varied_model()
    idx = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    free = generate(model, idx, 20, temperature=0)
    stop = free[0][4]
    first = [row.index(stop) if stop in row else None for row in free]
    assert first[0] == free[0].index(stop) <= 4
    cut = generate(model, idx, 20, temperature=0, stop_tokens=[stop])
    assert cut == [row[:i] if i is not None else row for row, i in zip(free, first)]
    steps = torch.stack(list(generate_stream(model, idx[:1], 20, temperature=0, stop_tokens=[stop])), 1)
    assert steps[0].tolist() == free[0][:first[0] + 1]
    if first[1] is None or first[1] > first[0]:  # row 0 stops first and then repeats its stop token
        batch_steps = torch.stack(list(generate_stream(model, idx, 20, temperature=0, stop_tokens=[stop])), 1)
        assert batch_steps[0, first[0]:].eq(stop).all()


def test_generation_turns_dropout_off_and_restores_training_mode():
    """Mid-training samples must not be drawn with dropout on, nor leave the model in eval mode."""
    model = varied_model(dropout=0.5).train()
    idx = torch.randint(0, 64, (1, 4))
    assert generate(model, idx, 10, temperature=0) == generate(model, idx, 10, temperature=0)
    assert model.training


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


def test_empty_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(varied_model(), torch.zeros(1, 0, dtype=torch.long), 5)


def test_generation_under_bf16_autocast_follows_float32_recompute():
    """Under bf16 autocast the cache takes the dtype attention runs in (a float32 cache breaks
    SDPA), and cached decoding, through block_size and past it, gives the float32 model's logits
    on the same tokens to bf16 accuracy."""
    model = varied_model()
    prompt = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, logits, kv_cache = cached_greedy_route(model, prompt, 30)
    assert kv_cache.k.dtype == kv_cache.v.dtype == torch.bfloat16
    assert len(set(tokens[0, 4:].tolist())) > 3  # the path varies
    assert_recompute_follows(model, tokens, logits, logits_rtol(model.config, BF16_ROUNDING))


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
# sampling on hand-made logits


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample_next_token(logits, temperature=0).tolist() == [1, 0]


def test_top_k_keeps_exactly_the_k_largest_and_ties_at_the_kth():
    """Tie rule: every token equal to the k-th largest logit is kept, so the outcome never depends
    on how a sort orders equal values. (High temperature flattens the kept ones so all get drawn.)"""
    logits = [1.0, 3.0, 2.0, 3.0, 0.0, 2.5]
    assert kept_tokens(logits, top_k=1, temperature=100) == {1, 3}  # a tie at the top: both
    assert kept_tokens(logits, top_k=2, temperature=100) == {1, 3}
    assert kept_tokens(logits, top_k=3, temperature=100) == {1, 3, 5}
    assert kept_tokens([5.0, 4.0, 4.0, 4.0, 1.0], top_k=2, temperature=100) == {0, 1, 2, 3}
    assert kept_tokens(logits, top_k=6, temperature=100) == set(range(6))


def test_top_p_keeps_the_smallest_nucleus_and_always_the_most_likely():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    assert kept_tokens(logits, top_p=0.7) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert kept_tokens(logits, top_p=0.9) == {0, 1, 2}
    assert kept_tokens(logits, top_p=0.01) == {0}  # the most likely token always survives
    assert kept_tokens(logits, top_p=1.0) == {0, 1, 2, 3}
    tied = torch.tensor([0.1, 0.4, 0.2, 0.2, 0.1]).log().tolist()
    assert kept_tokens(tied, top_p=0.5) == {1, 2, 3}  # 0.4 + one 0.2 reaches 0.5: its twin stays too
    # top-k, then top-p on the renormalised rest: 0.5/0.95 + 0.3/0.95 = 0.84 reaches 0.83 (0.8 would not)
    assert kept_tokens(logits, top_p=0.83) == {0, 1, 2}
    assert kept_tokens(logits, top_k=3, top_p=0.83) == {0, 1}


@pytest.mark.parametrize("logits, penalty, expected", [
    ([3.0, 2.0], 1.49, 0), ([3.0, 2.0], 1.51, 1),  # positive: 3 / 1.5 = 2 is the turning point
    ([-1.0, -1.5], 1.49, 0), ([-1.0, -1.5], 1.51, 1),  # negative: -1 * 1.5 = -1.5 likewise
])
def test_repetition_penalty_divides_positive_and_multiplies_negative_logits(logits, penalty, expected):
    """CTRL's rule, pinned where the argmax flips: token 0 was seen, token 1 was not. Dividing a
    negative logit (or multiplying a positive one) would make a seen token *more* likely."""
    seen = torch.tensor([[0]])
    out = sample_next_token(torch.tensor([logits]), temperature=0, repetition_penalty=penalty, seen=seen)
    assert out.item() == expected


def test_repetition_penalty_counts_a_token_once_and_spares_unseen_ones():
    """A token seen twice is penalised once (3 / 1.4 = 2.14 still beats 2; twice would be 1.53)."""
    logits = torch.tensor([[3.0, 2.0, 2.1]])
    out = sample_next_token(logits, temperature=0, repetition_penalty=1.4, seen=torch.tensor([[0, 0, 1]]))
    assert out.item() == 0
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.7, 0.2, 0.1]]).log().expand(4000, -1)
    seen = torch.tensor([[0]]).expand(4000, -1)
    # The same draws with and without a penalty on token 0: token 0 loses exactly its share.
    plain = sample_next_token(probs, generator=g1)
    penalised = sample_next_token(probs, repetition_penalty=2.0, seen=seen, generator=g2)
    share = (penalised == 0).float().mean().item()
    p0 = torch.softmax(torch.tensor([0.7, 0.2, 0.1]).log() * torch.tensor([2.0, 1, 1]), 0)[0].item()
    assert abs(share - p0) < 0.03 and (plain == 0).float().mean().item() > 0.65


@pytest.mark.parametrize("frequency, presence, expected", [
    (0.0, 0.0, 0), (0.4, 0.0, 0), (0.6, 0.0, 1), (0.0, 1.9, 0), (0.0, 2.1, 2), (0.6, 1.0, 2), (-1.0, 0.0, 0),
])
def test_frequency_and_presence_penalties_subtract_count_terms(frequency, presence, expected):
    """OpenAI's definition, logit -= count * frequency + (count > 0) * presence, over the tokens of
    the completion only: token 0 was generated twice, token 1 once, token 2 never; token 2 is in
    the prompt (`seen`), which these penalties ignore. Checked against the formula on every row."""
    logits = torch.tensor([[3.0, 2.5, 1.0]])
    generated = torch.tensor([[0, 1, 0]])
    out = sample_next_token(logits, temperature=0, frequency_penalty=frequency, presence_penalty=presence,
                            seen=torch.tensor([[2, 0, 1, 0]]), generated=generated)
    counts = torch.tensor([2.0, 1.0, 0.0])
    assert out.item() == expected == (logits[0] - counts * frequency - (counts > 0) * presence).argmax().item()
    none_yet = sample_next_token(logits, temperature=0, frequency_penalty=5.0, generated=generated[:, :0])
    assert none_yet.item() == 0  # nothing generated yet: nothing to penalise


def test_same_seed_same_sample_different_seed_different():
    logits = torch.zeros(8, 1000)  # uniform: 8 draws collide by chance with probability 1e-24
    draw = lambda seed: sample_next_token(logits, generator=torch.Generator().manual_seed(seed)).tolist()
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    model = varied_model()
    idx = torch.randint(0, 64, (2, 4))
    run = lambda seed: generate(model, idx, 30, temperature=1.5, top_k=40, top_p=0.95,
                                generator=torch.Generator().manual_seed(seed))
    assert run(7) == run(7) and run(7) != run(8)


def test_bad_sampling_settings_are_clear_errors():
    logits = torch.zeros(1, 5)
    for kwargs in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
                   dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            sample_next_token(logits, **kwargs)


# ----------------------------------------------------------------------------------------------
# beam search


def sequence_score(model, idx, new_tokens, length_penalty=1.0):
    """beam_search's metric, computed independently: one forward over prompt + continuation."""
    full = torch.cat([idx, torch.tensor([new_tokens])], dim=1)
    logprobs = F.log_softmax(all_logits(model, full)[0, idx.size(1) - 1:-1], dim=-1)
    total = logprobs.gather(1, full[0, idx.size(1):, None]).sum().item()
    return total / len(new_tokens) ** length_penalty


def test_beam_search_with_one_beam_is_greedy():
    model = varied_model()
    idx = torch.randint(0, 64, (1, 5))
    assert beam_search(model, idx, 12, num_beams=1) == generate(model, idx, 12, temperature=0)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_scores_at_least_greedy_and_is_deterministic(seed):
    """More beams must find a continuation at least as likely (length-normalised) as greedy's here;
    a bug in the beam bookkeeping (mixed-up rows, stale cache order) loses this quickly."""
    model = varied_model(seed)
    idx = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(seed))
    greedy = generate(model, idx, 10, temperature=0)[0]
    beams = beam_search(model, idx, 10, num_beams=4)
    assert len(beams) == 10
    assert sequence_score(model, idx, beams) >= sequence_score(model, idx, greedy) - 1e-5
    assert beam_search(model, idx, 10, num_beams=4) == beams


def test_beam_search_stop_token_is_excluded_and_ends_the_hypothesis():
    """A hypothesis that reaches a stop token is finished: the result leaves the stop token out,
    but its score counts it (ending has a probability too). With as many beams as tokens, two
    steps of beam search are an exhaustive search, done here independently by one batched
    forward over every [a, b]; with one beam, beam search is generate's greedy decoding, cut
    before the stop token."""
    model = varied_model()
    V = model.config.vocab_size
    idx = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        first = F.log_softmax(all_logits(model, idx)[0, -1], dim=-1)  # (V,): [a]
        pairs = torch.cat([idx.expand(V, -1), torch.arange(V)[:, None]], dim=1)
        second = F.log_softmax(all_logits(model, pairs)[:, -1], dim=-1)  # (V, V): b after [a]
    mean = (first[:, None] + second) / 2  # the score of [a, b]: mean log-prob (length_penalty 1)
    stop = mean.max(dim=0).values.argmax().item()  # the best pair [a, stop] ends with it
    a = mean[:, stop].argmax().item()
    # the setting means something: the best hypothesis ends at the stop token after one kept token
    assert a != stop and mean[a, stop] > first[stop]
    assert beam_search(model, idx, 2, num_beams=V) == [a, stop]
    assert beam_search(model, idx, 2, num_beams=V, stop_tokens=[stop]) == [a]

    greedy = generate(model, idx, 8, temperature=0)[0]
    k = next(k for k in range(1, 8) if greedy[k] not in greedy[:k])
    assert beam_search(model, idx, 8, num_beams=1, stop_tokens=[greedy[k]]) == greedy[:k]
    assert generate(model, idx, 8, temperature=0, stop_tokens=[greedy[k]])[0] == greedy[:k]


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
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (test-only dependency)")
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
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (test-only dependency)")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     initializer_range=0.3)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(all_logits(ours, idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_int8_linear_is_the_dequantised_matmul():
    """Int8Linear through torch's int8 kernel must equal the plain matmul with the dequantised
    weights (int8 row x its scale), and those must be within half a step of the original."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q = Int8Linear(linear)
    dequantised = q.weight.float() * q.scale.float()[:, None]
    step = q.scale.float()[:, None]
    assert ((dequantised - linear.weight).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(5, 64).bfloat16()
    bias = linear.bias.bfloat16().float()
    expected = x.float() @ dequantised.T + bias
    # the kernel's sum is rounded to bf16, then the sum with the bias: two roundings of at most
    # 2^-8 of the magnitudes that went in (measured: a third of one)
    magnitude = x.float().abs() @ dequantised.abs().T + bias.abs()
    assert ((q(x).float() - expected).abs() <= 2 * BF16_ROUNDING * magnitude).all()


def test_int8_model_stays_close_to_fp32_and_its_cache_follows_recompute():
    """quantize_int8: logits and loss within a few % of the fp32 model's; and cached decoding (bf16,
    int8 weights), through block_size and past it, gives recomputation's logits on the same tokens
    to bf16 accuracy."""
    model = varied_model()
    quantized = quantize_int8(varied_model())
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, ref_loss = model(idx, idx)
        got, got_loss = quantized(idx, idx)
    # measured: mean error 1.2% of the logits' spread (bf16 alone: 0.7%), loss within 0.4%
    assert (got.float() - ref).abs().mean() < 0.03 * ref.std()
    assert abs(got_loss.item() - ref_loss.item()) < 0.01 * ref_loss.item()
    assert quantized.lm_head.weight.dtype == torch.int8
    assert quantized.transformer.wte.weight.dtype == torch.bfloat16
    tokens, logits, kv_cache = cached_greedy_route(quantized, idx[:1, :5], 40)
    assert kv_cache.k.dtype == torch.bfloat16
    assert len(set(tokens[0, 5:].tolist())) > 3
    assert_recompute_follows(quantized, tokens, logits, logits_rtol(quantized.config, BF16_ROUNDING))


def test_transposed_weight_storage_is_the_same_model():
    """store_linear_weights_transposed only moves bytes: every Linear weight is stored (in, out)
    yet keeps its (out, in) shape and values; the head stays tied to the embedding; logits match
    the untouched model to rounding; cached decoding follows the untouched model's recompute; its
    state_dict loads into a fresh GPT as the same function."""
    model = varied_model()
    stored = store_linear_weights_transposed(varied_model())
    assert stored.lm_head.weight is stored.transformer.wte.weight
    for (name, p), (_, q) in zip(model.named_parameters(), stored.named_parameters()):
        assert torch.equal(p, q), name
    assert all(m.weight.t().is_contiguous() for m in stored.modules() if isinstance(m, torch.nn.Linear))
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(stored(idx, idx)[0], model(idx, idx)[0], rtol=1e-5, atol=1e-5)
        fresh = GPT(stored.config)
        fresh.load_state_dict(stored.state_dict())
        torch.testing.assert_close(fresh.eval()(idx, idx)[0], model(idx, idx)[0], rtol=1e-5, atol=1e-5)
    tokens, logits, _ = cached_greedy_route(stored, idx[:1, :5], 40)
    assert_recompute_follows(model, tokens, logits, logits_rtol(model.config, FP32_ROUNDING))


# ----------------------------------------------------------------------------------------------
# a huge max_new_tokens ("until a stop token")


def test_huge_max_new_tokens_streams_without_allocating_it_up_front():
    """max_new_tokens=10**12 (a user's "until --stop or end-of-text") allocates nothing in
    proportion to it: generate_stream yields tokens at once, and its first 40 (past block_size,
    so the buffers grow and the window slides) are those of max_new_tokens=40, whose buffers and
    cache have the same sizes: the same arithmetic."""
    model = varied_model()
    idx = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(5))
    steps = generate_stream(model, idx, 10**12, temperature=0)
    got = [next(steps).item() for _ in range(40)]
    steps.close()
    assert [got] == generate(model, idx, 40, temperature=0)


def test_huge_max_new_tokens_beam_search_ends_at_its_stop_tokens():
    """beam_search with max_new_tokens=10**12 allocates nothing in proportion to it: with stop
    tokens the search ends by itself, with the result of a small max_new_tokens."""
    model = varied_model()
    idx = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(5))
    stop = range(0, 64, 2)  # half the vocabulary: hypotheses finish within a few steps
    small = beam_search(model, idx, 40, num_beams=3, stop_tokens=stop)
    assert 0 < len(small) < 40  # it ended at a stop token, not at max_new_tokens
    assert beam_search(model, idx, 10**12, num_beams=3, stop_tokens=stop) == small
