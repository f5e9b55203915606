"""The tokenizers: characters, GPT-2's BPE (tiktoken), and a byte-level BPE trained on your corpus.

One Tokenizer class with three kinds:
- `char`: the corpus' distinct characters, sorted by code point (id = position); no end-of-text id.
- `gpt2`: tiktoken's GPT-2 BPE, 50,257 tokens, <|endoftext|> = 50256.
- `bpe`: a byte-level BPE trained by the `tokenizers` package (train_bpe), handed to tiktoken as
  merge ranks, so all BPE *encoding* goes through tiktoken; <|endoftext|> = vocab_size - 1.
Text is always encoded as plain text (encode_ordinary): a literal "<|endoftext|>" in a corpus is
ordinary characters. Tokenizer.to_dict() describes a tokenizer completely (JSON; every checkpoint
carries it) and load_tokenizer() rebuilds it from that, a dataset folder, its meta.json or a
checkpoint:
    {"kind": "char", "vocab_size": V, "eot_id": null, "chars": ["\\n", " ", "!", ...]}
    {"kind": "gpt2", "vocab_size": 50257, "eot_id": 50256}
    {"kind": "bpe", "vocab_size": V, "eot_id": V - 1, "pattern": GPT2_PATTERN, "ranks": "<text>"}
A dataset's meta.json holds the same, except that a bpe entry names its ranks file
("ranks_file": "tokenizer.bpe") instead of embedding "ranks".

Chat: with_chat_specials() appends the turn markers <|system|>, <|user|>, <|assistant|>, <|end|> as
special tokens after the base vocabulary (gpt2: 50257..50260), and to_dict() gains
"specials": {"<|system|>": 50257, ...} with vocab_size counting them. Typed text never produces
them (a user who writes "<|user|>" gets ordinary tokens); decode() shows them as their markers.
render_chat() is the one chat template: prepare.py, sample.py --chat and a server all call it.

tokenizer.bpe (the ranks text) is tiktoken's own .tiktoken format: one line per token,
`<base64 of the token's bytes> <rank>`, ranks 0..V-2 in order, every single byte among them. A BPE
trained by train_bpe has the bytes 0..255 as ranks 0..255, then one token per merge in the order
the merges were learned (tiktoken merges the pair whose result has the lowest rank first). The
end-of-text token is not in the file: its id is V - 1. Pre-tokenisation is GPT-2's regex
("pattern"), so tiktoken.Encoding(name, pattern, ranks, {"<|endoftext|>": V - 1}) rebuilds it.
"""
import base64
import functools
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import tiktoken

from common import UserError

EOT = "<|endoftext|>"
# GPT-2's pre-tokenisation (as tiktoken writes it): contractions, letters, numbers, other symbols,
# whitespace. BPE merges never cross these pieces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
PIECE_CHARS = 1 << 20  # the size of a piece of text that iter_pieces hands out
CHAT_ROLES = ("system", "user", "assistant")
END = "<|end|>"  # closes every turn; a chat model's reply ends when it emits this
CHAT_SPECIALS = tuple(f"<|{role}|>" for role in CHAT_ROLES) + (END,)
CHAT_TEMPLATE = "markers"  # meta.json's name for render_chat's template with CHAT_SPECIALS
PLAIN_STOP = "\nUser:"  # where a base model's reply ends in the plain-text template


