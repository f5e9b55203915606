"""Throughput benchmarks; each mode prints its figures (tests never assert speed).

    python bench.py decode    # tokens/s of each weight format beside llama.cpp's, and of each kernel alone
    python bench.py step      # decode steps eager vs compiled (Engine(compile=True)), per weight format
    python bench.py prepare   # prepare.py MB/s vs one tiktoken thread, peak RSS; Korean BPE training
    python bench.py train     # training tokens/s and MFU: fp32 / bf16 / compile / Muon vs nanoGPT
    python bench.py optim     # AdamW vs Muon to a fixed number of tokens: steps and time to a loss, curves
    python bench.py serve     # serve.py: time to first token, tokens/s for 1, 4, 16 streaming clients
    python bench.py memory    # bytes per GPU of GPT-2 small..XL: DDP / FSDP, with or without checkpointing
    python bench.py gpu       # on one CUDA GPU: bf16/fp16 training, FSDP, checkpointing, KV-cache decoding

Every timed figure is the median of --repeats timed runs after one untimed warm-up run; the methods
compared take turns (one run of each per round), so a load change on a shared machine hits all alike.
`memory` computes (it times nothing); `optim` and `gpu` run train.py itself, as a user does, and reads its log.
"""
import argparse
import copy
import http.client
import json
import math
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from unittest import mock
from pathlib import Path

import numpy as np
import torch

import tokenizer
from common import (DTYPE_NAMES, ArgumentParser, UserError, autocast_context, cpu_flags, maybe_compile,
                    measure_peak_flops, pyplot, resolve_device, run_main, save_figure, sync)
from engine import (INT4_GROUP_SIZE, WEIGHT_FORMATS, choose_weights, generate, generate_stream, load_model,
                    quantize, weight_bytes)
from gpt import GPT, GPTConfig, save_checkpoint

ROOT = Path(__file__).resolve().parent


def median_seconds(fns, repeats):
    """{name: fn} -> ({name: median wall time of fn()}, {name: fn's last result}) over `repeats`
    rounds, each fn once per round, after one untimed round (allocator, caches, lazy init)."""
    times, results = {name: [] for name in fns}, {}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn()
            if round_ > 0:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, results


# ----------------------------------------------------------------------------------------------
# decode


@torch.inference_mode()
def recompute_decode(model, idx, max_new_tokens):
    """Greedy decoding without a cache, the baseline: each step runs the whole (cropped) context."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return idx[:, -max_new_tokens:]


def load_hf_copy(model, args):
    """(the same weights as a transformers GPT2LMHeadModel, None), or (None, why there is none)."""
    if args.no_hf:
        return None, "--no_hf"
    if args.prompt_tokens + args.new_tokens > args.block_size:
        return None, "the context passes block_size, and HF's GPT-2 cannot slide its window"
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        return None, "transformers is not importable"
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return GPT2LMHeadModel.from_pretrained(tmp).eval(), None


@torch.inference_mode()
def hf_greedy(hf, idx, max_new_tokens):
    """Hugging Face generate, greedy with its KV cache; exactly max_new_tokens new tokens."""
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=max_new_tokens,
                      min_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                      pad_token_id=0)
    return out[:, idx.size(1):]


def export_checkpoint(model, folder):
    """`model` saved as a checkpoint for export.py, with a tokenizer of its vocabulary size that every
    format can carry: GPT-2's for 50,257 tokens, else single-byte characters (up to 128)."""
    V = model.config.vocab_size
    if V == 50257:
        tok = {"kind": "gpt2", "vocab_size": V, "eot_id": 50256}
    elif V <= 128:
        tok = {"kind": "char", "vocab_size": V, "eot_id": None, "chars": [chr(i) for i in range(V)]}
    else:
        return None
    path = Path(folder) / "model.pt"
    save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config), config={}, tokenizer=tok), path)
    return path


def export(ckpt, to, *flags):
    """Run export.py (bench.py imports no other script) on ckpt; the path it wrote."""
    out = ckpt.parent / "-".join([to, *flags[1::2]])
    result = subprocess.run([sys.executable, ROOT / "export.py", ckpt, "--to", to, "--out", out, *flags],
                            capture_output=True, text=True)
    if result.returncode:
        raise UserError(f"export.py --to {to} failed: {result.stderr.strip().splitlines()[-1]}")
    return out


def onnx_session(folder, threads):
    """An onnxruntime session of export.py's model.onnx, CPU provider, `threads` threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])


def onnx_greedy(session, idx, max_new_tokens):
    """Greedy decoding with model.onnx's KV cache: the prompt idx (1, T) with empty pasts, then one
    token per step with the presents as the pasts (T + max_new_tokens <= block_size)."""
    past_inputs = session.get_inputs()[1:]
    _, n_head, _, head_size = past_inputs[0].shape
    past = [np.zeros((1, n_head, 0, head_size), np.float32) for _ in past_inputs]
    x, tokens = idx.numpy(), []
    for _ in range(max_new_tokens):
        logits, *past = session.run(None, {"input_ids": x, **{i.name: p for i, p in zip(past_inputs, past)}})
        x = logits[:, -1:].argmax(-1)  # (1, 1): the next step's input
        tokens.append(int(x[0, 0]))
    return tokens


def llama_cpp_greedy(path, idx, max_new_tokens, threads):
    """Greedy decoding in llama.cpp (llama-cpp-python) of export.py's GGUF file: a function returning
    the max_new_tokens tokens after the prompt idx (1, T), prefilling it on every call as the other
    methods do (T + max_new_tokens <= block_size)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=0, n_threads=threads, n_threads_batch=threads,
                          verbose=False)  # n_ctx 0: the file's context length, block_size
    prompt = idx[0].tolist()

    def greedy():
        llm.reset()  # an empty cache, else generate reuses the last call's prompt
        tokens = []
        for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
            tokens.append(token)
            if len(tokens) == max_new_tokens:
                return tokens

    return greedy


def gguf_bytes_per_token(path):
    """The bytes of a GGUF file's tensors that llama.cpp reads for one token: all but the position
    embeddings, of which it reads one row (the token embeddings are also its output head)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name != "position_embd.weight")


GGUF_QUANTS = ("f32", "f16", "q8_0", "q4_0")


def exported_methods(model, idx, N, folder, threads):
    """({name: greedy decoding}, {name: bytes read per token}, {name: why not}) for the exports of
    `model` that can run here: export.py's ONNX graph in onnxruntime, its GGUF files in llama.cpp."""
    methods, sizes, skipped = {}, {}, {}
    if idx.size(1) + N > model.config.block_size:
        return methods, sizes, {"exports": "the context passes block_size, and the exported graphs do not slide it"}
    ckpt = export_checkpoint(model, folder)
    if ckpt is None:
        return methods, sizes, {"exports": "a vocabulary of neither 50,257 nor <= 128 tokens has no tokenizer to export"}
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        skipped["onnxruntime"] = "pip install onnx onnxscript onnxruntime"
    else:
        session = onnx_session(export(ckpt, "onnx"), threads)
        methods["onnxruntime"] = lambda: onnx_greedy(session, idx, N)
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError:
        skipped["llama.cpp"] = "pip install gguf llama-cpp-python"
    else:
        for quant in GGUF_QUANTS:
            path = export(ckpt, "gguf", "--quant", quant)
            methods[f"llama.cpp-{quant}"] = llama_cpp_greedy(path, idx, N, threads)
            sizes[f"llama.cpp-{quant}"] = gguf_bytes_per_token(path)
    return methods, sizes, skipped


# Each of our formats beside its llama.cpp counterpart, and the speed it is held to against it.
COUNTERPARTS = {"fp32": ("llama.cpp-f32", 0.6), "bf16": ("llama.cpp-f16", 0.8), "fp16": ("llama.cpp-f16", 0.8),
                "int8": ("llama.cpp-q8_0", 0.6), "int4": ("llama.cpp-q4_0", 0.6), "auto": ("llama.cpp-q8_0", 0.9)}
# The methods that compute in fp32 on fp32 weights: their greedy tokens are one sequence.
FP32_METHODS = ("fp32", "fp32-compiled", "recompute", "hf-generate", "onnxruntime", "llama.cpp-f32")
READ_BYTES = 256 * 2**20  # the sequential read: far past any cache
KERNEL_REPEATS = 20


