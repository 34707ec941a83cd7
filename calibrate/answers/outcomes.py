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
import enum
from collections.abc import Mapping

import jax
import numpy as np

from calibrate.fitting.metrics import fragment_means
from calibrate.io.runlog import RunHeader, RunLog, StepRecord, order_from_runlog
from calibrate.fitting.calibration import Simulator
from surrogate import orders as orders_lib

__all__ = ["Comparison", "Outcome", "Thresholds", "WhatIf", "as_order_file", "compare",
           "what_if"]


class Outcome(enum.Enum):
  """What happens to a fragment under an order (DESIGN.md)."""
  FORGOTTEN = "forgotten"
  GENERALIZES = "generalizes"
  MEMORIZED = "memorized"
  NOT_LEARNED = "not learned"


OUTCOMES = tuple(Outcome)


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Relative thresholds of the outcome labels (DESIGN.md's defaults)."""
  generalizes: float = 0.02
  memorized: float = 0.02
  forgotten: float = 0.02


def as_order_file(sim: Simulator, order, run_id: str = "order") -> RunLog:
  """A RunLog without evals for `order`: a RunLog (returned as is) or an int array [T, B] of
  example positions, given the simulator's optimizer and batch size."""
  if isinstance(order, RunLog):
    return order
  order_TxB = np.asarray(order)
  if order_TxB.ndim != 2 or order_TxB.shape[0] > sim.num_steps:
    raise ValueError(f"an order must be a [T, B] array with T <= {sim.num_steps}, got shape "
                     f"{order_TxB.shape}")
  ids = [e.id for e in sim.fragments.examples]
  header = RunHeader(run_id=run_id, dataset_sha256=sim.fragments.sha256, model="order",
                     optimizer=sim.opt_cfg.to_dict(), batch_size=int(order_TxB.shape[1]), seed=0)
  steps = [StepRecord(t, tuple(ids[i] for i in row if i >= 0)) for t, row in enumerate(order_TxB)]
  return RunLog(header, tuple(steps), ())


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


def _members_fragment(pred, probe: bool) -> np.ndarray:
  """[R, K, C, F] fragment means of each member (probe or evaluated train examples)."""
  num_f = int(pred.frag_M.max()) + 1
  select = pred.is_probe_M if probe else ~pred.is_probe_M
  return fragment_means(pred.members_RxKxCxM, pred.frag_M, select, num_f)


def what_if(sim: Simulator, order, *, key: jax.Array | None = None,
            thresholds: Thresholds = Thresholds(), level: float = 0.8,
            progress: bool = False) -> WhatIf:
  """Predicts what each fragment becomes under `order` (a RunLog or a [T, B] array).

  Simulates the order and, for every fragment it feeds, its counterfactual without that
  fragment (F + 1 runs per seed at most), all in one vmapped call.
  """
  # Its own evals (if it is a real run) are dropped: the order is simulated with its
  # counterfactuals, all evaluated at the same steps.
  run = dataclasses.replace(as_order_file(sim, order), evals=())
  frags = sim.fragments
  num_f = len(frags.names)
  order_TxB = order_from_runlog(run, frags)
  fed = [f for f in range(num_f) if np.isin(order_TxB, frags.train_pools()[f]).any()]
  key = jax.random.key(0) if key is None else key
  counterfactuals = [as_order_file(sim, orders_lib.without_fragment(
      order_TxB, frags.train_pools(), f, key=jax.random.fold_in(key, f)), f"{run.header.run_id}"
      f"-without-{frags.names[f]}") for f in fed]
  counterfactuals = [dataclasses.replace(c, header=dataclasses.replace(
      c.header, optimizer=dict(run.header.optimizer))) for c in counterfactuals]
  pred = sim.predict([run, *counterfactuals], progress=progress)
  probe = _members_fragment(pred, True)     # R K C F
  train = _members_fragment(pred, False)
  with np.errstate(invalid="ignore"):
    lo, hi = pred.interval(lambda x: fragment_means(x[:1], pred.frag_M, pred.is_probe_M, num_f),
                           level=level)
  own_probe = np.zeros(probe.shape[1:2] + (num_f,))   # K F
  own_train = np.zeros_like(own_probe)
  for r, f in enumerate(fed, start=1):
    own_probe[:, f] = (probe[r, :, -1, f] - probe[0, :, -1, f]) / probe[r, :, -1, f]
    own_train[:, f] = (train[r, :, -1, f] - train[0, :, -1, f]) / train[r, :, -1, f]
  actual = probe[0]                                   # K C F
  forgotten = actual[:, -1] >= (1 + thresholds.forgotten) * np.nanmin(actual, axis=1)
  label = np.where(forgotten, 0, np.where(own_probe >= thresholds.generalizes, 1,
                                          np.where(own_train >= thresholds.memorized, 2, 3)))
  valid = np.isfinite(actual[:, -1])                  # members whose seed did not diverge
  probs = np.stack([((label == o) & valid).sum(0) for o in range(len(OUTCOMES))], 1)
  probs = probs / np.maximum(valid.sum(0), 1)[:, None]
  return WhatIf(run.header.run_id, frags.names, pred.steps, np.nanmean(actual, 0), lo[0], hi[0],
                np.nanmean(train[0], 0), np.nanmean(own_probe, 0), np.nanmean(own_train, 0),
                probs, level)


@dataclasses.dataclass(frozen=True, eq=False)
class Comparison:
  """Orders ranked by predicted mean final probe loss (lower is better).

  Attributes:
    names: the orders, best first.
    mean, lo, hi: predicted mean final probe loss over fragments, and its interval.
    p_best: share of ensemble members under which the order is the best of those given.
    level: the interval level.
  """
  names: tuple[str, ...]
  mean: np.ndarray
  lo: np.ndarray
  hi: np.ndarray
  p_best: np.ndarray
  level: float

  def table(self) -> str:
    w = max(len(n) for n in self.names) + 2
    lines = ["rank  " + "order".ljust(w) + "mean final probe loss  interval          P(best)"]
    for i, n in enumerate(self.names):
      lines.append(f"{i + 1:4d}  {n.ljust(w)}{self.mean[i]:21.4f}  [{self.lo[i]:.4f}, "
                   f"{self.hi[i]:.4f}]  {self.p_best[i]:6.0%}")
    return "\n".join(lines)


def compare(sim: Simulator, candidates: Mapping[str, object], *, level: float = 0.8,
            progress: bool = False) -> Comparison:
  """Ranks named orders (RunLogs or [T, B] arrays) by predicted mean final probe loss."""
  if not candidates:
    raise ValueError("compare needs at least one order")
  names = list(candidates)
  runs = [dataclasses.replace(r, evals=(), header=dataclasses.replace(r.header, run_id=n))
          for n, r in ((n, as_order_file(sim, o, n)) for n, o in candidates.items())]
  pred = sim.predict(runs, progress=progress)
  num_f = len(sim.fragments.names)
  mean_final = lambda x: np.nanmean(  # noqa: E731
      fragment_means(x[:, -1:], pred.frag_M, pred.is_probe_M, num_f)[:, 0], -1)
  members = _members_fragment(pred, True)[:, :, -1].mean(-1)      # R K
  with np.errstate(invalid="ignore"):
    lo, hi = pred.interval(mean_final, level=level)
  mean = np.nanmean(members, 1)
  best = np.argmin(np.where(np.isfinite(members), members, np.inf), axis=0)
  p_best = np.bincount(best, minlength=len(names)) / members.shape[1]
  rank = np.argsort(mean, kind="stable")
  return Comparison(tuple(names[i] for i in rank), mean[rank], lo[rank], hi[rank], p_best[rank],
                    level)
