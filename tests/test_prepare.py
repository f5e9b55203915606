"""prepare.py: tokenizers round-trip, BPE via tiktoken equals the `tokenizers` library, chunked
encoding equals whole-document encoding, the bins and meta.json, the loader, and bad inputs."""
import hashlib
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_one_line_error, run_script
from hypothesis import given, settings, strategies as st

import prepare
import tokenizer
from common import UserError
from tokenizer import Tokenizer, load_tokenizer

EOT = 50256

RICH = [
    "",
    "a",
    "Hello, world! It's 3.14159 -- don't we'll they've I'm",
    "안녕하세요, 세계! 이 영화 정말 재밌어요ㅋㅋㅋ 강추!!",
    "👩‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 thumbs, 🇰🇷🇯🇵, 🧑🏿‍🚀",
    "combining: e\u0301 n\u0303 Z\u0324\u0354\u0367\u0311\u0313 \u0301 alone",
    "mixed: Привет мир, 你好世界, مرحبا بالعالم, שלום, नमस्ते, 한국어 and English",
    "a literal <|endoftext|> inside text<|endoftext|>",
    "  leading and trailing  ",
    "\t\ttabs\r\nand CRLF\r\n\n\n   \n",
    "\x00\x1c\x1f\x85\xa0\u2028\u2029\ufeff\u200b\u3000",
    " " * 10,
    "\n" * 5,
]


@pytest.fixture(scope="module")
def ko_text(korean_path):
    """A Korean slice plus a little English, small enough to train a BPE in about a second."""
    return korean_path.read_text(encoding="utf-8")[:150_000]


@pytest.fixture(scope="module")
def bpe(ko_text, shakespeare_path):
    english = shakespeare_path.read_text(encoding="utf-8")[:30_000]
    texts = (t for _, t in tokenizer.iter_pieces([ko_text, None, english, None], size=10_000))
    return tokenizer.bpe_tokenizer(tokenizer.train_bpe(texts, 1024))


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


def char_tokenizer(text):
    return Tokenizer("char", chars="".join(sorted(set(text))))


def read_bins(out):
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    bins = {s: np.fromfile(out / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")}
    return meta, bins


def docs_of(tokens, sep):
    """Split a bin's tokens at the one-token separator."""
    first, *rest = np.split(tokens, np.flatnonzero(tokens == sep))
    return [first.tolist()] + [part[1:].tolist() for part in rest]  # each of rest starts with sep


# --- tokenizers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "gpt2", "bpe"])
def test_round_trip_rich_fixture(kind, gpt2, bpe):
    """Lossy tokenizers (a byte fallback gap, an emoji ZWJ split mid-character) break decode(encode(s))."""
    tok = {"char": char_tokenizer("".join(RICH)), "gpt2": gpt2, "bpe": bpe}[kind]
    for s in RICH:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.encode_np(s).tolist() == ids
        assert all(0 <= i < tok.vocab_size for i in ids)


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_round_trip_any_text(bpe, gpt2, s):
    """Any Unicode string survives every tokenizer, including characters the BPE never saw."""
    for tok in (bpe, gpt2, char_tokenizer(s)):
        assert tok.decode(tok.encode(s)) == s


def test_endoftext_in_text_is_plain_text(gpt2, bpe):
    """A corpus that contains "<|endoftext|>" must not inject fake document boundaries."""
    for tok in (gpt2, bpe):
        ids = tok.encode("a <|endoftext|> b")
        assert tok.eot_id not in ids
        assert ids == tok.enc.encode_ordinary("a <|endoftext|> b")
    assert gpt2.eot_id == EOT and bpe.eot_id == bpe.vocab_size - 1


@pytest.mark.parametrize("d, message", [
    ({"kind": "char"}, "tokenizer description is incomplete or malformed (KeyError: 'chars')"),
    ({"kind": "bpe", "pattern": "x"}, "tokenizer description is incomplete or malformed (KeyError: 'ranks_file')"),
    ({"kind": "wordpiece"}, "unknown tokenizer kind 'wordpiece' (expected char, gpt2 or bpe)"),
    ({"kind": "char", "chars": ["b", "a"]},
     "char vocabulary is corrupt: it must be distinct single characters, sorted"),
    ({"kind": "gpt2", "vocab_size": 50304}, "tokenizer says vocab_size 50304 but holds 50257 tokens"),
    ([], "tokenizer description is incomplete or malformed (AttributeError: "),
])
def test_malformed_tokenizer_description_is_a_user_error(d, message, request):
    """A hand-edited meta.json or checkpoint must give one clear line, not a KeyError traceback."""
    if "gpt2" in str(d):
        request.getfixturevalue("shared_dir")  # GPT-2's BPE files
    with pytest.raises(UserError, match=f"^{re.escape(message)}"):
        tokenizer.tokenizer_from_dict(d)


@pytest.mark.parametrize("argv, message", [
    (["--val_fraction", "0"], "--val_fraction must be between 0 and 1, got 0.0"),
    (["--val_fraction", "1"], "--val_fraction must be between 0 and 1, got 1.0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--tokenizer", "bpe", "--vocab_size", "256"], "--vocab_size must be in [257, 1,048,576] for bpe"),
    (["--tokenizer", "bpe", "--vocab_size", "1048577"], "--vocab_size must be in [257, 1,048,576] for bpe"),
])
def test_a_setting_out_of_its_range_is_an_error_naming_the_range(argv, message):
    """A setting outside its range is refused before any work, by a message naming the setting and
    its range."""
    with pytest.raises(UserError, match=f"^{re.escape(message)}"):
        prepare.parse_args(argv)


def test_the_ends_of_a_closed_range_are_accepted():
    assert prepare.parse_args(["--tokenizer", "bpe", "--vocab_size", "257"]).vocab_size == 257
    assert prepare.parse_args(["--tokenizer", "bpe", "--vocab_size", "1048576"]).vocab_size == 1 << 20
    assert prepare.parse_args(["--seed", "0", "--workers", "1"]).seed == 0


def test_char_unknown_character_names_it():
    """A KeyError (or a silent wrong id) instead of telling the user which character is missing."""
    with pytest.raises(UserError, match=r"'é' \(U\+00E9\)"):
        char_tokenizer("abc").encode("abé")


def test_decode_tolerates_ids_outside_the_vocabulary(gpt2):
    """A model whose head is padded past the vocabulary (50304) can sample ids the tokenizer lacks."""
    assert gpt2.decode([40, 50300]) == "I\ufffd"
    assert char_tokenizer("ab").decode([0, 7, 1]) == "a\ufffdb"


def test_bpe_through_tiktoken_equals_the_tokenizers_library(ko_text, shakespeare_path):
    """Converting `tokenizers`' byte-level vocab/merges to tiktoken ranks could silently change the
    tokenization (wrong byte map, merge order); both libraries must cut text identically."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    english = shakespeare_path.read_text(encoding="utf-8")
    train, held = ko_text[:100_000], ko_text[100_000:]
    ranks = tokenizer.train_bpe([train], 2048)
    enc = tokenizer.bpe_tokenizer(ranks).enc

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.train_from_iterator([train], trainers.BpeTrainer(
        vocab_size=2047, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    byte_of = {c: b for b, c in tokenizer.bytes_to_unicode().items()}
    assert {bytes(byte_of[c] for c in t) for t in hf.get_vocab()} == set(ranks)
    for text in (train[:30_000], held[:30_000], english[:30_000], "".join(RICH[:7])):
        ours = [enc.decode_single_token_bytes(i) for i in enc.encode_ordinary(text)]
        theirs = [bytes(byte_of[c] for c in t) for t in hf.encode(text).tokens]
        assert ours == theirs


def test_ranks_file_is_tiktoken_format(bpe, tmp_path):
    """tokenizer.bpe must be readable by tiktoken's own .tiktoken loader (the documented format)."""
    from tiktoken.load import load_tiktoken_bpe

    path = tmp_path / "tokenizer.bpe"
    path.write_text(bpe.ranks, encoding="utf-8")
    assert load_tiktoken_bpe(str(path)) == bpe.enc._mergeable_ranks


# --- reading and cutting the corpus ---------------------------------------------------------------

TRICKY = " \n\t\r\x0b\x0c\x1c\x85\xa0\u2028\u3000ab1'sé한😀\u0301-.,<|>"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=TRICKY, max_size=60), st.integers(1, 8))
def test_pieces_encode_like_the_whole_document(gpt2, bpe, text, size):
    """A chunk cut inside a GPT-2 pre-token (e.g. inside a whitespace run) changes the tokens."""
    pieces = [t for _, t in tokenizer.iter_pieces([text, None], size=size)]
    assert "".join(pieces) == text
    for tok in (gpt2, bpe):
        assert sum((tok.encode(p) for p in pieces), []) == tok.encode(text)


