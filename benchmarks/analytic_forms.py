"""The analytic tier's forms side by side on one set's cached transformer simulations.

`benchmarks/analytic.py --task T --cache DIR --per-family K` keeps the calibrated simulator
and the transformer's simulations of the calibration orders, K random orders of each family
(key 11) and the fresh orders (key 12). This script fits each asked form on the calibration
and fit orders of that cache, with the library's fit (`calibrate.fitting.analytic.fit_on`'s
settings), and prints its agreement with the transformer on the fresh orders beside two
transformer seeds' (the trust check's figures):

  python benchmarks/analytic_forms.py --task lm-dev --cache DIR --per-family 12 \\
      --forms plain,latent:12,latent:24,latent:24:nodiv

A form is `plain`, `adam`, or `latent:K[:nodiv]` (K latent coordinates; `nodiv` holds the
batch-diversity factor at 1).
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from calibrate.fitting import analytic as tier_lib
from calibrate.fitting.saved import load
from surrogate import analytic
from surrogate import orders as orders_lib

DATA = os.path.join(os.path.dirname(__file__), "..", "calibrate", "reference", "data")


def _cache(task: str, cache: str, per_family: int):
  sim = load(os.path.join(cache, "sim"))
  with np.load(os.path.join(cache, "targets.npz")) as z:
    target, every = z["target"], z["orders"]
  n_cal = len(glob.glob(os.path.join(DATA, task, "runs", "shuffled-s*.jsonl")))
  n_fit = per_family * len(orders_lib.FAMILIES)
  if len(every) <= n_cal + n_fit:
    raise SystemExit(f"{cache} holds {len(every)} orders: not {n_cal} calibration + {n_fit} fit "
                     "+ fresh ones (build it with benchmarks/analytic.py --per-family)")
  return sim, every, target, n_cal, n_fit


def _latent(sim, x0, feats, target, *, num_k: int, diversity: bool, steps: int):
  """The latent form fitted as `fit_on` fits it (Adam, cosine decay, the pull to the start),
  optionally with the diversity factor held at 1 (its coefficients at 0)."""
  betas = tier_lib.adam_betas(sim)
  start = analytic.init_latent(x0.shape[-1], num_k)
  if diversity:
    return analytic.fit(x0, feats, sim.steps_C, target, steps=steps, betas=betas, start=start)
  fixed = lambda p: p._replace(diversity_F=jnp.zeros_like(p.diversity_F))  # noqa: E731
  ck = jnp.asarray(sim.steps_C)
  num_f = x0.shape[-1]

  def mse(p, x0_, tgt):
    pred = analytic.rollout_many(fixed(p), x0_, feats, ck, betas)
    ok = jnp.isfinite(tgt)
    err = jnp.where(ok, pred - jnp.where(ok, tgt, 0.0), 0.0)
    return jnp.sum(err * err) / jnp.maximum(ok.sum(), 1)

  def one(x0_, tgt):
    opt = optax.adam(optax.cosine_decay_schedule(0.05, steps, alpha=0.05))
    shrink = lambda p: sum(jnp.sum((a - b) ** 2) for a, b in  # noqa: E731
                           zip(jax.tree.leaves(p), jax.tree.leaves(start)))
    p = analytic.minimize(lambda p: mse(p, x0_, tgt) + 1e-4 * shrink(p) / num_f ** 2, start,
                          opt, steps)
    return analytic.FitResult(fixed(p), mse(p, x0_, tgt))

  return jax.vmap(jax.jit(one))(jnp.asarray(x0, jnp.float32), jnp.asarray(target, jnp.float32))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--task", required=True)
  p.add_argument("--cache", required=True, help="a folder built by benchmarks/analytic.py")
  p.add_argument("--per-family", type=int, default=12, help="fit orders of each family")
  p.add_argument("--forms", default="plain,latent:24")
  p.add_argument("--fit-steps", type=int, default=2000)
  args = p.parse_args()
  sim, every, target, n_cal, n_fit = _cache(args.task, args.cache, args.per_family)
  use, fresh = np.arange(n_cal + n_fit), np.arange(n_cal + n_fit, len(every))
  sur = target[:, fresh]
  x0 = np.nan_to_num(np.nanmean(target[:, use, 0], 1))
  feats = tier_lib.tier_features(sim, every)
  pick = lambda idx: analytic.Features(*(np.asarray(a)[idx] for a in feats))  # noqa: E731
  print(f"{args.task}: {len(use)} fit orders ({n_cal} calibration), {len(fresh)} fresh; "
        "analytic seed s against transformer seed s | two transformer seeds")
  print(f"{'form':>18} {'fit s':>6} {'MSE fit':>8} {'MSE fresh':>9} {'Spearman':>15} "
        f"{'per-fragment':>15} {'orders':>15}")
  for form in args.forms.split(","):
    t0 = time.perf_counter()
    if form in ("plain", "adam"):
      tier = tier_lib.fit_on(sim, every[use], target[:, use], calibration=n_cal,
                             steps=args.fit_steps, form=form)
      params, betas, fit_mse = tier.params, tier.betas, float(np.mean(tier.fit_mse_S))
    else:
      parts = form.split(":")
      res = _latent(sim, x0, pick(use), target[:, use], num_k=int(parts[1]),
                    diversity="nodiv" not in parts, steps=args.fit_steps)
      params, betas, fit_mse = res.params, tier_lib.adam_betas(sim), float(np.mean(res.mse))
    tier = tier_lib.AnalyticTier(params, x0, np.zeros((0,)), len(use), np.zeros(0), betas=betas)
    ana = np.moveaxis(tier_lib.tier_losses(tier, pick(fresh), sim.steps_C), 1, 0)
    secs = time.perf_counter() - t0
    got = tier_lib.agreement(ana[:, :, -1, 0], sur[:, :, -1, 0])
    f = lambda k: np.nanmean(got[k])  # noqa: E731
    print(f"{form:>18} {secs:>6.0f} {fit_mse:>8.4f} {float(np.nanmean((ana - sur) ** 2)):>9.4f} "
          f"{f('spearman_F'):>7.3f} | {f('seed_spearman_F'):.3f} {f('decisions_F'):>7.3f} | "
          f"{f('seed_decisions_F'):.3f} {got['order_decisions']:>7.3f} | "
          f"{got['seed_order_decisions']:.3f}", flush=True)
  print(f"the trust check asks for >= {tier_lib.TRUST_RATIO} x the seeds' per-fragment and "
        "order decisions")


if __name__ == "__main__":
  main()
