"""Train the GPT of gpt.py on the token bins of prepare.py.

    python train.py config/small.py                        # one process (CPU, one GPU, MPS)
    python train.py config/small.py --max_iters=500 --device=cpu
    python train.py --init_from=resume --out_dir=out-small # continue a stopped run
    torchrun --nproc_per_node=2 train.py config/small.py --device=cpu --gradient_accumulation_steps=2
    torchrun --nproc_per_node=8 train.py config/default.py                 # DDP over NCCL
    torchrun --nproc_per_node=8 train.py config/gpt2_xl.py                 # FSDP (fsdp = True)
    python train.py --plot out                             # out/metrics.jsonl -> out/loss.png
    python train.py config/small.py --lr_find              # LR range test -> a learning_rate, lr_find.png

Design choices:
- Settings (below) is the only list of settings, each with its type, default and meaning. A config
  file (plain Python assignments) and then `--key=value` arguments override it; unknown keys and
  wrongly typed values are errors. A resumed run takes its settings from its checkpoint.
- Every device / precision / DDP / FSDP decision is made once, in setup_runtime() and
  step_model(); the loop only uses `rt.ctx` (autocast), `rt.scaler` (a no-op unless fp16) and
  `rt.distributed`.
- fsdp shards the weights, gradients and AdamW state over the ranks (FSDP2: a unit per Block,
  the root unit holding the tied wte / lm_head). Its checkpoints are gathered to rank 0 in one
  process's format: sample.py reads them, and a run resumes with FSDP or without.
- Batches are random windows of the memory-mapped bins. Each step's *global* set of windows comes
  from one seeded generator shared by all ranks, and rank r takes its share: 2 ranks with
  accumulation k see exactly the examples of 1 rank with 2k.
- Checkpoints (ckpt.pt to resume, best.pt for the best val loss) are written atomically and carry
  the model args and the tokenizer, so sample.py needs nothing else. Resuming is exact.
- time_budget_s fixes the run's length from the measured speed of its first steps, so a recipe
  takes the same wall time on any machine; the decision is stored, and a resume keeps it. Under
  the WSD schedule the LR stays flat until the cooldown, so the length is decided again at each
  log step until then, from the speed of the latest steps, changing no LR already used.
- Ctrl-C or SIGTERM ends a run at a step boundary with ckpt.pt saved (under torchrun at the next
  log step, which all ranks agree on) and exit status 128 + the signal's number.
- The samples printed at evaluations (eval_sample_tokens) draw from a generator of their own, so
  a run with them trains exactly as one without.
- --lr_find (the LR range test) is the same setup and the same train_step with an exponentially
  rising LR instead of the schedule; it writes nothing but out_dir/lr_find.png.
"""
import ast
import collections
import difflib
import importlib.util
import json
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from common import (UserError, atomic_write_text, autocast_context, maybe_compile, measure_peak_flops,
                    peak_memory_mb, print0, pyplot, resolve_device, resolve_dtype, run_main, save_figure, sync,
                    use_tf32)
from engine import generate
from gpt import GPT, GPTConfig, is_hub_model_id, load_checkpoint, model_from_checkpoint, save_checkpoint
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# Settings. Names follow nanoGPT's where the concept is the same.


def setting(default, meaning):
    return field(default=default, metadata={"help": meaning})


@dataclass(frozen=True)
class Settings:
    # I/O
    out_dir: str = setting("out", "where ckpt.pt, best.pt, metrics.jsonl and config.json go")
    dataset: str = setting("shakespeare_char", "a folder under data/ written by prepare.py (or a path to one)")
    init_from: str = setting("scratch", "'scratch' | 'resume' (out_dir/ckpt.pt) | a checkpoint path | a HF GPT-2 "
                                        "dir or Hub id (gpt2, OWNER/NAME)")
    eval_interval: int = setting(250, "iterations between evaluations (and checkpoints)")
    eval_iters: int = setting(50, "batches per split per evaluation")
    log_interval: int = setting(10, "iterations between log lines (and, under torchrun, checks for a stop signal)")
    always_save_checkpoint: bool = setting(True, "False: evaluations write ckpt.pt only if val improved "
                                                 "(a run's end always)")
    patience: int = setting(0, "stop after this many evaluations without a val improvement; 0 = never")
    # data
    batch_size: int = setting(12, "sequences per micro-step per process")
    block_size: int = setting(256, "context length in tokens")
    gradient_accumulation_steps: int = setting(1, "micro-steps per optimizer step, summed over all processes")
    # model
    n_layer: int = setting(6, "transformer blocks")
    n_head: int = setting(6, "attention heads per block")
    n_embd: int = setting(384, "embedding width (a multiple of n_head)")
    dropout: float = setting(0.0, "0 for pretraining; 0.1-0.3 helps on small data")
    bias: bool = setting(True, "biases in Linear and LayerNorm layers, as GPT-2 has")
    # AdamW and the learning-rate schedule (linear warmup, then a cosine or WSD decay to min_lr)
    learning_rate: float = setting(6e-4, "the peak learning rate")
    max_iters: int = setting(5000, "optimizer steps in all")
    weight_decay: float = setting(0.1, "AdamW's decoupled weight decay (matmul weights only)")
    beta1: float = setting(0.9, "AdamW's beta1")
    beta2: float = setting(0.95, "AdamW's beta2")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this; 0 = off")
    decay_lr: bool = setting(True, "False: learning_rate throughout")
    warmup_iters: int = setting(100, "steps of linear warmup to learning_rate")
    lr_decay_iters: int = setting(5000, "the step where the decay reaches min_lr (flat after); ~max_iters")
    min_lr: float = setting(6e-5, "the learning rate at the end of the decay; ~learning_rate / 10")
    lr_schedule: str = setting("cosine", "after warmup: 'cosine' decays from the start; 'wsd' (warmup-stable-"
                                         "decay) holds learning_rate, then decays linearly over the last "
                                         "cooldown_frac of lr_decay_iters")
    cooldown_frac: float = setting(0.2, "with lr_schedule='wsd': the share of lr_decay_iters spent decaying")
    optimizer: str = setting("adamw", "'adamw' | 'muon': Muon (momentum orthogonalized by Newton-Schulz, optim.py) "
                                      "for the Blocks' weight matrices, AdamW for embeddings, biases, LayerNorms")
    muon_lr: float = setting(0.01, "Muon's peak LR, which the schedule scales as it scales learning_rate (0.005-0.01 "
                                   "measured best at config/small.py's model, BENCHMARKS.md)")
    muon_momentum: float = setting(0.95, "Muon's Nesterov momentum (modded-nanogpt's)")
    muon_momentum_warmup_iters: int = setting(300, "steps over which Muon's momentum rises linearly from 0.85 to "
                                                   "muon_momentum (modded-nanogpt's); 0 = muon_momentum from the start")
    muon_weight_decay: float = setting(0.0, "Muon's decoupled weight decay (times its LR, as AdamW's)")
    time_budget_s: float = setting(0.0, "seconds the whole run may take: its first steps are timed, then "
                                        "max_iters = lr_decay_iters is set to fit (with 'wsd', again at each "
                                        "log step until the decay starts); 0 = off")
    # system
    device: str = setting("auto", "'auto' (cuda, then mps, then cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'")
    dtype: str = setting("auto", "'auto' (bf16 where native, fp16 on older GPUs, fp32 with fsdp there, else "
                                 "fp32) | 'float32' | 'bfloat16' | 'float16'")
    tf32: bool = setting(True, "float32 runs on CUDA GPUs from Ampere on: matmuls on TF32 tensor cores (a 10-bit "
                               "mantissa, several times faster); False: exact float32")
    compile: bool = setting(False, "torch.compile the model (falls back with a warning where it fails; with "
                                   "fsdp, each Block, without the fallback)")
    backend: str = setting("auto", "DDP/FSDP backend: 'auto' (nccl on CUDA, gloo otherwise) | 'nccl' | 'gloo'")
    fsdp: bool = setting(False, "under torchrun: shard the weights, gradients and AdamW state over the processes "
                                "(FSDP2, a unit per Block) instead of a full copy each (DDP); for models "
                                "whose training state does not fit one device")
    grad_checkpoint: bool = setting(False, "activation checkpointing: keep only each Block's input in the forward "
                                           "and recompute the rest in the backward (less memory, ~1/3 more "
                                           "compute)")
    seed: int = setting(1337, "seeds the weights, the batch stream, dropout and the evaluation windows")
    # logging
    tensorboard_log: bool = setting(False, "also log to out_dir/tensorboard (pip install tensorboard)")
    wandb_log: bool = setting(False, "also log to Weights & Biases (pip install wandb)")
    wandb_project: str = setting("gpt", "W&B project")
    wandb_run_name: str = setting("run", "W&B run name")
    eval_sample_tokens: int = setting(0, "at each evaluation, sample this many tokens after eval_sample_prompt, "
                                         "print them and log them (`sample`); 0 = off")
    eval_sample_prompt: str = setting("", "the prompt of those samples; '' = end-of-text (a newline for a "
                                          "char model)")
    # the learning-rate range test: --lr_find instead of training
    lr_find: bool = setting(False, "instead of training: from the initial weights, raise the LR exponentially "
                                   "from lr_find_min to lr_find_max, print the suggested learning_rate, draw "
                                   "out_dir/lr_find.png; writes no checkpoint")
    lr_find_min: float = setting(1e-7, "the range test's first learning rate")
    lr_find_max: float = setting(1.0, "the range test's last learning rate")
    lr_find_iters: int = setting(200, "the range test's steps; it stops early once the smoothed loss passes "
                                      "4x its minimum")


