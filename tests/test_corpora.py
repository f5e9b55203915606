"""Real corpora: JSON Lines (plain, gzip, zstd) and Parquet records, Hugging Face datasets and models
from a hub cache built here (offline), uint32 token files, and bad records."""
import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, require, run_in_process, run_script

import prepare
from common import UserError

EOT = 50256
pa = require("pyarrow")
pq = require("pyarrow.parquet")
zstandard = require("zstandard")


@pytest.fixture(scope="module")
def gpt2(shared_dir):
    import tiktoken
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def records(shakespeare_path) -> list[str]:
    """60 documents of tiny shakespeare (~600 chars each), one with CRLF and one with Hangul."""
    text = shakespeare_path.read_text(encoding="utf-8")[:36_000]
    docs = [text[i:i + 600] for i in range(0, len(text), 600)]
    docs[3] = docs[3].replace("\n", "\r\n")
    docs[7] += " 한국어 문장, café"
    return docs


def write_records(path: Path, texts, field="text"):
    """texts as JSON Lines (.jsonl, .gz, .zst by suffix) or a Parquet file of row groups of 7 rows."""
    if path.suffix == ".parquet":
        pq.write_table(pa.table({"id": list(range(len(texts))), field: texts}), path, row_group_size=7)
        return path
    data = "".join(json.dumps({"id": i, field: t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)).encode()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def read_split_docs(out: Path):
    meta = json.loads((out / "meta.json").read_text())
    docs = []
    for split in ("train", "val"):
        tokens = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).tolist()
        cuts = [i for i, t in enumerate(tokens) if t == EOT]
        docs += [tokens[a + 1:b] for a, b in zip([-1, *cuts], [*cuts, len(tokens)])]
    return meta, docs


@pytest.mark.parametrize("name", ["r.jsonl", "r.jsonl.gz", "r.jsonl.zst", "r.parquet"])
def test_records_give_the_tokens_of_each_record(name, records, gpt2, tmp_path):
    """Each JSON line / Parquet row is one document: the bins hold encode_ordinary of every record
    (CRLF read as LF), the records joined by <|endoftext|> less the one separator that falls
    between the two splits, and each split's documents are whole records."""
    path = write_records(tmp_path / name, records)
    if name.endswith(".parquet"):
        assert pq.ParquetFile(path).num_row_groups > 3
    prepare.main(["--input", str(path), "--tokenizer", "gpt2", "--out", str(tmp_path / "out")])
    meta, docs = read_split_docs(tmp_path / "out")
    expected = [gpt2.encode_ordinary(t.replace("\r\n", "\n")) for t in records]
    joined = sum(map(len, expected)) + len(expected) - 1  # the records joined by <|endoftext|>
    assert meta["split"] == "by_document" and sum(meta["documents"].values()) == len(records)
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == joined - 1  # no separator between the splits
    assert Counter(map(tuple, docs)) == Counter(map(tuple, expected))
    assert meta["skipped_records"] == 0 and meta["options"]["text_field"] == "text"


def test_compressed_text_and_a_folder_of_mixed_formats(records, gpt2, tmp_path):
    """--glob picks record files of any format in a folder, and a .txt.gz is one text document."""
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    write_records(folder / "a.jsonl.gz", records[:30])
    write_records(folder / "sub" / "b.parquet", records[30:50])
    (folder / "c.txt.gz").write_bytes(gzip.compress("".join(records[50:]).encode()))
    prepare.main(["--input", str(folder), "--glob", "*.*", "--tokenizer", "gpt2", "--out", str(tmp_path / "out")])
    meta, docs = read_split_docs(tmp_path / "out")
    expected = [gpt2.encode_ordinary(t.replace("\r\n", "\n")) for t in records[:50]]
    expected.append(gpt2.encode_ordinary("".join(records[50:])))
    assert Counter(map(tuple, docs)) == Counter(map(tuple, expected))