class Tokenizer:
    """encode/decode for one of three kinds, plus optional special tokens (the chat markers) after
    the base vocabulary; to_dict() describes it completely (JSON)."""

    def __init__(self, kind, *, chars="", enc=None, ranks="", specials=()):
        self.kind = kind
        self.chars = chars  # char: the vocabulary, sorted by code point (id = position)
        self.enc = enc  # gpt2, bpe: the tiktoken.Encoding
        self.ranks = ranks  # bpe: the merge ranks as tokenizer.bpe text
        if kind == "char":
            self.base_vocab_size, self.eot_id = len(chars), None
            self._codes = np.frombuffer(chars.encode("utf-32-le", "surrogatepass"), np.uint32)
        else:
            self.base_vocab_size, self.eot_id = enc.n_vocab, enc.eot_token
        self.specials = {marker: self.base_vocab_size + i for i, marker in enumerate(specials)}  # marker -> id
        self.vocab_size = self.base_vocab_size + len(self.specials)

    @property
    def is_chat(self) -> bool:
        """True when the chat markers are tokens of this vocabulary (a chat-tuned model's)."""
        return tuple(self.specials) == CHAT_SPECIALS

    def with_chat_specials(self) -> "Tokenizer":
        """This tokenizer with the chat markers appended after its vocabulary (itself if it has them)."""
        if self.is_chat:
            return self
        if self.specials:
            raise UserError(f"the tokenizer has special tokens {list(self.specials)}, not the chat markers")
        return Tokenizer(self.kind, chars=self.chars, enc=self.enc, ranks=self.ranks, specials=CHAT_SPECIALS)

    def without_specials(self) -> "Tokenizer":
        """The base tokenizer: what a model trained before the chat markers were added knows."""
        return Tokenizer(self.kind, chars=self.chars, enc=self.enc, ranks=self.ranks)

    def encode(self, text: str) -> list[int]:
        if self.kind == "char":
            return self.encode_np(text).tolist()
        return self.enc.encode_ordinary(text)

    def encode_np(self, text: str) -> np.ndarray:
        """encode() as a uint32 array (the fast path prepare uses)."""
        if self.kind != "char":
            return self.enc.encode_to_numpy(text, disallowed_special=())  # == encode_ordinary
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
        ids = np.searchsorted(self._codes, codes)  # _codes is sorted
        known = ids < len(self.chars)
        known[known] = self._codes[ids[known]] == codes[known]
        if not known.all():
            c = chr(codes[known.argmin()])
            raise UserError(f"character {c!r} (U+{ord(c):04X}) is not in the char vocabulary "
                            f"({len(self.chars)} characters)")
        return ids.astype(np.uint32)

    def decode(self, ids) -> str:
        """Text of `ids` (any iterable of ints); a special token shows as its marker. An id outside
        the vocabulary (a padded model head can emit one) and bytes that are not whole UTF-8
        characters become U+FFFD."""
        ids = [int(i) for i in ids]
        if not self.specials or not any(i >= self.base_vocab_size for i in ids):
            return self._decode_base(ids)
        markers = {i: marker for marker, i in self.specials.items()}
        parts, run = [], []
        for i in ids:
            if i in markers:
                parts += [self._decode_base(run), markers[i]]
                run = []
            else:
                run.append(i)
        return "".join(parts) + self._decode_base(run)

    def _decode_base(self, ids: list[int]) -> str:
        V = self.base_vocab_size
        if self.kind == "char":
            return "".join(self.chars[i] if 0 <= i < V else "\ufffd" for i in ids)
        if all(0 <= i < V for i in ids):
            return self.enc.decode(ids)
        parts = [self.enc.decode_single_token_bytes(i) if 0 <= i < V else "\ufffd".encode() for i in ids]
        return b"".join(parts).decode("utf-8", "replace")

    def start_ids(self) -> list[int]:
        """What generation without a prompt starts from: end-of-text, or a newline for a char model
        (it has no end-of-text id); [] when its characters include no newline either."""
        if self.eot_id is not None:
            return [self.eot_id]
        return self.encode("\n") if "\n" in self.chars else []

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id}
        if self.kind == "char":
            d["chars"] = list(self.chars)
        elif self.kind == "bpe":
            d |= {"pattern": self.enc._pat_str, "ranks": self.ranks}
        if self.specials:
            d["specials"] = dict(self.specials)
        return d


def gpt2_encoding():
    try:
        return tiktoken.get_encoding("gpt2")  # cached per process
    except (OSError, ValueError) as e:  # requests' errors are OSErrors
        raise UserError(f"GPT-2's BPE files are not cached and could not be downloaded ({type(e).__name__}); "
                        "set TIKTOKEN_CACHE_DIR to a folder that holds tiktoken's cached GPT-2 files") from e


def ranks_to_text(ranks: dict[bytes, int]) -> str:
    """tokenizer.bpe format: `<base64 token bytes> <rank>` per line, by rank."""
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def ranks_from_text(text: str) -> dict[bytes, int]:
    try:
        ranks = {base64.b64decode(t, validate=True): int(r) for t, r in (line.split() for line in text.splitlines())}
    except ValueError as e:  # a line that is not `base64 int` (binascii.Error is a ValueError)
        raise UserError(f"BPE ranks are corrupt: {e}") from e
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise UserError("BPE ranks are corrupt: they must be 0..n-1 and include every single byte")
    return ranks


@functools.lru_cache(maxsize=4)
def bpe_encoding(ranks: str, pattern: str) -> tiktoken.Encoding:
    """A trained BPE as a tiktoken.Encoding; cached, as building one parses every rank."""
    mergeable = ranks_from_text(ranks)
    return tiktoken.Encoding("bpe", pat_str=pattern, mergeable_ranks=mergeable, special_tokens={EOT: len(mergeable)})


