"""The CUDA paths, checked on a CPU: the device facts (capability, name, device count, RNG
calls) are faked where a decision reads them, and DDP runs on gloo. What each test guards is in
its docstring: precision per GPU generation, TF32, which GPU a process uses, RNG and scaler state
across a resume, DDP before compile, how a checkpoint is read, the process group's end, and
`bench.py gpu` on a machine with nothing but this repository."""
import contextlib
import gc
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import types
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import common
import distributed
import gpt
import tokenizer
import train
from common import UserError
from conftest import ROOT, run_in_process
from test_train import TINY, losses, train_run


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda as two GPUs (cuda:0 of compute capability 8.0, cuda:1 of 7.0 unless a test
    changes `capability`), whose bf16 check counts emulation as torch's does; the calls that
    take a device, or the current one, are recorded in `calls`."""
    gpu = types.SimpleNamespace(capability={0: (8, 0), 1: (7, 0)}, name="NVIDIA A100-SXM4-80GB", current=0,
                                calls=[])

    def index(device=None):
        if device is None:
            return gpu.current
        return device if isinstance(device, int) else torch.device(device).index or 0

    def set_device(device):
        gpu.current = index(device)
        gpu.calls.append(("set_device", gpu.current))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpu.capability))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: gpu.current)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu.capability[index(device)])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu.name)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: gpu.calls.append(("synchronize", device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": gpu.calls.append(("set_rng_state", device)))
    yield gpu
    common._peak_flops.cache_clear()  # peaks measured or looked up for the fake GPU


@pytest.fixture
def float32_matmul_precision():
    """torch's float32 matmul precision, put back after the test."""
    saved = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(saved)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# Precision: bf16 only where a GPU runs it natively; TF32 for float32 matmuls