DEFAULTS = {f.name: f.default for f in fields(Settings)}
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias")
LR_KEYS = ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "decay_lr", "max_iters", "lr_schedule",
           "cooldown_frac")
# What a resumed run may change (one line says so); anything else would make it another run.
CHANGEABLE_ON_RESUME = ("eval_interval", "eval_iters", "log_interval", "patience", "always_save_checkpoint",
                        "dropout", "grad_clip", "device", "dtype", "tf32", "compile", "backend", "fsdp",
                        "grad_checkpoint", "tensorboard_log", "wandb_log", "wandb_project", "wandb_run_name",
                        "eval_sample_tokens", "eval_sample_prompt")


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


def given_settings(argv):
    """The settings that config files (in order) and then --key=value / --key value give."""
    given = {}
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
            given[key] = parse_value(key, value, DEFAULTS[key])
        else:
            given.update(read_config_file(arg))
        i += 1
    return given


def read_config_file(arg):
    path = Path(arg)
    if not path.is_file():
        raise UserError(f"config file not found: {arg}")
    namespace = {}
    try:
        exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)
    except Exception as e:  # a config file is Python: its errors are the user's to fix
        raise UserError(f"config file {arg}{config_error_line(e, path)}: {type(e).__name__}: "
                        f"{e.msg if isinstance(e, SyntaxError) else e}") from None
    values = {}
    for key, value in namespace.items():
        if key.startswith("_") or type(value).__name__ in ("module", "function", "type"):
            continue
        check_key(key, arg)
        values[key] = check_type(key, value, DEFAULTS[key])  # Python values: no parsing
    return values


def load_config(argv):
    """The run's settings: DEFAULTS overridden by what argv gives, or, with init_from=resume, the
    stored run's settings with the changes a resume allows."""
    given = given_settings(argv)
    if given.get("lr_find") and given.get("init_from") == "resume":
        raise UserError("--lr_find starts from a run's initial weights and continues no run: drop "
                        "--init_from=resume (--init_from=OUT/ckpt.pt tests learning rates to fine-tune its weights)")
    cfg = resumed_settings(given) if given.get("init_from") == "resume" else DEFAULTS | given
    check_ranges(cfg)
    return cfg


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
                    min_lr=0.0, time_budget_s=0.0, seed=0, eval_sample_tokens=0, lr_find_iters=2, muon_lr=0.0,
                    muon_momentum_warmup_iters=0, muon_weight_decay=0.0)
    for key, low in at_least.items():
        if not cfg[key] >= low:  # `not >=` also catches nan
            raise UserError(f"{key} must be >= {low}, got {cfg[key]}")
    for key in ("dropout", "beta1", "beta2", "muon_momentum"):
        if not 0 <= cfg[key] < 1:
            raise UserError(f"{key} must be in [0, 1), got {cfg[key]}")
    if cfg["lr_schedule"] not in ("cosine", "wsd"):
        raise UserError(f"unknown lr_schedule '{cfg['lr_schedule']}' (use cosine or wsd)")
    if not 0 < cfg["cooldown_frac"] < 1:
        raise UserError(f"cooldown_frac must be in (0, 1), got {cfg['cooldown_frac']}")
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
    if not 0 < cfg["lr_find_min"] < cfg["lr_find_max"]:
        raise UserError(f"the LR range test needs 0 < lr_find_min < lr_find_max, got lr_find_min="
                        f"{cfg['lr_find_min']} and lr_find_max={cfg['lr_find_max']}")
    if cfg["backend"] not in ("auto", "nccl", "gloo"):
        raise UserError(f"unknown backend '{cfg['backend']}' (use auto, nccl or gloo)")
    if cfg["optimizer"] not in ("adamw", "muon"):
        raise UserError(f"unknown optimizer '{cfg['optimizer']}' (use adamw or muon)")
    if cfg["optimizer"] == "muon" and cfg["fsdp"]:
        raise UserError("optimizer=muon orthogonalizes whole matrices, which fsdp splits over the processes: "
                        "pass --fsdp=False (DDP) or --optimizer=adamw")
    if cfg["optimizer"] == "muon" and cfg["lr_find"]:
        raise UserError("--lr_find tests AdamW's learning_rate alone: pass --optimizer=adamw")
    if cfg["optimizer"] == "muon" and not cfg["learning_rate"] > 0:  # Muon's LR is scaled relative to it
        raise UserError(f"optimizer=muon needs learning_rate > 0, got {cfg['learning_rate']}")


# -----------------------------------------------------------------------------
# Resuming: the stored run's settings, and what may change


def stored_run(out_dir):
    """The settings and the time-budget decision stored in out_dir/ckpt.pt (read without the weights)."""
    path = Path(out_dir) / "ckpt.pt"
    if not path.is_file():
        raise UserError(f"nothing to resume: {path} does not exist (start the run without --init_from=resume)")
    ckpt = load_checkpoint(path, mmap=True)
    if "optimizer" not in ckpt or "config" not in ckpt:
        raise UserError(f"cannot resume from {path}: it holds weights only (a copy of best.pt?); "
                        f"--init_from=PATH starts a new run from a weights file")
    return path, ckpt


def lr_at(cfg, it):
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    return get_lr(it, cfg["learning_rate"], cfg["warmup_iters"], cfg["lr_decay_iters"], cfg["min_lr"],
                  cfg["lr_schedule"], cfg["cooldown_frac"])


def resumed_settings(given):
    """The stored run's settings, with what `given` changes: a change that leaves the run the same
    run (an interval, patience, the device, max_iters while the LR stays where it is) gets one line;
    any other (the model, the data, the batches, the optimizer, a jump of the LR) is an error."""
    out_dir = given.get("out_dir", DEFAULTS["out_dir"])
    path, ckpt = stored_run(out_dir)
    stored = DEFAULTS | ckpt["config"]
    budget = ckpt.get("budget")
    as_set = stored | ({k: budget["settings"][k] for k in ("max_iters", "lr_decay_iters")} if budget else {})
    changed = {k: v for k, v in given.items() if k not in ("init_from", "out_dir") and v != as_set[k]}
    cfg = stored | changed | {"init_from": "resume", "out_dir": out_dir}  # where the run is now (moved or not)
    it = ckpt["iter_num"]
    for key, value in changed.items():
        if key in LR_KEYS:
            continue
        if key not in CHANGEABLE_ON_RESUME:
            raise UserError(f"cannot resume {path} with {key}={value}: the run has {key}={as_set[key]}, and "
                            f"changing it makes another run; start one from these weights with "
                            f"--init_from={path} --out_dir=NEW")
        print0(f"resume: {key} {as_set[key]} -> {value}")
    lr_changes = {k: v for k, v in changed.items() if k in LR_KEYS}
    if lr_changes:
        if not math.isclose(lr_at(cfg, it), lr_at(stored, it), rel_tol=1e-9):
            details = ", ".join(f"{k}={v}" for k, v in lr_changes.items())
            raise UserError(f"cannot resume {path} with {details}: the learning rate at iter {it} would jump "
                            f"from {lr_at(stored, it):.3g} to {lr_at(cfg, it):.3g}")
        for key, value in lr_changes.items():
            print0(f"resume: {key} {stored[key]} -> {value} (the learning rate at iter {it} stays "
                   f"{lr_at(cfg, it):.3g})")
    return cfg


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


