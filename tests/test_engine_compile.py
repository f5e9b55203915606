"""engine.py's compiled decode step (Engine(compile=True)) against the eager one it compiles."""
import pytest
import torch

from engine import KVCache, RowsAtPositions, compiled_decode_rows, generate
from test_gpt import FP32_ROUNDING, logits_rtol, varied_model


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


def test_compiled_engine_decodes_eager_tokens(model):
    """Greedy generation with the compiled decode step gives the eager engine's tokens: two prompts
    of different lengths (rows at different positions), well past block_size (16), where the
    window slides and the rows are prefilled again."""
    prompts = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    prompts[1, :3] = prompts[0, :3]
    expected = generate(model, prompts, 30, temperature=0)
    assert all(len(set(row)) > 3 for row in expected)  # the comparison means something only if the output varies
    assert generate(model, prompts, 30, temperature=0, compile=True) == expected
