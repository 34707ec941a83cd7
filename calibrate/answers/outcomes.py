"""What-if answers from a calibrated simulator: a fragment's outcome under an order, and
orders compared.

Outcomes follow DESIGN.md ("Words"): in a fine-tune that shifts domain nearly every probe
loss falls whatever is fed, so a fragment's outcome is judged by its *own contribution*: the
run against its counterfactual, the same order with that fragment's batches replaced by the
rest (`surrogate.orders.without_fragment`). With default thresholds of 2 % (relative):

- forgotten: its probe loss at the end is >= 2 % above its minimum during the run;
- generalizes: otherwise, its own contribution lowers its final probe loss by >= 2 %;
- memorized: otherwise, its own contribution lowers its final train loss by >= 2 %;
- not learned: none of these.

The labels are exclusive in that order of precedence, so their probabilities sum to one.
Each ensemble member (seed x gain) of the simulator gives one label; a label's probability
is the share of members that give it. A fragment the order never feeds has no own
contribution, so it can never generalize or be memorized.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np

from calibrate.fitting.calibration import Simulator, predict
from calibrate.fitting.metrics import fragment_means
from calibrate.fitting.runs import check_compatible
from calibrate.fitting.verdicts import OUTCOMES, Outcome, Thresholds, label_outcomes
from calibrate.io.runlog import RunLog, order_from_runlog, run_learning_rates
from calibrate.io.simulated import check_not_empty, default_eval_steps
from surrogate import optim
from surrogate import orders as orders_lib
from surrogate.errors import CalibrationError

__all__ = ["OUTCOMES", "Comparison", "Outcome", "Thresholds", "WhatIf", "compare",
           "label_outcomes", "what_if"]


def outcome_shares(label: np.ndarray, valid: np.ndarray, axis: int = 0) -> np.ndarray:
  """The share of valid members with each outcome: the outcomes' axis is appended last."""
  counts = np.stack([((label == o) & valid).sum(axis) for o in range(len(OUTCOMES))], -1)
  return counts / np.maximum(valid.sum(axis), 1)[..., None]


