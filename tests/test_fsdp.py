"""train.py's fsdp and grad_checkpoint: FSDP over 2 gloo ranks trains as one process does (clipping
included), its checkpoints resume exactly (with FSDP or in one process) and load in sample.py, and
activation checkpointing changes memory, never results."""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_one_line_error, run_in_process
from test_train import TINY, losses, metrics, train_run, wait_for_logged_losses, worker_pid
import engine
import gpt
import sample
import train

FSDP = ["--fsdp", "--log_interval=1", "--gradient_accumulation_steps=2"]
# Every step clips: AdamW's eps (1e-8) then outweighs the clipped gradients' entries, so each
# update scales with the norm it was clipped by, and a norm of one rank's shard would show. Each
# rank accumulates 2 micro-steps.
CLIPPED = ["--max_iters=10", "--eval_interval=5", "--grad_clip=1e-6", "--gradient_accumulation_steps=4"]


def torchrun(data, out_dir, *args):
    """train.py under torchrun with 2 gloo processes and fsdp (the command line)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "train.py"), *TINY, f"--dataset={data}", f"--out_dir={out_dir}", *FSDP, *args]


def run_torchrun(data, out_dir, *args):
    result = subprocess.run(torchrun(data, out_dir, *args), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def weights(out_dir):
    return gpt.load_checkpoint(out_dir / "ckpt.pt")["model"]


def assert_same_weights(a, b, tol):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=tol), name


def val_losses(out_dir):
    return [r["val_loss"] for r in metrics(out_dir) if "val_loss" in r]


@pytest.fixture(scope="module")
def clipped(char_data, tmp_path_factory):
    """10 steps of FSDP on 2 ranks and of one process, with the same global batch and a clip at
    every step: their out_dirs."""
    root = tmp_path_factory.mktemp("clipped")
    run_torchrun(char_data, root / "fsdp", *CLIPPED)
    train_run(char_data, root / "one", "--log_interval=1", *CLIPPED)
    return root / "fsdp", root / "one"


@pytest.fixture(scope="module")
def stopped(char_data, tmp_path_factory):
    """An FSDP run with activation checkpointing stopped by SIGTERM to one rank and resumed for 4
    steps with FSDP, and one process's uninterrupted run to the same step without checkpointing:
    their out_dirs ("killed", "straight"), losses and final weights as they were then, the step
    of the stop and torchrun's output there."""
    root = tmp_path_factory.mktemp("stopped")
    killed = root / "killed"
    command = torchrun(char_data, killed, "--eval_interval=1000", "--max_iters=1000", "--grad_checkpoint")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_logged_losses(proc, killed, 4)
    os.kill(worker_pid(proc.pid, rank=1), signal.SIGTERM)  # rank 0, which saves, gets no signal
    stdout, stderr = proc.communicate(timeout=120)
    stopped_at = gpt.load_checkpoint(killed / "ckpt.pt")["iter_num"]
    end = f"--max_iters={stopped_at + 4}"
    run_torchrun(char_data, killed, "--eval_interval=1000", end, "--init_from=resume")
    straight = root / "straight"
    train_run(char_data, straight, "--eval_interval=1000", end, "--log_interval=1", "--gradient_accumulation_steps=2")
    return dict(killed=killed, straight=straight, stopped_at=stopped_at, output=(stdout, stderr),
                losses=(losses(killed), losses(straight)), weights=(weights(killed), weights(straight)))


@pytest.mark.slow
def test_fsdp_trains_as_one_process_and_clips_the_global_norm(clipped):
    """2 FSDP ranks x 2 micro-steps == 1 process x 4, to fp32's summation-order noise: the same
    losses, val losses and weights after 10 steps, each step clipped by the norm of the whole
    gradient (clip_grad_norm_ over the shards' DTensors), not of a shard. (1 process == 2 DDP
    ranks: tests/test_train.py.)"""
    fsdp, one = clipped
    a, b = losses(fsdp), losses(one)
    assert sorted(a) == list(range(1, 11))
    for it in b:
        assert a[it] == pytest.approx(b[it], abs=1e-5), it
    assert val_losses(fsdp) == pytest.approx(val_losses(one), abs=1e-5)
    assert_same_weights(weights(fsdp), weights(one), 1e-5)


