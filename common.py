"""What every script shares that is not the model or a tokenizer: errors a user can fix, atomic
file writes, and the choice of device and precision.

- A UserError is a mistake the user can fix (a bad path, flag, setting or file). run_main turns it
  into one `error:` line on stderr and exit status 1; GPT_DEBUG=1 shows the traceback instead.
- atomic_write writes to a temporary name, fsyncs and renames: a kill at any instant leaves the
  old file or the new one, never half of one. Figures (save_figure) are written that way too;
  matplotlib is imported only to draw one (pyplot), so it stays optional.
- Device and precision are resolved here once per script. torch is imported inside those
  functions only: prepare.py uses this module and never needs torch (importing it costs ~2 s).
"""
import argparse
import difflib
import functools
import os
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path


class UserError(Exception):
    """Something the user can fix (a bad path, flag or file): shown as one line, no traceback."""


def is_worker_process():
    """True in every torchrun process but rank 0: they stay quiet so an error is printed once."""
    return int(os.environ.get("RANK", 0)) != 0


def run_main(main):
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit status 1.

    GPT_DEBUG=1 shows the full traceback instead. Ctrl-C exits with 130 and no traceback; a closed
    stdout (`python sample.py ... | head`) ends the script quietly, with 141 (SIGPIPE's status, as
    a shell shows for cat there). Under torchrun only rank 0
    prints the error, and every process exits at once, so torchrun's summary stays short.
    """
    try:
        main()
    except UserError as e:
        if os.environ.get("GPT_DEBUG"):
            raise
        if not is_worker_process():
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        if os.environ.get("GPT_DEBUG"):
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # stdout's reader has gone (`| head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(128 + 13)  # 128 + SIGPIPE: the status of a process that a closed pipe ended


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors (one `error:` line), and that suggests the closest
    flag for a misspelt one (--temprature -> --temperature)."""

    def flags(self):
        """Every --flag of this parser and of its sub-commands' parsers."""
        for action in self._actions:
            yield from (s for s in action.option_strings if s.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from sub.flags()

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            flags = sorted(set(self.flags()))
            for arg in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(arg.split("=")[0], flags, n=1) if arg.startswith("--") else []
                if close:
                    raise UserError(f"unknown flag {arg.split('=')[0]}. Did you mean {close[0]}?")
        raise UserError(message)


def atomic_write(path, write):
    """write(tmp_path) a file's content, fsync it, then rename it over `path`, and make the rename
    itself durable: a crash or kill at any instant leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def pyplot():
    """matplotlib.pyplot, drawing into files (no display needed); without matplotlib, a UserError
    that names the install command. Imported only when a script draws something."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    return plt


def save_figure(fig, path):
    """Write a matplotlib figure to `path` atomically, in the format its extension names (PNG
    without one), and close it; a path that cannot be written is a UserError."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:] or "png", dpi=100,
                                                   bbox_inches="tight"))
    except (OSError, ValueError) as e:  # no such folder, a read-only disk, an unknown format
        raise UserError(f"cannot write {path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}") from None
    finally:
        plt.close(fig)


def print0(*args, **kwargs):
    """print on rank 0 only: one copy of every line however many processes run."""
    if not is_worker_process():
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------------------------
# Device and precision

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def resolve_device(name):
    """'auto' picks cuda, then mps, then cpu; asking for a device that is absent is an error.

    A CUDA device comes back with its index ('cuda' is the current one, normally 'cuda:0') and
    is made the current device: calls that take no device (synchronize, the RNG state,
    pin_memory) then act on the GPU this process computes on, not on GPU 0."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        else:
            return "mps" if torch.backends.mps.is_available() else "cpu"
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available here (try --device=cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device '{name}' requested but MPS is not available here (try --device=cpu)")
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)")
    if kind == "cuda":
        try:
            index = torch.device(name).index
        except RuntimeError:  # 'cuda:x'
            raise UserError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)") from None
        index = torch.cuda.current_device() if index is None else index
        count = torch.cuda.device_count()
        if index >= count:
            raise UserError(f"device '{name}' requested but this machine has {count} CUDA device(s): "
                            f"cuda:0 to cuda:{count - 1}")
        torch.cuda.set_device(index)
        return f"cuda:{index}"
    # There is one CPU device: 'cpu:0' would tag checkpoint storages that torch.load cannot map.
    return "cpu" if kind == "cpu" else name


def cpu_flags():
    """The CPU's feature flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def cpu_has_bf16():
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX) that torch is allowed to use,
    where bf16 autocast pays off. ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA below AVX512 (or a
    CPU without those flags) mean torch computes bf16 through fp32, slower than fp32 itself."""
    import torch

    if not cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    isa_allows_bf16 = isa == "ALL" or any(s in isa for s in ("BF16", "AMX", "AVX10"))
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512") and isa_allows_bf16


