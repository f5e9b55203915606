"""Turn text corpora into the token files train.py reads.

    python prepare.py                                   # tiny shakespeare, char-level -> data/shakespeare_char
    python prepare.py --input books/ --tokenizer gpt2 --out data/books
    python prepare.py --input reviews_ko.txt --split_docs '\\n' --tokenizer bpe --vocab_size 8192
    python prepare.py --input chats.jsonl --format chat --tokenizer out-small/ckpt.pt --out data/chat
    python prepare.py --input hf://datasets/HuggingFaceFW/fineweb-edu --hf_config sample-10BT --tokenizer gpt2

Design choices:
- The tokenizers are tokenizer.py's: `char`, `gpt2` (tiktoken) and `bpe`, which is trained here on
  the train split only (so val is unseen text) and then encoded by tiktoken like GPT-2's BPE.
  `--tokenizer PATH` reuses the tokenizer of a dataset dir, its meta.json or a checkpoint.
- Text is encoded as plain text: a literal "<|endoftext|>" in a corpus is ordinary characters
  (tiktoken's encode_ordinary); the end-of-text id only ever comes from a document boundary.
- Files are read as UTF-8 with CRLF and lone CR turned into LF (Python's universal newlines), so
  a file saved on Windows gives the same tokens as on Linux: no '\\r' in a char vocabulary, no
  CR tokens in a BPE.
- Records: a .jsonl/.json file (JSON Lines, the text in --text_field) or a .parquet file (that
  column, read a record batch at a time with pyarrow) holds one document per record; .gz and .zst
  files are decompressed as they are read. A record without a string text field is an error naming
  the file and record (--skip_bad_records counts it). hf://datasets/OWNER/NAME is the Parquet and
  JSON Lines files of a Hugging Face dataset's config and split, fetched by huggingface_hub into its
  cache (HF_HUB_OFFLINE=1 reads them from there).
- Each text file is a document (--split_docs cuts files further). Documents in one split are
  separated by <|endoftext|> (gpt2, bpe) or, for char, by the --split_docs separator or else a blank line
  ("\\n\\n"); a char vocabulary has no end-of-text id. train/val is split by whole documents, picked
  by a seeded shuffle, when three or more of them can hold about --val_fraction of the text (0.5x
  to 1.5x of it). Otherwise (a single document, one file per language, a few large ones) the last
  --val_fraction of every document is cut off at a token boundary for val, as nanoGPT does with
  one file, so each document (each language of a mixed corpus) is in both splits. meta.json says
  which.
- Streaming: files are read in blocks and cut into ~1M-char pieces at points where encoding the
  pieces separately gives exactly the tokens of the whole (tokenizer.SAFE_CUT); a pool of
  processes encodes them in order; tokens go straight to disk. Memory stays flat whatever the
  corpus size (beyond a few bytes per document for choosing the split).
- Outputs are written under temp names and renamed at the end; meta.json is renamed last, so a
  dataset dir with a meta.json is complete.

Outputs in --out: train.bin and val.bin hold the token ids back to back as raw little-endian
uint16 (vocab_size <= 65,536) or uint32; meta.json (JSON) describes them: format_version,
tokenizer, vocab_size, eot_id, dtype, tokens and documents per split, doc_separator (the ids
written between documents), split ("by_document" | "document_tails" | "single_document_tail"),
val_fraction, seed, inputs (path or url, bytes, sha256), the reading options and
skipped_records. Its tokenizer entry is Tokenizer.to_dict() (tokenizer.py), except that a bpe
entry names its ranks file ("ranks_file": "tokenizer.bpe", written beside the bins) instead of
embedding "ranks".

--format chat reads JSON Lines, one conversation a line: {"messages": [{"role": "system" | "user" |
"assistant", "content": "..."}, ...]} ending with an assistant turn, or {"prompt": "...",
"completion": "..."} (one user turn, one assistant turn). The tokenizer is a base model's
(--tokenizer PATH or gpt2) plus the chat markers (tokenizer.with_chat_specials), and every
conversation is rendered by tokenizer.render_chat, the template sample.py --chat uses too. The
conversations are held in memory (3 or 5 bytes a token) to be split: whole conversations go to val by
a seeded shuffle (round(n * val_fraction), at least one, train keeps at least one). Outputs per
split: {split}.bin, the conversations' tokens back to back; {split}.mask.bin, uint8, 1 where the
token is a target to learn (assistant text and the <|end|> that closes it), 0 for context;
{split}.starts.bin, int64, conversation i is tokens[starts[i]:starts[i + 1]] (n + 1 offsets).
meta.json adds format "chat", the template's name, the special tokens, conversations and
learned tokens per split. A malformed line is an error naming the file and line
(--skip_bad_lines counts and skips it).
"""
import codecs
import contextlib
import fnmatch
import functools
import gzip
import hashlib
import importlib
import io
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
import urllib.request
from array import array
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from common import ArgumentParser, UserError, atomic_write_text, run_main
from tokenizer import (CHAT_TEMPLATE, PIECE_CHARS, Tokenizer, bpe_tokenizer, check_messages, gpt2_encoding,
                       iter_pieces, load_tokenizer, render_chat, token_dtype, train_bpe)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CACHE_DIR = Path("data/.cache")  # downloaded corpora (git-ignored)
FORMAT_VERSION = 1
BPE_VOCAB_RANGE = (257, 1 << 20)  # 256 byte tokens + <|endoftext|> at least
MIN_SPLIT_TOKENS = 256  # a few blocks of a small context; train.py checks its own block_size
POOL_MIN_BYTES = 16 << 20  # below this, starting encoding processes takes longer than encoding
BLOCK_BYTES = 1 << 20  # read size


# ----------------------------------------------------------------------------------------------
# Reading corpora: a stream of text blocks with None after each document


def resolve_inputs(inputs: list[str], glob: str, out: Path, hf=None) -> list[tuple[Path, str | None]]:
    """(file, url or None) for every input file, each once: a file given twice (or a folder and a
    file inside it) would otherwise be two documents, one of which can land in val as a copy of
    train. Duplicates (by resolved path) are skipped with a notice; the first keeps its place.
    `out` (the dataset folder) is named in a failed download's error; hf: see hf_dataset_files."""
    files, seen, skipped = [], set(), []
    for name in inputs:
        for path, url in expand_input(name, glob, out, hf):
            if path.resolve() in seen:
                skipped.append(str(path))
            else:
                seen.add(path.resolve())
                files.append((path, url))
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        print(f"skipping inputs given more than once: {', '.join(skipped[:3])}{more}", file=sys.stderr)
    return files


