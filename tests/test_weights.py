"""engine.py's weight formats for decoding: each format's quality against fp32 on a trained model
(held-out loss, greedy tokens along one path), each kernel against the matmul of its dequantised
weights, the bytes each format stores, batched decoding against each request alone, and
--weights auto's measurement, cached per machine."""
import copy
import importlib
import json
import re

import pytest
import torch
from torch.nn import functional as F

import engine
from common import UserError
from conftest import require
from engine import Engine, KVCache, Request, generate, next_logits, quantize, weight_bytes
from gpt import GPT, GPTConfig

FORMATS = ("bf16", "fp16", "int8", "int4")
# Held-out loss may rise by at most this over fp32's (BENCHMARKS.md, Weight formats, has the
# figures of config/small.py's model).
LOSS_LIMIT = {"bf16": 0.002, "fp16": 0.002, "int8": 0.01, "int4": 0.1}
# How far a decode step's logits may move from fp32's, as a fraction of the largest |logit|: each
# format's weight rounding (bf16 2^-8, fp16 2^-11; int8 half a step of 1/127 of a row's largest
# |weight|, int4 of 1/15 of a group's range; the quantised formats' bf16 activations 2^-8) grown
# through two layers. Measured on this model: bf16 0.7%, fp16 0.12%, int8 1.4%, int4 8-14% (group
# sizes 32-256); the limits are about twice that.
LOGIT_ERROR = {"bf16": 0.015, "fp16": 0.003, "int8": 0.03, "int4": 0.3}
BLOCK = 64


@pytest.fixture(scope="session")
def trained(shakespeare_path):
    """(model, held-out ids): a char GPT (2 layers, n_embd 64, block 64) trained 600 AdamW steps on
    the first 40,000 characters of tiny shakespeare; held out: 4,096 characters far past them.
    Trained, so that its weights have a trained model's spread and its greedy path few near-ties."""
    text = shakespeare_path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    encode = lambda s: torch.tensor([chars.index(c) for c in s])
    data, held_out = encode(text[:40_000]), encode(text[300_000:300_000 + 64 * BLOCK + 1])
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=len(chars), n_layer=2, n_head=2, n_embd=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(600):
        starts = torch.randint(len(data) - BLOCK - 1, (16,), generator=generator)
        x = torch.stack([data[i:i + BLOCK] for i in starts])
        y = torch.stack([data[i + 1:i + BLOCK + 1] for i in starts])
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval(), held_out


def held_out_loss(model, ids):
    """Mean cross-entropy over windows of BLOCK tokens, computed in fp32 from the model's logits."""
    n = (len(ids) - 1) // BLOCK * BLOCK
    x, y = ids[:n].view(-1, BLOCK), ids[1:n + 1].view(-1, BLOCK)
    with torch.no_grad():
        logits, _ = model(x, targets=torch.zeros_like(x))
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1)).item()


def in_format(model, weights, group_size=engine.INT4_GROUP_SIZE):
    return quantize(copy.deepcopy(model), weights, group_size)


@pytest.mark.parametrize("weights", FORMATS)
def test_held_out_loss_is_within_the_formats_limit(trained, weights):
    """A format's model scores held-out text (prompt-sized forwards: the dequantised matmul, int4's
    kernel) within LOSS_LIMIT of fp32's loss: what the format costs in quality."""
    model, held_out = trained
    fp32 = held_out_loss(model, held_out)
    assert fp32 < 2.6  # trained: a uniform guess over 65 characters scores 4.17
    assert abs(held_out_loss(in_format(model, weights), held_out) - fp32) <= LOSS_LIMIT[weights]


