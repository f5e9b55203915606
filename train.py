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
- This file holds the settings, the loop and what makes a run; what the loop calls lives in
  modules named for it: schedule.py (the LR), budget.py (time_budget_s), batches.py,
  distributed.py (device, precision, DDP / FSDP), metrics.py (metrics.jsonl), lr_range.py.
- Every device / precision / DDP / FSDP decision is made once, in setup_runtime() and
  step_model(); the loop only uses `rt.ctx` (autocast), `rt.scaler` (a no-op unless fp16) and
  `rt.distributed`. The loop: set the LR, evaluate and checkpoint, one step, log.
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
import difflib
import importlib.util
import json
import math
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from batches import Batches, make_batches
from budget import TimeBudget
from common import UserError, atomic_write_text, measure_peak_flops, peak_memory_mb, print0, run_main
from distributed import (Runtime, full_model_state, full_optimizer_state, load_optimizer_state, setup_runtime,
                         step_model)
from engine import generate
from gpt import GPT, GPTConfig, is_hub_model_id, load_checkpoint, model_from_checkpoint, save_checkpoint
from lr_range import lr_suggestions, plot_lr_find
from metrics import MetricsLog, plot
from schedule import lr_at

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
# What the loop keeps and calls: progress, evaluation, stop signals, the model

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
# Training

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


@dataclass
class Run:
    """One training run's parts, made once by train(): what checkpoint() and evaluate_and_save() read."""
    cfg: dict  # the settings, max_iters and lr_decay_iters as the time budget decides them
    rt: Runtime
    raw_model: GPT
    model: torch.nn.Module  # what the steps call: raw_model, or its DDP / compiled / sharded form (step_model)
    optimizer: torch.optim.Optimizer
    batches: Batches
    batch_rng: np.random.Generator  # the training batch stream, the same on every rank
    progress: Progress
    budget: TimeBudget
    log: MetricsLog | None  # rank 0's
    sample_prompt: list | None  # the evaluation samples' prompt (eval_sample_tokens)
    t_start: float  # when this process began training (time.time())

    def elapsed_s(self):
        """Training time of the whole run: its earlier processes', and this one's so far."""
        return self.progress.elapsed_s + time.time() - self.t_start


def checkpoint(run, name, full):
    """The weights, their shape and tokenizer into out_dir/name; with `full`, everything needed to
    resume. Every rank calls it (FSDP gathers the shards); rank 0 writes it, in one process's format."""
    rt, progress = run.rt, run.progress
    weights = full_model_state(run.raw_model, rt)
    optimizer_state = full_optimizer_state(run.raw_model, run.optimizer, rt) if full else None
    if not rt.master:
        return
    state = dict(model=weights, model_args=asdict(run.raw_model.config), tokenizer=run.batches.tokenizer.to_dict(),
                 config=run.cfg, iter_num=progress.iter_num, best_val_loss=progress.best_val_loss)
    if full:
        rng = dict(batches=run.batch_rng.bit_generator.state, torch=torch.get_rng_state(), world_size=rt.world_size)
        if rt.device_type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(rt.device)
        state |= dict(optimizer=optimizer_state, scaler=rt.scaler.state_dict(), rng=rng, budget=run.budget.decision,
                      evals_since_best=progress.evals_since_best, elapsed_s=run.elapsed_s())
    save_checkpoint(state, Path(run.cfg["out_dir"]) / name)


