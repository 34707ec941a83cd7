"""Answers by feeding type: what each order family does to each fragment, against shuffling.

A `calibrate.answers.screen.Screen` keeps every screened order's figures; this module breaks
them down by the order's family (`surrogate.orders.FAMILIES`), the picture a user wants
before choosing how to feed: "what does blocking do to fragment X compared with shuffling".

- `by_family`: per family and fragment, the mean of each measure over the family's screened
  orders (or pairs, for the measures that need a counterfactual) with a bootstrap interval
  of that mean, and the same for its difference from the shuffled family;
- `failure_points`: per fragment, how often it is forgotten or starved, the step it starts
  (median and range over the orders where it happens) and the family where it is most common;
- `interactions`: the interference matrix with intervals, the pairs of fragments that
  reinforce or disturb each other, and the fragments that change without being fed.

Diagnostics are labelled by `diagnostic_status`: only those that passed validation against
real runs (`calibrate.fitting.validate.validate_diagnostics`) are predictions of the real
model; the others describe the surrogate only ("surrogate-internal").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from calibrate.answers.outcomes import OUTCOMES
from calibrate.answers.screen import DIAGNOSTICS, Screen
from calibrate.fitting.metrics import DIAGNOSTIC_AGREEMENT_BAR
from surrogate import orders as orders_lib
from surrogate.jsonl import json_safe

__all__ = ["Estimate", "FailurePoint", "FamilyView", "Interactions", "by_family",
           "diagnostic_status", "failure_points", "interactions"]

# The measures of `by_family`, in display order: name -> what it is (for tables and plots).
MEASURES = {
    "probe_drop": "relative drop of the probe loss, step 0 to the end",
    "own_contribution": "own contribution to the final probe loss (needs a pair)",
    **{f"P({o.value})": f"probability of the outcome {o.value!r} (needs a pair)"
       for o in OUTCOMES},
    "P(forgotten at the end)": "share of the ensemble under which it ends forgotten",
    "starved": "share of the orders feeding it in which it is starved",
    **{name: f"{name.replace('_', ' ')} at the end" for name in DIAGNOSTICS},
}
_BOOT = 400   # bootstrap resamples of each mean


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A mean with an interval, per family (rows) and fragment (columns).

  Attributes:
    mean_KxF: the mean over the family's orders (or pairs) that judge the fragment.
    lo_KxF, hi_KxF: the bootstrap interval of that mean (NaN with fewer than 2 values).
    n_KxF: how many orders (or pairs) it averages.
  """
  mean_KxF: np.ndarray
  lo_KxF: np.ndarray
  hi_KxF: np.ndarray
  n_KxF: np.ndarray

  def clear_KxF(self) -> np.ndarray:
    """Whether the interval excludes zero (False where there is no interval)."""
    with np.errstate(invalid="ignore"):
      return (self.lo_KxF > 0) | (self.hi_KxF < 0)

  def to_json(self) -> dict[str, Any]:
    return {"mean": json_safe(self.mean_KxF), "lo": json_safe(self.lo_KxF),
            "hi": json_safe(self.hi_KxF), "n": self.n_KxF.tolist()}


