"""export.py --to hf, and what every export does with bad input.

transformers runs the exported folder as sample.py runs the checkpoint: greedy text token for
token, through AutoTokenizer and AutoModelForCausalLM, and through pipeline(); our logits; the
same end tokens. The Hugging Face tokenizer encodes real text (English, Korean) and arbitrary text
as tiktoken does, a chat one with render_chat's markers and template. A float16 export holds our
weights rounded to fp16. A mistake is one error line, and leaves nothing at --out.
"""
import contextlib
import json
import os
import sys

import pytest
import torch
from conftest import assert_one_line_error, main_in_process, require, run_in_process, run_script
from hypothesis import given, settings, strategies as st

import export
import engine
import gpt
import sample
from common import UserError
from tokenizer import END, EOT, load_tokenizer, render_chat

transformers = require("transformers", reason="the exports are checked against transformers")
tokenizers = require("tokenizers")

PROMPT = "ROMEO:\nWhat light"
KINDS = ("char", "bpe", "gpt2")
FP32_TOL = 1e-4  # fp32 logits of the same function through different kernels (|logits| < ~10)


@pytest.fixture(scope="module")
def exported(trained_checkpoint, tmp_path_factory):
    """exported(kind, dtype) -> the Hugging Face folder that `export.py --to hf` writes; once each."""
    made = {}

    def make(kind, dtype="float32"):
        if (kind, dtype) not in made:
            out = tmp_path_factory.mktemp(f"hf_{kind}_{dtype}") / "hf"
            ckpt = trained_checkpoint(kind)
            result = run_in_process(export.main, ckpt, "--to", "hf", "--out", out, "--dtype", dtype)
            assert result.returncode == 0, result.stderr
            made[kind, dtype] = out
        return made[kind, dtype]

    return make


def leftovers(out):
    """What an export left at `out` or at a temporary sibling of it."""
    return [p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.")]


# -----------------------------------------------------------------------------
# transformers runs it as sample.py does


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_greedy_text_is_sample_py_greedy_text(kind, trained_checkpoint, exported, monkeypatch, capsys):
    """AutoTokenizer + AutoModelForCausalLM.generate(do_sample=False) on the exported folder write
    the text sample.py --temperature 0 writes for the checkpoint, plainly and with a repetition
    penalty (CTRL's in both: the text then leaves the few tokens a tiny model repeats), prompt and
    new tokens within block_size, where transformers' GPT-2 works; pipeline("text-generation") too."""
    ckpt, folder = trained_checkpoint(kind), exported(kind)
    block_size = gpt.load_checkpoint(ckpt)["model_args"]["block_size"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    new_tokens = block_size - prompt.shape[1]
    for penalty in (1.0, 3.0):
        flags = ["--temperature", "0", "--max_new_tokens", new_tokens, "--repetition_penalty", penalty]
        result = main_in_process(monkeypatch, capsys, sample.main,
                                 ["--ckpt", ckpt, "--start", PROMPT, *flags, "--device", "cpu", "--dtype", "float32"])
        assert result.returncode == 0, result.stderr
        with torch.no_grad():
            ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=new_tokens, repetition_penalty=penalty)
        assert tokenizer.decode(ids[0], skip_special_tokens=True) + "\n" == result.stdout
    pipe = transformers.pipeline("text-generation", model=str(folder))
    generated = pipe(PROMPT, max_new_tokens=new_tokens, do_sample=False, repetition_penalty=penalty)
    assert generated[0]["generated_text"] + "\n" == result.stdout


@pytest.mark.parametrize("kind", ("char", "gpt2"))
def test_transformers_logits_are_ours(kind, trained_checkpoint, exported):
    """transformers' GPT-2 on the exported weights computes our logits at every position of a full
    block (fp32: the same function through other kernels)."""
    model, _, _ = export.load_for_export(trained_checkpoint(kind))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported(kind)).eval()
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(model.config.vocab_size, (2, model.config.block_size), generator=generator)
    with torch.no_grad():
        ours, _ = model(idx, idx)  # with targets: logits at every position
        torch.testing.assert_close(theirs(idx).logits, ours, rtol=0, atol=FP32_TOL)