def read_bytes_per_s(repeats=20, nbytes=READ_BYTES):
    """The machine's sequential read speed, bytes/s: summing an fp32 tensor of `nbytes` (every thread
    reads its share, as a matmul's weights are read), the fastest of `repeats` (the speed the memory
    gives when nothing else takes a share)."""
    x = torch.ones(nbytes // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / min(times)


def decode_matmuls(model):
    """The Linears one decoded token runs through, in order: each block's four, then the head."""
    return [lin for block in model.transformer.h for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc,
                                                              block.mlp.c_proj)] + [model.lm_head]


@torch.inference_mode()
def kernel_seconds(model, fmt, group_size, repeats):
    """(median seconds, bytes) of the weight matmuls alone of one decoded token in format `fmt`, for a
    copy of `model`: each Linear's kernel as the engine calls it for one row (fp32: oneDNN's product
    on the blocks' packed weights, x @ W on the head's transposed one; F.linear for fp16/bf16,
    _weight_int8pack_mm, _weight_int4pack_mm_for_cpu) with its bias, and the bytes of the weights
    and scales they read."""
    m = quantize(copy.deepcopy(model), fmt, group_size)
    dtype = WEIGHT_FORMATS[fmt]
    calls, nbytes = [], 0
    for lin in decode_matmuls(m):
        x = torch.randn(1, lin.in_features, dtype=dtype)
        if isinstance(lin, torch.nn.Linear):
            calls.append(lambda lin=lin, x=x: torch.nn.functional.linear(x, lin.weight, lin.bias))
        else:
            calls.append(lambda lin=lin, x=x: lin.one_token(x))
        nbytes += sum(t.numel() * t.element_size() for name, t in [*lin.named_parameters(), *lin.named_buffers()]
                      if name != "bias")
    times = []
    for round_ in range(repeats + 1):
        t0 = time.perf_counter()
        for call in calls:
            call()
        if round_:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), nbytes


def decode(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(args.seed)
    config = GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (1, args.prompt_tokens))
    N = args.new_tokens
    hf, hf_skipped = load_hf_copy(model, args)
    folder = tempfile.TemporaryDirectory()
    exports, sizes, exports_skipped = ({}, {}, {"exports": "--no_exports"}) if args.no_exports else \
        exported_methods(model, idx, N, Path(folder.name), threads)
    # auto measures here and now, between the same processes as the rounds, not a choice cached before
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, GPT_CACHE_DIR=cache):
        auto, auto_note = choose_weights(model, "cpu")
    formats = list(dict.fromkeys([*args.weights, auto]))  # auto's choice is timed though not asked for
    models = {fmt: quantize(copy.deepcopy(model), fmt, args.group_size) for fmt in formats if fmt != "fp32"}
    models["fp32"] = quantize(copy.deepcopy(model), "fp32")  # also recompute's; Hugging Face's copy is its own
    print(f"decode: {model.num_params() / 1e6:.1f}M params, batch 1, {args.prompt_tokens}-token prompt, "
          f"{N} new tokens (greedy), median of {args.repeats} interleaved rounds; {machine()}")
    methods = {fmt: lambda m=models[fmt]: generate(m, idx, N, temperature=0)[0] for fmt in formats}
    sizes |= {fmt: weight_bytes(models[fmt]) for fmt in formats}
    compiled = args.weights if args.compile else []  # compiled in the untimed first round
    methods |= {f"{fmt}-compiled": lambda m=models[fmt]: generate(m, idx, N, temperature=0, compile=True)[0]
                for fmt in compiled}
    sizes |= {f"{fmt}-compiled": sizes[fmt] for fmt in compiled}
    if not args.no_recompute:
        methods["recompute"] = lambda: recompute_decode(models["fp32"], idx, N)[0].tolist()
    if hf is not None:
        methods["hf-generate"] = lambda: hf_greedy(hf, idx, N)[0].tolist()
    methods |= exports
    read = read_bytes_per_s()
    try:
        seconds, outputs = median_seconds(methods, args.repeats)
    finally:
        folder.cleanup()
    read = max(read, read_bytes_per_s())  # the faster of two, one on each side of the rounds
    print(f"  memory read: {read / 1e9:.1f} GB/s (the fastest sum of a {READ_BYTES // 2**20} MB fp32 tensor); "
          f"auto picks {auto} ({auto_note})")
    for name, s in seconds.items():
        row = f"  {name:<15} {N / s:8.1f} tokens/s  ({1000 * s / N:.2f} ms/token)"
        if name in sizes:
            row += f"  {sizes[name] / 1e6:9.3f} MB/token  {100 * sizes[name] * N / s / read:5.1f}% of read"
        print(row)
    for name in [*args.weights, *(f"{fmt}-compiled" for fmt in compiled), "auto"]:
        theirs, target = COUNTERPARTS[name.removesuffix("-compiled")]
        if theirs in seconds:
            ours = seconds[auto if name == "auto" else name]
            print(f"  {name} vs {theirs}: {seconds[theirs] / ours:.2f}x (target {target}x)")
    for name in ("recompute", "hf-generate", "onnxruntime"):
        if name in seconds:
            print(f"  fp32 vs {name}: {seconds[name] / seconds['fp32']:.2f}x")
    if hf is None:
        print(f"  hf-generate: skipped ({hf_skipped})")
    for name, why in exports_skipped.items():
        print(f"  {name}: skipped ({why})")
    if "fp32" in outputs:
        same = all(outputs[name] == outputs["fp32"] for name in FP32_METHODS if name in outputs)
        print(f"  same tokens from every fp32 method: {'yes' if same else 'NO'}")
        # Other number formats may part from fp32's greedy path at a near-tie.
        for name in [name for name in outputs if name not in FP32_METHODS]:
            agree = next((i for i, (a, b) in enumerate(zip(outputs[name], outputs["fp32"])) if a != b), N)
            print(f"  {name}: the first {agree} of {N} tokens are fp32's")
    print(f"  kernels alone: the {len(decode_matmuls(model))} weight matmuls of one token, median of "
          f"{KERNEL_REPEATS}")
    for fmt in formats:
        s, nbytes = kernel_seconds(model, fmt, args.group_size, KERNEL_REPEATS)
        print(f"  kernel {fmt:<6} {1000 * s:8.3f} ms  {nbytes / 1e6:9.3f} MB  {nbytes / s / 1e9:6.2f} GB/s  "
              f"{100 * nbytes / s / read:5.1f}% of read")



def decode_step_bench(args):
    """Eager against compiled decode steps (Engine(compile=True): engine.compiled_decode_rows) for
    each weight format: tokens/s of one greedy decode, interleaved rounds, and the seconds the first
    compiled decode takes (compiling included)."""
    torch.manual_seed(args.seed)
    config = GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (1, args.prompt_tokens))
    N = min(args.new_tokens, config.block_size - args.prompt_tokens)  # past block_size every token is a prefill
    print(f"step: {model.num_params() / 1e6:.1f}M params, batch 1, {args.prompt_tokens}-token prompt, {N} new "
          f"tokens (greedy), median of {args.repeats} interleaved rounds; {machine()}")
    methods, compile_s = {}, {}
    for fmt in args.weights:
        m = quantize(copy.deepcopy(model), fmt)
        t0 = time.perf_counter()
        generate(m, idx, N, temperature=0, compile=True)
        compile_s[fmt] = time.perf_counter() - t0
        methods[f"{fmt} eager"] = lambda m=m: generate(m, idx, N, temperature=0)[0]
        methods[f"{fmt} compiled"] = lambda m=m: generate(m, idx, N, temperature=0, compile=True)[0]
    seconds, outputs = median_seconds(methods, args.repeats)
    for fmt in args.weights:
        eager, compiled = seconds[f"{fmt} eager"], seconds[f"{fmt} compiled"]
        agree = next((i for i, (a, b) in enumerate(zip(outputs[f"{fmt} eager"], outputs[f"{fmt} compiled"]))
                      if a != b), N)
        print(f"  {fmt:<5} eager {1000 * eager / N:7.3f} ms/token, compiled {1000 * compiled / N:7.3f} ms/token: "
              f"{eager / compiled:.2f}x; first compiled decode {compile_s[fmt]:.1f} s; "
              f"the first {agree} of {N} tokens agree")


# ----------------------------------------------------------------------------------------------
# prepare

SHARED = Path(__file__).resolve().parent.parent / "shared"  # test corpora, beside the project root


def repeat_to_size(src: Path, dst: Path, mb: float) -> int:
    """Write src over and over into dst until it holds at least `mb` MB; returns the copies."""
    data = src.read_bytes()
    copies = max(1, math.ceil(mb * 1e6 / len(data)))
    with open(dst, "wb") as f:
        for _ in range(copies):
            f.write(data)
    return copies


