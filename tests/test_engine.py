"""engine.py: cached decoding against recomputation, rows at different positions against each row
alone, continuous batching's scheduling, sampling on hand-made logits, beam search, weight formats."""
import pytest
import torch
from torch.nn import functional as F

import engine
from engine import (GREEDY, Engine, Int8Linear, KVCache, Request, Sampling, beam_search, generate, generate_stream,
                    next_logits, quantize, sample_next_token, store_linear_weights_transposed)
import gpt
from gpt import GPT
from test_gpt import BF16_ROUNDING, FP32_ROUNDING, all_logits, logits_rtol, varied_model


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
    return set(sample_next_token(batch, Sampling(**kwargs), generator=g).tolist())


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
    kv_cache = KVCache(model.config.n_layer, model.config.block_size, rows=2)
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
    kv_cache = KVCache(model.config.n_layer, 16, rows=2)
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
    # A stop token that row 0 produces (at i) before row 1 does: row 0 then waits for row 1.
    i, stop = next((i, t) for i, t in enumerate(free[0]) if t not in free[1][:i + 2])
    first = [row.index(stop) if stop in row else None for row in free]
    cut = generate(model, idx, 20, temperature=0, stop_tokens=[stop])
    assert cut == [row[:j] if j is not None else row for row, j in zip(free, first)]
    assert cut[0] == free[0][:i] and len(cut[1]) > i
    steps = torch.stack(list(generate_stream(model, idx[:1], 20, temperature=0, stop_tokens=[stop])), 1)
    assert steps[0].tolist() == free[0][:i + 1]
    batch_steps = torch.stack(list(generate_stream(model, idx, 20, temperature=0, stop_tokens=[stop])), 1)
    assert batch_steps.size(1) == len(cut[1]) + (first[1] is not None) > i + 1
    assert batch_steps[0, i:].eq(stop).all()


def test_empty_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(varied_model(), torch.zeros(1, 0, dtype=torch.long), 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_queries_attend_to_an_fp32_cache_in_fp32(dtype):
    """16-bit queries over keys and values cached in fp32 (KVCache on a CPU) give fp32 attention of
    the same values, rounded once to the queries' dtype, with autocast on or off: autocast must not
    cast the cache back to 16 bits, and fp32 must not leak into the 16-bit residual stream."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 1, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 3, 9, 16, generator=g).to(dtype).float() for _ in range(2))
    mask = torch.arange(9) < torch.tensor([[5], [9]])  # row 0 sees 5 slots, row 1 all 9
    expected = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask[:, None, None, :]).to(dtype)
    assert torch.equal(gpt.attention(q, k, v, mask[:, None, None, :], False, 0.0), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(gpt.attention(q, k, v, mask[:, None, None, :], False, 0.0), expected)


def test_generation_under_bf16_autocast_follows_float32_recompute():
    """Under bf16 autocast the CPU cache holds the bf16 keys and values in fp32 (attention over it
    runs in fp32, autocast kept off), and cached decoding, through block_size and past it, gives
    the float32 model's logits on the same tokens to bf16 accuracy."""
    model = varied_model()
    prompt = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, logits, kv_cache = cached_greedy_route(model, prompt, 30)
    assert kv_cache.k.dtype == kv_cache.v.dtype == torch.float32
    assert len(set(tokens[0, 4:].tolist())) > 3  # the path varies
    assert_recompute_follows(model, tokens, logits, logits_rtol(model.config, BF16_ROUNDING))


# ----------------------------------------------------------------------------------------------
# continuous batching


def run_engine(engine, requests):
    """Add `requests` and step the engine until it is idle: each request's tokens (choice 0), its
    logprob rows (all V tokens' logprobs, when asked), and the step at which it first got a token."""
    for request in requests:
        engine.add(request)
    tokens = {id(r): [[] for _ in range(r.n)] for r in requests}
    logprobs = {id(r): [] for r in requests}
    first_step = {}
    step = 0
    while engine.has_work():
        for out in engine.step():
            first_step.setdefault(id(out.request), step)
            if out.token is not None:
                tokens[id(out.request)][out.index].append(out.token)
            if out.top_logprobs and out.index == 0:
                logprobs[id(out.request)].append(torch.tensor([lp for _, lp in sorted(out.top_logprobs)]))
        step += 1
    return ([tokens[id(r)] for r in requests], [logprobs[id(r)] for r in requests],
            [first_step.get(id(r)) for r in requests])


def greedy_request(prompt, max_tokens, V=64, **kwargs):
    return Request(prompt, max_tokens, sampling=GREEDY, logprobs=V, **kwargs)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (n,), generator=g).tolist() for n in lengths]


