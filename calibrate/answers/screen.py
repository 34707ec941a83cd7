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
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from calibrate.answers.outcomes import OUTCOMES, Thresholds, label_outcomes, outcome_shares
from calibrate.fitting.calibration import Simulator, predict_fragments, resolve_tier, schedule
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
  families = _families(family)
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
    starved_PxF, starve_step_PxF: whether the fragment is starved in the order (1 or 0;
      NaN where the tier that answered cannot tell), and the onset step (NaN where it is
      not starved or that is unknown).
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
                   f"{_share(self.starved_F[f], 9)}{_share(self.collapsed_F[f], 10)}")
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


BLOCK_PAIRS = 4096  # pairs drawn, simulated and summarised together: memory stays bounded


class _Block(NamedTuple):
  """One block's pairs, summarised (axes: P pairs, G gain members, C, F, O outcomes)."""
  specs: list[orders_lib.OrderSpec]
  left_out_P: np.ndarray
  fed_PxF: np.ndarray
  own_PxGxF: np.ndarray        # relative own contribution of the left-out one to every j
  own_abs_PxG: np.ndarray      # the left-out fragment's absolute own contribution
  label_PxG: np.ndarray
  valid_PxG: np.ndarray
  drop_PxF: np.ndarray
  probe_PxCxF: np.ndarray
  forgotten_PxF: np.ndarray
  starved_PxF: np.ndarray
  starve_step_PxF: np.ndarray
  diagnostics: dict[str, np.ndarray]
  diverged_P: np.ndarray
  seconds: float               # the simulations' wall time
  tier: str
  tier_reason: str


