"""schedule.py: the learning rate as a pure function of the step (warmup, then cosine or WSD)."""
import pytest

import schedule


def test_lr_schedule_end_points():
    lr = lambda it: schedule.get_lr(it, learning_rate=1.0, warmup_iters=10, lr_decay_iters=110, min_lr=0.1)
    assert 0 < lr(0) < lr(5) < lr(9) < 1.0  # warmup never starts at 0 (that step would be wasted)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # half way down the cosine
    assert lr(110) == pytest.approx(0.1) and lr(10_000) == pytest.approx(0.1)
    decay = [lr(it) for it in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_wsd_schedule_holds_the_peak_then_decays_linearly_to_min_lr():
    lr = lambda it, n=110: schedule.get_lr(it, 1.0, 10, n, 0.1, schedule="wsd", cooldown_frac=0.2)
    assert [lr(it) for it in range(10)] == [schedule.get_lr(it, 1.0, 10, 110, 0.1) for it in range(10)]
    start = schedule.cooldown_start(110, 10, 0.2)
    assert start == 110 - 22 and all(lr(it) == 1.0 for it in range(10, start + 1))
    cooldown = [lr(it) for it in range(start, 111)]
    steps = [a - b for a, b in zip(cooldown, cooldown[1:])]
    assert steps == pytest.approx([0.9 / (110 - start)] * len(steps))  # a straight line ...
    assert lr(110) == lr(10_000) == 0.1  # ... to min_lr, then flat
    # a longer or shorter run changes no LR before either run's cooldown
    for n in (60, 200, 5000):
        first = min(start, schedule.cooldown_start(n, 10, 0.2))
        assert [lr(it, n) for it in range(first)] == [lr(it) for it in range(first)]


@pytest.mark.parametrize("name", ["cosine", "wsd"])
def test_lr_at_is_get_lr_of_the_settings_and_learning_rate_without_decay(name):
    """lr_at reads a run's settings into get_lr's arguments; with decay_lr off it is learning_rate
    at every step, warmup included."""
    cfg = dict(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, decay_lr=True,
               lr_schedule=name, cooldown_frac=0.3)
    expected = [schedule.get_lr(it, 1.0, 10, 110, 0.1, schedule=name, cooldown_frac=0.3) for it in range(120)]
    assert [schedule.lr_at(cfg, it) for it in range(120)] == expected
    assert {schedule.lr_at(cfg | {"decay_lr": False}, it) for it in range(120)} == {1.0}