def test_one_sequence_runs_exactly_the_plain_cache_arithmetic():
    """One request on the engine gives, bit for bit, the logits of next_logits over a KVCache (the
    cache route without rows at different positions), through block_size and past it."""
    model = varied_model()
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    [[tokens]], [logprobs], _ = run_engine(Engine(model, max_rows=4), [greedy_request(prompt[0].tolist(), 30)])
    route_tokens, logits, _ = cached_greedy_route(model, prompt, 30)
    assert tokens == route_tokens[0, 5:].tolist()
    assert torch.equal(torch.stack(logprobs), F.log_softmax(logits, dim=-1))


def test_rows_at_different_positions_decode_as_each_alone():
    """Four requests with prompts of 1 to 20 tokens (rows at different positions, the longest
    sliding past block_size 16) decoded together: each gives its greedy tokens alone, and every
    step's logprobs are within fp32 rounding of its own recomputed logits. A row that saw another
    row's keys, or a wrong position, moves them by most of their size."""
    model = varied_model()
    requests = [greedy_request(p, 24) for p in prompts([3, 11, 20, 1])]
    tokens, logprobs, _ = run_engine(Engine(model, max_rows=4, prefill_tokens=8), requests)
    rtol = logits_rtol(model.config, FP32_ROUNDING)
    for request, [got], rows in zip(requests, tokens, logprobs):
        [alone] = generate(model, torch.tensor([request.prompt]), 24, temperature=0)
        assert got == alone and len(set(got)) > 3
        context = torch.tensor([request.prompt + got])
        for step, n in enumerate(range(len(request.prompt), context.size(1))):
            with torch.no_grad():
                expected = model(context[:, max(0, n - 16):n])[0][0, -1]
            # logprobs = logits - logsumexp: twice the logits' bound
            assert (rows[step] - F.log_softmax(expected, -1)).abs().max() <= 2 * rtol * expected.abs().max()


def test_prompts_admitted_together_are_prefilled_in_one_forward(monkeypatch):
    """Four prompts of one length arriving together take one prefill forward (4 rows next to each
    other, at one position), a fifth of another length its own, and each request gets the greedy
    tokens it gets alone."""
    model = varied_model()
    requests = [greedy_request(p, 8) for p in prompts([6, 6, 6, 6, 9], seed=13)]
    shapes = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, idx, *a, **k: shapes.append(tuple(idx.shape)) or forward(self, idx, *a, **k))
    tokens, _, first_step = run_engine(Engine(model, max_rows=5, prefill_tokens=64), requests)
    assert [s for s in shapes if s[1] > 1] == [(4, 6), (1, 9)] and first_step == [0] * 5
    monkeypatch.setattr(type(model), "forward", forward)
    for request, [got] in zip(requests, tokens):
        assert got == generate(model, torch.tensor([request.prompt]), 8, temperature=0)[0]


def test_chunked_prefill_equals_one_shot_prefill():
    """A 15-token prompt prefilled 4 tokens per step gives the greedy tokens and, within fp32
    rounding, the logprobs of the whole prompt in one forward; prompt logprobs too."""
    model = varied_model()
    [prompt] = prompts([15], seed=4)
    runs = [run_engine(Engine(model, max_rows=2, prefill_tokens=budget),
                       [greedy_request(prompt, 10, prompt_logprobs=True)]) for budget in (4, 16)]
    (chunked_tokens, chunked_lp, first_chunked), (whole_tokens, whole_lp, first_whole) = runs
    assert first_chunked == [3] and first_whole == [0]  # 4 + 4 + 4 + 3 tokens: the fourth step
    assert chunked_tokens == whole_tokens
    torch.testing.assert_close(torch.stack(chunked_lp[0]), torch.stack(whole_lp[0]), atol=1e-5, rtol=0)