def expand_input(name: str, glob: str, out: Path, hf=None) -> list[tuple[Path, str | None]]:
    """(file, url or None) for one --input: a file as given, a directory searched recursively for
    `glob` (sorted; hidden folders skipped), a URL downloaded once into CACHE_DIR, a Hugging Face
    dataset's files (hf://datasets/OWNER/NAME) downloaded into the Hugging Face cache. A local
    path comes first: a folder named hf: is read as a folder."""
    path = Path(name)
    if name.startswith("hf://") and not path.exists():
        return hf_dataset_files(name, **(hf or {}))
    if name.startswith(("http://", "https://")):
        return [(download(name, out), name)]
    if path.is_dir():
        found = sorted(p for p in path.rglob(glob)
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise UserError(f"no files matching {glob!r} under {name} (choose another pattern with --glob)")
        return [(p, None) for p in found]
    if path.is_file():
        return [(path, None)]
    raise UserError(f"{name}: no such file or directory")


HF_DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".txt")


def hf_dataset_files(url: str, config: str | None = None, split: str = "train", pattern: str | None = None):
    """(local file, hf:// url) for each data file of a Hugging Face dataset's config and split, each
    downloaded by huggingface_hub into its cache (HF_HUB_CACHE; offline, HF_HUB_OFFLINE=1, read
    from there). The files are those the dataset card's `configs` name for the split, else those
    whose path names the split (data/train-00000.parquet), or `pattern` (--hf_files) over all files."""
    repo = url.removeprefix("hf://datasets/").strip("/")
    if not url.startswith("hf://datasets/") or repo.count("/") != 1:
        raise UserError(f"{url}: a Hugging Face dataset is hf://datasets/OWNER/NAME")
    try:
        import huggingface_hub as hub
    except ImportError:
        raise UserError(f"{url} needs the huggingface_hub package: pip install huggingface_hub") from None
    try:
        names = hf_repo_files(hub, repo)
        if pattern:
            patterns = [pattern]
        else:
            patterns = hf_config_patterns(hub, repo, names, config, split)
        picked = sorted(n for n in names if n.lower().endswith(HF_DATA_SUFFIXES)
                        and any(fnmatch.fnmatch(n, p) for p in patterns))
        if not picked:
            what = f"--hf_files {pattern!r}" if pattern else f"config {config or 'default'!r}, split {split!r}"
            raise UserError(f"{url}: no Parquet, JSON Lines or text files for {what}")
        print(f"{url}: {len(picked)} file(s) (huggingface_hub downloads each once into its cache)", file=sys.stderr)
        return [(Path(hub.hf_hub_download(repo, n, repo_type="dataset")), f"{url}/{n}") for n in picked]
    except UserError:
        raise
    except Exception as e:  # the Hub's HTTP errors, a missing cache entry (OSError), the network library's own
        offline = " (offline: HF_HUB_OFFLINE=1 reads only what the cache holds)" if hub_offline() else ""
        raise UserError(f"{url}: {(str(e) or type(e).__name__).splitlines()[0]}{offline}") from None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hf_repo_files(hub, repo: str, cached: bool = False) -> list[str]:
    """The files of a dataset repository: listed by the Hub, or offline (or when the Hub cannot be
    reached) those of its cached snapshot, as hf_hub_download then reads them."""
    if not (cached or hub_offline()):
        try:
            return hub.list_repo_files(repo, repo_type="dataset")
        except Exception as e:  # no network: the cache may hold the dataset; else this is the error
            try:
                return hf_repo_files(hub, repo, cached=True)
            except OSError:
                raise e from None
    root = Path(hub.snapshot_download(repo, repo_type="dataset", allow_patterns=["README.md"], local_files_only=True))
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]


def hf_config_patterns(hub, repo: str, names: list[str], config: str | None, split: str) -> list[str]:
    """The data_files patterns of `config` (else the default one) and `split` in the dataset card."""
    configs = []
    if "README.md" in names:
        from huggingface_hub.repocard import metadata_load  # the YAML header of the dataset card
        card = metadata_load(hub.hf_hub_download(repo, "README.md", repo_type="dataset")) or {}
        configs = card.get("configs") or []
    if not configs:
        if config:
            raise UserError(f"hf://datasets/{repo}: its card names no configs; pick files with --hf_files GLOB")
        return [f"*{split}[-_./]*", f"{split}[-_./]*"]  # data/train-00000-of-00002.parquet, train/0.jsonl
    by_name = {c.get("config_name", "default"): c for c in configs}
    if config is None:
        chosen = next((c for c in configs if c.get("default")), None) or by_name.get("default") or configs[0]
    elif config in by_name:
        chosen = by_name[config]
    else:
        raise UserError(f"hf://datasets/{repo}: no config {config!r}; it has {', '.join(by_name)}")
    files = chosen.get("data_files", [])
    if isinstance(files, str):
        files = [files]
    patterns = [f for f in files if isinstance(f, str)]
    for entry in (f for f in files if isinstance(f, dict)):
        if entry.get("split") == split:
            paths = entry.get("path", [])
            patterns += [paths] if isinstance(paths, str) else paths
    if not patterns:
        splits = [f.get("split") for f in files if isinstance(f, dict)]
        raise UserError(f"hf://datasets/{repo}: config {chosen.get('config_name', 'default')!r} has no split "
                        f"{split!r} (it has {', '.join(map(str, splits))}); pass --hf_split")
    return patterns


def download(url: str, out: Path) -> Path:
    """The file at `url`, fetched on first use into CACHE_DIR (temp name, then renamed). Offline,
    the error says how to use a local copy instead: with `out`, the dataset folder this run
    writes, since a local file's name would choose another (data/shakespeare_char, which
    config/small.py reads, would become data/input)."""
    name = url.rstrip("/").rsplit("/", 1)[-1] or "index"
    path = CACHE_DIR / f"{hashlib.sha1(url.encode()).hexdigest()[:10]}-{name}"
    if path.is_file():
        return path
    tmp = path.with_name(path.name + ".tmp")
    print(f"downloading {url}", file=sys.stderr)
    with created_dir(CACHE_DIR, "download cache"):
        try:
            with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors
            tmp.unlink(missing_ok=True)
            reason = getattr(e, "reason", e)
            raise UserError(f"could not download {url} ({reason}); to use a local copy instead, "
                            f"pass --input PATH --out {out}") from e
    os.replace(tmp, path)
    return path


