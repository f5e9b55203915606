"""export.py --to gguf, checked with llama.cpp itself (llama-cpp-python): its tokenizer against ours,
its logits and greedy tokens against ours in f32 and q4_0, its held-out loss in f16, q8_0 and q4_0
against ours, and the file against what llama.cpp's own tools write from the same weights: its
convert_hf_to_gguf.py (found at $LLAMA_CPP_CONVERTER; .ci/run fetches it from llama-cpp-python's
source) in f32, and its quantizer (llama_model_quantize, in llama-cpp-python) in q4_0."""
import copy
import ctypes
import dataclasses
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import export
import engine
import gpt
from common import UserError
from conftest import assert_one_line_error, main_in_process, require
from tokenizer import Tokenizer, render_chat

gguf = require("gguf", reason="--to gguf needs gguf: pip install -r requirements-dev.txt")
llama_cpp = require("llama_cpp", reason="the exports run on llama-cpp-python: pip install -r requirements-dev.txt")

KINDS = ("char", "bpe", "gpt2")
BLOCK = 128  # the window of the models run here: a 16-token prompt and 64 greedy tokens fit
# f32 weights and KV cache, yet llama.cpp's CPU GELU reads a table indexed by its input rounded to
# f16 and holding f16 outputs: each MLP activation is off by up to ~2 * 2^-11 ~ 1e-3 of its size. Even
# with every such error aligned, the logits move by at most ~1e-3 of their largest magnitude (sums
# in another order add only ~1e-7 relative); measured: ~3e-5 of it.
F32_LOGIT_RTOL = 1e-3
# Held-out loss (nats per token), f16 and q8_0 against fp32 torch. f16 rounds each weight by at most
# 2^-11 relative (and llama.cpp's default KV cache is f16 too); q8_0 rounds each weight to 1/127 of
# the largest |w| in its block of 32, ~0.4%. Such errors are unbiased, so the loss moves far less than
# the weights: measured |Δ| is ~1e-5 for f16 and ~1e-3 for q8_0 on these models. q4_0 rounds each
# weight to a step of 1/8 of the largest |w| in its block of 32 (an error up to 6% of it), 16x q8_0's:
# measured |Δ| ~2e-3; 0.1 is the bound 4-bit weights are held to (BENCHMARKS.md).
LOSS_TOL = {"f16": 0.01, "q8_0": 0.05, "q4_0": 0.1}
# q4_0's logits against fp32, as a fraction of the largest |logit|: q4_0's weight steps (above), and
# llama.cpp's rounding of each activation to Q8_0 (1/127 of its block's largest) for its dot
# products. Measured: 0.8% (char), 0.6% (gpt2) of the largest logit; 6% on the barely trained bpe
# model, whose few outlying weights set their blocks' steps.
Q4_0_LOGIT_RTOL = 0.03
# what the matrices of each file type are stored as (1-D tensors and position_embd stay f32; in
# q4_0 the token embeddings, also the output head, are Q8_0)
MATRIX_TYPE = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
               "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
TRICKY = ("  two spaces,\ttabs\n\n\nand 3.14159 or 1,000,000; it's 'quoted' -- we'll see  \n"
          "CAPITALS and <|endoftext|> typed as text, naïve café — 한국어 🚀\n")


def with_window(model, block_size):
    """The trained model with its position rows repeated up to block_size: still a trained network
    (peaked next-token distributions, so greedy decoding meets no near-ties) with room for a prompt
    and 64 new tokens, where the shared checkpoints' window is 32."""
    state = model.state_dict()
    wpe = state["transformer.wpe.weight"]
    state["transformer.wpe.weight"] = wpe.repeat(-(-block_size // wpe.shape[0]), 1)[:block_size]
    longer = gpt.GPT(dataclasses.replace(model.config, block_size=block_size))
    longer.load_state_dict(state)
    return longer.eval()


@pytest.fixture(scope="module")
def exported(trained_checkpoint, tmp_path_factory):
    """exported(kind, quant) -> (GGUF file, model, tokenizer) of the trained `kind` checkpoint with a
    window of BLOCK, each exported once."""
    made = {}

    def make(kind, quant):
        if (kind, quant) not in made:
            model, tokenizer, _ = export.load_for_export(trained_checkpoint(kind))
            model = with_window(model, BLOCK)
            path = tmp_path_factory.mktemp("gguf") / f"{kind}-{quant}.gguf"
            export.write_atomically(path, False, lambda tmp: export.export_gguf(model, tokenizer, tmp, quant))
            made[kind, quant] = path, model, tokenizer
        return made[kind, quant]

    return make


@pytest.fixture(scope="module")
def held_out(shakespeare_path):
    """Shakespeare far past the 40,000 characters the checkpoints trained on."""
    return shakespeare_path.read_text(encoding="utf-8")[300_000:303_000]


def in_vocabulary(tokenizer, text):
    """text without the characters a char vocabulary lacks (ours refuses them, llama.cpp drops them)."""
    return text if tokenizer.kind != "char" else "".join(c for c in text if c in tokenizer.chars)


def load_llama(path, n_ctx, kv_cache="f32"):
    kv_type = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv_cache]
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
                           type_k=kv_type, type_v=kv_type)


