"""Driving a trained model, for every script that generates text (sample.py, serve.py).

- find_checkpoint / load_model: the one way a script picks and loads a model: --ckpt PATH (a
  checkpoint of this project, or a Hugging Face GPT-2 folder), else best.pt / ckpt.pt of
  --out_dir, else the newest run under out*/; then its tokenizer, device, precision and, on a
  CPU, int8 or transposed weights for decoding.
- TextStream turns generated tokens into text as soon as the text is final: a byte-level token
  can end inside a UTF-8 character (decoded alone it would show U+FFFD), and the end of the text
  may be the start of a stop string, which must never be shown. Only the tokens after the last
  final text are decoded at each step, so a long generation stays linear.
The model and its sampling loop are gpt.py's; this module only chooses and cuts.
"""
from collections import namedtuple
from pathlib import Path

import torch

from common import UserError, autocast_context, resolve_device, resolve_dtype
from gpt import GPT, is_hub_model_id, load_checkpoint, model_from_checkpoint, quantize_int8, store_linear_weights_transposed
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


def load_model(ckpt=None, out_dir=None, device="auto", dtype="auto", int8=False, scoring=False):
    """Loaded(model, tokenizer, device, autocast context, a line saying what was loaded) for the
    checkpoint find_checkpoint picks. `scoring`: the model will score whole windows (sample.py
    --eval, --analyze) rather than decode token by token, which changes what "auto" means."""
    device_name = resolve_device(device)
    run_dtype = resolve_dtype(dtype, device_name)
    # On a CPU "auto" generates in fp32: decoding reads each weight once per token, and bf16
    # autocast would re-cast every weight on every step (`sample.py --benchmark --dtype bfloat16`
    # shows it). Scoring whole windows is where bf16 matmuls win, as in training.
    if dtype == "auto" and device_name == "cpu" and not scoring:
        run_dtype = torch.float32
    path = find_checkpoint(ckpt, out_dir)
    if path.is_dir() or is_hub_model_id(path):  # a Hugging Face GPT-2 (folder or Hub id): GPT-2's own BPE
        try:
            model = GPT.from_pretrained(path).to(device_name)
        except (ValueError, OSError) as e:
            raise UserError(f"cannot load {path}: {e}") from None
        tokenizer, what = load_tokenizer("gpt2"), "Hugging Face GPT-2"
    else:
        checkpoint = load_checkpoint(path, device_name)
        if not checkpoint.get("tokenizer"):
            raise UserError(f"{path} carries no tokenizer; it was not written by train.py")
        tokenizer = load_tokenizer(checkpoint["tokenizer"])
        model = model_from_checkpoint(checkpoint, device_name)
        what = f"iter {checkpoint.get('iter_num', '?')}"
    model.eval()
    params = model.num_params()
    if int8:
        if device_name != "cpu":
            raise UserError(f"--int8 runs on the CPU (torch's int8 matmul kernel); got --device {device_name}")
        try:
            quantize_int8(model)
        except RuntimeError as e:
            raise UserError(str(e)) from None
    elif device_name == "cpu":
        store_linear_weights_transposed(model)  # faster decoding on a CPU (gpt.py says why)
    description = (f"loaded {path} ({what}, {params / 1e6:.2f}M parameters, block_size "
                   f"{model.config.block_size}, {tokenizer.kind} tokenizer) on {device_name}, "
                   f"{'int8 weights + bfloat16' if int8 else str(run_dtype).removeprefix('torch.')}")
    return Loaded(model, tokenizer, device_name, autocast_context(device_name, run_dtype), description)


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