def run_child(cmd) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds, peak RSS (MB) and output of a child process and its workers.
    The peak is the sum of their VmHWMs, polled from /proc until the child exits (the child's own
    ru_maxrss would count this process's pages from before exec)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, text=True)
        peak_kb = 0
        while proc.poll() is None:
            peak_kb = max(peak_kb, tree_hwm_kb(proc.pid))
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        log.seek(0)
        output = log.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{output}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the workers it waited for
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, cpu, peak_kb / 1024, output


def tree_hwm_kb(pid: int) -> int:
    """Sum of the peak RSS (VmHWM) of a process and all its descendants, from /proc (0 if gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        children = " ".join(p.read_text() for p in Path(f"/proc/{pid}/task").glob("*/children")).split()
    except OSError:
        return 0
    hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
    return (int(hwm.group(1)) if hwm else 0) + sum(tree_hwm_kb(int(c)) for c in children)


def single_thread_encode(corpus: Path) -> tuple[float, int]:
    """Seconds inside tiktoken's encode_ordinary on one thread over the corpus (in the pieces
    prepare.py cuts, which encode exactly like the whole; reading is not timed), and the tokens."""
    enc = tokenizer.gpt2_encoding()
    seconds, n = 0.0, 0
    for _, text in tokenizer.iter_pieces([corpus.read_text(encoding="utf-8"), None]):  # one document
        t0 = time.perf_counter()
        n += len(enc.encode_ordinary(text))
        seconds += time.perf_counter() - t0
    return seconds, n


def prepare_throughput(args):
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "shakespeare_repeated.txt"
        copies = repeat_to_size(args.shakespeare, corpus, args.mb)
        mb = corpus.stat().st_size / 1e6
        print(f"prepare: GPT-2 BPE over {mb:,.1f} MB (tiny shakespeare x{copies}), {args.workers} workers, "
              f"{os.cpu_count()} cores; median of {args.repeats} rounds (no warm-up: the corpus is in the page cache)")
        cmd = [sys.executable, ROOT / "prepare.py", "--input", corpus, "--tokenizer", "gpt2", "--out",
               Path(tmp) / "out", "--workers", args.workers]
        runs, singles = [], []
        for _ in range(args.repeats):  # take turns, so a load change on a shared machine hits both
            runs.append(run_child(cmd))
            singles.append(single_thread_encode(corpus))
        meta = json.loads((Path(tmp) / "out" / "meta.json").read_text(encoding="utf-8"))
    seconds, cpu = (statistics.median(r[i] for r in runs) for i in (0, 1))
    rss = max(r[2] for r in runs)
    single, n = statistics.median(s[0] for s in singles), singles[0][1]
    print(f"  prepare.py          {mb / seconds:6.1f} MB/s  ({seconds:.1f} s wall for the whole run, {cpu:.1f} s CPU; "
          f"peak RSS {rss:.0f} MB)")
    print(f"  encode_ordinary x1  {mb / single:6.1f} MB/s  ({single:.1f} s inside tiktoken, one thread)")
    print(f"  prepare.py / single-thread encode_ordinary: {single / seconds:.2f}x "
          f"(its CPU: {cpu / single:.2f}x the single thread's)")
    same = meta["tokens"]["train"] + meta["tokens"]["val"] == n
    print(f"  same token count: {'yes' if same else 'NO'} ({n:,})")


def write_record_files(src: Path, folder: Path, mb: float, chars: int = 2000) -> dict[str, Path]:
    """src cut into records of `chars` characters, repeated to about `mb` MB of text, as JSON Lines
    and as Parquet (row groups of 10,000 rows), each record a document; written a chunk at a time."""
    text = src.read_text(encoding="utf-8")
    records = [text[i:i + chars] for i in range(0, len(text), chars)]
    copies = max(1, math.ceil(mb * 1e6 / len(text.encode())))
    paths = {"jsonl": folder / "records.jsonl", "parquet": folder / "records.parquet"}
    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        for _ in range(copies):
            f.writelines(json.dumps({"text": r}, ensure_ascii=False) + "\n" for r in records)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        print("  (Parquet skipped: pip install pyarrow)")
        del paths["parquet"]
        return paths
    with pq.ParquetWriter(paths["parquet"], pa.schema([("text", pa.string())])) as writer:
        for _ in range(copies):
            writer.write_table(pa.table({"text": records}), row_group_size=10_000)
    return paths


def records_throughput(args):
    """prepare.py over the same text as records: MB/s of the file and the peak RSS, which stays near
    plain text's whatever the file's size (records stream in blocks and record batches)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_record_files(args.shakespeare, Path(tmp), args.mb)
        for kind, path in paths.items():
            mb = path.stat().st_size / 1e6
            cmd = [sys.executable, ROOT / "prepare.py", "--input", path, "--tokenizer", "gpt2", "--out",
                   Path(tmp) / f"out_{kind}", "--workers", args.workers]
            runs = [run_child(cmd) for _ in range(args.repeats)]
            seconds, cpu = (statistics.median(r[i] for r in runs) for i in (0, 1))
            rss = max(r[2] for r in runs)
            print(f"  {kind + ' records':<19} {mb / seconds:6.1f} MB/s  ({mb:,.1f} MB file, {seconds:.1f} s wall, "
                  f"{cpu:.1f} s CPU; peak RSS {rss:.0f} MB)")


def bpe_training(args):
    """Train on the first 90% of the Korean lines, measure characters per token on the rest."""
    text = args.korean.read_text(encoding="utf-8")[:args.korean_chars]
    lines = text.split("\n")
    cut = int(len(lines) * 0.9)
    train, held = lines[:cut], "\n".join(lines[cut:])
    t0 = time.perf_counter()
    bpe = tokenizer.bpe_tokenizer(tokenizer.train_bpe(iter(train), args.vocab_size))
    seconds = time.perf_counter() - t0
    print(f"bpe: trained on {cut:,} lines ({sum(map(len, train)) / 1e6:.1f} M chars) of {args.korean.name}, "
          f"vocab_size {bpe.vocab_size:,}: {seconds:.1f} s")
    gpt2 = tokenizer.gpt2_encoding()
    print(f"  chars/token on {len(lines) - cut:,} held-out lines: {len(held) / len(bpe.encode(held)):.2f} "
          f"(GPT-2 BPE: {len(held) / len(gpt2.encode_ordinary(held)):.2f})")


def prepare_bench(args):
    if (SHARED / "tiktoken").is_dir():  # GPT-2's BPE files without network, as in tests/conftest.py
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))
    if not args.shakespeare.is_file():
        raise UserError(f"{args.shakespeare} not found: pass --shakespeare PATH (tiny shakespeare's input.txt)")
    prepare_throughput(args)
    records_throughput(args)
    if args.korean.is_file():
        bpe_training(args)
    else:
        print(f"bpe: skipped ({args.korean} not found)")

# ----------------------------------------------------------------------------------------------
# train

TRAIN_SHAPES = {
    # nanoGPT's "baby GPT", its recipe for CPUs (nanoGPT's README, shakespeare_char)
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    # nanoGPT's shakespeare_char GPU recipe: 10.6M parameters
    "10M": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=16),
}
# (dtype, torch.compile, our model as GPT-2 has it, optimizer). The first is the reference, nanoGPT
# as it trains on a CPU: fp32 with no autocast, eager, torch's default (foreach) AdamW, and nanoGPT's
# model, which differs from GPT-2's in two ways that cost time: no biases (its train.py's
# default) and the exact erf GELU (nn.GELU()), where GPT-2 has the tanh approximation. "muon" is
# train.py's optimizer=muon: Muon for the Blocks' matrices (Newton-Schulz in the run's dtype), AdamW
# for the rest.
TRAIN_VARIANTS = {
    "nanoGPT": (torch.float32, False, False, "adamw"),
    "fp32": (torch.float32, False, True, "adamw"),
    "bf16": (torch.bfloat16, False, True, "adamw"),
    "fp32+compile": (torch.float32, True, True, "adamw"),
    "bf16+compile": (torch.bfloat16, True, True, "adamw"),
    "fp32+muon": (torch.float32, False, True, "muon"),
    "bf16+muon": (torch.bfloat16, False, True, "muon"),
}


def nanogpt_model(config: GPTConfig) -> GPT:
    """Our GPT with nanoGPT's two differences: bias=False and the exact GELU."""
    model = GPT(GPTConfig(**{**config.__dict__, "bias": False}))
    for block in model.transformer.h:
        block.mlp.gelu = torch.nn.GELU()
    return model