@pytest.mark.parametrize("capability, dtype", [((6, 0), torch.float16), ((7, 0), torch.float16),
                                               ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                               ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_is_bf16_from_ampere_on_and_fp16_before(fake_gpu, capability, dtype):
    """torch.cuda.is_bf16_supported() is True on a P100, V100 or T4 too (it counts emulation, several
    times slower than fp16): `auto` must choose by compute capability, fp16 below 8.0, so that those
    GPUs train in fp16 with a GradScaler."""
    fake_gpu.capability[0] = capability
    assert common.resolve_dtype("auto", "cuda:0") == dtype


def test_auto_dtype_asks_the_gpu_the_process_runs_on(fake_gpu):
    """On a machine with an Ampere cuda:0 and an older cuda:1, a process on cuda:1 gets fp16."""
    assert common.resolve_dtype("auto", "cuda:1") == torch.float16
    assert common.resolve_dtype("auto", "cuda:0") == torch.bfloat16


def runtime_for(monkeypatch, device, *args):
    """distributed.setup_runtime for the settings of `args`, as one process on `device`."""
    monkeypatch.setattr(distributed, "setup_distributed", lambda cfg: (0, 0, 1, device))
    return distributed.setup_runtime(train.load_config([*TINY, *args, f"--device={device}"]))


def test_fsdp_with_auto_dtype_on_a_gpu_without_bf16_trains_in_fp32_and_says_so(fake_gpu, monkeypatch, capsys):
    """FSDP does not train in fp16 (its GradScaler's skipped steps would have to agree across
    shards): `auto` on a GPU without native bf16 gives fp32 under fsdp, with one line saying why;
    an explicit float16 stays an error."""
    rt = runtime_for(monkeypatch, "cuda:1", "--fsdp", "--dtype=auto")
    assert rt.dtype == torch.float32 and not rt.scaler.is_enabled()
    assert "cuda:1 has no native bfloat16 and fsdp does not train in float16, so float32" in capsys.readouterr().out
    with pytest.raises(UserError, match="fsdp trains in bfloat16 or float32"):
        runtime_for(monkeypatch, "cuda:1", "--fsdp", "--dtype=float16")


@pytest.mark.parametrize("device, args, tf32", [("cuda:0", [], True), ("cuda:0", ["--tf32=False"], False),
                                                ("cuda:1", [], False), ("cpu", [], False)])
def test_float32_runs_on_ampere_gpus_use_tf32_unless_told_not_to(fake_gpu, monkeypatch, capsys,
                                                                 float32_matmul_precision, device, args, tf32):
    """A float32 run on a GPU with TF32 tensor cores (capability 8.0 on) sets float32 matmuls to
    "high" precision and says so; --tf32=False keeps them exact, and an older GPU or a CPU is left
    as it is."""
    torch.set_float32_matmul_precision("highest")
    runtime_for(monkeypatch, device, "--dtype=float32", *args)
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    assert ("run on TF32 tensor cores (--tf32=False: exact float32)" in capsys.readouterr().out) == tf32


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA RTX A1000", None),
    ("NVIDIA A10", 125e12), ("NVIDIA A10G", 70e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA L40", 181e12), ("Tesla T4", 65e12), ("Tesla V100-SXM2-16GB", 125e12),
    ("NVIDIA GeForce RTX 4090", 165e12), ("NVIDIA RTX A4000", None), ("NVIDIA GeForce RTX 3090 Ti", 71e12)])
def test_a_gpu_name_gets_the_peak_of_the_card_it_names_in_whole_words(name, peak):
    """MFU's denominator: a table key matches whole words of the device name, so an "RTX A1000"
    is not an A100 (a 6x too low MFU), nor an L40S an L40 or an A10G an A10."""
    assert common.gpu_peak_flops(name) == peak


def test_mfu_on_a_known_gpu_is_against_its_data_sheet_peak(fake_gpu):
    common._peak_flops.cache_clear()
    assert common.measure_peak_flops("cuda:0", torch.bfloat16) == 312e12


# ----------------------------------------------------------------------------------------------
# The GPU a process runs on


def test_a_cuda_device_becomes_the_current_one_with_its_index(fake_gpu):
    """One process on cuda:1 must sync, save and restore RNG state, pin memory and check bf16 on
    cuda:1, not GPU 0: resolve_device makes it the current device and names its index."""
    assert common.resolve_device("cuda:1") == "cuda:1"
    assert ("set_device", 1) in fake_gpu.calls and fake_gpu.current == 1
    common.sync("cuda:1")
    assert fake_gpu.calls[-1] == ("synchronize", "cuda:1")
    fake_gpu.current = 0
    assert common.resolve_device("cuda") == "cuda:0" and common.resolve_device("auto") == "cuda:0"
    with pytest.raises(UserError, match="has 2 CUDA device"):
        common.resolve_device("cuda:2")
    with pytest.raises(UserError, match="unknown device 'cuda:x'"):
        common.resolve_device("cuda:x")


# ----------------------------------------------------------------------------------------------
# Resuming: RNG and scaler state


def resume_state(model, optimizer, scaler_state, world_size):
    """What restore() reads from a ckpt.pt written by a run of `world_size` processes."""
    return dict(optimizer=optimizer.state_dict(), scaler=scaler_state,
                rng=dict(batches=np.random.default_rng(0).bit_generator.state, torch=torch.get_rng_state(),
                         cuda=torch.zeros(16, dtype=torch.uint8), world_size=world_size),
                iter_num=10, best_val_loss=2.0, evals_since_best=0, elapsed_s=1.0)


def tiny_model():
    torch.manual_seed(0)
    return gpt.GPT(gpt.GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8))