def screen(sim: Simulator, *, key: jax.Array, n_orders: int = 256,
           family: str | Sequence[str] = "all", thresholds: Thresholds = Thresholds(),
           failures: ScreenThresholds = ScreenThresholds(), diagnostics: bool = True,
           progress: bool = False, chunk_size: int | None = None,
           folder: str | os.PathLike | None = None,
           resume: bool = False, tier: str = "auto") -> Screen:
  """Simulates `n_orders` runs (`n_orders // 2` random orders and their counterfactuals).

  Pairs are drawn, simulated and summarised in blocks of `BLOCK_PAIRS` (block b draws with
  `fold_in(key, b)`), and only fragment means are kept, so a screen of 10^5 orders through
  the analytic tier needs a few hundred MB.

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
      `orders` and `counterfactuals`, suffixed `-b` for block b > 0), so a killed screen
      can be resumed.
    resume: continue the screen whose results are in `folder` (same inputs and key).
    tier: "auto" (default: the analytic tier where it passed its trust check, else the
      transformer), "analytic" or "transformer".
      The analytic tier has no diagnostics and no gradient push: where it answers, they
      are skipped and starvation is unknown (`starved_F` and `starved_PxF` NaN).
  """
  from tqdm.auto import tqdm
  if n_orders < 2:
    raise ValueError(f"screen needs n_orders >= 2 (pairs of runs), got {n_orders}")
  families = _families(family)
  analytic = resolve_tier(sim, tier)[0] is not None
  n_p = n_orders // 2
  starts = range(0, n_p, BLOCK_PAIRS)
  blocks = []
  for b, start in enumerate(tqdm(starts, desc="screening", unit="block",
                                 disable=not progress or len(starts) < 2, leave=False)):
    sub = None if folder is None else (lambda name, b=b: os.path.join(
        folder, name if b == 0 else f"{name}-{b}"))
    blocks.append(_screen_block(
        sim, jax.random.fold_in(key, b), start, min(BLOCK_PAIRS, n_p - start), families,
        thresholds, failures, diagnostics=diagnostics and not analytic,
        run={"progress": progress and len(starts) < 2, "chunk_size": chunk_size,
             "resume": resume, "tier": tier}, sub=sub))
  cat = lambda name: np.concatenate([getattr(k, name) for k in blocks])  # noqa: E731
  num_f = len(sim.fragments.names)
  left_out, own_p, label, valid = (cat("left_out_P"), cat("own_PxGxF"), cat("label_PxG"),
                                   cat("valid_PxG"))
  own_abs = cat("own_abs_PxG")
  outcome = np.full((num_f, len(OUTCOMES)), np.nan)
  interference = np.full((num_f, num_f), np.nan)
  own_abs_F = np.full(num_f, np.nan)
  with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: diverged members
    for f in range(num_f):
      sel = left_out == f
      v = valid[sel]
      if v.any():
        outcome[f] = [((label[sel] == o) & v).sum() / v.sum() for o in range(len(OUTCOMES))]
        interference[f] = np.nanmean(own_p[sel].reshape(-1, num_f), 0)
        own_abs_F[f] = np.nanmean(own_abs[sel])
    outcome_PxO = np.where(valid.any(1)[:, None], outcome_shares(label, valid, axis=1), np.nan)
    drop_P, fed_PxF, starved_PxF = cat("drop_PxF"), cat("fed_PxF"), cat("starved_PxF")
    fed_any = (fed_PxF > 0).sum(0)
    starved = np.where(fed_any > 0, np.nansum(starved_PxF, 0) / np.maximum(fed_any, 1), np.nan)
    starved = np.where(np.isnan(starved_PxF).all(0), np.nan, starved)
    probe_PxCxF = cat("probe_PxCxF")
    diags = {name: np.concatenate([k.diagnostics[name] for k in blocks])
             for name in blocks[0].diagnostics}
    gain = (np.nanmean(drop_P, 0), np.nanquantile(drop_P, 0.1, 0),
            np.nanquantile(drop_P, 0.9, 0))
    own_PxF = np.nanmean(own_p, 1)
    collapsed = np.full(num_f, np.nan)
    if diags:
      ent = diags["entropy"]                                       # P C F
      collapsed = np.nanmean(ent[:, -1] < failures.collapse * ent[:, 0], 0)
  diverged = tuple(int(p) for p in np.nonzero(cat("diverged_P"))[0])
  return Screen(
      fragments=sim.fragments.names, steps=np.asarray(sim.steps_C),
      specs=tuple(s for k in blocks for s in k.specs), left_out_P=left_out,
      outcome_FxO=outcome, pairs_F=np.bincount(left_out, minlength=num_f),
      own_probe_F=np.diag(interference).copy(), own_probe_abs_F=own_abs_F,
      gain_F=gain[0], gain_lo_F=gain[1], gain_hi_F=gain[2], interference_FxF=interference,
      probe_PxCxF=probe_PxCxF, diagnostics=diags, starved_F=starved, collapsed_F=collapsed,
      diverged=diverged, seconds_per_order=sum(k.seconds for k in blocks) / (2 * n_p),
      fed_PxF=fed_PxF, drop_PxF=drop_P, own_PxF=own_PxF,
      outcome_PxO=outcome_PxO, forgotten_PxF=cat("forgotten_PxF"),
      forget_step_PxF=forgetting_onset(probe_PxCxF, sim.steps_C, thresholds.forgotten),
      starved_PxF=starved_PxF, starve_step_PxF=cat("starve_step_PxF"), tier=blocks[0].tier,
      tier_reason=blocks[0].tier_reason)


def _families(family: str | Sequence[str]) -> list[str]:
  families = list(orders_lib.FAMILIES) if family == "all" else (
      [family] if isinstance(family, str) else list(family))
  for f in families:
    if f not in orders_lib.FAMILIES:
      raise ValueError(f"unknown order family {f!r}; expected 'all' or some of "
                       f"{list(orders_lib.FAMILIES)}")
  return families


