"""The learning-rate schedule: a pure function of the step.

Linear warmup from a small nonzero LR, then a decay to min_lr at lr_decay_iters, flat after:
cosine from the end of warmup (nanoGPT's), or WSD (warmup-stable-decay), which holds the peak LR
and decays linearly over the last cooldown_frac of lr_decay_iters. Under WSD a longer or shorter
run changes no LR before its cooldown, which is what lets a time budget (budget.py) decide a run's
length again while its LR is flat. get_lr takes the schedule's numbers; lr_at takes train.py's
settings.
"""
import math


def cooldown_start(lr_decay_iters, warmup_iters, cooldown_frac):
    """The first step of a WSD schedule's decay: cooldown_frac of lr_decay_iters before its end."""
    return max(warmup_iters, lr_decay_iters - round(cooldown_frac * lr_decay_iters))


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, schedule="cosine", cooldown_frac=0.2):
    """Linear warmup (never 0, even at step 0), then a decay to min_lr at lr_decay_iters (flat after):
    cosine from the end of warmup, or, for "wsd", learning_rate until the cooldown, then linear."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    if schedule == "wsd":
        start = cooldown_start(lr_decay_iters, warmup_iters, cooldown_frac)
        if it < start:
            return learning_rate
        return learning_rate + (it - start) / (lr_decay_iters - start) * (min_lr - learning_rate)
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def lr_at(cfg, it):
    """The learning rate of step `it` under a run's settings (learning_rate throughout without decay_lr)."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    return get_lr(it, cfg["learning_rate"], cfg["warmup_iters"], cfg["lr_decay_iters"], cfg["min_lr"],
                  cfg["lr_schedule"], cfg["cooldown_frac"])