@pytest.mark.parametrize("weights", FORMATS)
def test_greedy_path_of_fp32_is_each_formats_greedy_path_but_at_near_ties(trained, weights):
    """Along fp32's greedy continuation (one token path, so one flipped near-tie cannot send the
    routes apart), the format's cached decode steps (its one-token kernels) give logits within
    LOGIT_ERROR of fp32's, and pick fp32's token wherever fp32's top two logits are further apart
    than twice that error."""
    model, held_out = trained
    prompt = held_out[None, :16]
    [path] = generate(model, prompt, 48, temperature=0)
    tokens = torch.cat([prompt, torch.tensor([path])], dim=1)
    quantized = in_format(model, weights)

    def decode_steps(m):  # (48, V): the logits before each new token, one token per step
        cache = KVCache(m.config.n_layer, tokens.size(1))
        with torch.inference_mode():
            return torch.stack([next_logits(m, tokens, n, cache)[0].float() for n in range(16, tokens.size(1))])
    ref, got = decode_steps(model), decode_steps(quantized)
    assert ref.argmax(-1).tolist() == path and len(set(path)) > 5
    scale = ref.abs().amax(-1)
    assert ((got - ref).abs().amax(-1) <= LOGIT_ERROR[weights] * scale).all()
    top2 = ref.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    differ = got.argmax(-1) != ref.argmax(-1)
    assert (margin[differ] <= 2 * LOGIT_ERROR[weights] * scale[differ]).all()


@pytest.mark.parametrize("weights", ["bf16", "fp16", "int8"])
def test_one_token_kernel_is_the_dequantised_matmul(weights):
    """A decode step's kernel and a prompt's matmul on the dequantised weight are two routes to
    one product: within two bf16 roundings of the magnitudes summed (fp16's both in fp32)."""
    torch.manual_seed(0)
    layer = quantize_linear(torch.nn.Linear(96, 80), weights)
    dtype = engine.WEIGHT_FORMATS[weights]
    x = torch.randn(1, 5, 96).to(dtype)
    one_token = torch.cat([layer(x[:, t:t + 1]) for t in range(5)], dim=1).float()  # (1, 5, 80)
    prompt = layer(x).float()
    w = layer.dequantized(torch.float32)
    magnitude = x.float().abs() @ w.abs().T + layer.bias.float().abs()
    assert ((one_token - prompt).abs() <= 2 * 2**-8 * magnitude + 1e-6).all()


def quantize_linear(linear, weights, group_size=64):
    if weights in ("bf16", "fp16"):
        return engine.Linear16(linear, engine.WEIGHT_FORMATS[weights]).to(engine.WEIGHT_FORMATS[weights])
    return engine.Int8Linear(linear) if weights == "int8" else engine.Int4Linear(linear, group_size)