def train_steps_fn(shape, vocab_size, dtype, compile, ours, device, steps, optimizer="adamw"):
    """A function that runs `steps` optimizer steps (fwd, bwd, clip, AdamW or Muon) on a fresh
    model: ours (GPT-2's architecture, fused AdamW) or nanoGPT's reference."""
    torch.manual_seed(0)
    B, T = shape["batch_size"], shape["block_size"]
    config = GPTConfig(vocab_size=vocab_size, **{k: v for k, v in shape.items() if k != "batch_size"})
    model = GPT(config) if ours else nanogpt_model(config)
    model.to(device)
    muon = dict(lr=0.02, ns_dtype=dtype) if optimizer == "muon" else None  # Newton-Schulz as train.py runs it
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), device.split(":")[0], muon)
    if not ours:
        optimizer = torch.optim.AdamW(optimizer.param_groups, lr=1e-3, betas=(0.9, 0.99))
    ctx = autocast_context(device, dtype)
    step_model = maybe_compile(model, device, ctx, B, T) if compile else model  # as train.py compiles
    x = torch.randint(0, vocab_size, (B, T), device=device)
    y = torch.randint(0, vocab_size, (B, T), device=device)

    def run_steps():
        for _ in range(steps):
            with ctx:
                _, loss = step_model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)

    return run_steps, model.flops_per_token() * B * T


def train_bench(args):
    device = resolve_device(args.device)
    variants = {name: v for name, v in TRAIN_VARIANTS.items()
                if not (v[1] and args.no_compile) and not (v[0] == torch.bfloat16 and args.no_bf16)}
    peaks = {dtype: measure_peak_flops(device, dtype) for dtype, *_ in variants.values()}
    print(f"train: fwd+bwd+clip+optimizer on {device}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, vocab {args.vocab_size}; median of {args.repeats} rounds of "
          f"{args.steps} steps (compilation in the untimed first round)")
    print("  measured matmul peak: " + ", ".join(
        f"{str(d).removeprefix('torch.')} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))
    for shape_name in args.shapes:
        shape = TRAIN_SHAPES[shape_name]
        print(f"  {shape_name}: " + ", ".join(f"{k} {v}" for k, v in shape.items()))
        fns, flops = {}, {}
        for name, (dtype, compile, ours, optimizer) in variants.items():
            fns[name], flops[name] = train_steps_fn(shape, args.vocab_size, dtype, compile, ours,
                                                    device, args.steps, optimizer)
        seconds, _ = median_seconds(fns, args.repeats)
        reference = next(iter(seconds))
        for name, (dtype, _, _, optimizer) in variants.items():
            step = seconds[name] / args.steps
            tokens_per_s = shape["batch_size"] * shape["block_size"] / step
            print(f"    {name:<13} {optimizer:<6} {step * 1000:8.1f} ms/iter {tokens_per_s:10,.0f} tok/s   MFU "
                  f"{flops[name] / step / peaks[dtype] * 100:5.1f}% of {str(dtype).removeprefix('torch.')} "
                  f"peak   {seconds[reference] / seconds[name]:5.2f}x {reference}")


# ----------------------------------------------------------------------------------------------
# optim: AdamW and Muon trained to the same number of tokens

OPTIM_SHAPES = {  # train.py settings on shakespeare_char; each optimizer runs the same steps
    # config/small.py's model and recipe at batch 16 (its 300 s budget off)
    "small": dict(n_layer=4, n_head=2, n_embd=128, block_size=64, batch_size=16, learning_rate=2.5e-3,
                  min_lr=2.5e-4, beta2=0.99, warmup_iters=200, steps=3000),
    # nanoGPT's shakespeare_char GPU model (10.6M) at a CPU's batch: matmuls, not the optimizer, fill its step
    "6x384": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, learning_rate=1e-3,
                  min_lr=1e-4, beta2=0.99, warmup_iters=50, steps=400),
}
OPTIMIZERS = ("adamw", "muon")


def crossing(evals, target):
    """(steps, training seconds) where the val loss first reaches `target`, interpolated linearly
    between the evaluations around it; None if it never does. evals: (iter, seconds, val_loss)."""
    for (it0, s0, l0), (it1, s1, l1) in zip(evals, evals[1:]):
        if l1 <= target:
            f = (l0 - target) / (l0 - l1) if l0 > target else 0.0
            return it0 + f * (it1 - it0), s0 + f * (s1 - s0)
    return None


def optim_curve(records):
    """(iter, training seconds, val loss) at each evaluation: the seconds are the logged steps'
    (log_interval = eval_interval, so each log line holds the steps since the evaluation before it)."""
    seconds, out = {0: 0.0}, []
    logs = sorted((r["iter"], r["ms_per_iter"]) for r in records if "ms_per_iter" in r)
    last = 0
    for it, ms in logs:
        seconds[it] = seconds[last] + (it - last) * ms / 1000
        last = it
    return [(r["iter"], seconds[r["iter"]], r["val_loss"]) for r in records if "val_loss" in r]


def optim_bench(args):
    """Each shape trains once with AdamW and once with Muon (train.py's optimizer=muon and its
    defaults), the same steps, batches and schedule; the target is the val loss AdamW ends at."""
    print(f"optim: AdamW vs Muon on {args.dataset}, {machine()}; train.py runs, {args.evals} evaluations each "
          f"(20 val batches), the WSD schedule")
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape_name in args.shapes:
            shape = dict(OPTIM_SHAPES[shape_name])
            steps = args.steps or shape["steps"]
            del shape["steps"]
            interval = max(1, steps // args.evals)
            print(f"  {shape_name}: {steps} steps of {shape['batch_size'] * shape['block_size']:,} tokens; "
                  + ", ".join(f"{k} {v}" for k, v in shape.items()))
            for optimizer in OPTIMIZERS:
                settings = dict(shape, optimizer=optimizer, lr_schedule="wsd", dtype=args.dtype, eval_iters=20,
                                eval_interval=interval, log_interval=interval)
                model = {k: settings.pop(k) for k in ("n_layer", "n_head", "n_embd", "block_size")}
                records, error = training_run(settings, False, args.dataset, Path(tmp) / f"{shape_name}-{optimizer}",
                                              steps, model=model, batch_size=settings.pop("batch_size"),
                                              device="cpu")
                if error:
                    raise UserError(f"{shape_name} with {optimizer}: {error}")
                curves[shape_name, optimizer] = optim_curve(records)
            target = curves[shape_name, "adamw"][-1][2]
            print(f"    optimizer  ms/iter  val loss at the end  steps to {target:.4f}  training s to it")
            for optimizer in OPTIMIZERS:
                curve = curves[shape_name, optimizer]
                reached = crossing(curve, target)
                ms = curve[-1][1] / curve[-1][0] * 1000
                to = f"{reached[0]:15,.0f} {reached[1]:17.1f}" if reached else f"{'not reached':>15} {'-':>17}"
                print(f"    {optimizer:<9} {ms:8.1f} {curve[-1][2]:20.4f} {to}")
    if args.plot:
        plot_optim(curves, args.plot)


def plot_optim(curves, path):
    """Val loss against steps and against training seconds, a row per shape, into `path`."""
    plt = pyplot()
    shapes = list(dict.fromkeys(shape for shape, _ in curves))
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 4 * len(shapes)), squeeze=False)
    for row, shape in zip(axes, shapes):
        for optimizer in OPTIMIZERS:
            its, seconds, loss = zip(*curves[shape, optimizer][1:])  # from the first step on: iter 0 is ln(vocab)
            row[0].plot(its, loss, "o-", ms=3, label=optimizer)
            row[1].plot(seconds, loss, "o-", ms=3, label=optimizer)
        row[0].set(xlabel="step", ylabel="val loss", title=f"{shape}: val loss per step")
        row[1].set(xlabel="training seconds (evaluations excluded)", ylabel="val loss", title=f"{shape}: per second")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()  # a row's titles clear the axis labels above them
    save_figure(fig, path)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------
# serve

SERVE_SHAPES = {  # random weights; the tokenizer sets the vocabulary
    "small": dict(n_layer=4, n_head=2, n_embd=128, block_size=64, tokenizer="char"),  # config/small.py, 0.8M
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, tokenizer="gpt2"),  # GPT-2 small, 124M
    "tiny": dict(n_layer=1, n_head=2, n_embd=32, block_size=64, tokenizer="char"),  # for smoke tests
}
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # its 65
PROMPT_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak. You are all resolved rather to die "


