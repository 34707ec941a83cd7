"""Order search and the next real run to make, from a calibrated simulator.

Both score candidate orders by an *objective*: the predicted final probe loss averaged over
fragments, equally ("mean") or with the user's weights on target fragments. Every candidate
is simulated from every surrogate seed and mapped with every gain quantile, so candidates
are compared under the same ensemble members (common random numbers), and the spread over
members is the simulator's uncertainty about that candidate.

- `search` keeps the best candidates and tries their neighbours (`surrogate.orders.mutate`:
  block swaps, mixture re-weighting, subsets with a fragment added or dropped): a greedy
  local search within a budget of candidate orders. The winner is the candidate with the
  lowest ensemble-mean objective, so it is at least as good, under the simulator, as every
  candidate it saw, the start set included.
- `next_run` picks, among candidate orders, the one the ensemble disagrees on most: running
  it for real and adding it to the calibration runs removes the most uncertainty about the
  objective (the members that predicted it badly lose their say).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from calibrate.fitting.calibration import Simulator, fragment_means, predict, schedule
from calibrate.fitting.runs import order_file
from calibrate.io.runlog import write_runlog
from surrogate import orders as orders_lib

__all__ = ["Candidates", "NextRun", "SearchResult", "evaluate", "next_run", "objective_weights",
           "search"]

SEARCH_FAMILIES = ("blocked", "interleaved", "mixture", "curriculum", "subset")


def objective_weights(sim: Simulator, objective: str | Mapping[str, float]) -> np.ndarray:
  """The objective as a weight per fragment, summing to 1; ValueError for unknown fragments
  or weights that are negative, not finite, or all 0."""
  names = sim.fragments.names
  if isinstance(objective, str):
    if objective != "mean":
      raise ValueError(f"objective must be 'mean' or a mapping fragment -> weight, got "
                       f"{objective!r}")
    return np.full(len(names), 1.0 / len(names))
  unknown = sorted(set(objective) - set(names))
  if unknown:
    raise ValueError(f"objective names unknown fragments {unknown}; the fragments are "
                     f"{list(names)}")
  w = np.array([float(objective.get(n, 0.0)) for n in names])
  if (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
    raise ValueError(f"objective weights must be >= 0 and not all 0, got {dict(objective)}")
  return w / w.sum()


@dataclasses.dataclass(frozen=True, eq=False)
class Candidates:
  """Orders scored under every ensemble member.

  Attributes:
    names: the N candidates' names.
    specs: each candidate's `OrderSpec`, or None for an order given as indices.
    orders_NxTxB: the orders.
    members_NxK: the objective under each member (seed x gain; NaN where a seed diverged).
    final_NxKxF: predicted final probe loss per fragment under each member.
    tier, tier_reason: which model answered ("analytic" or "transformer") and why
      (`calibrate.fitting.calibration.resolve_tier`).
  """
  names: tuple[str, ...]
  specs: tuple[orders_lib.OrderSpec | None, ...]
  orders_NxTxB: np.ndarray
  members_NxK: np.ndarray
  final_NxKxF: np.ndarray
  tier: str = "transformer"
  tier_reason: str = ""

  @property
  def score_N(self) -> np.ndarray:
    """Ensemble-mean objective (lower is better)."""
    with np.errstate(invalid="ignore"):
      return np.nanmean(self.members_NxK, 1)

  @property
  def spread_N(self) -> np.ndarray:
    """Standard deviation of the objective over members: the ensemble's disagreement."""
    with np.errstate(invalid="ignore"):
      return np.nanstd(self.members_NxK, 1)

  def take(self, idx: np.ndarray) -> Candidates:
    """The candidates at positions `idx`, in that order."""
    return Candidates(tuple(self.names[i] for i in idx), tuple(self.specs[i] for i in idx),
                      self.orders_NxTxB[idx], self.members_NxK[idx], self.final_NxKxF[idx],
                      self.tier, self.tier_reason)

  def concat(self, other: Candidates) -> Candidates:
    return Candidates(self.names + other.names, self.specs + other.specs,
                      np.concatenate([self.orders_NxTxB, other.orders_NxTxB]),
                      np.concatenate([self.members_NxK, other.members_NxK]),
                      np.concatenate([self.final_NxKxF, other.final_NxKxF]),
                      self.tier, self.tier_reason)