def test_config_names_the_context_end_of_text_and_precision(exported):
    """config.json carries n_ctx (llama.cpp's converter reads it), the end-of-text as bos/eos (where
    a pipeline stops) and the weights' dtype; transformers reads them back."""
    folder = exported("gpt2")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["n_ctx"] == config["n_positions"] == 32
    assert config["eos_token_id"] == config["bos_token_id"] == 50256
    loaded = transformers.AutoConfig.from_pretrained(folder)
    assert loaded.eos_token_id == 50256 and loaded.dtype == torch.float32


def test_generation_fills_the_context_unless_told_otherwise(exported):
    """generate() given no length continues the prompt up to block_size tokens in all, the positions
    transformers' GPT-2 has (its own default would stop at 20)."""
    folder = exported("char")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False).shape == (1, 32)


@pytest.mark.parametrize("stop", [EOT, END])
def test_generation_stops_where_ours_stops(stop, trained_checkpoint, tmp_path):
    """A chat model's generation ends at end-of-text and at <|end|>, in transformers as in
    engine.generate: a model made to emit `stop` ends after it, where a full context would follow."""
    model, tokenizer, _ = export.load_for_export(trained_checkpoint("bpe"))
    tokenizer = tokenizer.with_chat_specials()
    model.grow_vocab(tokenizer.vocab_size)
    stop_id = tokenizer.specials.get(stop, tokenizer.eot_id)
    with torch.no_grad():  # every position's final hidden state is one vector that scores stop_id highest
        wte = model.transformer.wte.weight
        wte[stop_id] *= 10 * wte.norm(dim=1).max() / wte[stop_id].norm()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(wte[stop_id] / wte[stop_id].norm())
    export.export_hf(model, tokenizer, tmp_path / "hf", "float32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        ids = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False)[0].tolist()
    ours = engine.generate(model, prompt, 32 - prompt.shape[1], temperature=0, stop_tokens=export.hf_end_ids(tokenizer))
    assert ids[prompt.shape[1]:] == ours[0] + [stop_id]


# -----------------------------------------------------------------------------
# The tokenizer


@pytest.mark.parametrize("kind", ("bpe", "gpt2"))
def test_hf_tokenizer_encodes_english_and_korean_as_ours(kind, trained_checkpoint, exported, shakespeare_path,
                                                         korean_path):
    """AutoTokenizer of the folder gives tiktoken's ids for all of Shakespeare and for Korean (a
    byte-level BPE's bytes of characters it never merged), and decodes those ids back to the text."""
    ours = load_tokenizer(trained_checkpoint(kind))
    theirs = transformers.AutoTokenizer.from_pretrained(exported(kind), model_max_length=None)
    for text in (shakespeare_path.read_text(encoding="utf-8"), korean_path.read_text(encoding="utf-8")[:500_000]):
        ids = ours.encode(text)
        assert theirs.encode(text) == ids
        assert theirs.decode(ids) == text


def test_hf_char_tokenizer_round_trips_every_character(trained_checkpoint, exported, tiny_corpus):
    """The char export's tokenizer gives each character (the newline and space included) its id
    and decodes ids to the characters joined as they are, for the vocabulary and the corpus."""
    ours = load_tokenizer(trained_checkpoint("char"))
    theirs = transformers.AutoTokenizer.from_pretrained(exported("char"), model_max_length=None)
    assert "\n" in ours.chars and " " in ours.chars
    for text in (ours.chars, tiny_corpus.read_text(encoding="utf-8")):
        ids = ours.encode(text)
        assert theirs.encode(text) == ids
        assert theirs.decode(ids) == text


# Characters where GPT-2's regex and a tokenizer's regex engine could disagree: every kind of
# whitespace, contractions' letters, digits of other scripts, Hangul, and any other code point.
TRICKY = " \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2028\u2029\u200b\u3000\ufeff'sdmtlvreSDMT0٣aZ가é\u0301!.,-"


@pytest.fixture(scope="module")
def gpt2_tokenizer_json(tmp_path_factory):
    """GPT-2's BPE as the tokenizers.Tokenizer of the tokenizer.json write_hf_tokenizer writes."""
    folder = tmp_path_factory.mktemp("gpt2_tokenizer")
    export.write_hf_tokenizer(load_tokenizer("gpt2"), folder)
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.one_of(st.sampled_from(TRICKY), st.characters(exclude_categories=["Cs"])), max_size=40))
def test_byte_level_pre_tokenizer_cuts_as_gpt2_pattern(gpt2_tokenizer_json, text):
    """The ByteLevel pre-tokenizer's regex (what tokenizer.json names) cuts text into the pieces
    tiktoken's GPT2_PATTERN cuts: GPT-2's BPE through the written tokenizer.json gives tiktoken's ids."""
    assert gpt2_tokenizer_json.encode(text).ids == load_tokenizer("gpt2").encode(text)


