"""The time budget: a run's length from the measured speed of its first steps.

time_budget_s makes a recipe take the same wall time on any machine. TimeBudget times a run's
steps, leaving out the first few (they allocate and pick kernels), up to the end of warmup, then
sets max_iters = lr_decay_iters to what the time left holds, evaluations included, so that the
decision changes no learning rate already used. Under the WSD schedule the LR stays flat until the
cooldown, so the length is decided again at each log step until then, from the latest steps'
speed. At each log step it also checks that the time left holds the steps to the next log step and
the final evaluation: a run whose steps slowed ends there, evaluated and saved, rather than overrun.
Under torchrun every rank takes the slowest rank's timings, so all decide alike. The decision is a
plain dict that the checkpoint stores; a resumed run keeps it (and, under WSD, goes on deciding).
"""
import collections
import time

import torch

from common import print0, sync
from schedule import cooldown_start

BUDGET_SKIP_ITERS = 2  # steps not timed: the first ones allocate and pick kernels
BUDGET_MIN_TIMED_ITERS = 20
BUDGET_SHARE = 0.95  # of the time left that the decision plans for: step times drift over a run
BUDGET_GUARD_MARGIN = 1.25  # the next log interval and the final evaluation may run this much slower


class TimeBudget:
    """One process's time budget over a run. A decision sets max_iters and lr_decay_iters in
    `cfg`, the run's settings (the dict is changed in place, so the loop and the checkpoints see
    the length decided); `decision` is the dict a checkpoint stores, None until decided and in a
    run without time_budget_s. `started` is when this process began (time.time()), `earlier_s`
    the seconds a resumed run's earlier processes took; `clock` (time.time by default) is read at
    each call."""

    def __init__(self, cfg, rt, decision=None, start_iter=0, started=None, earlier_s=0.0, clock=None):
        self.cfg, self.rt, self.decision = cfg, rt, decision
        self.clock = clock
        self.started = self.now() if started is None else started
        self.earlier_s = earlier_s
        self.timing = cfg["time_budget_s"] > 0 and decision is None  # the first decision is still to come
        self.start_iter = start_iter
        self.decision_iter = budget_decision_iter(cfg, start_iter)
        self.timing_since = None  # when the timed steps began (moved on by the evaluations among them)
        self.eval_s = None  # the latest evaluation's seconds
        self.recent_steps = collections.deque(maxlen=5)  # (steps, seconds) of the last log intervals

    def now(self):
        return (self.clock or time.time)()

    def used_s(self):
        """Seconds of time_budget_s gone, the run's earlier processes included."""
        return self.earlier_s + self.now() - self.started

    def after_step(self, it):
        """Step `it` is done: time the steps from BUDGET_SKIP_ITERS past the start to
        decision_iter, and there make the first decision."""
        if not self.timing or it not in (self.start_iter + BUDGET_SKIP_ITERS, self.decision_iter):
            return
        sync(self.rt.device)  # time the work, not its launch (only at these two steps)
        if self.timing_since is None:
            self.timing_since = self.now()
            return
        cfg = self.cfg
        step_s = (self.now() - self.timing_since) / (self.decision_iter - self.start_iter - BUDGET_SKIP_ITERS)
        accum = cfg["gradient_accumulation_steps"] // self.rt.world_size  # micro-steps of this process
        eval_estimate = self.eval_s if self.eval_s is not None else step_s * cfg["eval_iters"] * 2 / 3 / accum
        self.decide(it, step_s, eval_estimate)
        print0(budget_line(cfg, self.decision) + (" (decided again while the LR is flat)"
                                                  if budget_redecides(cfg, self.decision, it) else ""))
        self.timing = False

    def after_eval(self, seconds):
        """An evaluation took `seconds`: the step timing leaves it out, and decisions plan on it."""
        self.eval_s = seconds
        if self.timing_since is not None:
            self.timing_since += seconds

    def at_log(self, it, steps, seconds):
        """A log step: the last `steps` steps took `seconds`. A WSD run whose LR is still flat
        decides its length again from the latest speed."""
        self.recent_steps.append((steps, seconds))
        if not budget_redecides(self.cfg, self.decision, it):
            return
        step_s = latest_step_s(self.recent_steps, self.decision)
        self.decide(it, step_s, self.eval_s or self.decision["eval_s"], self.decision["settings"])
        if not budget_redecides(self.cfg, self.decision, it + self.cfg["log_interval"]):
            print0(budget_line(self.cfg, self.decision))  # the last decision: the cooldown starts before the next

    def over(self, it):
        """True at a log step before max_iters where the time left no longer holds the steps to the
        next log step and the final evaluation (budget_spent), said in one line. All ranks agree."""
        cfg = self.cfg
        if self.decision is None or it == cfg["max_iters"] or it % cfg["log_interval"]:
            return False
        if not budget_spent(cfg, self.decision, it, latest_step_s(self.recent_steps, self.decision),
                            self.used_s(), self.rt):
            return False
        print0(f"time budget: the steps ran slower than measured; the run ends at iter {it} of "
               f"{cfg['max_iters']} to finish within {cfg['time_budget_s']:g} s")
        return True

    def decide(self, it, step_s, eval_s, settings=None):
        self.decision = decide_budget(self.cfg, it, step_s, eval_s, self.used_s(), self.rt, settings)
        self.cfg.update({k: self.decision[k] for k in ("max_iters", "lr_decay_iters")})