def test_pieces_of_real_text_encode_like_the_whole(gpt2, bpe, shakespeare_path, ko_text):
    """The same on whole corpora (English, Korean, --clean's single-line text with no newlines)."""
    english = shakespeare_path.read_text(encoding="utf-8")[:100_000]
    for tok, text in ((gpt2, english), (bpe, ko_text), (gpt2, " ".join(english.split()))):
        pieces = [t for _, t in tokenizer.iter_pieces([text, None], size=2_000)]
        assert len(pieces) > 10 and "".join(pieces) == text
        assert np.concatenate([tok.encode_np(p) for p in pieces]).tolist() == tok.encode(text)


def stream_to_docs(stream):
    docs, cur = [], []
    for block in stream:
        if block is None:
            docs.append("".join(cur))
            cur = []
        else:
            cur.append(block)
    return docs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="ab\n \t", max_size=12), max_size=8), st.sampled_from(["\n", "\n\n", "ab\n"]))
def test_split_docs_across_block_boundaries(blocks, sep):
    """A separator that straddles two read blocks must still split documents."""
    docs = stream_to_docs([*prepare.split_blocks(iter(blocks), sep), None])
    assert docs == "".join(blocks).split(sep)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="ab \n\t\u3000", max_size=12), max_size=8))
def test_clean_collapses_whitespace_across_blocks(blocks):
    """A whitespace run split between read blocks must still become one space (not two, not none)."""
    docs = stream_to_docs(prepare.clean_blocks([*blocks, None]))
    assert docs == [" ".join("".join(blocks).split())]


def test_read_blocks_reports_the_byte_offset_and_drops_a_bom(tmp_path, monkeypatch):
    """An offset relative to the block (not the file), or a BOM that becomes a vocabulary entry."""
    monkeypatch.setattr(prepare, "BLOCK_BYTES", 4)  # the bad byte lands in a later block
    path = tmp_path / "x.txt"
    path.write_bytes("\ufeff한국어 ok".encode() + b"\xff!")
    with pytest.raises(UserError, match=r"x\.txt: byte 15 is not valid UTF-8"):
        list(prepare.read_blocks(path, "strict", lambda data: None))
    assert "".join(prepare.read_blocks(path, "replace", lambda data: None)) == "한국어 ok\ufffd!"


def test_read_blocks_turns_crlf_and_cr_into_lf(tmp_path, monkeypatch):
    """Every CRLF and lone CR reads as LF, also when a CRLF straddles two read blocks: no '\r' in
    a char vocabulary or among GPT-2 BPE tokens."""
    path = tmp_path / "x.txt"
    text = "\ufeffa\r\nb\rc\r\n\r\n한\r\r\nd\n\re\r"
    path.write_bytes(text.encode())
    for block_bytes in range(1, 9):  # every split of every CRLF and of the 3-byte 한
        monkeypatch.setattr(prepare, "BLOCK_BYTES", block_bytes)
        assert "".join(prepare.read_blocks(path, "strict", lambda data: None)) == "a\nb\nc\n\n한\n\nd\n\ne\n"
    assert prepare.parse_args(["--split_docs", r"\r\n\r\n"]).split_docs == "\n\n", "it would never match"