def read_meta(data_dir):
    """A dataset's meta.json, or the error that names the prepare.py command to make it."""
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"dataset not found: {meta_path} is missing. Make it with "
                        f"`python prepare.py --input YOUR_TEXT --out {data_dir}` "
                        f"(or plain `python prepare.py` for shakespeare_char)")
    return json.loads(meta_path.read_text(encoding="utf-8"))


def open_bins(data_dir, block_size):
    """meta.json, the bins' dtype, and each split's number of window starts (at least one)."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
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


def cooldown_start(lr_decay_iters, warmup_iters, cooldown_frac):
    """The first step of a WSD schedule's decay: cooldown_frac of lr_decay_iters before its end."""
    return max(warmup_iters, lr_decay_iters - round(cooldown_frac * lr_decay_iters))


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, schedule="cosine", cooldown_frac=0.2):
    """Linear warmup (never 0, even at step 0), then a decay to min_lr at lr_decay_iters (flat after):
    cosine from the end of warmup, or, for "wsd", learning_rate until the cooldown, then linear."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    if schedule == "wsd":
        start = cooldown_start(lr_decay_iters, warmup_iters, cooldown_frac)
        if it < start:
            return learning_rate
        return learning_rate + (it - start) / (lr_decay_iters - start) * (min_lr - learning_rate)
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


# -----------------------------------------------------------------------------
# Setup: everything decided once, before the loop.

@dataclass
class Runtime:
    """Where and how this process computes: decided once, then only read."""
    rank: int
    local_rank: int
    world_size: int
    device: str
    dtype: torch.dtype
    ctx: object  # autocast, or a no-op in fp32
    scaler: torch.amp.GradScaler  # a no-op unless fp16
    fsdp: bool = False  # the model is sharded over the ranks (shard_model), not copied to each (DDP)
    in_process_group: bool = False  # started by torchrun (one process or more): the group to leave at the end

    @property
    def distributed(self):
        """More than one process (DDP or FSDP): losses, signals and timings are agreed by collectives."""
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0

    @property
    def build_device(self):
        """Where the whole model is built (and a checkpoint read): under FSDP the CPU, since
        shard_model moves only this rank's shards to the device."""
        return "cpu" if self.fsdp else self.device

    @property
    def device_type(self):
        return self.device.split(":")[0]


def setup_distributed(cfg):
    """Join the torchrun process group if there is one; returns (rank, local_rank, world_size, device)."""
    if "RANK" not in os.environ:
        if cfg["fsdp"]:
            raise UserError("fsdp=True shards the model over torchrun's processes: run "
                            "`torchrun --nproc_per_node=N train.py ...`, or pass --fsdp=False for one process")
        return 0, 0, 1, cfg["device"]
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    accum = cfg["gradient_accumulation_steps"]
    if accum % world_size:  # each process runs an equal share of the micro-steps
        raise UserError(f"gradient_accumulation_steps={accum} must be a multiple of the number of "
                        f"processes ({world_size}): pass --gradient_accumulation_steps="
                        f"{math.ceil(accum / world_size) * world_size}")
    device = cfg["device"]
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    backend = cfg["backend"]
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl" and not device.startswith("cuda"):  # NCCL only moves CUDA tensors
        raise UserError(f"backend nccl needs CUDA devices, not {device}; use --backend=gloo")
    torch.distributed.init_process_group(backend=backend)
    return rank, local_rank, world_size, device


def setup_runtime(cfg):
    rank, local_rank, world_size, device = setup_distributed(cfg)
    device = resolve_device(device)
    dtype = resolve_dtype(cfg["dtype"], device)
    if cfg["fsdp"] and dtype == torch.float16:  # GradScaler's skipped steps would have to agree across shards
        if cfg["dtype"] != "auto":
            raise UserError("fsdp trains in bfloat16 or float32, not float16: pass --dtype=bfloat16 (or float32)")
        dtype = torch.float32
        print0(f"dtype auto: {device} has no native bfloat16 and fsdp does not train in float16, so float32")
    if dtype == torch.float32 and cfg["tf32"] and use_tf32(device):
        print0(f"float32 matmuls on {device} run on TF32 tensor cores (--tf32=False: exact float32)")
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=(dtype == torch.float16))
    return Runtime(rank, local_rank, world_size, device, dtype, autocast_context(device, dtype), scaler,
                   fsdp=cfg["fsdp"], in_process_group=torch.distributed.is_initialized())


class Batches:
    """Random windows of the memory-mapped bins of one dataset, as (x, y) on the device."""

    def __init__(self, cfg, device):
        self.data_dir = dataset_dir(cfg["dataset"])
        self.meta, self.bin_dtype, self.window_starts = open_bins(self.data_dir, cfg["block_size"])
        self.tokenizer = load_tokenizer(self.data_dir)
        self.B, self.T, self.device = cfg["batch_size"], cfg["block_size"], device

    def draw(self, split, rng, count):
        """`count` window starts drawn from `rng`."""
        return rng.integers(0, self.window_starts[split], size=count)

    def get(self, split, starts):
        return self.to_device(*get_windows(self.data_dir, split, self.bin_dtype, starts, self.T))

    def to_device(self, x, y):
        if self.device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)


class ChatBatches(Batches):
    """Whole conversations of a chat dataset (prepare.py --format chat), one per row from its
    first token, as (x, y) on the device. Targets are -1 where the dataset's mask says context
    (system and user turns, role markers) and on the padding after a conversation, so the loss
    counts the assistant replies only. draw() and get() take conversation indices where
    Batches takes window starts: the batch stream, exact resume and the ranks' shares are the same.

    Padding, not packing: a row is one conversation at positions 0.., as sample.py --chat renders
    it, and padding at the end of a row is invisible to the tokens before it under causal
    attention, so SDPA's is_causal stays exact with no mask. Packing several conversations into a
    row wastes no compute on padding but needs attention that does not cross conversations (a
    block-diagonal mask, which SDPA runs on slower kernels than is_causal) and positions that
    restart. Choose block_size near the longest conversation (prepare.py prints it): a longer one
    keeps its first block_size + 1 tokens."""

    def __init__(self, cfg, device):
        self.data_dir = dataset_dir(cfg["dataset"])
        self.meta = read_meta(self.data_dir)
        self.tokenizer = load_tokenizer(self.data_dir)
        self.B, self.T, self.device = cfg["batch_size"], cfg["block_size"], device
        self.bin_dtype = np.dtype(self.meta["dtype"])
        self.starts = {split: np.fromfile(self.data_dir / f"{split}.starts.bin", dtype=np.int64)
                       for split in ("train", "val")}  # conversation i: tokens[starts[i]:starts[i + 1]]
        self.check_lengths()

    def check_lengths(self):
        """One notice for the conversations longer than a row (they keep their beginning); an
        error if no row of a split would hold a reply token to learn."""
        parts = []
        for split, starts in self.starts.items():
            lengths = np.diff(starts)
            too_long = np.flatnonzero(lengths > self.T + 1)
            if not len(too_long):
                continue
            mask = np.memmap(self.data_dir / f"{split}.mask.bin", dtype=np.uint8, mode="r")
            no_reply = sum(not mask[starts[i] + 1:starts[i] + self.T + 1].any() for i in too_long)
            if no_reply == len(lengths):
                raise UserError(f"no {split} conversation of {self.data_dir} reaches a reply within block_size + 1 = "
                                f"{self.T + 1} tokens; raise block_size (the longest is {lengths.max()} tokens)")
            parts.append(f"{len(too_long)} of {len(lengths)} {split}"
                         + (f" ({no_reply} of them with no reply token left)" if no_reply else ""))
        if parts:
            print0(f"notice: conversations longer than block_size + 1 = {self.T + 1} tokens keep their first "
                   f"{self.T + 1}: {', '.join(parts)}")

    def draw(self, split, rng, count):
        """`count` conversation indices drawn from `rng`."""
        return rng.integers(0, len(self.starts[split]) - 1, size=count)

    def get(self, split, conversations):
        # fresh memmaps per batch, as get_windows (nanoGPT issue #303)
        data = np.memmap(self.data_dir / f"{split}.bin", dtype=self.bin_dtype, mode="r")
        mask = np.memmap(self.data_dir / f"{split}.mask.bin", dtype=np.uint8, mode="r")
        starts = self.starts[split]
        x = np.zeros((len(conversations), self.T), dtype=np.int64)  # padding: any id, never attended to
        y = np.full((len(conversations), self.T), -1, dtype=np.int64)
        for row, i in enumerate(conversations):
            begin, end = starts[i], min(starts[i + 1], starts[i] + self.T + 1)
            tokens = data[begin:end].astype(np.int64)
            n = len(tokens) - 1
            x[row, :n] = tokens[:-1]
            y[row, :n] = np.where(mask[begin + 1:end] == 1, tokens[1:], -1)
        return self.to_device(torch.from_numpy(x), torch.from_numpy(y))


