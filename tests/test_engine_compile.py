"""engine.py's compiled decode step (Engine(compile=True)) against the eager one it compiles."""
import pytest
import torch

import engine
from engine import GREEDY, Engine, KVCache, Request, RowsAtPositions, compiled_decode_rows, quantize
from test_gpt import BF16_ROUNDING, FP32_ROUNDING, logits_rtol, varied_model


@pytest.fixture(scope="module")
def model():
    return varied_model()  # one model for the module: its compiled step is reused


def cache_with_rows_at(model, lengths):
    """A KVCache whose row i holds lengths[i] tokens of a random prompt."""
    cache = KVCache(model.config.n_layer, model.config.block_size, rows=len(lengths))
    g = torch.Generator().manual_seed(0)
    for row, n in enumerate(lengths):
        cache.batch(row, 1)
        model(torch.randint(0, model.config.vocab_size, (1, n), generator=g), kv_cache=cache)
    return cache


@torch.inference_mode()
def test_compiled_decode_step_matches_eager_step(model):
    """One token for rows at different positions, one row sitting out: the compiled step's logits
    are the eager KV-cache step's to fp32 rounding, and it writes the same keys and values into
    the same slots (a key written to a wrong slot, or read past a row's own, moves the logits by
    most of their size; the cache comparison sees a missed write)."""
    lengths, live = [5, 3, 11], [True, False, True]
    eager, compiled = cache_with_rows_at(model, lengths), cache_with_rows_at(model, lengths)
    idx = torch.randint(0, model.config.vocab_size, (3, 1), generator=torch.Generator().manual_seed(1))
    eager.batch(0, 3, live)
    expected = model(idx, kv_cache=eager)[0][:, -1]
    compiled.batch(0, 3, live)
    step = compiled.one_token_each()
    assert isinstance(step, RowsAtPositions)
    got = compiled_decode_rows()(model, idx, step.pos, step.slots, step.longest + 1,
                                 compiled.k.unbind(0), compiled.v.unbind(0))[:, -1]
    rtol = logits_rtol(model.config, FP32_ROUNDING)
    for row in (0, 2):  # a row that sits out gives logits nobody reads
        error = (got[row] - expected[row]).abs().max().item()
        assert error <= rtol * expected[row].abs().max().item(), (row, error)
    n = max(lengths) + 1  # the slots any row holds; the spare last slot takes the sitting-out row's write
    torch.testing.assert_close(compiled.k[:, :, :, :n], eager.k[:, :, :, :n], rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled.v[:, :, :, :n], eager.v[:, :, :, :n], rtol=0, atol=1e-5)


def engine_tokens(model, prompts, max_tokens, compile):
    """Each prompt's greedy tokens, the prompts served together by one Engine."""
    engine = Engine(model, max_rows=len(prompts), compile=compile)
    requests = [Request(prompt, max_tokens, sampling=GREEDY) for prompt in prompts]
    for request in requests:
        engine.add(request)
    tokens = {id(request): [] for request in requests}
    while engine.has_work():
        for out in engine.step():
            tokens[id(out.request)].append(out.token)
    return [tokens[id(request)] for request in requests]


def test_compiled_engine_decodes_eager_tokens(model):
    """Greedy decoding with the compiled step gives the eager engine's tokens: prompts of 1 and 7
    tokens served together (rows at different positions; a one-token prompt decodes into an empty
    cache), well past block_size (16), where the window slides and rows are prefilled again."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (1, 7)]
    expected = engine_tokens(model, prompts, 30, compile=False)
    assert all(len(set(row)) > 3 for row in expected)  # the comparison means something only if the output varies
    assert engine_tokens(model, prompts, 30, compile=True) == expected


@torch.inference_mode()
def test_a_compiled_bf16_step_of_one_row_multiplies_through_the_eager_gemv(monkeypatch):
    """bf16 weights, one row: the compiled step calls linear_without_onednn for every Linear, as
    eager decoding does (a graph left to pick its own kernel multiplies one row through oneDNN),
    and its logits are the eager step's to bf16 rounding."""
    model = quantize(varied_model(), "bf16")
    idx = torch.randint(0, model.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(3))
    eager, compiled = cache_with_rows_at(model, [6]), cache_with_rows_at(model, [6])
    expected = model(idx, kv_cache=eager)[0][0, -1].float()
    calls = []
    gemv = engine.linear_without_onednn
    monkeypatch.setattr(engine, "linear_without_onednn", lambda *args: calls.append(1) or gemv(*args))
    step = compiled.one_token_each()
    got = compiled_decode_rows()(model, idx, step.pos, step.slots, step.longest + 1,
                                 compiled.k.unbind(0), compiled.v.unbind(0))[0, -1].float()
    assert len(calls) == 4 * model.config.n_layer + 1  # each block's four Linears and the head
    rtol = logits_rtol(model.config, BF16_ROUNDING)
    assert (got - expected).abs().max().item() <= rtol * expected.abs().max().item()


@pytest.mark.skipif(not engine.can_pack_fp32(), reason="this torch has no oneDNN")
@torch.inference_mode()
def test_a_compiled_step_of_packed_fp32_weights_is_the_eager_step(monkeypatch):
    """fp32 weights packed for oneDNN (LinearFp32Packed) compile (their product is an operator the
    graph calls as it is): the compiled step's logits are the eager step's to fp32 rounding."""
    monkeypatch.setattr(engine, "FP32_PACKED_MIN_WEIGHTS", 0)  # this model's Linears are tiny
    model = quantize(varied_model(), "fp32")
    assert any(isinstance(m, engine.LinearFp32Packed) for m in model.modules())
    idx = torch.randint(0, model.config.vocab_size, (2, 1), generator=torch.Generator().manual_seed(4))
    eager, compiled = cache_with_rows_at(model, [4, 7]), cache_with_rows_at(model, [4, 7])
    eager.batch(0, 2)
    expected = model(idx, kv_cache=eager)[0][:, -1]
    compiled.batch(0, 2)
    step = compiled.one_token_each()
    got = compiled_decode_rows()(model, idx, step.pos, step.slots, step.longest + 1,
                                 compiled.k.unbind(0), compiled.v.unbind(0))[:, -1]
    rtol = logits_rtol(model.config, FP32_ROUNDING)
    assert (got - expected).abs().max().item() <= rtol * expected.abs().max().item()