def evaluate_and_save(run, it, lr, ending):
    """The evaluation at step `it`: losses (and a sample) printed and logged, best.pt written where
    val improved, ckpt.pt too unless the run is `ending` (its end writes ckpt.pt). Returns whether
    the run ends here: `ending`, or patience run out."""
    cfg, rt, progress = run.cfg, run.rt, run.progress
    metrics = evaluate(run.model, run.batches, cfg, rt)
    if cfg["eval_sample_tokens"]:
        metrics["sample"] = eval_sample(run.raw_model, run.batches.tokenizer, run.sample_prompt, cfg, it, rt)
    metrics["peak_mem_mb"] = peak_memory_mb(rt.device)
    if not math.isfinite(metrics["val_loss"]):
        raise UserError(f"val loss is {metrics['val_loss']} at iter {it}; stopping (the last good "
                        f"checkpoint in {Path(cfg['out_dir'])} is kept). Try a lower learning_rate.")
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
        ending = True
    if rt.master:
        run.log.write(iter=it, elapsed_s=run.elapsed_s(), lr=lr, **metrics)
    if improved:
        checkpoint(run, "best.pt", full=False)
    if (improved or cfg["always_save_checkpoint"]) and not ending:
        checkpoint(run, "ckpt.pt", full=True)
    return ending


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
    progress, decision, resume_iter = Progress(), None, None
    if cfg["init_from"] == "resume":
        progress = restore(ckpt, raw_model, optimizer, rt.scaler, batch_rng, rt, cfg["seed"])
        decision = ckpt.get("budget")  # the time budget's decision: the resumed run keeps it
        resume_iter = progress.iter_num  # its evaluation, if one was due, is done
        print0(f"resuming from {out_dir / 'ckpt.pt'} at iter {progress.iter_num} "
               f"(best val loss {progress.best_val_loss:.4f})")
    del ckpt  # free its copy of the weights and optimizer state
    # Its decisions set cfg's max_iters and lr_decay_iters (cfg is this run's own dict).
    budget = TimeBudget(cfg, rt, decision, resume_iter or 0, started, progress.elapsed_s)
    sample_prompt = eval_sample_prompt(cfg, batches.tokenizer, raw_model.config.block_size)
    log = start_outputs(cfg, rt, raw_model, resume_iter) if rt.master else None
    signals = StopSignals()
    tokens_per_iter = batches.B * batches.T * cfg["gradient_accumulation_steps"]
    flops_per_iter = raw_model.flops_per_token() * tokens_per_iter / rt.world_size
    run = Run(cfg, rt, raw_model, model, optimizer, batches, batch_rng, progress, budget, log, sample_prompt,
              t_start=time.time())
    t_last, iters_since_log, stop = time.time(), 0, 0
    loss_sum = torch.zeros((), device=rt.device)  # summed on device: no host sync between logs
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
        last_iter = it == cfg["max_iters"] or budget.over(it)  # a spent time budget ends the run early
        done = last_iter or stop > 0  # the end of the run writes ckpt.pt below the loop
        if (it % cfg["eval_interval"] == 0 or last_iter) and it != resume_iter:
            t_eval = time.time()
            done = evaluate_and_save(run, it, lr, done)
            eval_s = time.time() - t_eval
            t_last += eval_s  # evaluation time is not training throughput
            budget.after_eval(eval_s)
        if done:
            break

        # Forward, backward and update on the next batch.
        loss_sum += train_step(model, optimizer, batches, batch_rng, cfg, rt)
        progress.iter_num += 1
        iters_since_log += 1
        budget.after_step(progress.iter_num)

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
                log.write(iter=progress.iter_num, elapsed_s=run.elapsed_s(), lr=lr, loss=loss, ms_per_iter=dt * 1000,
                          tokens_per_s=tokens_per_iter / dt, mfu=mfu, peak_mem_mb=mem)
            budget.at_log(progress.iter_num, iters_since_log, dt * iters_since_log)
            loss_sum.zero_()
            t_last, iters_since_log = time.time(), 0

    # The end of the run (max_iters, an early stop or a signal) always saves where it got to.
    checkpoint(run, "ckpt.pt", full=True)
    if rt.master:
        log.close()
    if stop:
        print0(f"stopped by {signal.Signals(stop).name} at iter {progress.iter_num}; {out_dir / 'ckpt.pt'} "
               f"resumes it (--init_from=resume)")
    if rt.in_process_group:  # one process under torchrun too: NCCL warns at exit about a group left open
        # Wait for rank 0's last checkpoint: a rank that tears down gloo while another still
        # works can abort ("terminate called without an active exception").
        torch.distributed.barrier()
        del model, run  # DDP's reducer holds the process group: release it before the group goes
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
