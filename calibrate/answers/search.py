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
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from calibrate.fitting import analytic as tier_lib
from calibrate.fitting.calibration import (Simulator, fragment_means, predict, resolve_tier,
                                           schedule)
from calibrate.fitting.runs import order_file
from calibrate.io.runlog import write_runlog
from surrogate import analytic
from surrogate import orders as orders_lib
from surrogate.errors import CalibrationError

__all__ = ["Candidates", "NextRun", "SearchResult", "evaluate", "gradient_search", "next_run",
           "objective_weights", "search"]

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
    start_best: the best score in the start set (the winner's is at most this); for
      `gradient_search`, the shuffled reference order's (the winner's may be worse).
    level: the interval level of `interval`.
    phase_weights: for `gradient_search`'s candidates, name -> their per-phase mixture
      weights [P, F].
    fragments: the fragment names (to describe phase weights).
  """
  ranked: Candidates
  p_best: np.ndarray
  start_best: float
  level: float = 0.8
  phase_weights: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  fragments: tuple[str, ...] = ()

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
      name = self.ranked.names[n]
      desc = (_describe(spec) if spec is not None else
              _describe_phases(self.phase_weights[name], self.fragments)
              if name in self.phase_weights else "(given order)")
      pb = f"{self.p_best[n]:7.0%}" if n < len(self.p_best) else "      -"
      lines.append(f"{n + 1:4d}  {self.ranked.names[n]:<22}{self.ranked.score_N[n]:19.4f}  "
                   f"[{lo:.4f}, {hi:.4f}]  {pb}  {desc}")
    start = "shuffled reference" if self.phase_weights else "best of the start set"
    lines.append(f"{start}: {self.start_best:.4f}; candidates simulated: "
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


def _describe_phases(weights_PxF: np.ndarray, fragments: Sequence[str], top: int = 3) -> str:
  """Each phase's largest mixture weights, e.g. "1: perl 41% love 20% | 2: ..."."""
  name = lambda f: fragments[f] if f < len(fragments) else str(f)  # noqa: E731
  return " | ".join(f"{p + 1}: " + " ".join(f"{name(f)} {w[f]:.0%}" for f in np.argsort(-w)[:top])
                    for p, w in enumerate(weights_PxF))


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


