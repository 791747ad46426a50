"""--time-budget: how long a run may take, turned into a step count once, before training starts.

A new run with ``time_budget`` ("15m") is calibrated after its data and model are ready and before anything
is written: one warm-up step, then a few timed steps (CALIBRATION_STEPS, fewer when steps are slow; their
median sets the pace), on throwaway copies of the model, optimiser, EMA, CTAugment and distribution-alignment
state, with the run's own batches and augmentation draws; then one timed evaluation pass over a slice of the
test set, scaled to the whole test set. The run's weights and random streams are untouched, so the run is
exactly the run of ``--steps N`` for the N chosen. N is the most steps whose training and evaluations fit in
what the budget leaves after loading and calibration (less a small reserve for checkpoints and logs); with a
budget, ``steps`` is an upper bound. Where the configured ``eval_every`` would give fewer than FEW_EVALUATIONS
evaluations, it becomes N / 10 (about ten evaluations). With ``--compile`` the copy is not compiled (that would
cost the compilation twice): the pace measured is the uncompiled one.

The choice is recorded, never recomputed: RUN_DIR/config.yaml holds ``steps: N``, the chosen ``eval_every``
and ``time_budget: null``, under a comment that names the budget and the measured speed, and
RUN_DIR/time_budget.json holds the measurement. A resume, or a new run from that config.yaml with another
seed, therefore trains N steps whatever the clock says. ``--resume`` with the options the run was started with
(the same command line plus --resume) is recognised from time_budget.json and continues the same N steps.

``SlowRunWarning`` times the first few steps of every run, budget or not, and warns in one line when the
steps left would take more than a day at that speed.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fixmatch.config import Config, ConfigError, parse_budget, short_repr
from fixmatch.core.dist_align import DistributionAlignment
from fixmatch.core.files import read_run_file
from fixmatch.core.preprocess import predict_logits
from fixmatch.data.datasets import Dataset
from fixmatch.runs.log import write_json_atomic
from fixmatch.runs.rundir import TIME_BUDGET_NAME, RunDir, RunDirError
from fixmatch.training import distributed
from fixmatch.training.batches import Batches, View
from fixmatch.training.state import TrainState
from fixmatch.training.step import train_step

# Every duration below is read from this clock (looked up at each call, so that tests can replace it).
clock: Callable[[], float] = time.perf_counter

CALIBRATION_STEPS = 20  # timed steps after the warm-up step (about 4 s for the cpu-small preset)
CALIBRATION_MAX_S = 30.0  # ... or fewer, once they took this long or CALIBRATION_SHARE of the budget
CALIBRATION_SHARE = 0.05
# Kept from the remaining time for what calibration does not see: the loop's own bookkeeping, checkpoints,
# TensorBoard, the summary, and a pace that drops after a short burst (on a 2-core CPU, 15-minute runs of the
# cpu-small preset made 5.1-5.2 steps/s where their calibration had measured 5.6-5.9).
RESERVE_SHARE, RESERVE_S = 0.10, 3.0
FEW_EVALUATIONS, TARGET_EVALUATIONS = 4, 10
DAY_S = 86400.0

def _rate(steps_per_s: float) -> str:
    return f"{steps_per_s:.3g}"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class BudgetPlan:
    """What a time budget chose, and from what: saved as RUN_DIR/time_budget.json."""
    time_budget: str
    budget_s: float
    setup_s: float  # from the start of training to the end of calibration: loading, model, calibration
    steps_per_s: float
    eval_s: float  # estimated seconds per evaluation
    calibration_steps: int
    steps: int
    eval_every: int
    requested_steps: int  # the configured steps (the upper bound) and eval_every: a resume repeats them
    requested_eval_every: int

    def apply(self, config: Config) -> Config:
        """The run's config: the chosen steps and eval_every, and no budget left to resolve."""
        return dataclasses.replace(config, steps=self.steps, eval_every=self.eval_every, time_budget=None)

    def describe(self) -> str:
        line = (f"time budget {self.time_budget}: {self.steps} steps at {_rate(self.steps_per_s)} steps/s "
                f"(calibrated on {self.calibration_steps} steps")
        line += f"; --steps {self.requested_steps} is the limit)" if self.steps == self.requested_steps else ")"
        line += ", evaluation every step" if self.eval_every == 1 else f", evaluation every {self.eval_every} steps"
        if self.eval_every != self.requested_eval_every:
            line += (f" (about {TARGET_EVALUATIONS} evaluations: eval_every {self.requested_eval_every} would give "
                     f"fewer than {FEW_EVALUATIONS})")
        return line + f", {self.eval_s:.1f} s each; {self.setup_s:.0f} s of loading and calibration"

    def config_header(self) -> str:
        """Comment lines on top of config.yaml: which budget chose its steps, at what speed."""
        return (f"# {self.describe()}.\n"
                f"# time_budget is null below so that this file repeats these {self.steps} steps (a resume, another "
                f"seed); {TIME_BUDGET_NAME} holds the calibration.\n")

    def save(self, run_dir: Path) -> None:
        write_json_atomic(RunDir(run_dir).time_budget_file, dataclasses.asdict(self))


