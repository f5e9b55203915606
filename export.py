"""Export a trained model to the tools people deploy with: Hugging Face, ONNX Runtime, llama.cpp.

    python export.py out-small --to hf --out gpt-hf          # a transformers folder, tokenizer included
    python export.py out-small --to onnx --out gpt-onnx      # model.onnx + decoder.onnx (KV cache) + tokenizer
    python export.py out-small/best.pt --to gguf --out gpt.gguf --quant q8_0   # one file for llama.cpp

CKPT is a checkpoint or a training run's folder (its best.pt, else ckpt.pt), as in sample.py.
The tokenizer always travels with the weights. Every output is written under a temporary name
and renamed when complete: an interrupted export leaves nothing half-written at --out.
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

from common import ArgumentParser, UserError, run_main
from engine import find_checkpoint, is_hf_folder
from gpt import load_checkpoint, model_from_checkpoint
from tokenizer import load_tokenizer

FORMATS = ("hf", "onnx", "gguf")
GGUF_QUANTS = ("f32", "f16", "q8_0")


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", metavar="CKPT", help="a checkpoint file, or a training run's folder (best.pt, else ckpt.pt)")
    p.add_argument("--to", required=True, choices=FORMATS, help="hf: a Hugging Face folder; onnx: ONNX graphs "
                   "for onnxruntime; gguf: one file for llama.cpp")
    p.add_argument("--out", required=True, metavar="PATH", help="the folder (hf, onnx) or file (gguf) to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="weights' precision (default float32)")
    p.add_argument("--quant", choices=GGUF_QUANTS, help="gguf only: f32, f16 or q8_0 (default: from --dtype)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def load_for_export(ckpt):
    """(model in fp32 on the CPU, its tokenizer, the checkpoint path) for CKPT."""
    path = Path(ckpt)
    if path.is_dir() and not is_hf_folder(path):
        path = find_checkpoint(None, path)
    elif not path.exists():
        raise UserError(f"{ckpt}: no such checkpoint file or run folder")
    elif path.is_dir():
        raise UserError(f"{ckpt} is a Hugging Face folder already; export.py reads checkpoints of train.py")
    checkpoint = load_checkpoint(path)
    if not checkpoint.get("tokenizer"):
        raise UserError(f"{path} carries no tokenizer; it was not written by train.py")
    model = model_from_checkpoint(checkpoint).eval()
    return model, load_tokenizer(checkpoint["tokenizer"]), path


def write_atomically(out, force, write):
    """write(tmp) the export at a temporary sibling of `out` (a file or a folder), then move it to
    `out`: replacing an existing `out` only with --force, and leaving nothing behind on failure.
    Returns what write returns."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to replace it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        result = write(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return result


# -----------------------------------------------------------------------------
# Hugging Face


def export_hf(model, tokenizer, out, dtype):
    """A transformers GPT-2 folder at `out`: config.json, model.safetensors and the tokenizer.
    Returns the line that says how to run it."""
    raise UserError("--to hf is not built yet")


# -----------------------------------------------------------------------------
# ONNX


def export_onnx(model, tokenizer, out, dtype):
    """model.onnx (logits of whole sequences), decoder.onnx (one step with the KV cache as inputs
    and outputs) and the tokenizer, in the folder `out`. Returns the line that says how to run it."""
    raise UserError("--to onnx is not built yet")


# -----------------------------------------------------------------------------
# GGUF


def export_gguf(model, tokenizer, out, quant):
    """One GGUF file at `out` for llama.cpp (its gpt2 architecture), the tokenizer embedded.
    Returns the line that says how to run it."""
    raise UserError("--to gguf is not built yet")


def main():
    args = parse_args(sys.argv[1:])
    if args.quant and args.to != "gguf":
        raise UserError(f"--quant applies to --to gguf, not --to {args.to}")
    out = Path(args.out)
    if out.exists() and not args.force:  # before loading anything: the cheapest mistake first
        raise UserError(f"{out} exists; pass --force to replace it")
    model, tokenizer, path = load_for_export(args.ckpt)
    if args.to == "hf":
        how = write_atomically(out, args.force, lambda tmp: export_hf(model, tokenizer, tmp, args.dtype))
    elif args.to == "onnx":
        how = write_atomically(out, args.force, lambda tmp: export_onnx(model, tokenizer, tmp, args.dtype))
    else:
        quant = args.quant or {"float32": "f32", "float16": "f16"}[args.dtype]
        how = write_atomically(out, args.force, lambda tmp: export_gguf(model, tokenizer, tmp, quant))
    print(f"wrote {out} from {path}: {how}")


if __name__ == "__main__":
    run_main(main)