def cuda_has_bf16(device):
    """True on GPUs that compute in bf16 natively: compute capability 8.0 (Ampere) and later, and
    AMD's. torch.cuda.is_bf16_supported() also counts emulation, so it is True on a V100, T4 or
    P100 too, where bf16 runs several times slower than fp16 (and without flash attention)."""
    import torch

    return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_dtype(name, device):
    """'auto': bf16 where the hardware runs it natively, fp16 on older CUDA GPUs, else fp32."""
    import torch

    kind = device.split(":")[0]
    if name == "auto":
        if kind == "cuda":
            return torch.bfloat16 if cuda_has_bf16(device) else torch.float16
        if kind == "cpu" and cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPE_NAMES:
        raise UserError(f"unknown dtype '{name}' (use auto, {', '.join(DTYPE_NAMES)})")
    if name == "float16" and kind != "cuda":
        raise UserError("dtype float16 needs a CUDA device; use bfloat16 or float32")
    return getattr(torch, name)


def use_tf32(device):
    """Let float32 matmuls on a CUDA GPU with TF32 tensor cores (compute capability 8.0 and later)
    use them: torch.set_float32_matmul_precision("high"), inputs rounded to a 10-bit mantissa,
    sums in fp32, several times the throughput. Returns True where it did; elsewhere (a CPU, an
    older GPU) nothing changes."""
    import torch

    if not device.startswith("cuda") or torch.version.hip or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    torch.set_float32_matmul_precision("high")
    return True


def autocast_context(device, dtype):
    """Mixed precision for the forward pass: weights stay fp32, matmuls run in `dtype`."""
    import torch

    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def sync(device):
    """Wait for the device's queued work (timings are otherwise of the launch, not the work)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device.startswith("mps"):
        torch.mps.synchronize()


def peak_memory_mb(device):
    """The most memory this process has held, in MiB: on CUDA what torch allocated on `device`;
    elsewhere the process's peak resident set (ru_maxrss: KiB on Linux, bytes on macOS), which
    includes Python, torch and the data's pages."""
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# Dense bf16/fp16 tensor-core peaks (FLOP/s) of common cards, from their data sheets; MFU on CUDA
# is reported against these (a matmul probe reaches only 60-80% of them). A key matches whole words
# of the device's name ("NVIDIA A100-SXM4-80GB" is an A100, "NVIDIA RTX A1000" is not), and the
# first key that matches wins: an SXM H100 calls itself "NVIDIA H100 80GB HBM3".
GPU_PEAK_FLOPS = {"H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
                  "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12,
                  "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def gpu_peak_flops(name):
    """The dense bf16/fp16 peak of the card called `name` (torch.cuda.get_device_name), or None
    for a card not in GPU_PEAK_FLOPS."""
    for card, peak in GPU_PEAK_FLOPS.items():
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(card)}(?![A-Za-z0-9])", name):
            return peak
    return None


def measure_peak_flops(device, dtype):
    """The denominator of MFU: a known card's dense peak on CUDA (bf16/fp16), else the best of a
    few square matmuls in `dtype` with this process's threads, measured (once per process and
    setting). train.py also never reports MFU above 100% (a step can beat a small probe on a CPU)."""
    import torch

    return _peak_flops(device, dtype, torch.get_num_threads())


@functools.lru_cache(maxsize=8)
def _peak_flops(device, dtype, threads):
    import torch

    if device.startswith("cuda") and dtype != torch.float32:
        peak = gpu_peak_flops(torch.cuda.get_device_name(device))
        if peak:
            return peak
    best = 0.0
    for n in ((2048, 4096) if device.startswith("cuda") else (256, 512, 1024, 2048)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up: the first call picks kernels and allocates
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            seconds = time.perf_counter() - t0
            best = max(best, 2 * n**3 / seconds)
        if seconds > 0.05:  # large enough to be at the peak (bf16 without native support is slow)
            break
    return best


def maybe_compile(model, device, ctx, batch_size, block_size):
    """torch.compile where it works; a warning and the eager model where it does not."""
    import torch

    if device.startswith("cpu"):
        # Inductor's CPU tanh (Sleef's) makes GPT-2's tanh-GELU the slowest kernel of a small
        # model's step; its exp-based tanh is as accurate on GELU's inputs (`python bench.py
        # train` times both).
        torch._inductor.config.cpp.use_decompose_tanh = True
    try:
        compiled = torch.compile(model)
        # Compiling is lazy: force it now, so failures surface here, on the training step's own
        # graph (its batch shape, precision and grad mode: another shape would make the batch
        # dimension dynamic, and inductor's code for that is slower).
        x, y = (torch.zeros(batch_size, block_size, dtype=torch.long, device=device) for _ in range(2))
        # fork_rng: the warm-up's dropout must not draw from the run's random numbers, which a
        # resume has just restored (resuming would no longer be exact); on CUDA, those of the
        # model's GPU, whose index resolve_device names
        cuda_devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
        with torch.random.fork_rng(devices=cuda_devices), ctx:
            compiled(x, y)  # two tensors: dynamo would specialise the graph on `idx is targets`
        return compiled
    except Exception as e:  # a missing C compiler, an unsupported backend, ...
        print0(f"warning: torch.compile failed ({str(e).splitlines()[0][:200]}); running eagerly")
        return model