def test_crlf_and_lf_files_give_the_same_dataset(tiny_corpus, tmp_path):
    """The same text saved with Windows line ends must give identical bins and vocabulary."""
    text = tiny_corpus.read_text(encoding="utf-8")
    metas, bins = [], []
    for name, newline in (("lf", "\n"), ("crlf", "\r\n")):
        corpus = tmp_path / f"{name}.txt"
        corpus.write_bytes(text.replace("\n", newline).encode())
        r = run_script("prepare.py", "--input", corpus, "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
        meta, b = read_bins(tmp_path / name)
        metas.append(meta)
        bins.append(b)
    assert metas[0]["tokenizer"] == metas[1]["tokenizer"] and "\r" not in metas[1]["tokenizer"]["chars"]
    assert all((bins[0][s] == bins[1][s]).all() for s in ("train", "val"))


def one_document_text(out):
    """The text of a dataset of one document: its train tokens, then its val tokens, decoded."""
    meta, bins = read_bins(out)
    assert meta["split"] == "single_document_tail"
    return load_tokenizer(out).decode(np.concatenate([bins["train"], bins["val"]]).tolist())


def test_clean_makes_each_whitespace_run_of_the_corpus_one_space(tiny_corpus, tmp_path):
    """prepare.py --clean: the dataset holds the corpus with each run of whitespace (newlines, tabs,
    ideographic spaces) one space, and none at its ends."""
    text = "\t " + tiny_corpus.read_text(encoding="utf-8").replace("\n\n", "\n \t\n").replace(", ", ",\u3000") + "  \n"
    corpus = tmp_path / "spaced.txt"
    corpus.write_text(text, encoding="utf-8")
    prepare.main(["--input", str(corpus), "--clean", "--out", str(tmp_path / "clean")])
    assert one_document_text(tmp_path / "clean") == " ".join(text.split())
    assert not set(load_tokenizer(tmp_path / "clean").chars) & set("\n\t\u3000")


def test_errors_replace_reads_undecodable_bytes_as_u_fffd(tiny_corpus, tmp_path):
    """prepare.py --errors replace: a byte that is not UTF-8 (a stray one, a cut-short sequence)
    reads as U+FFFD, the rest of the corpus as it is; without it, the file and offset stop the run."""
    data = tiny_corpus.read_bytes()
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(data[:1000] + b"\xff" + data[1000:20_000] + b"\xc3(" + data[20_000:])
    with pytest.raises(UserError, match=re.escape(f"{corpus}: byte 1000 is not valid UTF-8")):
        prepare.main(["--input", str(corpus), "--out", str(tmp_path / "strict")])
    prepare.main(["--input", str(corpus), "--errors", "replace", "--out", str(tmp_path / "replaced")])
    text = data.decode()
    replaced = text[:1000] + "\ufffd" + text[1000:20_000] + "\ufffd(" + text[20_000:]
    assert one_document_text(tmp_path / "replaced") == replaced


def test_choose_val_docs():
    """A split that changes between runs, puts an empty document or every document in val."""
    sizes = [10] * 100 + [0] + [5] * 50
    a = prepare.choose_val_docs(sizes, 0.1, seed=1)
    assert (a == prepare.choose_val_docs(sizes, 0.1, seed=1)).all()
    assert (a != prepare.choose_val_docs(sizes, 0.1, seed=2)).any()
    held = np.asarray(sizes)[a].sum() / sum(sizes)
    assert 0.1 <= held < 0.1 + 10 / sum(sizes)
    assert not a[100], "an empty document must never be the val split"
    assert prepare.choose_val_docs([0, 7, 0], 0.1, 0) is None  # one real document: split its tail
    for seed in range(10):
        ten = prepare.choose_val_docs([500] * 10, 0.9, seed)
        assert ten.sum() == 9, "val never gets every document"


def test_one_file_per_language_is_split_by_tails():
    """A val of fewer than MIN_VAL_DOCS whole documents is cut from every document's tail instead:
    with English 100k characters beside Korean 11k, the Korean file alone is ~10% of the text, and
    as val it would be 41% of the tokens, with neither BPE nor model seeing any Korean."""
    for seed in range(20):
        assert prepare.choose_val_docs([100_000, 11_000], 0.1, seed) is None
        assert prepare.choose_val_docs([100_000, 11_000, 9_000, 2_000], 0.1, seed) is None


@pytest.mark.parametrize("sizes", [[2_000, 30_000], [30_000, 2_000, 1_000], [60, 20, 20], [1, 1, 1, 5, 95]])
def test_val_share_of_whole_documents_stays_near_val_fraction(sizes):
    """Whole documents make val only when they hold [0.5x, 1.5x] of val_fraction (one big document
    would put 60-90% of the corpus in val); otherwise every document is cut at its tail (None)."""
    for seed in range(20):
        is_val = prepare.choose_val_docs(sizes, 0.1, seed)
        if is_val is not None:
            share = np.asarray(sizes)[is_val].sum() / sum(sizes)
            assert 0.05 <= share <= 0.15, (seed, is_val)
            assert not is_val.all()


def test_many_equal_documents_still_split_by_whole_documents():
    """The fallback (each document's tail) must not replace the document split where it works."""
    for seed in range(20):
        is_val = prepare.choose_val_docs([100] * 50, 0.1, seed)
        assert is_val is not None and is_val.sum() == 5


def test_token_dtype():
    """Off by one at the boundary: vocab_size 65,536 still fits uint16 (largest id 65,535)."""
    assert tokenizer.token_dtype(65) == np.uint16
    assert tokenizer.token_dtype(65_536) == np.uint16  # ids 0..65535
    assert tokenizer.token_dtype(65_537) == np.uint32


def test_default_out_and_separator_escapes():
    """`python prepare.py` must write data/shakespeare_char (config/small.py's dataset), and a
    shell-quoted '\\n\\n' must mean a blank line without mangling non-ASCII separators."""
    def out(*argv):
        return prepare.default_out(prepare.parse_args(list(argv)))

    assert out() == Path("data/shakespeare_char") and out("--tokenizer", "gpt2") == Path("data/shakespeare_gpt2")
    assert out("--input", "corpora/books/") == Path("data/books")
    assert out("--input", "https://example.com/a/input.txt", "x.txt") == Path("data/input")
    assert prepare.parse_args(["--split_docs", r"\n\n"]).split_docs == "\n\n"
    assert prepare.parse_args(["--split_docs", r"한\t"]).split_docs == "한\t"


def test_an_input_given_twice_is_read_once(tmp_path, capsys):
    """A file given twice, or a folder plus a file inside it, is read once, in first-seen order:
    read twice, the same text could sit in train and in val (val = leaked train)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text(name, encoding="utf-8")
    a, b = folder / "a.txt", folder / "b.txt"
    dotted = f"{tmp_path}/mixed/../mixed/b.txt"  # another spelling of b.txt
    files = prepare.resolve_inputs([str(b), str(folder), dotted, str(b)], "*.txt", tmp_path / "out")
    assert files == [(b, None), (a, None)]
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1 and "given more than once" in notice and dotted in notice


def test_a_file_given_twice_is_one_document(tiny_corpus, out_dir):
    """`--input shk.txt shk.txt` is one document (not train 200,000 tokens and val the same 200,000)."""
    r = run_script("prepare.py", "--input", tiny_corpus, tiny_corpus, "--out", out_dir)
    assert r.returncode == 0, r.stderr
    meta, bins = read_bins(out_dir)
    assert len(meta["inputs"]) == 1 and meta["split"] == "single_document_tail"
    assert len(bins["train"]) + len(bins["val"]) == len(tiny_corpus.read_text(encoding="utf-8"))


def test_help_shows_the_defaults(capsys):
    """--help shows the default of every flag that has one."""
    with pytest.raises(SystemExit):
        prepare.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: char)", "(default: '*.txt')", "(default: strict)", "(default: 0.1)",
                    "(default: 1337)", "(default: 8192)"):
        assert default in shown, default


def test_download_caches_and_fails_in_one_line(tmp_path, monkeypatch):
    """No network must give an actionable message, and a cached download must not need network."""
    monkeypatch.setattr(prepare, "CACHE_DIR", tmp_path / "cache")
    calls = []

    class Response:
        def __init__(self, url, timeout):
            calls.append(url)
            self.data = [b"to be or not", b""]

        def read(self, n=-1):
            return self.data.pop(0)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(urllib.request, "urlopen", Response)
    url = "https://example.com/corpus/input.txt"
    assert prepare.download(url, Path("data/input")).read_text() == "to be or not"
    assert prepare.download(url, Path("data/input")).read_text() == "to be or not" and len(calls) == 1

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="--input PATH") as e:
        prepare.main([])  # the default corpus, not cached here
    assert "\n" not in str(e.value) and prepare.SHAKESPEARE_URL in str(e.value)
    assert not list((tmp_path / "cache").glob("*.tmp"))


def offline(url, timeout):
    raise urllib.error.URLError("Name or service not known")


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_the_offline_hint_writes_the_dataset_the_default_would(tokenizer, shakespeare_path, tmp_path, monkeypatch):
    """Offline, `python prepare.py` names the flags that use a local copy of the corpus instead,
    and those flags write the dataset the download would have: for the char tokenizer the one
    config/small.py trains on (a local file's own name would make it data/input)."""
    import batches  # the route from a config's dataset name to its folder
    import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare, "CACHE_DIR", Path("data/.cache"))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as e:
        prepare.main(["--tokenizer", tokenizer])
    hint = re.fullmatch(r"could not download \S+ \(.*\); to use a local copy instead, pass (--input PATH .*)",
                        str(e.value))
    assert hint, str(e.value)
    local = tmp_path / "downloads" / "input.txt"
    local.parent.mkdir()
    local.write_bytes(shakespeare_path.read_bytes())
    prepare.main(["--tokenizer", tokenizer, *hint.group(1).replace("PATH", str(local)).split()])
    if tokenizer == "char":
        dataset = train.load_config([str(ROOT / "config" / "small.py")])["dataset"]
        assert load_tokenizer(batches.dataset_dir(dataset)).vocab_size == 65
    assert [p.name for p in (tmp_path / "data").iterdir()] == [f"shakespeare_{tokenizer}"]


def test_a_misspelt_flag_is_one_line_naming_the_closest_flag(tmp_path):
    """`python prepare.py --tokeniser gpt2`: one error line, no usage text, no traceback, that names
    the flag meant; nothing is written."""
    r = run_script("prepare.py", "--tokeniser", "gpt2", "--out", tmp_path / "out")
    assert_one_line_error(r, "unknown flag --tokeniser", "Did you mean --tokenizer?")
    assert r.stdout == "" and not (tmp_path / "out").exists()


def test_a_failed_download_leaves_no_empty_cache_folder(tmp_path, monkeypatch):
    """A failed download (offline, a bad URL) leaves no empty data/.cache/ behind: folders the
    download created are removed when empty; folders that were there stay."""
    monkeypatch.setattr(prepare, "CACHE_DIR", tmp_path / "data" / ".cache")
    url = "http://127.0.0.1:9/x.txt"  # the discard port: refused at once, no network needed
    with pytest.raises(UserError, match="could not download"):
        prepare.download(url, tmp_path / "data" / "x")
    assert not (tmp_path / "data").exists()
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError, match="could not download"):
        prepare.download(url, tmp_path / "data" / "x")
    assert list(tmp_path.rglob("*")) == [tmp_path / "data"]


