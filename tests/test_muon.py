"""optim.py's Muon and train.py's optimizer=muon: the update is torch.optim.Muon's (bit for bit
with bf16 Newton-Schulz, within bf16 rounding in fp32), AdamW's groups stay what they are, the
schedule drives each group's own LR, a resume is exact, 2 DDP ranks train as 1 rank, and fsdp is
refused in one line."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_one_line_error, run_in_process
from test_train import TINY, losses, metrics, train_run
import gpt
import optim
import schedule
import train

MUON = ["--optimizer=muon", "--muon_lr=0.05", "--muon_momentum_warmup_iters=10"]
SHAPES = [(48, 16), (16, 64), (32, 32)]  # tall (transposed inside), wide, square
STACKED_SHAPES = SHAPES + [(48, 16), (16, 64)]  # repeated shapes are orthogonalized as one stack
BF16_U = 2.0 ** -8  # bf16's unit roundoff: 8 significant bits


def matrices_and_grads(steps, seed=0, shapes=SHAPES):
    """A weight matrix of each of `shapes` and `steps` gradients for each."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(steps)]
    return params, grads


def updates(optimizer, params, grads):
    """Each step's change of each parameter, stepping `optimizer` over `params` with `grads`."""
    changes = []
    for step_grads in grads:
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
        changes.append([p.detach() - b for p, b in zip(params, before)])
    return changes


def twin_params(params):
    return [torch.nn.Parameter(p.clone()) for p in params]


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_with_bf16_newton_schulz_is_torch_muon_bit_for_bit(nesterov):
    """With bf16 Newton-Schulz, optim.Muon computes torch.optim.Muon's operations in its order:
    over several steps (momentum, weight decay, tall and wide matrices) the parameters are equal."""
    params, grads = matrices_and_grads(steps=4)
    ours, theirs = twin_params(params), twin_params(params)
    settings = dict(lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=nesterov)
    updates(optim.Muon(ours, ns_dtype=torch.bfloat16, **settings), ours, grads)
    updates(torch.optim.Muon(theirs, **settings), theirs, grads)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_the_momentum_warm_up_is_torch_muon_with_modded_nanogpts_ramp():
    """momentum_warmup_iters: step t uses momentum (1 - f) 0.85 + f m with f = min(t / warmup, 1),
    as modded-nanogpt ramps it; torch.optim.Muon given that momentum at each step agrees bit for bit."""
    params, grads = matrices_and_grads(steps=6)
    ours, theirs = twin_params(params), twin_params(params)
    warmup, momentum = 4, 0.95
    updates(optim.Muon(ours, lr=0.02, momentum=momentum, momentum_warmup_iters=warmup), ours, grads)
    reference = torch.optim.Muon(theirs, lr=0.02, momentum=momentum, weight_decay=0.0)
    for t, step_grads in enumerate(grads):
        f = min(t / warmup, 1.0)
        reference.param_groups[0]["momentum"] = (1 - f) * 0.85 + f * momentum
        updates(reference, theirs, [step_grads])
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_fp32_newton_schulz_agrees_with_torch_muon_within_bf16_rounding():
    """In fp32 (CPUs without native bf16) each step's update differs from torch's bf16 one only by
    bf16's rounding inside Newton-Schulz: x and its polynomial are rounded once per iteration, each
    by at most u = 2^-8 relative, and the iteration does not amplify it (it pulls the singular values
    into a fixed band), so the difference's RMS is within 2 x 5 x u of the update's RMS."""
    params, grads = matrices_and_grads(steps=4, seed=1)
    ours, theirs = twin_params(params), twin_params(params)
    settings = dict(lr=0.02, momentum=0.95, weight_decay=0.1)
    mine = updates(optim.Muon(ours, ns_dtype=torch.float32, **settings), ours, grads)
    reference = updates(torch.optim.Muon(theirs, **settings), theirs, grads)
    rms = lambda t: t.pow(2).mean().sqrt().item()
    for step_mine, step_reference in zip(mine, reference):
        for a, b in zip(step_mine, step_reference):
            assert 0 < rms(a - b) <= 2 * optim.NS_STEPS * BF16_U * rms(b)


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_matrices_of_one_shape_orthogonalized_as_a_stack_agree_with_torch_muon(ns_dtype):
    """Same-shape updates go through Newton-Schulz as one stack of batched matmuls, which may round
    differently from one matrix's: each update stays within bf16's rounding inside Newton-Schulz of
    torch.optim.Muon's (2 x 5 x u of its RMS, as above), for every matrix of every step."""
    params, grads = matrices_and_grads(steps=4, seed=3, shapes=STACKED_SHAPES)
    ours, theirs = twin_params(params), twin_params(params)
    settings = dict(lr=0.02, momentum=0.95, weight_decay=0.1)
    mine = updates(optim.Muon(ours, ns_dtype=ns_dtype, **settings), ours, grads)
    reference = updates(torch.optim.Muon(theirs, **settings), theirs, grads)
    rms = lambda t: t.pow(2).mean().sqrt().item()
    for step_mine, step_reference in zip(mine, reference):
        for a, b in zip(step_mine, step_reference):
            assert rms(a - b) <= 2 * optim.NS_STEPS * BF16_U * rms(b)


