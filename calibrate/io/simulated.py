"""RunLogs in, simulated RunLogs out: the edge between the file format and the arrays.

- `simulate_runs`: the raw surrogate (its own scale) on the exact batches of given runs.
- `predict_runs` / `predicted_runlogs`: a calibrated simulator's prediction of given runs or
  order files (`calibrate.fitting.calibration.predict` on their arrays), and back to RunLogs.
- `order_file`: an order array as an order file (a RunLog without evals).

A simulated RunLog has the same format as a real one (DESIGN.md, RunLog v1), so every tool
reads both. Its header says `"simulated": true` and, if the simulated run diverged, the
step it diverged at (`diverged_at_step`), or which surrogate seeds diverged
(`diverged_seeds`); losses after a divergence are left out.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from calibrate.fitting.calibration import Prediction, Simulator, predict
from calibrate.io.runlog import (EvalRecord, RunHeader, RunLog, StepRecord,
                                 order_from_runlog, run_learning_rates)
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
  knobs = optim.Knobs.identity() if knobs is None else knobs
  if np.ndim(knobs.lr_scale) or np.ndim(knobs.weight_decay_scale):
    raise ValueError("simulate_runs takes one set of knobs for all runs (scalar fields)")
  groups: dict[tuple, list[int]] = {}
  for i, run in enumerate(runs):
    opt_cfg = optim.OptimizerConfig.from_dict(run.header.optimizer)
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


def order_file(sim: Simulator, order_TxB, run_id: str = "order") -> RunLog:
  """An order file (a RunLog without evals) for an int array [T, B] of example positions,
  with the simulator's optimizer."""
  order_TxB = np.asarray(order_TxB)
  if order_TxB.ndim != 2 or order_TxB.shape[0] > sim.num_steps:
    raise ValueError(f"an order must be a [T, B] array with T <= {sim.num_steps}, got shape "
                     f"{order_TxB.shape}")
  ids = [e.id for e in sim.fragments.examples]
  header = RunHeader(run_id=run_id, dataset_sha256=sim.fragments.sha256, model="order",
                     optimizer=sim.opt_cfg.to_dict(), batch_size=int(order_TxB.shape[1]),
                     seed=0)
  steps = [StepRecord(t, tuple(ids[i] for i in row if i >= 0)) for t, row in enumerate(order_TxB)]
  return RunLog(header, tuple(steps), ())


def check_compatible(sim: Simulator, runs: Sequence[RunLog]) -> None:
  """Raises `CalibrationError` for runs the simulator cannot predict; warns on other
  optimizer settings of the same family."""
  for r in runs:
    rid = r.header.run_id
    if r.header.dataset_sha256.lower() != sim.fragments.sha256:
      raise CalibrationError(f"run {rid!r} is of another fragments file (dataset_sha256 differs "
                             "from the simulator's)")
    if r.num_steps > sim.num_steps:
      raise CalibrationError(f"run {rid!r} has {r.num_steps} steps; the simulator was calibrated "
                             f"on {sim.num_steps}-step runs and cannot predict beyond them")
    name = r.header.optimizer.get("name")
    if name != sim.opt_cfg.name.value:
      raise CalibrationError(f"run {rid!r} uses optimizer {name!r}; the simulator was calibrated "
                             f"on {sim.opt_cfg.name.value!r} runs")
    if optim.OptimizerConfig.from_dict(r.header.optimizer) != sim.opt_cfg:
      warnings.warn(f"run {rid!r} has optimizer settings {r.header.optimizer}, the calibration "
                    f"runs {sim.opt_cfg.to_dict()}: its learning rates are simulated as given, "
                    "the other settings as calibrated, and the prediction is an extrapolation",
                    UserWarning, stacklevel=3)


def predict_runs(sim: Simulator, runs: Sequence[RunLog], *, progress: bool = False,
                 chunk_size: int | None = None) -> Prediction:
  """Predicts the real per-example losses of each run (or order file) at its eval steps.

  The runs must share their eval steps (see `wanted_eval_steps`: an order file is evaluated
  every 20 steps) and their shape. Evals present in `runs` are ignored except for which
  steps and which train examples they cover (those the calibration runs did not evaluate
  are predicted too).

  Raises:
    CalibrationError: runs longer than the calibration runs, different eval steps or
      shapes, or a different optimizer family.
  """
  if not runs:
    raise CalibrationError("predict needs at least one run or order file")
  check_compatible(sim, runs)
  steps = wanted_eval_steps(runs[0])
  for r in runs[1:]:
    if wanted_eval_steps(r) != steps:
      raise CalibrationError(f"run {r.header.run_id!r} is evaluated at other steps than "
                             f"{runs[0].header.run_id!r}; predict them in separate calls")
  orders = [order_from_runlog(r, sim.fragments) for r in runs]
  shapes = {o.shape for o in orders}
  if len(shapes) > 1:
    raise CalibrationError(f"the runs differ in steps or batch size ({sorted(shapes)}); "
                           "predict them in separate calls")
  eval_ids = list(sim.eval_ids)
  seen = set(eval_ids)
  for r in runs:
    for ev in r.evals:
      for i in ev.losses:
        if i not in seen:
          seen.add(i)
          eval_ids.append(i)
  try:
    prediction, _ = predict(sim, np.stack(orders), np.stack([run_learning_rates(r) for r in runs]),
                            steps, eval_ids=eval_ids, progress=progress, chunk_size=chunk_size)
  except CalibrationError as e:
    raise CalibrationError(f"run {runs[0].header.run_id!r}: {e}") from None
  return prediction


def predicted_runlogs(sim: Simulator, runs: Sequence[RunLog], prediction: Prediction,
                      level: float = 0.8) -> list[RunLog]:
  """Predictions as RunLogs on the real scale: same run ids and steps, predicted evals.

  Each eval record carries the `level` interval per example in the extra keys
  `losses_lo` and `losses_hi`; a header says `"simulated": true`, and `diverged_seeds`
  when some of the ensemble diverged (their losses are left out of the mean).
  """
  lo, hi = prediction.interval(level=level, draws=8)
  mean = prediction.mean_NxCxM
  ids = prediction.eval_ids
  out = []
  for n, run in enumerate(runs):
    extra = {"simulated": True, "source_run": run.header.run_id,
             "simulator": {"interval": level, "seeds": sim.num_seeds}}
    bad = [s for s, d in enumerate(prediction.diverged_NxS[n]) if d >= 0]
    if bad:
      extra["diverged_seeds"] = bad
    header = RunHeader(run_id=run.header.run_id, dataset_sha256=sim.fragments.sha256,
                       model=f"surrogate-{sim.model_cfg.depth}x{sim.model_cfg.width}",
                       optimizer=dict(run.header.optimizer), batch_size=run.header.batch_size,
                       seed=run.header.seed, extra=extra)
    steps = [StepRecord(t, s.examples, lr=s.lr) for t, s in enumerate(run.steps)]
    evals = []
    for c, step in enumerate(prediction.steps):
      row = mean[n, c]
      if not np.isfinite(row).all():
        break
      evals.append(EvalRecord(int(step), dict(zip(ids, map(float, row))), extra={
          "losses_lo": dict(zip(ids, map(float, lo[n, c]))),
          "losses_hi": dict(zip(ids, map(float, hi[n, c])))}))
    out.append(RunLog(header, tuple(steps), tuple(evals)))
  return out
