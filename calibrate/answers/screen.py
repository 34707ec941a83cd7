"""Screening: what each fragment becomes over thousands of simulated feeding orders.

`screen` draws random orders of the chosen families and simulates them in *pairs*: an order
and its counterfactual without one fragment it feeds (`surrogate.orders.without_fragment`),
both from the same surrogate seed. A pair gives that fragment's exact own contribution, so its
outcome (DESIGN.md's labels, as `calibrate.answers.outcomes.what_if` computes them for one order), and
the effect of feeding it on every other fragment: a row of the interference matrix. Fragments
take turns being left out, so each gets about `n_orders / (2 F)` pairs.

Orders are spread over the surrogate seeds (one seed per pair) and every order is mapped to the
real scale with each gain quantile, so outcome probabilities average over orders and over the
simulator's uncertainty.

Failure points, per fragment and order (the thresholds are `ScreenThresholds`, and the
outcome labels' `forgotten`):
- starved: in an order that feeds it, its share of the gradient signal over the run
  (`Trajectory.grad_push_CxF`) is below `starved` x its share of the fed examples; its onset
  is the first eval interval in which that holds for the interval's own signal and feeding;
- forgotten: its probe loss ends >= `forgotten` above its minimum; the onset is the first
  eval after the minimum at which the loss is that far above it;
- collapsed: its probes' output entropy ends below `collapse` x its start;
- diverged: the simulated run's loss or weights became non-finite (whole orders).

The per-order arrays (`Screen.drop_PxF`, `own_PxF`, the diagnostics, the failure onsets, ...)
are kept so that `calibrate.answers.families` can break every figure down by order family.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from calibrate.answers.outcomes import OUTCOMES, Thresholds, label_outcomes, outcome_shares
from calibrate.fitting.calibration import (Simulator, fragment_means, predict, resolve_tier,
                                           schedule)
from surrogate import orders as orders_lib
from surrogate.jsonl import json_safe

__all__ = ["DIAGNOSTICS", "Screen", "ScreenThresholds", "draw_orders", "forgetting_onset",
           "screen"]

DIAGNOSTICS = ("embedding_drift", "attention_shift", "plasticity", "logit_shift", "robustness")


@dataclasses.dataclass(frozen=True)
class ScreenThresholds:
  """Thresholds of the failure points (see the module docstring)."""
  starved: float = 0.25
  collapse: float = 0.5


def draw_orders(sim: Simulator, n: int, *, family: str | Sequence[str] = "all",
                key: jax.Array) -> tuple[list[orders_lib.OrderSpec], np.ndarray]:
  """`n` random orders of the simulator's shape, the families taking turns.

  Returns:
    (specs, orders_NxTxB).
  """
  families = list(orders_lib.FAMILIES) if family == "all" else (
      [family] if isinstance(family, str) else list(family))
  for f in families:
    if f not in orders_lib.FAMILIES:
      raise ValueError(f"unknown order family {f!r}; expected 'all' or some of "
                       f"{list(orders_lib.FAMILIES)}")
  return orders_lib.random_orders(sim.fragments.train_pools(), n, key=key, steps=sim.num_steps,
                                  batch_size=sim.batch_size, families=families)


@dataclasses.dataclass(frozen=True, eq=False)
class Screen:
  """What each fragment becomes over many simulated orders.

  Attributes:
    fragments: the F fragment names.
    steps: the C checkpoint steps.
    specs: the P screened orders (each simulated with its counterfactual).
    left_out_P: the fragment left out of each pair's counterfactual.
    outcome_FxO: probability of each outcome (columns in `calibrate.answers.outcomes.OUTCOMES`
      order), over the pairs that leave the fragment out and the ensemble's gains.
    pairs_F: how many pairs judged each fragment.
    own_probe_F, own_probe_abs_F: mean own contribution to the final probe loss, relative
      and absolute (counterfactual - order: positive means feeding it helps it).
    gain_F, gain_lo_F, gain_hi_F: expected relative drop of the probe loss from step 0 to
      the end over all screened orders, and its 10 %-90 % range across orders.
    interference_FxF: row i, column j: the relative change of fragment j's final probe loss
      caused by feeding fragment i (positive: feeding i helps j); the diagonal is the own
      contribution.
    probe_PxCxF: the screened orders' predicted probe loss per fragment (ensemble mean).
    diagnostics: name -> [P, C, F], the five diagnostics of every screened order (surrogate
      scale: the calibration maps losses only), plus "entropy".
    starved_F, collapsed_F: share of the orders (feeding the fragment, for starved) with
      that failure.
    diverged: indices of the screened orders whose simulation, or their counterfactual's,
      diverged (their members are left out of the figures).
    seconds_per_order: wall time per simulated run (compilation included).
    tier, tier_reason: which model answered ("analytic" or "transformer") and why
      (`calibrate.fitting.calibration.resolve_tier`).
    fed_PxF: examples of each fragment that each order feeds.
    drop_PxF: each order's relative drop of each fragment's probe loss, step 0 to the end
      (ensemble mean).
    own_PxF: per pair, the relative change of every fragment's final probe loss caused by
      feeding the left-out one (counterfactual - order, over the counterfactual; mean over
      the gains): row p of the pair's interference; column `left_out_P[p]` is its own
      contribution.
    outcome_PxO: per pair, the left-out fragment's outcome shares over the gains (NaN where
      no member is valid).
    forgotten_PxF: share of the gains under which the fragment ends forgotten.
    forget_step_PxF: the forgetting onset (module docstring) of the ensemble-mean probe
      loss, NaN where it does not end forgotten.
    starved_PxF, starve_step_PxF: whether the fragment is starved in the order, and the
      onset step (NaN where it is not).
  """
  fragments: tuple[str, ...]
  steps: np.ndarray
  specs: tuple[orders_lib.OrderSpec, ...]
  left_out_P: np.ndarray
  outcome_FxO: np.ndarray
  pairs_F: np.ndarray
  own_probe_F: np.ndarray
  own_probe_abs_F: np.ndarray
  gain_F: np.ndarray
  gain_lo_F: np.ndarray
  gain_hi_F: np.ndarray
  interference_FxF: np.ndarray
  probe_PxCxF: np.ndarray
  diagnostics: dict[str, np.ndarray]
  starved_F: np.ndarray
  collapsed_F: np.ndarray
  diverged: tuple[int, ...]
  seconds_per_order: float
  fed_PxF: np.ndarray
  drop_PxF: np.ndarray
  own_PxF: np.ndarray
  outcome_PxO: np.ndarray
  forgotten_PxF: np.ndarray
  forget_step_PxF: np.ndarray
  starved_PxF: np.ndarray
  starve_step_PxF: np.ndarray
  tier: str = "transformer"
  tier_reason: str = ""

  @property
  def families_P(self) -> np.ndarray:
    """Each screened order's family (`surrogate.orders.FAMILIES`)."""
    return np.array([orders_lib.OrderKind(s.kind).value for s in self.specs])

  def table(self) -> str:
    """One line per fragment: outcome probabilities, expected gain and failure shares."""
    w = max(len(f) for f in self.fragments) + 2
    head = "".join(f"{o.value:>13}" for o in OUTCOMES)
    lines = [(f"{len(self.specs)} orders screened, each with a counterfactual "
             f"({2 * len(self.specs)} simulated runs); P(outcome) per fragment"),
             "fragment".ljust(w) + head + "  probe drop [10%, 90%]   own   starved collapsed"]
    for f, name in enumerate(self.fragments):
      probs = ("".join(f"{p:13.0%}" for p in self.outcome_FxO[f]) if self.pairs_F[f]
               else f"{'(no pair left it out)':>52}")
      lines.append(f"{name.ljust(w)}{probs}  {self.gain_F[f]:6.1%} [{self.gain_lo_F[f]:5.1%}, "
                   f"{self.gain_hi_F[f]:5.1%}] {self.own_probe_F[f]:+6.1%}"
                   f"{self.starved_F[f]:9.0%}{self.collapsed_F[f]:10.0%}")
    if self.diverged:
      lines.append(f"{len(self.diverged)} simulated orders diverged: {list(self.diverged)[:10]}")
    lines.append(f"answered by the {self.tier_reason}")
    return "\n".join(lines)

  def to_json(self) -> dict[str, Any]:
    """Every figure as plain JSON (NaN as null, `surrogate.jsonl.json_safe`)."""
    clean = json_safe
    return {
        "fragments": list(self.fragments), "steps": self.steps.tolist(),
        "outcomes": [o.value for o in OUTCOMES],
        "outcome_probabilities": clean(self.outcome_FxO), "pairs": self.pairs_F.tolist(),
        "own_probe": clean(self.own_probe_F), "own_probe_abs": clean(self.own_probe_abs_F),
        "probe_drop": clean(self.gain_F), "probe_drop_lo": clean(self.gain_lo_F),
        "probe_drop_hi": clean(self.gain_hi_F), "interference": clean(self.interference_FxF),
        "diagnostics_final": {k: clean(np.nanmean(v[:, -1], 0))
                              for k, v in self.diagnostics.items()},
        "starved": clean(self.starved_F), "collapsed": clean(self.collapsed_F),
        "diverged": list(self.diverged), "orders": [s.to_dict() for s in self.specs],
        "seconds_per_order": self.seconds_per_order, "tier": self.tier,
        "tier_reason": self.tier_reason,
    }