def llama_logits(llm, ids):
    """llama.cpp's (T, V) logits, teacher-forced over ids."""
    assert len(ids) <= int(llm.metadata["gpt2.context_length"])  # past block_size llama.cpp aborts the process
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def our_logits(model, ids):
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]), torch.tensor([ids]))  # with targets: logits at every position
    return logits[0].numpy()


def loss(logits, ids):
    """Mean next-token cross-entropy (nats) of (T, V) logits over ids."""
    logits = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()


GGUF_SCALARS = {gguf.GGUFValueType.UINT8: "B", gguf.GGUFValueType.INT8: "b", gguf.GGUFValueType.UINT16: "H",
                gguf.GGUFValueType.INT16: "h", gguf.GGUFValueType.UINT32: "I", gguf.GGUFValueType.INT32: "i",
                gguf.GGUFValueType.FLOAT32: "f", gguf.GGUFValueType.BOOL: "?", gguf.GGUFValueType.UINT64: "Q",
                gguf.GGUFValueType.INT64: "q", gguf.GGUFValueType.FLOAT64: "d"}


def file_contents(path):
    """(metadata {key: (value type, value)}, tensors {name: (type, shape, bytes)}) of a GGUF file,
    read by the format's layout with struct: gguf.GGUFReader makes a numpy view of every item, which
    takes seconds for GPT-2's 50,257 tokens and 50,000 merges."""
    data, pos = Path(path).read_bytes(), 0

    def unpack(fmt):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def string():
        nonlocal pos
        (n,) = unpack("Q")
        pos += n
        return data[pos - n:pos].decode("utf-8")

    def value(vtype):
        """(its type, the value) of a field: an array's type is (ARRAY, its items' type)."""
        vtype = gguf.GGUFValueType(vtype)
        if vtype == gguf.GGUFValueType.STRING:
            return vtype, string()
        if vtype != gguf.GGUFValueType.ARRAY:
            return vtype, unpack(GGUF_SCALARS[vtype])[0]
        itype, n = unpack("IQ")
        items = list(unpack(f"{n}{GGUF_SCALARS[itype]}")) if itype in GGUF_SCALARS else [
            value(itype)[1] for _ in range(n)]
        return (vtype, gguf.GGUFValueType(itype)), items

    assert data[:4] == b"GGUF"
    pos = 4
    _, n_tensors, n_fields = unpack("IQQ")
    fields = {}
    for _ in range(n_fields):
        key = string()
        fields[key] = value(*unpack("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = unpack("I")
        shape = unpack(f"{n_dims}Q")
        qtype, offset = unpack("IQ")
        infos.append((name, gguf.GGMLQuantizationType(qtype), shape, offset))
    _, alignment = fields.get("general.alignment", (None, gguf.GGUF_DEFAULT_ALIGNMENT))
    start = -(-pos // alignment) * alignment  # the tensors' data begins at the next multiple of the alignment
    tensors = {}
    for name, qtype, shape, offset in infos:
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        size = math.prod(shape) // block * block_bytes
        tensors[name] = (qtype, shape, data[start + offset:start + offset + size])
    return fields, tensors


@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_tokenizes_and_decodes_as_ours(exported, held_out, kind):
    """The embedded tokenizer is ours: llama.cpp's tokens for a text (typed markers as plain text,
    as encode does) are our ids, and its decoding of them is our text."""
    path, model, tokenizer = exported(kind, "f32")
    llm = load_llama(path, BLOCK)
    for text in (held_out[:800], TRICKY):
        text = in_vocabulary(tokenizer, text)
        ids = tokenizer.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        assert llm.detokenize(ids).decode() == tokenizer.decode(ids) == text


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_in_f32(exported, held_out, kind):
    """llama.cpp's greedy continuation of a prompt is ours (engine.generate, temperature 0), 64 tokens."""
    path, model, tokenizer = exported(kind, "f32")
    prompt = tokenizer.encode(in_vocabulary(tokenizer, held_out))[:16]
    ours = engine.generate(model, torch.tensor([prompt]), 64, temperature=0.0)[0]
    llm = load_llama(path, BLOCK)
    theirs = []
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 64:
            break
    assert theirs == ours


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_in_f32(exported, held_out, kind):
    """Teacher-forced over a full window of held-out text, llama.cpp's logits are ours within its
    f32 computation's error (F32_LOGIT_RTOL)."""
    path, model, tokenizer = exported(kind, "f32")
    ids = tokenizer.encode(in_vocabulary(tokenizer, held_out))[:BLOCK]
    ours, theirs = our_logits(model, ids), llama_logits(load_llama(path, BLOCK), ids)
    assert theirs.shape == ours.shape == (BLOCK, model.config.vocab_size)
    assert np.abs(theirs - ours).max() <= F32_LOGIT_RTOL * np.abs(ours).max()


def expected_type(quant, name, shape):
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or name == "position_embd.weight":
        return Q.F32
    return Q.Q8_0 if quant == "q4_0" and name == "token_embd.weight" else MATRIX_TYPE[quant]


@pytest.mark.parametrize("quant", ("f16", "q8_0", "q4_0"))
def test_quantized_held_out_loss_is_close(exported, held_out, quant):
    """f16, q8_0 and q4_0 files hold their matrices in that type (norms, biases, positions in f32,
    q4_0's token embeddings in Q8_0, as llama.cpp's tools write them), and llama.cpp's held-out loss
    with them, on its default f16 KV cache, is within LOSS_TOL of ours in fp32."""
    path, model, tokenizer = exported("bpe", quant)
    _, tensors = file_contents(path)
    for name, (qtype, shape, _) in tensors.items():
        assert qtype == expected_type(quant, name, shape), name
    ids = tokenizer.encode(held_out)[:BLOCK]
    ours = loss(our_logits(model, ids), ids)
    theirs = loss(llama_logits(load_llama(path, BLOCK, kv_cache="f16"), ids), ids)
    print(f"\n{quant}: held-out loss {theirs:.5f} in llama.cpp, {ours:.5f} in torch fp32")
    assert abs(theirs - ours) <= LOSS_TOL[quant]


@pytest.mark.parametrize("kind", ("char", "gpt2"))
def test_q4_0_logits_and_greedy_tokens_follow_ours(exported, held_out, kind):
    """llama.cpp's logits on the q4_0 file, teacher-forced over a window of held-out text, are ours in
    fp32 within Q4_0_LOGIT_RTOL; and along our greedy continuation of a prompt (64 tokens), its
    greedy token is ours wherever our top-2 margin is more than twice that error (most positions)."""
    path, model, tokenizer = exported(kind, "q4_0")
    llm = load_llama(path, BLOCK)
    ids = tokenizer.encode(in_vocabulary(tokenizer, held_out))[:BLOCK]
    ours = our_logits(model, ids)
    tol = Q4_0_LOGIT_RTOL * np.abs(ours).max()
    assert np.abs(llama_logits(llm, ids) - ours).max() <= tol
    prompt = ids[:16]
    path_ids = prompt + engine.generate(model, torch.tensor([prompt]), 64, temperature=0.0)[0]
    ours = our_logits(model, path_ids)[len(prompt) - 1:-1]  # (64, V): the scores each new token won
    theirs = llama_logits(llm, path_ids)[len(prompt) - 1:-1]
    top2 = np.sort(ours, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tol
    assert clear.sum() >= 32, f"only {clear.sum()} of 64 positions have a clear winner"
    np.testing.assert_array_equal(theirs.argmax(-1)[clear], np.array(path_ids[len(prompt):])[clear])


def test_q4_0_file_is_llama_quantize_s(exported, tmp_path):
    """export.py's q4_0 file is what llama.cpp's own quantizer (llama-quantize's Q4_0, through
    llama-cpp-python) makes of its f32 file: the same tensors (names, types, shapes, bytes) and
    metadata. (llama-quantize keeps a tied output head of rows of 256 values in Q6_K, which the gguf
    package cannot write; these rows of 32 are Q8_0 in both.)"""
    f32, _, _ = exported("gpt2", "f32")
    ours, _, _ = exported("gpt2", "q4_0")
    theirs = tmp_path / "theirs-q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    ours_fields, ours_tensors = file_contents(ours)
    theirs_fields, theirs_tensors = file_contents(theirs)
    assert ours_tensors.keys() == theirs_tensors.keys()
    for name in theirs_tensors:
        assert ours_tensors[name] == theirs_tensors[name], name
    assert ours_fields == theirs_fields


def test_many_byte_characters_padded_rows_and_no_biases(korean_path, tmp_path):
    """A char vocabulary of Korean (3-byte) and other many-byte characters: llama.cpp still gives one
    token per character, ours. A model with more rows than tokens gets placeholder tokens of type
    UNUSED; one without biases gets zero biases; and its logits, placeholders' included, are ours."""
    text = korean_path.read_text(encoding="utf-8")[:20_000]
    tokenizer = Tokenizer("char", chars="".join(sorted(set(text[:15_000]))))
    assert any(len(c.encode()) == 3 for c in tokenizer.chars) and any(len(c.encode()) == 1 for c in tokenizer.chars)
    torch.manual_seed(0)
    config = gpt.GPTConfig(block_size=64, vocab_size=tokenizer.vocab_size + 5, n_layer=1, n_head=2, n_embd=32,
                           bias=False)
    model = gpt.GPT(config).eval()
    path = tmp_path / "ko.gguf"
    export.export_gguf(model, tokenizer, path, "f32")
    fields, _ = file_contents(path)
    assert fields["tokenizer.ggml.token_type"][1][-5:] == [gguf.TokenType.UNUSED] * 5
    llm = load_llama(path, 64)
    held = in_vocabulary(tokenizer, text[15_000:])[:300]
    ids = tokenizer.encode(held)
    assert llm.tokenize(held.encode(), add_bos=False, special=False) == ids
    assert llm.detokenize(ids).decode() == held
    ids = ids[:64]
    ours = our_logits(model, ids)
    assert np.abs(llama_logits(llm, ids) - ours).max() <= F32_LOGIT_RTOL * np.abs(ours).max()


def test_q8_0_rows_that_do_not_split_into_blocks_stay_f16(tmp_path):
    """q8_0 quantizes rows in blocks of 32 values: with n_embd 48 the matrices whose rows are n_embd
    long fall back to f16, as llama.cpp's converter does, and llama.cpp runs the file, its held-out
    loss within q8_0's tolerance of ours."""
    tokenizer = Tokenizer("char", chars="".join(sorted(set("abcdefghijklmnopqrstuvwxyz .,\n"))))
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(block_size=64, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=48)).eval()
    path = tmp_path / "q8.gguf"
    export.export_gguf(model, tokenizer, path, "q8_0")
    _, tensors = file_contents(path)
    Q = gguf.GGMLQuantizationType
    assert tensors["blk.0.ffn_down.weight"][0] == Q.Q8_0  # rows of 4 * 48 = 192 values
    assert tensors["blk.0.attn_qkv.weight"][0] == tensors["token_embd.weight"][0] == Q.F16  # rows of 48
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog, the dog sleeps.\n")
    theirs = loss(llama_logits(load_llama(path, 64, kv_cache="f16"), ids), ids)
    assert abs(theirs - loss(our_logits(model, ids), ids)) <= LOSS_TOL["q8_0"]


def test_chat_template_renders_as_render_chat(exported, tmp_path):
    """A chat model's file carries a chat template that llama-cpp-python renders, with its markers
    parsed as special tokens, to render_chat's tokens; <|end|> ends a reply (end-of-turn)."""
    _, base_model, base = exported("bpe", "f32")
    tokenizer = base.with_chat_specials()
    model = copy.deepcopy(base_model)  # grow_vocab works in place
    model.grow_vocab(tokenizer.vocab_size)
    path = tmp_path / "chat.gguf"
    how = export.export_gguf(model, tokenizer, path, "f32")
    assert "llama-cli" in how
    llm = load_llama(path, BLOCK)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is there?"},
                {"role": "assistant", "content": "Nobody, my lord."}, {"role": "user", "content": "Speak!"}]
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"], eos_token="", bos_token="")
    prompt = formatter(messages=messages).prompt
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == render_chat(tokenizer, messages, True)[0]
    assert int(llm.metadata["tokenizer.ggml.eot_token_id"]) == tokenizer.specials["<|end|>"]
    assert llm.token_eos() == tokenizer.eot_id


def test_char_model_end_of_text_is_named(exported):
    """A char vocabulary has no end-of-text, and llama.cpp takes id 11 for one whatever the file
    says: the line export prints names that character."""
    path, model, tokenizer = exported("char", "f32")
    how = export.export_gguf(model, tokenizer, path.with_name("again.gguf"), "f32")
    assert load_llama(path, BLOCK).token_eos() == export.GGUF_DEFAULT_EOS
    assert repr(tokenizer.decode([export.GGUF_DEFAULT_EOS])) in how


def llama_cpp_converter():
    """The path of llama.cpp's convert_hf_to_gguf.py ($LLAMA_CPP_CONVERTER); a skip without it, a
    failure on CI, where .ci/run fetches it."""
    converter = os.environ.get("LLAMA_CPP_CONVERTER")
    if not converter or not os.path.isfile(converter):
        reason = "set LLAMA_CPP_CONVERTER to llama.cpp's convert_hf_to_gguf.py (.ci/run fetches it)"
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)
    return converter


def test_same_file_as_llama_cpp_converter(trained_checkpoint, tmp_path, monkeypatch, capsys):
    """export.py --to gguf writes what llama.cpp's own converter writes from export.py --to hf of the
    same checkpoint, in f32: the same tensors (names, types, shapes, bytes), hyperparameters,
    tokens, token types, merges and end-of-text. (The converter recognises GPT-2's tokenizer, and
    refuses a trained BPE's pre-tokenizer as unknown.)"""
    converter = llama_cpp_converter()
    ckpt = trained_checkpoint("gpt2")
    ours, hf, theirs = tmp_path / "ours.gguf", tmp_path / "hf", tmp_path / "theirs.gguf"
    result = main_in_process(monkeypatch, capsys, export.main, [ckpt, "--to", "gguf", "--out", ours])
    assert result.returncode == 0, result.stderr
    assert f"wrote {ours} from {ckpt}: run it: llama-completion" in result.stdout
    result = main_in_process(monkeypatch, capsys, export.main, [ckpt, "--to", "hf", "--out", hf])
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, converter, str(hf), "--outfile", str(theirs), "--outtype", "f32"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ours_fields, ours_tensors = file_contents(ours)
    theirs_fields, theirs_tensors = file_contents(theirs)
    assert ours_tensors.keys() == theirs_tensors.keys()
    for name in theirs_tensors:
        assert ours_tensors[name] == theirs_tensors[name], name
    # the converter's names for the folder and the size; and an unknown-token id, because the Hugging
    # Face tokenizer names end-of-text so (as GPT-2's does), which a byte-level BPE never produces
    unshared = {"general.name", "general.size_label", "tokenizer.ggml.unknown_token_id"}
    assert theirs_fields.keys() - unshared <= ours_fields.keys()
    for key in theirs_fields.keys() - unshared:
        assert ours_fields[key] == theirs_fields[key], key


def test_user_errors(trained_checkpoint, tmp_path, monkeypatch, capsys):
    """Mistakes are one line: an unknown --quant (before anything loads), a tokenizer with more tokens
    than the model has rows, a char vocabulary with a character UTF-8 cannot encode, gguf missing."""
    result = main_in_process(monkeypatch, capsys, export.main,
                             [trained_checkpoint("char"), "--to", "gguf", "--out", tmp_path / "x.gguf", "--quant", "q4_k"])
    assert_one_line_error(result, "--quant", "q4_k")
    model = gpt.GPT(gpt.GPTConfig(block_size=8, vocab_size=3, n_layer=1, n_head=1, n_embd=32))
    with pytest.raises(UserError, match="3 token rows but its tokenizer 4 tokens"):
        export.export_gguf(model, Tokenizer("char", chars="abcd"), tmp_path / "small.gguf", "f32")
    with pytest.raises(UserError, match="U\\+D800.*no UTF-8 form"):
        export.export_gguf(model, Tokenizer("char", chars="a\ud800"), tmp_path / "surrogate.gguf", "f32")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(UserError, match="pip install gguf"):
        export.export_gguf(model, Tokenizer("char", chars="abc"), tmp_path / "none.gguf", "f32")
    assert not list(tmp_path.glob("*.gguf"))