def gradient_search(sim: Simulator, *, objective: str | Mapping[str, float] = "mean",
                    phases: int = 4, restarts: int = 8, steps: int = 300,
                    learning_rate: float = 0.1, draws: int = 2, verify: int = 4,
                    trust_region: bool = True, key: jax.Array, level: float = 0.8,
                    chunk_size: int | None = None, progress: bool = False,
                    tier: str = "auto") -> SearchResult:
  """Order design by gradient: per-phase mixture weights optimised through the analytic tier.

  The objective (`search`'s, on the real scale through the calibration's gain map) is
  differentiable in the logits of `phases` x F mixture weights
  (`surrogate.analytic.soft_features`: a weight near 0 is a subset without that fragment, a
  large weight on a small pool repeats its examples). Adam (optax) lowers it from
  `restarts` starts, the first uniform (a shuffle, in expectation), for `steps` steps, every
  restart in one compiled, vmapped call. Each restart's weights are projected to `draws`
  concrete orders (`surrogate.orders.phased_mixture`), which the analytic tier scores with
  a shuffled order for reference; the best `verify` of them and that reference are then
  simulated by the transformer ensemble, whose ranking is the result's (the winner is the
  transformer's best; with `verify=0` the result is the tier's ranking, unverified).

  Args:
    sim: a calibrated simulator with an analytic tier.
    objective: "mean" or fragment -> weight, as for `search`.
    phases, restarts, steps, learning_rate: the relaxation and its optimisation.
    draws: concrete orders drawn from each restart's weights.
    verify: how many of the tier's best orders the transformer checks (0: none).
    trust_region: keep every phase's weights within the spread of the mixtures the tier
      was fitted on (`surrogate.analytic.phase_objective`'s `max_kl`).
    key: draws the random starts and the concrete orders.
    level, chunk_size, progress: as for `search`.
    tier: "auto" (the analytic tier only where it passed its trust check) or "analytic"
      (whatever its check said); the transformer cannot be differentiated here.

  Raises:
    CalibrationError: no analytic tier may answer (the message says why).
  """
  ana, reason = resolve_tier(sim, tier)
  if ana is None:
    raise CalibrationError(f"gradient search needs the analytic tier, and here the "
                           f"{reason}; pass tier='analytic' to use it anyway")
  k_start, k_draw, k_eval = jax.random.split(key, 3)
  num_f = len(sim.fragments.names)
  w_F = objective_weights(sim, objective)
  phase_T, seen_F, lr_T = tier_lib.phase_inputs(sim, phases)
  gain_F = np.asarray(sim.calibration.gain_F, np.float32)
  weight_SxF = np.broadcast_to(w_F * gain_F, (sim.num_seeds, num_f)).astype(np.float32)
  starts = np.array(jax.random.normal(k_start, (restarts, phases, num_f)), np.float32)
  starts[0] = 0.0
  # The trust region: no phase further from uniform than 9 in 10 of the Dirichlet(1)
  # mixtures the tier was fitted on (`surrogate.orders.random_spec`); beyond it the tier
  # extrapolates, and on lm-dev it then ranked orders against the transformer.
  max_kl = _fitted_mixture_kl(num_f) if trust_region else np.inf
  # In the objective's own units (weights x losses), large enough that the region binds.
  scale = float(np.abs(weight_SxF).sum(-1).mean()) * max(float(ana.x0_Sx2xF.max()), 1.0)
  penalty = 100.0 * scale
  logits = _descend(ana.params, jnp.asarray(ana.x0_Sx2xF, jnp.float32), jnp.asarray(phase_T),
                    jnp.asarray(seen_F), jnp.asarray(lr_T), jnp.asarray(weight_SxF),
                    jnp.asarray(starts), steps, learning_rate, ana.betas, float(max_kl),
                    penalty)
  weights = np.asarray(jax.nn.softmax(logits, -1), np.float64)       # R P F
  weights = _drop_tiny(weights, orders_lib.phase_lengths(sim.num_steps, phases),
                       sim.batch_size)
  pools = sim.fragments.train_pools()
  drawn, made = {}, {}
  for r in range(restarts):
    for d in range(draws):
      name = f"gradient-{r}.{d}"
      made[name] = weights[r]
      drawn[name] = orders_lib.phased_mixture(
          pools, weights[r], key=jax.random.fold_in(k_draw, r * draws + d),
          steps=sim.num_steps, batch_size=sim.batch_size)
  drawn["shuffled"] = orders_lib.OrderSpec("shuffled")
  screened = evaluate(sim, drawn, objective=objective, key=k_eval, tier=tier)
  if verify > 0:
    best = np.argsort(_finite(screened.score_N[:-1]), kind="stable")[:verify]
    check = {screened.names[i]: screened.orders_NxTxB[i] for i in [*best, len(drawn) - 1]}
    screened = evaluate(sim, check, objective=objective, key=k_eval, chunk_size=chunk_size,
                        progress=progress, tier="transformer")
  ranked = screened.take(np.argsort(_finite(screened.score_N), kind="stable"))
  m = ranked.members_NxK[:5]
  top = np.argmin(np.where(np.isfinite(m), m, np.inf), axis=0)
  p_best = np.bincount(top, minlength=len(m)) / m.shape[1]
  shuffled = screened.score_N[screened.names.index("shuffled")]
  return SearchResult(ranked, p_best, float(shuffled), level,
                      phase_weights={n: made[n] for n in ranked.names if n in made},
                      fragments=sim.fragments.names)


def _finite(score_N: np.ndarray) -> np.ndarray:
  return np.where(np.isfinite(score_N), score_N, np.inf)


def _drop_tiny(weights_RxPxF: np.ndarray, lengths_P: np.ndarray, batch: int) -> np.ndarray:
  """Weights worth less than half a slot of their phase become 0 (the projection of the
  relaxed subset), the rest renormalised."""
  slots_P = (np.asarray(lengths_P) * batch).astype(np.float64)
  keep = weights_RxPxF * slots_P[None, :, None] >= 0.5
  w = np.where(keep, weights_RxPxF, 0.0)
  return w / w.sum(-1, keepdims=True)


def _fitted_mixture_kl(num_f: int, quantile: float = 0.9) -> float:
  """The `quantile` of KL(w || uniform) over Dirichlet(1) weights of `num_f` fragments."""
  w = np.random.default_rng(0).dirichlet(np.ones(num_f), 4096)
  kl = np.sum(w * np.log(np.maximum(w, 1e-30)), -1) + np.log(num_f)
  return float(np.quantile(kl, quantile))


@functools.partial(jax.jit, static_argnums=(7, 8, 9))
def _descend(params_S, x0_Sx2xF, phase_T, seen_F, lr_T, weight_SxF, starts_RxPxF, steps: int,
             learning_rate: float, betas, max_kl, penalty):
  """Adam on every restart's logits at once: [R, P, F] after `steps` steps."""
  opt = optax.adam(learning_rate)
  loss = lambda z: analytic.phase_objective(z, params_S, x0_Sx2xF, phase_T,  # noqa: E731
                                            seen_F, lr_T, weight_SxF, betas, max_kl, penalty)

  return jax.vmap(lambda z0: analytic.minimize(loss, z0, opt, steps))(starts_RxPxF)


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