def _screen_block(sim: Simulator, key: jax.Array, start: int, n_p: int, families: list[str],
                  thresholds: Thresholds, failures: ScreenThresholds, *, diagnostics: bool,
                  run: dict, sub) -> _Block:
  """Draws pairs `start .. start + n_p` (families and left-out fragments keep turning across
  blocks), simulates them and summarises each pair."""
  k_draw, k_cf = jax.random.split(key)
  frags = sim.fragments
  num_f, pools = len(frags.names), frags.train_pools()
  turn = start % len(families)
  specs, orders = draw_orders(sim, n_p, family=families[turn:] + families[:turn], key=k_draw)
  fed_PxF = np.stack([orders_lib.fragment_counts(o, frags.fragment_of, num_f) for o in orders])
  left_out = np.empty(n_p, np.int64)
  counterfactuals = []
  for p in range(n_p):
    # Fragments take turns; one the order does not feed passes to the next it feeds.
    left_out[p] = next(f for f in np.roll(np.arange(num_f), -((start + p) % num_f))
                       if fed_PxF[p, f])
    counterfactuals.append(orders_lib.without_fragment(orders[p], pools, int(left_out[p]),
                                                       key=jax.random.fold_in(k_cf, p)))
  seed_P = (start + np.arange(n_p)) % sim.num_seeds
  t0 = time.perf_counter()
  lr_T, steps = schedule(sim), sim.steps_C
  sub = sub or (lambda name: None)
  pred, traj = predict_fragments(sim, orders, lr_T, steps, seed_N=seed_P,
                                 diagnostics=diagnostics, folder=sub("orders"), **run)
  # Counterfactuals only need their losses: no diagnostics (the same compiled simulation
  # as `calibrate.answers.search`'s).
  pred_cf, traj_cf = predict_fragments(sim, np.stack(counterfactuals), lr_T, steps,
                                       seed_N=seed_P, folder=sub("counterfactuals"), **run)
  seconds = time.perf_counter() - t0
  main, cf = pred.members_NxKxCx2xF[..., 0, :], pred_cf.members_NxKxCx2xF[..., 0, :]  # P G C F
  train, train_cf = pred.members_NxKxCx2xF[..., 1, :], pred_cf.members_NxKxCx2xF[..., 1, :]
  idx, f_p = np.arange(n_p), left_out
  with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: diverged members
    own_p = (cf[:, :, -1] - main[:, :, -1]) / cf[:, :, -1]           # P G F
    own_t = (train_cf[:, :, -1] - train[:, :, -1]) / train_cf[:, :, -1]
    label = label_outcomes(main[idx, :, -1, f_p], np.nanmin(main[idx, :, :, f_p], axis=-1),
                           own_p[idx, :, f_p], own_t[idx, :, f_p], thresholds)   # P G
    valid = np.isfinite(main[idx, :, -1, f_p]) & np.isfinite(cf[idx, :, -1, f_p])
    drop = (main[:, :, 0] - main[:, :, -1]) / main[:, :, 0]          # P G F
    forgotten = np.nanmean(main[:, :, -1] >= (1 + thresholds.forgotten)
                           * np.nanmin(main, axis=2), 1)
    probe_PxCxF = np.nanmean(main, 1)
    drop_PxF = np.nanmean(drop, 1)
  if pred.tier == "transformer":
    fed_CxF = np.stack([_fed_by_checkpoint(o, frags.fragment_of, num_f, steps) for o in orders])
    is_starved, starve_step = _starvation(np.asarray(traj.grad_push_CxF, np.float64), fed_CxF,
                                          steps, failures.starved)
    starved = is_starved.astype(np.float64)
  else:  # the analytic tier has no gradient push: unknown, not "never"
    starved = starve_step = np.full((n_p, num_f), np.nan)
  diags = ({} if traj.diagnostics is None else
           {name: np.asarray(v) for name, v in traj.diagnostics._asdict().items()})
  return _Block(specs, left_out, fed_PxF, own_p.astype(np.float32),
                (cf - main)[idx, :, -1, f_p], label, valid, drop_PxF, probe_PxCxF,
                forgotten, starved, starve_step, diags,
                (traj.diverged_step >= 0) | (traj_cf.diverged_step >= 0), seconds, pred.tier,
                pred.tier_reason)


def _share(x: float, width: int) -> str:
  """A share as a percentage, or "unknown" where the tier that answered cannot tell."""
  return f"{x:{width}.0%}" if np.isfinite(x) else f"{'unknown':>{width}}"


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
