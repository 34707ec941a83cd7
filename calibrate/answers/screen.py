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

Failure points, per fragment (the thresholds are `ScreenThresholds`):
- starved: in an order that feeds it, its share of the gradient signal (`Trajectory.grad_push_F`)
  is below `starved` x its share of the fed examples;
- collapsed: its probes' output entropy ends below `collapse` x its start;
- diverged: the simulated run's loss or weights became non-finite (whole orders).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from calibrate.answers.outcomes import OUTCOMES, Thresholds, label_outcomes
from calibrate.fitting.calibration import Simulator, fragment_means, predict, schedule
from surrogate import orders as orders_lib
from surrogate.jsonl import json_safe

__all__ = ["DIAGNOSTICS", "Screen", "ScreenThresholds", "draw_orders", "screen"]

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
    diagnostics: name -> [C, F], the five diagnostics averaged over the screened orders
      (surrogate scale: the calibration maps losses only), plus "entropy".
    starved_F, collapsed_F: share of the orders (feeding the fragment, for starved) with
      that failure.
    diverged: indices of the screened orders whose simulation, or their counterfactual's,
      diverged (their members are left out of the figures).
    seconds_per_order: wall time per simulated run (compilation included).
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
        "diagnostics_final": {k: clean(v[-1]) for k, v in self.diagnostics.items()},
        "starved": clean(self.starved_F), "collapsed": clean(self.collapsed_F),
        "diverged": list(self.diverged), "orders": [s.to_dict() for s in self.specs],
        "seconds_per_order": self.seconds_per_order,
    }


def screen(sim: Simulator, *, key: jax.Array, n_orders: int = 256,
           family: str | Sequence[str] = "all", thresholds: Thresholds = Thresholds(),
           failures: ScreenThresholds = ScreenThresholds(), diagnostics: bool = True,
           progress: bool = False, chunk_size: int | None = None,
           folder: str | os.PathLike | None = None,
           resume: bool = False) -> Screen:
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
  diags = {}
  if traj.diagnostics is not None:
    for name, v in traj.diagnostics._asdict().items():
      diags[name] = np.nanmean(np.asarray(v), 0)
  collapsed = np.full(num_f, np.nan)
  push = np.asarray(traj.grad_push_F[:n_p], np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    push_share = push / push.sum(1, keepdims=True)
    fed_share = fed_PxF / fed_PxF.sum(1, keepdims=True)
    is_starved = (push_share < failures.starved * fed_share) & (fed_PxF > 0)
    fed_any = (fed_PxF > 0).sum(0)
    starved = np.where(fed_any > 0, is_starved.sum(0) / np.maximum(fed_any, 1), np.nan)
    if traj.diagnostics is not None:
      ent = np.asarray(traj.diagnostics.entropy)               # P C F
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
      collapsed_F=collapsed, diverged=diverged, seconds_per_order=per_order)