def serve_checkpoint(shape_name, folder):
    """A checkpoint of the shape's model with random weights (and its tokenizer), written to folder."""
    shape = dict(SERVE_SHAPES[shape_name])
    kind = shape.pop("tokenizer")
    tok = tokenizer.load_tokenizer("gpt2") if kind == "gpt2" else tokenizer.Tokenizer("char", chars=SHAKESPEARE_CHARS)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, **shape))
    path = Path(folder) / f"{shape_name}.pt"
    save_checkpoint(dict(model=model.state_dict(), model_args=model.config.__dict__, tokenizer=tok.to_dict()), path)
    return path, tok


def start_server(ckpt, device, log, *args):
    """`serve.py --ckpt ckpt ARGS` on 127.0.0.1, a free port: (process, port)."""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--ckpt", str(ckpt), "--port", "0",
                                 "--device", device, *map(str, args)], stdout=f, stderr=f)
    while not (m := re.search(r"at http://127\.0\.0\.1:(\d+)/", Path(log).read_text())):
        if proc.poll() is not None:
            raise UserError(f"serve.py did not start: {Path(log).read_text().strip()}")
        time.sleep(0.1)
    return proc, int(m.group(1))


def stream_completion(port, prompt, max_tokens, seed, n=1):
    """(seconds to the first text, the seconds of each later chunk after the one before it, and
    completion tokens of its n choices) of one streamed completion."""
    body = dict(prompt=prompt, max_tokens=max_tokens, seed=seed, n=n, stream=True, stream_options={"include_usage": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise UserError(f"serve.py answered {response.status}: {response.read().decode()}")
    arrivals, tokens = [], 0
    for line in response:  # server-sent events: `data: {chunk}` lines
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if any(choice["text"] for choice in chunk["choices"]):
                arrivals.append(time.perf_counter() - t0)
            tokens = chunk["usage"]["completion_tokens"] if chunk.get("usage") else tokens
    conn.close()
    return arrivals[0], [b - a for a, b in zip(arrivals, arrivals[1:])], tokens


def serve_round(port, clients, prompt, max_tokens, spread_s=0.0, n=1):
    """One round of `clients` streaming completions (n choices each), started together or, with
    spread_s, one every spread_s / clients seconds: (total tokens/s over the round's wall time,
    times to first token, times between a stream's tokens)."""
    results = [None] * clients

    def client(i):
        time.sleep(i * spread_s / clients)
        results[i] = stream_completion(port, prompt, max_tokens, seed=i, n=n)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return sum(r[2] for r in results) / wall, [r[0] for r in results], [gap for r in results for gap in r[1]]


def percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def engine_alone(ckpt, ids, new_tokens, device, repeats):
    """(first token's seconds, tokens/s after it) of engine.generate_stream on the checkpoint as
    serve.py loads it, in a thread of this process as serve.py's worker runs it: the reference
    without HTTP, JSON and the event loop."""
    model, _, device, ctx, _ = load_model(ckpt, device=device)
    idx = torch.tensor([ids], device=device)
    firsts, rates = [], []

    def run():
        with ctx:
            for i in range(repeats + 1):
                generator = torch.Generator(device).manual_seed(i)
                sync(device)
                t0 = time.perf_counter()
                steps = generate_stream(model, idx, new_tokens, generator=generator)
                next(steps)  # a CPU tensor: the step has finished on the device
                t1 = time.perf_counter()
                for _ in steps:
                    pass
                sync(device)
                if i:
                    firsts.append(t1 - t0)
                    rates.append((new_tokens - 1) / (time.perf_counter() - t1))
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return statistics.median(firsts), statistics.median(rates)


def serve_bench(args):
    print(f"serve.py on {args.device}: {machine()}")
    print(f"each client streams {args.new_tokens} new tokens after a {args.prompt_tokens}-token prompt; burst: "
          f"all clients start at once; spread: one every {args.spread_s:g} s / clients; median of "
          f"{args.repeats} rounds after a warm-up request, each beside a round of 1 client (x 1 client: the "
          f"ratio of their medians); latencies over every stream of those rounds")
    with tempfile.TemporaryDirectory() as folder:
        for shape_name in args.shapes:
            ckpt, tok = serve_checkpoint(shape_name, folder)
            prompt = tok.decode((tok.encode(PROMPT_TEXT * 10))[:args.prompt_tokens])
            print(f"\n  {shape_name}: {SERVE_SHAPES[shape_name]}")
            first, rate = engine_alone(ckpt, tok.encode(prompt), args.new_tokens, args.device, args.repeats)
            print(f"    engine alone (generate_stream, no server): first token {first * 1000:,.0f} ms, "
                  f"then {rate:,.1f} tokens/s")
            print(f"    {'server':<16} {'clients':>7} {'arrivals':>8} {'tokens/s':>9} {'x 1 client':>10} "
                  f"{'first token p50':>15} {'p99':>7} {'per token p50':>13} {'p99':>7}")
            # The reference: --max_batch 1 runs one request at a time, first come first served.
            runs = [(args.max_batch, [(clients, spread) for spread in (0.0, args.spread_s) for clients in args.clients]),
                    (1, [(max(args.clients), 0.0)])]
            for max_batch, rows in runs:
                proc, port = start_server(ckpt, args.device, Path(folder) / "serve.log", "--max_batch", max_batch,
                                          "--max_queue", max(64, *args.clients))
                try:
                    stream_completion(port, prompt, args.new_tokens, seed=0)
                    for clients, spread in rows:
                        # Each round beside a round of one client, so that the ratio compares rounds
                        # run at one time: this shared machine's speed drifts over minutes.
                        singles, rounds = [], []
                        for _ in range(args.repeats):
                            singles.append(serve_round(port, 1, prompt, args.new_tokens)[0])
                            rounds.append(serve_round(port, clients, prompt, args.new_tokens, spread))
                        total = statistics.median(r[0] for r in rounds)
                        firsts, gaps = [t for r in rounds for t in r[1]], [g for r in rounds for g in r[2]]
                        print(f"    {'--max_batch ' + str(max_batch):<16} {clients:>7} {'spread' if spread else 'burst':>8} "
                              f"{total:>9,.1f} {total / statistics.median(singles):>9.2f}x "
                              f"{percentile(firsts, 50) * 1000:>12,.0f} ms {percentile(firsts, 99) * 1000:>4,.0f} ms "
                              f"{percentile(gaps, 50) * 1000:>10,.1f} ms {percentile(gaps, 99) * 1000:>5,.1f} ms")
                finally:
                    proc.terminate()
                    proc.wait()


def machine():
    """The CPU's model and ISA, threads and torch version: what a figure needs beside it."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    isa = torch.backends.cpu.get_cpu_capability() + "".join(
        f" + {name}" for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX")) if flag in cpu_flags())
    return f"{model}, {isa}, {torch.get_num_threads()} threads, torch {torch.__version__}"


# ----------------------------------------------------------------------------------------------
# memory

GPT2_SIZES = {  # (n_layer, n_head, n_embd) of OpenAI's four GPT-2s
    "small": (12, 12, 768), "medium": (24, 16, 1024), "large": (36, 20, 1280), "XL": (48, 25, 1600),
}
STRATEGIES = {  # name: (fsdp, grad_checkpoint), train.py's two settings
    "DDP": (False, False), "DDP + ckpt": (False, True), "FSDP": (True, False), "FSDP + ckpt": (True, True),
}
GB = 1e9
USABLE_SHARE = 0.9  # of a GPU's memory: the CUDA context, NCCL's buffers and the allocator's fragmentation take the rest


def dtype_bytes(dtype):
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def block_saved_bytes(config, T, dtype, device):
    """Bytes per token that autograd saves inside one Block for its backward, in eager PyTorch:
    each LayerNorm's input in fp32 (autocast runs LayerNorm in fp32) and its mean and 1/std; the
    LayerNorms' outputs as the matmuls take them (autocast's copies in `dtype`); attention's q,
    k, v (views of c_attn's output), its output (also c_proj's input) and log-sum-exp; the MLP's
    GELU input and output; a mask per dropout. Fused attention (CUDA's kernels, and a CPU's
    without dropout) saves no (T, T) matrix; a CPU with dropout takes SDPA's math path, which
    saves q and k scaled, a copy of v, the softmax, its dropout mask and the dropped weights.
    On a CPU only fp32 is modelled (gpt.attention changes bf16's precision there)."""
    if device == "cpu" and dtype != "float32":
        raise ValueError("the planner models a CPU in float32 only")
    C, nh, a = config.n_embd, config.n_head, dtype_bytes(dtype)
    mask = 1 if device == "cuda" else a  # CUDA's dropout keeps a bool mask, a CPU's one in the input's dtype
    layer_norms = 2 * (4 * C + 8)
    matmul_inputs = 2 * a * C  # ln_1's and ln_2's outputs, into c_attn and c_fc
    if device == "cuda" or config.dropout == 0:
        attention = 3 * a * C + a * C + 4 * nh  # q, k, v; the output (= c_proj's input); log-sum-exp
    else:
        attention = 4 * a * C + (2 * a + mask) * nh * T  # q, k scaled, v, c_proj's input; softmax, mask, dropped
    mlp = 4 * a * C + 4 * a * C  # GELU's input and output (c_fc's output, c_proj's input)
    dropout_masks = 2 * mask * C if config.dropout > 0 else 0  # after attention's and the MLP's c_proj
    return layer_norms + matmul_inputs + attention + mlp + dropout_masks


def head_saved_bytes(config, dtype, device):
    """Bytes per token saved outside the blocks: the token ids (the embedding's backward), the
    embedding dropout's mask, ln_f's fp32 input and statistics, lm_head's input, the log-probs
    (cross-entropy runs in fp32, autocast or not: 4 bytes x vocab, the largest item) and the
    targets."""
    C, a = config.n_embd, dtype_bytes(dtype)
    mask = 1 if device == "cuda" else a
    embedding_mask = mask * C if config.dropout > 0 else 0
    return 8 + embedding_mask + (4 * C + 8) + a * C + 4 * config.vocab_size + 8


def saved_activation_bytes(config, B, T, dtype="bfloat16", device="cuda", grad_checkpoint=False, residual_bytes=4):
    """Bytes autograd holds from the end of a forward of (B, T) tokens to its backward. With
    grad_checkpoint each Block keeps only its input (the residual stream, in residual_bytes: fp32
    under DDP, the parameters' dtype under FSDP) and recomputes the rest in the backward."""
    per_block = residual_bytes * config.n_embd if grad_checkpoint else block_saved_bytes(config, T, dtype, device)
    return B * T * (config.n_layer * per_block + head_saved_bytes(config, dtype, device))


def transient_activation_bytes(config, B, T, dtype, grad_checkpoint):
    """The most the backward holds beyond the saved bytes: at its start, two fp32 gradients the
    size of the logits beside the saved log-probs; with grad_checkpoint, later, one Block's saved
    bytes while it is recomputed (the logits' gradients are gone by then)."""
    head = 2 * 4 * config.vocab_size
    return B * T * max(head, block_saved_bytes(config, T, dtype, "cuda") if grad_checkpoint else 0)


def param_counts(config):
    """(all parameters, the root's: the embeddings and ln_f, one Block's, those of every Linear
    with the tied embedding as lm_head), by GPT-2's arithmetic."""
    C, bias = config.n_embd, config.bias
    linear = 12 * C * C + (9 * C if bias else 0)  # c_attn (3C x C), c_proj, c_fc (4C x C), c_proj; biases
    block = linear + (4 if bias else 2) * C  # and two LayerNorms
    root = (config.vocab_size + config.block_size) * C + (2 if bias else 1) * C  # wte, wpe, ln_f
    return root + config.n_layer * block, root, block, config.n_layer * linear + config.vocab_size * C


def memory_plan(config, B, T, dtype, gpus, fsdp, grad_checkpoint):
    """Bytes per GPU of one training step of train.py at micro-batch B, by what holds them.

    DDP: fp32 parameters (the master weights: autocast computes in `dtype` from them), fp32
    gradients and DDP's bucket copy of them (gpus > 1), AdamW's two fp32 moments, and autocast's
    `dtype` copies of every matmul weight, saved for the backward. FSDP: parameters, gradients
    and moments divided by the GPUs; in flight, the root's parameters (the embeddings and ln_f,
    which FSDP keeps unsharded from the forward to the backward) and two blocks' (the one
    computing and the one prefetched) in `dtype`, and one block's and the root's gradients in
    fp32 for the reduce-scatter."""
    P, root, block, linear = param_counts(config)
    a = dtype_bytes(dtype)
    shards = gpus if fsdp else 1
    plan = dict(params=4 * P / shards, grads=4 * P / shards, adamw=8 * P / shards)
    if fsdp:
        plan["weights"] = a * (root + 2 * block) + 4 * (root + block)
    else:
        plan["grads"] += 4 * P if gpus > 1 else 0
        plan["weights"] = a * linear if dtype != "float32" else 0
    residual = a if fsdp else 4
    plan["activations"] = (saved_activation_bytes(config, B, T, dtype, "cuda", grad_checkpoint, residual)
                           + transient_activation_bytes(config, B, T, dtype, grad_checkpoint))
    plan["total"] = sum(plan.values())
    return plan


def max_micro_batch(config, T, dtype, gpus, fsdp, grad_checkpoint, usable):
    """The largest micro-batch whose plan fits `usable` bytes (0: not even one sequence). A plan
    is linear in B (activations grow with it, the rest does not), so two plans give the answer."""
    fixed = memory_plan(config, 0, T, dtype, gpus, fsdp, grad_checkpoint)["total"]
    per_sequence = memory_plan(config, 1, T, dtype, gpus, fsdp, grad_checkpoint)["total"] - fixed
    return max(0, math.floor((usable - fixed) / per_sequence))


def memory(args):
    usable = USABLE_SHARE * args.gpu_memory_gb * GB
    print(f"memory: GB (1e9 bytes) per GPU at the peak of a train.py step, micro-batch {args.batch_size} x "
          f"{args.block_size} tokens, {args.dtype}, {args.gpus} GPUs of {args.gpu_memory_gb:g} GB, vocab "
          f"{args.vocab_size:,}")
    print(f"eager PyTorch (torch.compile saves less); max micro-batch: the largest whose total fits "
          f"{USABLE_SHARE:.0%} of a GPU's memory")
    for name, (n_layer, n_head, n_embd) in GPT2_SIZES.items():
        config = GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=n_layer,
                           n_head=n_head, n_embd=n_embd)
        P = param_counts(config)[0]
        print(f"  GPT-2 {name} ({P / 1e6:,.0f}M params: {n_layer} layers, {n_head} heads, {n_embd} embd)")
        print(f"    {'':<12} {'params':>7} {'grads':>7} {'AdamW':>7} {'in-flight':>9} {'activ.':>7} {'total':>7}"
              f"  max micro-batch")
        for strategy, (fsdp, ckpt) in STRATEGIES.items():
            plan = memory_plan(config, args.batch_size, args.block_size, args.dtype, args.gpus, fsdp, ckpt)
            fits = max_micro_batch(config, args.block_size, args.dtype, args.gpus, fsdp, ckpt, usable)
            print(f"    {strategy:<12} " + " ".join(f"{plan[k] / GB:{9 if k == 'weights' else 7}.2f}" for k in
                                                    ("params", "grads", "adamw", "weights", "activations", "total"))
                  + f"  {fits:>15}")


# ----------------------------------------------------------------------------------------------
# gpu

GPU_MODEL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)  # GPT-2 small
GPU_RUNS = {  # a row's name: (train.py settings, under torchrun, a long run)
    "bf16 + compile": (dict(dtype="bfloat16", compile=True), False, True),
    "fp16 + compile + GradScaler": (dict(dtype="float16", compile=True), False, True),
    "bf16 FSDP, 1 GPU": (dict(dtype="bfloat16", fsdp=True), True, False),
    "bf16 grad_checkpoint": (dict(dtype="bfloat16", grad_checkpoint=True), False, False),
}
GPT2_VOCAB_SIZE = 50257  # GPT-2's BPE: the model's embedding and head are GPT-2 small's
RANDOM_IDS = 1024  # random tokens are ids below this: the loss can fall from ln(50257) = 10.8 to ln(1024) = 6.9
GPU_LOG_INTERVAL = 5
GPU_TIME_LIMIT_S = 600  # the runs and decoding; a training run may take what is left, less DECODE_RESERVE_S
DECODE_RESERVE_S = 60