def restore_as(ckpt, rank, world_size, device, scaler):
    model = tiny_model()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    rt = distributed.Runtime(rank, rank, world_size, device, torch.float32, contextlib.nullcontext(), scaler)
    return train.restore(ckpt, model, optimizer, scaler, np.random.default_rng(1), rt, seed=1337)


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_multi_gpu_resume_reseeds_each_ranks_cuda_generator(fake_gpu, world_size):
    """The stored CUDA generator is rank 0's: restoring it on every rank after a DDP or FSDP resume
    gives all ranks the same dropout masks. It is restored only where the CPU's is (one process
    resumed as one), on the process's own GPU; otherwise every rank re-seeds."""
    model = tiny_model()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    ckpt = resume_state(model, optimizer, {}, world_size)
    restore_as(ckpt, 1 if world_size == 2 else 0, world_size, "cuda:1", torch.amp.GradScaler("cpu", enabled=False))
    restored = [call for call in fake_gpu.calls if call[0] == "set_rng_state"]
    assert restored == ([("set_rng_state", "cuda:1")] if world_size == 1 else [])


def test_resuming_a_bf16_or_fp32_run_in_fp16_starts_a_fresh_scaler():
    """A bf16 or fp32 run stores its disabled GradScaler's state, {}; an enabled one (fp16) refuses
    {} with a RuntimeError. The resume then starts the scale afresh; a stored fp16 scale is kept."""
    model = tiny_model()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    progress = restore_as(resume_state(model, optimizer, {}, 1), 0, 1, "cpu", scaler)
    assert progress.iter_num == 10 and scaler.get_scale() == 2.0**16
    stored = torch.amp.GradScaler("cpu", init_scale=8.0, enabled=True).state_dict()
    restore_as(resume_state(model, optimizer, stored, 1), 0, 1, "cpu", scaler)
    assert scaler.get_scale() == 8.0


# ----------------------------------------------------------------------------------------------
# DDP, then compile


@pytest.fixture
def one_process_group():
    """A gloo process group of this process alone (DDP's real reducer, no second process). A DDP
    module must be gone before the group is destroyed, as train.py does: its reducer holds the
    group, and freeing it afterwards can hang."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    gc.collect()
    torch.distributed.destroy_process_group()


def test_compile_wraps_ddp_rather_than_ddp_a_compiled_model(monkeypatch, one_process_group):
    """torch.compile must see the DDP module: dynamo then splits the graph at DDP's gradient buckets
    so that their all-reduces overlap the backward (a compiled model inside DDP leaves them all
    after it). The compile warm-up's forward through DDP, with no backward after it, must not
    disturb the first training step."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(type(model)) or model)
    rt = distributed.Runtime(0, 0, 2, "cpu", torch.float32, contextlib.nullcontext(),
                       torch.amp.GradScaler("cpu", enabled=False))
    cfg = train.DEFAULTS | dict(compile=True, grad_checkpoint=False)
    raw_model = tiny_model()
    model = distributed.step_model(raw_model, cfg, rt, types.SimpleNamespace(B=2, T=8))
    is_ddp, wraps_raw = isinstance(model, torch.nn.parallel.DistributedDataParallel), model.module is raw_model
    x = torch.randint(0, 16, (2, 8))
    model.require_backward_grad_sync = True
    _, loss = model(x, x)
    loss.backward()
    del model, _, loss  # before one_process_group destroys the group (its docstring says why)
    assert compiled == [torch.nn.parallel.DistributedDataParallel] and is_ddp and wraps_raw
    assert all(p.grad is not None for p in raw_model.parameters())


@pytest.mark.slow
def test_two_compiled_ddp_ranks_train_as_one_eager_process(char_data, tmp_path):
    """torch.compile of the DDP module on 2 gloo ranks (the graph split at DDP's buckets, each
    bucket all-reduced from inside the compiled backward) gives one eager process's losses with
    twice the accumulation."""
    settings = ["--max_iters=6", "--eval_interval=6", "--log_interval=1", "--gradient_accumulation_steps=2"]
    train_run(char_data, tmp_path / "one", *settings)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
         *TINY, f"--dataset={char_data}", f"--out_dir={tmp_path / 'ddp'}", *settings, "--compile=True"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.compile failed" not in result.stdout
    one, two = losses(tmp_path / "one"), losses(tmp_path / "ddp")
    assert sorted(two) == list(range(1, 7))
    for it in one:
        assert two[it] == pytest.approx(one[it], rel=1e-4), it


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint: to the CPU, mapped; only the weights go to the device