def read_blocks(path: Path, errors: str, on_bytes):
    """The text of one file in blocks (decompressed for .gz, .zst), decoded as UTF-8 (a leading
    byte-order mark is dropped), with CRLF and lone CR read as LF. on_bytes(data) sees every raw
    block (hashing, progress)."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors)
    # Python's universal newlines; it holds back a block's final CR until it sees the next byte
    decoder = io.IncrementalNewlineDecoder(utf8, translate=True)
    offset, first = 0, True
    with open_bytes(path, on_bytes) as f:
        while True:
            try:
                data = f.read(BLOCK_BYTES)
            except archive_errors() as e:
                read_failed(path, e)
            pending = len(utf8.getstate()[0])  # bytes of a character cut by the previous block
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: byte {offset - pending + e.start} is not valid UTF-8 "
                                "(pass --errors replace to read it as U+FFFD)") from None
            if first and text:
                text, first = text.removeprefix("\ufeff"), False
            offset += len(data)
            if text:
                yield text
            if not data:
                return


COMPRESSED = (".gz", ".zst")


def file_format(path: Path) -> tuple[str, str | None]:
    """(text | jsonl | parquet, gz | zst | None) from the file name: data.jsonl.gz -> (jsonl, gz)."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compression = suffixes.pop().lstrip(".") if suffixes and suffixes[-1] in COMPRESSED else None
    kind = suffixes[-1] if suffixes else ""
    if kind == ".parquet":
        if compression:
            raise UserError(f"{path}: a Parquet file compresses inside; read it uncompressed")
        return "parquet", None
    return ("jsonl" if kind in (".jsonl", ".json") else "text"), compression


