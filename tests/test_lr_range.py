"""lr_range.py: the learning rates the range test (train.py --lr_find) suggests, and its picture.

The range test as a run (one process and torchrun, the picture read back) is tested in test_inspect.py.
"""
import sys

import lr_range


def test_the_suggestion_is_the_steepest_descent_before_the_minimum():
    """The suggested LR is where the smoothed loss falls fastest per log-LR, not past its minimum."""
    lrs = [10.0 ** (k / 2) for k in range(-10, 1)]  # 1e-5 .. 1
    losses = [4.0, 4.0, 3.9, 3.5, 2.5, 2.2, 2.0, 2.1, 3.0, 9.0, 20.0]  # steepest 3.5 -> 2.5, lowest at 2.0
    steepest, lowest = lr_range.lr_suggestions(lrs, losses)
    assert steepest in (lrs[3], lrs[4]) and lowest == lrs[6]


def test_lr_find_without_matplotlib_prints_its_result_and_how_to_draw_it(monkeypatch, tmp_path, capsys):
    """Without matplotlib the range test still prints its suggestion; one line says how to draw it."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    lr_range.plot_lr_find({"out_dir": str(tmp_path), "dataset": "d"}, [1e-3, 1e-2], [2.0, 1.0], 1e-3, 1e-2)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "lr_find.png not drawn" in out[0] and "pip install matplotlib" in out[0]
    assert not (tmp_path / "lr_find.png").exists()


def test_a_loss_that_only_rises_suggests_its_first_learning_rate():
    """With no descent before the minimum (it is at the first or second LR) there is no slope to
    read: both suggestions are the minimum's LR."""
    lrs = [1e-5, 1e-4, 1e-3, 1e-2]
    assert lr_range.lr_suggestions(lrs, [2.0, 2.5, 3.0, 9.0]) == (1e-5, 1e-5)
    assert lr_range.lr_suggestions(lrs, [2.0, 1.9, 3.0, 9.0]) == (1e-4, 1e-4)
