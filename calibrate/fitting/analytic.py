"""The analytic tier of a calibrated simulator: `surrogate.analytic`'s fragment-level recurrence
fitted on the transformer surrogate's own simulations, and the check that says whether it may
answer in the transformer's place.

`fit_tier` draws random orders of every family, simulates them with every transformer seed,
and fits one recurrence per seed to that seed's fragment means (probe and evaluated train
losses at the calibration steps), the calibration orders among them. `check_fidelity`
compares the two tiers on fresh orders that no fit used, seed by seed, beside the agreement
of two transformer seeds with each other: the analytic tier is trusted only where its
agreement with the transformer is at least `TRUST_RATIO` x the transformer's with itself.

The tier answers in the transformer's scale; `calibration.predict` maps its deviations from
the calibration orders to the real scale exactly as it maps the transformer's.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from calibrate.fitting import metrics
from calibrate.fitting.calibration import (Simulator, example_positions, is_probe, predict,
                                           schedule)
from surrogate import analytic, optim
from surrogate import orders as orders_lib

__all__ = ["AnalyticTier", "FORM", "FORMS", "Fidelity", "TRUST_RATIO", "adam_betas", "agreement",
           "check_fidelity", "draw", "fit_on", "fit_tier", "phase_inputs", "ratio_interval",
           "tier_features", "tier_losses", "transformer_losses"]

TRUST_RATIO = 0.95
FORMS = ("plain", "adam", "latent")
FORM = "latent"  # the default form (docs/experiments.md: chosen on every development set)


@dataclasses.dataclass(frozen=True)
class Fidelity:
  """The analytic tier against the transformer on fresh orders.

  Attributes:
    orders: how many fresh orders (of every family) were simulated by both tiers.
    families: the families they were drawn from, in turn.
    spearman_F: per fragment, the rank correlation across orders of the final probe loss,
      analytic seed s against transformer seed s, averaged over seeds.
    decisions_F: per fragment, the share of order pairs both put in the same order.
    order_decisions: the same for the orders' mean probe loss over fragments.
    seed_spearman_F, seed_decisions_F, seed_order_decisions: the same figures between two
      transformer seeds (every pair of seeds, averaged): the transformer's own agreement.
    trusted: whether the mean of `decisions_F` and `order_decisions` are each at least
      `TRUST_RATIO` x the seeds' figure.
    reason: why it is or is not trusted, in words.
    ratio_interval: the 90 % intervals of the two ratios the check compares with
      `TRUST_RATIO` (mean per-fragment decisions, then order decisions, each over the
      seeds' figure), from a bootstrap over the fresh orders: how far a check on few
      orders can be from one on many. None for checks saved before it existed.
  """
  orders: int
  families: tuple[str, ...]
  spearman_F: np.ndarray
  decisions_F: np.ndarray
  order_decisions: float
  seed_spearman_F: np.ndarray
  seed_decisions_F: np.ndarray
  seed_order_decisions: float
  trusted: bool
  reason: str
  ratio_interval: tuple[tuple[float, float], tuple[float, float]] | None = None

  def to_json(self) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else
                list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_json(cls, d: dict) -> Fidelity:
    arrays = {k: np.asarray(d[k], np.float64) for k in
              ("spearman_F", "decisions_F", "seed_spearman_F", "seed_decisions_F")}
    return cls(orders=int(d["orders"]), families=tuple(d["families"]),
               order_decisions=float(d["order_decisions"]),
               seed_order_decisions=float(d["seed_order_decisions"]),
               trusted=bool(d["trusted"]), reason=str(d["reason"]),
               ratio_interval=(None if d.get("ratio_interval") is None else
                               tuple(tuple(float(x) for x in r) for r in d["ratio_interval"])),
               **arrays)


@dataclasses.dataclass(frozen=True, eq=False)
class AnalyticTier:
  """A fitted analytic tier.

  Attributes:
    params: the recurrence's coefficients, one set per transformer seed (leading axis S).
    x0_Sx2xF: each seed's fragment means before training (row 0 probes, row 1 evaluated
      train examples).
    cal_SxCx2xF: the tier's own mean over the calibration orders at the calibration steps:
      predictions are deviations from it, as the transformer's are from its own.
    fit_orders: how many orders (calibration orders included) it was fitted on.
    fit_mse_S: each seed's fit error (nats^2, over fragments, rows and checkpoints).
    fidelity: the check on fresh orders, or None before it is made.
    seconds: wall time of the fit (the transformer's simulations included).
    betas: Adam's (b1, b2) when the recurrence follows Adam's normalised steps
      (`surrogate.analytic.rollout`; the Adam and latent forms), None for the plain form
      (and the latent form when the runs trained with SGD).
    form: "plain", "adam" or "latent" (`fit_on`).
  """
  params: analytic.Params | analytic.LatentParams
  x0_Sx2xF: np.ndarray
  cal_SxCx2xF: np.ndarray
  fit_orders: int
  fit_mse_S: np.ndarray
  fidelity: Fidelity | None = None
  seconds: float = 0.0
  betas: tuple[float, float] | None = None
  form: str = "plain"

  @property
  def trusted(self) -> bool:
    return self.fidelity is not None and self.fidelity.trusted

  def fragment_rows(self, sim: Simulator, orders_RxTxB: np.ndarray, lr_RxT: np.ndarray,
                    steps_C: np.ndarray, seed_R: np.ndarray) -> np.ndarray:
    """Each run's fragment means at `steps_C`, with its seed's coefficients: [R, C, 2, F]
    (row 0 probes, row 1 evaluated train examples; `calibration.predict`'s analytic path)."""
    return tier_losses(self, tier_features(sim, orders_RxTxB, lr_RxT), steps_C, seed_N=seed_R)


def adam_betas(sim: Simulator) -> tuple[float, float] | None:
  """The real runs' Adam betas when they trained with Adam or AdamW, else None."""
  return None if sim.opt_cfg.name is optim.OptimizerName.SGD else sim.opt_cfg.betas


def _train_weight_FxE(sim: Simulator) -> np.ndarray:
  """Each fragment's equal weights over its evaluated train examples."""
  frags = sim.fragments
  pos = example_positions(frags, sim.eval_ids)
  train = pos[~is_probe(frags, pos)]
  w = np.zeros((len(frags.names), len(frags.examples)))
  w[frags.fragment_of[train], train] = 1.0
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.nan_to_num(w / w.sum(1, keepdims=True))


def tier_features(sim: Simulator, orders_NxTxB: np.ndarray,
                  lr_NxT: np.ndarray | None = None) -> analytic.Features:
  """The recurrence's inputs for orders of `sim`'s data (default rates: `schedule(sim)`).

  Rates are taken as shares of the calibration runs' peak, and an order shorter than the
  calibration runs is padded with empty steps at rate 0 (the recurrence's step scale is the
  calibration runs' length; nothing moves in the padding before the asked checkpoints).
  """
  orders = np.asarray(orders_NxTxB)
  n, t = orders.shape[:2]
  lr = schedule(sim)[:t] if lr_NxT is None else np.asarray(lr_NxT, np.float64)
  lr = np.broadcast_to(lr, (n, t)) / max(float(np.max(schedule(sim))), 1e-30)
  if t < sim.num_steps:
    pad = sim.num_steps - t
    orders = np.concatenate([orders, np.full((n, pad, orders.shape[2]), -1, orders.dtype)], 1)
    lr = np.concatenate([lr, np.zeros((n, pad))], 1)
  return analytic.features(orders, sim.fragments.fragment_of, _train_weight_FxE(sim), lr)


def phase_inputs(sim: Simulator, phases: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`surrogate.analytic.soft_features`' inputs for `phases` phases of `sim`'s runs at the
  calibration runs' rates: (phase_T, seen_per_share_F, lr_T)."""
  lengths = orders_lib.phase_lengths(sim.num_steps, phases)
  phase_T = np.repeat(np.arange(phases), lengths)
  has_train = _train_weight_FxE(sim).sum(1) > 0
  pool_F = np.array([len(p) for p in sim.fragments.train_pools()], np.float64)
  seen_F = np.where(has_train, sim.batch_size / np.maximum(pool_F, 1), 0.0)
  lr = schedule(sim)
  return phase_T, seen_F.astype(np.float32), (lr / max(float(lr.max()), 1e-30)).astype(np.float32)


def _fragment_rows(sim: Simulator, raw_xM: np.ndarray) -> np.ndarray:
  """[..., M] losses in `sim.eval_ids` columns -> [..., 2, F] (probe, train) means."""
  frags = sim.fragments
  pos = example_positions(frags, sim.eval_ids)
  probe_M, frag_M = is_probe(frags, pos), frags.fragment_of[pos]
  num_f = len(frags.names)
  return np.stack([metrics.fragment_means(raw_xM, frag_M, probe_M, num_f),
                   metrics.fragment_means(raw_xM, frag_M, ~probe_M, num_f)], -2)


def transformer_losses(sim: Simulator, orders_NxTxB: np.ndarray, *, progress: bool = False,
                       chunk_size: int | None = None) -> np.ndarray:
  """The transformer's fragment means of orders with every seed, in its own scale:
  [S, N, C, 2, F] at `sim.steps_C` (NaN where a seed's run diverged)."""
  pred, _ = predict(sim, orders_NxTxB, schedule(sim), sim.steps_C, progress=progress,
                    chunk_size=chunk_size)
  raw = pred.raw_NxSxCxM.astype(np.float64)                          # N S C M
  diverged = pred.diverged_NxS >= 0
  raw[diverged] = np.nan
  return np.moveaxis(_fragment_rows(sim, raw), 1, 0)                 # S N C 2 F


def tier_losses(tier: AnalyticTier, feats: analytic.Features, steps_C: np.ndarray,
                seed_N: np.ndarray | None = None) -> np.ndarray:
  """The tier's fragment means at `steps_C`: [N, S, C, 2, F] (every seed), or [N, C, 2, F]
  with one seed per order (`seed_N`)."""
  steps = jnp.asarray(steps_C)
  seed_of = lambda s: jax.tree.map(lambda a: a[s], tier.params)  # noqa: E731
  if seed_N is None:
    return np.stack([analytic.rollout_blocks(seed_of(s), tier.x0_Sx2xF[s], feats, steps,
                                             tier.betas)
                     for s in range(len(tier.x0_Sx2xF))], 1)
  seed_N = np.asarray(seed_N) % len(tier.x0_Sx2xF)
  out = np.empty((len(seed_N), len(steps), 2, tier.x0_Sx2xF.shape[-1]), np.float32)
  for s in np.unique(seed_N):  # one seed's orders share its coefficients: matrix products
    sel = np.nonzero(seed_N == s)[0]
    out[sel] = analytic.rollout_blocks(seed_of(s), tier.x0_Sx2xF[s],
                                       analytic.Features(*(np.asarray(a)[sel] for a in feats)),
                                       steps, tier.betas)
  return out


def draw(sim: Simulator, n: int, *, key: jax.Array) -> np.ndarray:
  """`n` random orders of `sim`'s shape, every family in turn: [N, T, B]."""
  return orders_lib.random_orders(sim.fragments.train_pools(), n, key=key, steps=sim.num_steps,
                                  batch_size=sim.batch_size)[1]


def fit_on(sim: Simulator, orders_NxTxB: np.ndarray, target_SxNxCx2xF: np.ndarray, *,
           calibration: int, steps: int = 2000, form: str = FORM) -> AnalyticTier:
  """Fits the tier on the transformer's simulations of orders whose first `calibration`
  are the calibration runs' (their mean is the tier's reference point). `form` "plain" is
  linear in the batch's shares; "adam" follows Adam's normalised steps when the runs
  trained with Adam or AdamW (`adam_betas`; with SGD it is the plain form); "latent" is the
  runs' optimizer training a point in a fitted space of K = 4F coordinates
  (`surrogate.analytic.LatentParams`). docs/experiments.md compares them on every
  development set."""
  if form not in FORMS:
    raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
  betas = adam_betas(sim) if form != "plain" else None
  t0 = time.perf_counter()
  x0 = np.nan_to_num(np.nanmean(target_SxNxCx2xF[:, :, 0], 1))      # S 2 F
  feats = tier_features(sim, orders_NxTxB)
  num_f = x0.shape[-1]
  start = analytic.init_latent(num_f) if form == "latent" else analytic.init_params(num_f)
  res = analytic.fit(x0, feats, sim.steps_C, target_SxNxCx2xF, steps=steps, betas=betas,
                     start=start)
  tier = AnalyticTier(res.params, x0, np.zeros((0,)), len(orders_NxTxB), np.asarray(res.mse),
                      betas=betas, form=form)
  cal = analytic.Features(*(np.asarray(a)[:calibration] for a in feats))
  return dataclasses.replace(tier, cal_SxCx2xF=tier_losses(tier, cal, sim.steps_C).mean(0),
                             seconds=time.perf_counter() - t0)


def fit_tier(sim: Simulator, calibration_orders: Sequence[np.ndarray], *, key: jax.Array,
             orders_per_family: int = 12, steps: int = 2000, form: str = FORM,
             progress: bool = False, chunk_size: int | None = None) -> AnalyticTier:
  """Fits the analytic tier on the transformer's simulations of random orders.

  Args:
    sim: the calibrated simulator.
    calibration_orders: the calibration runs' orders ([T, B] each); they are fitted too,
      and their mean is the tier's reference point.
    key: draws the random orders.
    orders_per_family: random orders of each of `surrogate.orders.FAMILIES`.
    steps: optimizer steps of the fit.
    form: the recurrence's form (`fit_on`).
    progress, chunk_size: passed to the transformer's simulation.
  """
  t0 = time.perf_counter()
  drawn = draw(sim, orders_per_family * len(orders_lib.FAMILIES), key=key)
  cal = np.stack([np.asarray(o, np.int32) for o in calibration_orders])
  every = np.concatenate([cal, drawn])
  target = transformer_losses(sim, every, progress=progress, chunk_size=chunk_size)
  tier = fit_on(sim, every, target, calibration=len(cal), steps=steps, form=form)
  return dataclasses.replace(tier, seconds=time.perf_counter() - t0)


def _agreement(a_NxF: np.ndarray, b_NxF: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
  """(Spearman per fragment, decision agreement per fragment, order decision agreement)."""
  num_f = a_NxF.shape[1]
  rho = np.array([metrics.spearman(a_NxF[:, f], b_NxF[:, f]) for f in range(num_f)])
  dec = np.array([metrics.decision_accuracy(a_NxF[:, [f]], b_NxF[:, [f]])
                  for f in range(num_f)])
  order = metrics.decision_accuracy(np.nanmean(a_NxF, 1, keepdims=True),
                                    np.nanmean(b_NxF, 1, keepdims=True))
  return rho, dec, order


def agreement(ana_SxNxF: np.ndarray, sur_SxNxF: np.ndarray) -> dict[str, np.ndarray | float]:
  """The fidelity figures of final losses [S, N, F]: analytic seed s against transformer
  seed s, and every pair of transformer seeds, each averaged over seeds (or pairs).

  Returns:
    spearman_F, decisions_F, order_decisions, and the seeds' seed_spearman_F,
    seed_decisions_F, seed_order_decisions (`Fidelity`'s fields).
  """
  mine = [_agreement(ana_SxNxF[s], sur_SxNxF[s]) for s in range(len(sur_SxNxF))]
  seeds = [_agreement(sur_SxNxF[a], sur_SxNxF[b])
           for a, b in itertools.combinations(range(len(sur_SxNxF)), 2)]
  mean = lambda xs, i: np.nanmean(np.stack([x[i] for x in xs]), 0)  # noqa: E731
  return {"spearman_F": mean(mine, 0), "decisions_F": mean(mine, 1),
          "order_decisions": float(mean(mine, 2)), "seed_spearman_F": mean(seeds, 0),
          "seed_decisions_F": mean(seeds, 1), "seed_order_decisions": float(mean(seeds, 2))}


def ratio_interval(ana_SxNxF: np.ndarray, sur_SxNxF: np.ndarray, *, draws: int = 200,
                   level: float = 0.9, seed: int = 0
                   ) -> tuple[tuple[float, float], tuple[float, float]]:
  """The `level` intervals of the trust check's two ratios (the tier's mean per-fragment
  decisions over the seeds', then its order decisions over the seeds'), from `draws`
  bootstrap resamples of the orders. A resampled order's pair with itself is a real tie
  and is left out of every decision (`metrics.decision_accuracy`)."""
  rng = np.random.default_rng(seed)
  n = sur_SxNxF.shape[1]
  ratios = []
  for _ in range(draws):
    pick = rng.integers(0, n, n)
    got = agreement(ana_SxNxF[:, pick], sur_SxNxF[:, pick])
    ratios.append((np.nanmean(got["decisions_F"]) / np.nanmean(got["seed_decisions_F"]),
                   got["order_decisions"] / got["seed_order_decisions"]))
  lo, hi = np.nanquantile(np.asarray(ratios), [(1 - level) / 2, (1 + level) / 2], axis=0)
  return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))


def check_fidelity(sim: Simulator, tier: AnalyticTier, *, key: jax.Array, orders: int = 64,
                   progress: bool = False, chunk_size: int | None = None) -> AnalyticTier:
  """Checks the tier on `orders` fresh orders of every family; returns it with `fidelity`.

  `key` must not be the key the tier was fitted with (the orders would be the fit's).
  """
  if sim.num_seeds < 2:
    raise ValueError("the fidelity check compares transformer seeds: fit with seeds >= 2")
  fresh = draw(sim, orders, key=key)
  sur = transformer_losses(sim, fresh, progress=progress, chunk_size=chunk_size)
  ana = np.moveaxis(tier_losses(tier, tier_features(sim, fresh), sim.steps_C), 1, 0)
  got = agreement(ana[:, :, -1, 0], sur[:, :, -1, 0])
  dec, seed_dec = np.nanmean(got["decisions_F"]), np.nanmean(got["seed_decisions_F"])
  order, seed_order = got["order_decisions"], got["seed_order_decisions"]
  ok = bool(dec >= TRUST_RATIO * seed_dec and order >= TRUST_RATIO * seed_order)
  (f_lo, f_hi), (o_lo, o_hi) = interval = ratio_interval(ana[:, :, -1, 0], sur[:, :, -1, 0])
  reason = (f"per-fragment decisions {dec:.3f} vs the transformer seeds' {seed_dec:.3f} "
            f"(needs x{TRUST_RATIO}), order decisions {order:.3f} vs {seed_order:.3f}, on "
            f"{orders} fresh orders (the ratios' 90 % intervals {f_lo:.2f}-{f_hi:.2f} and "
            f"{o_lo:.2f}-{o_hi:.2f})")
  fid = Fidelity(orders=orders, families=tuple(orders_lib.FAMILIES), trusted=ok,
                 reason=("trusted: " if ok else "not trusted: ") + reason,
                 ratio_interval=interval, **got)
  return dataclasses.replace(tier, fidelity=fid)
