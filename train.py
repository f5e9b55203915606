"""Train the GPT of gpt.py on the token bins of prepare.py.

    python train.py config/small.py                        # one process (CPU, one GPU, MPS)
    python train.py config/small.py --max_iters=500 --device=cpu
    torchrun --nproc_per_node=2 train.py config/small.py --device=cpu --gradient_accumulation_steps=2
    torchrun --nproc_per_node=8 train.py config/default.py                 # DDP over NCCL
    python train.py --plot out                             # out/metrics.jsonl -> out/loss.png

Design choices:
- DEFAULTS below is the only list of settings. A config file (plain Python assignments) and then
  `--key=value` arguments override it; unknown keys and wrongly typed values are errors.
- Every device / precision / DDP decision is made once, in setup(); the loop only uses `ctx`
  (autocast), `scaler` (a no-op unless fp16) and `ddp`.
- Batches are random windows of the memory-mapped bins. Each step's *global* set of windows comes
  from one seeded generator shared by all ranks, and rank r takes its share: 2 ranks with
  accumulation k see exactly the examples of 1 rank with 2k.
- Checkpoints (ckpt.pt to resume, best.pt for the best val loss) are written atomically and carry
  the model args and the tokenizer, so sample.py needs nothing else. Resuming is exact.
- Ctrl-C or SIGTERM ends a run at a step boundary with ckpt.pt saved (under DDP at the next log
  step, which all ranks agree on) and exit status 128 + the signal's number.
"""
import ast
import difflib
import importlib.util
import json
import math
import os
import signal
import sys
import time
import traceback
import zipfile
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from gpt import GPT, GPTConfig
from prepare import UserError, load_tokenizer, run_main

# -----------------------------------------------------------------------------
# Settings. Names follow nanoGPT's where the concept is the same.

DEFAULTS = dict(
    # I/O
    out_dir="out",
    dataset="shakespeare_char",  # a folder under data/ written by prepare.py (or a path to one)
    init_from="scratch",  # 'scratch' | 'resume' (out_dir/ckpt.pt) | a checkpoint path | a HF GPT-2 dir
    eval_interval=250,  # iterations between evaluations (and checkpoints)
    eval_iters=50,  # batches per split per evaluation
    log_interval=10,  # iterations between log lines (and, under DDP, checks for a stop signal)
    always_save_checkpoint=True,  # False: evaluations write ckpt.pt only if val improved (a run's end always)
    patience=0,  # stop after this many evaluations without a val improvement; 0 = never
    # data
    batch_size=12,  # sequences per micro-step per process
    block_size=256,  # context length in tokens
    gradient_accumulation_steps=1,  # micro-steps per optimizer step, summed over all processes
    # model
    n_layer=6,
    n_head=6,
    n_embd=384,
    dropout=0.0,  # 0 for pretraining; 0.1-0.3 helps on small data
    bias=True,  # biases in Linear and LayerNorm layers, as GPT-2 has
    # AdamW and the learning-rate schedule (linear warmup, then cosine decay to min_lr)
    learning_rate=6e-4,
    max_iters=5000,  # optimizer steps in all
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # 0 = off
    decay_lr=True,  # False: learning_rate throughout
    warmup_iters=100,  # steps of linear warmup to learning_rate
    lr_decay_iters=5000,  # the step where the cosine reaches min_lr (flat after); ~max_iters
    min_lr=6e-5,
    # system
    device="auto",  # 'auto' (cuda, then mps, then cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
    dtype="auto",  # 'auto' | 'float32' | 'bfloat16' | 'float16'
    compile=False,  # torch.compile the model (falls back with a warning where it fails)
    backend="auto",  # DDP backend: 'auto' (nccl on CUDA, gloo otherwise) | 'nccl' | 'gloo'
    seed=1337,
    # logging
    tensorboard_log=False,  # out_dir/tensorboard
    wandb_log=False,
    wandb_project="gpt",
    wandb_run_name="run",
)
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias")


def parse_value(key, text, default):
    """A command-line string as a value of the default's type: 3e-4, 1000, true, 'gpt2'."""
    expected = type(default)
    if expected is str:
        return text
    if expected is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(f"{key} expects {expected.__name__}, got {text!r}") from None
    return check_type(key, value, default)