# --- datasets (prepare.py as a user runs it) -------------------------------------------------------


def test_default_char_dataset_matches_nanogpt(shakespeare_path, out_dir):
    """The default dataset must be nanoGPT's shakespeare_char: 65 sorted chars, a 90/10 cut."""
    r = run_script("prepare.py", "--input", shakespeare_path, "--out", out_dir)
    assert r.returncode == 0, r.stderr
    meta, bins = read_bins(out_dir)
    text = shakespeare_path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(text)
    assert meta["tokenizer"]["chars"] == chars and meta["vocab_size"] == 65 and meta["eot_id"] is None
    assert bins["train"].tolist() == [stoi[c] for c in text[:int(n * 0.9)]]
    assert bins["val"].tolist() == [stoi[c] for c in text[int(n * 0.9):]]
    assert meta["split"] == "single_document_tail" and meta["tokens"] == {"train": 1_003_854, "val": 111_540}
    assert meta["inputs"][0]["sha256"] == hashlib.sha256(shakespeare_path.read_bytes()).hexdigest()


@pytest.fixture
def doc_dir(shakespeare_path, tmp_path):
    """40 documents in nested folders, plus files that must be ignored (hidden, other suffix)."""
    text = shakespeare_path.read_text(encoding="utf-8")
    paragraphs = text.split("\n\n")
    root = tmp_path / "docs"
    for i in range(40):
        p = "\n\n".join(paragraphs[4 * i:4 * i + 4])
        path = root / f"part{i % 3}" / f"{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{i} {p}", encoding="utf-8")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    (root / "notes.md").write_text("not text", encoding="utf-8")
    return root