def test_a_cut_short_archive_is_an_error_and_zstd_frames_concatenate(records, gpt2, tmp_path):
    """A .gz or .zst file cut short is one error naming it, never a silently shorter corpus; a .zst
    of several frames (as `cat a.zst b.zst` makes) reads as their texts in order."""
    for name in ("r.jsonl.gz", "r.jsonl.zst"):
        whole = write_records(tmp_path / name, records).read_bytes()
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(whole[:len(whole) // 2])
        result = run_script("prepare.py", "--input", cut, "--tokenizer", "gpt2", "--out", tmp_path / "out", timeout=120)
        assert_one_line_error(result, str(cut), "cannot read it")
    lines = [json.dumps({"text": t}) + "\n" for t in records]
    frames = [zstandard.ZstdCompressor().compress("".join(part).encode()) for part in (lines[:25], lines[25:])]
    (tmp_path / "frames.jsonl.zst").write_bytes(b"".join(frames))
    prepare.main(["--input", str(tmp_path / "frames.jsonl.zst"), "--tokenizer", "gpt2", "--out", str(tmp_path / "o")])
    _, docs = read_split_docs(tmp_path / "o")
    assert Counter(map(tuple, docs)) == Counter(tuple(gpt2.encode_ordinary(t.replace("\r\n", "\n"))) for t in records)


BAD = [  # (line, what the error says)
    ('{"id": 1}', "record 2 (line 2): no 'text' field"),
    ('{"text": 5}', "record 2 (line 2): 'text' is int, not a string"),
    ('{"text": null}', "record 2 (line 2): 'text' is null, not a string"),
    ('["text"]', "record 2 (line 2): a list, not an object"),
    ('{"text": "cut', "record 2 (line 2): not JSON"),
]


@pytest.mark.parametrize("line,message", BAD)
def test_a_bad_record_names_file_and_record(line, message, records, tmp_path):
    """A record without a string text field is an error naming the file and the record."""
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"text": records[0]}) + "\n" + line + "\n" + json.dumps({"text": records[1]}) + "\n")
    with pytest.raises(UserError, match="--skip_bad_records") as e:
        prepare.main(["--input", str(path), "--tokenizer", "gpt2", "--out", str(tmp_path / "out")])
    assert f"{path}, {message}" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_bad_record_is_one_error_line_and_parquet_counts_rows(records, tmp_path):
    """The error is one line from the command; a Parquet record is numbered by its row (from 1)."""
    path = write_records(tmp_path / "r.parquet", records[:9] + [None] + records[10:20])
    result = run_script("prepare.py", "--input", path, "--tokenizer", "gpt2", "--out", tmp_path / "out",
                        timeout=120)
    assert_one_line_error(result, f"{path}, record 10: 'text' is null, not a string")