@pytest.mark.slow
def test_an_fsdp_checkpoint_is_one_process_format_and_sample_py_reads_it(clipped, tmp_path):
    """The gathered checkpoint has one process's keys, shapes and tied head (one tensor in the
    file), and optimizer state; sample.py scores text with it as with one process's checkpoint,
    and decodes greedily."""
    fsdp, one = clipped
    a, b = gpt.load_checkpoint(fsdp / "ckpt.pt"), gpt.load_checkpoint(one / "ckpt.pt")
    assert {k: v.shape for k, v in a["model"].items()} == {k: v.shape for k, v in b["model"].items()}
    assert a["model"]["lm_head.weight"].data_ptr() == a["model"]["transformer.wte.weight"].data_ptr()
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    text = tmp_path / "eval.txt"
    text.write_text("ROMEO:\nWhat light through yonder window breaks? It is the east.\n" * 3, encoding="utf-8")

    def scored(out_dir):
        result = run_in_process(sample.main, "--ckpt", out_dir / "ckpt.pt", "--eval", text, "--device", "cpu",
                                "--dtype", "float32")
        assert result.returncode == 0, result.stderr
        return float(result.stdout.split("loss ")[1].split()[0])

    assert scored(fsdp) == pytest.approx(scored(one), abs=1e-5)
    result = run_in_process(sample.main, "--ckpt", fsdp / "ckpt.pt", "--start", "ROMEO:", "--max_new_tokens", "8",
                            "--temperature", "0", "--device", "cpu", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:") and len(result.stdout.rstrip("\n")) == len("ROMEO:") + 8


@pytest.mark.slow
def test_sigterm_stops_every_fsdp_rank_with_a_checkpoint_that_resumes_exactly(stopped):
    """SIGTERM to one rank stops both at one step, with ckpt.pt gathered from both and saved, and
    exit status 143; resuming it under FSDP continues as if never stopped: the losses before and
    after the stop and the weights at the end are one uninterrupted process's (dropout 0; the
    Blocks recomputed in FSDP's backward, where the gathered weights are freed after the forward,
    give the gradients of the kept activations)."""
    stdout, stderr = stopped["output"]
    assert f"stopped by SIGTERM at iter {stopped['stopped_at']}" in stdout
    # torchrun's report of the ranks that failed: the signalled rank's 143, and for the other its
    # own 143 or -15 (torchrun itself terminated it, with SIGTERM, as it was exiting)
    codes = re.findall(r"exitcode  : (-?\d+)", stderr)
    assert "143" in codes and set(codes) <= {"143", "-15"}, stderr[-3000:]
    resumed, reference = stopped["losses"]
    assert sorted(resumed) == list(range(1, stopped["stopped_at"] + 5))
    for it in reference:
        assert resumed[it] == pytest.approx(reference[it], abs=1e-5), it
    assert_same_weights(*stopped["weights"], 1e-5)


@pytest.mark.slow
def test_one_process_resumes_an_fsdp_checkpoint(stopped, char_data):
    """An FSDP run's ckpt.pt resumes in one process (--fsdp=False) as the uninterrupted run goes on."""
    killed, straight, stopped_at = stopped["killed"], stopped["straight"], stopped["stopped_at"]
    end = f"--max_iters={stopped_at + 6}"
    result = run_in_process(train.main, f"--out_dir={killed}", "--init_from=resume", "--fsdp=False", end)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume: fsdp True -> False" in result.stdout
    train_run(char_data, straight, end, "--init_from=resume")  # one process's own resume is exact (test_train)
    resumed, reference = losses(killed), losses(straight)
    for it in (stopped_at + 5, stopped_at + 6):
        assert resumed[it] == pytest.approx(reference[it], abs=1e-5), it
    assert_same_weights(weights(killed), weights(straight), 1e-5)


@pytest.mark.slow
def test_fsdp_in_bf16_keeps_fp32_weights_and_trains_as_one_process(char_data, tmp_path):
    """In a bf16 run the ranks gather bf16 copies of fp32 shards and reduce gradients in fp32: the
    weights stay fp32, and the losses follow one process's bf16 autocast to bf16's precision
    (2^-8 relative: the residual stream is bf16 under FSDP, fp32 under autocast alone)."""
    settings = ["--dtype=bfloat16", "--max_iters=6", "--eval_interval=6"]
    run_torchrun(char_data, tmp_path / "fsdp", *settings)
    train_run(char_data, tmp_path / "one", *settings, "--log_interval=1", "--gradient_accumulation_steps=2")
    a, b = losses(tmp_path / "fsdp"), losses(tmp_path / "one")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for it in b:
        assert a[it] == pytest.approx(b[it], rel=2**-8), it
    assert all(w.dtype == torch.float32 for w in weights(tmp_path / "fsdp").values())


def test_fsdp_without_torchrun_is_one_line(char_data, tmp_path):
    result = train_run(char_data, tmp_path / "out", "--fsdp", "--max_iters=1", check=False)
    assert result.returncode == 1
    assert_one_line_error(result, "fsdp=True", "torchrun --nproc_per_node=N", "--fsdp=False")
    assert not (tmp_path / "out").exists()


# --- activation checkpointing ---------------------------------------------------------------------

def loss_grads_and_saved_bytes(grad_checkpoint):
    """A training forward and backward of a tiny GPT (dropout on, fixed seeds): the loss, every
    parameter's gradient, and the bytes autograd saved for the backward outside checkpointed code."""
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dropout=0.2))
    model.grad_checkpoint = grad_checkpoint
    x, y = torch.randint(0, 65, (2, 4, 32), generator=torch.Generator().manual_seed(1))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(2)  # the dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}, sum(saved)