def test_prompt_logprobs_are_the_models_loss_on_the_prompt():
    """prompt_logprobs (OpenAI's echo) scored in chunks: None for the first token, then each
    token's log-probability; their mean is minus the model's cross-entropy on the prompt.
    max_tokens=0 scores without generating."""
    model = varied_model()
    [prompt] = prompts([16], seed=5)
    request = Request(prompt, 0, prompt_logprobs=True)
    tokens, _, _ = run_engine(Engine(model, prefill_tokens=5), [request])
    assert tokens == [[[]]] and request.prompt_logprobs[0] == (None, None) and len(request.prompt_logprobs) == 16
    idx = torch.tensor([prompt])
    with torch.no_grad():
        _, loss = model(idx[:, :-1], idx[:, 1:])
    mean = -sum(lp for lp, _ in request.prompt_logprobs[1:]) / 15
    assert abs(mean - loss.item()) <= 1e-5 * loss.item()


def test_a_reused_row_carries_nothing_of_its_last_request():
    """A row that held a 20-token context gives the next request exactly what a fresh cache gives."""
    model = varied_model()
    long, short = prompts([20, 3], seed=6)
    engine = Engine(model, max_rows=1)
    run_engine(engine, [greedy_request(long, 10)])
    reused = run_engine(engine, [greedy_request(short, 12)])
    fresh = run_engine(Engine(model, max_rows=1), [greedy_request(short, 12)])
    assert reused[0] == fresh[0]
    assert all(torch.equal(a, b) for a, b in zip(reused[1][0], fresh[1][0]))


def test_a_cancelled_request_frees_its_row_within_one_step():
    """With one row, a running request cancelled from outside leaves at the next step, and the
    waiting one is admitted and gets its first token in that same step; a cancelled waiting
    request never runs."""
    model = varied_model()
    running, waiting, never = (greedy_request(p, 50) for p in prompts([4, 4, 4], seed=7))
    engine = Engine(model, max_rows=1)
    for request in (running, waiting, never):
        engine.add(request)
    assert {out.request for out in engine.step()} == {running}
    never.cancel()
    running.cancel()
    outputs = engine.step()
    assert {out.request for out in outputs} == {waiting} and engine.rows == waiting.choices
    while engine.has_work():
        assert all(out.request is waiting for out in engine.step())
    assert never.choices == []


def test_three_times_the_row_limit_all_finish_in_order_of_arrival():
    """Twelve requests on four rows: each gets its own greedy text (as alone), and requests start
    in order of arrival (first come, first served) as rows free up."""
    model = varied_model()
    requests = [greedy_request(p, 4 + i % 3) for i, p in enumerate(prompts([2 + i % 5 for i in range(12)], seed=8))]
    tokens, _, first_step = run_engine(Engine(model, max_rows=4, prefill_tokens=64), requests)
    assert first_step == sorted(first_step) and first_step[-1] > first_step[0]
    for request, [got] in zip(requests, tokens):
        assert got == generate(model, torch.tensor([request.prompt]), request.max_tokens, temperature=0)[0]