def test_a_run_stopped_half_way_leaves_the_previous_dataset_whole(records, tmp_path, monkeypatch):
    """Ctrl-C while encoding (2 encoding processes, train.bin half written) leaves the dataset
    already in --out as it was, and no temp files: nothing half-written looks complete."""
    out = tmp_path / "out"
    prepare.main(["--input", str(write_records(tmp_path / "good.jsonl", records)), "--tokenizer", "gpt2",
                  "--out", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupt(self, n):
        if self.tokens > 20_000:
            raise KeyboardInterrupt
        self.tokens += n

    monkeypatch.setattr(prepare.Progress, "add_tokens", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(["--input", str(write_records(tmp_path / "more.jsonl", records * 20)), "--tokenizer", "gpt2",
                      "--out", str(out), "--workers", "2"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_skip_bad_records_counts_them(records, gpt2, tmp_path, capsys):
    """--skip_bad_records drops the bad records, counts them in the summary line and meta.json."""
    path = tmp_path / "r.jsonl"
    lines = [json.dumps({"text": t}) for t in records]
    for i, (line, _) in enumerate(BAD):
        lines.insert(5 + 3 * i, line)
    path.write_text("\n".join(lines) + "\n\n")
    prepare.main(["--input", str(path), "--tokenizer", "gpt2", "--out", str(tmp_path / "out"), "--skip_bad_records"])
    out = capsys.readouterr()
    assert f"skipped {len(BAD)} bad records" in out.out and "the first: " in out.err
    meta, docs = read_split_docs(tmp_path / "out")
    assert meta["skipped_records"] == len(BAD)
    assert Counter(map(tuple, docs)) == Counter(tuple(gpt2.encode_ordinary(t.replace("\r\n", "\n"))) for t in records)


def test_text_field_picks_the_column(records, tmp_path):
    """--text_field names the field (JSON) or column (Parquet) that holds the text."""
    path = write_records(tmp_path / "r.parquet", records, field="content")
    with pytest.raises(UserError, match="record 1: no 'text' field"):
        prepare.main(["--input", str(path), "--tokenizer", "gpt2", "--out", str(tmp_path / "out")])
    prepare.main(["--input", str(path), "--tokenizer", "gpt2", "--out", str(tmp_path / "out"), "--text_field", "content"])
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["documents"]["train"] > 0


# ----------------------------------------------------------------------------------------------
# uint32 token files


def big_vocabulary(text: str, n: int = 70_000):
    """A hand-made byte-level BPE of exactly n tokens: the 256 bytes, all 65,536 byte pairs, then the
    corpus' most common 3-byte strings (ids above 65,535), and <|endoftext|> last."""
    from tokenizer import bpe_tokenizer
    ranks = {bytes([b]): b for b in range(256)}
    for a in range(256):
        for b in range(256):
            ranks[bytes([a, b])] = len(ranks)
    data = text.encode()
    for tri, _ in Counter(data[i:i + 3] for i in range(len(data) - 2)).most_common():
        if len(ranks) == n - 1:
            break
        ranks.setdefault(tri, len(ranks))
    return bpe_tokenizer(ranks)


def test_vocabulary_over_65536_writes_uint32_and_trains(shakespeare_path, tmp_path, monkeypatch):
    """A vocabulary of 70,000 gives uint32 bins whose ids above 65,535 decode to the text, and
    train.py reads them with meta.json's dtype: each training row is a window of train.bin's
    tokens, ids above 65,535 included."""
    import gpt
    import train
    text = shakespeare_path.read_text(encoding="utf-8")[:60_000]
    tok = big_vocabulary(text)
    assert tok.vocab_size == 70_000
    ref = tmp_path / "ref"
    ref.mkdir()
    prepare.write_meta(ref, tok, {})  # a tokenizer to reuse with --tokenizer PATH
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text[i:i + 2000]}) + "\n" for i in range(0, len(text), 2000)))
    out = tmp_path / "big"
    prepare.main(["--input", str(corpus), "--tokenizer", str(ref), "--out", str(out)])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    train_ids = np.fromfile(out / "train.bin", dtype=np.uint32)
    assert (out / "train.bin").stat().st_size == 4 * meta["tokens"]["train"]
    assert train_ids.max() > 65_535
    cuts = np.flatnonzero(train_ids == tok.eot_id)
    docs = [tok.decode(d.tolist()) for d in np.split(train_ids, cuts) if len(d)]
    assert len(docs) == meta["documents"]["train"] and all(d.removeprefix(tok.decode([tok.eot_id])) in text for d in docs)
    rows, forward = [], gpt.GPT.forward

    def recording_forward(model, idx, *args, **kwargs):
        if model.training:  # a training step's inputs and targets
            rows.extend(zip(idx.tolist(), (args[0] if args else kwargs["targets"]).tolist()))
        return forward(model, idx, *args, **kwargs)

    monkeypatch.setattr(gpt.GPT, "forward", recording_forward)
    result = run_in_process(train.main, f"--dataset={out}", f"--out_dir={tmp_path / 'run'}", "--n_layer=1",
                            "--n_head=2", "--n_embd=16", "--block_size=32", "--batch_size=4", "--max_iters=3",
                            "--eval_interval=3", "--eval_iters=1", "--warmup_iters=1", "--lr_decay_iters=3",
                            "--device=cpu", "--dtype=float32", "--compile=False", "--eval_sample_tokens=0")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "ckpt.pt").is_file()
    windows = np.lib.stride_tricks.sliding_window_view(train_ids, 33)
    assert len(rows) == 3 * 4
    for x, y in rows:  # x, then y one token later: a window of train.bin
        assert ((windows[:, :-1] == x) & (windows[:, 1:] == y)).all(axis=1).any(), x
    assert max(max(x) for x, _ in rows) > 65_535


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets and models from a hub cache (HF_HUB_CACHE, HF_HUB_OFFLINE=1)