def check_type(key, value, default):
    """`value` if it has the default's type (an int where a float is expected is fine)."""
    expected = type(default)
    if expected is float and type(value) is int:
        value = float(value)  # 3 where 3.0 is expected is fine
    if type(value) is not expected:
        raise UserError(f"{key} expects {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def check_key(key, source):
    if key not in DEFAULTS:
        close = difflib.get_close_matches(key, DEFAULTS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown setting '{key}' in {source}.{hint} Valid settings: {', '.join(DEFAULTS)}")


def load_config(argv):
    """DEFAULTS, overridden by config files (in order), then by --key=value / --key value."""
    config = dict(DEFAULTS)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, has_value, value = arg[2:].partition("=")
            check_key(key, "the command line")
            if not has_value:
                following = argv[i + 1] if i + 1 < len(argv) else None
                if type(DEFAULTS[key]) is bool and str(following).lower() not in ("true", "false"):
                    value = "true"  # a bare --flag switches a bool setting on
                elif following is None:
                    raise UserError(f"{arg} needs a value: {arg}=VALUE")
                else:
                    value, i = following, i + 1
            config[key] = parse_value(key, value, DEFAULTS[key])
        else:
            path = Path(arg)
            if not path.is_file():
                raise UserError(f"config file not found: {arg}")
            namespace = {}
            try:
                exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)
            except Exception as e:  # a config file is Python: its errors are the user's to fix
                raise UserError(f"config file {arg}{config_error_line(e, path)}: {type(e).__name__}: "
                                f"{e.msg if isinstance(e, SyntaxError) else e}") from None
            for key, value in namespace.items():
                if key.startswith("_") or type(value).__name__ in ("module", "function", "type"):
                    continue
                check_key(key, arg)
                config[key] = check_type(key, value, DEFAULTS[key])  # Python values: no parsing
        i += 1
    check_ranges(config)
    return config


def config_error_line(e, path):
    """', line N' of config file `path` where exception `e` arose ('' if not inside it)."""
    if isinstance(e, SyntaxError):
        return f", line {e.lineno}"
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == str(path)]
    return f", line {lines[-1]}" if lines else ""


def check_ranges(cfg):
    """Values of the right type that make no sense: one clear error, not a crash deep in torch."""
    at_least = dict(eval_interval=1, eval_iters=1, log_interval=1, patience=0, batch_size=1, block_size=1,
                    gradient_accumulation_steps=1, n_layer=1, n_head=1, n_embd=1, learning_rate=0.0,
                    max_iters=0, weight_decay=0.0, grad_clip=0.0, warmup_iters=0, lr_decay_iters=0,
                    min_lr=0.0, seed=0)
    for key, low in at_least.items():
        if not cfg[key] >= low:  # `not >=` also catches nan
            raise UserError(f"{key} must be >= {low}, got {cfg[key]}")
    for key in ("dropout", "beta1", "beta2"):
        if not 0 <= cfg[key] < 1:
            raise UserError(f"{key} must be in [0, 1), got {cfg[key]}")
    for key in ("out_dir", "dataset"):
        if not cfg[key].strip():
            raise UserError(f"{key} is empty; name a folder, e.g. --{key}={DEFAULTS[key]}")
    if cfg["decay_lr"] and cfg["warmup_iters"] > cfg["lr_decay_iters"]:
        raise UserError(f"warmup_iters={cfg['warmup_iters']} exceeds lr_decay_iters={cfg['lr_decay_iters']}: "
                        f"the LR would drop from its peak straight to min_lr; lower warmup_iters")
    if cfg["decay_lr"] and cfg["min_lr"] > cfg["learning_rate"]:
        raise UserError(f"min_lr={cfg['min_lr']} exceeds learning_rate={cfg['learning_rate']}: the LR "
                        f"would rise, not decay; lower min_lr (learning_rate / 10 is usual) or --decay_lr=False")
    if cfg["n_embd"] % cfg["n_head"]:
        raise UserError(f"n_embd={cfg['n_embd']} must be a multiple of n_head={cfg['n_head']}")
    if cfg["backend"] not in ("auto", "nccl", "gloo"):
        raise UserError(f"unknown backend '{cfg['backend']}' (use auto, nccl or gloo)")


# -----------------------------------------------------------------------------
# Device, precision and checkpoints: shared with sample.py and bench.py.