def test_gpt2_dataset_is_encode_ordinary_plus_separators(doc_dir, out_dir, gpt2):
    """Documents lost, reordered or merged across a split, or a count that is not tiktoken's."""
    r = run_script("prepare.py", "--input", doc_dir, "--tokenizer", "gpt2", "--out", out_dir, "--workers", "1")
    assert r.returncode == 0, r.stderr
    meta, bins = read_bins(out_dir)
    files = sorted(p for p in doc_dir.rglob("*.txt") if ".hidden" not in p.parts)
    want = [gpt2.enc.encode_ordinary(p.read_text(encoding="utf-8")) for p in files]
    got = {s: docs_of(bins[s], EOT) for s in bins}
    assert meta["documents"] == {s: len(got[s]) for s in got} and len(got["val"]) >= 1
    # each split is its documents in corpus order; together they are the corpus
    assert [d for d in want if d in got["train"]] == got["train"]
    assert [d for d in want if d in got["val"]] == got["val"]
    assert sorted(got["train"] + got["val"]) == sorted(want)
    n = sum(map(len, want))
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == n + len(want) - 2  # one EOT between docs
    assert [i["path"] for i in meta["inputs"]] == [str(p) for p in files]


def test_meta_json_schema(doc_dir, out_dir):
    """meta.json must describe the bins completely: a missing field breaks train.py's reader."""
    r = run_script("prepare.py", "--input", doc_dir, "--tokenizer", "gpt2", "--out", out_dir, "--seed", "7")
    assert r.returncode == 0, r.stderr
    meta, bins = read_bins(out_dir)
    assert set(meta) == {"format_version", "tokenizer", "vocab_size", "eot_id", "dtype", "tokens", "documents",
                         "doc_separator", "split", "val_fraction", "seed", "inputs", "options", "skipped_records"}
    assert meta["skipped_records"] == 0 and meta["format_version"] == 1 and meta["tokenizer"] == {"kind": "gpt2", "vocab_size": 50257, "eot_id": EOT}
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (50257, EOT, "uint16")
    assert meta["tokens"] == {s: len(b) for s, b in bins.items()}
    assert (meta["split"], meta["val_fraction"], meta["seed"], meta["doc_separator"]) == ("by_document", 0.1, 7, [EOT])
    for entry in meta["inputs"]:
        data = open(entry["path"], "rb").read()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    assert not list(out_dir.glob("*.tmp"))


def test_document_split_is_deterministic_given_seed(tiny_corpus, tmp_path):
    """The split must depend on --seed alone (not on hash randomisation or worker timing)."""
    def split(seed, name):
        out = tmp_path / name
        r = run_script("prepare.py", "--input", tiny_corpus, "--split_docs", r"\n\n", "--seed", seed, "--out", out)
        assert r.returncode == 0, r.stderr
        return read_bins(out)

    meta, a = split(1, "a")
    _, b = split(1, "b")
    _, c = split(2, "c")
    assert all((a[s] == b[s]).all() for s in a)
    assert len(a["val"]) != len(c["val"]) or (a["val"] != c["val"]).any()
    assert meta["split"] == "by_document" and meta["documents"]["val"] > 1
    # char documents are joined by their separator, so each split reads as the original text does
    tok = load_tokenizer(tmp_path / "a")
    paragraphs = tiny_corpus.read_text(encoding="utf-8").split("\n\n")
    assert all(p in paragraphs for p in tok.decode(a["val"]).split("\n\n"))


@pytest.mark.slow
def test_workers_give_identical_bins(shakespeare_path, tmp_path):
    """The process pool must return pieces in order: any reordering corrupts the text or sends a
    document to the wrong split. 10 MB: more batches than the pool keeps in flight."""
    corpus = tmp_path / "big.txt"
    corpus.write_text(shakespeare_path.read_text(encoding="utf-8") * 9, encoding="utf-8")
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        r = run_script("prepare.py", "--input", corpus, "--tokenizer", "gpt2", "--split_docs", r"\n\n",
                       "--out", out, "--workers", workers)
        assert r.returncode == 0, r.stderr
        outs.append(read_bins(out)[1])
    assert all((outs[0][s] == outs[1][s]).all() for s in ("train", "val"))


