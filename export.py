"""Export a trained model to the tools people deploy with: Hugging Face, ONNX Runtime, llama.cpp.

    python export.py out-small --to hf --out gpt-hf          # a transformers folder, tokenizer included
    python export.py out-small --to onnx --out gpt-onnx      # model.onnx (KV cache in and out) + tokenizer
    python export.py out-small/best.pt --to gguf --out gpt.gguf --quant q8_0   # one file for llama.cpp
    python export.py out-small/best.pt --to gguf --out gpt-q4.gguf --quant q4_0  # llama.cpp's 4-bit

CKPT is a checkpoint or a training run's folder (its best.pt, else ckpt.pt), as in sample.py.
The tokenizer always travels with the weights. Every output is written under a temporary name
and renamed when complete: an interrupted export leaves nothing half-written at --out.
"""
import argparse
import copy
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from common import ArgumentParser, UserError, run_main
from engine import find_checkpoint, is_hf_folder
from gpt import hf_config, load_checkpoint, model_from_checkpoint, split_heads
from tokenizer import END, EOT, GPT2_PATTERN, byte_level_vocab, bytes_to_unicode, load_tokenizer

FORMATS = ("hf", "onnx", "gguf")
GGUF_QUANTS = ("f32", "f16", "q8_0", "q4_0")


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", metavar="CKPT", help="a checkpoint file, or a training run's folder (best.pt, else ckpt.pt)")
    p.add_argument("--to", required=True, choices=FORMATS, help="hf: a Hugging Face folder; onnx: ONNX graphs "
                   "for onnxruntime; gguf: one file for llama.cpp")
    p.add_argument("--out", required=True, metavar="PATH", help="the folder (hf, onnx) or file (gguf) to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="weights' precision (default float32)")
    p.add_argument("--quant", choices=GGUF_QUANTS, help="gguf only: f32, f16, q8_0 or q4_0 "
                   "(default: from --dtype)")
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
    """A transformers GPT-2 folder at `out`: config.json, model.safetensors (fp32, or fp16 with
    --dtype float16), generation_config.json and the tokenizer (write_hf_tokenizer). Returns the
    line that says how to run it."""
    try:
        import safetensors  # noqa: F401  save_pretrained writes model.safetensors with it
    except ImportError:
        raise UserError("--to hf needs the safetensors package: pip install safetensors") from None
    out = Path(out)
    cfg = model.config
    if dtype == "float16":
        model = copy.deepcopy(model).half()  # the caller's model stays fp32
    model.save_pretrained(out)
    # What the weights alone do not say: the end-of-text (a pipeline stops where sample.py stops)
    # and the precision, by the name transformers 5 reads (dtype) and the one before it (torch_dtype).
    eot, ends = tokenizer.eot_id, hf_end_ids(tokenizer)
    config = hf_config(cfg) | {"bos_token_id": eot, "eos_token_id": eot, "dtype": dtype, "torch_dtype": dtype}
    write_json(out / "config.json", config)
    # generate() stops at the end ids and, unless told otherwise, at a full context: the most
    # transformers' GPT-2 takes (its positions end at block_size; it has no sliding window)
    write_json(out / "generation_config.json", {"bos_token_id": eot, "eos_token_id": ends or None,
                                                "pad_token_id": ends[0] if ends else None,
                                                "max_length": cfg.block_size})
    write_hf_tokenizer(tokenizer, out, cfg.block_size)
    return (f'run it with transformers: pipeline("text-generation", model="OUT"); prompt and new tokens '
            f"together up to {cfg.block_size} (block_size)")


def hf_end_ids(tokenizer):
    """The ids that end a generation: end-of-text, and a chat model's <|end|> (its reply ends there)."""
    ends = [] if tokenizer.eot_id is None else [tokenizer.eot_id]
    return ends + ([tokenizer.specials[END]] if tokenizer.is_chat else [])


def write_hf_tokenizer(tokenizer, folder, block_size=None):
    """The tokenizer as Hugging Face files in `folder`, which AutoTokenizer.from_pretrained loads
    as one that encodes and decodes as ours (tests check it on real text):
      tokenizer.json            the `tokenizers` pipeline: byte-level BPE for gpt2/bpe (GPT-2's
                                regex cuts as GPT2_PATTERN does), one token per character for char
      tokenizer_config.json, special_tokens_map.json   its class, special tokens and length
      vocab.json, merges.txt    gpt2/bpe: GPT-2's own files (what older tools read)
    End-of-text and the chat markers are special tokens; `block_size`, if given, is model_max_length."""
    try:
        from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise UserError("a Hugging Face tokenizer needs the tokenizers package: pip install tokenizers") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer.kind == "char":
        check_char_vocab_utf8(tokenizer)
        hf = HFTokenizer(models.WordLevel({c: i for i, c in enumerate(tokenizer.chars)}, unk_token=None))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # every character ("." misses "\n")
        hf.decoder = decoders.Fuse()  # characters joined as they are, no spaces between
    else:
        if tokenizer.enc._pat_str != GPT2_PATTERN:
            raise UserError("a Hugging Face byte-level tokenizer cuts text with GPT-2's regex only; this BPE's "
                            f"pattern is {tokenizer.enc._pat_str!r}")
        vocab, merges = byte_level_vocab(tokenizer)
        hf = HFTokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        write_json(folder / "vocab.json", vocab)
        text = "#version: 0.2\n" + "".join(f"{m}\n" for m in merges)  # GPT-2's merges.txt header
        (folder / "merges.txt").write_text(text, encoding="utf-8")
    specials = ([] if tokenizer.eot_id is None else [EOT]) + list(tokenizer.specials)
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    hf.save(str(folder / "tokenizer.json"))
    eot = None if tokenizer.eot_id is None else EOT
    special_map = {"bos_token": eot, "eos_token": eot, "unk_token": eot,
                   "additional_special_tokens": list(tokenizer.specials)}
    special_map = {k: v for k, v in special_map.items() if v}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special_map,
              "add_bos_token": False, "add_prefix_space": False, "clean_up_tokenization_spaces": False}
    if block_size:
        config["model_max_length"] = block_size
    if tokenizer.is_chat:
        config["chat_template"] = CHAT_TEMPLATE_JINJA
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "special_tokens_map.json", special_map)