def fit_steps(remaining_s: float, step_s: float, eval_s: float, eval_every: int, max_steps: int) -> int:
    """The most steps n <= max_steps with n * step_s + ceil(n / eval_every) * eval_s <= remaining_s (0 if none)."""
    step_s = max(step_s, 1e-9)

    def fits(n: int) -> bool:
        return n * step_s + math.ceil(n / eval_every) * eval_s <= remaining_s

    low, high = 0, max(0, min(max_steps, math.floor(remaining_s / step_s)))
    while low < high:  # the cost grows with n: bisect for the last n that fits
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def plan_budget(time_budget: str, elapsed_s: float, step_s: float, eval_s: float, calibration_steps: int,
                config: Config) -> BudgetPlan:
    """Steps and eval_every that fit the budget's remaining time, from the measured costs (no clock here)."""
    budget_s = parse_budget(time_budget)
    remaining = budget_s - elapsed_s
    remaining -= RESERVE_SHARE * max(remaining, 0.0) + RESERVE_S
    eval_every = config.eval_every
    steps = fit_steps(remaining, step_s, eval_s, eval_every, config.steps)
    if FEW_EVALUATIONS * eval_every > steps:  # too few evaluations to follow the run: about ten instead
        steps = max(fit_steps(remaining - TARGET_EVALUATIONS * eval_s, step_s, 0.0, 1, config.steps),
                    fit_steps(remaining, step_s, eval_s, 1, min(config.steps, TARGET_EVALUATIONS)))
        eval_every = max(1, math.ceil(steps / TARGET_EVALUATIONS))
    if steps < 1:
        raise ConfigError(f"time budget {time_budget} leaves no time to train: loading and calibration took "
                          f"{elapsed_s:.0f} s and a step with its evaluation takes {step_s + eval_s:.1f} s; give a "
                          f"longer --time-budget, or --steps N instead")
    return BudgetPlan(time_budget=time_budget, budget_s=budget_s, setup_s=elapsed_s,
                      steps_per_s=1.0 / max(step_s, 1e-9), eval_s=eval_s, calibration_steps=calibration_steps,
                      steps=steps, eval_every=eval_every,
                      requested_steps=config.steps, requested_eval_every=config.eval_every)


# ------------------------------------------------------------------------------------------ calibration
@dataclass(frozen=True)
class StepInputs:
    """What a training step reads: the run's model, strong view and pseudo-label transform (copied here, never
    trained), how the run builds its training state, its batches, and its data (for the test images)."""
    model: nn.Module
    strong: View
    align: DistributionAlignment | None
    make_state: Callable[[Config, nn.Module, View, DistributionAlignment | None], TrainState]
    batches: Batches
    data: Dataset


def calibrate(config: Config, started: float, inputs: StepInputs, env: distributed.DistEnv,
              device: torch.device) -> BudgetPlan:
    """Time a few training steps and an evaluation slice, and choose the run's steps (rank 0's, on every rank).

    ``started``: clock() when the run started, so that loading and calibration count against the budget.
    """
    budget_s = parse_budget(config.time_budget)
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda" if cuda else None):
        step, evaluate = _throwaway_run(config, inputs, env, device)
        step_s, timed = _time_steps(step, budget_s, env, device)
        eval_s = _time_evaluation(evaluate, inputs.data.test_images.shape[0], config) if env.is_main else 0.0
    result: BudgetPlan | ConfigError | None = None
    if env.is_main:
        try:
            result = plan_budget(config.time_budget, clock() - started, step_s, eval_s, timed, config)
        except ConfigError as e:  # every rank stops with it, not rank 0 alone
            result = e
    result = distributed.broadcast_object(result, env)
    if isinstance(result, ConfigError):
        raise result
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _throwaway_run(config: Config, inputs: StepInputs, env: distributed.DistEnv,
                   device: torch.device) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """A training step and an evaluation on a copy of the run's training state: the loop's own ``train_step``
    and batches, minus the logging (negligible next to the forward and backward passes). CTAugment and
    distribution alignment learn from every step: their copies do, the run's do not."""
    uncompiled = dataclasses.replace(config, compile=False)  # see the module docstring
    state = inputs.make_state(uncompiled, copy.deepcopy(inputs.model), copy.deepcopy(inputs.strong),
                              copy.deepcopy(inputs.align))

    def step(k: int) -> None:
        state.step = k  # the run's own batches and augmentation draws for step k
        train_step(state, inputs.batches.get(k, state.strong))

    def evaluate(n: int) -> None:  # the EMA pass and, unless the EMA is the weights, the raw pass
        images = inputs.data.test_images[:n]
        predict_logits(state.ema.module, images, state.mean, state.std, config.eval_batch_size, config.channels_last)
        if config.ema != 0:
            predict_logits(state.model, images, state.mean, state.std, config.eval_batch_size, config.channels_last)

    return step, evaluate


