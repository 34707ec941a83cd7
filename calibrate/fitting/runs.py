"""RunLogs at the edge of a calibrated simulator: runs and order files in, predicted RunLogs out.

- `predict_runs`: the prediction of given runs or order files at their eval steps
  (`calibration.predict` on their arrays: their batches, logged rates and eval steps);
- `predicted_runlogs`: a prediction written as RunLogs, with intervals;
- `order_file`: an order array as an order file (a RunLog without evals);
- `check_compatible`: what a simulator can predict.

A predicted RunLog's header says `"simulated": true`, and `diverged_seeds` when some of the
ensemble diverged (their losses are left out of the mean).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np

from calibrate.fitting.calibration import Prediction, Simulator, predict
from calibrate.io.runlog import (
  EvalRecord,
  RunHeader,
  RunLog,
  StepRecord,
  order_from_runlog,
  run_learning_rates,
  where,
)
from calibrate.io.simulated import check_not_empty, wanted_eval_steps
from surrogate import optim
from surrogate.errors import CalibrationError


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
    rid = where(r)
    if r.header.dataset_sha256.lower() != sim.fragments.sha256:
      raise CalibrationError(f"{rid} is of another fragments file (dataset_sha256 differs "
                             "from the simulator's)")
    if r.num_steps > sim.num_steps:
      raise CalibrationError(f"{rid} has {r.num_steps} steps; the simulator was calibrated "
                             f"on {sim.num_steps}-step runs and cannot predict beyond them")
    name = r.header.optimizer.get("name")
    if name != sim.opt_cfg.name.value:
      raise CalibrationError(f"{rid} uses optimizer {name!r}; the simulator was calibrated "
                             f"on {sim.opt_cfg.name.value!r} runs")
    # The adapter is the simulator's mode, set at calibration (FitConfig.low_rank).
    if optim.OptimizerConfig.from_dict(r.header.optimizer) != dataclasses.replace(
        sim.opt_cfg, adapter=None):
      warnings.warn(f"{rid} has optimizer settings {r.header.optimizer}, the calibration "
                    f"runs {sim.opt_cfg.to_dict()}: its learning rates are simulated as given, "
                    "the other settings as calibrated, and the prediction is an extrapolation",
                    UserWarning, stacklevel=3)


def predict_runs(sim: Simulator, runs: Sequence[RunLog], *, progress: bool = False,
                 chunk_size: int | None = None, tier: str = "transformer") -> Prediction:
  """Predicts the real per-example losses of each run (or order file) at its eval steps.

  The runs must share their eval steps (see `wanted_eval_steps`: an order file is evaluated
  every 20 steps) and their shape. Evals present in `runs` are ignored except for which
  steps and which train examples they cover (those the calibration runs did not evaluate
  are predicted too). `tier` chooses the model (`calibration.resolve_tier`).

  Raises:
    CalibrationError: runs longer than the calibration runs, different eval steps or
      shapes, or a different optimizer family.
  """
  if not runs:
    raise CalibrationError("predict needs at least one run or order file")
  check_not_empty(runs)
  check_compatible(sim, runs)
  steps = wanted_eval_steps(runs[0])
  for r in runs[1:]:
    if wanted_eval_steps(r) != steps:
      raise CalibrationError(f"{where(r)} is evaluated at other steps than "
                             f"{where(runs[0])}; predict them in separate calls")
  orders = [order_from_runlog(r, sim.fragments) for r in runs]
  for r, o in zip(runs[1:], orders[1:]):
    if o.shape != orders[0].shape:
      raise CalibrationError(f"{where(r)} has {o.shape[0]} steps of {o.shape[1]}, "
                             f"{where(runs[0])} {orders[0].shape[0]} of {orders[0].shape[1]}; "
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
                            steps, eval_ids=eval_ids, progress=progress, chunk_size=chunk_size,
                            tier=tier)
  except CalibrationError as e:
    raise CalibrationError(f"{where(runs[0])}: {e}") from None
  return prediction


def predicted_runlogs(sim: Simulator, runs: Sequence[RunLog], prediction: Prediction,
                      level: float = 0.8) -> list[RunLog]:
  """Predictions as RunLogs on the real scale: same run ids and steps, predicted evals.

  Each eval record carries the `level` interval per example in the extra keys
  `losses_lo` and `losses_hi`; a header says `"simulated": true`, which tier answered
  (`simulator.tier`), and `diverged_seeds` when some of the ensemble diverged (their losses
  are left out of the mean).
  """
  lo, hi = prediction.interval(level=level, draws=8)
  mean = prediction.mean_NxCxM
  ids = prediction.eval_ids
  out = []
  for n, run in enumerate(runs):
    extra = {"simulated": True, "source_run": run.header.run_id,
             "simulator": {"interval": level, "seeds": sim.num_seeds,
                           "tier": prediction.tier}}
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
