"""What turns a model into tokens, for every script that generates (sample.py, serve.py, bench.py,
train.py's evaluation samples): loading a model, weight formats for decoding, the KV cache,
sampling, continuous batching, and the text of the tokens.

Design choices:
- One decoding path. Engine runs continuous batching: a step decodes one token for every running
  sequence in one forward, then prefills waiting prompts, first come first served, within a token
  budget, so a long prompt never stalls the streams already running. generate_stream and
  generate are one batch of requests on an Engine; beam search keeps its own loop (it reorders
  the cache's rows every step).
- The cache is a fixed set of rows, each the length of a whole context (block_size;
  generate_stream's rows its prompt plus new tokens), allocated once. A request is admitted only
  when its n rows are free, so nothing runs out of memory mid-generation. Rows in use stay packed
  at the front (an ended row is filled by the last one), so a decode step reads rows [0, R) of the
  cache as one view, without gathering.
- Rows sit at their own positions: GPT-2's position embedding takes one position per row, and
  attention masks each row to its own filled slots. When every row is at one position (one
  request, its n choices) no mask is built: one sequence runs exactly a plain cache's arithmetic.
- Sampling is one function on (B, V) logits. Each request draws from its own generator, so a
  seeded request gives the same text alone and amid others. Any finite setting gives a token.
- Past block_size the window slides: the last block_size tokens are prefilled again (with
  absolute positions a cached key belongs to one position in one window).
- Decoding one token reads every weight once, so on a CPU it runs at memory speed: the weights
  are quantised once at load into a format (quantize: fp32, bf16, fp16, int8 per row, int4 per
  group) whose one-token kernel is torch's own; a prompt's many rows take a plain matmul.
- TextStream turns tokens into text once it is final: never half a UTF-8 character (a byte-level
  token can end inside one), never the start of a stop string. Only the tokens after the last
  final text are decoded at each step, so a long generation stays linear.
"""
import contextlib
import copy
import itertools
import json
import math
import os
import platform
import random
import sys
import time
from collections import deque, namedtuple
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

import common
from common import UserError, autocast_context, resolve_device, resolve_dtype
from gpt import GPT, eval_mode, is_hub_model_id, load_checkpoint, model_from_checkpoint
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# Loading

Loaded = namedtuple("Loaded", "model tokenizer device ctx description")
CHECKPOINT_NAMES = ("best.pt", "ckpt.pt")  # an out_dir's, in order of preference


def find_checkpoint(ckpt, out_dir):
    """--ckpt, else best.pt / ckpt.pt of --out_dir, else the newest run under out*/ (best.pt first).
    A --ckpt folder is a Hugging Face GPT-2 folder when it holds config.json and no checkpoint; a
    --ckpt that is no path but a Hub model id (gpt2, OWNER/NAME) is returned as given."""
    if ckpt:
        if Path(ckpt).is_dir() and not is_hf_folder(ckpt):
            raise UserError(f"--ckpt {ckpt} is a directory; --out_dir {ckpt} uses its best.pt or ckpt.pt")
        return Path(ckpt)
    if out_dir:
        for name in CHECKPOINT_NAMES:
            if (Path(out_dir) / name).is_file():
                return Path(out_dir) / name
        raise UserError(f"no best.pt or ckpt.pt in {out_dir} (train first, or pass --ckpt PATH)")
    found = [path for name in CHECKPOINT_NAMES for path in Path().glob(f"out*/{name}")]
    if not found:
        raise UserError("no checkpoint found under out*/; pass --ckpt PATH or --out_dir DIR "
                        "(or train one: python train.py config/small.py)")
    run = max(found, key=lambda path: path.stat().st_mtime).parent
    return next(run / name for name in CHECKPOINT_NAMES if (run / name).is_file())


def is_hf_folder(path):
    """A Hugging Face GPT-2 folder: config.json, and not a training run's out_dir (which has one too)."""
    path = Path(path)
    return (path / "config.json").is_file() and not any((path / name).is_file() for name in CHECKPOINT_NAMES)


def load_model(ckpt=None, out_dir=None, device="auto", dtype="auto", weights="auto", group_size=None,
               scoring=False, decoding=True, rows=1):
    """Loaded(model, tokenizer, device, autocast context, a line saying what was loaded) for the
    checkpoint find_checkpoint picks.

    Two settings, two roles. `weights` is the format the matmul weights are stored in (a
    WEIGHT_FORMATS name, quantised here once, the checkpoint untouched; `group_size`: int4's).
    `dtype` is the precision fp32 weights compute in under autocast, as in training: given, or
    "auto" when the model scores whole windows (`scoring`: sample.py --eval, --analyze; bf16 where
    native); else fp32 weights decode in fp32. "auto" weights: fp32 when scoring, inspecting one
    window (not `decoding`) or with `dtype` given; decoding token by token, choose_weights's format
    for this machine and `rows` sequences decoded together (on a GPU bf16, or fp16 where bf16 is
    not native)."""
    device_name = resolve_device(device)
    check_weight_settings(weights, dtype, group_size)
    if weights in ("int8", "int4") and device_name != "cpu":
        raise UserError(f"--weights {weights} runs on the CPU (torch's {weights} matmul kernels); "
                        f"got --device {device_name}")
    if weights in KERNELS and not hasattr(torch.ops.aten, KERNELS[weights]):
        raise UserError(f"--weights {weights} needs torch's {KERNELS[weights]}, which torch {torch.__version__} lacks")
    run_dtype = resolve_dtype(dtype, device_name)
    path = find_checkpoint(ckpt, out_dir)
    if path.is_dir() or is_hub_model_id(path):  # a Hugging Face GPT-2 (folder or Hub id): GPT-2's own BPE
        try:
            model = GPT.from_pretrained(path).to(device_name)
        except (ValueError, OSError) as e:
            raise UserError(f"cannot load {path}: {e}") from None
        tokenizer, what = load_tokenizer("gpt2"), "Hugging Face GPT-2"
    else:
        checkpoint = load_checkpoint(path)  # mapped on the CPU: only the weights go to the device
        if not checkpoint.get("tokenizer"):
            raise UserError(f"{path} carries no tokenizer; it was not written by train.py")
        tokenizer = load_tokenizer(checkpoint["tokenizer"])
        model = model_from_checkpoint(checkpoint, device_name)
        what = f"iter {checkpoint.get('iter_num', '?')}"
    model.eval()
    params = model.num_params()
    chosen = ""
    if weights == "auto" and decoding and not scoring and dtype == "auto":
        weights, chosen = choose_weights(model, device_name, rows)
    elif weights == "auto":
        weights = "fp32"
    if weights == "fp32" and dtype == "auto" and not scoring:
        run_dtype = torch.float32  # decoding under autocast would re-cast every weight at every step
    group_size = group_size or INT4_GROUP_SIZE
    quantize(model, weights, group_size, autocast=weights == "fp32" and run_dtype != torch.float32)
    if weights == "fp32":
        ctx, how = autocast_context(device_name, run_dtype), str(run_dtype).removeprefix("torch.")
        how = "float32" if run_dtype == torch.float32 else f"{how} autocast"
    else:  # the weights are stored in their format: no autocast
        ctx, how = contextlib.nullcontext(), f"{weights} weights"
        how += f" in groups of {group_size}" if weights == "int4" else ""
    how += chosen and f" ({chosen})"
    description = (f"loaded {path} ({what}, {params / 1e6:.2f}M parameters, block_size "
                   f"{model.config.block_size}, {tokenizer.kind} tokenizer) on {device_name}, {how}")
    return Loaded(model, tokenizer, device_name, ctx, description)