@pytest.mark.parametrize("kind", ("char", "gpt2"))
def test_chat_markers_are_special_tokens_and_the_template_is_render_chat(kind, trained_checkpoint, tmp_path):
    """A chat tokenizer's markers are special tokens of the Hugging Face one (typed text with a
    marker gets its id, decoded back as the marker), and apply_chat_template gives render_chat's ids."""
    ours = load_tokenizer(trained_checkpoint(kind)).with_chat_specials()
    export.write_hf_tokenizer(ours, tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.convert_tokens_to_ids(list(ours.specials)) == list(ours.specials.values())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What light"},
                {"role": "assistant", "content": "It is the east"}]
    ids, _ = render_chat(ours, messages, add_generation_prompt=False)
    assert theirs.apply_chat_template(messages, tokenize=True, return_dict=False) == ids
    assert theirs.decode(ids) == ours.decode(ids)


@pytest.mark.parametrize("description, needle", [
    ({"kind": "char", "chars": ["a", "\ud800"]}, "U.D800 .* lone surrogate"),
    ({"kind": "bpe", "pattern": r"\S+|\s+"}, "GPT-2's regex"),
])
def test_a_tokenizer_transformers_cannot_hold_is_a_clear_error(description, needle, trained_checkpoint, tmp_path):
    """A char vocabulary with a lone surrogate (no UTF-8 form) and a BPE cutting text with another
    regex than GPT-2's (the ByteLevel pre-tokenizer's) are UserErrors naming the cause."""
    if description["kind"] == "bpe":
        description = load_tokenizer(trained_checkpoint("bpe")).to_dict() | description
    with pytest.raises(UserError, match=needle):
        export.write_hf_tokenizer(load_tokenizer(description), tmp_path)


# -----------------------------------------------------------------------------
# float16


def test_float16_folder_holds_our_weights_rounded_to_fp16(trained_checkpoint, exported):
    """--dtype float16: transformers loads the folder as fp16, each weight our fp32 one cast to fp16
    (one rounding: exact), and config.json says float16."""
    folder = exported("bpe", "float16")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert json.loads((folder / "config.json").read_text(encoding="utf-8"))["dtype"] == "float16"
    theirs = model.state_dict()
    ours = gpt.load_checkpoint(trained_checkpoint("bpe"))["model"]
    assert all(t.dtype == torch.float16 for t in theirs.values() if t.is_floating_point())
    for name, weight in ours.items():
        hf = theirs[name].t() if name.endswith(gpt.HF_CONV1D) else theirs[name]
        assert torch.equal(hf, weight.half()), name


# -----------------------------------------------------------------------------
# Bad input: one line, nothing written


def test_export_as_a_script_writes_the_folder_and_says_how_to_run_it(trained_checkpoint, tmp_path):
    """`python export.py CKPT --to hf --out DIR` in its own process: exit 0, one line naming the
    folder and how to run it, and a folder transformers loads."""
    out = tmp_path / "hf"
    result = run_script("export.py", trained_checkpoint("char"), "--to", "hf", "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out} from ") and 'pipeline("text-generation"' in result.stdout
    assert leftovers(out) == ["hf"]
    assert transformers.AutoConfig.from_pretrained(out).n_ctx == 32


def test_out_exists_needs_force_and_force_replaces_it(trained_checkpoint, tmp_path, monkeypatch, capsys):
    """An existing --out is an error without --force (and stays as it was); with --force the export
    replaces it whole (nothing of the old folder stays)."""
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("keep me", encoding="utf-8")
    args = [trained_checkpoint("char"), "--to", "hf", "--out", out]
    assert_one_line_error(main_in_process(monkeypatch, capsys, export.main, args), str(out), "--force")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    result = main_in_process(monkeypatch, capsys, export.main, [*args, "--force"])
    assert result.returncode == 0, result.stderr
    assert "old.txt" not in os.listdir(out) and (out / "model.safetensors").is_file()
    assert leftovers(out) == ["hf"]