def _boot_means(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """`_BOOT` bootstrap means of the finite `values` (empty when fewer than 2)."""
  v = values[np.isfinite(values)]
  if len(v) < 2:
    return np.empty(0)
  return v[rng.integers(0, len(v), (_BOOT, len(v)))].mean(1)


def _estimate(groups: Sequence[Sequence[np.ndarray]], level: float, seed: int,
              minus: Sequence[np.ndarray] | None = None) -> Estimate:
  """Means and bootstrap intervals of `groups[k][f]` (1-D arrays), or of their differences
  from `minus[f]` (resampled independently)."""
  rng = np.random.default_rng(seed)
  q = ((1 - level) / 2, (1 + level) / 2)
  num_k, num_f = len(groups), len(groups[0])
  mean, lo, hi = (np.full((num_k, num_f), np.nan) for _ in range(3))
  n = np.zeros((num_k, num_f), np.int64)
  base_boot = None if minus is None else [_boot_means(m, rng) for m in minus]
  for k in range(num_k):
    for f in range(num_f):
      v = groups[k][f]
      v = v[np.isfinite(v)]
      n[k, f] = len(v)
      if not len(v):
        continue
      boot = _boot_means(v, rng)
      if minus is None:
        mean[k, f] = v.mean()
      else:
        m = minus[f][np.isfinite(minus[f])]
        if not len(m):
          continue
        mean[k, f] = v.mean() - m.mean()
        boot = boot - base_boot[f] if len(boot) and len(base_boot[f]) else np.empty(0)
      if len(boot):
        lo[k, f], hi[k, f] = np.quantile(boot, q)
  return Estimate(mean, lo, hi, n)


def _measure_values(sc: Screen) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """measure -> (values_PxF, use_PxF): each order's value and whether it judges the
  fragment (NaN values are skipped as well)."""
  num_p, num_f = sc.drop_PxF.shape
  pair_PxF = np.arange(num_f)[None] == sc.left_out_P[:, None]
  every = np.ones((num_p, num_f), bool)
  own = np.where(pair_PxF, sc.own_PxF, np.nan)
  out = {"probe_drop": (sc.drop_PxF, every), "own_contribution": (own, pair_PxF)}
  for o, outcome in enumerate(OUTCOMES):
    out[f"P({outcome.value})"] = (np.broadcast_to(sc.outcome_PxO[:, o:o + 1], (num_p, num_f)),
                                  pair_PxF)
  out["P(forgotten at the end)"] = (sc.forgotten_PxF, every)
  out["starved"] = (sc.starved_PxF, sc.fed_PxF > 0)
  for name in DIAGNOSTICS:
    if name in sc.diagnostics:
      out[name] = (np.asarray(sc.diagnostics[name], float)[:, -1], every)
  return out


def diagnostic_status(validated: Mapping[str, Mapping[str, Any]] | None = None
                      ) -> dict[str, str]:
  """A label for each diagnostic: whether it may be read as a prediction of the real model.

  Args:
    validated: `ValidationReport.diagnostics` (`validate_diagnostics`'s result) on held-out
      real runs that carry real diagnostics, or None when there is none.
  """
  out = {}
  for name in DIAGNOSTICS:
    v = (validated or {}).get(name)
    if v is None:
      out[name] = "surrogate-internal (not validated against real runs)"
    elif v["predicted"]:
      out[name] = (f"predicts the real model (median Spearman {v['median']:.2f} across "
                   f"{v['orders']} real runs)")
    else:
      rho = "undefined" if not np.isfinite(v["median"]) else f"{v['median']:.2f}"
      out[name] = (f"surrogate-internal (median Spearman {rho} across {v['orders']} real "
                   f"runs, below {DIAGNOSTIC_AGREEMENT_BAR})")
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class FamilyView:
  """Every measure of a screen by order family.

  Attributes:
    families: the K families screened (`surrogate.orders.FAMILIES` order).
    fragments: the F fragment names.
    orders_K: screened orders per family.
    level: the intervals' level.
    measures: measure (`MEASURES`) -> `Estimate` per family and fragment.
    vs_shuffled: measure -> `Estimate` of the family's mean minus the shuffled family's
      (absent when no shuffled order was screened; the shuffled row is then all zeros).
    status: diagnostic -> its label (`diagnostic_status`).
  """
  families: tuple[str, ...]
  fragments: tuple[str, ...]
  orders_K: np.ndarray
  level: float
  measures: dict[str, Estimate]
  vs_shuffled: dict[str, Estimate]
  status: dict[str, str]

  def table(self, measure: str = "probe_drop") -> str:
    """One line per fragment, one column per family: the family's mean of `measure` and,
    for the other families, the change from shuffling with its interval."""
    est = self.measures[measure]
    diff = self.vs_shuffled.get(measure)
    w = max(len(f) for f in self.fragments) + 2
    title = f"{measure}: {MEASURES[measure]}"
    if measure in self.status:
      title += f" [{self.status[measure]}]"
    lines = [title, f"(mean over each family's orders; change from shuffled with its "
             f"{self.level:.0%} interval)",
             "fragment".ljust(w) + "".join(f"{k:>26}" for k in self.families)]
    for f, name in enumerate(self.fragments):
      cells = []
      for k, fam in enumerate(self.families):
        m = est.mean_KxF[k, f]
        if not np.isfinite(m):
          cells.append(f"{'-':>26}")
        elif diff is None or fam == "shuffled" or not np.isfinite(diff.mean_KxF[k, f]):
          cells.append(f"{m:>26.3g}")
        else:
          d, lo, hi = diff.mean_KxF[k, f], diff.lo_KxF[k, f], diff.hi_KxF[k, f]
          iv = "" if not np.isfinite(lo) else f" [{lo:+.2g},{hi:+.2g}]"
          cells.append(f"{f'{m:.3g} {d:+.2g}{iv}':>26}")
      lines.append(name.ljust(w) + "".join(cells))
    lines.append("orders".ljust(w) + "".join(f"{int(n):>26}" for n in self.orders_K))
    return "\n".join(lines)

  def to_json(self) -> dict[str, Any]:
    return {"families": list(self.families), "fragments": list(self.fragments),
            "orders": self.orders_K.tolist(), "level": self.level,
            "measures": {k: v.to_json() for k, v in self.measures.items()},
            "vs_shuffled": {k: v.to_json() for k, v in self.vs_shuffled.items()},
            "diagnostic_status": dict(self.status)}


def by_family(sc: Screen, *, level: float = 0.95, seed: int = 0,
              validated: Mapping[str, Mapping[str, Any]] | None = None) -> FamilyView:
  """Every measure of `sc` per order family and fragment, and its change from shuffling.

  Orders (or pairs) whose simulation diverged are left out. Intervals are percentile
  bootstrap intervals of the mean over the family's orders (`level`; the bootstrap is seeded
  by `seed`, so the view is reproducible); a change from shuffling resamples both families.
  The default level is 95 % because a view has hundreds of cells: at 80 % one null cell in
  five would look like an effect.

  Args:
    validated: real-run validation of the diagnostics (`diagnostic_status`).
  """
  fam_P = sc.families_P
  keep_P = np.ones(len(fam_P), bool)
  keep_P[list(sc.diverged)] = False
  families = tuple(f for f in orders_lib.FAMILIES if (fam_P == f).any())
  num_f = len(sc.fragments)
  measures, vs = {}, {}
  for i, (name, (val_PxF, use_PxF)) in enumerate(_measure_values(sc).items()):
    group = lambda sel: [val_PxF[sel & use_PxF[:, f], f] for f in range(num_f)]  # noqa: E731
    groups = [group(keep_P & (fam_P == k)) for k in families]
    measures[name] = _estimate(groups, level, seed + i)
    if "shuffled" in families:
      shuffled = groups[families.index("shuffled")]
      vs[name] = _estimate(groups, level, seed + i, minus=shuffled)
  return FamilyView(families, sc.fragments, np.array([(fam_P == k).sum() for k in families]),
                    level, measures, vs, diagnostic_status(validated))


@dataclasses.dataclass(frozen=True)
class FailurePoint:
  """One kind of failure of one fragment over the screened orders.

  Attributes:
    fragment: its name.
    kind: "forgetting" or "starvation".
    share: share of the orders (feeding the fragment, for starvation) where it happens.
    orders: how many orders that share is of.
    step, step_lo, step_hi: median onset step and its 10 %-90 % range over those orders.
    worst_family, worst_share: the family where it is most common, and its share there.
  """
  fragment: str
  kind: str
  share: float
  orders: int
  step: float
  step_lo: float
  step_hi: float
  worst_family: str
  worst_share: float


def failure_points(sc: Screen, *, min_share: float = 0.0) -> list[FailurePoint]:
  """Each fragment's forgetting and starvation across the screen, with their onset steps,
  most common first; only those happening in more than `min_share` of the orders."""
  fam_P = sc.families_P
  keep_P = np.ones(len(fam_P), bool)
  keep_P[list(sc.diverged)] = False
  out = []
  for kind, step_PxF, use_PxF in (
      ("forgetting", sc.forget_step_PxF, np.ones(sc.fed_PxF.shape, bool)),
      ("starvation", sc.starve_step_PxF, (sc.fed_PxF > 0) & np.isfinite(sc.starved_PxF))):
    for f, name in enumerate(sc.fragments):
      use = keep_P & use_PxF[:, f]
      hit = use & np.isfinite(step_PxF[:, f])
      if not use.any() or hit.sum() / use.sum() <= min_share or not hit.any():
        continue
      shares = {k: (hit & (fam_P == k)).sum() / (use & (fam_P == k)).sum()
                for k in orders_lib.FAMILIES if (use & (fam_P == k)).any()}
      worst = max(shares, key=shares.get)
      s = step_PxF[hit, f]
      out.append(FailurePoint(name, kind, float(hit.sum() / use.sum()), int(use.sum()),
                              float(np.median(s)), float(np.quantile(s, 0.1)),
                              float(np.quantile(s, 0.9)), worst, float(shares[worst])))
  return sorted(out, key=lambda p: -p.share)


@dataclasses.dataclass(frozen=True, eq=False)
class Interactions:
  """How fragments act on each other, from the screen's pairs.

  Attributes:
    fragments: the F fragment names.
    effect: `Estimate` with rows = fragment fed (i), columns = fragment affected (j): the
      relative drop of j's final probe loss caused by feeding i (positive: i helps j), mean
      over the pairs leaving i out, with its interval.
    reinforcing: (i, j, effect i->j, effect j->i) for pairs that help each other both ways
      (both intervals above zero).
    helps, disturbs: (i, j, effect) for one-way help / harm whose interval excludes zero,
      the pairs in `reinforcing` excepted; largest first.
    unfed_change: `Estimate` with one row: each fragment's relative probe-loss drop over the
      orders that never feed it (what the others do to it).
  """
  fragments: tuple[str, ...]
  effect: Estimate
  reinforcing: tuple[tuple[str, str, float, float], ...]
  helps: tuple[tuple[str, str, float], ...]
  disturbs: tuple[tuple[str, str, float], ...]
  unfed_change: Estimate

  def table(self, top: int = 8) -> str:
    lines = [f"reinforce each other (both ways): {len(self.reinforcing)} pairs"]
    lines += [f"  {i} <-> {j}: {a:+.1%} / {b:+.1%}" for i, j, a, b in self.reinforcing[:top]]
    lines.append(f"one-way help: {len(self.helps)} pairs")
    lines += [f"  feeding {i} lowers {j}'s probe loss by {e:.1%}" for i, j, e in self.helps[:top]]
    lines.append(f"disturb: {len(self.disturbs)} pairs")
    lines += [f"  feeding {i} raises {j}'s probe loss by {-e:.1%}"
              for i, j, e in self.disturbs[:top]]
    u = self.unfed_change
    changed = [(self.fragments[f], u.mean_KxF[0, f], int(u.n_KxF[0, f]))
               for f in np.nonzero(u.clear_KxF()[0])[0]]
    lines.append(f"changed without being fed: {len(changed)} fragments")
    lines += [f"  {n}: probe loss {'down' if m > 0 else 'up'} {abs(m):.1%} over {c} orders "
              "that never feed it" for n, m, c in changed]
    return "\n".join(lines)

  def to_json(self) -> dict[str, Any]:
    return {"fragments": list(self.fragments), "effect": self.effect.to_json(),
            "reinforcing": [list(r) for r in self.reinforcing],
            "helps": [list(r) for r in self.helps],
            "disturbs": [list(r) for r in self.disturbs],
            "unfed_change": self.unfed_change.to_json()}


def interactions(sc: Screen, *, level: float = 0.95, seed: int = 0) -> Interactions:
  """The interference matrix with intervals and what it says (see `Interactions`)."""
  num_f = len(sc.fragments)
  keep_P = np.ones(len(sc.left_out_P), bool)
  keep_P[list(sc.diverged)] = False
  rows = [[sc.own_PxF[keep_P & (sc.left_out_P == i), j] for j in range(num_f)]
          for i in range(num_f)]
  effect = _estimate(rows, level, seed)
  clear = effect.clear_KxF()
  pos, neg = clear & (effect.mean_KxF > 0), clear & (effect.mean_KxF < 0)
  names = sc.fragments
  m = effect.mean_KxF
  reinforcing = tuple((names[i], names[j], float(m[i, j]), float(m[j, i]))
                      for i in range(num_f) for j in range(i + 1, num_f)
                      if pos[i, j] and pos[j, i])
  both = {(a, b) for a, b, _, _ in reinforcing} | {(b, a) for a, b, _, _ in reinforcing}
  off = lambda mask: sorted(((names[i], names[j], float(m[i, j]))  # noqa: E731
                             for i, j in zip(*np.nonzero(mask)) if i != j
                             and (names[i], names[j]) not in both),
                            key=lambda r: -abs(r[2]))
  unfed = [[sc.drop_PxF[keep_P & (sc.fed_PxF[:, f] == 0), f] for f in range(num_f)]]
  return Interactions(names, effect, reinforcing, tuple(off(pos)), tuple(off(neg)),
                      _estimate(unfed, level, seed + 1))
