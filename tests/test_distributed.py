"""distributed.py: joining torchrun's process group, and the optimizer state a checkpoint carries.

Training under torchrun (DDP and FSDP over 2 gloo ranks) is tested in test_train.py and test_fsdp.py.
"""
import contextlib
import io

import pytest
import torch

import distributed
import train
from common import UserError
from gpt import GPT, GPTConfig


def test_nccl_without_cuda_is_an_error_before_joining(monkeypatch):
    """--backend=nccl on CPU processes: a clear error before init_process_group, which would fail
    (or wait for the other ranks) with torch's message."""
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: pytest.fail("joined"))
    cfg = train.load_config(["--backend=nccl", "--device=cpu", "--gradient_accumulation_steps=2"])
    with pytest.raises(UserError, match="backend nccl needs CUDA devices"):
        distributed.setup_distributed(cfg)


@pytest.mark.parametrize("accum, fix", [(1, "--gradient_accumulation_steps=2"), (3, "--gradient_accumulation_steps=4")])
def test_accumulation_not_shared_by_the_processes_names_the_value_to_pass(monkeypatch, accum, fix):
    """Micro-steps that the processes cannot share equally (`torchrun --nproc_per_node=2` on
    accumulation 1) are an error before joining the group, naming the value to pass."""
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: pytest.fail("joined"))
    cfg = train.load_config([f"--gradient_accumulation_steps={accum}", "--device=cpu"])
    with pytest.raises(UserError, match=f"multiple of the number of processes \\(2\\).*{fix}"):
        distributed.setup_distributed(cfg)


def test_one_process_needs_no_process_group_and_fsdp_needs_torchrun(monkeypatch):
    """Without torchrun's variables a run is rank 0 of 1 on its own device; fsdp there is an error."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    rt = distributed.setup_runtime(train.load_config(["--device=cpu", "--dtype=float32"]))
    assert (rt.rank, rt.world_size, rt.device, rt.master, rt.distributed) == (0, 1, "cpu", True, False)
    assert not rt.scaler.is_enabled() and not rt.in_process_group
    with pytest.raises(UserError, match="fsdp=True shards the model over torchrun's processes"):
        distributed.setup_runtime(train.load_config(["--device=cpu", "--fsdp"]))


def test_the_optimizer_state_saved_and_loaded_continues_as_the_optimizer_itself():
    """full_optimizer_state and full_model_state through a file, then load_optimizer_state into a
    fresh optimizer of the model read back, give the next step of the optimizer never saved."""
    rt = distributed.Runtime(0, 0, 1, "cpu", torch.float32, contextlib.nullcontext(),
                             torch.amp.GradScaler("cpu", enabled=False))
    torch.manual_seed(0)
    x = torch.randint(0, 16, (2, 8))

    def step(model, optimizer):
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8))
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    step(model, optimizer)
    file = io.BytesIO()
    torch.save(dict(model=distributed.full_model_state(model, rt),
                    optimizer=distributed.full_optimizer_state(model, optimizer, rt)), file)
    file.seek(0)
    saved = torch.load(file, weights_only=True)
    copy = GPT(model.config)
    copy.load_state_dict(saved["model"])
    copy_optimizer = copy.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    distributed.load_optimizer_state(copy, copy_optimizer, saved["optimizer"], rt)
    step(model, optimizer)
    step(copy, copy_optimizer)
    for a, b in zip(model.parameters(), copy.parameters()):
        assert torch.equal(a, b)