def optional_module(name: str, pip_name: str, path: Path):
    """An optional dependency, imported where a file needs it; missing, one line naming the pip command."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{path} needs the {pip_name} package: pip install {pip_name}") from None


class _Counted(io.RawIOBase):
    """A binary file whose every read is passed to on_bytes (the raw, still compressed bytes)."""

    def __init__(self, f, on_bytes):
        self.f, self.on_bytes = f, on_bytes

    def readable(self):
        return True

    def readinto(self, buf):
        data = self.f.read(len(buf))
        buf[:len(data)] = data
        if data:
            self.on_bytes(data)
        return len(data)


@contextlib.contextmanager
def open_bytes(path: Path, on_bytes):
    """The bytes of a file, decompressed for .gz and .zst; on_bytes sees the raw bytes read."""
    compression = file_format(path)[1]
    with open(path, "rb") as raw:
        f = io.BufferedReader(_Counted(raw, on_bytes), BLOCK_BYTES)
        if compression == "gz":
            f = gzip.GzipFile(fileobj=f)
        elif compression == "zst":
            f = io.BufferedReader(_Zstd(f, optional_module("zstandard", "zstandard", path)), BLOCK_BYTES)
        yield f


class _Zstd(io.RawIOBase):
    """The decompressed bytes of a .zst stream of one or more frames. Unlike zstandard's
    stream_reader, a file cut short inside a frame is an error, not a silently shorter text."""

    def __init__(self, f, zstd):
        self.f, self.zstd, self.pending = f, zstd, b""
        self.d = zstd.ZstdDecompressor().decompressobj()
        self.started = False  # has a frame begun (an empty file is an empty text)

    def readable(self):
        return True

    def readinto(self, buf):
        while not self.pending:
            data = self.f.read(BLOCK_BYTES)
            if not data:
                if self.started and not self.d.eof:
                    raise EOFError("the file ends inside a zstd frame: it is cut short")
                return 0
            while data:
                self.started = True
                self.pending += self.d.decompress(data)
                data = b""
                if self.d.eof:  # the next frame, if any, starts in what this one left over
                    data, self.d = self.d.unused_data, self.zstd.ZstdDecompressor().decompressobj()
                    self.started = bool(data)
        n = min(len(buf), len(self.pending))
        buf[:n], self.pending = self.pending[:n], self.pending[n:]
        return n


def read_failed(path: Path, e: Exception):
    """A damaged or cut-short .gz/.zst as one error line (zstandard's ZstdError is no OSError)."""
    raise UserError(f"{path}: cannot read it ({e})") from None


def archive_errors() -> tuple:
    zstd = sys.modules.get("zstandard")
    return (OSError, EOFError) + ((zstd.ZstdError,) if zstd else ())


def record_text(record, field: str) -> str:
    """The text of one record (a JSON object or Parquet row's value), or a ValueError saying why not."""
    if not isinstance(record, dict):
        raise ValueError(f"a {type(record).__name__}, not an object with a {field!r} field")
    if field not in record:
        raise ValueError(f"no {field!r} field")
    text = record[field]
    if not isinstance(text, str):
        raise ValueError(f"{field!r} is {'null' if text is None else type(text).__name__}, not a string")
    return text


def jsonl_records(path: Path, errors: str, on_bytes):
    """(record number, where, record or the exception that spoils it) for each non-blank line of a
    JSON Lines file, read a line at a time through a buffer of a block: memory holds a block and the
    longest line, never the file."""
    n = 0
    with open_bytes(path, on_bytes) as f:
        lines = enumerate(f, 1)
        while True:
            try:
                line, raw = next(lines, (0, None))
            except archive_errors() as e:
                read_failed(path, e)
            if raw is None:
                return
            if not raw.strip():
                continue
            n += 1
            try:
                text = raw.decode("utf-8", errors)
                yield n, f"record {n} (line {line})", json.loads(text.removeprefix("\ufeff") if line == 1 else text)
            except ValueError as e:  # not UTF-8, not JSON
                yield n, f"record {n} (line {line})", e


def parquet_records(path: Path, field: str, on_bytes):
    """(record number, where, {field: value}) for each row of a Parquet file, read a record batch
    at a time (only the one column). on_bytes sees the file's bytes as its row groups are done."""
    pa = optional_module("pyarrow", "pyarrow", path)
    pq = optional_module("pyarrow.parquet", "pyarrow", path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:  # ArrowInvalid: not a Parquet file
        raise UserError(f"{path}: not a Parquet file ({e})") from None
    has_field = field in pf.schema_arrow.names
    groups, n = pf.metadata.num_row_groups, 0
    with open(path, "rb") as raw:  # hashing and progress, a row group's share at a time
        for group in range(groups):
            if has_field:
                batches = pf.iter_batches(batch_size=1024, row_groups=[group], columns=[field])
                while True:
                    try:
                        batch = next(batches, None)
                    except (pa.ArrowException, OSError) as e:  # a damaged row group
                        raise UserError(f"{path}: cannot read row group {group} ({e})") from None
                    if batch is None:
                        break
                    for value in batch.column(0).to_pylist():
                        n += 1
                        yield n, f"record {n}", {field: value}
            else:
                for _ in range(pf.metadata.row_group(group).num_rows):
                    n += 1
                    yield n, f"record {n}", {}
            end = raw.tell() + (path.stat().st_size - raw.tell()) // (groups - group)
            while raw.tell() < end and (data := raw.read(min(BLOCK_BYTES, end - raw.tell()))):
                on_bytes(data)
        while data := raw.read(BLOCK_BYTES):  # a file of no row groups
            on_bytes(data)


def record_documents(path: Path, field: str, errors: str, on_bytes, bad: dict):
    """The text of each record of a JSON Lines or Parquet file: one document each, CRLF and lone CR
    read as LF as in a text file. A record without a string `field` is an error naming the file and
    record, or, when bad["skip"], counted in bad["count"] (the first kept in bad["first"])."""
    kind = file_format(path)[0]
    records = parquet_records(path, field, on_bytes) if kind == "parquet" else jsonl_records(path, errors, on_bytes)
    for n, where, record in records:
        try:
            if isinstance(record, Exception):
                raise record
            text = record_text(record, field)
        except ValueError as e:
            reason = bad_line_reason(e)
            if not bad["skip"]:
                raise UserError(f"{path}, {where}: {reason} (--skip_bad_records skips such records)") from None
            bad["count"] += 1
            bad["first"] = bad["first"] or f"{path}, {where}: {reason}"
            continue
        yield text.replace("\r\n", "\n").replace("\r", "\n")


def split_blocks(blocks, sep: str):
    """Blocks of one file -> blocks with None in place of each `sep` (which may straddle blocks)."""
    carry = ""
    for block in blocks:
        *docs, last = (carry + block).split(sep)
        for doc in docs:
            yield doc
            yield None
        keep = len(last) - (len(sep) - 1)  # hold back what could be the start of a separator
        yield last[:max(keep, 0)]
        carry = last[max(keep, 0):]
    yield carry


def clean_blocks(stream):
    """--clean: each whitespace run becomes one space; documents lose leading/trailing whitespace."""
    started = space = False  # the document has text / a whitespace run is waiting for the next word
    for block in stream:
        if block is None:
            started = space = False
            yield None
            continue
        words = block.split()
        if words:
            lead = " " if started and (space or block[0].isspace()) else ""
            yield lead + " ".join(words)
            started, space = True, block[-1].isspace()
        else:
            space = space or bool(block)


def file_documents(path: Path, field: str, errors: str, on_bytes, bad: dict):
    """The documents of one file, each an iterable of text blocks: a text file is one, a JSON Lines
    or Parquet file one per record."""
    if file_format(path)[0] == "text":
        yield read_blocks(path, errors, on_bytes)
    else:
        for text in record_documents(path, field, errors, on_bytes, bad):
            yield (text,)


def iter_docs(files, sep: str | None, clean: bool, errors: str, on_bytes, field: str = "text", bad=None):
    """The corpus as text blocks with None after each document (files or records, cut further on
    `sep`). on_bytes(i, data) sees the raw bytes of files[i]; bad: see record_documents."""
    bad = {"skip": False, "count": 0, "first": None} if bad is None else bad
    for i, (path, _) in enumerate(files):
        for blocks in file_documents(path, field, errors, functools.partial(on_bytes, i), bad):
            stream = split_blocks(blocks, sep) if sep else blocks
            yield from clean_blocks(stream) if clean else stream
            yield None


class Progress:
    """`label: MB done / total, MB/s, tokens, tokens/s, ETA` on stderr when it is a terminal, a few
    times a second, and once more at the end, so the last line shows the whole input read. The
    tokens are those add_tokens counted (encoding), the ETA is from the bytes read so far."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self.tokens = label, total, 0, 0
        self.t0 = self.shown = time.time()
        self.tty = sys.stderr.isatty()
        self.width = 0  # of the longest line shown: a shorter one must cover it

    def __call__(self, data: bytes):
        self.done += len(data)
        now = time.time()
        if self.tty and now - self.shown > 0.25:
            self.show(now)

    def add_tokens(self, n: int):
        self.tokens += n

    def show(self, now: float):
        self.shown = now
        rate = self.done / (now - self.t0)
        eta = (self.total - self.done) / rate if rate else 0
        tokens = f"  {self.tokens / 1e6:,.1f}M tokens {self.tokens / (now - self.t0) / 1e6:,.2f}M/s" if self.tokens else ""
        line = (f"{self.label}: {self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB  {rate / 1e6:.1f} MB/s{tokens}  "
                f"ETA {clock(eta)}")
        self.width = max(self.width, len(line))
        print(f"\r{line:<{self.width}}", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.tty and self.shown > self.t0:  # a line is on screen: finish it
            self.show(time.time())
            print(file=sys.stderr)


def clock(seconds: float) -> str:
    """Seconds as 42s, 7m05s or 3h02m: an ETA of hours is read at a glance."""
    s = int(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s // 60 % 60:02d}m"


def size_text(n: float) -> str:
    """Bytes as KB below a megabyte, else MB: a 20 KB corpus is not "0.0 MB"."""
    return f"{n / 1e3:,.1f} KB" if n < 1e6 else f"{n / 1e6:,.1f} MB"


def scan(stream, want_chars: bool) -> tuple[array, set[str]]:
    """First pass: each document's size in characters, and the set of characters if wanted."""
    sizes, size, chars = array("q"), 0, set()  # 8 bytes a document, even for millions of them
    for block in stream:
        if block is None:
            sizes.append(size)
            size = 0
        else:
            size += len(block)
            if want_chars:
                chars.update(block)
    return sizes, chars


def train_split_texts(pieces, is_val, sizes, val_fraction: float):
    """The texts of the train split only, which a BPE learns from: val perplexity is then measured
    on text the tokenizer never saw. When each document is cut at its tail (is_val None), the cut
    is made in tokens later, so each document gives its first (1 - val_fraction) of characters,
    about its train part."""
    doc, left = None, 0
    for i, text in pieces:
        if is_val is not None:
            if not is_val[i]:
                yield text
            continue
        if i != doc:
            doc, left = i, int(sizes[i] * (1 - val_fraction))
        if left > 0:
            yield text[:left]
            left -= len(text)


MIN_VAL_DOCS = 3  # fewer whole documents in val, and every document's tail goes there instead


def choose_val_docs(sizes, val_fraction: float, seed: int) -> np.ndarray | None:
    """A bool mask of the documents that go to val whole, or None: cut every document's tail.

    Whole documents (a seeded shuffle of the non-empty ones) go to val while that keeps val near
    val_fraction of the text: a document that would push val past 1.5x the target, or leave train
    empty, is skipped, and the picking stops once the target is reached. If the documents picked
    hold less than 0.5x the target (a few large documents), or are fewer than MIN_VAL_DOCS (a val
    of one or two documents is one topic, or one language of a mixed corpus), None: the last
    val_fraction of every document goes to val instead, so each document (each language) is in
    both splits."""
    sizes = np.asarray(sizes, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(np.flatnonzero(sizes))
    total = int(sizes.sum())
    target = val_fraction * total
    is_val, held = np.zeros(len(sizes), dtype=bool), 0
    for doc, size in zip(order.tolist(), sizes[order].tolist()):  # Python ints: fast for millions
        if held >= target:
            break
        if held + size <= 1.5 * target and held + size < total:
            is_val[doc], held = True, held + size
    return is_val if held >= 0.5 * target and is_val.sum() >= MIN_VAL_DOCS else None


# ----------------------------------------------------------------------------------------------
# Encoding on all cores, writing the bins


_worker = {}  # in each encoding process: its tokenizer and the token dtype


def _init_worker(tok: Tokenizer, dtype: str):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _worker.update(tok=tok, dtype=np.dtype(dtype))


def _encode_batch(texts: list[str]) -> list[bytes]:
    tok, dtype = _worker["tok"], _worker["dtype"]
    return [tok.encode_np(text).astype(dtype).tobytes() for text in texts]


def iter_batches(pieces, size: int = PIECE_CHARS):
    """Consecutive pieces grouped into (docs, texts) of about `size` chars: one task for a worker
    (many short documents would otherwise cost one round trip each)."""
    docs, texts, n = [], [], 0
    for doc, text in pieces:
        docs.append(doc)
        texts.append(text)
        n += len(text)
        if n >= size:
            yield docs, texts
            docs, texts, n = [], [], 0
    if texts:
        yield docs, texts


def encode_pieces(pieces, tok: Tokenizer, dtype: np.dtype, workers: int):
    """(doc, token bytes) for each (doc, text) piece, in order, encoded by `workers` processes.
    Processes, not threads: tiktoken releases the GIL, but its threads still contend, so two
    threads gain far less than two processes (`python bench.py prepare` measures the processes
    against one thread). At most 4 batches per process are in flight, so memory does not grow
    with the corpus."""
    if workers == 1:
        _worker.update(tok=tok, dtype=dtype)
        for docs, texts in iter_batches(pieces):
            yield from zip(docs, _encode_batch(texts))
        return
    # fork: a worker starts in milliseconds with the tokenizer already in its memory, where a
    # spawned one starts an interpreter and rebuilds the tokenizer. spawn where fork is unsafe: off
    # Linux, and after `tokenizers` trained a BPE in this process (its Rust threads do not survive a fork).
    fork_safe = sys.platform == "linux" and "tokenizers" not in sys.modules
    context = "fork" if fork_safe else "spawn"
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context(context), _init_worker, (tok, dtype.str))
    try:
        with pool:
            window = deque()
            for docs, texts in iter_batches(pieces):
                window.append((docs, pool.submit(_encode_batch, texts)))
                if len(window) >= 4 * workers:
                    docs, future = window.popleft()
                    yield from zip(docs, future.result())
            for docs, future in window:
                yield from zip(docs, future.result())
    except BrokenProcessPool as e:
        raise UserError(f"an encoding process died ({e}); out of memory? try --workers 1") from e


def write_splits(encoded, is_val, sep: bytes, paths: dict, itemsize: int, val_fraction: float,
                 on_tokens=None) -> tuple[dict, dict]:
    """Append each document's tokens to its split's file, `sep` between documents of a split. With
    is_val None each document goes to train, then its tail moves to val (move_tail). Returns
    tokens and documents per split (Python ints: no 32-bit limit); on_tokens(n) sees each piece's."""
    docs = {"train": 0, "val": 0}
    with open(paths["train"], "w+b") as ftrain, open(paths["val"], "wb") as fval:
        out = {"train": ftrain, "val": fval}
        for doc, pieces in itertools.groupby(encoded, key=lambda piece: piece[0]):
            split = "val" if is_val is not None and is_val[doc] else "train"
            start = out[split].tell()
            if start:
                out[split].write(sep)
            for _, data in pieces:
                out[split].write(data)
                if on_tokens:
                    on_tokens(len(data) // itemsize)
            if is_val is not None:
                docs[split] += 1
            else:
                docs["train"] += move_tail(ftrain, fval, start, sep, val_fraction, itemsize)
                docs["val"] += 1
        tokens = {split: f.tell() // itemsize for split, f in out.items()}
    return tokens, docs


def move_tail(ftrain, fval, start: int, sep: bytes, val_fraction: float, itemsize: int) -> bool:
    """Move the last val_fraction of the document that ends ftrain (from byte `start`, its
    separator first if start > 0) to the end of fval: nanoGPT's int(n * 0.9) cut, at a token
    boundary. False if no token of it stays in train."""
    body = start + (len(sep) if start else 0)
    n = (ftrain.tell() - body) // itemsize
    k = int(n * (1 - val_fraction))
    ftrain.seek(body + k * itemsize)
    if fval.tell():
        fval.write(sep)
    shutil.copyfileobj(ftrain, fval, 1 << 24)
    ftrain.seek(body + k * itemsize if k else start)  # nothing left in train: drop its separator too
    ftrain.truncate()
    return k > 0


# ----------------------------------------------------------------------------------------------
# Chat: conversations in JSON Lines -> tokens, learn masks and conversation starts


def conversation(record) -> list[dict]:
    """The messages of one JSON Lines record, or a ValueError that says why it is not a
    conversation to learn from: {"messages": [...]} or {"prompt": ..., "completion": ...}, ending
    with an assistant turn."""
    if isinstance(record, dict) and "messages" in record:
        messages = check_messages(record["messages"])
    elif isinstance(record, dict) and "prompt" in record and "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise ValueError(f'"{key}" is {type(record[key]).__name__}, not a string')
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
    else:
        raise ValueError('expected an object with "messages", or with "prompt" and "completion"')
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the conversation ends with a {messages[-1]['role']} turn; it must end with the "
                         "assistant reply to learn")
    return messages


def bad_line_reason(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):  # before ValueError: it is one
        return f"not JSON ({e.msg} at column {e.colno})"
    if isinstance(e, UnicodeDecodeError):
        return f"byte {e.start} is not valid UTF-8 (pass --errors replace to read it as U+FFFD)"
    return str(e)


def jsonl_lines(files, hashes):
    """(path, line number, raw bytes) of every non-blank line of the inputs; hashes[i] sees file i."""
    for (path, _), h in zip(files, hashes):
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                h.update(raw)
                if raw.strip():
                    yield path, n, raw


def choose_val_conversations(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """A bool mask of the conversations that go to val: round(n * val_fraction) of them, at least
    one and at most n - 1, picked by a seeded shuffle."""
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return is_val


def build_chat_dataset(args, files, out: Path, tok: Tokenizer, t0: float):
    """Render every conversation with render_chat, split them whole, write tokens, masks, starts."""
    old = existing_tokenizer(out)
    dtype = token_dtype(tok.vocab_size)
    tokens, learn, lengths = array(dtype.char), array("B"), array("q")  # every conversation, back to back
    hashes = [hashlib.sha256() for _ in files]
    skipped, first_skipped = 0, None
    for path, n, raw in jsonl_lines(files, hashes):
        try:
            text = raw.decode("utf-8", args.errors)
            ids, mask = render_chat(tok, conversation(json.loads(text.removeprefix("\ufeff") if n == 1 else text)))
        except (ValueError, UserError) as e:  # not JSON or UTF-8, not a conversation, a character not in the vocabulary
            where = f"{path}, line {n}: {bad_line_reason(e)}"
            if not args.skip_bad_lines:
                raise UserError(f"{where} (--skip_bad_lines skips such lines)") from None
            skipped, first_skipped = skipped + 1, first_skipped or where
            continue
        tokens.extend(ids)
        learn.extend(mask)
        lengths.append(len(ids))
    if len(lengths) < 2:
        names = ", ".join(str(path) for path, _ in files[:3]) + (" ..." if len(files) > 3 else "")
        raise UserError(f"{len(lengths)} conversation(s) in {names}: train and val need one each at least")
    if skipped:
        print(f"skipped {skipped:,} malformed line(s); the first: {first_skipped}", file=sys.stderr)

    lengths = np.frombuffer(lengths, dtype=np.int64)
    is_val = choose_val_conversations(len(lengths), args.val_fraction, args.seed)
    tokens, learn = np.frombuffer(tokens, dtype=dtype), np.frombuffer(learn, dtype=np.uint8)
    arrays, stats = {}, {"tokens": {}, "conversations": {}, "learned_tokens": {}}
    for split, pick in (("train", ~is_val), ("val", is_val)):
        in_split = np.repeat(pick, lengths)  # (tokens,) bool: the tokens of this split's conversations
        starts = np.concatenate([[0], np.cumsum(lengths[pick])]).astype(np.int64)
        arrays |= {f"{split}.bin": tokens[in_split], f"{split}.mask.bin": learn[in_split],
                   f"{split}.starts.bin": starts}
        stats["tokens"][split], stats["conversations"][split] = int(starts[-1]), int(pick.sum())
        stats["learned_tokens"][split] = int(learn[in_split].sum())
    tmp = {name: out / f"{name}.tmp" for name in arrays}
    try:
        for name, values in arrays.items():
            values.tofile(tmp[name])
        (out / "meta.json").unlink(missing_ok=True)  # as write_dataset: no meta.json describing other bins
        for name, path in tmp.items():
            os.replace(path, out / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    write_meta(out, tok, {
        "format": "chat", "template": CHAT_TEMPLATE, "special_tokens": tok.specials, "dtype": dtype.name, **stats,
        "split": "by_conversation", "val_fraction": args.val_fraction, "seed": args.seed, "skipped_lines": skipped,
        "inputs": [{**({"url": url} if url else {}), "path": str(path), "bytes": path.stat().st_size,
                    "sha256": h.hexdigest()} for (path, url), h in zip(files, hashes)],
        "options": {"glob": args.glob, "errors": args.errors},
    })
    note_replaced(out, old, tok)
    c, n, k = stats["conversations"], stats["tokens"], stats["learned_tokens"]
    print(f"{out}: train {c['train']:,} conversations ({n['train']:,} tokens, {k['train']:,} to learn), val "
          f"{c['val']:,} ({n['val']:,} tokens, {k['val']:,} to learn); {tok.kind} + chat markers, vocab "
          f"{tok.vocab_size:,}, {dtype.name}; longest conversation {lengths.max():,} tokens, median "
          f"{int(np.median(lengths)):,}" + (f"; skipped {skipped:,} malformed lines" if skipped else "")
          + f" ({time.time() - t0:.1f}s)")


# ----------------------------------------------------------------------------------------------
# The command


def parse_args(argv=None):
    p = ArgumentParser(description="Turn text into train.bin/val.bin token files plus meta.json.")
    p.add_argument("--input", nargs="+", metavar="PATH_OR_URL",
                   help="files, directories (recursive), http(s) URLs or hf://datasets/OWNER/NAME; each text "
                        "file, JSON line or Parquet row is a document "
                        "(default: tiny shakespeare, downloaded once into data/.cache)")
    p.add_argument("--out", help="output directory (default: data/<first input's name>, or "
                                 "data/shakespeare_<tokenizer> for the default corpus)")
    p.add_argument("--tokenizer", default="char",
                   help="char | gpt2 | bpe | PATH of a dataset dir, meta.json or checkpoint whose tokenizer to "
                        "reuse (default: %(default)s)")
    p.add_argument("--vocab_size", type=int, help="bpe: vocabulary size, <|endoftext|> included (default: 8192)")
    p.add_argument("--format", choices=["text", "chat"], default="text",
                   help="text: any text files; chat: JSON Lines of conversations to fine-tune a base model "
                        "on (--tokenizer names the base model) (default: %(default)s)")
    p.add_argument("--skip_bad_lines", action="store_true",
                   help="--format chat: skip malformed lines and count them, instead of stopping at the first")
    p.add_argument("--text_field", default="text",
                   help="JSON Lines (.jsonl, .json) and Parquet inputs: the field or column holding each record's "
                        "text; one record is one document (default: %(default)s)")
    p.add_argument("--skip_bad_records", action="store_true",
                   help="skip records without a string --text_field (or not JSON) and count them, instead of "
                        "stopping at the first")
    p.add_argument("--hf_config", help="hf://datasets/OWNER/NAME inputs: the dataset's config "
                                       "(default: its default one)")
    p.add_argument("--hf_split", default="train", help="hf:// inputs: the split to read (default: %(default)s)")
    p.add_argument("--hf_files", metavar="GLOB", help="hf:// inputs: read the repository's files matching GLOB "
                                                      "instead of a config's split")
    p.add_argument("--glob", help="file pattern inside directories, '*.jsonl' with --format chat (default: '*.txt')")
    p.add_argument("--split_docs", metavar="SEP",
                   help=r"also cut files into documents at SEP; backslash escapes work ('\n\n' = blank line)")
    p.add_argument("--clean", action="store_true", help="collapse each whitespace run into one space")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="bytes that are not UTF-8: stop with an error, or read them as U+FFFD (default: %(default)s)")
    p.add_argument("--val_fraction", type=float, default=0.1,
                   help="share of the text that goes to val.bin: whole documents when three or more hold about that share, "
                        "else the end of every document (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the document split (default: %(default)s)")
    p.add_argument("--workers", type=int, help="encoding processes (default: one per core for a corpus of "
                                                  f"{POOL_MIN_BYTES >> 20} MB or more, else 1)")
    args = p.parse_args(argv)
    args.glob = args.glob or ("*.jsonl" if args.format == "chat" else "*.txt")
    if args.format == "chat":
        check_chat_args(args)
    elif args.skip_bad_lines:
        raise UserError("--skip_bad_lines applies to --format chat (--skip_bad_records to JSON Lines and Parquet records)")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.out is not None and not args.out.strip():  # an unset variable in `--out "$DIR"`
        raise UserError("--out needs a directory")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if Path(args.glob).is_absolute():
        raise UserError(f"--glob {args.glob!r} must be a pattern relative to the input directories (e.g. '*.md')")
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    if args.tokenizer not in ("char", "gpt2", "bpe") and not Path(args.tokenizer).exists():
        raise UserError(f"unknown tokenizer {args.tokenizer!r}: use char, gpt2, bpe, or the path of a dataset "
                        "directory, meta.json or checkpoint")
    if args.vocab_size is not None and args.tokenizer != "bpe":
        raise UserError("--vocab_size only applies to --tokenizer bpe")
    if args.tokenizer == "bpe":
        args.vocab_size = args.vocab_size or 8192
        lo, hi = BPE_VOCAB_RANGE
        if not lo <= args.vocab_size <= hi:
            raise UserError(f"--vocab_size must be in [{lo}, {hi:,}] for bpe (256 bytes + <|endoftext|> at least), "
                            f"got {args.vocab_size}")
    if args.split_docs is not None:
        # interpret backslash escapes without mangling non-ASCII text
        sep = args.split_docs
        try:
            args.split_docs = sep.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError as e:  # a cut-short escape: a lone backslash at the end, \x4
            raise UserError(f"--split_docs {sep}: {e.reason} (a literal backslash is written \\\\)") from None
        if not args.split_docs:
            raise UserError("--split_docs needs a non-empty separator")
        args.split_docs = args.split_docs.replace("\r\n", "\n").replace("\r", "\n")  # as the text is read
    return args


def check_chat_args(args):
    """--format chat: a base model's tokenizer, and none of the text-only options."""
    if not args.input:
        raise UserError("--format chat needs --input FILE.jsonl (one conversation per line)")
    if args.tokenizer in ("char", "bpe"):
        raise UserError(f"--format chat encodes with a base model's tokenizer, not a new {args.tokenizer} one: "
                        "pass --tokenizer PATH (the base checkpoint or its dataset) or --tokenizer gpt2")
    for flag, given in (("--split_docs", args.split_docs is not None), ("--clean", args.clean),
                        ("--skip_bad_records", args.skip_bad_records), ("--text_field", args.text_field != "text")):
        if given:
            raise UserError(f"{flag} applies to --format text; a chat file is one conversation per line")


def default_out(args) -> Path:
    if not args.input:
        kind = args.tokenizer if args.tokenizer in ("char", "gpt2", "bpe") else "custom"
        return Path("data") / f"shakespeare_{kind}"
    first = args.input[0].rstrip("/")
    return Path("data") / (Path(first.rsplit("/", 1)[-1]).stem or Path(first).resolve().name)


def make_tokenizer(args, chars: set[str], train_texts) -> Tokenizer:
    """The tokenizer --tokenizer asks for: built from the corpus (char; bpe, trained on the texts
    train_texts() yields), GPT-2's, or reused."""
    if args.tokenizer == "char":
        if len(chars) > 1 << 16:
            raise UserError(f"the corpus has {len(chars):,} distinct characters, more than a char vocabulary "
                            "may hold (65,536); use --tokenizer bpe")
        return Tokenizer("char", chars="".join(sorted(chars)))
    if args.tokenizer == "gpt2":
        return Tokenizer("gpt2", enc=gpt2_encoding())
    if args.tokenizer == "bpe":
        t0 = time.time()
        ranks = train_bpe(train_texts(), args.vocab_size)
        n = len(ranks) + 1
        short = f", not the {args.vocab_size:,} asked: the corpus has no more pairs to merge" if n < args.vocab_size else ""
        print(f"trained a BPE of {n:,} tokens{short} ({time.time() - t0:.1f}s)", file=sys.stderr)
        return bpe_tokenizer(ranks)
    return load_tokenizer(args.tokenizer)


def read(files, args, label: str, hashes=None, bad=None, progress=None):
    """iter_docs over the inputs with a progress line (`progress`, else a new one); each file's
    sha256 into hashes if given, bad records counted in `bad` (record_documents) if given."""
    progress = progress or Progress(label, sum(path.stat().st_size for path, _ in files))

    def on_bytes(i, data):
        progress(data)
        if hashes:
            hashes[i].update(data)

    bad = {"skip": args.skip_bad_records, "count": 0, "first": None} if bad is None else bad
    yield from iter_docs(files, args.split_docs, args.clean, args.errors, on_bytes, args.text_field, bad)
    progress.close()


def write_dataset(out: Path, tok: Tokenizer, pieces, is_val, sep: np.ndarray, args, workers: int,
                  on_tokens=None) -> dict:
    """Encode the pieces into out/{train,val}.bin (temp names until complete); returns the parts
    of meta.json that encoding decides. on_tokens(n) sees each piece's number of tokens."""
    dtype = token_dtype(tok.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.bin.tmp", "val": out / "val.bin.tmp"}
    try:
        tokens, docs = write_splits(encode_pieces(pieces, tok, dtype, workers), is_val, sep.astype(dtype).tobytes(),
                                    paths, dtype.itemsize, args.val_fraction, on_tokens)
        for split, n in tokens.items():
            if n < MIN_SPLIT_TOKENS:
                raise UserError(f"corpus too small: the {split} split holds {n:,} tokens, fewer than the "
                                f"{MIN_SPLIT_TOKENS} that a few blocks need; add text or change --val_fraction")
        # The bins are renamed before meta.json is rewritten: drop the old one first, so that an
        # interruption in between leaves no meta.json describing other bins.
        (out / "meta.json").unlink(missing_ok=True)
        for split, path in paths.items():
            os.replace(path, out / f"{split}.bin")
            for extra in (f"{split}.mask.bin", f"{split}.starts.bin"):  # of a chat dataset prepared here before
                (out / extra).unlink(missing_ok=True)
    finally:
        for path in paths.values():
            path.unlink(missing_ok=True)
    return {"dtype": dtype.name, "tokens": tokens, "documents": docs}


def write_meta(out: Path, tok: Tokenizer, fields: dict):
    """meta.json (and tokenizer.bpe for a bpe), each written to a temp name and renamed."""
    entry = tok.to_dict()
    if tok.kind == "bpe":
        ranks = entry.pop("ranks")
        entry["ranks_file"] = "tokenizer.bpe"
        atomic_write_text(out / "tokenizer.bpe", ranks)
    else:
        (out / "tokenizer.bpe").unlink(missing_ok=True)  # a stale one from an earlier bpe run
    meta = {"format_version": FORMAT_VERSION, "tokenizer": entry, "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id, **fields}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def created_dir(path: Path, what: str):
    """Create `path`; if the work inside fails, remove the folders this created (only if empty): an
    empty --out left by a failed run would look like a dataset to the next command, and an empty
    data/.cache after a failed download is litter."""
    created = [d for d in (path, *path.parents) if not d.exists()]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the {what} {path}: {e.strerror}") from None
    try:
        yield
    except BaseException:
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    out = Path(args.out) if args.out else default_out(args)
    hf = {"config": args.hf_config, "split": args.hf_split, "pattern": args.hf_files}
    files = resolve_inputs(args.input or [SHAKESPEARE_URL], args.glob, out, hf)
    if args.format == "chat":
        tok = load_tokenizer(args.tokenizer).with_chat_specials()  # before --out is made: a bad path fails first
        with created_dir(out, "output directory"):
            return build_chat_dataset(args, files, out, tok, t0)

    # A first pass when the vocabulary or the documents depend on the text; otherwise each file is
    # one document and its size on disk will do.
    records = any(file_format(path) != ("text", None) for path, _ in files)  # documents (or sizes) inside
    if args.tokenizer in ("char", "bpe") or args.split_docs or args.clean or records:
        sizes, chars = scan(read(files, args, "scan"), want_chars=args.tokenizer == "char")
    else:
        sizes, chars = [path.stat().st_size for path, _ in files], set()
    if sum(sizes) == 0:
        names = ", ".join(str(path) for path, _ in files[:3]) + (" ..." if len(files) > 3 else "")
        raise UserError(f"empty corpus: no text in {names}")
    with created_dir(out, "output directory"):  # before the long work (BPE training, encoding): a bad --out fails at once
        build_dataset(args, files, out, sizes, chars, t0)


def split_kind(is_val, sizes, val_fraction: float) -> str:
    """meta.json's name for the split choose_val_docs chose; says so when it cut every document."""
    if is_val is not None:
        return "by_document"
    if np.count_nonzero(sizes) < 2:
        return "single_document_tail"
    print(f"split: no set of whole documents holds about {val_fraction * 100:g}% of the text, so val is "
          f"the last {val_fraction * 100:g}% of every document", file=sys.stderr)
    return "document_tails"


def existing_tokenizer(out: Path) -> dict | None:
    """The tokenizer of the dataset already in `out`, if there is one."""
    if not (out / "meta.json").is_file():
        return None
    try:
        return load_tokenizer(out / "meta.json").to_dict()
    except UserError:  # a damaged dataset: nothing a checkpoint could have been trained on
        return None


def note_replaced(out: Path, old: dict | None, tok: Tokenizer):
    """Re-preparing a dataset is normal, but with another tokenizer it orphans the checkpoints
    trained on it (train.py's resume then fails on the vocabulary): say so."""
    if old is None or old == tok.to_dict():
        return
    change = f"{old['kind']} -> {tok.kind}" if old["kind"] != tok.kind else f"another {tok.kind} vocabulary"
    print(f"replacing {out} ({change}): checkpoints trained on it no longer match", file=sys.stderr)


def build_dataset(args, files, out: Path, sizes, chars, t0):
    """Choose the split, build the tokenizer, write the bins and meta.json into `out`."""
    old = existing_tokenizer(out)  # before write_dataset removes its meta.json
    is_val = choose_val_docs(sizes, args.val_fraction, args.seed)
    split = split_kind(is_val, sizes, args.val_fraction)
    sep_text = args.split_docs or "\n\n"  # char: documents are joined as text
    if args.tokenizer == "char" and split != "single_document_tail":
        chars |= set(sep_text)
    tok = make_tokenizer(args, chars, lambda: train_split_texts(
        iter_pieces(read(files, args, "train bpe")), is_val, sizes, args.val_fraction))

    if split == "single_document_tail":  # nothing to separate
        sep = np.array([], dtype=np.uint32)
    else:
        sep = np.array([tok.eot_id] if tok.eot_id is not None else tok.encode(sep_text), dtype=np.uint32)
    total = sum(path.stat().st_size for path, _ in files)
    workers = args.workers or (os.cpu_count() or 1 if total >= POOL_MIN_BYTES else 1)
    hashes = [hashlib.sha256() for _ in files]
    bad = {"skip": args.skip_bad_records, "count": 0, "first": None}
    progress = Progress("encode", total)
    pieces = iter_pieces(read(files, args, "encode", hashes, bad, progress))
    fields = write_dataset(out, tok, pieces, is_val, sep, args, workers, progress.add_tokens)
    write_meta(out, tok, {
        **fields,
        "doc_separator": sep.tolist(),
        "split": split,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "inputs": [{**({"url": url} if url else {}), "path": str(path), "bytes": path.stat().st_size,
                    "sha256": h.hexdigest()} for (path, url), h in zip(files, hashes)],
        "options": {"glob": args.glob, "split_docs": args.split_docs, "clean": args.clean, "errors": args.errors,
                    "text_field": args.text_field},
        "skipped_records": bad["count"],
    })
    note_replaced(out, old, tok)
    secs = time.time() - t0
    n = fields["tokens"]
    if bad["count"]:
        print(f"skipped {bad['count']:,} bad record(s); the first: {bad['first']}", file=sys.stderr)
    skipped = f"; skipped {bad['count']:,} bad records" if bad["count"] else ""
    print(f"{out}: train {n['train']:,} tokens, val {n['val']:,} tokens ({tok.kind}, vocab {tok.vocab_size:,}, "
          f"{fields['dtype']}) from {size_text(total)} in {secs:.1f}s ({size_text(total / secs)}/s){skipped}")


if __name__ == "__main__":
    run_main(main)