# -----------------------------------------------------------------------------
# Weight formats for decoding
#
# Decoding one token reads every weight once, so on a CPU its speed is set by the bytes per weight
# and by how fast a kernel streams them (`python bench.py decode`; BENCHMARKS.md, Weight formats).
# Each format keeps the kernel that suits one token per row and a plain matmul for a prompt's
# many tokens, on the weight converted per call into the CPU's fastest matmul dtype.

# format: the dtype its activations (and embeddings, LayerNorms, KV cache) are in
WEIGHT_FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                  "int8": torch.bfloat16, "int4": torch.bfloat16}
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernel takes
KERNELS = {"int8": "_weight_int8pack_mm", "int4": "_weight_int4pack_mm_for_cpu"}  # recent torch versions only
INT4_GROUP_SIZE = 128  # all are within int4's loss limit on config/small.py; 128 decodes fastest (BENCHMARKS.md)


def check_weight_settings(weights, dtype="auto", group_size=None):
    """A UserError unless weights, dtype and group_size name one precision each: --dtype is only
    that of fp32 weights, --group_size only int4's."""
    if weights not in ("auto", *WEIGHT_FORMATS):
        raise UserError(f"unknown --weights {weights} (use auto, {', '.join(WEIGHT_FORMATS)})")
    if weights not in ("auto", "fp32") and dtype != "auto":
        raise UserError(f"--dtype sets the autocast precision of fp32 weights; --weights {weights} computes "
                        f"in {str(WEIGHT_FORMATS[weights]).removeprefix('torch.')}: drop --dtype {dtype}")
    if group_size is not None and (weights != "int4" or group_size not in INT4_GROUP_SIZES):
        raise UserError(f"--group_size {group_size} applies to --weights int4 and is one of "
                        f"{', '.join(map(str, INT4_GROUP_SIZES))}")


def prefill_dtype():
    """The dtype a CPU multiplies many rows fastest in: bf16 where native, else fp32."""
    return torch.bfloat16 if common.cpu_has_bf16() else torch.float32