def evaluate(sim: Simulator, candidates: Mapping[str, Any], *,
             objective: str | Mapping[str, float] = "mean", key: jax.Array,
             diagnostics: bool = False, chunk_size: int | None = None,
             progress: bool = False, tier: str = "auto") -> Candidates:
  """Scores named orders (`OrderSpec`s, generated with `key`, or [T, B] arrays).

  `diagnostics` and `chunk_size` only matter for speed: simulations with the same settings
  and chunk shape as an earlier call (such as a screen's) reuse its compilation. `tier`:
  "auto" (the analytic tier where it passed its trust check), "analytic" or "transformer".
  """
  w_F = objective_weights(sim, objective)
  names, specs, orders = [], [], []
  for i, (name, c) in enumerate(candidates.items()):
    names.append(name)
    if isinstance(c, orders_lib.OrderSpec):
      specs.append(c)
      orders.append(c.generate(sim.fragments.train_pools(), key=jax.random.fold_in(key, i),
                               steps=sim.num_steps, batch_size=sim.batch_size))
    else:
      specs.append(None)
      orders.append(np.asarray(c, np.int32))
  orders_NxTxB = np.stack(orders)
  pred, _ = predict(sim, orders_NxTxB, schedule(sim), sim.steps_C, diagnostics=diagnostics,
                    chunk_size=chunk_size, progress=progress, tier=tier)
  members = pred.members_NxKxCxM                                     # N K C M
  final = fragment_means(sim, members[:, :, -1])                     # N K F
  with np.errstate(invalid="ignore"):
    score = (final * w_F).sum(-1)
  return Candidates(tuple(names), tuple(specs), orders_NxTxB, score, final, pred.tier,
                    pred.tier_reason)


@dataclasses.dataclass(frozen=True, eq=False)
class SearchResult:
  """The best order found, the runners-up, and how sure the ranking is.

  Attributes:
    ranked: every candidate seen, best first.
    p_best: for the top `len(p_best)`: the share of ensemble members under which each is
      the best of them.
    start_best: the best score in the start set (the winner's is at most this).
    level: the interval level of `interval`.
  """
  ranked: Candidates
  p_best: np.ndarray
  start_best: float
  level: float = 0.8

  @property
  def best_order(self) -> np.ndarray:
    return self.ranked.orders_NxTxB[0]

  @property
  def best_spec(self) -> orders_lib.OrderSpec | None:
    return self.ranked.specs[0]

  def interval(self, n: int) -> tuple[float, float]:
    """The central `level` range of candidate n's objective over the ensemble members."""
    m = self.ranked.members_NxK[n]
    q = (1 - self.level) / 2
    return float(np.nanquantile(m, q)), float(np.nanquantile(m, 1 - q))

  def table(self, top: int = 5) -> str:
    lines = ["rank  candidate             predicted objective  interval           P(best)  order"]
    for n in range(min(top, len(self.ranked.names))):
      lo, hi = self.interval(n)
      spec = self.ranked.specs[n]
      desc = _describe(spec) if spec is not None else "(given order)"
      pb = f"{self.p_best[n]:7.0%}" if n < len(self.p_best) else "      -"
      lines.append(f"{n + 1:4d}  {self.ranked.names[n]:<22}{self.ranked.score_N[n]:19.4f}  "
                   f"[{lo:.4f}, {hi:.4f}]  {pb}  {desc}")
    lines.append(f"best of the start set: {self.start_best:.4f}; candidates simulated: "
                 f"{len(self.ranked.names)}")
    return "\n".join(lines)

  def save_order(self, sim: Simulator, path: str | os.PathLike, run_id: str = "searched") -> None:
    """Writes the winner as an order file (a RunLog without evals) for a real run."""
    write_runlog(path, order_file(sim, self.best_order, run_id))

  def batch_sampler(self, *, grad_accum: int = 1, world_size: int = 1, rank: int = 0):
    """The winner as a PyTorch `DataLoader` batch sampler, micro-batches of one process
    (`calibrate.io.hf.OrderBatchSampler`; needs the torch extra). A Hugging Face Trainer
    takes the order itself: `OrderedTrainer(result.best_order, ...)`."""
    from calibrate.io.hf import OrderBatchSampler
    return OrderBatchSampler(self.best_order, grad_accum=grad_accum, world_size=world_size,
                             rank=rank)


def _describe(spec: orders_lib.OrderSpec) -> str:
  d = spec.to_dict()
  parts = [d.pop("kind")]
  for k, v in d.items():
    if isinstance(v, list) and v and isinstance(v[0], float):
      v = "[" + ", ".join(f"{x:.2f}" for x in v) + "]"
    parts.append(f"{k}={v}")
  return " ".join(str(p) for p in parts)