def cached_repo(hub: Path, kind: str, repo: str, files: dict[str, bytes | Path]) -> Path:
    """A repository as huggingface_hub caches it: KIND--OWNER--NAME/snapshots/REV/... and refs/main = REV."""
    root = hub / f"{kind}--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    for name, content in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(content if isinstance(content, bytes) else content.read_bytes())
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(snapshot.name)
    return snapshot


def offline_env(hub: Path) -> dict:
    return {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "HF_HOME": str(hub.parent / "hf_home")}


CARD = """---
configs:
- config_name: small
  data_files:
  - split: train
    path: data/small/*
- config_name: gz
  default: true
  data_files:
  - split: train
    path: data/gz/train-*
---
# a test dataset
"""


def test_hf_dataset_from_the_cache_equals_the_same_files_read_locally(records, tmp_path):
    """hf://datasets/OWNER/NAME --hf_config reads the files the card's config names for the split,
    through huggingface_hub offline, into the same bins as the same files given as a folder."""
    local = tmp_path / "local"
    local.mkdir()
    files = {"README.md": CARD.encode(),
             "data/small/train-0.parquet": write_records(local / "train-0.parquet", records[:30]),
             "data/small/train-1.parquet": write_records(local / "train-1.parquet", records[30:]),
             "data/gz/train-0.jsonl.gz": write_records(tmp_path / "other.jsonl.gz", records[:20])}
    hub = tmp_path / "hub"
    cached_repo(hub, "datasets", "someone/corpus", files)
    env = offline_env(hub)
    result = run_script("prepare.py", "--input", "hf://datasets/someone/corpus", "--hf_config", "small",
                        "--tokenizer", "gpt2", "--out", tmp_path / "from_hub", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    prepare.main(["--input", str(local), "--glob", "*.parquet", "--tokenizer", "gpt2", "--out", str(tmp_path / "from_folder")])
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "from_hub" / name).read_bytes() == (tmp_path / "from_folder" / name).read_bytes()
    meta = json.loads((tmp_path / "from_hub" / "meta.json").read_text())
    assert [i["url"] for i in meta["inputs"]] == [f"hf://datasets/someone/corpus/data/small/train-{i}.parquet"
                                                  for i in (0, 1)]
    default = run_script("prepare.py", "--input", "hf://datasets/someone/corpus", "--tokenizer", "gpt2",
                         "--out", tmp_path / "default", env=env, timeout=120)
    assert default.returncode == 0, default.stderr
    assert sum(json.loads((tmp_path / "default" / "meta.json").read_text())["documents"].values()) == 20  # gz, the default config
    missing = run_script("prepare.py", "--input", "hf://datasets/someone/corpus", "--hf_config", "large",
                         "--tokenizer", "gpt2", env=env, timeout=120)
    assert_one_line_error(missing, "no config 'large'; it has small, gz")
    absent = run_script("prepare.py", "--input", "hf://datasets/someone/absent", "--tokenizer", "gpt2",
                        env=env, timeout=120)
    assert_one_line_error(absent, "hf://datasets/someone/absent", "HF_HUB_OFFLINE=1")


SPLITS_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
---
"""


@pytest.mark.parametrize("card, flags, picked", [
    (SPLITS_CARD, ["--hf_split", "validation"], ["data/validation-0.jsonl"]),
    (None, ["--hf_split", "validation"], ["data/validation-0.jsonl"]),
    (SPLITS_CARD, ["--hf_files", "extra/*.jsonl"], ["extra/a.jsonl", "extra/b.jsonl"]),
], ids=["split of the card's config", "split in the file names", "files"])
def test_hf_split_and_hf_files_read_the_files_they_name(card, flags, picked, records, gpt2, tmp_path):
    """--hf_split reads the files of that split, which the dataset card's config names or else whose
    path names the split; --hf_files GLOB reads the repository's files matching GLOB instead."""
    parts = {"data/train-0.jsonl": records[:20], "data/validation-0.jsonl": records[20:40],
             "extra/a.jsonl": records[40:50], "extra/b.jsonl": records[50:], "extra/notes.md": ["not data"]}
    files = {name: write_records(tmp_path / name.replace("/", "-"), texts) for name, texts in parts.items()}
    if card:
        files["README.md"] = card.encode()
    hub = tmp_path / "hub"
    cached_repo(hub, "datasets", "someone/splits", files)
    result = run_script("prepare.py", "--input", "hf://datasets/someone/splits", *flags, "--tokenizer", "gpt2",
                        "--val_fraction", "0.2", "--out", tmp_path / "out", env=offline_env(hub), timeout=120)
    assert result.returncode == 0, result.stderr
    meta, docs = read_split_docs(tmp_path / "out")
    assert [i["url"] for i in meta["inputs"]] == [f"hf://datasets/someone/splits/{name}" for name in picked]
    assert meta["split"] == "by_document"
    expected = [gpt2.encode_ordinary(t.replace("\r\n", "\n")) for name in picked for t in parts[name]]
    assert Counter(map(tuple, docs)) == Counter(map(tuple, expected))