def test_a_seeded_request_gives_the_same_text_alone_and_amid_fifteen_others():
    """Each request draws from its own generator: a seeded request of n=2 choices (temperature,
    top-k, top-p and penalties) samples the same tokens alone and among 15 others of every kind
    admitted before and after it, at other positions."""
    model = varied_model()
    settings = Sampling(temperature=1.3, top_k=30, top_p=0.95, repetition_penalty=1.2, presence_penalty=0.5)
    make = lambda: Request(prompts([6], seed=9)[0], 25, n=2, sampling=settings, seed=1234)
    others = [Request(p, 10 + i, sampling=Sampling(temperature=0.5 + i / 10, frequency_penalty=i / 10), seed=i)
              for i, p in enumerate(prompts([1 + i for i in range(15)], seed=10))]
    [alone], _, _ = run_engine(Engine(model, max_rows=2), [make()])
    crowd, _, _ = run_engine(Engine(model, max_rows=17, prefill_tokens=16), others[:7] + [make()] + others[7:])
    assert crowd[7] == alone and alone[0] != alone[1]
    assert len(set(alone[0])) > 5  # a sample, not a repeated token


def test_n_choices_share_the_prompt_and_equal_separate_requests_when_greedy():
    """n=3 greedy choices are three copies of the prompt's cache: each equals one request alone."""
    model = varied_model()
    [prompt] = prompts([7], seed=11)
    [choices], _, _ = run_engine(Engine(model, max_rows=3, prefill_tokens=3), [greedy_request(prompt, 12, n=3)])
    [[alone]], _, _ = run_engine(Engine(model, max_rows=1), [greedy_request(prompt, 12)])
    assert choices == [alone] * 3


def test_a_choice_finished_by_the_caller_leaves_the_others_as_they_were():
    """engine.finish (a stop string found by the caller, between steps, outside inference mode)
    ends one choice of several; its row is filled by the last one, and the choices still running
    go on with the tokens they get without it."""
    model = varied_model()
    [prompt] = prompts([5], seed=12)
    [alone], _, _ = run_engine(Engine(model, max_rows=4), [greedy_request(prompt, 10, n=4)])
    engine = Engine(model, max_rows=4)
    request = greedy_request(prompt, 10, n=4)
    engine.add(request)
    got = [[] for _ in range(4)]
    while engine.has_work():
        for out in engine.step():
            got[out.index].append(out.token)
        if len(got[1]) == 3 and request.choices[1].finish_reason is None:
            engine.finish(request, 1)
    assert got == [alone[0], alone[1][:3], alone[2], alone[3]]
    assert [seq.finish_reason for seq in request.choices] == ["length", "stop", "length", "length"]


def test_requests_the_engine_cannot_hold_are_refused():
    """More choices than rows, and a scored prompt longer than the context, are clear errors."""
    engine = Engine(varied_model(), max_rows=2)
    with pytest.raises(ValueError, match="n=3 choices need more rows than the engine has"):
        engine.add(Request([1], 5, n=3))
    with pytest.raises(ValueError, match="needs at most block_size 16"):
        engine.add(Request(list(range(17)), 0, prompt_logprobs=True))
    with pytest.raises(ValueError, match="prompt is empty"):
        Request([], 5)
    short = Engine(varied_model(), max_rows=2, max_len=10)
    with pytest.raises(ValueError, match="6 prompt \\+ 5 new tokens do not fit the engine's 10-token rows"):
        short.add(Request(list(range(6)), 5))


def test_rows_sized_to_their_requests_decode_as_whole_context_rows():
    """An Engine whose rows hold only prompt + max_tokens (generate_stream's) gives the logits and
    tokens of one whose rows hold block_size, allocating only those slots."""
    model = varied_model()
    [prompt] = prompts([6], seed=3)
    runs, slots = {}, {}
    for max_len in (None, 6 + 5):
        engine = Engine(model, max_rows=1, max_len=max_len)
        tokens, logprobs, _ = run_engine(engine, [greedy_request(prompt, 5)])
        runs[max_len], slots[max_len] = (tokens[0][0], torch.stack(logprobs[0])), engine.cache.k.size(3)
    assert slots == {None: model.config.block_size + 1, 11: 11 + 1}
    assert runs[11][0] == runs[None][0] and len(runs[11][0]) == 5
    assert torch.equal(runs[11][1], runs[None][1])


# ----------------------------------------------------------------------------------------------
# sampling on hand-made logits


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample_next_token(logits, GREEDY).tolist() == [1, 0]


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
    seen = torch.tensor([[True, False]])
    out = sample_next_token(torch.tensor([logits]), Sampling(temperature=0, repetition_penalty=penalty), seen=seen)
    assert out.item() == expected