def search(sim: Simulator, *, objective: str | Mapping[str, float] = "mean", budget: int = 32,
           start: Mapping[str, Any] | None = None, families: Sequence[str] = SEARCH_FAMILIES,
           keep: int = 4, rounds: int = 2, key: jax.Array, level: float = 0.8,
           diagnostics: bool = False, chunk_size: int | None = None,
           progress: bool = False, tier: str = "auto") -> SearchResult:
  """Searches feeding orders for the lowest predicted objective.

  Args:
    sim: a calibrated simulator.
    objective: "mean" (every fragment's final probe loss, equally) or fragment -> weight.
    budget: candidate orders to simulate in all (each from every seed).
    start: named start candidates (`OrderSpec`s or [T, B] arrays); default: half the budget
      of random orders of `families`, plus a shuffled order.
    families: order families of the random start set.
    keep: how many of the best candidates are varied in each later round.
    rounds: rounds of variation sharing the rest of the budget.
    key: draws the start set, the variations and the orders' randomness.
    level: the interval level of the result's table.
    diagnostics, chunk_size, tier: as for `evaluate`.
    progress: show progress bars.
  """
  k_start, k_eval, k_mut = jax.random.split(key, 3)
  num_f = len(sim.fragments.names)
  if start is None:
    n0 = max(1, budget // 2 - 1)
    start = {"shuffled": orders_lib.OrderSpec("shuffled")}
    for i, k in enumerate(jax.random.split(k_start, n0)):
      fam = families[i % len(families)]
      start[f"{fam}-{i}"] = orders_lib.random_spec(fam, num_f, key=k)
  if not start:
    raise ValueError("search needs at least one start candidate")
  run = {"objective": objective, "diagnostics": diagnostics, "chunk_size": chunk_size,
         "progress": progress, "tier": tier}
  seen = evaluate(sim, start, key=k_eval, **run)
  start_best = float(np.nanmin(seen.score_N))
  left = budget - len(start)
  for r in range(rounds):
    n_new = left // (rounds - r)
    left -= n_new
    if n_new <= 0:
      continue
    top = [i for i in np.argsort(np.where(np.isfinite(seen.score_N), seen.score_N, np.inf))
           if seen.specs[i] is not None][:keep]
    if not top:
      break
    new = {}
    for j in range(n_new):
      parent = top[j % len(top)]
      spec = orders_lib.mutate(seen.specs[parent], num_f,
                               key=jax.random.fold_in(k_mut, 1000 * r + j))
      new[f"{seen.names[parent].split('~')[0]}~r{r + 1}.{j}"] = spec
    seen = seen.concat(evaluate(sim, new, key=jax.random.fold_in(k_eval, r + 1), **run))
  ranked = seen.take(np.argsort(np.where(np.isfinite(seen.score_N), seen.score_N, np.inf),
                                kind="stable"))
  top_k = min(5, len(ranked.names))
  m = ranked.members_NxK[:top_k]
  best = np.argmin(np.where(np.isfinite(m), m, np.inf), axis=0)
  p_best = np.bincount(best, minlength=top_k) / m.shape[1]
  return SearchResult(ranked, p_best, start_best, level)


@dataclasses.dataclass(frozen=True, eq=False)
class NextRun:
  """Candidate real runs ranked by how much the ensemble disagrees on them.

  Attributes:
    ranked: the candidates, most disagreed-on first (`ranked.spread_N`).
    disagreement_NxF: per candidate and fragment, the members' standard deviation of the
      predicted final probe loss (which fragments the run would teach the simulator about).
    fragments: the fragment names.
  """
  ranked: Candidates
  disagreement_NxF: np.ndarray
  fragments: tuple[str, ...]

  @property
  def best_order(self) -> np.ndarray:
    return self.ranked.orders_NxTxB[0]

  def table(self, top: int = 5) -> str:
    lines = ["rank  candidate             disagreement (sd)  predicted  most uncertain fragments"]
    for n in range(min(top, len(self.ranked.names))):
      worst = np.argsort(-np.nan_to_num(self.disagreement_NxF[n]))[:3]
      lines.append(f"{n + 1:4d}  {self.ranked.names[n]:<22}{self.ranked.spread_N[n]:17.4f}"
                   f"  {self.ranked.score_N[n]:9.4f}  "
                   + ", ".join(self.fragments[f] for f in worst))
    return "\n".join(lines)

  def save_order(self, sim: Simulator, path: str | os.PathLike, run_id: str = "next-run") -> None:
    """Writes the chosen run's order file, to run for real with a recorder."""
    write_runlog(path, order_file(sim, self.best_order, run_id))


def next_run(sim: Simulator, candidates: Mapping[str, Any] | None = None, *,
             objective: str | Mapping[str, float] = "mean", n_candidates: int = 12,
             families: Sequence[str] = orders_lib.FAMILIES, key: jax.Array,
             chunk_size: int | None = None, progress: bool = False,
             tier: str = "auto") -> NextRun:
  """The candidate order whose objective the ensemble disagrees on most.

  Args:
    sim: a calibrated simulator.
    candidates: named orders (`OrderSpec`s or [T, B] arrays); default `n_candidates` random
      orders of `families`.
    objective: the user's question, as for `search`.
    key: draws the candidates and their randomness.
    chunk_size, tier: as for `evaluate`.
  """
  k_draw, k_eval = jax.random.split(key)
  if candidates is None:
    candidates = {}
    for i, k in enumerate(jax.random.split(k_draw, n_candidates)):
      fam = families[i % len(families)]
      candidates[f"{fam}-{i}"] = orders_lib.random_spec(fam, len(sim.fragments.names), key=k)
  if not candidates:
    raise ValueError("next_run needs at least one candidate order")
  c = evaluate(sim, candidates, objective=objective, key=k_eval, chunk_size=chunk_size,
               progress=progress, tier=tier)
  ranked = c.take(np.argsort(-np.nan_to_num(c.spread_N, nan=-np.inf), kind="stable"))
  with np.errstate(invalid="ignore"):
    dis = np.nanstd(ranked.final_NxKxF, 1)
  return NextRun(ranked, dis, sim.fragments.names)