def test_workers_after_bpe_training_give_identical_bins(ko_text, tmp_path):
    """After training a BPE the pool spawns fresh interpreters (fork is unsafe once `tokenizers`
    has started its threads) which must receive the trained tokenizer whole."""
    corpus = tmp_path / "ko.txt"
    corpus.write_text(ko_text[:200_000], encoding="utf-8")
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        r = run_script("prepare.py", "--input", corpus, "--tokenizer", "bpe", "--vocab_size", 500,
                       "--split_docs", r"\n", "--out", out, "--workers", workers)
        assert r.returncode == 0, r.stderr
        outs.append(read_bins(out)[1])
    assert all((outs[0][s] == outs[1][s]).all() for s in ("train", "val"))
    assert len(outs[0]["train"]) > 1000


def test_a_small_and_a_big_file_keep_val_near_val_fraction(shakespeare_path, tmp_path):
    """`--input my_notes/` with a big and a small file: two documents cannot hold ~10% whole (the
    big one would be 60% of the tokens), so each is cut at its tail."""
    text = shakespeare_path.read_text(encoding="utf-8")
    notes = tmp_path / "my_notes"
    notes.mkdir()
    (notes / "big.txt").write_text(text[:30_000], encoding="utf-8")
    (notes / "small.txt").write_text(text[50_000:70_000], encoding="utf-8")
    out = tmp_path / "notes"
    r = run_script("prepare.py", "--input", notes, "--out", out)
    assert r.returncode == 0, r.stderr
    meta, bins = read_bins(out)
    assert 0.05 <= len(bins["val"]) / (len(bins["train"]) + len(bins["val"])) <= 0.15
    assert meta["split"] == "document_tails" and meta["documents"] == {"train": 2, "val": 2}
    assert "last 10% of every document" in r.stderr


def test_a_big_korean_file_beside_english_ones_is_in_both_splits(korean_path, shakespeare_path, tmp_path):
    """Each document's tail goes to val (not the whole Korean file, 89% of the tokens, leaving a
    "Korean" BPE trained on English only): both languages are in both splits, and each
    document's train part followed by its val part is its whole encoding."""
    english = shakespeare_path.read_text(encoding="utf-8")
    texts = {"a_en.txt": english[:10_000], "b_ko.txt": korean_path.read_text(encoding="utf-8")[:30_000],
             "c_en.txt": english[20_000:30_000]}
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name, text in texts.items():
        (mixed / name).write_text(text, encoding="utf-8")
    out = tmp_path / "mix_bpe"
    r = run_script("prepare.py", "--input", mixed, "--tokenizer", "bpe", "--vocab_size", 400, "--out", out)
    assert r.returncode == 0, r.stderr
    meta, bins = read_bins(out)
    tok = load_tokenizer(out)
    assert 0.05 <= len(bins["val"]) / (len(bins["train"]) + len(bins["val"])) <= 0.15
    hangul = re.compile("[\uac00-\ud7a3]")
    assert hangul.search(tok.decode(bins["train"])) and hangul.search(tok.decode(bins["val"]))
    assert len(tok.encode("영화")) < 6, "the BPE learned no Korean (6 bytes = 6 tokens)"
    train, val = docs_of(bins["train"], tok.eot_id), docs_of(bins["val"], tok.eot_id)
    for i, text in enumerate(texts.values()):
        n = len(tok.encode(text))
        assert train[i] + val[i] == tok.encode(text) and len(train[i]) == int(n * 0.9)


