"""RunLogs in, simulated RunLogs out: the raw surrogate (its own scale) on the exact batches
of given runs (`simulate_runs`), and which steps a run is predicted at (`wanted_eval_steps`).

A simulated RunLog has the same format as a real one (DESIGN.md, RunLog v1), so every tool
reads both. Its header says `"simulated": true` and, if the simulated run diverged, the
step it diverged at (`diverged_at_step`); losses after a divergence are left out. A
calibrated simulator's predictions as RunLogs are `calibrate.fitting.runs`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from calibrate.io.runlog import (
  EvalRecord,
  RunHeader,
  RunLog,
  StepRecord,
  order_from_runlog,
  run_learning_rates,
)
from surrogate import optim
from surrogate.errors import CalibrationError
from surrogate.prepare import Prepared
from surrogate.simulate import SimPlan, simulate_many

DEFAULT_EVAL_EVERY = 20


def wanted_eval_steps(run: RunLog, default_every: int = DEFAULT_EVAL_EVERY) -> list[int]:
  """The steps a prediction of `run` evaluates: the run's own eval steps, else every k and T."""
  t = run.num_steps
  if run.evals:
    return sorted(set(run.eval_steps))
  return default_eval_steps(t, default_every)


def check_not_empty(runs: Sequence[RunLog]) -> None:
  """Raises `CalibrationError`, naming the file, for a run or order file with no steps."""
  for r in runs:
    if r.num_steps == 0:
      where = r.path or f"run {r.header.run_id!r}"
      raise CalibrationError(f"{where}: the order has no steps; there is nothing to simulate")


def default_eval_steps(num_steps: int, every: int = DEFAULT_EVAL_EVERY) -> list[int]:
  """Every `every` steps from 0, and the last: where an order without evals is predicted."""
  return sorted(set(range(0, num_steps, every)) | {num_steps})


def plan_for(runs: Sequence[RunLog], *, diagnostics: bool = False,
             default_every: int = DEFAULT_EVAL_EVERY, eval_chunk: int = 16) -> SimPlan:
  """A plan whose checkpoints include every wanted eval step of `runs` (all of length T).

  Checkpoints fall every g steps and at T, with g the gcd of the wanted steps below T.
  """
  t = runs[0].num_steps
  inner = [s for r in runs for s in wanted_eval_steps(r, default_every) if 0 < s < t]
  every = math.gcd(*inner) if inner else max(t, 1)
  return SimPlan(eval_every=every, eval_chunk=eval_chunk, diagnostics=diagnostics)


def simulate_runs(prep: Prepared, params0, runs: Sequence[RunLog], *,
                  knobs: optim.Knobs | None = None, model_name: str = "surrogate",
                  default_every: int = DEFAULT_EVAL_EVERY,
                  chunk_size: int | None = None,
                  progress: bool = True) -> list[RunLog]:
  """Simulates each run's exact batches and returns the predicted RunLogs (surrogate scale).

  Runs are grouped by (steps, batch size, optimizer); each group is one `simulate_many`
  call. A step's logged `lr` is used when every step of the run has one, otherwise the
  header's schedule. Evals in the given runs are ignored except for their steps.

  Args:
    prep: the prepared data set (the runs must be on the same fragments).
    params0: the surrogate's initial parameters.
    runs: real runs or order files.
    knobs: learning-rate and weight-decay scales (default 1).
    model_name: written in the headers' `model`.
    default_every: eval spacing for runs that have no evals.
    chunk_size, progress: passed to `simulate_many`.

  Returns:
    One simulated RunLog per run, in the given order.
  """
  check_not_empty(runs)
  knobs = optim.Knobs.identity() if knobs is None else knobs
  if np.ndim(knobs.lr_scale) or np.ndim(knobs.weight_decay_scale):
    raise ValueError("simulate_runs takes one set of knobs for all runs (scalar fields)")
  groups: dict[tuple, list[int]] = {}
  for i, run in enumerate(runs):
    opt_cfg = optim.OptimizerConfig.of_run(run.header)  # with its LoRA adapter, if any
    order = order_from_runlog(run, prep.fragments)
    groups.setdefault((order.shape, opt_cfg), []).append(i)
  out: list[RunLog | None] = [None] * len(runs)
  eval_ids = prep.eval_ids()
  for ((steps, _), opt_cfg), members in groups.items():
    group = [runs[i] for i in members]
    plan = plan_for(group, default_every=default_every)
    orders = np.stack([order_from_runlog(r, prep.fragments) for r in group])
    lrs = np.stack([run_learning_rates(r) for r in group])
    traj = simulate_many(params0, knobs, orders, lrs, prep.data, model_cfg=prep.model_cfg,
                         opt_cfg=opt_cfg, plan=plan, chunk_size=chunk_size, progress=progress)
    ckpt = plan.checkpoint_steps(steps)
    for n, (i, run) in enumerate(zip(members, group)):
      used_lr = lrs[n] * float(knobs.lr_scale)
      out[i] = _to_runlog(run, traj.eval_loss_CxM[n], traj.train_loss_T[n], used_lr,
                          int(traj.diverged_step[n]), ckpt, eval_ids, prep, model_name,
                          default_every)
  return out  # type: ignore[return-value]


def _to_runlog(run, eval_CxM, train_T, lr_T, diverged, ckpt_C, eval_ids, prep, model_name,
               default_every) -> RunLog:
  extra = {"simulated": True, "source_run": run.header.run_id}
  if diverged >= 0:
    extra["diverged_at_step"] = diverged
  header = RunHeader(run_id=run.header.run_id, dataset_sha256=prep.fragments.sha256,
                     model=model_name, optimizer=dict(run.header.optimizer),
                     batch_size=run.header.batch_size, seed=run.header.seed, extra=extra)
  steps = [StepRecord(t, s.examples,
                      loss=float(train_T[t]) if np.isfinite(train_T[t]) else None,
                      lr=float(lr_T[t]))
           for t, s in enumerate(run.steps)]
  evals = []
  for s in wanted_eval_steps(run, default_every):
    c = int(np.searchsorted(ckpt_C, s))
    row = eval_CxM[c]
    if np.isfinite(row).all():
      evals.append(EvalRecord(s, {k: float(v) for k, v in zip(eval_ids, row)}))
  return RunLog(header, tuple(steps), tuple(evals))