def test_orthogonalize_brings_every_singular_value_into_newton_schulzs_band():
    """Muon's update is about U V^T: a gradient's singular values down to ~1/500 of its Frobenius
    norm (five steps of the quintic, whose slope at 0 is 3.4445, lift those by 3.4445^5 ~ 480; here
    0.1 to 10, the smallest 1/200 of the norm) all land in the band the quintic keeps (~0.68 to
    ~1.2), in fp32 and bf16."""
    generator = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(64, 32, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=generator))
    g = u @ torch.diag(torch.logspace(-1, 1, 32)) @ v.T
    for dtype in (torch.float32, torch.bfloat16):
        singular = torch.linalg.svdvals(optim.orthogonalize(g, dtype).float())
        assert singular.min() > 0.65 and singular.max() < 1.25, (dtype, singular)


def test_muon_takes_matrices_only():
    with pytest.raises(ValueError, match=r"Muon takes 2-D parameters only, got one of shape \(4,\)"):
        optim.Muon([torch.nn.Parameter(torch.zeros(4))])


def small_model():
    torch.manual_seed(0)
    return gpt.GPT(gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50))


def test_adamw_groups_are_unchanged_and_muon_takes_only_the_blocks_matrices():
    """optimizer=adamw: one fused AdamW, decay on every >= 2-D weight, none on the 1-D ones. With
    Muon, AdamW keeps its two groups less the Blocks' matrices (so wte, tied to lm_head, and wpe
    keep their decay), and Muon holds exactly those matrices: every parameter is in one group once."""
    model = small_model()
    adamw = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["fused"]
    names = {p: n for n, p in model.named_parameters()}
    grouped = lambda opt: [(sorted(names[p] for p in g["params"]), g["weight_decay"]) for g in opt.param_groups]
    every = sorted(names.values())
    assert grouped(adamw) == [([n for n in every if model.get_parameter(n).dim() >= 2], 0.1),
                              ([n for n in every if model.get_parameter(n).dim() < 2], 0.0)]

    both = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu", muon=dict(lr=0.02, weight_decay=0.0))
    assert type(both.adamw) is torch.optim.AdamW and both.adamw.defaults["fused"]
    assert type(both.muon) is optim.Muon
    blocks = [n for n in every if n.startswith("transformer.h.") and n.endswith(("c_attn.weight", "c_proj.weight",
                                                                                "c_fc.weight"))]
    assert len(blocks) == 4 * 2
    assert grouped(both.adamw) == [(["transformer.wpe.weight", "transformer.wte.weight"], 0.1),
                                   ([n for n in every if model.get_parameter(n).dim() < 2], 0.0)]
    assert grouped(both.muon) == [(blocks, 0.0)]
    assert both.muon.param_groups[0]["lr_scale"] == pytest.approx(0.02 / 1e-3)
    assert both.param_groups == both.adamw.param_groups + both.muon.param_groups