def _time_steps(step: Callable[[int], None], budget_s: float, env: distributed.DistEnv,
                device: torch.device) -> tuple[float, int]:
    """Seconds per step: the median of up to CALIBRATION_STEPS steps after a warm-up step (which carries one-off
    costs: allocations, kernel choices), so that a step slowed by another process does not set the pace. Rank 0
    decides when to stop, so that every rank runs as many steps."""
    step(0)
    _sync(device)
    limit = min(CALIBRATION_MAX_S, CALIBRATION_SHARE * budget_s)
    start = last = clock()
    times: list[float] = []
    while True:
        step(len(times) + 1)
        _sync(device)
        now = clock()
        times.append(now - last)
        last = now
        if distributed.broadcast_object(len(times) >= CALIBRATION_STEPS or now - start >= limit, env):
            return statistics.median(times), len(times)


def _time_evaluation(evaluate: Callable[[int], None], num_test: int, config: Config) -> float:
    """Seconds per evaluation: one evaluation batch of test images timed, scaled to the whole test set."""
    n = min(num_test, config.eval_batch_size)
    if n == 0:
        return 0.0
    start = clock()
    evaluate(n)
    return (clock() - start) * num_test / n


# ------------------------------------------------------------------------------------------ resume
def for_resume(config: Config | None, run_dir: Path) -> Config | None:
    """A resumed budget run's configuration: the steps and eval_every its calibration chose, never the clock's.

    The run's config.yaml holds them with ``time_budget: null``. Given the budget the run was started with, and
    steps and eval_every as configured then (e.g. by the same --preset) or as chosen (read back from config.yaml
    by ``--resume``), the budget is replaced by what it chose, so that the resume compares equal; any other
    budget, steps or eval_every is refused in one line.
    """
    if config is None or config.time_budget is None or not RunDir(run_dir).is_run:
        return config  # nothing to resolve, or not a run (the resume reports that)
    plan = _read_plan(run_dir)
    resume = f"resume with: fixmatch train --out {run_dir} --resume"
    if plan is None:
        raise ConfigError(f"cannot resume {run_dir} with --time-budget {config.time_budget}: it was not started "
                          f"with a time budget; {resume}")
    for key, started, now in (("time_budget", (plan.time_budget,), config.time_budget),
                              ("steps", (plan.requested_steps, plan.steps), config.steps),
                              ("eval_every", (plan.requested_eval_every, plan.eval_every), config.eval_every)):
        if now not in started:
            raise ConfigError(f"cannot change '{key}' when resuming a time-budget run ({short_repr(started[0])} -> "
                              f"{short_repr(now)}): its {plan.steps} steps were chosen at the start; {resume}")
    return plan.apply(config)


def _read_plan(run_dir: Path) -> BudgetPlan | None:
    path = RunDir(run_dir).time_budget_file
    try:
        text = read_run_file(path)
        if text is None:
            return None
        plan = BudgetPlan(**json.loads(text))
        parse_budget(plan.time_budget)
    except (ValueError, TypeError, ConfigError, RunDirError, OSError) as e:
        raise ConfigError(f"cannot resume: {path} is damaged ({short_repr(str(e), 80)}); "
                          f"resume with: fixmatch train --out {run_dir} --resume") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in
               (plan.steps, plan.eval_every, plan.requested_steps, plan.requested_eval_every)):
        raise ConfigError(f"cannot resume: {path} is damaged (its step counts are not positive integers); "
                          f"resume with: fixmatch train --out {run_dir} --resume")
    return plan


# ------------------------------------------------------------------------------------------ a run too long
class SlowRunWarning:
    """Times the first steps of a run and warns once, in one line, when the steps left would take over a day.

    The first step is left out (one-off costs); then up to ``steps`` steps are timed, or fewer once they took
    ``max_s``. It costs a clock reading and, on a GPU, a synchronisation for each of those few steps only.
    """

    def __init__(self, total_steps: int, start_step: int, device: torch.device,
                 write: Callable[[str], None] | None, steps: int = 3, max_s: float = 20.0) -> None:
        self.total, self.start, self.device, self.write = total_steps, start_step, device, write
        self.steps, self.max_s = steps, max_s
        self.done = total_steps - start_step < 2  # nothing left to time after the first step
        self._t0 = 0.0

    def step_done(self, step: int) -> None:
        """Called after each optimiser step, with the number of steps done."""
        if self.done:
            return
        _sync(self.device)
        now = clock()
        timed = step - self.start - 1
        if timed == 0:
            self._t0 = now
            return
        if timed < self.steps and now - self._t0 < self.max_s and step < self.total:
            return
        self.done = True
        left = self.total - step
        seconds = left * (now - self._t0) / timed
        if seconds > DAY_S and self.write is not None:
            self.write(f"warning: {left} more steps at {_rate(timed / max(now - self._t0, 1e-9))} steps/s would "
                       f"take about {_duration(seconds)}; to finish sooner give --time-budget (e.g. "
                       f"--time-budget 2h), fewer --steps, or on a CPU --preset cpu-small")