def offline_in_this_process(monkeypatch, hub: Path):
    """offline_env(hub) for this process too: huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE
    when it is imported, so its constants are set as those variables would have set them."""
    constants = require("huggingface_hub.constants")
    for name, value in offline_env(hub).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hf_model_id_from_the_cache(records, tmp_path, monkeypatch):
    """GPT.from_pretrained, sample.py --ckpt and train.py init_from take a Hub model id, read from the
    hub cache offline; a local folder of the same name wins; another model_type is one error line.
    sample.py runs once in its own process, offline by HF_HUB_OFFLINE and HF_HUB_CACHE as a user sets
    them; the rest runs in this process with huggingface_hub set as those variables set it."""
    import sample
    import train
    from gpt import GPT, GPTConfig
    hub = tmp_path / "hub"
    folder = tmp_path / "export"
    GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=16)).save_pretrained(folder)
    cached_repo(hub, "models", "someone/tiny-gpt2", {name: folder / name for name in ("config.json", "model.safetensors")})
    cached_repo(hub, "models", "someone/llama", {"config.json": json.dumps({"model_type": "llama"}).encode()})
    sample_py = run_script("sample.py", "--ckpt", "someone/tiny-gpt2", "--start", "Hello", "--max_new_tokens", "3",
                           "--device", "cpu", env=offline_env(hub), timeout=120)
    assert sample_py.returncode == 0 and "someone/tiny-gpt2" in sample_py.stdout + sample_py.stderr, sample_py.stderr

    offline_in_this_process(monkeypatch, hub)
    local = tmp_path / "cwd" / "someone" / "tiny-gpt2"  # a folder of the same name, another shape
    GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=32)).save_pretrained(local)
    reference = GPT.from_pretrained(folder)
    for cwd, n_embd, same in ((tmp_path, 16, True), (tmp_path / "cwd", 32, False)):
        monkeypatch.chdir(cwd)
        model = GPT.from_pretrained("someone/tiny-gpt2")
        assert model.config.n_embd == n_embd
        assert (model.config == reference.config and all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))) == same
    monkeypatch.chdir(tmp_path)
    refused = run_in_process(sample.main, "--ckpt", "someone/llama", "--start", "Hi")
    assert_one_line_error(refused, "model_type is 'llama'")
    absent = run_in_process(sample.main, "--ckpt", "someone/absent", "--start", "Hi")
    assert_one_line_error(absent, "someone/absent")
    prepare.main(["--input", str(write_records(tmp_path / "r.jsonl", records)), "--tokenizer", "gpt2",
                  "--out", str(tmp_path / "data")])
    tuned = run_in_process(train.main, "--init_from=someone/tiny-gpt2", f"--dataset={tmp_path / 'data'}",
                           f"--out_dir={tmp_path / 'run'}", "--block_size=32", "--batch_size=2", "--max_iters=2",
                           "--eval_interval=2", "--eval_iters=1", "--warmup_iters=1", "--lr_decay_iters=2",
                           "--device=cpu", "--dtype=float32", "--compile=False", "--eval_sample_tokens=0")
    assert tuned.returncode == 0 and (tmp_path / "run" / "ckpt.pt").is_file(), tuned.stderr