def placeholder_vocab(size=GPT2_VOCAB_SIZE):
    """meta.json's tokenizer entry for a vocabulary of `size` placeholder characters (U+0100 on,
    none a surrogate): random token ids need no text, so the runs need no tiktoken files, which a
    machine without network cannot fetch."""
    return {"kind": "char", "chars": [chr(0x100 + i) for i in range(size)], "vocab_size": size, "eot_id": None}


def random_token_dataset(folder, tokens, seed=0):
    """A dataset in prepare.py's format (train.bin, val.bin, meta.json) of uniformly random ids
    below RANDOM_IDS in a vocabulary of GPT-2's size: a model learns which ids occur, so its loss
    falls within a few steps."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", tokens), ("val", tokens // 10)):
        rng.integers(0, RANDOM_IDS, size=n, dtype=np.uint16).tofile(folder / f"{split}.bin")
    meta = dict(format_version=1, tokenizer=placeholder_vocab(), vocab_size=GPT2_VOCAB_SIZE, eot_id=None,
                dtype="uint16")
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def training_run(settings, torchrun, data_dir, out_dir, steps, model=GPU_MODEL, batch_size=12, device="cuda",
                 timeout=None):
    """train.py for `steps` steps with `settings` on top of a short run's (under torchrun with
    one process when `torchrun`); returns its metrics.jsonl records and None, or the records it
    wrote and the line that says what went wrong (its error, torch.compile's fallback to eager,
    or that it ran past `timeout` seconds, when it is stopped with every process it started)."""
    settings = dict(model, dataset=data_dir, out_dir=out_dir, device=device, batch_size=batch_size,
                    gradient_accumulation_steps=1, max_iters=steps, lr_decay_iters=steps,
                    warmup_iters=steps // 10, eval_interval=steps, eval_iters=2,
                    log_interval=GPU_LOG_INTERVAL) | settings  # evaluations at the first and last step
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun else []
    cmd = [sys.executable, *launcher, ROOT / "train.py", *(f"--{k}={v}" for k, v in settings.items())]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # a process group of its own, to signal as one
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        # SIGTERM: train.py stops at its next step; torchrun passes it on to its workers (each in
        # a session of its own) and kills those that have not stopped 30 s later
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            stdout, stderr = "", ""  # a worker left behind may hold the pipes open
        timed_out = True
    metrics = Path(out_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    if timed_out:
        return records, f"stopped after {timeout:.0f} s, the time left of the check"
    lines = (stderr + stdout).strip().splitlines() or [f"exit status {proc.returncode}"]
    if proc.returncode == 0:  # train.py falls back to eager with a warning: here that is a failure
        return records, next((line for line in lines if "torch.compile failed" in line), None)
    error = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1])
    return records, error[:160]  # one line of the table


def training_row(name, records, error, flops_per_token, peak_flops, planned_bytes):
    """One row of the table from a run's metrics.jsonl records: the median step time and
    tokens/s over the log lines after the first (which holds the warm-up steps), MFU against
    peak_flops, the peak memory beside the planner's, the first and last logged loss, and "ok" or
    why not: an error, a non-finite loss, or a training or validation loss that did not fall."""
    logs = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    timed = logs[1:] or logs
    row = dict(run=name, planned_gb=planned_bytes / GB)
    if timed:
        tokens_per_s = statistics.median(r["tokens_per_s"] for r in timed)
        row |= dict(steps=logs[-1]["iter"], ms=statistics.median(r["ms_per_iter"] for r in timed),
                    tokens_per_s=tokens_per_s, mfu=tokens_per_s * flops_per_token / peak_flops,
                    peak_gb=max(r["peak_mem_mb"] for r in records) * 2**20 / GB,
                    loss=f"{logs[0]['loss']:.2f} -> {logs[-1]['loss']:.2f}")
    losses = [r["loss"] for r in logs] + [r["val_loss"] for r in evals]
    if error:
        row["result"] = f"FAIL: {error}"
    elif len(logs) < 2 or len(evals) < 2:
        row["result"] = f"FAIL: {len(logs)} log lines and {len(evals)} evaluations, too few to see the loss fall"
    elif not all(math.isfinite(loss) for loss in losses):
        row["result"] = "FAIL: a loss is not finite"
    elif logs[-1]["loss"] >= logs[0]["loss"] or evals[-1]["val_loss"] >= evals[0]["val_loss"]:
        row["result"] = (f"FAIL: the loss did not fall (val {evals[0]['val_loss']:.2f} -> "
                         f"{evals[-1]['val_loss']:.2f})")
    else:
        row["result"] = "ok"
    return row


@torch.inference_mode()
def gpu_decode_rows(model, new_tokens, repeats):
    """Greedy decoding of an fp32 model on its device: the KV cache against recomputing the
    context, which must give the same tokens, and the KV cache with bf16 weights."""
    idx = torch.randint(0, model.config.vocab_size, (1, 16), device=model.lm_head.weight.device)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    methods = {
        "decode fp32, KV cache": lambda: generate(model, idx, new_tokens, temperature=0)[0],
        "decode fp32, recompute": lambda: recompute_decode(model, idx, new_tokens)[0].tolist(),
        "decode bf16, KV cache": lambda: generate(bf16, idx, new_tokens, temperature=0)[0],
    }
    seconds, outputs = median_seconds(methods, repeats)
    same = outputs["decode fp32, KV cache"] == outputs["decode fp32, recompute"]
    rows = [dict(run=name, steps=new_tokens, ms=1000 * s / new_tokens, tokens_per_s=new_tokens / s, result="ok")
            for name, s in seconds.items()]
    rows[0]["result"] = "ok: = recompute" if same else "FAIL: its tokens differ from recompute's"
    return rows


def matmul_flops(dtype, n=8192):
    """The best FLOP/s of an n x n x n matmul in `dtype` on the GPU, of 5 after a warm-up: what
    the card reaches, beside the data sheet's peak that MFU is measured against."""
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    best = math.inf
    for i in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0) if i else best
    del a, b
    torch.cuda.empty_cache()  # the memory goes back to the driver, for the train.py runs
    return 2 * n**3 / best