def resolve_device(name):
    """'auto' picks cuda, then mps, then cpu; asking for a device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available here (try --device=cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device '{name}' requested but MPS is not available here (try --device=cpu)")
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)")
    # There is one CPU device: 'cpu:0' would tag checkpoint storages that torch.load cannot map.
    return "cpu" if kind == "cpu" else name


def cpu_has_bf16():
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name, device):
    """'auto': bf16 where the hardware runs it natively, fp16 on older CUDA GPUs, else fp32."""
    kind = device.split(":")[0]
    if name == "auto":
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if kind == "cpu" and cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}' (use auto, {', '.join(DTYPES)})")
    if name == "float16" and kind != "cuda":
        raise UserError("dtype float16 needs a CUDA device; use bfloat16 or float32")
    return DTYPES[name]


def autocast_context(device, dtype):
    """Mixed precision for the forward pass: weights stay fp32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def save_checkpoint(obj, path):
    """torch.save to a temp file, fsync, then rename: a kill at any instant leaves the old file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint written by save_checkpoint; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its end is read first
        raise UserError(f"cannot read checkpoint {path}: not a torch.save archive (truncated, or another kind of file)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError on bad files
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"{path} contains pickled Python objects; refusing to load it "
                            "(only tensors, numbers, strings, lists and dicts are allowed)") from None
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (no 'model' / 'model_args')")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu", dropout=0.0):
    """Build the GPT a checkpoint describes and load its weights."""
    try:
        model = GPT(GPTConfig(**{**ckpt["model_args"], "dropout": dropout}))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:  # unknown field, size mismatch, missing key
        raise UserError(f"checkpoint's weights do not match its model_args: {str(e).splitlines()[0]}") from None
    return model.to(device)


def measure_peak_flops(device, dtype):
    """This device's dense matmul FLOP/s in `dtype`, measured: the denominator of MFU."""
    n = 2048 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n**3 / best


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device.startswith("mps"):
        torch.mps.synchronize()


# -----------------------------------------------------------------------------
# Data, learning rate, evaluation.

def dataset_dir(name):
    """The folder of a prepared dataset: a name under data/, a path to the folder or its meta.json."""
    path = Path(name) if os.sep in name else Path("data") / name
    if not path.is_dir() and Path(name).is_file():
        if Path(name).name == "meta.json":
            return Path(name).parent
        stem = Path(name).stem
        raise UserError(f"dataset {name} is a file, not a folder made by prepare.py; make one with "
                        f"`python prepare.py --input {name} --out data/{stem}`, then --dataset={stem}")
    return path


def open_bins(data_dir, block_size):
    """meta.json, the bins' dtype, and each split's number of window starts (at least one)."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"dataset not found: {meta_path} is missing. Make it with "
                        f"`python prepare.py --input YOUR_TEXT --out {data_dir}` "
                        f"(or plain `python prepare.py` for shakespeare_char)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"])
    window_starts = {}
    for split in ("train", "val"):
        n = (data_dir / f"{split}.bin").stat().st_size // dtype.itemsize
        if n <= block_size:
            raise UserError(f"{split}.bin of {data_dir} holds {n} tokens; block_size {block_size} "
                            f"needs at least {block_size + 1}. Lower block_size or add text.")
        window_starts[split] = n - block_size  # a window is block_size + 1 tokens: inputs and targets
    return meta, dtype, window_starts


def get_windows(data_dir, split, dtype, starts, block_size):
    """Inputs and targets for windows starting at `starts`: two (len(starts), block_size) int64."""
    # A fresh memmap per batch: a long-lived one grows the process' memory (nanoGPT issue #303).
    data = np.memmap(Path(data_dir) / f"{split}.bin", dtype=dtype, mode="r")
    tokens = data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
    return torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(tokens[:, 1:].copy())


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """Linear warmup (never 0, even at step 0), cosine decay to min_lr at lr_decay_iters, then flat."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


# -----------------------------------------------------------------------------
# Setup: everything decided once, before the loop.