def check_char_vocab_utf8(tokenizer):
    """A UserError for a character without a UTF-8 form (a lone surrogate): text files and the
    `tokenizers` package hold none."""
    for c in tokenizer.chars:
        if "\ud800" <= c <= "\udfff":
            raise UserError(f"character U+{ord(c):04X} of the char vocabulary has no UTF-8 form (a lone "
                            "surrogate), which a Hugging Face tokenizer needs")


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# -----------------------------------------------------------------------------
# ONNX


class OnnxGPT(nn.Module):
    """GPT's forward as the one graph model.onnx, its KV cache as inputs and outputs:
    (input_ids (B, T), past keys, values (B, nh, P, hs) per layer) -> (logits (B, T, V), present
    keys, values (B, nh, P + T, hs) per layer). P = 0 is a prefill, T = 1 a decoding step, any
    other P and T a chunk after a cache. The model's own modules and weights; attention is
    CausalSelfAttention's with the cache joined by torch.cat and one mask that holds for every P,
    0 included, so that a single graph serves prompt and steps."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, past):
        t = self.model.transformer
        B, T = input_ids.shape
        P = past[0].size(2)  # tokens already cached
        x = t.wte(input_ids) + t.wpe(torch.arange(P, P + T, device=input_ids.device))  # (B, T, C)
        # new token i sits at position P + i: it sees the whole cache and the new tokens up to itself
        mask = torch.ones(T, P + T, dtype=torch.bool, device=input_ids.device).tril(diagonal=P)
        present = []
        for block, past_k, past_v in zip(t.h, past[0::2], past[1::2]):
            attn = block.attn
            q, k, v = split_heads(attn.c_attn(block.ln_1(x)), attn.n_head)  # each (B, nh, T, hs)
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, nh, P + T, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, -1))
            x = x + block.mlp(block.ln_2(x))
            present += [k, v]
        return self.model.lm_head(t.ln_f(x)), *present


def export_onnx(model, tokenizer, out, dtype):
    """model.onnx (+ model.onnx.data, its weights), export.json and the tokenizer (Hugging Face's
    tokenizer.json and ours, tokenizer_meta.json) in the folder `out`. Returns the line that says
    how to run it.

    One graph (OnnxGPT) for prompt and steps, where two (a prefill and a decoder) would hold the
    weights twice, on disk and in memory:
      inputs   input_ids (batch, sequence) int64,
               past_key_values.{i}.key, .value (batch, n_head, past, head_size), past >= 0
      outputs  logits (batch, sequence, vocab), present.{i}.key, .value (batch, n_head, past + sequence, head_size)
    Generating: run it on the prompt with empty pasts (past = 0), then on each new token with the
    presents as the pasts. Positions are absolute (past + sequence <= block_size), so when the cache
    is full the window slides: the last block_size tokens again with empty pasts, as gpt.py does.
    float16 holds weights and activations in fp16; onnxruntime's CPU provider runs it too.
    export.json names the inputs, outputs and shapes for a user's loop.
    """
    try:
        import onnx  # noqa: F401  torch.onnx's exporter writes its graphs with these two
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("--to onnx needs the ONNX exporter's packages: pip install onnx onnxscript") from None
    out = Path(out)
    out.mkdir(parents=True)
    cfg = model.config
    if dtype == "float16":
        model = copy.deepcopy(model).half()  # the caller's model stays fp32
    hs = cfg.n_embd // cfg.n_head
    kv = [f"{i}.{kind}" for i in range(cfg.n_layer) for kind in ("key", "value")]
    inputs = ["input_ids", *[f"past_key_values.{name}" for name in kv]]
    outputs = ["logits", *[f"present.{name}" for name in kv]]
    # Example sizes of 2 and 3: torch.export fixes a dimension whose example is 0 or 1.
    B, P, T = 2, 2, min(3, cfg.block_size - 2)
    example = (torch.zeros(B, T, dtype=torch.long),
               [torch.zeros(B, cfg.n_head, P, hs, dtype=model.lm_head.weight.dtype) for _ in kv])
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", min=1, max=cfg.block_size)
    past = torch.export.Dim("past", min=0, max=cfg.block_size - 1)
    print("exporting model.onnx ...", file=sys.stderr, flush=True)  # minutes for a large model
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)  # its "torchvision is not installed" warnings concern vision models only
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on renamed axes and its own deprecations
            torch.onnx.export(OnnxGPT(model).eval(), example, out / "model.onnx", dynamo=True, verbose=False,
                              input_names=inputs, output_names=outputs,
                              dynamic_shapes=({0: batch, 1: sequence}, [{0: batch, 2: past}] * len(kv)))
    finally:
        log.setLevel(level)
    write_hf_tokenizer(tokenizer, out, cfg.block_size)  # tokenizer.json: for tokenizers, transformers.js
    write_json(out / "tokenizer_meta.json", {"tokenizer": tokenizer.to_dict()})  # ours: load_tokenizer reads it
    write_json(out / "export.json", {
        "model": "model.onnx", "dtype": dtype, "inputs": inputs, "outputs": outputs,
        "kv_shape": ["batch", "n_head", "past", "head_size"],
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "head_size": hs, "n_embd": cfg.n_embd,
        "vocab_size": cfg.vocab_size, "block_size": cfg.block_size, "eot_id": tokenizer.eot_id,
        "tokenizer": "tokenizer.json", "tokenizer_meta": "tokenizer_meta.json",
    })
    return ("onnxruntime: model.onnx on the prompt with empty pasts, then on each new token with the "
            "presents as its pasts (export.json names them)")


# -----------------------------------------------------------------------------
# GGUF


# Our block's parameters -> llama.cpp's gpt2 tensor names (gguf's MODEL_TENSOR names). nn.Linear's
# (out, in) weight is ggml's layout already, and c_attn's rows are q, k, v stacked as attn_qkv's.
GGUF_BLOCK_TENSORS = {
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}
# llama.cpp's end-of-text for a gpt2 vocabulary that names none (a file cannot unset it)
GGUF_DEFAULT_EOS = 11
# llama.cpp's chat template language is Jinja: render_chat's markers format, token for token.
CHAT_TEMPLATE_JINJA = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
                       "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def export_gguf(model, tokenizer, out, quant):
    """One GGUF file at `out` for llama.cpp (its gpt2 architecture), the tokenizer embedded.
    Tensors and types as llama.cpp's own convert_hf_to_gguf.py writes them for a GPT-2 (tests
    compare the two files). Returns the line that says how to run it."""
    gguf = import_gguf()
    cfg = model.config
    writer = gguf.GGUFWriter(str(out), "gpt2")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(1e-5)  # nn.LayerNorm's default, as GPT-2's
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    writer.add_file_type(file_types[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_gguf_tokenizer(writer, gguf, tokenizer, cfg.vocab_size)
    for name, tensor in gguf_tensors(model):
        array = tensor.detach().float().contiguous().numpy()
        qtype = gguf_tensor_type(gguf, name, array, quant)
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    how = ("chat with it: llama-cli -m FILE (the chat template is in the file)" if tokenizer.is_chat
           else 'run it: llama-completion -m FILE -no-cnv -p "TEXT"')
    how += (f"; prompt and new tokens together up to {cfg.block_size} (block_size: llama.cpp's gpt2 has no "
            "sliding window)")
    if tokenizer.eot_id is None and tokenizer.vocab_size > GGUF_DEFAULT_EOS:
        stop = tokenizer.decode([GGUF_DEFAULT_EOS])
        how += (f"; a char vocabulary has no end-of-text, so llama.cpp takes id {GGUF_DEFAULT_EOS}, {stop!r}, "
                "for it and ends the text there")
    return how


def import_gguf():
    try:
        import gguf  # llama.cpp's own writer, only for --to gguf
    except ImportError:
        raise UserError("--to gguf needs llama.cpp's GGUF writer: pip install gguf") from None
    return gguf


def gguf_tensors(model):
    """(GGUF name, tensor) for every tensor llama.cpp's gpt2 loads. Its gpt2 requires every bias,
    so a bias=False model gets zeros (the same function). No output.weight: llama.cpp's gpt2 then
    scores with token_embd, which is our tied LM head."""
    state = model.state_dict()

    def weight_and_bias(ours, theirs):
        weight = state[f"{ours}.weight"]
        yield f"{theirs}.weight", weight
        yield f"{theirs}.bias", state.get(f"{ours}.bias", weight.new_zeros(weight.shape[0]))

    yield "token_embd.weight", state["transformer.wte.weight"]  # (V, C)
    yield "position_embd.weight", state["transformer.wpe.weight"]  # (block_size, C)
    for i in range(model.config.n_layer):
        for ours, theirs in GGUF_BLOCK_TENSORS.items():
            yield from weight_and_bias(f"transformer.h.{i}.{ours}", f"blk.{i}.{theirs}")
    yield from weight_and_bias("transformer.ln_f", "output_norm")


def gguf_tensor_type(gguf, name, array, quant):
    """The type llama.cpp gives a tensor: f32 for 1-D ones (norms, biases: ggml's ops on them take
    f32) and for the position embeddings, `quant` for the matrices (as its converter writes f32, f16
    and q8_0, and its llama-quantize q4_0). In q4_0 the token embeddings, which are also the output
    head, keep more bits: llama-quantize's Q6_K, which the gguf package cannot write, so Q8_0, what
    llama-quantize itself takes when a row does not split into Q6_K's 256-value blocks. A matrix whose
    rows do not split into the type's blocks (32 values) falls back to f16, as llama.cpp's does."""
    Q = gguf.GGMLQuantizationType
    if array.ndim == 1 or name == "position_embd.weight":
        return Q.F32
    qtype = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    if qtype == Q.Q4_0 and name == "token_embd.weight":
        qtype = Q.Q8_0
    block_values = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if array.shape[-1] % block_values == 0 else Q.F16


def add_gguf_tokenizer(writer, gguf, tokenizer, vocab_size):
    """The tokenizer as llama.cpp's gpt2 (byte-level BPE) one: tokens in id order spelt through
    bytes_to_unicode, their types, the merges; end-of-text as BOS and EOS, never added to a prompt
    (sample.py encodes a prompt as it is). Rows of the model past the tokenizer's ids become
    placeholder tokens of type UNUSED, as the converter names them."""
    if vocab_size < tokenizer.vocab_size:
        raise UserError(f"the model has {vocab_size} token rows but its tokenizer {tokenizer.vocab_size} tokens")
    if tokenizer.kind == "char":
        tokens, merges = char_as_byte_level(tokenizer)
    else:
        vocab, merges = byte_level_vocab(tokenizer)
        tokens = sorted(vocab, key=vocab.get)
    T = gguf.TokenType
    control = {tokenizer.eot_id, *tokenizer.specials.values()}
    types = [T.CONTROL if i in control else T.NORMAL for i in range(len(tokens))]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [T.UNUSED] * (vocab_size - len(types))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenisation regex, as GPT2_PATTERN
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.eot_id is not None:
        writer.add_bos_token_id(tokenizer.eot_id)
        writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(False)
    if tokenizer.is_chat:
        writer.add_eot_token_id(tokenizer.specials[END])  # a reply ends at <|end|>
        writer.add_chat_template(CHAT_TEMPLATE_JINJA)


# bytes_to_unicode's spelling of byte 0xFF, which UTF-8 text never contains
BYTE_NEVER_IN_UTF8 = bytes_to_unicode()[0xFF]


def char_as_byte_level(tokenizer):
    """A char vocabulary as byte-level BPE: (tokens, merges). A character's token is its UTF-8
    bytes, and merges join a character of several bytes byte by byte. Each merge's right side is
    one continuation byte and its left side starts with a character's first byte, so no merge
    crosses characters: llama.cpp gives text of these characters one token per character, ours.
    llama.cpp requires merges; a vocabulary of one-byte characters gets one that never applies."""
    spell = bytes_to_unicode()
    text = lambda b: "".join(spell[x] for x in b)
    tokens, merges = [], {}
    for c in tokenizer.chars:
        try:
            b = c.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"character U+{ord(c):04X} of the char vocabulary has no UTF-8 form (a lone "
                            "surrogate), which llama.cpp's byte-level tokenizer needs") from None
        merges |= {f"{text(b[:k])} {text(b[k:k + 1])}": None for k in range(1, len(b))}
        tokens.append(text(b))
    tokens += list(tokenizer.specials)
    return tokens, list(merges) or [f"{BYTE_NEVER_IN_UTF8} {BYTE_NEVER_IN_UTF8}"]


def main():
    args = parse_args(sys.argv[1:])
    if args.quant and args.to != "gguf":
        raise UserError(f"--quant applies to --to gguf, not --to {args.to}")
    out = Path(args.out)
    if out.exists() and not args.force:  # before loading anything: the cheapest mistake first
        raise UserError(f"{out} exists; pass --force to replace it")
    model, tokenizer, path = load_for_export(args.ckpt)
    if out.resolve() in path.resolve().parents or out.resolve() == path.resolve():
        raise UserError(f"{out} holds the checkpoint {path}; exporting there would replace it: choose another --out")
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