def test_bpe_learns_from_the_train_split_only(tmp_path):
    """Twenty documents, each one made-up word repeated: a BPE trained on a document's text makes
    its word one token. The val documents' words must stay in pieces (the tokenizer never saw
    them), the train documents' words must not."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("bcdfghjklmnpqrstvwxz"), 8)) for _ in range(20)]
    corpus = tmp_path / "words.txt"
    corpus.write_text("\n\n".join(" ".join([w] * 300) for w in words), encoding="utf-8")
    out = tmp_path / "out"
    r = run_script("prepare.py", "--input", corpus, "--tokenizer", "bpe", "--vocab_size", 600,
                   "--split_docs", r"\n\n", "--val_fraction", 0.2, "--out", out)
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer(out)
    _, bins = read_bins(out)
    val_words = set(tok.decode(bins["val"]).split())
    assert 0 < len(val_words) < len(words)
    for w in words:
        assert (len(tok.encode(" " + w)) > 1) == (w in val_words), w


def test_bpe_of_one_document_learns_from_its_train_part_only(tmp_path):
    corpus = tmp_path / "one.txt"
    corpus.write_text("trainword " * 9000 + "valword " * 1000, encoding="utf-8")
    out = tmp_path / "out"
    r = run_script("prepare.py", "--input", corpus, "--tokenizer", "bpe", "--vocab_size", 400, "--out", out)
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer(out)
    assert len(tok.encode(" trainword")) == 1
    assert len(tok.encode(" valword")) > 1


def test_bpe_smaller_than_asked_says_so(tmp_path):
    """A corpus that runs out of merges before --vocab_size says so, with the size asked, not only
    the size trained."""
    corpus = tmp_path / "small.txt"
    corpus.write_text("the cat sat on the mat\n" * 400, encoding="utf-8")
    out = tmp_path / "out"
    r = run_script("prepare.py", "--input", corpus, "--tokenizer", "bpe", "--vocab_size", 5000, "--out", out)
    assert r.returncode == 0, r.stderr
    n = read_bins(out)[0]["vocab_size"]
    assert n < 300 and f"BPE of {n:,} tokens, not the 5,000 asked" in r.stderr


def test_bpe_dataset_and_loader_routes(ko_text, tmp_path):
    """Every way train.py/sample.py get a tokenizer (dir, meta.json, dict, checkpoint alone) must
    give the same encoder, and the bins must decode to the corpus."""
    import torch

    corpus = tmp_path / "ko.txt"
    corpus.write_text(ko_text[:60_000], encoding="utf-8")
    out = tmp_path / "ko"
    r = run_script("prepare.py", "--input", corpus, "--tokenizer", "bpe", "--vocab_size", 600,
                   "--split_docs", r"\n", "--out", out)
    assert r.returncode == 0, r.stderr
    meta, bins = read_bins(out)
    assert meta["tokenizer"]["ranks_file"] == "tokenizer.bpe" and (out / "tokenizer.bpe").is_file()
    assert meta["vocab_size"] == 600 and meta["eot_id"] == 599 and meta["doc_separator"] == [599]
    tok = load_tokenizer(out)
    lines = [line for line in ko_text[:60_000].split("\n") if line]
    docs = [tok.decode(d) for s in ("train", "val") for d in docs_of(bins[s], 599)]
    assert sorted(docs) == sorted(lines)

    ckpt = tmp_path / "elsewhere" / "ckpt.pt"
    ckpt.parent.mkdir()
    torch.save({"tokenizer": tok.to_dict(), "iter_num": 0}, ckpt)
    routes = [load_tokenizer(out / "meta.json"), load_tokenizer(str(out)), load_tokenizer(tok.to_dict()), tok]
    (out / "tokenizer.bpe").unlink()  # the checkpoint carries its ranks: no other file needed
    routes.append(load_tokenizer(ckpt))
    sample = "".join(RICH) + ko_text[-2000:]
    for other in routes:
        assert other.to_dict() == tok.to_dict()
        assert other.encode(sample) == tok.encode(sample)


def test_reuse_tokenizer_from_a_dataset(tiny_corpus, tmp_path):
    """Fine-tuning text must be encoded with the model's vocabulary, not a new one."""
    base, new = tmp_path / "base", tmp_path / "new"
    assert run_script("prepare.py", "--input", tiny_corpus, "--out", base).returncode == 0
    text = tiny_corpus.read_text(encoding="utf-8")
    extra = tmp_path / "extra.txt"
    extra.write_text(text[20_000:] + text[:3_000], encoding="utf-8")
    r = run_script("prepare.py", "--input", extra, "--tokenizer", base / "meta.json", "--out", new)
    assert r.returncode == 0, r.stderr
    meta, bins = read_bins(new)
    tok = load_tokenizer(base)
    assert meta["tokenizer"] == json.loads((base / "meta.json").read_text())["tokenizer"]
    assert np.concatenate([bins["train"], bins["val"]]).tolist() == tok.encode(extra.read_text(encoding="utf-8"))

    extra.write_text(text[:3_000] + "ünïcode", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in new.iterdir()}
    r = run_script("prepare.py", "--input", extra, "--tokenizer", base, "--out", new)
    assert_one_line_error(r, "'ü'", "U+00FC")
    assert {p.name: p.read_bytes() for p in new.iterdir()} == before, "a failed run must leave the dataset alone"


def test_replacing_a_dataset_made_with_another_tokenizer_says_so(tiny_corpus, out_dir):
    """Re-preparing data/x with another tokenizer is allowed (a normal workflow) but says what it
    replaced, since checkpoints trained on it no longer match; with the same tokenizer it says
    nothing."""
    def prepare_with(*args):
        r = run_script("prepare.py", "--input", tiny_corpus, "--out", out_dir, *args)
        assert r.returncode == 0, r.stderr
        return r.stderr

    assert "replacing" not in prepare_with()
    assert "replacing" not in prepare_with()
    notice = [line for line in prepare_with("--tokenizer", "gpt2").splitlines() if "replacing" in line]
    assert notice == [f"replacing {out_dir} (char -> gpt2): checkpoints trained on it no longer match"]
    assert load_tokenizer(out_dir).kind == "gpt2"


def test_tokenizer_given_a_file_inside_a_dataset_suggests_the_folder(tmp_path):
    """`--tokenizer data/ko_bpe/tokenizer.bpe` (a file inside a dataset) says to pass the dataset
    folder instead, not torch's mmap error text."""
    dataset = tmp_path / "ko_bpe"
    dataset.mkdir()
    (dataset / "meta.json").write_text("{}", encoding="utf-8")
    (dataset / "tokenizer.bpe").write_text("IQ== 0\n", encoding="utf-8")
    (tmp_path / "ok.txt").write_text("hello world\n" * 500, encoding="utf-8")
    r = run_script("prepare.py", "--input", tmp_path / "ok.txt", "--tokenizer", dataset / "tokenizer.bpe",
                   "--out", tmp_path / "out")
    assert_one_line_error(r, "tokenizer.bpe", f"pass the dataset folder that holds it: {dataset}")
    assert "mmap" not in r.stderr and "torch" not in r.stderr


def test_uint32_bins_for_a_large_vocabulary(tiny_corpus, tmp_path):
    """Ids above 65,535 written as uint16 would wrap around silently."""
    # every byte pair (ranks 0..65535), then the single bytes: a lone byte's id is above 65,535
    ranks = {bytes([a, b]): a * 256 + b for a in range(256) for b in range(256)}
    ranks |= {bytes([b]): 65_536 + b for b in range(256)}
    big = tokenizer.bpe_tokenizer(ranks)
    assert big.vocab_size == 65_793
    src = tmp_path / "big.json"
    src.write_text(json.dumps({"tokenizer": big.to_dict()}), encoding="utf-8")
    out = tmp_path / "out"
    r = run_script("prepare.py", "--input", tiny_corpus, "--tokenizer", src, "--out", out)
    assert r.returncode == 0, r.stderr
    meta, bins = read_bins(out)
    tokens = np.concatenate([bins["train"], bins["val"]])
    assert meta["dtype"] == "uint32" and tokens.max() > 65_535
    assert big.decode(tokens) == tiny_corpus.read_text(encoding="utf-8")