def setup_distributed(cfg):
    """Join the torchrun process group if there is one; returns (rank, local_rank, world_size)."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    accum = cfg["gradient_accumulation_steps"]
    if accum % world_size:  # each process runs an equal share of the micro-steps
        raise UserError(f"gradient_accumulation_steps={accum} must be a multiple of the number of "
                        f"processes ({world_size}): pass --gradient_accumulation_steps="
                        f"{math.ceil(accum / world_size) * world_size}")
    if cfg["device"].startswith("cuda") or (cfg["device"] == "auto" and torch.cuda.is_available()):
        cfg["device"] = f"cuda:{local_rank}"
        torch.cuda.set_device(cfg["device"])
    backend = cfg["backend"]
    if backend == "auto":
        backend = "nccl" if cfg["device"].startswith("cuda") else "gloo"
    if backend == "nccl" and not cfg["device"].startswith("cuda"):  # NCCL only moves CUDA tensors
        raise UserError(f"backend nccl needs CUDA devices, not {cfg['device']}; use --backend=gloo")
    torch.distributed.init_process_group(backend=backend)
    return rank, local_rank, world_size


def print0(*args, **kwargs):
    """print on rank 0 only: one copy of every line however many processes run."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def build_model(cfg, vocab_size, tokenizer, device):
    """A fresh GPT, or the weights of a checkpoint / Hugging Face dir; returns (model, ckpt or None)."""
    init = cfg["init_from"]
    if init == "scratch":
        args = {k: cfg[k] for k in MODEL_KEYS} | {"vocab_size": vocab_size, "dropout": cfg["dropout"]}
        return GPT(GPTConfig(**args)).to(device), None
    path = Path(cfg["out_dir"]) / "ckpt.pt" if init == "resume" else Path(init)
    if path.is_dir() and (path / "ckpt.pt").is_file():  # it has a config.json too, but not GPT-2's
        raise UserError(f"{path} is the out_dir of a training run: --init_from={path / 'ckpt.pt'} starts "
                        f"from its weights; --out_dir={path} --init_from=resume continues it")
    if path.is_dir() and (path / "config.json").is_file():
        try:
            model = GPT.from_pretrained(path, dropout=cfg["dropout"])
        except (ValueError, OSError) as e:
            raise UserError(f"cannot load {path}: {e}") from None
        ckpt = {"model_args": asdict(model.config), "tokenizer": None}  # GPT-2's own BPE
    else:
        ckpt = load_checkpoint(path, device)
        model = model_from_checkpoint(ckpt, device, cfg["dropout"])
    check_compatible(cfg, ckpt, vocab_size, tokenizer, path, resume=(init == "resume"))
    cfg.update({k: ckpt["model_args"][k] for k in MODEL_KEYS if k != "block_size"})  # as loaded
    return model.to(device), ckpt


def check_compatible(cfg, ckpt, vocab_size, tokenizer, path, resume):
    """A model can only continue on data of its own vocabulary and, when resuming, its own shape."""
    args = ckpt["model_args"]
    # A Hugging Face folder carries no tokenizer of ours: it is GPT-2's, which prepare.py names gpt2.
    fix = f"prepare the data with `python prepare.py --tokenizer {path if ckpt['tokenizer'] else 'gpt2'} ...`"
    if args["vocab_size"] != vocab_size:
        raise UserError(f"{path} has vocab_size={args['vocab_size']} but dataset "
                        f"{cfg['dataset']} has vocab_size={vocab_size}; {fix}")
    theirs = ckpt["tokenizer"] or {"kind": "gpt2"}
    same = theirs == tokenizer.to_dict() if ckpt["tokenizer"] else tokenizer.kind == "gpt2"
    if not same:
        if theirs["kind"] == tokenizer.kind == "char":
            what = f"a different character set than dataset {cfg['dataset']}"
        else:
            what = f"a different tokenizer ({theirs['kind']}) than dataset {cfg['dataset']} ({tokenizer.kind})"
        raise UserError(f"{path} was trained with {what}; {fix}")
    if resume and "optimizer" not in ckpt:
        raise UserError(f"cannot resume from {path}: it holds weights only (a copy of best.pt?); "
                        f"--init_from=PATH starts a new run from a weights file")
    if resume and ckpt["iter_num"] >= cfg["max_iters"]:
        raise UserError(f"nothing to resume: {path} is at iter {ckpt['iter_num']} and max_iters="
                        f"{cfg['max_iters']}; raise --max_iters (and lr_decay_iters) to train further")
    if resume and cfg["patience"] and ckpt["evals_since_best"] >= cfg["patience"]:
        raise UserError(f"nothing to resume: {path} is {ckpt['evals_since_best']} evaluations past its "
                        f"best val loss and patience={cfg['patience']} stops it there; raise --patience "
                        f"to train further")
    mismatched = [k for k in MODEL_KEYS if k != "block_size" and cfg[k] != args[k]]
    if resume and mismatched:
        details = ", ".join(f"{k}={args[k]} (config says {cfg[k]})" for k in mismatched)
        raise UserError(f"cannot resume: {path} has {details}")
    if cfg["block_size"] > args["block_size"]:
        raise UserError(f"block_size={cfg['block_size']} exceeds {path}'s block_size={args['block_size']}")