def gpu_table(rows):
    """The table's lines: one per row, blank where a figure does not apply (a failed run, decoding)."""
    def cell(row, key, fmt, width):
        return format(row[key], fmt).rjust(width) if key in row else " " * width
    lines = [f"  {'run':<28} {'steps':>5} {'ms/step':>8} {'tokens/s':>10} {'MFU':>6} {'peak GB':>8} "
             f"{'planned':>8} {'loss':>14}  result"]
    for row in rows:
        lines.append(f"  {row['run']:<28} {cell(row, 'steps', 'd', 5)} {cell(row, 'ms', '.1f', 8)} "
                     f"{cell(row, 'tokens_per_s', ',.0f', 10)} {cell(row, 'mfu', '.1%', 6)} "
                     f"{cell(row, 'peak_gb', '.1f', 8)} {cell(row, 'planned_gb', '.1f', 8)} "
                     f"{cell(row, 'loss', 's', 14)}  {row['result']}")
    return lines


def gpu_rows(args, runs=GPU_RUNS, device="cuda", model=GPU_MODEL, peaks=None, time_limit_s=GPU_TIME_LIMIT_S):
    """The table's rows: each of `runs` through train.py on `device` (random tokens, or
    args.dataset), then the decoding checks, all within time_limit_s. peaks: FLOP/s per dtype
    name, MFU's denominators. A run that fails, or that the time left cannot hold, is a FAIL row."""
    config = GPTConfig(vocab_size=GPT2_VOCAB_SIZE, **model)
    with torch.device("meta"):
        flops_per_token = GPT(config).flops_per_token()
    deadline = time.monotonic() + time_limit_s
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.dataset or random_token_dataset(Path(tmp) / "random", 5_000_000)
        for name, (settings, torchrun, long_run) in runs.items():
            print(f"  running {name} ...", file=sys.stderr, flush=True)
            steps = args.steps if long_run else args.short_steps
            planned = memory_plan(config, args.batch_size, config.block_size, settings["dtype"], 1,
                                  settings.get("fsdp", False), settings.get("grad_checkpoint", False))["total"]
            seconds = deadline - DECODE_RESERVE_S - time.monotonic()
            if seconds < 1:
                rows.append(dict(run=name, planned_gb=planned / GB, result="FAIL: not run, no time left"))
                continue
            with tempfile.TemporaryDirectory() as out_dir:  # its checkpoints (2 GB) go as soon as it is read
                records, error = training_run(settings, torchrun, data_dir, out_dir, steps, model=model,
                                              batch_size=args.batch_size, device=device, timeout=seconds)
            rows.append(training_row(name, records, error, flops_per_token, peaks[settings["dtype"]], planned))
    print("  running decode ...", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    try:
        rows += gpu_decode_rows(GPT(config).to(device).eval(), args.new_tokens, args.repeats)
    except (RuntimeError, ValueError) as e:  # out of memory, a kernel that fails: a row of the table
        rows.append(dict(run="decode", result=f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
    return rows


def gpu_bench(args):
    """Needs only this repository and a CUDA GPU: the tokens are random (no tiktoken files, no
    network), and the whole check ends within --time_limit seconds."""
    if not torch.cuda.is_available():
        raise UserError("bench.py gpu needs a CUDA GPU; torch.cuda.is_available() is False here "
                        f"(torch {torch.__version__})")
    props = torch.cuda.get_device_properties(0)
    peaks = {dtype: measure_peak_flops("cuda", getattr(torch, dtype)) for dtype in ("bfloat16", "float16")}
    measured = {dtype: matmul_flops(getattr(torch, dtype)) for dtype in peaks}
    print(f"gpu: {props.name}, {props.total_memory / GB:.0f} GB, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"GPT-2 small, micro-batch {args.batch_size} x {GPU_MODEL['block_size']}, "
          + (f"dataset {args.dataset}" if args.dataset else
             f"random tokens (ids < {RANDOM_IDS} of a {GPT2_VOCAB_SIZE:,}-token vocabulary)"))
    print("  MFU against the dense peak: " + ", ".join(
        f"{dtype} {peaks[dtype] / 1e12:,.0f} TFLOPS (an 8192^3 matmul measures {measured[dtype] / 1e12:,.0f})"
        for dtype in peaks) + "; planned: `bench.py memory`'s estimate of the eager step")
    print(f"  decoding: batch 1, a 16-token prompt, {args.new_tokens} greedy tokens (a step is one token), "
          f"GPT-2 small's shape with random weights")
    rows = gpu_rows(args, peaks=peaks, time_limit_s=args.time_limit)
    print("\n".join(gpu_table(rows)))
    failed = [row["run"] for row in rows if row["result"].startswith("FAIL")]
    if failed:
        raise UserError(f"{len(failed)} of {len(rows)} checks failed: {', '.join(failed)}")


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)

    p = modes.add_parser("decode", help="decoding tokens/s of each weight format beside llama.cpp's, recompute, "
                                        "Hugging Face and onnxruntime; each format's kernels alone")
    p.add_argument("--n_layer", type=int, default=12, help="model shape; the default is GPT-2 small (124M)")
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--vocab_size", type=int, default=50257)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--prompt_tokens", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is shown")
    p.add_argument("--weights", nargs="+", choices=list(WEIGHT_FORMATS), default=list(WEIGHT_FORMATS),
                   help="our weight formats to time (engine.quantize); auto's choice is added")
    p.add_argument("--group_size", type=int, default=INT4_GROUP_SIZE, help="int4's group size")
    p.add_argument("--threads", type=int, help="torch's and llama.cpp's threads (default: torch's)")
    p.add_argument("--no_recompute", action="store_true", help="skip recomputing the context at every step")
    p.add_argument("--no_hf", action="store_true", help="skip the Hugging Face generate comparison")
    p.add_argument("--no_exports", action="store_true", help="skip the exports: export.py's ONNX graph in "
                   "onnxruntime and its GGUF files (f32, f16, q8_0, q4_0) in llama.cpp")
    p.add_argument("--compile", action="store_true", help="also time each --weights format with its decode "
                   "steps compiled (Engine(compile=True), as serve.py/sample.py --compile)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=decode)

    p = modes.add_parser("step", help="decode steps eager vs compiled (Engine(compile=True)) per weight format")
    p.add_argument("--n_layer", type=int, default=12, help="model shape; the default is GPT-2 small (124M)")
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--vocab_size", type=int, default=50257)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--prompt_tokens", type=int, default=1)
    p.add_argument("--new_tokens", type=int, default=200, help="at most block_size - prompt_tokens are decoded")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is shown")
    p.add_argument("--weights", nargs="+", choices=list(WEIGHT_FORMATS), default=["fp32", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=decode_step_bench)

    p = modes.add_parser("prepare", help="prepare.py: GPT-2 BPE MB/s vs one tiktoken thread, peak RSS, of text, "
                                         "JSON Lines and Parquet; BPE training")
    p.add_argument("--mb", type=float, default=200, help="corpus size: tiny shakespeare repeated to this many MB")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="prepare.py --workers")
    p.add_argument("--repeats", type=int, default=3, help="rounds of prepare.py and the single thread, in turns")
    p.add_argument("--shakespeare", type=Path, default=SHARED / "data" / "tinyshakespeare.txt",
                   help="tiny shakespeare's input.txt (prepare.py downloads it into data/.cache)")
    p.add_argument("--korean", type=Path, default=SHARED / "data" / "nsmc_ko.txt",
                   help="a Korean text file for bpe (skipped when absent)")
    p.add_argument("--korean_chars", type=int, help="use only its first N characters (smoke tests)")
    p.add_argument("--vocab_size", type=int, default=8192, help="bpe vocabulary size")
    p.set_defaults(run=prepare_bench)

    p = modes.add_parser("train", help="training tokens/s and MFU: fp32/bf16, eager/compiled, vs nanoGPT")
    p.add_argument("--shapes", nargs="+", choices=list(TRAIN_SHAPES), default=list(TRAIN_SHAPES))
    p.add_argument("--vocab_size", type=int, default=65, help="65: shakespeare_char's")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per timed round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is shown")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--no_bf16", action="store_true", help="skip the bf16 autocast variants")
    p.set_defaults(run=train_bench)

    p = modes.add_parser("optim", help="AdamW vs Muon trained to the same tokens: steps and time to AdamW's final "
                                       "val loss, and the curves")
    p.add_argument("--shapes", nargs="+", choices=list(OPTIM_SHAPES), default=list(OPTIM_SHAPES))
    p.add_argument("--dataset", default="shakespeare_char", help="a prepare.py dataset (`python prepare.py` makes this one)")
    p.add_argument("--steps", type=int, help="steps of every run (default: each shape's own)")
    p.add_argument("--evals", type=int, default=20, help="evaluations per run, evenly spaced")
    p.add_argument("--dtype", default="auto", help="train.py's dtype")
    p.add_argument("--plot", default="optim.png", help="where to draw the curves ('' = none)")
    p.set_defaults(run=optim_bench)

    p = modes.add_parser("serve", help="serve.py: time to first token and tokens/s for concurrent streaming clients")
    p.add_argument("--shapes", nargs="+", choices=list(SERVE_SHAPES), default=["small", "gpt2"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="concurrent clients per row")
    p.add_argument("--prompt_tokens", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=48, help="per client (16 + 48 fit small's block of 64)")
    p.add_argument("--max_batch", type=int, default=16, help="serve.py's --max_batch (its default: 16)")
    p.add_argument("--spread_s", type=float, default=1.0, help="spread arrivals: clients start over this many seconds")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per row; the median is shown")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=serve_bench)

    p = modes.add_parser("memory", help="bytes per GPU of GPT-2 small to XL under DDP / FSDP, with and without "
                                        "activation checkpointing; the micro-batch that fits")
    p.add_argument("--batch_size", type=int, default=12, help="micro-batch (sequences per GPU per micro-step)")
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--vocab_size", type=int, default=50257,
                   help="50257: GPT-2's BPE, which train.py takes from the dataset (50304 = padded to 64s)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16", help="train.py's dtype (autocast)")
    p.add_argument("--gpus", type=int, default=8, help="data-parallel processes: FSDP shards over them")
    p.add_argument("--gpu_memory_gb", type=float, default=80, help="memory of one GPU, GB")
    p.set_defaults(run=memory)

    p = modes.add_parser("gpu", help="one CUDA GPU: GPT-2 small trained in bf16 and fp16 (compiled), with FSDP and "
                                     "with checkpointing; KV-cache decoding checked against recomputing")
    p.add_argument("--steps", type=int, default=100, help="steps of the bf16 and fp16 runs")
    p.add_argument("--short_steps", type=int, default=20, help="steps of the FSDP and checkpointing runs")
    p.add_argument("--batch_size", type=int, default=12, help="micro-batch of 1024-token sequences")
    p.add_argument("--dataset", help="train on this prepare.py dataset (GPT-2's BPE) instead of random tokens")
    p.add_argument("--new_tokens", type=int, default=128, help="greedy tokens per decoding run")
    p.add_argument("--repeats", type=int, default=3, help="timed decoding runs per method; the median is shown")
    p.add_argument("--time_limit", type=float, default=GPU_TIME_LIMIT_S,
                   help="seconds the training runs and decoding may take in all; a run that would pass it is "
                        "stopped, a FAIL row")
    p.set_defaults(run=gpu_bench)

    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    run_main(main)