@pytest.mark.parametrize("group_size", engine.INT4_GROUP_SIZES)
def test_int4_kernel_is_the_matmul_of_its_groups(group_size):
    """Int4Linear through torch's int4 kernel equals x @ W' with W' rebuilt here from the rule
    (each group of group_size weights along a row: 16 levels from its min to its max) within
    bf16's rounding; W' is within half a level of W. 40 rows: padded to 48 for the kernel, the
    extra outputs cut."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 40)
    layer = engine.Int4Linear(linear, group_size)
    w = linear.weight.detach().view(40, -1, group_size)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    step = (high - low) / 15
    rebuilt = (low + torch.round((w - low) / step) * step).view(40, 256)
    assert ((rebuilt - linear.weight).abs() <= step.view(40, -1).repeat_interleave(group_size, 1) / 2 + 1e-6).all()
    x = torch.randn(1, 3, 256).bfloat16()
    got = layer(x).float()
    expected = x.float() @ rebuilt.T + linear.bias.detach()
    magnitude = x.float().abs() @ rebuilt.abs().T + linear.bias.detach().abs()
    assert got.shape == (1, 3, 40)
    # bf16 scales and zeros move each level by 2^-8 of the group's values; the sum is rounded to bf16
    assert ((got - expected).abs() <= 3 * 2**-8 * magnitude).all()


def test_each_format_stores_its_bytes(monkeypatch):
    """weight_bytes of each format's model equals the bytes its format stores, counted here from
    the config: fp32 4 per weight, bf16/fp16 2; int8 1 per weight and a bf16 scale per row; int4
    half a byte per weight (the head's rows padded to a multiple of 16) and a bf16 scale and zero
    per group; biases and LayerNorms in the activations' dtype; the head its own copy (tied in
    fp32 and 16 bits); the looked-up embeddings not counted. Every matmul is in the format (fp32's
    blocks packed for oneDNN where torch has it, its tied head an nn.Linear)."""
    monkeypatch.setattr(engine, "FP32_PACKED_MIN_WEIGHTS", 0)  # pack this model's small Linears too
    config = GPTConfig(block_size=16, vocab_size=70, n_layer=2, n_head=2, n_embd=64)
    C, V, L, g = config.n_embd, config.vocab_size, config.n_layer, 32
    shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * L + [(V, C)]  # (out, in) of every matmul
    weights = sum(n * k for n, k in shapes)
    others = L * (9 * C + 4 * C) + 2 * C  # biases, and LayerNorms' weights and biases
    rows = sum(n for n, _ in shapes)
    expected = {"fp32": 4 * (weights + others), "bf16": 2 * (weights + others), "fp16": 2 * (weights + others),
                "int8": weights + 2 * rows + 2 * others,
                "int4": sum((-(-n // 16) * 16) * k // 2 + 4 * (-(-n // 16) * 16) * (k // g) for n, k in shapes)
                + 2 * others}
    fp32 = engine.LinearFp32Packed if engine.can_pack_fp32() else torch.nn.Linear
    kinds = {"fp32": (fp32, torch.nn.Linear), "bf16": (engine.Linear16,) * 2, "fp16": (engine.Linear16,) * 2,
             "int8": (engine.Int8Linear,) * 2, "int4": (engine.Int4Linear,) * 2}
    for weights_format, size in expected.items():
        torch.manual_seed(0)
        model = quantize(GPT(config), weights_format, g)
        assert weight_bytes(model) == size, weights_format
        block_kind, head_kind = kinds[weights_format]
        blocks = [m for m in model.transformer.h.modules() if isinstance(m, (torch.nn.Linear, engine.LinearForDecoding))]
        assert len(blocks) == 4 * L and all(type(m) is block_kind for m in blocks)
        assert type(model.lm_head) is head_kind


def test_a_linear_whose_width_no_group_divides_stays_int8():
    """int4's groups tile a row: with n_embd 48 (no group size of 32..256 divides it) the Linears
    reading n_embd inputs stay int8 and mlp.c_proj (192 inputs) takes groups of 64."""
    model = quantize(GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=48)), "int4", 128)
    block = model.transformer.h[0]
    assert isinstance(block.attn.c_attn, engine.Int8Linear) and isinstance(model.lm_head, engine.Int8Linear)
    assert isinstance(block.mlp.c_proj, engine.Int4Linear) and block.mlp.c_proj.group_size == 64
    with torch.no_grad():
        assert model(torch.zeros(1, 3, dtype=torch.long))[0].isfinite().all()


@pytest.mark.parametrize("weights", ("fp32", *FORMATS))
def test_batched_decoding_gives_each_request_its_tokens_alone(trained, weights):
    """Four requests with prompts of 1 to 20 tokens decoded together on one Engine (serve.py's
    path), rows at different positions, give each what it gets alone: the same greedy tokens with
    the same logprobs, up to the rounding of the activations (attention over a masked batch adds
    its own in 16 bits), so that a token may differ only where alone its top two are a near-tie.
    A row that read another row's weights' outputs or cache would move its logprobs by far more."""
    model, held_out = trained
    quantized = in_format(model, weights)
    tolerance = 1e-4 if weights == "fp32" else 0.05  # nats: a few roundings of logits of ~10 in 16 bits
    starts = [0, 100, 200, 300]
    requests = lambda: [Request(held_out[s:s + n].tolist(), 24, sampling=engine.GREEDY, logprobs=2)
                        for s, n in zip(starts, [3, 11, 20, 1])]

    def run(engine_, batch):  # each request's [(token, top-2 [(token, logprob)])]
        for request in batch:
            engine_.add(request)
        steps = {id(r): [] for r in batch}
        while engine_.has_work():
            for out in engine_.step():
                steps[id(out.request)].append((out.token, out.top_logprobs))
        return [steps[id(r)] for r in batch]
    # every prompt prefilled in one forward of its own either way: what differs is the decode steps
    together = run(Engine(quantized, max_rows=4, prefill_tokens=4 * BLOCK), requests())
    alone = [run(Engine(quantized, max_rows=1, prefill_tokens=4 * BLOCK), [r])[0] for r in requests()]
    for got, expected in zip(together, alone):
        assert len(got) == len(expected) == 24 and len({token for token, _ in expected}) > 3
        for (token, top), (token_alone, top_alone) in zip(got, expected):
            if token != token_alone:
                assert top_alone[0][1] - top_alone[1][1] <= 2 * tolerance  # a near-tie alone
                break
            assert abs(top[0][1] - top_alone[0][1]) <= tolerance and abs(top[1][1] - top_alone[1][1]) <= tolerance


# --- auto ---------------------------------------------------------------------------------------

def stand_in_timer(monkeypatch, seconds):
    """engine.time_weight_formats replaced by fixed figures; returns the list of its calls."""
    calls = []
    monkeypatch.setattr(engine, "time_weight_formats", lambda model, formats, rows=1: calls.append(formats) or seconds)
    return calls


def test_auto_measures_once_per_machine_and_reads_the_cache_after(trained, tmp_path, monkeypatch):
    """choose_weights measures on the first load and caches the choice (a JSON file) under a key of
    the CPU, its ISA limits, torch and the model's shape: a second load reads it without measuring;
    another ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA is another machine, measured anew; a corrupt
    cache is measured anew and rewritten."""
    model, _ = trained
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path))
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)
    calls = stand_in_timer(monkeypatch, {"fp32": 3.0, "fp16": 2.0, "bf16": 1.0, "int8": 0.95})
    assert engine.choose_weights(model, "cpu")[0] == "bf16"
    assert len(calls) == 1 and set(calls[0]) == set(engine.AUTO_CANDIDATES)
    weights, note = engine.choose_weights(model, "cpu")
    assert weights == "bf16" and "measured before" in note and len(calls) == 1
    for name, value in (("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")):
        monkeypatch.setenv(name, value)
        engine.choose_weights(model, "cpu")
        assert len(calls) == (2 if name == "ATEN_CPU_CAPABILITY" else 3)
        engine.choose_weights(model, "cpu")
        assert len(calls) == (2 if name == "ATEN_CPU_CAPABILITY" else 3)
    assert len(json.loads((tmp_path / "weights.json").read_text())) == 3
    (tmp_path / "weights.json").write_text("{not json")
    engine.choose_weights(model, "cpu")
    assert len(calls) == 4 and len(json.loads((tmp_path / "weights.json").read_text())) == 1
    other_shape = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32))
    engine.choose_weights(other_shape, "cpu")
    assert len(calls) == 5


@pytest.mark.parametrize("seconds, chosen", [
    ({"fp32": 3.0, "fp16": 2.0, "bf16": 1.0, "int8": 0.95}, "bf16"),  # int8 within 10% of bf16
    ({"fp32": 3.0, "fp16": 1.0, "bf16": 0.95, "int8": 0.5}, "int8"),
    ({"fp32": 1.0, "fp16": 0.95, "bf16": 0.92, "int8": 2.0}, "fp32"),  # no clear win: the exact one
    ({"fp32": 3.0, "fp16": 1.0, "bf16": 1.5, "int8": 0.95}, "fp16"),
])
def test_auto_picks_the_fastest_unless_a_more_exact_one_is_within_10_percent(seconds, chosen, trained,
                                                                              tmp_path, monkeypatch):
    """Of the candidates (the formats whose loss stays within 0.01 of fp32's: not int4), auto picks
    the fastest; a rounder format replaces a more exact one only when >10% faster. On a GPU it is
    bf16 or fp16 without measuring."""
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path))
    calls = stand_in_timer(monkeypatch, seconds)
    assert engine.choose_weights(trained[0], "cpu")[0] == chosen
    assert "int4" not in engine.AUTO_CANDIDATES
    monkeypatch.setattr(engine.common, "cuda_has_bf16", lambda device: True)
    assert engine.choose_weights(trained[0], "cuda")[0] == "bf16" and len(calls) == 1


def test_auto_chooses_for_the_rows_decoded_together(trained, tmp_path, monkeypatch):
    """auto times a step of as many rows as the caller decodes together (serve.py: --max_batch) and
    caches that choice apart from one row's: a format fastest for one row need not be for 16."""
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path))
    one_row, many_rows = {"fp32": 3.0, "fp16": 1.0, "bf16": 1.05, "int8": 2.0}, {"fp32": 9.0, "fp16": 8.0, "bf16": 2.0, "int8": 5.0}
    rows_timed = []
    monkeypatch.setattr(engine, "time_weight_formats",
                        lambda model, formats, rows=1: rows_timed.append(rows) or (one_row if rows == 1 else many_rows))
    assert engine.choose_weights(trained[0], "cpu")[0] == "fp16"
    assert engine.choose_weights(trained[0], "cpu", rows=16)[0] == "bf16"
    assert engine.choose_weights(trained[0], "cpu")[0] == "fp16" and rows_timed == [1, 16]