def budget_decision_iter(cfg, start):
    """The step after which the budget decides: the end of warmup, so the decision never changes
    a learning rate already used, and at least BUDGET_MIN_TIMED_ITERS timed steps after `start`."""
    return max(start + BUDGET_SKIP_ITERS + BUDGET_MIN_TIMED_ITERS, cfg["warmup_iters"])


def iters_within_budget(seconds_left, it, step_s, eval_s, eval_interval):
    """The largest max_iters >= it such that the steps from `it` and the evaluations they pass
    (every eval_interval, and the last one) take at most `seconds_left`."""
    def cost(n):
        evals = n // eval_interval - it // eval_interval + (n % eval_interval != 0)
        return (n - it) * step_s + evals * eval_s
    n = it + max(0, int(seconds_left / (step_s + eval_s / eval_interval)))
    while n > it and cost(n) > seconds_left:
        n -= 1
    return n


def shortest_wsd_run(cfg, it):
    """The fewest lr_decay_iters whose WSD cooldown starts at `it` or later (cooldown_start only
    grows with lr_decay_iters): a shorter run would have decayed an LR already used."""
    n = max(it, int((it - 1) / (1 - cfg["cooldown_frac"])) - 1)  # below the first candidate
    while cooldown_start(n, cfg["warmup_iters"], cfg["cooldown_frac"]) < it:
        n += 1
    return n


def decide_budget(cfg, it, step_s, eval_s, used_s, rt, settings=None):
    """max_iters and lr_decay_iters that end the run within time_budget_s, `used_s` seconds of it
    gone, agreed by all ranks (each takes the slowest rank's timings and clock). settings: the
    max_iters and lr_decay_iters the run was given (kept in the decision, for a resume)."""
    if rt.distributed:
        timings = torch.tensor([step_s, eval_s, used_s], device=rt.device, dtype=torch.float64)
        torch.distributed.all_reduce(timings, op=torch.distributed.ReduceOp.MAX)
        step_s, eval_s, used_s = timings.tolist()
    seconds_left = cfg["time_budget_s"] - used_s
    n = iters_within_budget(seconds_left * BUDGET_SHARE, it, step_s, eval_s, cfg["eval_interval"])
    if cfg["lr_schedule"] == "wsd":
        n = max(n, shortest_wsd_run(cfg, it))
    return dict(max_iters=n, lr_decay_iters=n, ms_per_iter=step_s * 1000, eval_s=eval_s, left_s=seconds_left,
                settings=settings or {k: cfg[k] for k in ("max_iters", "lr_decay_iters")})


def budget_line(cfg, budget):
    """The decision as one printed line: what was measured, and the length it gives."""
    n = budget["max_iters"]
    cooldown = (f", decaying from iter {cooldown_start(n, cfg['warmup_iters'], cfg['cooldown_frac'])}"
                if cfg["lr_schedule"] == "wsd" else "")
    return (f"time budget {cfg['time_budget_s']:g} s: {budget['ms_per_iter']:.1f} ms/iter and "
            f"{budget['eval_s']:.2f} s per evaluation measured, {budget['left_s']:.0f} s left -> "
            f"max_iters = lr_decay_iters = {n}{cooldown}")


def latest_step_s(recent_steps, budget):
    """Seconds per step over the last log intervals (deque of (steps, seconds)); the decided speed
    until this process has logged."""
    steps = sum(n for n, _ in recent_steps)
    return sum(s for _, s in recent_steps) / steps if steps else budget["ms_per_iter"] / 1000


def budget_redecides(cfg, budget, it):
    """True where a WSD run under a time budget decides its length again: while its LR is still
    flat, a new length moves only the cooldown, which no step has used yet, so the run can follow
    the speed it measures (a shared machine's drifts) instead of a guess made at its start. A
    resume given its own max_iters fixes the length."""
    return (budget is not None and cfg["lr_schedule"] == "wsd" and cfg["decay_lr"]
            and cfg["max_iters"] == budget["max_iters"]
            and it < cooldown_start(cfg["lr_decay_iters"], cfg["warmup_iters"], cfg["cooldown_frac"]))


def budget_spent(cfg, budget, it, step_s, used_s, rt):
    """True when the time left in time_budget_s (`used_s` gone) cannot hold the steps to the next
    log step (or to max_iters, if nearer) and the final evaluation at the latest speed `step_s`,
    with BUDGET_GUARD_MARGIN to spare: a run whose steps slowed after the decision (a shared
    machine) ends here, evaluated and saved, rather than overrun its budget. All ranks agree."""
    steps = min(cfg["log_interval"], cfg["max_iters"] - it)
    reserve = BUDGET_GUARD_MARGIN * (steps * step_s + budget["eval_s"])
    spent = used_s + reserve > cfg["time_budget_s"]
    if rt.distributed:
        flag = torch.tensor(int(spent), device=rt.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        spent = bool(flag.item())
    return spent