BAD_INPUTS = {  # case: (arguments, fragments the error line must contain)
    "missing": (["--input", "{tmp}/nope.txt"], ["nope.txt", "no such file"]),
    "no_match": (["--input", "{tmp}/sub"], ["no files matching", "--glob"]),
    "empty": (["--input", "{tmp}/empty.txt"], ["empty corpus"]),
    "too_small": (["--input", "{tmp}/small.txt"], ["too small"]),
    "undecodable": (["--input", "{tmp}/binary.txt"], ["binary.txt", "byte 6", "--errors replace"]),
    "unknown_tokenizer": (["--input", "{tmp}/ok.txt", "--tokenizer", "sentencepiece"], ["unknown tokenizer"]),
    "char_vocab_too_big": (["--input", "{tmp}/cjk.txt"], ["70,000 distinct characters", "bpe"]),
    "bpe_vocab_small": (["--input", "{tmp}/ok.txt", "--tokenizer", "bpe", "--vocab_size", "100"], ["--vocab_size", "100"]),
    "bpe_vocab_big": (["--input", "{tmp}/ok.txt", "--tokenizer", "bpe", "--vocab_size", "16777216"], ["--vocab_size"]),
    "bad_flag": (["--input", "{tmp}/ok.txt", "--errors", "ignore"], ["--errors"]),
    "cut_short_escape": (["--input", "{tmp}/ok.txt", "--split_docs", "\\x4"], ["--split_docs", "escape"]),
    "trailing_backslash": (["--input", "{tmp}/ok.txt", "--split_docs", "END\\"], ["--split_docs END\\"]),
    "negative_seed": (["--input", "{tmp}/ok.txt", "--seed", "-1"], ["--seed"]),
    "absolute_glob": (["--input", "{tmp}/sub", "--glob", "{tmp}/*.txt"], ["--glob", "relative"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line(case, tmp_path):
    """Each user mistake must end in one `error:` line naming the problem, never a traceback, and
    leave no --out folder behind, also when the mistake shows up after the folder is made (a
    corpus too small, an impossible BPE vocabulary)."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "small.txt").write_text("hello world\n" * 5, encoding="utf-8")
    (tmp_path / "ok.txt").write_text("hello world\n" * 500, encoding="utf-8")
    (tmp_path / "binary.txt").write_bytes(b"hello \xff world\n" * 100)
    (tmp_path / "cjk.txt").write_text("".join(map(chr, range(0x20000, 0x20000 + 70_000))), encoding="utf-8")
    args, fragments = BAD_INPUTS[case]
    r = run_script("prepare.py", *(a.format(tmp=tmp_path) for a in args), "--out", tmp_path / "out" / "new")
    assert_one_line_error(r, *fragments)
    assert not (tmp_path / "out").exists()


def test_a_failed_run_keeps_an_out_folder_that_was_already_there(tmp_path):
    """Only folders the failed run created are removed: an existing (even empty) --out stays."""
    (tmp_path / "small.txt").write_text("hello world\n" * 5, encoding="utf-8")
    out = tmp_path / "mine"
    out.mkdir()
    r = run_script("prepare.py", "--input", tmp_path / "small.txt", "--out", out)
    assert_one_line_error(r, "too small")
    assert out.is_dir()


def test_unusable_out_is_one_line_and_touches_nothing(tmp_path):
    """--out naming a file, or empty (an unset "$DIR"), is one error line (not a FileExistsError
    traceback, not the default folder), and the file is left alone."""
    (tmp_path / "ok.txt").write_text("hello world\n" * 500, encoding="utf-8")
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me", encoding="utf-8")
    r = run_script("prepare.py", "--input", tmp_path / "ok.txt", "--out", taken)
    assert_one_line_error(r, "notes.txt")
    assert taken.read_text(encoding="utf-8") == "keep me"
    assert_one_line_error(run_script("prepare.py", "--input", tmp_path / "ok.txt", "--out", ""), "--out")


def test_progress_line_on_a_terminal_only(monkeypatch):
    """On a TTY: MB done of the total, MB/s and ETA, rewritten in place, and at the end the final
    figures (the whole input, not e.g. 23.1/26.8 MB); elsewhere (logs, CI): nothing."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    clock = iter([100.0, 101.0, 101.1, 101.2, 102.0])  # start, three updates (two too soon to show), close
    monkeypatch.setattr(prepare.time, "time", lambda: next(clock))
    monkeypatch.setattr(prepare.sys, "stderr", Terminal())
    progress = prepare.Progress("encode", total=3_000_000)
    for _ in range(3):
        progress(b"x" * 1_000_000)
    progress.close()
    shown = prepare.sys.stderr.getvalue().split("\r")
    assert shown[1] == "encode: 1.0/3.0 MB  1.0 MB/s  ETA 2s"
    assert shown[2] == "encode: 3.0/3.0 MB  1.5 MB/s  ETA 0s\n"

    monkeypatch.setattr(prepare.sys, "stderr", io.StringIO())  # not a terminal
    clock = iter([100.0, 101.0, 102.0])
    progress = prepare.Progress("encode", total=4_000_000)
    progress(b"x" * 1_000_000)
    progress.close()
    assert prepare.sys.stderr.getvalue() == ""


def test_sizes_in_the_summary():
    """Sizes under a megabyte are shown in KB (an input under 50 KB is not "0.0 MB")."""
    assert prepare.size_text(20_479) == "20.5 KB"
    assert prepare.size_text(999) == "1.0 KB"
    assert prepare.size_text(1_115_394) == "1.1 MB"
    assert prepare.size_text(200_800_000) == "200.8 MB"