def test_the_schedule_scales_each_groups_own_peak_lr(char_data, tmp_path):
    """The loop sets AdamW's groups to the schedule's LR and Muon's to muon_lr times the schedule's
    share of its peak, read from the optimizer state a checkpoint stores mid-decay."""
    out = tmp_path / "run"
    train_run(char_data, out, *MUON, "--max_iters=12", "--eval_interval=12", "--lr_decay_iters=20")
    ckpt = gpt.load_checkpoint(out / "ckpt.pt")
    cfg = train.DEFAULTS | ckpt["config"]
    schedule_lr = schedule.lr_at(cfg, ckpt["iter_num"])
    assert 3e-4 < schedule_lr < 3e-3  # decaying: neither the peak nor min_lr
    assert [g["lr"] for g in ckpt["optimizer"]["adamw"]["param_groups"]] == [schedule_lr] * 2
    [muon_group] = ckpt["optimizer"]["muon"]["param_groups"]
    assert muon_group["lr"] == pytest.approx(0.05 * schedule_lr / 3e-3, rel=1e-12)


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_newton_schulz_runs_in_the_dtype_of_the_run(char_data, tmp_path, monkeypatch, dtype, expected):
    """A run in bf16 orthogonalizes in bf16; a run in fp32 (train.py's choice on CPUs without
    native bf16) in fp32."""
    seen, orthogonalize = set(), optim.orthogonalize
    monkeypatch.setattr(optim, "orthogonalize", lambda u, dt, *a: seen.add(dt) or orthogonalize(u, dt, *a))
    train_run(char_data, tmp_path / "run", *MUON, "--max_iters=2", "--eval_interval=100", f"--dtype={dtype}")
    assert seen == {expected}


def test_a_muon_run_resumed_from_its_checkpoint_matches_an_uninterrupted_one(char_data, tmp_path):
    """Resuming restores Muon's momentum buffers and step counts (the warm-up is half done at the
    checkpoint) along with AdamW's state: the losses after it are the uninterrupted run's."""
    common = [*MUON, "--eval_interval=6", "--log_interval=1", "--dropout=0.1"]
    train_run(char_data, tmp_path / "straight", *common, "--max_iters=14")
    train_run(char_data, tmp_path / "resumed", *common, "--max_iters=6")
    train_run(char_data, tmp_path / "resumed", *common, "--max_iters=14", "--init_from=resume")
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 15))
    for it in range(7, 15):
        assert resumed[it] == straight[it], it
    final = lambda out: [r for r in metrics(out) if "val_loss" in r][-1]["val_loss"]
    assert final(tmp_path / "resumed") == final(tmp_path / "straight")


def test_two_ddp_ranks_with_muon_match_one_rank_with_twice_the_accumulation(char_data, tmp_path):
    """Muon steps on the all-reduced gradient, so every rank takes the same step: 2 gloo ranks x 1
    micro-step train as 1 rank x 2 (to fp32 rounding of the gradient sums)."""
    settings = [*MUON, "--max_iters=6", "--eval_interval=3", "--log_interval=1", "--gradient_accumulation_steps=2"]
    train_run(char_data, tmp_path / "single", *settings)
    ddp = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train.py"), *TINY, f"--dataset={char_data}", *settings, f"--out_dir={ddp}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = losses(tmp_path / "single"), losses(ddp)
    assert sorted(two) == list(range(1, 7))
    for it in one:
        assert two[it] == pytest.approx(one[it], abs=1e-5), it
    val = lambda out: [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    assert val(ddp) == pytest.approx(val(tmp_path / "single"), abs=1e-5)


@pytest.mark.parametrize("argv, needle", [
    (["--optimizer=muon", "--fsdp"], "fsdp splits"),
    (["--optimizer=sgd"], "unknown optimizer 'sgd'"),
    (["--optimizer=muon", "--lr_find"], "--lr_find tests AdamW's learning_rate"),
    (["--optimizer=muon", "--learning_rate=0", "--decay_lr=False"], "needs learning_rate > 0"),
    (["--muon_momentum=1"], "muon_momentum must be in [0, 1)"),
    (["--muon_lr=-1"], "muon_lr must be >= 0"),
])
def test_muon_settings_that_cannot_work_are_one_line(argv, needle):
    """fsdp shards matrices that Muon must see whole; Muon's LR is scaled relative to learning_rate."""
    assert_one_line_error(run_in_process(train.main, *argv), needle)