def make_batches(cfg, device):
    """The batches of cfg's dataset: windows of a text dataset, conversations of a chat one."""
    chat = read_meta(dataset_dir(cfg["dataset"])).get("format") == "chat"
    return (ChatBatches if chat else Batches)(cfg, device)


@dataclass
class Progress:
    """What a checkpoint carries besides weights and optimizer: where the run is."""
    iter_num: int = 0
    best_val_loss: float = float("inf")
    evals_since_best: int = 0
    elapsed_s: float = 0.0  # training time before this process (a resumed run's earlier parts)


def check_logging_packages(cfg):
    """tensorboard_log / wandb_log need their package: say so before out_dir is touched."""
    for key, package in (("tensorboard_log", "tensorboard"), ("wandb_log", "wandb")):
        if cfg[key] and importlib.util.find_spec(package) is None:
            raise UserError(f"{key}=True needs {package}: pip install {package}")


def restore(ckpt, raw_model, optimizer, scaler, batch_rng, rt, seed):
    """Continue exactly where a checkpoint left off: optimizer, scaler, batch stream, RNG."""
    load_optimizer_state(raw_model, optimizer, ckpt["optimizer"], rt)
    if ckpt["scaler"]:  # a bf16 or fp32 run stores a disabled scaler's {}: fp16 then starts its scale afresh
        scaler.load_state_dict(ckpt["scaler"])
    batch_rng.bit_generator.state = ckpt["rng"]["batches"]
    if ckpt["rng"]["world_size"] == rt.world_size == 1:
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if rt.device_type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), rt.device)
    else:  # per-rank dropout streams are not saved; re-seed them (CPU and CUDA), distinct per rank and step
        torch.manual_seed(seed + rt.rank + 1000 * ckpt["iter_num"])
    return Progress(ckpt["iter_num"], ckpt["best_val_loss"], ckpt["evals_since_best"], ckpt["elapsed_s"])


@torch.no_grad()
def evaluate(model, batches, cfg, rt):
    """Loss, perplexity and next-token accuracy on eval_iters batches per split, split over ranks.

    Every evaluation scores the same windows (fixed by the `seed` setting), so successive val losses differ
    only by the model, and evaluating never moves the training batch stream. Every rank runs the same
    number of forwards (under FSDP each one gathers weights from all ranks): where eval_iters does not
    divide by the ranks, those short of a batch score the first one again, with weight 0.
    """
    model.eval()
    results = {}
    rounds = math.ceil(cfg["eval_iters"] / rt.world_size)
    for split_id, split in enumerate(("train", "val")):
        rng = np.random.default_rng([cfg["seed"], split_id])
        starts = batches.draw(split, rng, cfg["eval_iters"] * batches.B).reshape(cfg["eval_iters"], batches.B)
        mine = starts[rt.rank::rt.world_size]
        sums = torch.zeros(3, device=rt.device, dtype=torch.float64)  # loss sum, correct, count
        for i in range(rounds):
            counted = i < len(mine)
            x, y = batches.get(split, mine[i] if counted else starts[0])
            with rt.ctx:
                logits, loss = model(x, y)
            valid = (y != -1) & counted  # all of a text batch; a chat batch's reply tokens only
            n = valid.sum().double()
            sums += torch.stack([loss.double() * n, ((logits.argmax(-1) == y) & valid).sum().double(), n])
        if rt.distributed:
            torch.distributed.all_reduce(sums)
        loss_sum, correct, count = sums.tolist()
        results[split] = (loss_sum / count, correct / count)
    model.train()
    (train_loss, _), (val_loss, val_acc) = results["train"], results["val"]
    return dict(train_loss=train_loss, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 700)), val_acc=val_acc)


def eval_sample_prompt(cfg, tokenizer, block_size):
    """The tokens the evaluation samples continue: eval_sample_prompt's (its last block_size), or
    end-of-text (a newline for a char model)."""
    if not cfg["eval_sample_tokens"]:
        return None
    try:
        ids = tokenizer.encode(cfg["eval_sample_prompt"]) or tokenizer.start_ids()
    except UserError as e:  # a character outside a char vocabulary
        raise UserError(f"eval_sample_prompt: {e}") from None
    if not ids:
        raise UserError("eval_sample_prompt is empty, so samples would start from a newline, and this dataset's "
                        "characters include none: set eval_sample_prompt to some text")
    return ids[-block_size:]


def eval_sample(model, tokenizer, prompt, cfg, it, rt):
    """The prompt's text and eval_sample_tokens tokens sampled after it (temperature 1, until
    end-of-text). The draws come from a generator of their own, seeded by cfg["seed"] and the
    iteration, and dropout is off: the training's random numbers are untouched, so a run with
    samples trains exactly as one without. Every rank samples, all eval_sample_tokens of them (the
    text is cut at end-of-text after): under FSDP each forward gathers weights from all ranks."""
    seed = int(np.random.SeedSequence([cfg["seed"], it]).generate_state(1)[0])
    generator = torch.Generator(device=rt.device).manual_seed(seed)
    idx = torch.tensor([prompt], dtype=torch.long, device=rt.device)
    with rt.ctx:
        new = generate(model, idx, cfg["eval_sample_tokens"], generator=generator)[0]
    if tokenizer.eot_id in new:
        new = new[:new.index(tokenizer.eot_id)]
    return cfg["eval_sample_prompt"] + tokenizer.decode(new)