def maybe_compile(model, device, ctx, batch_size, block_size):
    """torch.compile where it works; a warning and the eager model where it does not."""
    if device.startswith("cpu"):
        # Inductor's CPU tanh (Sleef's) makes GPT-2's tanh-GELU the slowest kernel of a small
        # model's step; its exp-based tanh is as accurate on GELU's inputs (fp32 max error 5e-7 vs
        # eager's 4e-7 over [-200, 200]) and the baby-GPT step takes ~7% less time with it.
        torch._inductor.config.cpp.use_decompose_tanh = True
    try:
        compiled = torch.compile(model)
        # Compiling is lazy: force it now, so failures surface here, on the training step's own
        # graph (its batch shape, precision and grad mode: another shape would make the batch
        # dimension dynamic, and inductor's code for that is slower).
        x, y = (torch.zeros(batch_size, block_size, dtype=torch.long, device=device) for _ in range(2))
        # fork_rng: the warm-up's dropout must not draw from the run's random numbers, which a
        # resume has just restored (resuming would no longer be exact)
        cuda_devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
        with torch.random.fork_rng(devices=cuda_devices), ctx:
            compiled(x, y)  # two tensors: dynamo would specialise the graph on `idx is targets`
        return compiled
    except Exception as e:  # a missing C compiler, an unsupported backend, ...
        print0(f"warning: torch.compile failed ({str(e).splitlines()[0][:200]}); running eagerly")
        return model


# -----------------------------------------------------------------------------

def check_logging_packages(cfg):
    """tensorboard_log / wandb_log need their package: say so before out_dir is touched."""
    for key, package in (("tensorboard_log", "tensorboard"), ("wandb_log", "wandb")):
        if cfg[key] and importlib.util.find_spec(package) is None:
            raise UserError(f"{key}=True needs {package}: pip install {package}")


