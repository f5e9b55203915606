"""budget.py: the time budget's decisions, on a fake clock that only the test moves.

A budget times the steps between BUDGET_SKIP_ITERS and the end of warmup, decides max_iters =
lr_decay_iters to fit the time left, decides again while a WSD run's LR is flat, and says when
slowed steps leave no room. Runs of train.py under a budget are tested in test_train.py.
"""
import types

import numpy as np
import pytest

import budget
from budget import BUDGET_SHARE, BUDGET_SKIP_ITERS, TimeBudget
from schedule import cooldown_start, lr_at

RT = types.SimpleNamespace(distributed=False, device="cpu", world_size=1)
STEP = 1 / 16  # seconds per step: sums of it are exact, so the fitting length is exact too


def settings(**changes):
    return dict(time_budget_s=60.0, warmup_iters=25, eval_interval=50, eval_iters=30, gradient_accumulation_steps=2,
                log_interval=5, max_iters=5000, lr_decay_iters=5000, lr_schedule="cosine", cooldown_frac=0.25,
                decay_lr=True, learning_rate=1e-3, min_lr=1e-4) | changes


class Clock:
    """time.time() for a budget: moved only by the test."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run_steps(time_budget, clock, first, last, step_s):
    """Steps first..last (each taking step_s on the clock) as train() reports them."""
    for it in range(first, last + 1):
        clock.now += step_s
        time_budget.after_step(it)


def cost(it, n, step_s, eval_s, interval):
    """Seconds of the steps it+1..n and the evaluations among them (every interval, and at n)."""
    evals = sum(1 for i in range(it + 1, n + 1) if i % interval == 0 or i == n)
    return (n - it) * step_s + evals * eval_s


def test_the_first_decision_is_the_longest_run_that_fits_the_time_left(capsys):
    """Timed from BUDGET_SKIP_ITERS to the end of warmup, the steps' speed decides max_iters =
    lr_decay_iters: the steps left and their evaluations (estimated from the step time, none having
    run) fit the time left, one step more does not. The settings dict holds the decision."""
    cfg, clock = settings(), Clock()
    tb = TimeBudget(cfg, RT, started=clock.now, clock=clock)
    run_steps(tb, clock, 1, 24, step_s=STEP)
    assert tb.decision is None and cfg["max_iters"] == 5000  # warmup is not over
    run_steps(tb, clock, 25, 25, step_s=STEP)
    n = tb.decision["max_iters"]
    assert cfg["max_iters"] == cfg["lr_decay_iters"] == tb.decision["lr_decay_iters"] == n
    eval_s = STEP * 30 * 2 / 3 / 2  # eval_iters forwards without backward, of one micro-batch each
    assert tb.decision["ms_per_iter"] == 1000 * STEP and tb.decision["eval_s"] == pytest.approx(eval_s)
    assert tb.decision["left_s"] == pytest.approx(60.0 - 25 * STEP)
    left = tb.decision["left_s"] * BUDGET_SHARE
    assert cost(25, n, STEP, eval_s, 50) <= left < cost(25, n + 1, STEP, eval_s, 50)
    assert tb.decision["settings"] == dict(max_iters=5000, lr_decay_iters=5000)  # what the run was given
    assert f"max_iters = lr_decay_iters = {n}" in capsys.readouterr().out
    run_steps(tb, clock, 26, 200, step_s=0.5)  # slower steps later: no second decision under cosine
    assert cfg["max_iters"] == n


def test_an_evaluation_among_the_timed_steps_is_not_step_time_and_prices_the_evaluations():
    """An evaluation while the steps are timed moves the clock but not the measured step time, and
    its duration is what the decision plans each evaluation to take."""
    cfg, clock = settings(), Clock()
    tb = TimeBudget(cfg, RT, started=clock.now, clock=clock)
    run_steps(tb, clock, 1, 10, step_s=STEP)
    clock.now += 3.0
    tb.after_eval(3.0)
    run_steps(tb, clock, 11, 25, step_s=STEP)
    assert tb.decision["ms_per_iter"] == 1000 * STEP and tb.decision["eval_s"] == 3.0
    assert tb.decision["left_s"] == pytest.approx(60.0 - 25 * STEP - 3.0)
    left = tb.decision["left_s"] * BUDGET_SHARE
    n = tb.decision["max_iters"]
    assert cost(25, n, STEP, 3.0, 50) <= left < cost(25, n + 1, STEP, 3.0, 50)


def test_a_resumed_budget_times_from_its_own_start_and_counts_the_earlier_time():
    """A run resumed before its decision times its own steps from the resume on, and the time its
    earlier processes took is spent already."""
    cfg, clock = settings(warmup_iters=0), Clock()
    tb = TimeBudget(cfg, RT, start_iter=40, started=clock.now, earlier_s=20.0, clock=clock)
    run_steps(tb, clock, 41, 40 + BUDGET_SKIP_ITERS + 19, step_s=STEP)
    assert tb.decision is None
    run_steps(tb, clock, 40 + BUDGET_SKIP_ITERS + 20, 40 + BUDGET_SKIP_ITERS + 20, step_s=STEP)
    it, n = 40 + BUDGET_SKIP_ITERS + 20, tb.decision["max_iters"]
    assert tb.decision["left_s"] == pytest.approx(60.0 - 20.0 - (it - 40) * STEP)
    left = tb.decision["left_s"] * BUDGET_SHARE
    assert cost(it, n, STEP, tb.decision["eval_s"], 50) <= left < cost(it, n + 1, STEP, tb.decision["eval_s"], 50)


def test_a_stored_decision_is_kept_and_no_steps_are_timed():
    """A resumed run that stored its decision keeps it: its steps decide nothing again (cosine)."""
    cfg, clock = settings(max_iters=300, lr_decay_iters=300), Clock()
    decision = dict(max_iters=300, lr_decay_iters=300, ms_per_iter=40.0, eval_s=0.5, left_s=50.0,
                    settings=dict(max_iters=5000, lr_decay_iters=5000))
    tb = TimeBudget(cfg, RT, dict(decision), start_iter=100, started=clock.now, clock=clock)
    run_steps(tb, clock, 101, 200, step_s=0.01)
    assert tb.decision == decision and cfg["max_iters"] == 300


def test_a_wsd_run_decides_again_while_its_lr_is_flat_and_changes_no_lr_already_used(capsys):
    """Under WSD each log step decides the length again from the latest steps' speed until the
    cooldown begins: steps that slow down shorten the run, every new length leaves the LR of every
    step taken as it was, and once the cooldown has begun the length stays."""
    cfg, clock = settings(lr_schedule="wsd", time_budget_s=20.0, eval_interval=1000), Clock()
    tb = TimeBudget(cfg, RT, started=clock.now, clock=clock)
    lrs_used, lengths, it = [], [], 0
    while it < cfg["max_iters"]:
        lrs_used.append(lr_at(cfg, it))
        it += 1
        clock.now += 0.02 if it <= 25 else 0.06  # after the first decision, three times as slow
        tb.after_step(it)
        if it == 25:
            first = cfg["max_iters"]
            assert "decided again while the LR is flat" in capsys.readouterr().out
            lengths.append(first)
        elif it > 25 and it % 5 == 0:
            flat = it < cooldown_start(cfg["lr_decay_iters"], 25, 0.25)
            tb.at_log(it, 5, 5 * 0.06)
            assert cfg["max_iters"] == lengths[-1] or flat
            lengths.append(cfg["max_iters"])
        assert [lr_at(cfg, i) for i in range(it)] == lrs_used  # no LR already used moved
    assert lengths[-1] < first
    assert cfg["max_iters"] == cfg["lr_decay_iters"] == tb.decision["max_iters"]
    assert tb.decision["ms_per_iter"] == pytest.approx(60.0)
    assert tb.decision["settings"] == dict(max_iters=5000, lr_decay_iters=5000)
    assert clock.now <= 20.0  # the shortened run fits its budget
    assert capsys.readouterr().out.count("max_iters = lr_decay_iters") == 1  # the last decision, printed


def test_a_resume_given_its_own_max_iters_fixes_the_length():
    """A WSD run resumed with a max_iters of its own is not re-decided: the user chose the length."""
    cfg, clock = settings(lr_schedule="wsd", max_iters=400, lr_decay_iters=400), Clock()
    decision = dict(max_iters=300, lr_decay_iters=300, ms_per_iter=40.0, eval_s=0.5, left_s=50.0,
                    settings=dict(max_iters=5000, lr_decay_iters=5000))
    tb = TimeBudget(cfg, RT, decision, start_iter=100, started=clock.now, clock=clock)
    tb.at_log(105, 5, 50.0)
    assert cfg["max_iters"] == 400 and tb.decision is decision


def test_over_when_the_steps_run_slower_than_decided(capsys):
    """At a log step the budget is over when the time left no longer holds the next log interval
    and the final evaluation at the latest speed (with BUDGET_GUARD_MARGIN); never between log
    steps, at max_iters, or before a decision."""
    cfg, clock = settings(), Clock()
    tb = TimeBudget(cfg, RT, started=clock.now, clock=clock)
    assert not tb.over(0)
    run_steps(tb, clock, 1, 25, step_s=0.04)
    n = cfg["max_iters"]
    it = 25
    while it < 200:  # at the decided speed: room to spare
        run_steps(tb, clock, it + 1, it + 5, step_s=0.04)
        it += 5
        tb.at_log(it, 5, 5 * 0.04)
        assert not tb.over(it)
    clock.now = 59.0  # steps ran slow: a minute is nearly gone
    run_steps(tb, clock, it + 1, it + 5, step_s=0.2)
    it += 5
    tb.at_log(it, 5, 5 * 0.2)
    assert not tb.over(it + 1) and not tb.over(n)
    assert tb.over(it)
    assert f"the run ends at iter {it} of {n}" in capsys.readouterr().out


def test_the_guard_reads_the_latest_log_intervals_speed():
    """The speed over() plans with is that of the last log intervals (at most five), not the
    decided one: latest_step_s."""
    decision = dict(ms_per_iter=40.0)
    recent = budget.collections.deque(maxlen=5)
    assert budget.latest_step_s(recent, decision) == 0.04
    for steps, seconds in [(5, 5.0)] + [(5, 0.5)] * 5:
        recent.append((steps, seconds))
    assert budget.latest_step_s(recent, decision) == pytest.approx(0.1)  # the slow interval has left the window


@pytest.mark.parametrize("seed", range(20))
def test_iterations_within_a_budget_are_the_most_that_fit(seed):
    """iters_within_budget's answer is what counting every candidate length gives."""
    rng = np.random.default_rng(seed)
    it, interval = int(rng.integers(0, 50)), int(rng.integers(1, 30))
    step_s, eval_s, left = rng.uniform(0.01, 0.1), rng.uniform(0, 2), rng.uniform(0, 20)

    def cost(n):  # steps from `it`, and an evaluation at every multiple of interval and at the end
        evals = sum(1 for i in range(it + 1, n + 1) if i % interval == 0 or i == n)
        return (n - it) * step_s + evals * eval_s

    fitting = [n for n in range(it, it + 2100) if cost(n) <= left]
    assert budget.iters_within_budget(left, it, step_s, eval_s, interval) == max(fitting)