def screen(sim: Simulator, *, key: jax.Array, n_orders: int = 256,
           family: str | Sequence[str] = "all", thresholds: Thresholds = Thresholds(),
           failures: ScreenThresholds = ScreenThresholds(), diagnostics: bool = True,
           progress: bool = False, chunk_size: int | None = None,
           folder: str | os.PathLike | None = None,
           resume: bool = False, tier: str = "auto") -> Screen:
  """Simulates `n_orders` runs (`n_orders // 2` random orders and their counterfactuals).

  Args:
    sim: a calibrated simulator.
    n_orders: simulated runs in all (at least 2).
    family: "all", one of `surrogate.orders.FAMILIES`, or several.
    key: draws the orders and their counterfactuals.
    thresholds: the outcome labels' thresholds.
    failures: the failure points' thresholds.
    diagnostics: compute the diagnostics of the screened orders (about a quarter more time
      for those runs here).
    progress: show a progress bar.
    chunk_size: orders per compiled call (default: `simulate.default_chunk_size`).
    folder: stream the simulations' results into this folder, chunk by chunk (subfolders
      `orders` and `counterfactuals`), so a killed screen can be resumed.
    resume: continue the screen whose results are in `folder` (same inputs and key).
    tier: "auto" (default: the analytic tier where it passed its trust check, else the
      transformer), "analytic" or "transformer".
      The analytic tier has no diagnostics and no gradient push: where it answers, they
      are skipped and `starved_F` is NaN.
  """
  if n_orders < 2:
    raise ValueError(f"screen needs n_orders >= 2 (pairs of runs), got {n_orders}")
  k_draw, k_cf = jax.random.split(key)
  frags = sim.fragments
  num_f, pools = len(frags.names), frags.train_pools()
  specs, orders = draw_orders(sim, n_orders // 2, family=family, key=k_draw)
  n_p = len(specs)
  fed_PxF = np.stack([orders_lib.fragment_counts(o, frags.fragment_of, num_f) for o in orders])
  left_out = np.empty(n_p, np.int64)
  counterfactuals = []
  for p in range(n_p):
    # Fragments take turns; one the order does not feed passes to the next it feeds.
    left_out[p] = next(f for f in np.roll(np.arange(num_f), -(p % num_f)) if fed_PxF[p, f])
    counterfactuals.append(orders_lib.without_fragment(orders[p], pools, int(left_out[p]),
                                                       key=jax.random.fold_in(k_cf, p)))
  seed_P = np.arange(n_p) % sim.num_seeds
  t0 = time.perf_counter()
  run = {"progress": progress, "chunk_size": chunk_size, "resume": resume}
  sub = (lambda name: None) if folder is None else (
      lambda name: os.path.join(folder, name))
  lr_T, steps = schedule(sim), sim.steps_C
  analytic = resolve_tier(sim, tier)[0] is not None
  diagnostics = diagnostics and not analytic
  run["tier"] = tier
  pred, traj = predict(sim, orders, lr_T, steps, seed_N=seed_P, diagnostics=diagnostics,
                       folder=sub("orders"), **run)
  # Counterfactuals only need their losses: no diagnostics (the same compiled simulation
  # as `calibrate.answers.search`'s).
  pred_cf, traj_cf = predict(sim, np.stack(counterfactuals), lr_T, steps, seed_N=seed_P,
                             folder=sub("counterfactuals"), **run)
  members = np.concatenate([pred.members_NxKxCxM, pred_cf.members_NxKxCxM])
  per_order = (time.perf_counter() - t0) / (2 * n_p)
  probe = fragment_means(sim, members)                             # 2P G C F
  train = fragment_means(sim, members, probe=False)
  with np.errstate(invalid="ignore", divide="ignore"):
    main, cf = probe[:n_p], probe[n_p:]
    own_p = (cf[:, :, -1] - main[:, :, -1]) / cf[:, :, -1]          # P G F
    own_t = (train[n_p:, :, -1] - train[:n_p, :, -1]) / train[n_p:, :, -1]
    idx = np.arange(n_p)
    f_p = left_out
    label = label_outcomes(main[idx, :, -1, f_p], np.nanmin(main[idx, :, :, f_p], axis=-1),
                           own_p[idx, :, f_p], own_t[idx, :, f_p], thresholds)   # P G
    valid = np.isfinite(main[idx, :, -1, f_p]) & np.isfinite(cf[idx, :, -1, f_p])
    outcome = np.zeros((num_f, len(OUTCOMES)))
    pairs = np.bincount(f_p, minlength=num_f)
    interference = np.full((num_f, num_f), np.nan)
    own_abs = np.full(num_f, np.nan)
    for f in range(num_f):
      sel = f_p == f
      v = valid[sel]
      if v.any():
        outcome[f] = [((label[sel] == o) & v).sum() / v.sum() for o in range(len(OUTCOMES))]
        interference[f] = np.nanmean(own_p[sel].reshape(-1, num_f), 0)
        own_abs[f] = np.nanmean((cf - main)[sel][:, :, -1, f])
      else:
        outcome[f] = np.nan
    drop = (main[:, :, 0] - main[:, :, -1]) / main[:, :, 0]         # P G F
    drop_P = np.nanmean(drop, 1)
    own_PxF = np.nanmean(own_p, 1)
    outcome_PxO = np.where(valid.any(1)[:, None], outcome_shares(label, valid, axis=1), np.nan)
    forgotten_PxF = np.nanmean(main[:, :, -1] >= (1 + thresholds.forgotten)
                               * np.nanmin(main, axis=2), 1)
  diags = {}
  if traj.diagnostics is not None:
    diags = {name: np.asarray(v) for name, v in traj.diagnostics._asdict().items()}
  collapsed = np.full(num_f, np.nan)
  fed_CxF = np.stack([_fed_by_checkpoint(o, frags.fragment_of, num_f, steps) for o in orders])
  is_starved, starve_step = _starvation(np.asarray(traj.grad_push_CxF[:n_p], np.float64),
                                        fed_CxF, steps, failures.starved)
  with np.errstate(invalid="ignore", divide="ignore"):
    fed_any = (fed_PxF > 0).sum(0)
    starved = np.where((fed_any > 0) & (pred.tier == "transformer"),
                       is_starved.sum(0) / np.maximum(fed_any, 1), np.nan)
    if traj.diagnostics is not None:
      ent = diags["entropy"]                                     # P C F
      collapsed = np.nanmean(ent[:, -1] < failures.collapse * ent[:, 0], 0)
  diverged = tuple(int(p) for p in np.nonzero((traj.diverged_step >= 0)
                                              | (traj_cf.diverged_step >= 0))[0])
  return Screen(
      fragments=frags.names, steps=np.asarray(sim.steps_C), specs=tuple(specs),
      left_out_P=left_out, outcome_FxO=outcome, pairs_F=pairs,
      own_probe_F=np.diag(interference).copy(), own_probe_abs_F=own_abs,
      gain_F=np.nanmean(drop_P, 0), gain_lo_F=np.nanquantile(drop_P, 0.1, 0),
      gain_hi_F=np.nanquantile(drop_P, 0.9, 0), interference_FxF=interference,
      probe_PxCxF=np.nanmean(main, 1), diagnostics=diags, starved_F=starved,
      collapsed_F=collapsed, diverged=diverged, seconds_per_order=per_order,
      fed_PxF=fed_PxF, drop_PxF=drop_P, own_PxF=own_PxF, outcome_PxO=outcome_PxO,
      forgotten_PxF=forgotten_PxF,
      forget_step_PxF=forgetting_onset(np.nanmean(main, 1), steps, thresholds.forgotten),
      starved_PxF=is_starved, starve_step_PxF=starve_step, tier=pred.tier,
      tier_reason=pred.tier_reason)


def _fed_by_checkpoint(order_TxB: np.ndarray, fragment_of: np.ndarray, num_f: int,
                       steps_C: np.ndarray) -> np.ndarray:
  """Examples of each fragment fed by each checkpoint, cumulative: [C, F] (0 at step 0)."""
  frag_TxB = np.where(order_TxB >= 0, fragment_of[np.maximum(order_TxB, 0)], -1)
  per_step = np.stack([(frag_TxB == f).sum(1) for f in range(num_f)], 1)     # T F
  cum = np.concatenate([np.zeros((1, num_f), np.int64), np.cumsum(per_step, 0)])
  return cum[np.minimum(np.asarray(steps_C), len(order_TxB))]


def _starvation(push_PxCxF: np.ndarray, fed_PxCxF: np.ndarray, steps_C: np.ndarray,
                ratio: float) -> tuple[np.ndarray, np.ndarray]:
  """(starved_PxF, onset_step_PxF): a fed fragment whose share of the run's gradient push
  is below `ratio` x its share of the fed examples, and the end step of the first eval
  interval where the interval's own shares say so (NaN where not starved)."""
  def below(push, fed):  # ... [F] arrays of one interval or of the whole run
    with np.errstate(invalid="ignore", divide="ignore"):
      return ((push / push.sum(-1, keepdims=True)) < ratio * (fed / fed.sum(-1, keepdims=True))
              ) & (fed > 0)
  starved = below(push_PxCxF[:, -1], fed_PxCxF[:, -1])
  per_interval = below(np.diff(push_PxCxF, axis=1), np.diff(fed_PxCxF, axis=1))   # P C-1 F
  first = np.argmax(per_interval, axis=1)
  onset = np.asarray(steps_C, np.float64)[1:][first]
  return starved, np.where(starved & per_interval.any(1), onset, np.nan)


def forgetting_onset(probe_PxCxF: np.ndarray, steps_C: np.ndarray, threshold: float) -> np.ndarray:
  """The first step after a fragment's lowest probe loss at which the loss is `threshold`
  (relative) above that minimum, where its final loss is too (it ends forgotten); NaN
  elsewhere. [P, F]."""
  p = np.nan_to_num(probe_PxCxF, nan=np.inf)
  lowest = np.argmin(p, axis=1)                                         # P F
  low = np.take_along_axis(p, lowest[:, None], 1)[:, 0]
  c = np.arange(p.shape[1])[None, :, None]
  above = (p >= (1 + threshold) * low[:, None]) & (c > lowest[:, None]) & np.isfinite(p)
  ends = above[:, -1]
  onset = np.asarray(steps_C, np.float64)[np.argmax(above, axis=1)]
  return np.where(ends, onset, np.nan)