def test_auto_times_copies_and_leaves_the_model_as_it_was():
    """time_weight_formats times a decode step (of 3 rows here) of every format on copies: the model
    it timed keeps its fp32 weights, values and modules."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    seconds = engine.time_weight_formats(model, engine.AUTO_CANDIDATES, rows=3)
    assert set(seconds) == set(engine.AUTO_CANDIDATES) and all(s > 0 for s in seconds.values())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) and after[name].dtype == torch.float32 for name in before)
    assert all(type(m) is not engine.Int8Linear for m in model.modules())


@pytest.mark.parametrize("script", ["sample", "serve"])
@pytest.mark.parametrize("argv, needle", [
    (["--weights=int8", "--dtype=float32"], "--dtype sets the autocast precision of fp32 weights"),
    (["--weights=bf16", "--dtype=bfloat16"], "--dtype sets the autocast precision of fp32 weights"),
    (["--weights=int8", "--group_size=32"], "--group_size 32 applies to --weights int4"),
])
def test_weights_and_dtype_name_one_precision_each(script, argv, needle):
    """--dtype is the autocast precision of fp32 weights and --group_size int4's: given with another
    format they are a UserError, in sample.py and serve.py alike; the combinations that mean
    something parse."""
    if script == "serve":
        require("fastapi", reason="serve.py needs fastapi and uvicorn (requirements-dev.txt)")
    parse = importlib.import_module(script).parse_args
    with pytest.raises(UserError, match=re.escape(needle)):
        parse(argv)
    assert parse(["--weights=fp32", "--dtype=bfloat16"]).dtype == "bfloat16"
    assert parse(["--weights=int4", "--group_size=32"]).group_size == 32


def test_a_torch_without_a_formats_kernel_says_so_and_auto_leaves_it_out(trained, tmp_path, monkeypatch):
    """int8 and int4 need kernels only recent torch versions have: where one is missing, asking for
    its format is a UserError naming it, and auto times the other candidates only."""
    monkeypatch.setitem(engine.KERNELS, "int8", "_no_such_kernel")
    with pytest.raises(UserError, match="--weights int8 needs torch's _no_such_kernel"):
        engine.load_model(tmp_path / "best.pt", device="cpu", weights="int8")
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path))
    calls = stand_in_timer(monkeypatch, {"fp32": 3.0, "fp16": 2.0, "bf16": 1.0})
    assert engine.choose_weights(trained[0], "cpu")[0] == "bf16" and calls == [["fp32", "fp16", "bf16"]]