class LinearForDecoding(nn.Module):
    """Base of the decoding formats' Linears. A decode step (one token per row, any number of rows)
    runs the format's own kernel (`one_token`); a prompt's T > 1 tokens per row run F.linear on the
    weight `dequantized` into matmul_dtype (the one-token kernels cost per row what a matmul costs
    per weight: 128 rows of int8 take twice a bf16 matmul's time). The int8 and int4 kernels compute
    each row on its own, so a sequence decodes the same tokens alone and batched with others (F.linear
    in 16 bits too, but for some large shapes, where one row takes another path than several)."""

    def forward(self, x):  # x: (B, T, in)
        x2 = x.reshape(-1, x.size(-1))  # (B*T, in)
        if x.size(-2) == 1 or self.dequantized is None:
            y = self.one_token(x2)
        else:
            bias = None if self.bias is None else self.bias.to(self.matmul_dtype)
            y = F.linear(x2.to(self.matmul_dtype), self.dequantized(self.matmul_dtype), bias).to(x.dtype)
        return y.view(*x.shape[:-1], -1)

    def add_bias(self, y):
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Linear16(LinearForDecoding):
    """bf16 or fp16 weights, (out, in) as F.linear reads them fastest (fp16's one-row kernel is
    ~20x slower on a transposed weight). The weight stays the Linear's parameter, so a tied head
    shares wte's storage."""

    def __init__(self, linear, dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.weight.data = self.weight.data.to(dtype).contiguous()
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        # a prompt: in bf16 where native, else (fp16's values, a CPU without bf16) in fp32
        self.matmul_dtype = dtype if dtype == prefill_dtype() else torch.float32

    def one_token(self, x):
        if x.size(0) == 1 and self.weight.dtype == torch.bfloat16 and self.weight.device.type == "cpu":
            if torch.compiler.is_compiling():  # an opaque op: a compiled graph would take oneDNN's kernel
                return gemv_bf16(x, self.weight, self.bias)
            return linear_without_onednn(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def dequantized(self, dtype):
        return self.weight.to(dtype)


def linear_without_onednn(x, weight, bias=None):
    """F.linear of one bf16 row through torch's own gemv, which streams the weight at about twice
    the speed of oneDNN's bf16 path for a single row (`python bench.py decode`, kernels alone);
    oneDNN stays on for everything else (several rows, prompts, training)."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)  # the public torch.backends.mkldnn.flags also resets TF32/precision settings and costs 40x more per call
    try:
        return F.linear(x, weight, bias)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


@torch.library.custom_op("gpt::gemv_bf16", mutates_args=())
def gemv_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """linear_without_onednn as one operator that torch.compile calls as it is."""
    return linear_without_onednn(x, weight, bias)


# (rows, out): the shape of a one-row product, for tracing without computing it
gemv_bf16.register_fake(lambda x, weight, bias: x.new_empty(x.size(0), weight.size(0)))


class LinearFp32Packed(LinearForDecoding):
    """fp32 weights in oneDNN's own blocked layout, packed once: oneDNN's fp32 product streams them
    close to the read speed for one row, ~1.5x as fast as MKL's x @ W, and runs prompts faster too
    (`python bench.py decode`, kernels alone). A packed weight has no plain view, so autocast cannot
    cast it: fp32 weights that compute under autocast stay nn.Linear (quantize)."""
    dequantized = None  # prompts run the same kernel

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float().contiguous()  # (out, in), whatever its memory layout
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight, 1))  # 1: packed for one row
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def one_token(self, x):
        if torch.compiler.is_compiling():  # an opaque op: inductor's lowering expects weights it packed itself
            return linear_fp32_packed(x, self.weight, self.bias)
        return onednn_linear(x, self.weight, self.bias)


def onednn_linear(x, packed_weight, bias=None):
    """x (rows, in) times a weight packed by mkldnn._reorder_linear_weight, plus bias."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


@torch.library.custom_op("gpt::linear_fp32_packed", mutates_args=())
def linear_fp32_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """onednn_linear as one operator that torch.compile calls as it is."""
    return onednn_linear(x, weight, bias)


linear_fp32_packed.register_fake(lambda x, weight, bias: x.new_empty(x.size(0), weight.size(0)))


# Below ~2 MB of fp32 weight a oneDNN call costs more (~15 us) than MKL's whole product (`python
# bench.py step` at config/small.py's shape); above it the packed product streams faster.
FP32_PACKED_MIN_WEIGHTS = 2**19


def can_pack_fp32():
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Int8Linear(LinearForDecoding):
    """int8 weights with one scale per output row (weight-only quantisation): a quarter of fp32's
    bytes. torch's int8 kernel (_weight_int8pack_mm) wants bf16 activations and scales."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float().contiguous()  # (out, in) rows, whatever its memory layout
        # (out,): the row's largest |w| maps to 127; rounded to bf16 first, so that the int8 values
        # are chosen for the scale the kernel will multiply by
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
        self.register_buffer("weight", torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))
        self.matmul_dtype = prefill_dtype()

    def one_token(self, x):
        return self.add_bias(torch._weight_int8pack_mm(x, self.weight, self.scale))

    def dequantized(self, dtype):
        return self.weight.to(dtype) * self.scale.to(dtype)[:, None]


class Int4Linear(LinearForDecoding):
    """int4 weights in groups of group_size along each row, each group with its own bf16 scale and
    offset (w = (q - 8) * scale + zero, q in 0..15): an eighth of fp32's bytes. torch's int4 kernel
    (_weight_int4pack_mm_for_cpu) takes its own packing, bf16 activations, and a number of rows that
    is a multiple of 16: the head's rows are padded with zeros and its extra outputs cut. Its packing
    has no cheap way back, so it also runs prompts (at about fp32's speed per row)."""
    dequantized = None

    def __init__(self, linear, group_size):
        super().__init__()
        N, K = linear.weight.shape
        self.in_features, self.out_features, self.group_size = K, N, group_size
        w = linear.weight.detach().float()
        w = torch.cat([w, w.new_zeros(-N % 16, K)])  # (N padded, K)
        groups = w.reshape(w.size(0), K // group_size, group_size)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low).clamp(min=1e-12) / 15).to(torch.bfloat16).float()
        zero = (low + 8 * scale).to(torch.bfloat16).float()  # the value q = 8 stands for
        q = torch.round((groups - zero) / scale + 8).clamp(0, 15).to(torch.int32).reshape(w.shape)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # (K / group_size, N padded, 2): each group's scale and zero, as the kernel takes them
        self.register_buffer("scales_and_zeros",
                             torch.cat([scale, zero], -1).transpose(0, 1).to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def one_token(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales_and_zeros)
        return self.add_bias(y[:, :self.out_features])


def int4_group_size(in_features, group_size):
    """The largest group size up to group_size that divides in_features (the kernel's groups tile
    a row), or None when none does (such a Linear stays int8)."""
    return next((g for g in reversed(INT4_GROUP_SIZES) if g <= group_size and in_features % g == 0), None)


@torch.no_grad()
def quantize(model, weights, group_size=INT4_GROUP_SIZE, autocast=False):
    """Inference only, in place: the model with its matmul weights in format `weights` (a
    WEIGHT_FORMATS name), everything else in that format's activation dtype. fp32 on a CPU: the
    blocks' Linears of at least FP32_PACKED_MIN_WEIGHTS weights packed for oneDNN
    (LinearFp32Packed), unless they compute under `autocast`; the others and the LM head, tied to
    the embedding, stay nn.Linear, stored as MKL reads it fastest (store_linear_weights_transposed).
    On a GPU the 16-bit formats are the model cast (cuBLAS runs any number of rows well). The other
    formats replace every block's Linear and the LM head (LinearForDecoding); an int8 or int4 head
    gets its own copy of the tied embedding, and wte stays for the lookup (a 16-bit head stays
    tied)."""
    dtype = WEIGHT_FORMATS[weights]
    cpu = next(model.parameters()).device.type == "cpu"
    if weights in KERNELS and not hasattr(torch.ops.aten, KERNELS[weights]):
        raise RuntimeError(f"{weights} weights need torch's {KERNELS[weights]}, which torch {torch.__version__} lacks")
    if weights in ("int8", "int4") and not cpu:
        raise ValueError(f"{weights} weights run on the CPU (torch's {weights} kernels)")
    if not cpu or (weights == "fp32" and (autocast or not can_pack_fp32())):
        if cpu:
            store_linear_weights_transposed(model)  # faster decoding on a CPU (it says why)
        return model.to(dtype).eval()

    def convert(linear):
        if weights == "fp32":
            return LinearFp32Packed(linear) if linear.weight.numel() >= FP32_PACKED_MIN_WEIGHTS else linear
        if weights in ("bf16", "fp16"):
            return Linear16(linear, dtype)
        g = int4_group_size(linear.in_features, group_size) if weights == "int4" else None
        return Int4Linear(linear, g) if g else Int8Linear(linear)
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    setattr(parent, name, convert(child))
    if weights == "fp32":
        store_linear_weights_transposed(model)  # the head and small Linears (it says why)
    else:
        model.lm_head = convert(model.lm_head)
    return model.to(dtype).eval()


def weight_bytes(model):
    """The bytes one decoded token reads: every weight, scale and bias, counted once (a tied
    head's), except the embeddings' rows that are only looked up (wte unless the head is tied
    to it, wpe)."""
    wte = model.transformer.wte.weight.data_ptr()
    lookups = {model.transformer.wpe.weight.data_ptr()}
    if model.lm_head.weight.data_ptr() != wte:  # not tied: only looked up
        lookups.add(wte)
    # a oneDNN-packed weight has no data pointer to share (nor anything to share it with)
    tensors = {id(t) if t.is_mkldnn else t.data_ptr(): t for t in itertools.chain(model.parameters(), model.buffers())}
    return sum(t.numel() * t.element_size() for ptr, t in tensors.items() if ptr not in lookups)


# --- auto: the fastest format whose quality holds, measured once per machine -----------------------

AUTO_CANDIDATES = ("fp32", "fp16", "bf16", "int8")  # held-out loss within 0.01 of fp32's; int4 is not


def weights_cache_path():
    """$GPT_CACHE_DIR/weights.json; by default in ~/.cache/gpt (or $XDG_CACHE_HOME/gpt)."""
    folder = os.environ.get("GPT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "gpt")
    return Path(folder) / "weights.json"


def machine_key(model, rows=1):
    """What the fastest format depends on: the CPU, the instruction sets torch may use, torch, the
    threads, the model's shape and the rows decoded together."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor() or platform.machine())
    isa = ",".join(f"{name}={os.environ.get(name, '')}" for name in
                   ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"))
    c = model.config
    return (f"{cpu} | {torch.backends.cpu.get_cpu_capability()} {isa} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads | n_layer {c.n_layer} n_head {c.n_head} n_embd {c.n_embd} "
            f"vocab {c.vocab_size} block {c.block_size} | {rows} rows")


def choose_weights(model, device, rows=1):
    """weights="auto": (format, a note saying how it was chosen). On a GPU bf16 (fp16 where bf16 is
    not native); elsewhere but a CPU fp32. On a CPU, the fastest of AUTO_CANDIDATES for this model
    here decoding `rows` sequences at once (time_weight_formats: a kernel fast for one row may not
    be for 16, as fp16's), a more exact one kept unless the other is >10% faster; measured once and
    cached per machine_key in weights_cache_path() (a cache that cannot be read is measured anew)."""
    if device.startswith("cuda"):
        return ("bf16" if common.cuda_has_bf16(device) else "fp16"), "auto: this GPU's"
    if device != "cpu":
        return "fp32", "auto"
    path, key = weights_cache_path(), machine_key(model, rows)
    try:
        cache = json.loads(path.read_text())
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), dict) and cache[key].get("weights") in AUTO_CANDIDATES:
        return cache[key]["weights"], f"auto: the fastest here, as measured before ({path})"
    candidates = [f for f in AUTO_CANDIDATES if f not in KERNELS or hasattr(torch.ops.aten, KERNELS[f])]
    seconds = time_weight_formats(model, candidates, rows)
    best = candidates[0]
    for fmt in candidates[1:]:  # in order of exactness: a rounder format must clearly win
        if seconds[fmt] < 0.9 * seconds[best]:
            best = fmt
    cache[key] = dict(weights=best, ms_per_token={f: round(s * 1e3, 3) for f, s in seconds.items()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        common.atomic_write_text(path, json.dumps(cache, indent=1))
    except OSError as e:  # a read-only home still decodes, measuring at every load
        print(f"warning: cannot cache the weight format in {path}: {e}", file=sys.stderr)
    times = ", ".join(f"{f} {s * 1e3:.1f}" for f, s in seconds.items())
    return best, f"auto: the fastest here, ms per token {times}"


@torch.inference_mode()
def time_weight_formats(model, formats, rows=1, steps=5):
    """{format: seconds}: the fastest of a few timed decode steps of `rows` sequences through a copy
    of `model` in each format (the fastest, so that other processes' share of the CPU is left out)."""
    idx = torch.zeros(rows, 1, dtype=torch.long)
    seconds = {}
    for fmt in formats:
        m = quantize(copy.deepcopy(model), fmt)
        cache = KVCache(m.config.n_layer, min(8 + steps, m.config.block_size), rows)
        m(torch.zeros(rows, 8 if m.config.block_size > 8 + steps else 1, dtype=torch.long), kv_cache=cache)
        times = []
        for _ in range(min(steps, cache.max_len - cache.lengths[0])):
            t0 = time.perf_counter()
            m(idx, kv_cache=cache)
            times.append(time.perf_counter() - t0)
        seconds[fmt] = min(times)
        del m, cache
    return seconds


@torch.no_grad()
def store_linear_weights_transposed(model):
    """Inference on a CPU, in place: keep every Linear weight in memory as (in, out), Hugging Face's
    Conv1D layout, seen through a transposed view, so shapes, names and values do not change.
    Decoding one token multiplies a vector by each weight; MKL streams x @ W from a row-major
    (in, out) matrix faster than from nn.Linear's (out, in) one (BENCHMARKS.md, Decoding). The
    tied embedding follows the head; a lookup then gathers a strided row.
    Not for training: fused AdamW and DDP expect contiguous parameters."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.data = m.weight.data.t().contiguous().t()  # .data keeps the parameter (and its tie)
    return model


# -----------------------------------------------------------------------------
# The KV cache: rows of keys and values, each row at its own position

class KVCache:
    """Keys and values of every layer for `rows` sequences of up to max_len tokens each.

    k, v: (n_layer, rows, n_head, max_len + 1, head_size), allocated at the first write. On a CPU
    they are fp32 whatever the activations (16-bit values are stored exactly, and attention over
    them runs in fp32: torch's 16-bit CPU attention is 5-10x slower for one query, `attention` in
    gpt.py); elsewhere in the dtype attention runs in (so autocast works). Row r holds its sequence's keys and values in
    slots [:lengths[r]]; the extra last slot takes the writes of rows that sit out a forward, and
    is never read. A forward runs on the rows `batch` picks (default: all), each row continuing
    from its own length:

        cache.batch(first, count)                # rows first .. first + count - 1
        logits, _ = model(idx, kv_cache=cache)   # idx: (count, T) new tokens
    """

    def __init__(self, n_layer, max_len, rows=1, device="cpu"):
        self.n_layer, self.max_len, self.rows, self.device = n_layer, max_len, rows, device
        self.k = self.v = None
        self.lengths = [0] * rows  # tokens cached in each row
        self.batch(0, rows)

    def batch(self, first, count, live=None):
        """The rows of the next forward: first .. first + count - 1. A row whose live[i] is False
        (a prompt still prefilling, during a decode step) is computed but stores nothing."""
        self.first, self.count, self.live = first, count, live

    def prepare(self, T):
        """Called by the model before a forward of T new tokens per row: where they go. Returns an
        int when every row continues at one position, else each row's position, (count, 1)."""
        starts = self.lengths[self.first:self.first + self.count]
        live = self.live or [True] * self.count
        self.longest = max(start for start, alive in zip(starts, live) if alive) if any(live) else 0
        self.uniform = self.live is None and min(starts) == self.longest
        if self.uniform:  # no mask: the same arithmetic as one sequence alone
            return self.longest
        if T != 1:
            raise ValueError("rows at different positions take one token each (prefill one row at a time)")
        self.rows_step = self.one_token_each()
        return self.rows_step.prepare(T)

    def one_token_each(self):
        """The next forward as RowsAtPositions: one new token per row, each at its row's length.
        Rows that sit out read slot 0 (so no row attends to nothing) and write the spare slot."""
        starts = self.lengths[self.first:self.first + self.count]
        live = self.live or [True] * self.count
        longest = max((s for s, alive in zip(starts, live) if alive), default=0)
        pos = torch.tensor([s if alive else 0 for s, alive in zip(starts, live)], device=self.device)
        slots = torch.tensor([s if alive else self.max_len for s, alive in zip(starts, live)], device=self.device)
        return RowsAtPositions(pos, slots, longest + 1)

    def update(self, layer, k, v):
        """Store one layer's new (B, nh, T, hs) keys/values; return (keys, values, mask, is_causal)
        for attention over each row's cache."""
        B, nh, T, hs = k.shape
        if self.longest + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.longest} + {T} do not fit")
        if self.k is None:
            dtype = torch.float32 if k.device.type == "cpu" else k.dtype  # the class docstring says why
            self.k = k.new_zeros(self.n_layer, self.rows, nh, self.max_len + 1, hs, dtype=dtype)
            self.v = v.new_zeros(self.n_layer, self.rows, nh, self.max_len + 1, hs, dtype=dtype)
        k_all, v_all = self.k[layer], self.v[layer]  # (rows, nh, max_len + 1, hs)
        if B != self.rows:  # this forward's rows (a view, no copy)
            k_all, v_all = k_all.narrow(0, self.first, B), v_all.narrow(0, self.first, B)
        if not self.uniform:
            return self.rows_step.write(k_all, v_all, k, v)
        pos = self.longest
        # narrow + copy_ rather than k[layer, :, :, pos:end] = ...: the same views without Python's
        # slice-tuple indexing, which costs more than the copy (`python bench.py decode` measures it)
        k_all.narrow(2, pos, T).copy_(k)
        v_all.narrow(2, pos, T).copy_(v)
        keys, values = k_all.narrow(2, 0, pos + T), v_all.narrow(2, 0, pos + T)
        if pos == 0:
            return keys, values, None, True
        # SDPA's is_causal aligns the mask top-left, wrong when there are fewer queries than keys.
        # One new token sees everything; several see the cache and their own past.
        mask = None if T == 1 else torch.ones(T, pos + T, dtype=torch.bool, device=k.device).tril(diagonal=pos)
        return keys, values, mask, False

    def advance(self, T):
        """After the forward: T more tokens in each row that took part."""
        for i in range(self.count):
            if self.live is None or self.live[i]:
                self.lengths[self.first + i] += T

    def copy_row(self, src, dst):
        """Row dst holds what row src holds (a prompt shared by n choices; packing rows)."""
        n = self.lengths[src]
        if self.k is not None and n:
            self.k[:, dst, :, :n] = self.k[:, src, :, :n]
            self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def reorder(self, rows):
        """Keep rows `rows` (beam search: each new beam continues some old beam)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.lengths = [self.lengths[r] for r in rows.tolist()]
        self.rows = len(self.lengths)


class RowsAtPositions:
    """A forward of one new token per row, row i at position pos[i]: its key and value go to slot
    slots[i] of its row, and it attends to its row's slots [0, pos[i]]. Tensors only (and one
    int, the slots read), so that torch.compile traces a decode step through it as one graph whose
    shapes hold from token to token (decode_rows). As a model's kv_cache, it writes into `keys`
    and `values`: each layer's (B, nh, > length, hs) storage."""

    def __init__(self, pos, slots, length, keys=None, values=None):
        self.pos, self.slots, self.keys, self.values = pos, slots, keys, values
        self.longest = length - 1  # the model checks its block_size with it
        self.rows = torch.arange(pos.size(0), device=pos.device)
        self.mask = (torch.arange(length, device=pos.device) <= pos[:, None])[:, None, None, :]  # (B, 1, 1, L)

    def prepare(self, T):
        return self.pos[:, None]  # (B, 1): each row's position

    def update(self, layer, k, v):
        return self.write(self.keys[layer], self.values[layer], k, v)

    def write(self, k_all, v_all, k, v):
        """Row i's new key and value (k, v: (B, nh, 1, hs)) into slot slots[i] of k_all, v_all
        (B, nh, S, hs); (keys, values, mask, is_causal) for attention over the first length slots."""
        k_all[self.rows, :, self.slots] = k[:, :, 0].to(k_all.dtype)
        v_all[self.rows, :, self.slots] = v[:, :, 0].to(v_all.dtype)
        L = self.longest + 1
        return k_all.narrow(2, 0, L), v_all.narrow(2, 0, L), self.mask, False

    def advance(self, T):
        pass  # the KVCache counts what its rows hold


def decode_rows(model, idx, pos, slots, length, keys, values):
    """(B, 1, V) logits of one new token per row, idx (B, 1), row i at position pos[i]
    (RowsAtPositions): the decode step Engine(compile=True) compiles."""
    logits, _ = model(idx, kv_cache=RowsAtPositions(pos, slots, length, keys, values))
    return logits


def compiled_decode_rows():
    """decode_rows under torch.compile: LayerNorms, GELU, residual adds, the mask and the cache
    writes fused into a few kernels around the matmuls, one graph for all lengths and rows
    (dynamic shapes: the one-token-each step has no shape that grows but the slots read).
    Freezing turns the weights into constants (inductor may prepack them for oneDNN's matmul), so
    the model's weights must not change after the first step; bf16's one-row products stay the
    eager gemv (gemv_bf16, an operator the graph calls as it is). Compiling costs seconds to half a
    minute on a CPU, once per process, and on a CPU buys 0-20% per token (BENCHMARKS.md, Decode step)."""
    # Inductor's CPU tanh (Sleef's) is slower than its exp-based one, as accurate on GELU's inputs
    return torch.compile(decode_rows, dynamic=True, options={"freezing": True, "cpp.use_decompose_tanh": True})


def check_compile(device):
    """A UserError unless torch.compile compiles and runs a small function on `device` (on a CPU,
    inductor needs a C++ compiler): found at startup, not as an error at every request."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.zeros(4, device=device))
    except Exception as e:  # whatever the toolchain raises, the user's remedy is the same
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"--compile: torch.compile does not work here ({type(e).__name__}: {first_line}); "
                        "run without --compile") from None


# -----------------------------------------------------------------------------
# Sampling

@dataclass(frozen=True)
class Sampling:
    """How a request picks each next token (sample_next_token applies it, in this order)."""
    repetition_penalty: float = 1.0  # CTRL's: on every token of the context; 1 = off
    frequency_penalty: float = 0.0  # OpenAI's: logit -= count x this, over the completion's tokens
    presence_penalty: float = 0.0  # OpenAI's: logit -= this, for each token the completion holds
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens (and any equal to the k-th)
    top_p: float | None = None  # nucleus: the fewest most likely tokens whose probability reaches top_p

    def __post_init__(self):
        checks = [("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
                  ("top_k", self.top_k is None or self.top_k >= 1, ">= 1"),
                  ("top_p", self.top_p is None or 0 < self.top_p <= 1, "in (0, 1]"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 = off)"),
                  ("frequency_penalty", -1e6 <= self.frequency_penalty <= 1e6, "finite"),
                  ("presence_penalty", -1e6 <= self.presence_penalty <= 1e6, "finite")]
        for name, ok, rule in checks:
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"{name} must be {rule}, got {value}")

    @property
    def penalised(self):
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0 or self.presence_penalty != 0


GREEDY = Sampling(temperature=0.0)


def sample_next_token(logits, sampling=Sampling(), *, seen=None, counts=None, generator=None):
    """Choose one next token per row of (B, V) logits; returns (B,) token ids.

    seen (B, V) bool: the tokens in each row's context (repetition penalty: a positive logit is
    divided by the penalty, a negative one multiplied, so either way the token gets less likely).
    counts (B, V): how often each token was generated (a token generated c times loses
    c * frequency_penalty + (c > 0) * presence_penalty). Then temperature (0 = argmax, nothing
    else random), top-k, top-p (the most likely token always survives), and a draw with
    `generator`: one for every row, or a list of one per row (each request has its own).
    Any finite setting gives a token: penalised logits are clamped to finite values
    and scaled after subtracting their maximum, so 1e-310 and 1e300 are extremes, not infinities.
    Ties: a token equal to the k-th largest (or at the top-p boundary) is kept too, so the result
    never depends on how equal values sort.
    """
    s = sampling
    logits = logits.float()
    if s.repetition_penalty != 1.0 and seen is not None:
        logits = torch.where(seen, torch.where(logits > 0, logits / s.repetition_penalty,
                                               logits * s.repetition_penalty), logits)
    if (s.frequency_penalty or s.presence_penalty) and counts is not None:
        logits = logits - counts * s.frequency_penalty - (counts > 0) * s.presence_penalty
    if s.penalised:  # a penalty of 1e-300 divides by zero in float32: keep every logit finite
        big = torch.finfo(torch.float32).max
        logits = logits.nan_to_num(nan=-big, posinf=big, neginf=-big)
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    # The largest logit becomes 0 and the others negative: dividing by a tiny temperature then
    # gives -inf for the unlikely tokens, never inf - inf = nan.
    temperature = max(s.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if s.top_k is not None and s.top_k < logits.size(-1):
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        probs = F.softmax(logits, dim=-1)
        sorted_probs = probs.sort(dim=-1, descending=True).values
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of all likelier tokens
        n_keep = (mass_before < s.top_p).sum(dim=-1, keepdim=True).clamp(min=1)
        smallest_kept = sorted_probs.gather(-1, n_keep - 1)  # (B, 1)
        logits = logits.masked_fill(probs < smallest_kept, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    # Inverse transform: one uniform number u per row, and the first token whose cumulative
    # probability passes u * total. It draws as torch.multinomial does, at a fraction of its cost
    # over GPT-2's 50,257 tokens, and each row's u comes from its own generator.
    generators = generator if isinstance(generator, list) else [generator] * len(probs)
    u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators])
    cdf = probs.cumsum(dim=-1)
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=probs.size(-1) - 1)
    stuck = probs.gather(-1, token) == 0  # u * total rounded up to the total: the most likely token
    if stuck.any():
        token = torch.where(stuck, probs.argmax(dim=-1, keepdim=True), token)
    return token.squeeze(-1)


def token_logprobs(logits, tokens, top):
    """OpenAI's logprobs of the chosen tokens: log-softmax of the raw logits (B, V), before any
    sampling setting. Returns each row's (logprob of its token, [(token, logprob)] of its `top`
    most likely tokens)."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    if not top:
        return [(lp, []) for lp in chosen]
    values, ids = logprobs.topk(min(top, logprobs.size(-1)), dim=-1)
    return [(lp, list(zip(i, v))) for lp, i, v in zip(chosen, ids.tolist(), values.tolist())]


# -----------------------------------------------------------------------------
# The engine: continuous batching

class Request:
    """One prompt continued n times (n choices), as the engine runs it.

    max_tokens: new tokens per choice (0 with prompt_logprobs: score the prompt only). A choice
    ends at one of stop_tokens (it is its last token, finish_reason "stop"), after max_tokens
    ("length"), or when the caller calls engine.finish. seed or generator: where its draws come
    from (its own, so a request's text never depends on the others running beside it).
    logprobs: None, or how many most likely alternatives each Output reports with its token's.
    prompt_logprobs: fill self.prompt_logprobs with each prompt token's (logprob, top alternatives),
    as token_logprobs gives them ((None, None) for the first token).
    cancel() may be called from any thread: the engine drops the request at its next step.
    """

    def __init__(self, prompt, max_tokens, *, n=1, sampling=Sampling(), stop_tokens=(), seed=None,
                 generator=None, logprobs=None, prompt_logprobs=False):
        if not len(prompt):
            raise ValueError("the prompt is empty: give at least one token (e.g. end-of-text)")
        if max_tokens < 0 or n < 1:
            raise ValueError(f"max_tokens must be >= 0 and n >= 1, got {max_tokens} and {n}")
        self.prompt, self.max_tokens, self.n = [int(t) for t in prompt], max_tokens, n
        self.sampling, self.stop_tokens = sampling, frozenset(stop_tokens)
        self.seed, self.generator = seed, generator
        self.logprobs, self.want_prompt_logprobs = logprobs, prompt_logprobs
        self.prompt_logprobs = [(None, None)] if prompt_logprobs else None  # (logprob, top) per prompt token
        self.cancelled = False
        self.choices = []  # its Sequences, made when it is admitted
        self.seen = self.counts = None  # (n, V) penalty state, made at its first token if it has penalties

    def cancel(self):
        self.cancelled = True

    @property
    def done(self):
        return bool(self.choices) and all(seq.finish_reason for seq in self.choices)


class Sequence:
    """One choice of a request: its tokens (prompt + generated) and where they sit in the cache.
    The cache row holds tokens[window:][:cache.lengths[row]]; the rest is still to be fed."""

    def __init__(self, request, index, window):
        self.request, self.index = request, index
        self.tokens = list(request.prompt)
        self.window = window  # the first token of the context window (past block_size it slides)
        self.row = None
        self.generated = 0
        self.finish_reason = None
        self.follower = index > 0  # a later choice: gets the first choice's prompt cache, not its own


Output = namedtuple("Output", "request index token logprob top_logprobs finish_reason")
Output.__doc__ = """One event of a step: choice `index` of `request` got `token` (None when it ended
without one), with its logprob and top alternatives if the request asked; finish_reason is
"stop" or "length" on its last event, else None."""


def cache_bytes_per_row(config, dtype_bytes=4):
    """Bytes of one Engine row's KV cache: keys and values of every layer for a whole context."""
    return 2 * config.n_layer * (config.block_size + 1) * config.n_embd * dtype_bytes


class Engine:
    """Runs requests on one model with continuous batching.

        engine = Engine(model, max_rows=16, prefill_tokens=256)
        engine.add(Request(prompt_ids, max_tokens=100, sampling=Sampling(temperature=0.8)))
        while engine.has_work():
            for out in engine.step(): ...   # Outputs: tokens, logprobs, finish reasons

    A step decodes one token for every running sequence in one forward (rows at different
    positions), then prefills prompts, first come first served, up to prefill_tokens tokens (a long
    prompt takes several steps instead of stalling the others). A request is admitted, first come
    first served, only when max_rows has room for its n choices: each row holds a whole context,
    so nothing runs out of cache mid-generation. Running rows are kept at the front of the cache.
    Not thread-safe, except Request.cancel: one thread calls add, step and finish.
    """

    def __init__(self, model, max_rows=16, prefill_tokens=None, compile=False, max_len=None):
        self.model = model
        # compile: decode steps through compiled_decode_rows (its docstring says what it costs);
        # prompts are prefilled eagerly either way
        self.decode_rows = compiled_decode_rows() if compile else None
        self.device = next(model.parameters()).device
        self.block_size = model.config.block_size
        self.max_rows = max_rows
        self.prefill_tokens = prefill_tokens or self.block_size
        # max_len: the tokens a row holds, block_size unless every request is known to need fewer
        # (generate_stream: zeroing a whole context's cache costs more than a short generation)
        self.cache = KVCache(model.config.n_layer, min(max_len or self.block_size, self.block_size), max_rows,
                             self.device)
        self.waiting = deque()  # requests not admitted yet, in order of arrival
        self.rows = []  # the Sequence in each cache row: packed, rows [0, len(rows)) in use
        self.arrivals = itertools.count()

    def add(self, request):
        if request.n > self.max_rows:
            raise ValueError(f"n={request.n} choices need more rows than the engine has ({self.max_rows})")
        max_len = self.cache.max_len
        if max_len < self.block_size and len(request.prompt) + request.max_tokens > max_len:
            raise ValueError(f"{len(request.prompt)} prompt + {request.max_tokens} new tokens do not fit the "
                             f"engine's {max_len}-token rows")
        if request.want_prompt_logprobs and len(request.prompt) > self.block_size:
            raise ValueError(f"scoring a prompt of {len(request.prompt)} tokens needs at most block_size {self.block_size}")
        request.arrival = next(self.arrivals)
        if request.generator is None:
            seed = random.randrange(2**63) if request.seed is None else request.seed
            request.generator = torch.Generator(self.device).manual_seed(seed % 2**64)
        self.waiting.append(request)

    def has_work(self):
        return bool(self.waiting or self.rows)

    def running(self):
        return len({id(seq.request) for seq in self.rows})

    # --- a step ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self):
        """One decode token for every running sequence, then prefill within the budget; the Outputs."""
        self.drop_cancelled()
        self.admit()
        outputs = []
        for seq in self.rows:  # a full window slides: its last block_size tokens are prefilled again
            if self.to_feed(seq) == 1 and self.cache.lengths[seq.row] == self.block_size:
                seq.window = len(seq.tokens) - self.block_size
                self.cache.lengths[seq.row] = 0
        decoding = [seq for seq in self.rows if not seq.follower and self.to_feed(seq) == 1]
        if decoding:
            outputs += self.decode(decoding)
        budget, chunks = self.prefill_tokens, []
        for seq in sorted((s for s in self.rows if not s.follower and self.to_feed(s) > 1),
                          key=lambda s: (s.request.arrival, s.index)):
            if budget == 0:
                break
            chunks.append((seq, min(self.to_feed(seq), budget)))
            budget -= chunks[-1][1]
        for batch in self.alike(chunks):
            outputs += self.prefill(batch)
        return outputs

    def alike(self, chunks):
        """(seq, chunk) pairs in runs that one forward can prefill: rows next to each other, from one
        cache position, with chunks of one length (prompts admitted together, as a burst's are).
        A prompt whose logprobs are asked goes alone (its forward keeps every position's logits)."""
        batch = []
        for seq, chunk in chunks:
            if batch and (self.scores_prompt(seq) or self.scores_prompt(batch[-1][0]) or chunk != batch[-1][1]
                          or seq.row != batch[-1][0].row + 1
                          or self.cache.lengths[seq.row] != self.cache.lengths[batch[-1][0].row]):
                yield batch
                batch = []
            batch.append((seq, chunk))
        if batch:
            yield batch

    def scores_prompt(self, seq):
        request = seq.request
        return request.want_prompt_logprobs and seq.index == 0 and len(request.prompt_logprobs) < len(request.prompt)

    def to_feed(self, seq):
        """Tokens of seq's window not in the cache yet (1: ready to decode; more: to prefill)."""
        return len(seq.tokens) - seq.window - self.cache.lengths[seq.row]

    def decode(self, decoding):
        live = set(id(seq) for seq in decoding)
        alive = [id(seq) in live for seq in self.rows]
        idx = torch.tensor([[seq.tokens[-1]] for seq in self.rows], device=self.device)  # (R, 1)
        self.cache.batch(0, len(self.rows), None if all(alive) else alive)
        if self.decode_rows is None or self.cache.k is None:  # the first write allocates the cache
            logits, _ = self.model(idx, kv_cache=self.cache)
        else:
            step, R = self.cache.one_token_each(), len(self.rows)
            logits = self.decode_rows(self.model, idx, step.pos, step.slots, step.longest + 1,
                                      self.cache.k[:, :R].unbind(0), self.cache.v[:, :R].unbind(0))
            self.cache.advance(1)
        logits = logits[:, -1, :]  # (R, V)
        # Rows that sample alike in one call: requests with one Sampling and no penalties together,
        # a penalised request (whose rows carry its own counts) alone. The logits are all taken
        # before any sampling: an ended row moves another one.
        groups = {}
        for seq in decoding:
            key = id(seq.request) if seq.request.sampling.penalised else seq.request.sampling
            groups.setdefault(key, []).extend((s, seq.row) for s in self.with_followers(seq))
        picked = [([s for s, _ in group], self.logits_of([row for _, row in group], logits)) for group in groups.values()]
        return [out for seqs, rows in picked for out in self.next_tokens(seqs, rows)]

    def logits_of(self, rows, logits):
        """The (len(rows), V) logits of `rows`: as they are when rows are all rows in order (one
        request alone), without copying GPT-2's 50,257 logits."""
        if rows == list(range(len(logits))):
            return logits
        return logits.index_select(0, torch.tensor(rows, device=self.device))

    def prefill(self, batch):
        """Feed the next chunk of tokens of each (seq, chunk) of `batch` (rows next to each other, at
        one position, one chunk length) into its row in one forward; the Outputs of those it ends."""
        chunk, first = batch[0][1], batch[0][0]
        starts = [seq.window + self.cache.lengths[seq.row] for seq, _ in batch]
        idx = torch.tensor([seq.tokens[start:start + chunk] for (seq, _), start in zip(batch, starts)],
                           device=self.device)  # (len(batch), chunk)
        scoring = self.scores_prompt(first)
        self.cache.batch(first.row, len(batch))
        logits, _ = self.model(idx, kv_cache=self.cache, all_logits=scoring)  # (len(batch), chunk or 1, V)
        if scoring:  # position i predicts token i + 1, within the prompt (a scored prompt goes alone)
            request, start = first.request, starts[0]
            targets = first.tokens[start + 1:min(start + chunk + 1, len(request.prompt))]
            if targets:
                request.prompt_logprobs += token_logprobs(logits[0, :len(targets)],
                                                          torch.tensor(targets, device=self.device), request.logprobs)
        outputs = []
        for i, (seq, _) in enumerate(batch):
            if self.to_feed(seq) == 0:
                seqs = self.with_followers(seq)
                outputs += self.next_tokens(seqs, logits[i:i + 1, -1, :].expand(len(seqs), -1))
        return outputs

    def next_tokens(self, seqs, logits):
        """Sample the next token of each of seqs, requests of one Sampling, from their (len(seqs), V)
        logits: one call, each row drawing from its own request's generator."""
        ending = [seq for seq in seqs if seq.request.max_tokens == 0]  # scored their prompt: done
        outputs = [self.end(seq, None, "length") for seq in ending]
        if ending:
            keep = [i for i, seq in enumerate(seqs) if seq.request.max_tokens > 0]
            seqs, logits = [seqs[i] for i in keep], logits[keep]
        if not seqs:
            return outputs
        first = seqs[0].request
        penalties = {}
        if first.sampling.penalised:  # then seqs are this one request's
            if first.seen is None:
                first.seen = torch.zeros(first.n, logits.size(-1), dtype=torch.bool, device=self.device)
                first.seen[:, torch.tensor(first.prompt, device=self.device)] = True
                first.counts = torch.zeros(first.n, logits.size(-1), device=self.device)
            choice = torch.tensor([seq.index for seq in seqs], device=self.device)
            penalties = dict(seen=first.seen[choice], counts=first.counts[choice])
        tokens = sample_next_token(logits, first.sampling, generator=[seq.request.generator for seq in seqs],
                                   **penalties)
        if penalties:
            first.seen[choice, tokens] = True
            first.counts.index_put_((choice, tokens), torch.ones_like(tokens, dtype=torch.float), accumulate=True)
        tops = [seq.request.logprobs for seq in seqs if seq.request.logprobs is not None]
        scores = token_logprobs(logits, tokens, max(tops)) if tops else None
        for i, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
            request = seq.request
            seq.tokens.append(token)
            seq.generated += 1
            reason = "stop" if token in request.stop_tokens else "length" if seq.generated == request.max_tokens else None
            logprob, top = scores[i] if scores and request.logprobs is not None else (None, None)
            outputs.append(Output(request, seq.index, token, logprob, top and top[:request.logprobs], reason))
            if reason:
                self.retire(seq, reason)
        return outputs

    def with_followers(self, seq):
        """seq, or, at the first token of a request of n > 1 choices, all n: the others start from a
        copy of the first one's prompt cache."""
        request = seq.request
        if not any(s.follower for s in request.choices):
            return [seq]
        for follower in request.choices[1:]:
            self.cache.copy_row(seq.row, follower.row)
            follower.window, follower.follower = seq.window, False
        return request.choices

    # --- admitting, ending, cancelling -----------------------------------------------------------

    def admit(self):
        while self.waiting and len(self.rows) + self.waiting[0].n <= self.max_rows:
            request = self.waiting.popleft()
            window = max(0, len(request.prompt) - self.block_size)  # a long prompt keeps its end
            request.choices = [Sequence(request, i, window) for i in range(request.n)]
            for seq in request.choices:
                seq.row = len(self.rows)
                self.rows.append(seq)
                self.cache.lengths[seq.row] = 0  # a reused row: its old slots are never read

    def end(self, seq, token, reason):
        self.retire(seq, reason)
        return Output(seq.request, seq.index, token, None, None, reason)

    @torch.inference_mode()  # retiring may move a row of the cache, an inference tensor
    def finish(self, request, index, reason="stop"):
        """End choice `index` of a running request now (the caller found a stop string)."""
        seq = request.choices[index]
        if seq.finish_reason is None:
            self.retire(seq, reason)

    def retire(self, seq, reason):
        """seq has ended: its row is freed, and the last row moves into it (rows stay packed)."""
        seq.finish_reason = reason
        row, last = seq.row, self.rows[-1]
        if last is not seq:
            self.cache.copy_row(last.row, row)
            self.rows[row], last.row = last, row
        self.rows.pop()
        seq.row = None

    def drop_cancelled(self):
        if any(request.cancelled for request in self.waiting):
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        for seq in [seq for seq in self.rows if seq.request.cancelled]:
            self.retire(seq, "cancelled")


# -----------------------------------------------------------------------------
# One batch of prompts at a time, on the engine: sample.py, bench.py, train.py's samples

def generate_stream(model, idx, max_new_tokens, *, stop_tokens=(), generator=None, compile=False, **sampling):
    """Continue each row of idx (B, T); yield the (B,) new tokens step by step (a CPU tensor).

    sampling: Sampling's fields. Ends after max_new_tokens, or earlier once every row has produced
    a stop token; a row that has stopped keeps yielding its stop token. Prompts longer than
    block_size keep their end. The rows are B requests of one Engine, drawing from `generator`
    (`compile`: the Engine's).
    """
    B, T = idx.shape
    if T == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. end-of-text)")
    settings = Sampling(**sampling)
    if max_new_tokens == 0:
        return
    engine = Engine(model, max_rows=B, prefill_tokens=B * model.config.block_size, compile=compile,
                    max_len=T + max_new_tokens)
    if generator is None:  # from torch's global generator, so torch.manual_seed repeats the text
        generator = torch.Generator(idx.device).manual_seed(int(torch.randint(2**62, ())))
    requests = [Request(row, max_new_tokens, sampling=settings, stop_tokens=stop_tokens, generator=generator)
                for row in idx.tolist()]
    for request in requests:
        engine.add(request)
    last = [None] * B
    with eval_mode(model):
        while engine.has_work():
            new = {id(out.request): out.token for out in engine.step()}
            if not new:
                continue
            last = [new.get(id(request), last[i]) for i, request in enumerate(requests)]
            yield torch.tensor(last)
            if all(request.done for request in requests):
                return


def generate(model, idx, max_new_tokens, **kwargs):
    """generate_stream collected: the new tokens of each row, each cut before its first stop token."""
    steps = list(generate_stream(model, idx, max_new_tokens, **kwargs))
    if not steps:
        return [[] for _ in range(idx.size(0))]
    stop = set(kwargs.get("stop_tokens", ()))
    rows = torch.stack(steps, dim=1).tolist()  # (B, steps)
    return [next((row[:i] for i, t in enumerate(row) if t in stop), row) for row in rows]


def next_logits(model, tokens, n, kv_cache):
    """(B, V) logits for the token after tokens[:, :n], feeding the model only what the cache lacks
    (every row of kv_cache at one position, as beam search keeps them).

    An empty cache is prefilled with the last block_size tokens in one forward; then each call
    feeds the one newest token. When the cache is full (the context would pass block_size), the
    window slides: its last block_size-1 tokens plus the new one are re-prefilled, so every step
    past block_size costs one full forward but gives exactly the logits of cropping the context.
    """
    block_size = model.config.block_size
    if kv_cache.lengths[0] in (0, block_size):
        kv_cache.lengths = [0] * kv_cache.rows
        window = tokens[:, max(0, n - block_size):n]
    else:
        window = tokens[:, n - 1:n]
    kv_cache.batch(0, kv_cache.rows)
    logits, _ = model(window, kv_cache=kv_cache)
    return logits[:, -1, :]


@torch.inference_mode()
def beam_search(model, idx, max_new_tokens, num_beams, *, stop_tokens=(), length_penalty=1.0):
    """Beam search's best continuation of one prompt idx (1, T): its new tokens, stop token excluded.

    A hypothesis scores sum(log-probs of its new tokens) / (number of new tokens) ** length_penalty;
    a stop token counts as a token (ending has a probability too). Each step keeps the num_beams
    best running hypotheses; one that ends in a stop token is set aside as finished. The search
    ends at max_new_tokens, or once num_beams hypotheses are finished and no running one scores
    better than the worst of them so far. No randomness: the same input gives the same output.
    It keeps its own loop: every step reorders the beams' cache rows, which the Engine never does.
    """
    if idx.size(0) != 1 or idx.size(1) == 0 or num_beams < 1:
        raise ValueError(f"beam_search takes one non-empty prompt (1, T) and num_beams >= 1; "
                         f"got {tuple(idx.shape)} and {num_beams}")
    T = idx.size(1)
    stop = set(stop_tokens)
    tokens = idx.repeat(num_beams, 1)  # (beams, n): every beam starts as the prompt ...
    scores = torch.full((num_beams,), float("-inf"), device=idx.device)
    scores[0] = 0.0  # ... but only beam 0 is live, so the first step does not pick duplicates
    kv_cache = KVCache(model.config.n_layer, model.config.block_size, num_beams, idx.device)
    finished = []  # (score, new tokens without the stop token)
    with eval_mode(model):
        for n in range(T, T + max_new_tokens):
            logprobs = F.log_softmax(next_logits(model, tokens, n, kv_cache).float(), dim=-1)  # (beams, V)
            V = logprobs.size(-1)
            totals = (scores[:, None] + logprobs).view(-1)
            # Enough candidates that num_beams survive even if every beam's best ones are stop tokens.
            top, flat = totals.topk(min(num_beams * (1 + len(stop)), totals.numel()))
            length_norm = (n + 1 - T) ** length_penalty
            rows, new_tokens, new_scores = [], [], []
            for total, i in zip(top.tolist(), flat.tolist()):
                row, token = divmod(i, V)
                if token in stop:
                    if total > float("-inf"):
                        finished.append((total / length_norm, tokens[row, T:n].tolist()))
                elif len(rows) < num_beams:
                    rows.append(row)
                    new_tokens.append(token)
                    new_scores.append(total)
            rows = torch.tensor(rows, device=idx.device)
            # Each step copies the kept beams anyway, so they grow by one column as they go: nothing
            # is allocated for max_new_tokens up front (a huge one means "until a stop token").
            tokens = torch.cat([tokens[rows], torch.tensor(new_tokens, device=idx.device)[:, None]], dim=1)
            scores = torch.tensor(new_scores, device=idx.device)
            kv_cache.reorder(rows)
            if len(finished) >= num_beams:
                worst_kept = sorted(s for s, _ in finished)[-num_beams]
                if scores.max().item() / length_norm < worst_kept:
                    break
        else:
            length_norm = max(max_new_tokens, 1) ** length_penalty
            finished += [(s / length_norm, tokens[i, T:].tolist()) for i, s in enumerate(scores.tolist())]
    if not finished:
        return []
    return max(finished, key=lambda f: f[0])[1]  # max keeps the first of equal scores: deterministic


# -----------------------------------------------------------------------------
# From tokens to text

def holdback(text, stop):
    """How many characters at the end of `text` could be the start of `stop` (not shown yet)."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


def shown_tokens(tokenizer, tokens, shown):
    """Tokens for `shown`, a prefix of decode(tokens): the whole tokens whose text it holds, then
    the rest of it encoded anew (the token that completed a stop string holds text never shown)."""
    k = 0
    while k < len(tokens) and shown.startswith(tokenizer.decode(tokens[:k + 1])):
        k += 1
    return tokens[:k] + tokenizer.encode(shown[len(tokenizer.decode(tokens[:k])):])


class TextStream:
    """The text of generated tokens, handed out as soon as it is final.

        text = TextStream(tokenizer, stops=["\\n\\n"])
        for token in tokens:
            show(text.add(token))      # '' while the text may end in half a character or a stop's start
            if text.stopped:           # the text reached a stop string: generate no more
                break
        show(text.finish())            # what was held back, up to the stop string

    `tokens` holds every token added; `start` indexes the first one whose text is not all shown,
    and `shown` counts the characters of decode(tokens[start:]) already handed out.
    """

    def __init__(self, tokenizer, stops=()):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.tokens, self.start, self.shown = [], 0, 0
        self.stopped = False

    def add(self, token):
        """Add one generated token; returns the text it makes final ('' if none)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens[self.start:])
        if self._stop_at(text) is not None:
            self.stopped = True
            return ""
        if text.endswith("\ufffd"):  # maybe half a character: wait for the next token
            return ""
        delta = self._take(text[:len(text) - max((holdback(text, s) for s in self.stops), default=0)])
        if self.shown == len(text):  # nothing held back: no stop string can begin before here
            self.start, self.shown = len(self.tokens), 0
        return delta

    def finish(self):
        """The text not handed out yet (held back, or an unfinished character), cut at a stop string."""
        text = self.tokenizer.decode(self.tokens[self.start:])
        cut = self._stop_at(text)
        return self._take(text if cut is None else text[:cut])

    def shown_tokens(self):
        """The tokens of the text handed out so far (a conversation's context keeps these)."""
        text = self.tokenizer.decode(self.tokens[self.start:])
        return self.tokens[:self.start] + shown_tokens(self.tokenizer, self.tokens[self.start:], text[:self.shown])

    def _stop_at(self, text):
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _take(self, text):
        delta = text[self.shown:]
        self.shown = max(self.shown, len(text))
        return delta
