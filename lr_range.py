"""What the learning-rate range test (train.py --lr_find) reads from its curve: the suggested
learning rates, and the picture.

The test (L. Smith, "Cyclical Learning Rates for Training Neural Networks", 2017, section 3.3)
trains from the initial weights while the LR rises exponentially, one step each, and follows the
smoothed loss. lr_suggestions takes that curve to the LR where the loss falls fastest (the
suggestion) and the LR of its minimum (whose tenth is the other usual choice); plot_lr_find draws
the curve with both marked into out_dir/lr_find.png, or says in one line why it cannot.
"""
from pathlib import Path

import numpy as np

from common import UserError, print0, pyplot, save_figure


def lr_suggestions(lrs, losses):
    """(the LR where the smoothed loss falls fastest per unit of log LR, before its minimum; the
    LR of its minimum)."""
    lowest = int(np.argmin(losses))
    if lowest < 2:  # no descent to measure: the loss only rose
        return lrs[lowest], lrs[lowest]
    slopes = np.gradient(np.array(losses[:lowest + 1]), np.log(lrs[:lowest + 1]))
    return lrs[int(np.argmin(slopes))], lrs[lowest]


def plot_lr_find(cfg, lrs, losses, steepest, lowest):
    """The smoothed loss against the LR (log scale), the suggestions marked, into out_dir/lr_find.png."""
    path = Path(cfg["out_dir"]) / "lr_find.png"
    try:
        plt = pyplot()
    except UserError as e:
        print0(f"{path} not drawn: {e}")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.semilogx(lrs, losses, label="smoothed training loss")
    for lr, style, what in ((steepest, "r--", "steepest descent (suggested)"), (lowest / 10, "g:", "minimum / 10")):
        ax.axvline(lr, color=style[0], linestyle=style[1:], label=f"{what}: {lr:.2e}")
    ax.set_ylim(min(losses) - 0.05 * (losses[0] - min(losses)), losses[0] * 1.15)  # the divergence: cut off
    ax.set(xlabel="learning rate", ylabel="loss", title=f"LR range test: {cfg['dataset']}")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    try:
        Path(cfg["out_dir"]).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to out_dir {cfg['out_dir']}: {e.strerror or e}") from None
    save_figure(fig, path)
    print0(f"wrote {path}")