def tokenizer_from_dict(d: dict, base_dir: Path | None = None) -> Tokenizer:
    """The inverse of Tokenizer.to_dict(); a meta.json entry's "ranks_file" is read from base_dir."""
    try:
        return _tokenizer_from_dict(d, base_dir)
    except (KeyError, TypeError, AttributeError) as e:  # a hand-edited or truncated description
        raise UserError(f"tokenizer description is incomplete or malformed ({type(e).__name__}: {e})") from e


def _tokenizer_from_dict(d: dict, base_dir: Path | None) -> Tokenizer:
    kind = d.get("kind")
    if kind == "char":
        chars = "".join(d["chars"])
        if len(chars) != len(d["chars"]) or list(chars) != sorted(set(chars)):
            raise UserError("char vocabulary is corrupt: it must be distinct single characters, sorted")
        tok = Tokenizer("char", chars=chars)
    elif kind == "gpt2":
        tok = Tokenizer("gpt2", enc=gpt2_encoding())
    elif kind == "bpe":
        if "ranks" in d:
            ranks = d["ranks"]
        else:
            path = Path(base_dir or ".") / d["ranks_file"]
            if not path.is_file():
                raise UserError(f"{path} is missing: the BPE ranks of this dataset (re-run prepare.py)")
            ranks = path.read_text(encoding="utf-8")
        tok = Tokenizer("bpe", enc=bpe_encoding(ranks, d["pattern"]), ranks=ranks)
    else:
        raise UserError(f"unknown tokenizer kind {kind!r} (expected char, gpt2 or bpe)")
    specials = d.get("specials") or {}
    if specials:
        if list(specials.values()) != list(range(tok.vocab_size, tok.vocab_size + len(specials))):
            raise UserError(f"special tokens {specials} must take the ids after the base vocabulary "
                            f"({tok.vocab_size}, {tok.vocab_size + 1}, ...)")
        tok = Tokenizer(tok.kind, chars=tok.chars, enc=tok.enc, ranks=tok.ranks, specials=list(specials))
    if d.get("vocab_size", tok.vocab_size) != tok.vocab_size:
        raise UserError(f"tokenizer says vocab_size {d['vocab_size']} but holds {tok.vocab_size} tokens")
    return tok


def load_tokenizer(source) -> Tokenizer:
    """The tokenizer of a dataset or a model. `source`: a dict from Tokenizer.to_dict() (e.g. a
    checkpoint's "tokenizer"), "gpt2", a dataset directory, its meta.json, or a checkpoint file."""
    if isinstance(source, dict):
        return tokenizer_from_dict(source)
    if source == "gpt2":
        return Tokenizer("gpt2", enc=gpt2_encoding())
    path = Path(source)
    if path.is_dir():
        path = path / "meta.json"
    if not path.is_file():
        raise UserError(f"{source}: not a dataset directory, meta.json or checkpoint")
    if path.suffix == ".json":
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            entry = meta["tokenizer"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a dataset meta.json ({e!r})") from e
        return tokenizer_from_dict(entry, path.parent)
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives (and mmap reads nothing else)
        inside = (path.parent / "meta.json").is_file()  # e.g. a dataset's tokenizer.bpe
        hint = f"; pass the dataset folder that holds it: {path.parent}" if inside else ""
        raise UserError(f"{source}: not a dataset directory, meta.json or checkpoint{hint}")
    import torch  # only for checkpoints; mmap reads the tokenizer without loading the weights

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        entry = ckpt["tokenizer"]
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise UserError(f"{path}: not a checkpoint with a tokenizer ({type(e).__name__}: {e})") from e
    return tokenizer_from_dict(entry)


# ----------------------------------------------------------------------------------------------
# The chat template


def check_messages(messages) -> list[dict]:
    """`messages` if it is a non-empty list of {"role": system|user|assistant, "content": str}
    (other keys are ignored), else a ValueError saying what is wrong."""
    if not isinstance(messages, list):
        raise ValueError(f'"messages" must be a list, got {type(messages).__name__}')
    if not messages:
        raise ValueError("the conversation has no messages")
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f'message {n} is not an object with "role" and "content"')
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"message {n} has unknown role {m['role']!r} (expected system, user or assistant)")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {n}'s content is {type(m['content']).__name__}, not a string")
    return messages