def test_a_checkpoint_is_read_to_the_cpu_and_only_its_weights_reach_the_device(tmp_path, monkeypatch):
    """ckpt.pt holds AdamW's two moments beside the weights: read with map_location=cuda they
    would all land on the GPU (GPT-2 XL: ~19 GB before the model exists), and under FSDP each
    rank would read the whole file into its own memory. The file is mapped into CPU memory and
    the model built on the device takes only the weights ("meta" stands in for the GPU)."""
    model = tiny_model()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    _, loss = model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    loss.backward()
    optimizer.step()
    tok = tokenizer.Tokenizer("char", chars="abcdefghijklmnop")
    path = tmp_path / "ckpt.pt"
    gpt.save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config), tokenizer=tok.to_dict(),
                             optimizer=optimizer.state_dict(), config={}, iter_num=1, best_val_loss=1.0), path)
    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    cfg = train.DEFAULTS | dict(init_from=str(path), n_layer=1, n_head=2, n_embd=8, block_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into meta parameters is a no-op, and torch says so
        loaded, ckpt = train.build_model(cfg, tok.vocab_size, tok, "meta")
    assert [(k["map_location"], k["mmap"]) for k in loads] == [("cpu", True)]
    assert {p.device.type for p in loaded.parameters()} == {"meta"}
    assert ckpt["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"
    on_cpu = gpt.model_from_checkpoint(gpt.load_checkpoint(path), "cpu")
    for name, tensor in model.state_dict().items():
        assert torch.equal(on_cpu.state_dict()[name], tensor), name


# ----------------------------------------------------------------------------------------------
# The process group ends with the run, one process or more


@pytest.mark.parametrize("mode", [[], ["--lr_find", "--lr_find_iters=4"]])
def test_one_process_under_torchrun_leaves_its_process_group(char_data, tmp_path, monkeypatch, mode):
    """torchrun with --nproc_per_node=1 joins a process group of one; the run (training or the LR
    range test) must destroy it before it ends, or NCCL warns at exit that it leaked."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    try:
        result = run_in_process(train.main, *TINY, f"--dataset={char_data}", f"--out_dir={tmp_path / 'out'}",
                                "--max_iters=2", "--eval_interval=2", "--eval_iters=1", *mode)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# bench.py gpu: nothing but this repository and a GPU

BARE_MACHINE_RUNS = {name: (settings | dict(dtype="float32" if settings["dtype"] == "float16" else settings["dtype"],
                                            compile=False, learning_rate=1e-2), torchrun, long_run)
                     for name, (settings, torchrun, long_run) in bench.GPU_RUNS.items()}
TINY_MODEL = dict(n_layer=1, n_head=2, n_embd=32, block_size=16)


@pytest.fixture
def bare_machine(tmp_path, monkeypatch):
    """No tiktoken files (an empty cache folder) and no network (a proxy that refuses), for this
    process and the ones it starts."""
    (tmp_path / "empty_cache").mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)


def test_the_gpu_checks_dataset_needs_no_tiktoken_files(tmp_path, monkeypatch):
    """`bench.py gpu` is the first thing run on a lent GPU machine, which has no tiktoken cache and
    no network: its random tokens come with a tokenizer of GPT-2's vocabulary size that loads
    without GPT-2's BPE files."""
    def no_gpt2_files():
        raise UserError("GPT-2's BPE files are not cached and could not be downloaded")

    monkeypatch.setattr(tokenizer, "gpt2_encoding", no_gpt2_files)
    data = bench.random_token_dataset(tmp_path / "random", 1000)
    tok = tokenizer.load_tokenizer(data)
    assert tok.vocab_size == 50257 == bench.GPT2_VOCAB_SIZE
    ids = np.fromfile(data / "train.bin", dtype=np.uint16)
    assert len(ids) == 1000 and ids.max() < bench.RANDOM_IDS


@pytest.mark.slow
def test_the_gpu_check_runs_its_rows_on_a_cpu_with_nothing_but_this_repository(bare_machine, capsys):
    """Everything `bench.py gpu` does but the GPU's own kernels, on a CPU at a tiny size, with no
    tiktoken files and no network: each training run through train.py (bf16 where the GPU's is,
    fp32 for fp16, eager; FSDP under torchrun with one process), then the decoding checks, every
    row "ok"; the table prints a line per row."""
    args = types.SimpleNamespace(dataset=None, steps=10, short_steps=10, batch_size=4, new_tokens=8, repeats=1)
    rows = bench.gpu_rows(args, runs=BARE_MACHINE_RUNS, device="cpu", model=TINY_MODEL,
                          peaks={"bfloat16": 1e9, "float32": 1e9})
    assert [row["run"] for row in rows] == [*bench.GPU_RUNS, "decode fp32, KV cache", "decode fp32, recompute",
                                            "decode bf16, KV cache"]
    for row in rows:
        assert row["result"].startswith("ok"), row
    for row in rows[:len(bench.GPU_RUNS)]:  # the training rows: 10 steps of 4 x 16 tokens, read from metrics.jsonl
        assert row["steps"] == 10 and 0 < row["peak_gb"] < math.inf, row
        assert row["tokens_per_s"] == pytest.approx(4 * 16 * 1000 / row["ms"], rel=1e-9), row
    assert len(bench.gpu_table(rows)) == 1 + len(rows)


def test_the_gpu_check_prints_one_table_and_fails_on_any_failed_row(monkeypatch, fake_gpu):
    """`bench.py gpu` prints its header and one table, then exits 1 with one error line naming the
    failed checks; with every row ok it exits 0."""
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(name=fake_gpu.name, total_memory=80e9))
    monkeypatch.setattr(bench, "matmul_flops", lambda dtype: 250e12)
    outcome = {"bf16 + compile": "ok", "decode fp32, KV cache": "FAIL: its tokens differ from recompute's"}
    monkeypatch.setattr(bench, "gpu_rows", lambda args, peaks, time_limit_s: [
        dict(run=name, result=result) for name, result in outcome.items()])
    result = run_in_process(bench.main, "gpu")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: 1 of 2 checks failed: decode fp32, KV cache"]
    assert result.stdout.count("  run ") == 1 and "312 TFLOPS" in result.stdout
    outcome["decode fp32, KV cache"] = "ok: = recompute"
    assert run_in_process(bench.main, "gpu").returncode == 0


def processes_with(text):
    """The pids of the processes whose command line holds `text`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile
            pass
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the run's processes in /proc")
def test_a_training_run_past_its_time_is_stopped_with_its_processes(tmp_path):
    """The check ends within its time limit: a train.py run under torchrun still going when its
    share of the time is spent is stopped, its launcher and its worker, and its row says why."""
    data = bench.random_token_dataset(tmp_path / "random", 20_000)
    out = tmp_path / "out"
    returned = []
    run = threading.Thread(target=lambda: returned.append(bench.training_run(
        dict(dtype="float32"), True, data, out, 100_000, model=TINY_MODEL, batch_size=4, device="cpu", timeout=7)))
    run.start()
    run.join(timeout=150)  # 7 s (its worker trains from ~4 s on), then at most torchrun's 30 s to stop it
    left = processes_with(f"--out_dir={out}")
    for pid in left:  # this test's own runs: a worker left behind would hold training_run's pipes
        os.kill(pid, signal.SIGKILL)
    run.join()
    assert left == []
    assert returned[0][1] == "stopped after 7 s, the time left of the check"