def test_repetition_penalty_counts_a_token_once_and_spares_unseen_ones():
    """A token seen (even twice) is penalised once (3 / 1.4 = 2.14 still beats 2; twice would be
    1.53); the engine's seen mask holds each prompt token once, however often it occurs."""
    logits = torch.tensor([[3.0, 2.0, 2.1]])
    out = sample_next_token(logits, Sampling(temperature=0, repetition_penalty=1.4), seen=torch.tensor([[True, True, False]]))
    assert out.item() == 0
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.7, 0.2, 0.1]]).log().expand(4000, -1)
    seen = torch.tensor([[True, False, False]]).expand(4000, -1)
    # The same draws with and without a penalty on token 0: token 0 loses exactly its share.
    plain = sample_next_token(probs, generator=g1)
    penalised = sample_next_token(probs, Sampling(repetition_penalty=2.0), seen=seen, generator=g2)
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
    counts = torch.tensor([[2.0, 1.0, 0.0]])
    settings = Sampling(temperature=0, frequency_penalty=frequency, presence_penalty=presence)
    out = sample_next_token(logits, settings, seen=torch.tensor([[True, True, True]]), counts=counts)
    assert out.item() == expected == (logits[0] - counts[0] * frequency - (counts[0] > 0) * presence).argmax().item()
    none_yet = sample_next_token(logits, Sampling(temperature=0, frequency_penalty=5.0), counts=torch.zeros(1, 3))
    assert none_yet.item() == 0  # nothing generated yet: nothing to penalise


def test_a_draw_at_the_very_top_of_the_cumulative_probability_stays_on_an_allowed_token(monkeypatch):
    """The inverse-transform draw picks the first token whose cumulative probability passes u * total;
    should u * total round up to the total itself, the row takes its most likely token, never one
    that top-k removed (probability 0) at the end of the vocabulary."""
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]])
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones_like(real_rand(*a, **k)))  # u = 1: the total
    assert sample_next_token(logits, Sampling(top_k=2)).tolist() == [1]
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros_like(real_rand(*a, **k)))  # u = 0
    assert sample_next_token(logits, Sampling(top_k=2)).tolist() == [1]  # the first token with probability


def test_same_seed_same_sample_different_seed_different():
    logits = torch.zeros(8, 1000)  # uniform: 8 draws collide by chance with probability 1e-24
    draw = lambda seed: sample_next_token(logits, Sampling(), generator=torch.Generator().manual_seed(seed)).tolist()
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    model = varied_model()
    idx = torch.randint(0, 64, (2, 4))
    run = lambda seed: generate(model, idx, 30, temperature=1.5, top_k=40, top_p=0.95,
                                generator=torch.Generator().manual_seed(seed))
    assert run(7) == run(7) and run(7) != run(8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature must be >= 0"), (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be >= 1"), (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"), (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    (dict(temperature=float("inf")), "temperature must be >= 0"), (dict(frequency_penalty=float("inf")), "frequency_penalty must be finite"),
])
def test_bad_sampling_settings_are_clear_errors(kwargs, message):
    """A setting outside its range is refused with a message naming it and its range."""
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1e-310), dict(temperature=1e-45), dict(temperature=1e308), dict(repetition_penalty=1e-300),
    dict(repetition_penalty=1e300), dict(repetition_penalty=1e-300, temperature=1e-310),
    dict(top_p=1e-300), dict(top_k=10**12), dict(frequency_penalty=1e6, presence_penalty=-1e6),
])
def test_every_accepted_extreme_setting_gives_a_token(kwargs):
    """Any setting Sampling accepts gives a valid token, never inf/nan probabilities: a tiny
    temperature acts as greedy, a huge one as uniform, a tiny penalty pushes seen tokens to the
    extremes without overflowing. Logits are large and of both signs, with a penalised row."""
    logits = torch.tensor([[80.0, -70.0, 3.0, 0.0, -1e-3], [5.0, 5.0, -2.0, 1e4, -1e4]])
    seen = torch.tensor([[True, True, False, False, True], [False, True, True, True, False]])
    counts = torch.tensor([[3.0, 0, 1, 0, 0], [0, 2, 0, 0, 1]])
    tokens = sample_next_token(logits, Sampling(**kwargs), seen=seen, counts=counts,
                               generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2,) and ((0 <= tokens) & (tokens < 5)).all()
    if kwargs == dict(temperature=1e-310):  # in effect greedy
        assert tokens.tolist() == logits.argmax(-1).tolist()


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
# weight formats


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
    """quantize(model, "int8"): logits and loss within a few % of the fp32 model's; and cached decoding (bf16,
    int8 weights), through block_size and past it, gives recomputation's logits on the same tokens
    to bf16 accuracy."""
    model = varied_model()
    quantized = quantize(varied_model(), "int8")
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
    assert kv_cache.k.dtype == torch.float32  # bf16 values, held in fp32 on a CPU
    assert len(set(tokens[0, 5:].tolist())) > 3
    assert_recompute_follows(quantized, tokens, logits, logits_rtol(quantized.config, BF16_ROUNDING))