@pytest.mark.parametrize("it, frac, warmup", [(0, 0.2, 0), (1, 0.2, 5), (37, 0.2, 5), (500, 0.3, 100),
                                              (999, 0.05, 10), (12, 0.9, 0)])
def test_the_shortest_wsd_run_decays_no_step_already_taken(it, frac, warmup):
    cfg = dict(cooldown_frac=frac, warmup_iters=warmup)
    later = [n for n in range(it, 20 * it + 10) if cooldown_start(n, warmup, frac) >= it]
    assert budget.shortest_wsd_run(cfg, it) == min(later)


def test_the_budget_guard_lets_a_run_finish_what_fits_and_stops_what_would_overrun():
    """At a log step the guard looks as far as the next log step or max_iters, whichever is nearer:
    the last steps and the final evaluation, if they fit at the latest speed with the guard's margin,
    run; a full log interval that would not fit ends the run now."""
    cfg, decision = dict(log_interval=100, max_iters=1000, time_budget_s=60.0), dict(eval_s=1.0)
    rt = types.SimpleNamespace(distributed=False)
    step_s, margin = 0.02, budget.BUDGET_GUARD_MARGIN
    last = margin * (50 * step_s + 1.0)  # from iter 950: 50 steps and the final evaluation
    assert not budget.budget_spent(cfg, decision, 950, step_s, 60 - last * 1.01, rt)
    assert budget.budget_spent(cfg, decision, 950, step_s, 60 - last * 0.99, rt)
    # from iter 500 the next stop is 100 steps away: the same time left is not enough
    assert budget.budget_spent(cfg, decision, 500, step_s, 60 - last * 1.01, rt)