def test_out_that_holds_the_checkpoint_is_refused_even_with_force(trained_checkpoint, tmp_path, monkeypatch,
                                                                   capsys):
    """--out naming the run folder of CKPT (or CKPT itself) would delete the checkpoint when replaced:
    one error line, and the checkpoint stays."""
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "best.pt"
    ckpt.write_bytes(trained_checkpoint("char").read_bytes())
    for out in (run, ckpt):
        result = main_in_process(monkeypatch, capsys, export.main, [run, "--to", "hf", "--out", out, "--force"])
        assert_one_line_error(result, "holds the checkpoint")
        assert os.listdir(run) == ["best.pt"] and gpt.load_checkpoint(ckpt)["model"]


@pytest.mark.parametrize("make_input, needle", [
    (lambda d: d / "missing.pt", "no such checkpoint"),
    (lambda d: write(d / "notes.txt", b"To be, or not to be"), "not a torch.save archive"),
    (lambda d: write(d / "random.pt", os.urandom(4096)), "not a torch.save archive"),
    (lambda d: torch.save({"weights": torch.zeros(3)}, d / "other.pt") or d / "other.pt", "not a checkpoint"),
])
def test_a_file_that_is_not_a_checkpoint_is_one_line_and_writes_nothing(make_input, needle, tmp_path, monkeypatch,
                                                                       capsys):
    """A missing path, a text file, random bytes named .pt and another program's torch.save file:
    each one error line naming the problem, and no folder at --out."""
    out = tmp_path / "hf"
    result = main_in_process(monkeypatch, capsys, export.main, [make_input(tmp_path), "--to", "hf", "--out", out])
    assert_one_line_error(result, needle)
    assert leftovers(out) == []


def write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("flags, needle", [
    (["--to", "safetensors"], "invalid choice: 'safetensors'"),
    (["--to", "hf", "--quant", "q8_0"], "--quant applies to --to gguf"),
])
def test_bad_flags_are_one_line_and_write_nothing(flags, needle, trained_checkpoint, tmp_path, monkeypatch, capsys):
    """An unknown format and --quant with --to hf: one error line naming the flag, nothing written."""
    out = tmp_path / "hf"
    result = main_in_process(monkeypatch, capsys, export.main, [trained_checkpoint("char"), *flags, "--out", out])
    assert_one_line_error(result, needle)
    assert leftovers(out) == []


@pytest.mark.parametrize("package", ["safetensors", "tokenizers"])
def test_missing_package_is_one_line_naming_the_pip_command(package, trained_checkpoint, tmp_path, monkeypatch,
                                                            capsys):
    """Without safetensors (the weights' format) or tokenizers (tokenizer.json), --to hf stops with
    one line saying what to install, and leaves nothing at --out."""
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    out = tmp_path / "hf"
    result = main_in_process(monkeypatch, capsys, export.main, [trained_checkpoint("char"), "--to", "hf", "--out", out])
    assert_one_line_error(result, f"pip install {package}")
    assert leftovers(out) == []


@pytest.mark.parametrize("failure", [UserError("a bad character"), KeyboardInterrupt(), OSError("disk full")])
def test_an_export_that_fails_midway_leaves_nothing(failure, trained_checkpoint, tmp_path, monkeypatch, capsys):
    """An export that has written part of its folder and then fails (a user's error, Ctrl-C, or a
    crash) leaves nothing at --out nor at its temporary name, and an existing --out as it was."""
    def half_written(model, tokenizer, out, dtype):
        out.mkdir()
        (out / "config.json").write_text("{}", encoding="utf-8")
        raise failure

    monkeypatch.setattr(export, "export_hf", half_written)
    out = tmp_path / "hf"
    args = [trained_checkpoint("char"), "--to", "hf", "--out", out]
    for extra in ([], ["--force"]):
        oserror = isinstance(failure, OSError)
        crash = pytest.raises(OSError, match="^disk full$") if oserror else contextlib.nullcontext()
        with crash:
            result = main_in_process(monkeypatch, capsys, export.main, [*args, *extra])
            assert result.returncode == (130 if isinstance(failure, KeyboardInterrupt) else 1)
        if extra:
            assert leftovers(out) == ["hf"] and os.listdir(out) == ["old.txt"]
        else:
            assert leftovers(out) == []
            out.mkdir()
            (out / "old.txt").write_text("keep me", encoding="utf-8")