def test_bf16_weights_decode_as_float32_recompute_to_bf16_accuracy():
    """A model stored in bf16 (what sample.py and serve.py decode with where bf16 is faster), cached,
    through block_size and past it, gives the float32 model's recomputed logits on the same tokens
    to bf16 accuracy: its cache holds bf16 values, in fp32 on a CPU."""
    model = varied_model()
    half = varied_model().to(torch.bfloat16)
    prompt = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(4))
    tokens, logits, kv_cache = cached_greedy_route(half, prompt, 30)
    assert kv_cache.k.dtype == torch.float32 and len(set(tokens[0, 4:].tolist())) > 3
    assert_recompute_follows(model, tokens, logits, logits_rtol(model.config, BF16_ROUNDING))


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


@pytest.mark.skipif(not engine.can_pack_fp32(), reason="this torch has no oneDNN")
def test_fp32_weights_packed_for_onednn_are_the_same_model(monkeypatch):
    """quantize(model, "fp32") packs a block's Linear for oneDNN when it has at least
    FP32_PACKED_MIN_WEIGHTS weights (the head stays the tied nn.Linear): its logits are the
    untouched model's to fp32 rounding, for prompts (several rows) and for cached decoding, one row
    and rows at different positions. Smaller Linears, and any under autocast, stay nn.Linear."""
    model = varied_model()
    assert not any(isinstance(m, engine.LinearFp32Packed) for m in quantize(varied_model(), "fp32").modules())
    monkeypatch.setattr(engine, "FP32_PACKED_MIN_WEIGHTS", 0)  # this model's Linears are tiny
    packed = quantize(varied_model(), "fp32")
    blocks = [m for m in packed.transformer.h.modules() if isinstance(m, (torch.nn.Linear, engine.LinearForDecoding))]
    assert len(blocks) == 4 * packed.config.n_layer and all(isinstance(m, engine.LinearFp32Packed) for m in blocks)
    assert packed.lm_head.weight is packed.transformer.wte.weight
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(idx, idx)[0], model(idx, idx)[0], rtol=1e-5, atol=1e-5)
    tokens, logits, _ = cached_greedy_route(packed, idx[:1, :5], 40)
    assert_recompute_follows(model, tokens, logits, logits_rtol(model.config, FP32_ROUNDING))
    [a, b] = prompts([3, 9], seed=4)
    assert run_engine(Engine(packed, max_rows=2), [greedy_request(a, 6), greedy_request(b, 6)])[0] == \
        [run_engine(Engine(model, max_rows=1), [greedy_request(p, 6)])[0][0] for p in (a, b)]
    autocast = quantize(varied_model(), "fp32", autocast=True)
    assert all(isinstance(m, torch.nn.Linear) for m in autocast.modules() if hasattr(m, "in_features"))


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
