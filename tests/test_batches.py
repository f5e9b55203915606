"""batches.py: a dataset's folder, and the batches read from its bins."""
import re
from pathlib import Path

import numpy as np
import pytest

import batches
from common import UserError


def test_dataset_may_name_its_meta_json_and_a_text_file_gets_the_prepare_command(char_data, tmp_path):
    """--dataset may name a dataset folder or its meta.json; a raw text file gets the prepare.py
    command that makes a dataset of it (into another folder than the file)."""
    assert batches.dataset_dir(str(char_data / "meta.json")) == char_data
    assert batches.dataset_dir(str(char_data)) == char_data
    assert batches.dataset_dir("shakespeare_char") == Path("data") / "shakespeare_char"
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match=re.escape(f"python prepare.py --input {text} --out data/notes")):
        batches.dataset_dir(str(text))


def test_windows_read_past_four_billion_tokens(tmp_path):
    """The windows index the bins in 64 bits: a start beyond 2**32 reads the right tokens
    (a sparse file of 4.3 G uint16 tokens, which takes no space on disk)."""
    path = tmp_path / "train.bin"
    n = (1 << 32) + 1000
    with open(path, "wb") as f:
        f.truncate(2 * n)
        f.seek(2 * ((1 << 32) + 10))
        f.write(np.arange(100, dtype=np.uint16).tobytes())
    x, y = batches.get_windows(tmp_path, "train", np.dtype(np.uint16), np.array([(1 << 32) + 10]), 8)
    assert x.tolist() == [list(range(8))] and y.tolist() == [list(range(1, 9))]


def test_a_batch_is_windows_of_the_bins_with_targets_one_token_later(char_data):
    """Batches.get returns, for each start, block_size tokens of the split's bin and the same
    window shifted by one token, read here straight from the file."""
    cfg = dict(dataset=str(char_data), block_size=16, batch_size=4)
    data = batches.make_batches(cfg, "cpu")
    assert type(data) is batches.Batches and data.meta["vocab_size"] == data.tokenizer.vocab_size
    tokens = np.fromfile(char_data / "val.bin", dtype=np.dtype(data.meta["dtype"])).astype(np.int64)
    starts = data.draw("val", np.random.default_rng(0), 4)
    assert starts.max() + 17 <= len(tokens) and data.window_starts["val"] == len(tokens) - 16
    x, y = data.get("val", starts)
    assert x.tolist() == [tokens[s:s + 16].tolist() for s in starts]
    assert y.tolist() == [tokens[s + 1:s + 17].tolist() for s in starts]


def test_a_block_size_the_bins_cannot_hold_is_one_line(char_data):
    """A bin of n tokens holds windows of at most n - 1 inputs: a longer block_size is an error that
    says how many tokens the split has."""
    n = (char_data / "val.bin").stat().st_size // 2
    with pytest.raises(UserError, match=f"val.bin of {re.escape(str(char_data))} holds {n} tokens"):
        batches.open_bins(char_data, n)
    assert batches.open_bins(char_data, n - 1)[2]["val"] == 1