def order_arrays(sim: Simulator, order,
                 run_id: str = "order") -> tuple[str, np.ndarray, np.ndarray]:
  """(name, order_TxB, lr_T) of an order given as a RunLog (its logged rates, else its
  header's schedule) or as an int array [T, B] of example positions (the simulator's
  schedule)."""
  if isinstance(order, RunLog):
    check_not_empty([order])
    check_compatible(sim, [order])
    return order.header.run_id, order_from_runlog(order, sim.fragments), run_learning_rates(order)
  order_TxB = np.asarray(order)
  if order_TxB.ndim != 2 or not 0 < order_TxB.shape[0] <= sim.num_steps or not order_TxB.shape[1]:
    raise ValueError(f"an order must be a [T, B] array with 0 < T <= {sim.num_steps} and B > 0, "
                     f"got shape {order_TxB.shape}")
  return run_id, order_TxB, optim.learning_rates(sim.opt_cfg, order_TxB.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class WhatIf:
  """The predicted fate of every fragment under one order.

  Attributes:
    run_id: the order's name.
    fragments: the F fragment names.
    steps: the C eval steps.
    probe_CxF, probe_lo_CxF, probe_hi_CxF: predicted mean probe loss per fragment and its
      interval (level `level`).
    train_CxF: predicted mean loss of the evaluated train examples.
    own_probe_F, own_train_F: the own contribution, the relative drop of the final probe
      (train) loss against the counterfactual, ensemble mean (0 for a fragment not fed).
    outcome_FxO: probability of each outcome (columns in `OUTCOMES` order).
    level: the interval level.
    tier, tier_reason: which model answered ("analytic" or "transformer") and why
      (`calibrate.fitting.calibration.resolve_tier`).
  """
  run_id: str
  fragments: tuple[str, ...]
  steps: np.ndarray
  probe_CxF: np.ndarray
  probe_lo_CxF: np.ndarray
  probe_hi_CxF: np.ndarray
  train_CxF: np.ndarray
  own_probe_F: np.ndarray
  own_train_F: np.ndarray
  outcome_FxO: np.ndarray
  level: float
  tier: str = "transformer"
  tier_reason: str = ""

  def outcome(self, fragment: str) -> Outcome:
    """The most probable outcome of a fragment."""
    return OUTCOMES[int(np.argmax(self.outcome_FxO[self.fragments.index(fragment)]))]

  def table(self) -> str:
    """One line per fragment: start and final probe loss, interval, own contribution,
    most probable outcome and its probability."""
    w = max(len(f) for f in self.fragments) + 2
    lines = [f"{self.run_id}: predicted probe loss after {int(self.steps[-1])} steps "
             f"({self.level:.0%} interval)",
             "fragment".ljust(w) + "  start  final  interval        own probe  own train  outcome"]
    for f, name in enumerate(self.fragments):
      o = int(np.argmax(self.outcome_FxO[f]))
      lines.append(
          f"{name.ljust(w)}{self.probe_CxF[0, f]:7.3f}{self.probe_CxF[-1, f]:7.3f}  "
          f"[{self.probe_lo_CxF[-1, f]:.3f}, {self.probe_hi_CxF[-1, f]:.3f}]"
          f"{self.own_probe_F[f]:+10.1%}{self.own_train_F[f]:+11.1%}  "
          f"{OUTCOMES[o].value} ({self.outcome_FxO[f, o]:.0%})")
    return "\n".join(lines)


def what_if(sim: Simulator, order, *, key: jax.Array, thresholds: Thresholds = Thresholds(),
            level: float = 0.8, progress: bool = False, tier: str = "auto") -> WhatIf:
  """Predicts what each fragment becomes under `order` (a RunLog or a [T, B] array).

  Simulates the order and, for every fragment it feeds, its counterfactual without that
  fragment (F + 1 runs per seed at most, all with the order's learning rates), in one
  vmapped call, evaluated every 20 steps and at the end. A RunLog's own evals are ignored.

  Args:
    key: draws the counterfactuals' replacement examples.
    tier: "auto" (default: the analytic tier where it passed its trust check, else the
      transformer), "analytic" or "transformer".
  """
  name, order_TxB, lr_T = order_arrays(sim, order)
  frags = sim.fragments
  num_f = len(frags.names)
  pools = frags.train_pools()
  fed = [f for f in range(num_f) if np.isin(order_TxB, pools[f]).any()]
  counterfactuals = [orders_lib.without_fragment(order_TxB, pools, f,
                                                 key=jax.random.fold_in(key, f)) for f in fed]
  pred, _ = predict(sim, np.stack([order_TxB, *counterfactuals]), lr_T,
                    default_eval_steps(order_TxB.shape[0]), progress=progress, tier=tier)
  probe = pred.fragment_members(probe=True)       # R K C F
  train = pred.fragment_members(probe=False)
  with np.errstate(invalid="ignore"):
    lo, hi = pred.interval(lambda x: fragment_means(x[:1], pred.frag_M, pred.is_probe_M, num_f),
                           level=level)
  own_probe = np.zeros(probe.shape[1:2] + (num_f,))   # K F
  own_train = np.zeros_like(own_probe)
  for r, f in enumerate(fed, start=1):
    own_probe[:, f] = (probe[r, :, -1, f] - probe[0, :, -1, f]) / probe[r, :, -1, f]
    own_train[:, f] = (train[r, :, -1, f] - train[0, :, -1, f]) / train[r, :, -1, f]
  actual = probe[0]                                   # K C F
  label = label_outcomes(actual[:, -1], np.nanmin(actual, axis=1), own_probe, own_train,
                         thresholds)
  valid = np.isfinite(actual[:, -1])                  # members whose seed did not diverge
  return WhatIf(name, frags.names, pred.steps, np.nanmean(actual, 0), lo[0], hi[0],
                np.nanmean(train[0], 0), np.nanmean(own_probe, 0), np.nanmean(own_train, 0),
                outcome_shares(label, valid), level, pred.tier, pred.tier_reason)


@dataclasses.dataclass(frozen=True, eq=False)
class Comparison:
  """Orders ranked by predicted mean final probe loss (lower is better).

  Attributes:
    names: the orders, best first.
    mean, lo, hi: predicted mean final probe loss over fragments, and its interval.
    p_best: share of ensemble members under which the order is the best of those given.
    level: the interval level.
    tier, tier_reason: which model answered ("analytic" or "transformer") and why
      (`calibrate.fitting.calibration.resolve_tier`).
  """
  names: tuple[str, ...]
  mean: np.ndarray
  lo: np.ndarray
  hi: np.ndarray
  p_best: np.ndarray
  level: float
  tier: str = "transformer"
  tier_reason: str = ""

  def table(self) -> str:
    w = max(len(n) for n in self.names) + 2
    lines = ["rank  " + "order".ljust(w) + "mean final probe loss  interval          P(best)"]
    for i, n in enumerate(self.names):
      lines.append(f"{i + 1:4d}  {n.ljust(w)}{self.mean[i]:21.4f}  [{self.lo[i]:.4f}, "
                   f"{self.hi[i]:.4f}]  {self.p_best[i]:6.0%}")
    return "\n".join(lines)


def compare(sim: Simulator, candidates: Mapping[str, object], *, level: float = 0.8,
            progress: bool = False, tier: str = "auto") -> Comparison:
  """Ranks named orders (RunLogs or [T, B] arrays of one shape) by predicted mean final
  probe loss; each is evaluated every 20 steps and at the end. `tier` as for `what_if`."""
  if not candidates:
    raise ValueError("compare needs at least one order")
  names = list(candidates)
  arrays = [order_arrays(sim, o, n)[1:] for n, o in candidates.items()]
  shapes = {o.shape for o, _ in arrays}
  if len(shapes) > 1:
    raise CalibrationError(f"compare needs orders of one shape (steps, batch), got "
                           f"{sorted(shapes)}; compare them in separate calls")
  pred, _ = predict(sim, np.stack([o for o, _ in arrays]), np.stack([lr for _, lr in arrays]),
                    default_eval_steps(arrays[0][0].shape[0]), progress=progress, tier=tier)
  num_f = len(sim.fragments.names)
  mean_final = lambda x: np.nanmean(  # noqa: E731
      fragment_means(x[:, -1:], pred.frag_M, pred.is_probe_M, num_f)[:, 0], -1)
  members = pred.fragment_members(probe=True)[:, :, -1].mean(-1)      # R K
  with np.errstate(invalid="ignore"):
    lo, hi = pred.interval(mean_final, level=level)
  mean = np.nanmean(members, 1)
  best = np.argmin(np.where(np.isfinite(members), members, np.inf), axis=0)
  p_best = np.bincount(best, minlength=len(names)) / members.shape[1]
  rank = np.argsort(mean, kind="stable")
  return Comparison(tuple(names[i] for i in rank), mean[rank], lo[rank], hi[rank], p_best[rank],
                    level, pred.tier, pred.tier_reason)