def train(cfg):
    check_logging_packages(cfg)
    previous = Path(cfg["out_dir"]) / "ckpt.pt"
    if cfg["init_from"] != "resume" and previous.is_file():  # a new run would overwrite it
        raise UserError(f"{cfg['out_dir']} already holds a run ({previous}); continue it with "
                        f"--init_from=resume, or pass another --out_dir")
    rank, local_rank, world_size = setup_distributed(cfg)
    master = rank == 0
    ddp = world_size > 1
    device = resolve_device(cfg["device"])
    dtype = resolve_dtype(cfg["dtype"], device)
    cfg["device"], cfg["dtype"] = device, str(dtype).removeprefix("torch.")
    device_type = device.split(":")[0]
    ctx = autocast_context(device, dtype)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == torch.float16))
    accum = cfg["gradient_accumulation_steps"] // world_size  # micro-steps of this process
    B, T = cfg["batch_size"], cfg["block_size"]
    tokens_per_iter = B * T * cfg["gradient_accumulation_steps"]
    peak_flops = measure_peak_flops(device, dtype) if master else 1.0  # before seeding: uses randn

    data_dir = dataset_dir(cfg["dataset"])
    meta, bin_dtype, window_starts = open_bins(data_dir, T)
    tokenizer = load_tokenizer(data_dir)

    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    model, ckpt = build_model(cfg, meta["vocab_size"], tokenizer, device)
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"],
                                           (cfg["beta1"], cfg["beta2"]), device_type)
    batch_rng = np.random.default_rng(cfg["seed"])  # the same stream on every rank
    iter_num, best_val_loss, evals_since_best, elapsed0 = 0, float("inf"), 0, 0.0
    resume_iter = None  # the iteration a resumed run starts at (its evaluation, if due, is done)
    torch.manual_seed(cfg["seed"] + rank)  # dropout masks differ between ranks
    if cfg["init_from"] == "resume":
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        evals_since_best, elapsed0 = ckpt["evals_since_best"], ckpt["elapsed_s"]
        batch_rng.bit_generator.state = ckpt["rng"]["batches"]
        if ckpt["rng"]["world_size"] == world_size == 1:
            torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        else:  # per-rank dropout streams are not saved; re-seed them, distinct per rank and step
            torch.manual_seed(cfg["seed"] + rank + 1000 * iter_num)
        if device_type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
        resume_iter = iter_num
        print0(f"resuming from {previous} at iter {iter_num} (best val loss {best_val_loss:.4f})")
    del ckpt  # free its copy of the weights and optimizer state

    raw_model = model  # what checkpoints store: no DDP / compile wrappers, no _orig_mod. prefix
    if cfg["compile"]:
        model = maybe_compile(model, device, ctx, B, T)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device_type == "cuda" else None)
    flops_per_iter = raw_model.flops_per_token() * tokens_per_iter / world_size

    out_dir = Path(cfg["out_dir"])
    if master:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        except OSError as e:  # a file of that name, a read-only disk, ...
            raise UserError(f"cannot write to out_dir {out_dir}: {e.strerror or e}") from None
        print0("config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
        print0(f"model: {raw_model.num_params() / 1e6:.2f}M parameters; {tokens_per_iter:,} tokens "
               f"per iteration ({B} batch x {T} block x {cfg['gradient_accumulation_steps']} accum); "
               f"{world_size} process(es) on {device}, {cfg['dtype']}")
    log = MetricsLog(out_dir / "metrics.jsonl", cfg, resume_iter) if master else None

    def draw_windows(split, rng, count):
        return rng.integers(0, window_starts[split], size=count)

    def get_batch(split, starts):
        x, y = get_windows(data_dir, split, bin_dtype, starts, T)
        if device_type == "cuda":  # pinned memory lets the copy overlap with compute
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    @torch.no_grad()
    def evaluate():
        """Loss, perplexity and next-token accuracy on eval_iters batches per split, split over ranks.

        Every evaluation scores the same windows (fixed by the seed), so successive val losses
        differ only by the model, and evaluating never moves the training batch stream.
        """
        model.eval()
        results = {}
        for split_id, split in enumerate(("train", "val")):
            rng = np.random.default_rng([cfg["seed"], split_id])
            starts = draw_windows(split, rng, cfg["eval_iters"] * B).reshape(cfg["eval_iters"], B)
            sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
            for batch_starts in starts[rank::world_size]:
                x, y = get_batch(split, batch_starts)
                with ctx:
                    logits, loss = model(x, y)
                sums += torch.stack([loss.double() * y.numel(),
                                     (logits.argmax(-1) == y).sum().double(),
                                     torch.tensor(y.numel(), device=device, dtype=torch.float64)])
            if ddp:
                torch.distributed.all_reduce(sums)
            loss_sum, correct, count = sums.tolist()
            results[split] = (loss_sum / count, correct / count)
        model.train()
        (train_loss, _), (val_loss, val_acc) = results["train"], results["val"]
        return dict(train_loss=train_loss, val_loss=val_loss,
                    val_ppl=math.exp(min(val_loss, 700)), val_acc=val_acc)

    def checkpoint(name, full):
        """The weights, their shape and tokenizer; with `full`, everything needed to resume."""
        state = dict(model=raw_model.state_dict(), model_args=asdict(raw_model.config),
                     tokenizer=tokenizer.to_dict(), config=cfg, iter_num=iter_num,
                     best_val_loss=best_val_loss)
        if full:
            rng = dict(batches=batch_rng.bit_generator.state, torch=torch.get_rng_state(),
                       world_size=world_size)
            if device_type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state()
            state |= dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng,
                          evals_since_best=evals_since_best, elapsed_s=elapsed0 + time.time() - t_start)
        save_checkpoint(state, out_dir / name)

    # SIGTERM (a scheduler's pre-emption) and Ctrl-C end the run at a step boundary with ckpt.pt
    # saved and exit status 128 + the signal's number (143, 130). A second Ctrl-C stops at once
    # (the last checkpoint on disk stays intact); a second SIGTERM changes nothing, as a scheduler
    # may signal torchrun's workers as well as torchrun, which forwards its own. torchrun sends
    # SIGKILL 30 s after forwarding (--shutdown_timeout, TORCH_ELASTIC_SHUTDOWN_TIMEOUT; see
    # SubprocessContext._close in torch/distributed/elastic/multiprocessing/api.py): under DDP,
    # log_interval steps and one checkpoint write must fit in that.
    received = []

    def on_signal(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in received:
            raise KeyboardInterrupt
        received.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    def stop_signal():
        """The signal to stop on, 0 for none. Every rank must stop at the same step: under DDP the
        ranks take the largest signal any of them received, which waits for all of them."""
        signum = received[0] if received else 0
        if ddp:
            signum = torch.tensor(signum, device=device)
            torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
            signum = int(signum.item())
        return signum

    t_start = time.time()
    t_last, iters_since_log = time.time(), 0
    loss_sum = torch.zeros((), device=device)  # summed on device: no host sync between logs
    stop = 0
    while True:
        lr = get_lr(iter_num, cfg["learning_rate"], cfg["warmup_iters"], cfg["lr_decay_iters"],
                    cfg["min_lr"]) if cfg["decay_lr"] else cfg["learning_rate"]
        for group in optimizer.param_groups:
            group["lr"] = lr

        # A signal stops the run here: checked every step, or under DDP at log steps only, where
        # the loop waits for the device anyway (an all-reduce every step would add a host sync).
        if not ddp or iter_num % cfg["log_interval"] == 0:
            stop = stop_signal()

        # Evaluate, keep the best weights, write the resume checkpoint.
        last_iter = iter_num == cfg["max_iters"]
        done = last_iter or stop > 0  # the end of the run writes ckpt.pt below the loop
        if (iter_num % cfg["eval_interval"] == 0 or last_iter) and iter_num != resume_iter:
            metrics = evaluate()
            if not math.isfinite(metrics["val_loss"]):
                raise UserError(f"val loss is {metrics['val_loss']} at iter {iter_num}; stopping "
                                f"(the last good checkpoint in {out_dir} is kept). Try a lower learning_rate.")
            improved = metrics["val_loss"] < best_val_loss
            if improved:
                best_val_loss, evals_since_best = metrics["val_loss"], 0
            else:
                evals_since_best += 1
            print0(f"iter {iter_num}: train loss {metrics['train_loss']:.4f}, val loss "
                   f"{metrics['val_loss']:.4f}, val ppl {metrics['val_ppl']:.2f}, "
                   f"val acc {metrics['val_acc']:.3f}" + (" (best)" if improved else ""))
            if cfg["patience"] and evals_since_best >= cfg["patience"]:
                print0(f"early stop: no val improvement in {cfg['patience']} evaluations")
                done = True
            if master:
                log.write(iter=iter_num, elapsed_s=elapsed0 + time.time() - t_start, lr=lr, **metrics)
                if improved:
                    checkpoint("best.pt", full=False)
                if (improved or cfg["always_save_checkpoint"]) and not done:
                    checkpoint("ckpt.pt", full=True)
            t_last = time.time()  # evaluation time is not training throughput
        if done:
            break

        # One optimizer step: accum micro-steps on this rank's share of the global batch.
        starts = draw_windows("train", batch_rng, B * cfg["gradient_accumulation_steps"])
        my_starts = starts.reshape(-1, B)[rank * accum:(rank + 1) * accum]
        for micro_step, micro_starts in enumerate(my_starts):
            x, y = get_batch("train", micro_starts)
            if ddp:
                # Synchronise gradients only on the last micro-step; must be set before its forward.
                model.require_backward_grad_sync = micro_step == accum - 1
            with ctx:
                _, loss = model(x, y)
                loss = loss / accum  # the step's gradient is the mean over its micro-batches
            loss_sum += loss.detach()
            scaler.scale(loss).backward()
        if cfg["grad_clip"]:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        iters_since_log += 1

        if iter_num % cfg["log_interval"] == 0:
            if ddp:
                torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
            loss = loss_sum.item() / iters_since_log  # .item() waits for the device: only here
            if not math.isfinite(loss):
                raise UserError(f"loss is {loss} at iter {iter_num}; stopping (the last good "
                                f"checkpoint in {out_dir} is kept). Try a lower learning_rate.")
            dt = (time.time() - t_last) / iters_since_log
            mfu = flops_per_iter / dt / peak_flops
            print0(f"iter {iter_num}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                   f"{tokens_per_iter / dt:,.0f} tok/s, mfu {mfu * 100:.1f}%")
            if master:
                log.write(iter=iter_num, elapsed_s=elapsed0 + time.time() - t_start, lr=lr,
                          loss=loss, ms_per_iter=dt * 1000, tokens_per_s=tokens_per_iter / dt, mfu=mfu)
            loss_sum.zero_()
            t_last, iters_since_log = time.time(), 0

    # The end of the run (max_iters, an early stop or a signal) always saves where it got to.
    if master:
        checkpoint("ckpt.pt", full=True)
        log.close()
    if stop:
        print0(f"stopped by {signal.Signals(stop).name} at iter {iter_num}; {out_dir / 'ckpt.pt'} "
               f"resumes it (--init_from=resume)")
    if ddp:
        # Wait for rank 0's last checkpoint: a rank that tears down gloo while another still
        # works can abort ("terminate called without an active exception").
        torch.distributed.barrier()
        del model  # DDP's reducer holds the process group: release it before the group goes
        torch.distributed.destroy_process_group()
    return stop


class MetricsLog:
    """out_dir/metrics.jsonl, one JSON object per line; optionally TensorBoard and W&B too.

    A new run starts the file afresh. A resumed one keeps the records up to its checkpoint's
    iteration and drops the rest: a run killed without a checkpoint logged iterations that the
    resumed run does again, and a kill mid-write leaves half a line."""

    def __init__(self, path, cfg, resume_iter=None):
        kept = []
        if resume_iter is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["iter"] <= resume_iter:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    pass  # the half-written last line of a killed run
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
        self.file = open(path, "a", encoding="utf-8")
        self.tensorboard = self.wandb = None
        if cfg["tensorboard_log"]:
            from torch.utils.tensorboard import SummaryWriter  # checked by check_logging_packages
            self.tensorboard = SummaryWriter(Path(cfg["out_dir"]) / "tensorboard")
        if cfg["wandb_log"]:
            import wandb
            self.wandb = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg)

    def write(self, **record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        values = {k: v for k, v in record.items() if k not in ("iter", "elapsed_s")}
        if self.tensorboard:
            for k, v in values.items():
                self.tensorboard.add_scalar(k, v, record["iter"])
        if self.wandb:
            self.wandb.log(values, step=record["iter"])

    def close(self):
        self.file.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def plot(out_dir):
    """Draw out_dir/metrics.jsonl's loss curves into out_dir/loss.png."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: train first, or pass the out_dir of a run")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    logs = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([r["iter"] for r in logs], [r["loss"] for r in logs], label="train (logged)", alpha=0.5)
    ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
    ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set(xlabel="iteration", ylabel="loss", title=str(out_dir))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(Path(out_dir) / "loss.png", dpi=100, bbox_inches="tight")
    print(f"wrote {Path(out_dir) / 'loss.png'}")


def settings_help():
    """DEFAULTS as it is written in this file, comments included: the one place settings are
    explained, so --help cannot drift from it."""
    source = Path(__file__).read_text(encoding="utf-8")
    start = source.index("DEFAULTS = dict(\n") + len("DEFAULTS = dict(\n")
    block = source[start:source.index("\n)\n", start)]
    lines = []
    for line in block.splitlines():
        key, eq, rest = line.strip().partition("=")
        if eq and key in DEFAULTS:
            value, _, comment = rest.partition("  # ")
            line = f"--{key}={value.rstrip(',')}" + (f"  # {comment}" if comment else "")
        lines.append("  " + line.strip())
    return "\n".join(lines)


def main():
    argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "\nSettings, their defaults and what they mean (DEFAULTS in train.py):\n" +
              settings_help())
        return
    if argv and argv[0].partition("=")[0] == "--plot":  # --plot, --plot DIR or --plot=DIR
        dirs = argv[0].split("=", 1)[1:] + argv[1:]
        if len(dirs) > 1:
            raise UserError(f"--plot takes one out_dir, got {len(dirs)}: {' '.join(dirs)}")
        return plot(dirs[0] if dirs else "out")
    stop = train(load_config(argv))
    if stop:  # stopped by a signal, after saving: the status a shell gives a process it killed
        sys.exit(128 + stop)


if __name__ == "__main__":
    run_main(main)