def render_chat(tok: Tokenizer, messages, add_generation_prompt=False) -> tuple[list[int], list[int]]:
    """The one chat template: messages -> (token ids, learn mask), mask 1 where the token is
    assistant text to learn (as a training target), 0 where it is context.

    A tokenizer with the chat markers (tok.is_chat) renders each message as <|role|> content
    <|end|>; the mask covers an assistant's content and the <|end|> that closes it, so a tuned
    model learns to end its turn. Without them (a base model) the template is plain text,
    "System: ...\nUser: ...\nAssistant: ...\n", and a reply ends where the model writes PLAIN_STOP.
    add_generation_prompt ends the tokens with an opened assistant turn for the model to continue.
    Each part is encoded on its own, so the mask falls on token boundaries and a typed "<|user|>"
    stays ordinary tokens."""
    ids, mask = [], []

    def add(part, learn):
        ids.extend(part)
        mask.extend([int(learn)] * len(part))

    for m in messages:
        learn = m["role"] == "assistant"
        if tok.is_chat:
            add([tok.specials[f"<|{m['role']}|>"]], False)
            add(tok.encode(m["content"]) + [tok.specials[END]], learn)
        else:  # "Assistant:" then " reply\n": a BPE keeps the space with the reply's first word
            add(tok.encode(f"{m['role'].title()}:"), False)
            add(tok.encode(f" {m['content']}\n"), learn)
    if add_generation_prompt:
        add([tok.specials["<|assistant|>"]] if tok.is_chat else tok.encode("Assistant:"), False)
    return ids, mask


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids 0..65535, so vocabularies up to 65,536 tokens; larger ones need uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE libraries use for tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def byte_level_vocab(tok: Tokenizer) -> tuple[dict[str, int], list[str]]:
    """A gpt2/bpe tokenizer as GPT-2's vocab.json and merges.txt (what Hugging Face and llama.cpp
    read): every token spelt through bytes_to_unicode -> its id (specials included), and the merges
    in priority order, one "left right" line each. tiktoken keeps only ranks; a token's merge is
    the pair that BPE with the lower ranks alone leaves of its bytes."""
    if tok.kind == "char":
        raise UserError("a char tokenizer has no byte-level vocabulary")
    enc, spell = tok.enc, bytes_to_unicode()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(tok.base_vocab_size) if i != tok.eot_id}
    text = lambda token: "".join(spell[b] for b in token)
    vocab = {text(token): i for token, i in ranks.items()}
    vocab |= {EOT: tok.eot_id, **tok.specials}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = _bpe_parts(ranks, token, rank)
            merges.append(f"{text(left)} {text(right)}")
    return vocab, merges


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE of `token`'s bytes using only merges ranked below max_rank (for a token of rank
    max_rank: the two parts its own merge joins)."""
    parts = [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(a + b, max_rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs, default=(max_rank, -1))
        if rank >= max_rank:
            return parts
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def bpe_tokenizer(ranks: dict[bytes, int]) -> Tokenizer:
    """A Tokenizer for freshly trained merge ranks (GPT-2 pre-tokenisation)."""
    text = ranks_to_text(ranks)
    return Tokenizer("bpe", enc=bpe_encoding(text, GPT2_PATTERN), ranks=text)


def train_bpe(texts, vocab_size: int) -> dict[bytes, int]:
    """Train a byte-level BPE on `texts` and return its tiktoken merge ranks (vocab_size - 1 of
    them; <|endoftext|> takes the last id). Fewer when the corpus runs out of pairs to merge."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    # use_regex: GPT-2's pre-tokenisation regex, the same pieces tiktoken will cut with GPT2_PATTERN
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(texts, trainer)
    # `tokenizers` spells a token's bytes through bytes_to_unicode; tiktoken ranks raw bytes and
    # merges by the rank of the merged token, so a token's rank is its merge's priority.
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for left, right in json.loads(hf.to_str())["model"]["merges"]:
        ranks.setdefault(bytes(byte_of[c] for c in left + right), len(ranks))
    return ranks


# ----------------------------------------------------------------------------------------------
# Cutting text into pieces that encode like the whole

# Where a piece may end: before a space or newline that is followed by a non-space. GPT-2's regex
# never joins such a character to the text before it (only a literal space joins the word after
# it, and a whitespace run ends before its last character when a non-space follows), and a run
# left at the end of a piece is still one piece (`\s++$`): both halves tokenize as in the whole.
SAFE_CUT = re.compile(r"[\n ](?=\S)")


def iter_pieces(stream, size: int = PIECE_CHARS):
    """(document index, text) pieces of about `size` chars, cut only where encoding the pieces
    separately gives exactly the tokens of the whole document (tests check this)."""
    doc, buf = 0, ""
    for block in stream:
        if block is None:
            if buf:
                yield doc, buf
            doc, buf = doc + 1, ""
            continue
        buf += block
        while len(buf) > size and (m := SAFE_CUT.search(buf, size)):
            yield doc, buf[:m.start()]
            buf = buf[m.start():]
