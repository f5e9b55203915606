"""The training data: batches of the token bins that prepare.py writes, read from memory-mapped files.

A dataset is a folder with meta.json (the token dtype, the vocabulary, the format), train.bin and
val.bin. A text dataset gives random windows of block_size + 1 tokens (Batches); a chat dataset
(prepare.py --format chat) gives whole conversations, one per row, with the loss on the assistant
replies only (ChatBatches). Both draw from a generator the caller passes, so a run's batch stream
is a seeded generator's and a resumed run continues it exactly; make_batches picks the kind from
meta.json.
"""
import json
import os
from pathlib import Path

import numpy as np
import torch

from common import UserError, print0
from tokenizer import load_tokenizer


def dataset_dir(name):
    """The folder of a prepared dataset: a name under data/, a path to the folder or its meta.json."""
    path = Path(name) if os.sep in name else Path("data") / name
    if not path.is_dir() and Path(name).is_file():
        if Path(name).name == "meta.json":
            return Path(name).parent
        stem = Path(name).stem
        raise UserError(f"dataset {name} is a file, not a folder made by prepare.py; make one with "
                        f"`python prepare.py --input {name} --out data/{stem}`, then --dataset={stem}")
    return path


def read_meta(data_dir):
    """A dataset's meta.json, or the error that names the prepare.py command to make it."""
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"dataset not found: {meta_path} is missing. Make it with "
                        f"`python prepare.py --input YOUR_TEXT --out {data_dir}` "
                        f"(or plain `python prepare.py` for shakespeare_char)")
    return json.loads(meta_path.read_text(encoding="utf-8"))


def open_bins(data_dir, block_size):
    """meta.json, the bins' dtype, and each split's number of window starts (at least one)."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    window_starts = {}
    for split in ("train", "val"):
        n = (data_dir / f"{split}.bin").stat().st_size // dtype.itemsize
        if n <= block_size:
            raise UserError(f"{split}.bin of {data_dir} holds {n} tokens; block_size {block_size} "
                            f"needs at least {block_size + 1}. Lower block_size or add text.")
        window_starts[split] = n - block_size  # a window is block_size + 1 tokens: inputs and targets
    return meta, dtype, window_starts


def get_windows(data_dir, split, dtype, starts, block_size):
    """Inputs and targets for windows starting at `starts`: two (len(starts), block_size) int64."""
    # A fresh memmap per batch: a long-lived one grows the process' memory (nanoGPT issue #303).
    data = np.memmap(Path(data_dir) / f"{split}.bin", dtype=dtype, mode="r")
    tokens = data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
    return torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(tokens[:, 1:].copy())


class Batches:
    """Random windows of the memory-mapped bins of one dataset, as (x, y) on the device."""

    def __init__(self, cfg, device):
        self.data_dir = dataset_dir(cfg["dataset"])
        self.meta, self.bin_dtype, self.window_starts = open_bins(self.data_dir, cfg["block_size"])
        self.tokenizer = load_tokenizer(self.data_dir)
        self.B, self.T, self.device = cfg["batch_size"], cfg["block_size"], device

    def draw(self, split, rng, count):
        """`count` window starts drawn from `rng`."""
        return rng.integers(0, self.window_starts[split], size=count)

    def get(self, split, starts):
        return self.to_device(*get_windows(self.data_dir, split, self.bin_dtype, starts, self.T))

    def to_device(self, x, y):
        if self.device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)


class ChatBatches(Batches):
    """Whole conversations of a chat dataset (prepare.py --format chat), one per row from its
    first token, as (x, y) on the device. Targets are -1 where the dataset's mask says context
    (system and user turns, role markers) and on the padding after a conversation, so the loss
    counts the assistant replies only. draw() and get() take conversation indices where
    Batches takes window starts: the batch stream, exact resume and the ranks' shares are the same.

    Padding, not packing: a row is one conversation at positions 0.., as sample.py --chat renders
    it, and padding at the end of a row is invisible to the tokens before it under causal
    attention, so SDPA's is_causal stays exact with no mask. Packing several conversations into a
    row wastes no compute on padding but needs attention that does not cross conversations (a
    block-diagonal mask, which SDPA runs on slower kernels than is_causal) and positions that
    restart. Choose block_size near the longest conversation (prepare.py prints it): a longer one
    keeps its first block_size + 1 tokens."""

    def __init__(self, cfg, device):
        self.data_dir = dataset_dir(cfg["dataset"])
        self.meta = read_meta(self.data_dir)
        self.tokenizer = load_tokenizer(self.data_dir)
        self.B, self.T, self.device = cfg["batch_size"], cfg["block_size"], device
        self.bin_dtype = np.dtype(self.meta["dtype"])
        self.starts = {split: np.fromfile(self.data_dir / f"{split}.starts.bin", dtype=np.int64)
                       for split in ("train", "val")}  # conversation i: tokens[starts[i]:starts[i + 1]]
        self.check_lengths()

    def check_lengths(self):
        """One notice for the conversations longer than a row (they keep their beginning); an
        error if no row of a split would hold a reply token to learn."""
        parts = []
        for split, starts in self.starts.items():
            lengths = np.diff(starts)
            too_long = np.flatnonzero(lengths > self.T + 1)
            if not len(too_long):
                continue
            mask = np.memmap(self.data_dir / f"{split}.mask.bin", dtype=np.uint8, mode="r")
            no_reply = sum(not mask[starts[i] + 1:starts[i] + self.T + 1].any() for i in too_long)
            if no_reply == len(lengths):
                raise UserError(f"no {split} conversation of {self.data_dir} reaches a reply within block_size + 1 = "
                                f"{self.T + 1} tokens; raise block_size (the longest is {lengths.max()} tokens)")
            parts.append(f"{len(too_long)} of {len(lengths)} {split}"
                         + (f" ({no_reply} of them with no reply token left)" if no_reply else ""))
        if parts:
            print0(f"notice: conversations longer than block_size + 1 = {self.T + 1} tokens keep their first "
                   f"{self.T + 1}: {', '.join(parts)}")

    def draw(self, split, rng, count):
        """`count` conversation indices drawn from `rng`."""
        return rng.integers(0, len(self.starts[split]) - 1, size=count)

    def get(self, split, conversations):
        # fresh memmaps per batch, as get_windows (nanoGPT issue #303)
        data = np.memmap(self.data_dir / f"{split}.bin", dtype=self.bin_dtype, mode="r")
        mask = np.memmap(self.data_dir / f"{split}.mask.bin", dtype=np.uint8, mode="r")
        starts = self.starts[split]
        x = np.zeros((len(conversations), self.T), dtype=np.int64)  # padding: any id, never attended to
        y = np.full((len(conversations), self.T), -1, dtype=np.int64)
        for row, i in enumerate(conversations):
            begin, end = starts[i], min(starts[i + 1], starts[i] + self.T + 1)
            tokens = data[begin:end].astype(np.int64)
            n = len(tokens) - 1
            x[row, :n] = tokens[:-1]
            y[row, :n] = np.where(mask[begin + 1:end] == 1, tokens[1:], -1)
        return self.to_device(torch.from_numpy(x), torch.from_numpy(y))


def make_batches(cfg, device):
    """The batches of cfg's dataset: windows of a text dataset, conversations of a chat one."""
    chat = read_meta(dataset_dir(cfg["dataset"])).get("format") == "chat"
    return (ChatBatches if chat else Batches)(cfg, device)