def test_grad_checkpoint_gives_the_same_loss_and_gradients_and_saves_less():
    """Recomputing each Block in the backward (with the forward's dropout masks) gives the loss and
    gradients of keeping its activations, in fp32 to 1e-6, while autograd holds a fraction of the
    bytes; generation (no grad, a KV cache) is unaffected."""
    loss, grads, saved = loss_grads_and_saved_bytes(False)
    loss_ckpt, grads_ckpt, saved_ckpt = loss_grads_and_saved_bytes(True)
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    for name in grads:
        assert torch.allclose(grads_ckpt[name], grads[name], rtol=0, atol=1e-6), name
    assert saved_ckpt < saved / 3
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32))
    idx = torch.zeros(1, 1, dtype=torch.long)
    plain = engine.generate(model, idx, 5, temperature=0)
    model.grad_checkpoint = True
    assert engine.generate(model, idx, 5, temperature=0) == plain


def test_grad_checkpoint_recomputes_every_block_of_every_training_step(char_data, tmp_path, monkeypatch):
    """--grad_checkpoint checkpoints each Block of each micro-step's forward, and none of an
    evaluation's (no backward follows). It is no model setting: the checkpoint's model_args carry
    no trace of it, and a resume may change it."""
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    train_run(char_data, tmp_path / "out", "--grad_checkpoint", "--max_iters=3", "--eval_interval=2",
              "--gradient_accumulation_steps=2")
    assert len(calls) == 3 * 2 * 2  # steps x micro-steps x blocks (n_layer=2)
    ckpt = gpt.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert "grad_checkpoint" not in ckpt["model_args"] and ckpt["config"]["grad_checkpoint"] is True
    assert "grad_checkpoint" in train.CHANGEABLE_ON_RESUME