class StopSignals:
    """SIGTERM (a scheduler's pre-emption) and Ctrl-C end the run at a step boundary with ckpt.pt
    saved and exit status 128 + the signal's number (143, 130). A second Ctrl-C stops at once (the
    last checkpoint on disk stays intact); a second SIGTERM changes nothing, as a scheduler may
    signal torchrun's workers as well as torchrun, which forwards its own. torchrun sends SIGKILL
    30 s after forwarding (--shutdown_timeout), so log_interval steps and one checkpoint
    write must fit in that."""

    def __init__(self):
        self.received = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.on_signal)

    def on_signal(self, signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            raise KeyboardInterrupt
        self.received.append(signum)

    def agreed(self, rt):
        """The signal to stop on, 0 for none. Every rank must stop at the same step: under torchrun the
        ranks take the largest signal any of them received, which waits for all of them."""
        signum = self.received[0] if self.received else 0
        if rt.distributed:
            signum = torch.tensor(signum, device=rt.device)
            torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
            signum = int(signum.item())
        return signum


def build_model(cfg, vocab_size, tokenizer, device):
    """A fresh GPT, or the weights of a checkpoint / Hugging Face dir; returns (model, ckpt or None).
    The model's shape is the checkpoint's: the caller takes it from ckpt["model_args"]."""
    init = cfg["init_from"]
    if init == "scratch":
        args = {k: cfg[k] for k in MODEL_KEYS} | {"vocab_size": vocab_size, "dropout": cfg["dropout"]}
        return GPT(GPTConfig(**args)).to(device), None
    path = Path(cfg["out_dir"]) / "ckpt.pt" if init == "resume" else Path(init)
    if path.is_dir() and (path / "ckpt.pt").is_file():  # it has a config.json too, but not GPT-2's
        raise UserError(f"{path} is the out_dir of a training run: --init_from={path / 'ckpt.pt'} starts "
                        f"from its weights; --out_dir={path} --init_from=resume continues it")
    if path.is_dir() and (path / "config.json").is_file() or is_hub_model_id(init):  # a folder, or gpt2, OWNER/NAME
        try:
            model = GPT.from_pretrained(path, dropout=cfg["dropout"])
        except (ValueError, OSError) as e:
            raise UserError(f"cannot load {path}: {e}") from None
        ckpt = {"model_args": asdict(model.config), "tokenizer": None}  # GPT-2's own BPE
    else:
        ckpt = load_checkpoint(path)  # mapped into CPU memory: of its tensors only the weights go to `device`
        model = model_from_checkpoint(ckpt, device, cfg["dropout"])
    check_compatible(cfg, ckpt, vocab_size, tokenizer, path, resume=(init == "resume"))
    if model.config.vocab_size < vocab_size:  # a base model meets the chat markers (check_compatible allowed it)
        print0(f"vocabulary: {model.config.vocab_size:,} -> {vocab_size:,} tokens; the new rows "
               f"({', '.join(tokenizer.specials)}) start as the mean embedding")
        model.grow_vocab(vocab_size)
    return model.to(device), ckpt


def check_compatible(cfg, ckpt, vocab_size, tokenizer, path, resume):
    """A model can only continue on data of its own vocabulary and, when resuming, its own shape.
    One exception: a base model's vocabulary plus the chat markers (a chat dataset prepared with
    its tokenizer), for which build_model grows the embedding unless the model has rows to spare."""
    args = ckpt["model_args"]
    # A Hugging Face folder carries no tokenizer of ours: it is GPT-2's, which prepare.py names gpt2.
    fix = f"prepare the data with `python prepare.py --tokenizer {path if ckpt['tokenizer'] else 'gpt2'} ...`"
    theirs = ckpt["tokenizer"] or {"kind": "gpt2"}
    adds_markers = tokenizer.is_chat and not theirs.get("specials")
    ours = tokenizer.without_specials() if adds_markers else tokenizer  # what the model must know already
    same = theirs == ours.to_dict() if ckpt["tokenizer"] else ours.kind == "gpt2" and not ours.specials
    if not same:
        if theirs.get("specials") and not tokenizer.specials:
            what = f"the chat markers, which dataset {cfg['dataset']} lacks"
        elif theirs["kind"] == tokenizer.kind == "char":
            what = f"a different character set than dataset {cfg['dataset']}"
        else:
            what = f"a different tokenizer ({theirs['kind']}) than dataset {cfg['dataset']} ({tokenizer.kind})"
        raise UserError(f"{path} was trained with {what}; {fix}")
    room = args["vocab_size"] >= ours.vocab_size if adds_markers else args["vocab_size"] == vocab_size
    if not room:
        raise UserError(f"{path} has vocab_size={args['vocab_size']} but dataset "
                        f"{cfg['dataset']} has vocab_size={vocab_size}; {fix}")
    if resume and "optimizer" not in ckpt:
        raise UserError(f"cannot resume from {path}: it holds weights only (a copy of best.pt?); "
                        f"--init_from=PATH starts a new run from a weights file")
    if resume and ckpt["iter_num"] >= cfg["max_iters"]:
        raise UserError(f"nothing to resume: {path} is at iter {ckpt['iter_num']} and max_iters="
                        f"{cfg['max_iters']}; raise --max_iters to train further")
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


# -----------------------------------------------------------------------------
# The time budget: the run's length from the measured speed of its first steps

BUDGET_SKIP_ITERS = 2  # steps not timed: the first ones allocate and pick kernels
BUDGET_MIN_TIMED_ITERS = 20
BUDGET_SHARE = 0.95  # of the time left that the decision plans for: step times drift over a run
BUDGET_GUARD_MARGIN = 1.25  # the next log interval and the final evaluation may run this much slower


def budget_decision_iter(cfg, start):
    """The step after which the budget decides: the end of warmup, so the decision never changes
    a learning rate already used, and at least BUDGET_MIN_TIMED_ITERS timed steps after `start`."""
    return max(start + BUDGET_SKIP_ITERS + BUDGET_MIN_TIMED_ITERS, cfg["warmup_iters"])


def iters_within_budget(seconds_left, it, step_s, eval_s, eval_interval):
    """The largest max_iters >= it such that the steps from `it` and the evaluations they pass
    (every eval_interval, and the last one) take at most `seconds_left`."""
    def cost(n):
        evals = n // eval_interval - it // eval_interval + (n % eval_interval != 0)
        return (n - it) * step_s + evals * eval_s
    n = it + max(0, int(seconds_left / (step_s + eval_s / eval_interval)))
    while n > it and cost(n) > seconds_left:
        n -= 1
    return n


def shortest_wsd_run(cfg, it):
    """The fewest lr_decay_iters whose WSD cooldown starts at `it` or later (cooldown_start only
    grows with lr_decay_iters): a shorter run would have decayed an LR already used."""
    n = max(it, int((it - 1) / (1 - cfg["cooldown_frac"])) - 1)  # below the first candidate
    while cooldown_start(n, cfg["warmup_iters"], cfg["cooldown_frac"]) < it:
        n += 1
    return n


def decide_budget(cfg, it, step_s, eval_s, used_s, rt, settings=None):
    """max_iters and lr_decay_iters that end the run within time_budget_s, `used_s` seconds of it
    gone, agreed by all ranks (each takes the slowest rank's timings and clock). settings: the
    max_iters and lr_decay_iters the run was given (kept in the decision, for a resume)."""
    if rt.distributed:
        timings = torch.tensor([step_s, eval_s, used_s], device=rt.device, dtype=torch.float64)
        torch.distributed.all_reduce(timings, op=torch.distributed.ReduceOp.MAX)
        step_s, eval_s, used_s = timings.tolist()
    seconds_left = cfg["time_budget_s"] - used_s
    n = iters_within_budget(seconds_left * BUDGET_SHARE, it, step_s, eval_s, cfg["eval_interval"])
    if cfg["lr_schedule"] == "wsd":
        n = max(n, shortest_wsd_run(cfg, it))
    return dict(max_iters=n, lr_decay_iters=n, ms_per_iter=step_s * 1000, eval_s=eval_s, left_s=seconds_left,
                settings=settings or {k: cfg[k] for k in ("max_iters", "lr_decay_iters")})


def budget_line(cfg, budget):
    """The decision as one printed line: what was measured, and the length it gives."""
    n = budget["max_iters"]
    cooldown = (f", decaying from iter {cooldown_start(n, cfg['warmup_iters'], cfg['cooldown_frac'])}"
                if cfg["lr_schedule"] == "wsd" else "")
    return (f"time budget {cfg['time_budget_s']:g} s: {budget['ms_per_iter']:.1f} ms/iter and "
            f"{budget['eval_s']:.2f} s per evaluation measured, {budget['left_s']:.0f} s left -> "
            f"max_iters = lr_decay_iters = {n}{cooldown}")


def latest_step_s(recent_steps, budget):
    """Seconds per step over the last log intervals (deque of (steps, seconds)); the decided speed
    until this process has logged."""
    steps = sum(n for n, _ in recent_steps)
    return sum(s for _, s in recent_steps) / steps if steps else budget["ms_per_iter"] / 1000


def budget_redecides(cfg, budget, it):
    """True where a WSD run under a time budget decides its length again: while its LR is still
    flat, a new length moves only the cooldown, which no step has used yet, so the run can follow
    the speed it measures (a shared machine's drifts) instead of a guess made at its start. A
    resume given its own max_iters fixes the length."""
    return (budget is not None and cfg["lr_schedule"] == "wsd" and cfg["decay_lr"]
            and cfg["max_iters"] == budget["max_iters"]
            and it < cooldown_start(cfg["lr_decay_iters"], cfg["warmup_iters"], cfg["cooldown_frac"]))


def budget_spent(cfg, budget, it, step_s, used_s, rt):
    """True when the time left in time_budget_s (`used_s` gone) cannot hold the steps to the next
    log step (or to max_iters, if nearer) and the final evaluation at the latest speed `step_s`,
    with BUDGET_GUARD_MARGIN to spare: a run whose steps slowed after the decision (a shared
    machine) ends here, evaluated and saved, rather than overrun its budget. All ranks agree."""
    steps = min(cfg["log_interval"], cfg["max_iters"] - it)
    reserve = BUDGET_GUARD_MARGIN * (steps * step_s + budget["eval_s"])
    spent = used_s + reserve > cfg["time_budget_s"]
    if rt.distributed:
        flag = torch.tensor(int(spent), device=rt.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        spent = bool(flag.item())
    return spent


# -----------------------------------------------------------------------------
# Training

def step_model(raw_model, cfg, rt, batches):
    """The model the training steps call: in DDP under torchrun, then compiled if cfg says so; with
    fsdp, raw_model itself, sharded in place (so the optimizer is made after this, on the shards)."""
    raw_model.grad_checkpoint = cfg["grad_checkpoint"]
    if rt.fsdp:
        return shard_model(raw_model, cfg, rt)
    model = raw_model
    if rt.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    if cfg["compile"]:
        # DDP first: compiling DDP's module splits its graph at DDP's gradient buckets (dynamo's
        # DDPOptimizer), so each bucket's all-reduce overlaps the backward of the layers before it.
        # A model compiled before DDP wraps it has one backward graph, and every all-reduce after it.
        model = maybe_compile(model, rt.device, rt.ctx, batches.B, batches.T)
    return model


def shard_model(model, cfg, rt):
    """FSDP2, in place. Each Block is a unit: its weights are gathered from all ranks just before its
    forward and again for its backward, and freed after each. The root unit holds the rest: wte with
    lm_head (one tied matrix, so one unit owns both), wpe and ln_f. Where the run computes in bf16,
    the gathered weights are bf16 copies of fp32 shards and gradients are reduced in fp32; autocast
    stays on, so the loss is still computed in fp32. With compile, each Block is compiled before it
    is sharded (FSDP's gathers stay outside the compiled code), lazily: an error compiling stops
    the run at its first step, where maybe_compile would fall back to eager."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(rt.device_type, (rt.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        if cfg["compile"]:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_model_state(model, rt):
    """The model's state_dict as one process holds it, on rank 0 (None elsewhere). Under FSDP every
    rank must call it: the shards are gathered a tensor at a time into rank 0's CPU memory."""
    if not rt.fsdp:
        return model.state_dict() if rt.master else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not rt.master:
        return None
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied: one tensor in the file, as one process saves
    return state


def full_optimizer_state(model, optimizer, rt):
    """optimizer.state_dict() as one process holds it, on rank 0 (None elsewhere); under FSDP every
    rank must call it. get_optimizer_state_dict names each parameter's state by the parameter's
    name; it is keyed here by the parameter's index, as optimizer.state_dict() keys it, so that a
    checkpoint resumes with FSDP or without, on any number of processes."""
    # Before the first step the state is empty, and get_optimizer_state_dict would fill it by a
    # step with lr 0, which AdamW counts (its bias correction would be off by a step).
    if not rt.fsdp or not optimizer.state:
        return optimizer.state_dict() if rt.master else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not rt.master:
        return None
    index = {name: i for i, name in enumerate(name for group in state["param_groups"] for name in group["params"])}
    return dict(state={index[name]: s for name, s in state["state"].items()},
                param_groups=[group | {"params": [index[name] for name in group["params"]]}
                              for group in state["param_groups"]])


def load_optimizer_state(model, optimizer, state, rt):
    """optimizer.load_state_dict(state) for a state of full_optimizer_state's form; under FSDP each
    rank keeps its shards of it (every rank has read the checkpoint)."""
    if not rt.fsdp or not state["state"]:  # nothing to shard (and no lr-0 step: full_optimizer_state says why)
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {param: name for name, param in model.named_parameters()}
    name = [names[param] for group in optimizer.param_groups for param in group["params"]]  # by index
    by_name = dict(state={name[i]: s for i, s in state["state"].items()},
                   param_groups=[group | {"params": [name[i] for i in group["params"]]}
                                 for group in state["param_groups"]])
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def train_step(model, optimizer, batches, batch_rng, cfg, rt):
    """One optimizer step on the next global batch that batch_rng draws, this rank running its share
    of the micro-steps. Returns the step's loss on this rank (on the device: no host sync)."""
    accum = cfg["gradient_accumulation_steps"] // rt.world_size  # micro-steps of this process
    starts = batches.draw("train", batch_rng, batches.B * cfg["gradient_accumulation_steps"])
    my_starts = starts.reshape(-1, batches.B)[rt.rank * accum:(rt.rank + 1) * accum]
    step_loss = torch.zeros((), device=rt.device)
    for micro_step, micro_starts in enumerate(my_starts):
        x, y = batches.get("train", micro_starts)
        if rt.distributed and not rt.fsdp:
            # DDP: all-reduce gradients only on the last micro-step; must be set before its forward.
            # (FSDP reduce-scatters every micro-step's: its gradients stay sharded.)
            model.require_backward_grad_sync = micro_step == accum - 1
        with rt.ctx:
            _, loss = model(x, y)
            loss = loss / accum  # the step's gradient is the mean over its micro-batches
        step_loss += loss.detach()
        rt.scaler.scale(loss).backward()
    if cfg["grad_clip"]:
        rt.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    rt.scaler.step(optimizer)
    rt.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def train(cfg):
    started = time.time()  # time_budget_s counts from here (the imports before it take ~2 s)
    check_logging_packages(cfg)
    out_dir = Path(cfg["out_dir"])
    if cfg["init_from"] != "resume" and (out_dir / "ckpt.pt").is_file():  # a new run would overwrite it
        raise UserError(f"{cfg['out_dir']} already holds a run ({out_dir / 'ckpt.pt'}); continue it with "
                        f"--init_from=resume, or pass another --out_dir")
    rt = setup_runtime(cfg)
    peak_flops = measure_peak_flops(rt.device, rt.dtype) if rt.master else 1.0  # before seeding: uses randn
    batches = make_batches(cfg, rt.device)
    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    raw_model, ckpt = build_model(cfg, batches.meta["vocab_size"], batches.tokenizer, rt.build_device)
    cfg = cfg | {k: asdict(raw_model.config)[k] for k in MODEL_KEYS if k != "block_size"}  # as loaded
    model = step_model(raw_model, cfg, rt, batches)
    muon = None
    if cfg["optimizer"] == "muon":  # its Newton-Schulz runs in bf16 only where the run computes in bf16
        muon = {k.removeprefix("muon_"): v for k, v in cfg.items() if k.startswith("muon_")}
        muon["ns_dtype"] = torch.bfloat16 if rt.dtype == torch.bfloat16 else torch.float32
    optimizer = raw_model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"],
                                               (cfg["beta1"], cfg["beta2"]), rt.device_type, muon)
    batch_rng = np.random.default_rng(cfg["seed"])  # the same stream on every rank
    torch.manual_seed(cfg["seed"] + rt.rank)  # dropout masks differ between ranks
    progress, budget, resume_iter = Progress(), None, None
    if cfg["init_from"] == "resume":
        progress = restore(ckpt, raw_model, optimizer, rt.scaler, batch_rng, rt, cfg["seed"])
        budget = ckpt.get("budget")
        resume_iter = progress.iter_num  # its evaluation, if one was due, is done
        print0(f"resuming from {out_dir / 'ckpt.pt'} at iter {progress.iter_num} "
               f"(best val loss {progress.best_val_loss:.4f})")
    del ckpt  # free its copy of the weights and optimizer state
    sample_prompt = eval_sample_prompt(cfg, batches.tokenizer, raw_model.config.block_size)
    log = start_outputs(cfg, rt, raw_model, resume_iter) if rt.master else None
    signals = StopSignals()
    accum = cfg["gradient_accumulation_steps"] // rt.world_size  # micro-steps of this process
    tokens_per_iter = batches.B * batches.T * cfg["gradient_accumulation_steps"]
    flops_per_iter = raw_model.flops_per_token() * tokens_per_iter / rt.world_size
    t_start = time.time()

    def checkpoint(name, full):
        """The weights, their shape and tokenizer; with `full`, everything needed to resume. Every
        rank calls it (FSDP gathers the shards); rank 0 writes it, in one process's format."""
        weights = full_model_state(raw_model, rt)
        optimizer_state = full_optimizer_state(raw_model, optimizer, rt) if full else None
        if not rt.master:
            return
        state = dict(model=weights, model_args=asdict(raw_model.config),
                     tokenizer=batches.tokenizer.to_dict(), config=cfg, iter_num=progress.iter_num,
                     best_val_loss=progress.best_val_loss)
        if full:
            rng = dict(batches=batch_rng.bit_generator.state, torch=torch.get_rng_state(), world_size=rt.world_size)
            if rt.device_type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(rt.device)
            state |= dict(optimizer=optimizer_state, scaler=rt.scaler.state_dict(), rng=rng, budget=budget,
                          evals_since_best=progress.evals_since_best,
                          elapsed_s=progress.elapsed_s + time.time() - t_start)
        save_checkpoint(state, out_dir / name)

    timing_budget = cfg["time_budget_s"] > 0 and budget is None
    budget_start = resume_iter or 0
    budget_at = budget_decision_iter(cfg, budget_start)
    t_last, iters_since_log, eval_s, t_budget = time.time(), 0, None, None
    recent_steps = collections.deque(maxlen=5)  # (steps, seconds) of the last log intervals
    budget_used_s = lambda: progress.elapsed_s + time.time() - started  # earlier processes' time included
    loss_sum = torch.zeros((), device=rt.device)  # summed on device: no host sync between logs
    stop = 0
    while True:
        it = progress.iter_num
        lr = lr_at(cfg, it)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group: its own peak, on the same schedule

        # A signal stops the run here: checked every step, or under torchrun at log steps only, where
        # the loop waits for the device anyway (an all-reduce every step would add a host sync).
        if not rt.distributed or it % cfg["log_interval"] == 0:
            stop = signals.agreed(rt)

        # Evaluate, keep the best weights, write the resume checkpoint.
        last_iter = it == cfg["max_iters"]
        if (budget is not None and not last_iter and it % cfg["log_interval"] == 0
                and budget_spent(cfg, budget, it, latest_step_s(recent_steps, budget), budget_used_s(), rt)):
            print0(f"time budget: the steps ran slower than measured; the run ends at iter {it} of "
                   f"{cfg['max_iters']} to finish within {cfg['time_budget_s']:g} s")
            last_iter = True
        done = last_iter or stop > 0  # the end of the run writes ckpt.pt below the loop
        if (it % cfg["eval_interval"] == 0 or last_iter) and it != resume_iter:
            t_eval = time.time()
            metrics = evaluate(model, batches, cfg, rt)
            if cfg["eval_sample_tokens"]:
                metrics["sample"] = eval_sample(raw_model, batches.tokenizer, sample_prompt, cfg, it, rt)
            metrics["peak_mem_mb"] = peak_memory_mb(rt.device)
            if not math.isfinite(metrics["val_loss"]):
                raise UserError(f"val loss is {metrics['val_loss']} at iter {it}; stopping (the last good "
                                f"checkpoint in {out_dir} is kept). Try a lower learning_rate.")
            improved = metrics["val_loss"] < progress.best_val_loss
            if improved:
                progress.best_val_loss, progress.evals_since_best = metrics["val_loss"], 0
            else:
                progress.evals_since_best += 1
            print0(f"iter {it}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}, "
                   f"val ppl {metrics['val_ppl']:.2f}, val acc {metrics['val_acc']:.3f}, "
                   f"peak mem {metrics['peak_mem_mb']:,.0f} MB" + (" (best)" if improved else ""))
            if "sample" in metrics:
                print0(f"sample at iter {it}: {metrics['sample']!r}")
            if cfg["patience"] and progress.evals_since_best >= cfg["patience"]:
                print0(f"early stop: no val improvement in {cfg['patience']} evaluations")
                done = True
            if rt.master:
                log.write(iter=it, elapsed_s=progress.elapsed_s + time.time() - t_start, lr=lr, **metrics)
            if improved:
                checkpoint("best.pt", full=False)
            if (improved or cfg["always_save_checkpoint"]) and not done:
                checkpoint("ckpt.pt", full=True)
            eval_s = time.time() - t_eval
            t_last += eval_s  # evaluation time is not training throughput
            if t_budget is not None:
                t_budget += eval_s
        if done:
            break

        loss_sum += train_step(model, optimizer, batches, batch_rng, cfg, rt)
        progress.iter_num += 1
        iters_since_log += 1

        if timing_budget and progress.iter_num in (budget_start + BUDGET_SKIP_ITERS, budget_at):
            sync(rt.device)  # time the work, not its launch (only at these two steps)
            if t_budget is None:
                t_budget = time.time()
            else:
                step_s = (time.time() - t_budget) / (budget_at - budget_start - BUDGET_SKIP_ITERS)
                eval_estimate = eval_s if eval_s is not None else step_s * cfg["eval_iters"] * 2 / 3 / accum
                budget = decide_budget(cfg, progress.iter_num, step_s, eval_estimate, budget_used_s(), rt)
                cfg = cfg | {k: budget[k] for k in ("max_iters", "lr_decay_iters")}
                print0(budget_line(cfg, budget) + (" (decided again while the LR is flat)"
                                                   if budget_redecides(cfg, budget, progress.iter_num) else ""))
                timing_budget = False

        if progress.iter_num % cfg["log_interval"] == 0:
            if rt.distributed:
                torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
            loss = loss_sum.item() / iters_since_log  # .item() waits for the device: only here
            if not math.isfinite(loss):
                raise UserError(f"loss is {loss} at iter {progress.iter_num}; stopping (the last good "
                                f"checkpoint in {out_dir} is kept). Try a lower learning_rate.")
            dt = (time.time() - t_last) / iters_since_log
            mfu = min(flops_per_iter / dt / peak_flops, 1.0)  # a step can beat the probe: never > 100%
            mem = peak_memory_mb(rt.device)
            print0(f"iter {progress.iter_num}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                   f"{tokens_per_iter / dt:,.0f} tok/s, mfu {mfu * 100:.1f}%, peak mem {mem:,.0f} MB")
            if rt.master:
                log.write(iter=progress.iter_num, elapsed_s=progress.elapsed_s + time.time() - t_start, lr=lr,
                          loss=loss, ms_per_iter=dt * 1000, tokens_per_s=tokens_per_iter / dt, mfu=mfu,
                          peak_mem_mb=mem)
            recent_steps.append((iters_since_log, dt * iters_since_log))
            if budget_redecides(cfg, budget, progress.iter_num):
                step_s = latest_step_s(recent_steps, budget)
                budget = decide_budget(cfg, progress.iter_num, step_s, eval_s or budget["eval_s"], budget_used_s(), rt,
                                       budget["settings"])
                cfg = cfg | {k: budget[k] for k in ("max_iters", "lr_decay_iters")}
                if not budget_redecides(cfg, budget, progress.iter_num + cfg["log_interval"]):
                    print0(budget_line(cfg, budget))  # the last decision: the cooldown starts before the next
            loss_sum.zero_()
            t_last, iters_since_log = time.time(), 0

    # The end of the run (max_iters, an early stop or a signal) always saves where it got to.
    checkpoint("ckpt.pt", full=True)
    if rt.master:
        log.close()
    if stop:
        print0(f"stopped by {signal.Signals(stop).name} at iter {progress.iter_num}; {out_dir / 'ckpt.pt'} "
               f"resumes it (--init_from=resume)")
    if rt.in_process_group:  # one process under torchrun too: NCCL warns at exit about a group left open
        # Wait for rank 0's last checkpoint: a rank that tears down gloo while another still
        # works can abort ("terminate called without an active exception").
        torch.distributed.barrier()
        del model  # DDP's reducer holds the process group: release it before the group goes
        torch.distributed.destroy_process_group()
    return stop


# -----------------------------------------------------------------------------
# The learning-rate range test

LR_FIND_SMOOTHING = 0.95  # the loss's moving average keeps 95% of itself per step (~20 steps of memory)
LR_FIND_DIVERGED = 4.0  # the test stops once the smoothed loss exceeds this multiple of its minimum


def lr_find(cfg):
    """The learning-rate range test (L. Smith, "Cyclical Learning Rates for Training Neural
    Networks", 2017, section 3.3): train from the initial weights while the LR rises exponentially
    from lr_find_min to lr_find_max, one step each, and follow the smoothed loss. The suggestion is
    the LR where it falls fastest; the minimum-loss LR / 10 is printed for reference. Writes only
    out_dir/lr_find.png: a run in out_dir stays as it is. Returns the curve and the suggestions."""
    rt = setup_runtime(cfg)
    batches = make_batches(cfg, rt.device)
    torch.manual_seed(cfg["seed"])  # the initial weights train() starts from
    raw_model, _ = build_model(cfg, batches.meta["vocab_size"], batches.tokenizer, rt.build_device)
    model = step_model(raw_model, cfg, rt, batches)
    optimizer = raw_model.configure_optimizers(cfg["weight_decay"], cfg["lr_find_min"],
                                               (cfg["beta1"], cfg["beta2"]), rt.device_type)
    batch_rng = np.random.default_rng(cfg["seed"])  # the same stream on every rank
    torch.manual_seed(cfg["seed"] + rt.rank)
    n, lo, hi = cfg["lr_find_iters"], cfg["lr_find_min"], cfg["lr_find_max"]
    print0(f"LR range test: {n} steps, the learning rate rising from {lo:g} to {hi:g}; "
           f"{raw_model.num_params() / 1e6:.2f}M parameters, {rt.world_size} process(es) on {rt.device}")
    lrs, losses, average, ended = [], [], 0.0, "at lr_find_max"
    for i in range(n):
        lr = lo * (hi / lo) ** (i / (n - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = train_step(model, optimizer, batches, batch_rng, cfg, rt)
        if rt.distributed:
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)  # every rank decides alike
        average = LR_FIND_SMOOTHING * average + (1 - LR_FIND_SMOOTHING) * loss.item()
        smoothed = average / (1 - LR_FIND_SMOOTHING ** (i + 1))  # bias correction: the average began at 0
        if not math.isfinite(smoothed):
            ended = f"at step {i}, lr {lr:.2e}: the loss is {loss.item()}"
            break
        lrs.append(lr)
        losses.append(smoothed)
        if i % max(1, n // 10) == 0:
            print0(f"step {i}: lr {lr:.2e}, smoothed loss {smoothed:.4f}")
        if smoothed > LR_FIND_DIVERGED * min(losses):
            ended = f"at step {i}, lr {lr:.2e}: the smoothed loss passed {LR_FIND_DIVERGED:g}x its minimum"
            break
    if not losses:
        raise UserError(f"the LR range test's first loss is not finite ({ended}); lower lr_find_min")
    steepest, lowest = lr_suggestions(lrs, losses)
    print0(f"stopped {ended}; minimum smoothed loss {min(losses):.4f} at lr {lowest:.2e}")
    print0(f"suggested learning_rate: {steepest:.2e} (where the smoothed loss falls fastest); "
           f"for reference, the minimum-loss lr / 10: {lowest / 10:.2e}")
    if rt.master:
        plot_lr_find(cfg, lrs, losses, steepest, lowest)
    if rt.in_process_group:
        torch.distributed.barrier()
        del model  # DDP's reducer holds the process group: release it before the group goes
        torch.distributed.destroy_process_group()
    return dict(lrs=lrs, losses=losses, steepest=steepest, lowest=lowest)


def lr_suggestions(lrs, losses):
    """(the LR where the smoothed loss falls fastest per unit of log LR, before its minimum; the
    LR of its minimum)."""
    lowest = int(np.argmin(losses))
    if lowest < 2:  # no descent to measure: the loss only rose
        return lrs[lowest], lrs[lowest]
    slopes = np.gradient(np.array(losses[:lowest + 1]), np.log(lrs[:lowest + 1]))
    return lrs[int(np.argmin(slopes))], lrs[lowest]


def plot_lr_find(cfg, lrs, losses, steepest, lowest):
    """The smoothed loss against the LR (log scale), the suggestions marked, into out_dir/lr_find.png."""
    path = Path(cfg["out_dir"]) / "lr_find.png"
    try:
        plt = pyplot()
    except UserError as e:
        print0(f"{path} not drawn: {e}")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.semilogx(lrs, losses, label="smoothed training loss")
    for lr, style, what in ((steepest, "r--", "steepest descent (suggested)"), (lowest / 10, "g:", "minimum / 10")):
        ax.axvline(lr, color=style[0], linestyle=style[1:], label=f"{what}: {lr:.2e}")
    ax.set_ylim(min(losses) - 0.05 * (losses[0] - min(losses)), losses[0] * 1.15)  # the divergence: cut off
    ax.set(xlabel="learning rate", ylabel="loss", title=f"LR range test: {cfg['dataset']}")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    try:
        Path(cfg["out_dir"]).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to out_dir {cfg['out_dir']}: {e.strerror or e}") from None
    save_figure(fig, path)
    print0(f"wrote {path}")


def start_outputs(cfg, rt, raw_model, resume_iter):
    """out_dir with config.json, the settings printed, and the metrics log (rank 0 only)."""
    out_dir = Path(cfg["out_dir"])
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    dtype_name = str(rt.dtype).removeprefix("torch.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.json", json.dumps(
            cfg | {"resolved": dict(device=rt.device, dtype=dtype_name, world_size=rt.world_size)}, indent=2) + "\n")
    except OSError as e:  # a file of that name, a read-only disk, ...
        raise UserError(f"cannot write to out_dir {out_dir}: {e.strerror or e}") from None
    print0("config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    print0(f"model: {raw_model.num_params() / 1e6:.2f}M parameters; {tokens_per_iter:,} tokens per iteration "
           f"({cfg['batch_size']} batch x {cfg['block_size']} block x {cfg['gradient_accumulation_steps']} accum); "
           f"{rt.world_size} process(es) on {rt.device}, {dtype_name}")
    return MetricsLog(out_dir / "metrics.jsonl", cfg, resume_iter)


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
        atomic_write_text(path, "".join(kept))
        self.file = open(path, "a", encoding="utf-8")
        self.tensorboard = self.wandb = None
        self.samples = []  # W&B: (iter, text) of every sample logged
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
                if isinstance(v, str):  # a sample of the model's text
                    self.tensorboard.add_text(k, v, record["iter"])
                else:
                    self.tensorboard.add_scalar(k, v, record["iter"])
        if self.wandb:
            if "sample" in values:  # one table of every sample so far, a row per evaluation
                import wandb
                self.samples.append([record["iter"], values["sample"]])
                values = values | {"sample": wandb.Table(columns=["iter", "sample"], data=self.samples)}
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
    plt = pyplot()
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
    save_figure(fig, Path(out_dir) / "loss.png")  # atomic, and closed after
    print(f"wrote {Path(out_dir) / 'loss.png'}")


def settings_help():
    """Every setting as --key=default with what it means: the Settings declaration, printed."""
    return "\n".join(f"  --{f.name}={f.default!r}  # {f.metadata['help']}" for f in fields(Settings))


def main():
    argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "\nSettings, their defaults and what they mean:\n" + settings_help())
        return
    if argv and argv[0].partition("=")[0] == "--plot":  # --plot, --plot DIR or --plot=DIR
        dirs = argv[0].split("=", 1)[1:] + argv[1:]
        if len(dirs) > 1:
            raise UserError(f"--plot takes one out_dir, got {len(dirs)}: {' '.join(dirs)}")
        return plot(dirs[0] if dirs else "out")
    cfg = load_config(argv)
    if cfg["lr_find"]:
        lr_find(cfg)
        return
    stop = train(cfg)
    if stop:  # stopped by a signal, after saving: the status a shell gives a process it killed
        sys.exit(128 + stop)


if __name__ == "__main__":
    run_main(main)
