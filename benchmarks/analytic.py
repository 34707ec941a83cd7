"""The analytic tier against the transformer tier (issue 19's figures, so far).

Calibrates the transformer surrogate on a reference set's four shuffled runs, simulates
random orders of every family with each of its seeds (the fit orders, then fresh orders no
fit sees), fits the analytic tier on the first k orders of each family for several k, and
prints its agreement with the transformer on the fresh orders beside two transformer seeds'
agreement with each other (the trust check's figures, `calibrate.fitting.analytic`). Then it
times both tiers side by side in this one process: the transformer on a few orders, the
analytic tier on many, and prints orders per minute and the ratio (medians of `--repeats`).

  python benchmarks/analytic.py --task lm-dev            # about 25 minutes here, mostly the
                                                         # transformer's 352 simulations
  python benchmarks/analytic.py --task lm-dev --cache /tmp/analytic-lm-dev   # reuse them

`--cache DIR` keeps the calibrated simulator and the transformer's simulations, so a second
run (another k, another fit setting) costs seconds. `--validate` also scores the tier fitted
on the most orders on the set's held-out real runs, beside the transformer (`validate`).
Then it times `what_if` in this warm process through each tier; `--screen N` times a screen
of N orders through the tier (forced: the figures are of speed and memory), and `--search K`
compares gradient search with the greedy local search at equal wall time, both through the
tier, the transformer checking each one's K best orders.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import resource
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={len(os.sched_getaffinity(0))}").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from calibrate.answers.outcomes import what_if  # noqa: E402
from calibrate.answers.screen import screen  # noqa: E402
from calibrate.answers.search import evaluate, gradient_search, search  # noqa: E402
from calibrate.fitting import analytic as tier_lib  # noqa: E402
from calibrate.fitting.calibration import predict, schedule  # noqa: E402
from calibrate.fitting.fit import FitConfig, fit  # noqa: E402
from calibrate.fitting.saved import load, save  # noqa: E402
from calibrate.fitting.validate import validate  # noqa: E402
from calibrate.io.runlog import order_from_runlog, read_runlog  # noqa: E402
from surrogate import analytic  # noqa: E402
from surrogate import orders as orders_lib  # noqa: E402
from surrogate.fragments import read_fragments  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "calibrate", "reference", "data")
FIT_KEY, FRESH_KEY = 11, 12  # the fit orders' and the fresh orders' keys: never the same


def _simulator(task: str, cache: str | None):
  folder = os.path.join(DATA, task)
  frags = read_fragments(os.path.join(folder, "fragments.jsonl"))
  runs = [read_runlog(p, frags) for p in sorted(glob.glob(os.path.join(folder, "runs",
                                                                       "shuffled-s*.jsonl")))]
  held = [read_runlog(p, frags) for p in sorted(glob.glob(os.path.join(folder, "runs", "*.jsonl")))
          if not os.path.basename(p).startswith("shuffled-s")]
  path = None if cache is None else os.path.join(cache, "sim")
  if path is not None and os.path.exists(os.path.join(path, "simulator.json")):
    sim = load(path)
  else:
    sim = fit(frags, runs, config=FitConfig(), key=jax.random.key(0), progress=False)
    if path is not None:
      save(sim, path)
  return sim, [order_from_runlog(r, frags) for r in runs], held


def _targets(sim, every, cache: str | None) -> np.ndarray:
  path = None if cache is None else os.path.join(cache, "targets.npz")
  if path is not None and os.path.exists(path):
    with np.load(path) as z:
      if np.array_equal(z["orders"], every):
        return z["target"]
  t0 = time.perf_counter()
  target = tier_lib.transformer_losses(sim, every, progress=True)
  print(f"transformer: {len(every)} orders x {sim.num_seeds} seeds in "
        f"{time.perf_counter() - t0:.0f} s")
  if path is not None:
    np.savez(path, target=target, orders=every)
  return target


def fidelity(sim, every, n_cal: int, n_fit: int, target, per_family: list[int],
             steps: int, form: str = tier_lib.FORM) -> tier_lib.AnalyticTier:
  """Prints the fidelity table; `every` holds the calibration, fit and fresh orders in that
  order. Returns the tier fitted on the most orders."""
  n_fam = len(orders_lib.FAMILIES)
  fresh, sur = every[n_cal + n_fit:], target[:, n_cal + n_fit:]
  print(f"\nfidelity on {len(fresh)} fresh orders (final probe loss; analytic seed s against "
        "transformer seed s | two transformer seeds):")
  print(f"{'fit orders':>11} {'fit s':>6} {'MSE fit':>8} {'MSE fresh':>9} "
        f"{'Spearman':>15} {'decisions':>15} {'order decisions':>17}")
  fresh_feats = tier_lib.tier_features(sim, fresh)
  for k in per_family:
    use = np.r_[np.arange(n_cal), n_cal + np.arange(min(k * n_fam, n_fit))]
    tier = tier_lib.fit_on(sim, every[use], target[:, use], calibration=n_cal, steps=steps,
                           form=form)
    ana = np.moveaxis(tier_lib.tier_losses(tier, fresh_feats, sim.steps_C), 1, 0)
    mse = float(np.nanmean((ana - sur) ** 2))
    got = tier_lib.agreement(ana[:, :, -1, 0], sur[:, :, -1, 0])
    print(f"{len(use):>11} {tier.seconds:>6.1f} {float(np.mean(tier.fit_mse_S)):>8.4f} "
          f"{mse:>9.4f} {np.nanmean(got['spearman_F']):>7.3f} | "
          f"{np.nanmean(got['seed_spearman_F']):.3f} {np.nanmean(got['decisions_F']):>7.3f} | "
          f"{np.nanmean(got['seed_decisions_F']):.3f} {got['order_decisions']:>9.3f} | "
          f"{got['seed_order_decisions']:.3f}")
  print(f"trusted only at >= {tier_lib.TRUST_RATIO} x the seeds' decisions")
  return tier


def throughput(sim, tier, fresh, *, transformer_orders: int, analytic_orders: int,
               repeats: int) -> None:
  """Orders per minute of each tier, side by side (median of `repeats`, compiled first)."""
  lr = schedule(sim)
  few = fresh[:transformer_orders]
  seeds = np.arange(len(few)) % sim.num_seeds
  predict(sim, few, lr, sim.steps_C, seed_N=seeds)  # compiles
  t_sur = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    predict(sim, few, lr, sim.steps_C, seed_N=seeds)
    t_sur.append((time.perf_counter() - t0) / len(few))
  reps = -(-analytic_orders // len(fresh))
  feats = tier_lib.tier_features(sim, fresh)
  feats = analytic.Features(*(np.tile(np.asarray(a), (reps,) + (1,) * (a.ndim - 1))[
      :analytic_orders] for a in feats))
  seed_n = np.arange(analytic_orders) % sim.num_seeds
  tier_lib.tier_losses(tier, feats, sim.steps_C, seed_N=seed_n)  # compiles
  t_ana = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    tier_lib.tier_losses(tier, feats, sim.steps_C, seed_N=seed_n)
    t_ana.append((time.perf_counter() - t0) / analytic_orders)
  t0 = time.perf_counter()
  tier_lib.tier_features(sim, fresh)
  t_feat = (time.perf_counter() - t0) / len(fresh)
  s, a = float(np.median(t_sur)), float(np.median(t_ana))
  print(f"\nthroughput ({sim.num_steps} steps, {len(sim.fragments.names)} fragments, one seed an "
        f"order, median of {repeats}):")
  print(f"  transformer: {s * 1e3:.0f} ms an order ({60 / s:,.0f} orders a minute; "
        f"{transformer_orders} orders a call)")
  print(f"  analytic:    {a * 1e6:.1f} us an order ({60 / a:,.0f} orders a minute; "
        f"{analytic_orders} orders in blocks of {analytic.BLOCK}); ratio {s / a:,.0f}x")
  print(f"  the analytic tier's features from concrete orders: {t_feat * 1e6:.0f} us an order "
        "(compiled; not in the figure above)")


def answers(sim, tier, fresh, *, screen_orders: int, repeats: int) -> None:
  """The answers through the tier in this warm process: `what_if` of one order (median of
  `repeats`, beside one transformer what-if), and a screen of `screen_orders` orders."""
  with_tier = dataclasses.replace(sim, analytic=tier)
  key = jax.random.key(0)
  what_if(with_tier, fresh[0], key=key, tier="analytic")  # compiles
  t_ana = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    what_if(with_tier, fresh[0], key=key, tier="analytic")
    t_ana.append(time.perf_counter() - t0)
  t0 = time.perf_counter()
  what_if(with_tier, fresh[0], key=key, tier="transformer")
  t_sur = time.perf_counter() - t0
  print(f"\nwhat_if of one order (it and a counterfactual per fed fragment, every seed; warm):"
        f"\n  analytic:    {np.median(t_ana) * 1e3:.0f} ms (median of {repeats})"
        f"\n  transformer: {t_sur:.1f} s (once, compilation included)")
  if screen_orders:
    t0 = time.perf_counter()
    sc = screen(with_tier, key=key, n_orders=screen_orders, tier="analytic")
    took = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    print(f"\nscreen of {screen_orders:,} orders ({len(sc.specs):,} and their counterfactuals) "
          f"through the analytic tier: {took:.0f} s in all, {sc.seconds_per_order * 1e6:.0f} us "
          f"an order simulated and mapped (the rest draws the orders); peak memory of this "
          f"process {peak:.1f} GiB")


def compare_designs(sim, objective, *, verify: int, key: jax.Array) -> dict:
  """Gradient search against the greedy local search at equal wall time (the greedy one at
  least the gradient one's), both through `sim`'s tier (forced); each method's `verify` best
  orders and a shuffle are then simulated by the transformer. Returns {"shuffled": score,
  method: {"name", "order", "score", "tier_best", "seconds", "candidates"}}, scores the
  transformer's predicted objective (lower is better)."""
  # Both timed warm (a run with the same shapes first compiles); the greedy search's
  # budget doubles until it has had at least the gradient search's time.
  run_grad = lambda: gradient_search(sim, objective=objective, key=key,  # noqa: E731
                                     tier="analytic", verify=0)
  run_grad()
  t0 = time.perf_counter()
  grad = run_grad()
  t_grad = time.perf_counter() - t0
  budget = 16
  while True:
    run_greedy = lambda b=budget: search(sim, objective=objective,  # noqa: E731
                                         key=jax.random.fold_in(key, 1), tier="analytic",
                                         budget=b, rounds=4)
    run_greedy()
    t0 = time.perf_counter()
    greedy = run_greedy()
    t_greedy = time.perf_counter() - t0
    if t_greedy >= t_grad or budget >= 1 << 14:
      break
    budget *= 2
  check = {"shuffled": orders_lib.OrderSpec("shuffled")}
  for method, res in (("gradient", grad), ("greedy", greedy)):
    top = [i for i, n in enumerate(res.ranked.names) if n != "shuffled"][:verify]
    check.update({f"{method}:{res.ranked.names[i]}": res.ranked.orders_NxTxB[i] for i in top})
  ver = evaluate(sim, check, objective=objective, key=key, tier="transformer")
  by = dict(zip(ver.names, ver.score_N))
  out = {"shuffled": float(by["shuffled"])}
  for method, res, took in (("gradient", grad, t_grad), ("greedy", greedy, t_greedy)):
    mine = {n: v for n, v in by.items() if n.startswith(method + ":")}
    best = min(mine, key=mine.get)
    out[method] = {"name": best.split(":", 1)[1], "order": check[best],
                   "score": float(mine[best]), "tier_best": float(np.nanmin(res.ranked.score_N)),
                   "seconds": took, "candidates": len(res.ranked.names), "verified": len(mine)}
  return out


def design(sim, tier, *, verify: int) -> None:
  """`compare_designs` for two objectives fixed in advance (every fragment; the file's first
  two), printed."""
  with_tier = dataclasses.replace(sim, analytic=tier)
  names = sim.fragments.names
  print(f"\norder design through the tier, then checked by the transformer ({sim.num_seeds} "
        "seeds; objective: predicted final probe loss, lower is better):")
  for label, objective in (("mean", "mean"), (f"{names[0]} + {names[1]}",
                                               {names[0]: 1.0, names[1]: 1.0})):
    got = compare_designs(with_tier, objective, verify=verify, key=jax.random.key(0))
    print(f"  objective {label}: shuffled {got['shuffled']:.4f} (transformer)")
    for method in ("gradient", "greedy"):
      g = got[method]
      print(f"    {method:<9}{g['seconds']:6.1f} s, {g['candidates']:>5} candidates on the tier; "
            f"tier's best {g['tier_best']:.4f}; transformer's best of its top {g['verified']}: "
            f"{g['score']:.4f} ({g['name']})")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--task", default="lm-dev")
  p.add_argument("--per-family", default="2,4,6",
                 help="fit orders of each family, comma-separated (the largest is simulated)")
  p.add_argument("--fresh", type=int, default=48, help="fresh orders for the fidelity figures")
  p.add_argument("--fit-steps", type=int, default=2000)
  p.add_argument("--form", default=tier_lib.FORM, choices=tier_lib.FORMS,
                 help="the tier's form: plain, following Adam's normalised steps, or latent")
  p.add_argument("--cache", help="folder keeping the simulator and the transformer's runs")
  p.add_argument("--transformer-orders", type=int, default=8)
  p.add_argument("--analytic-orders", type=int, default=65536)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--search", type=int, default=0, metavar="VERIFY",
                 help="also compare gradient and greedy search at equal wall time, the "
                      "transformer checking each one's VERIFY best orders")
  p.add_argument("--screen", type=int, default=0,
                 help="also time a screen of this many orders through the tier (e.g. 100000)")
  p.add_argument("--validate", action="store_true",
                 help="score the tier on the set's held-out real runs beside the transformer")
  args = p.parse_args()
  per_family = [int(x) for x in args.per_family.split(",")]
  if args.cache:
    os.makedirs(args.cache, exist_ok=True)
  t0 = time.perf_counter()
  sim, cal, held = _simulator(args.task, args.cache)
  print(f"{args.task}: simulator ready in {time.perf_counter() - t0:.0f} s "
        f"({sim.num_seeds} seeds, {sim.model_cfg.length} tokens)")
  n_fam = len(orders_lib.FAMILIES)
  fit_orders = tier_lib.draw(sim, max(per_family) * n_fam, key=jax.random.key(FIT_KEY))
  fresh = tier_lib.draw(sim, args.fresh, key=jax.random.key(FRESH_KEY))
  every = np.concatenate([np.stack(cal), fit_orders, fresh])
  target = _targets(sim, every, args.cache)
  tier = fidelity(sim, every, len(cal), len(fit_orders), target, per_family, args.fit_steps,
                  args.form)
  if args.validate:
    report = validate(dataclasses.replace(sim, analytic=tier), held)
    print(f"\non {len(report.run_ids)} held-out real runs (validate; the tier fitted on "
          f"{tier.fit_orders} orders):")
    keys = ("trajectory_mse_ratio", "kendall_tau", "decision_accuracy",
            "order_decision_accuracy", "auroc_better_than_median", "coverage")
    print(f"{'':>14}" + "".join(f"{k[:22]:>24}" for k in keys))
    for m in ("simulator", "analytic_tier", "simfluence_linear"):
      print(f"{m:>14}" + "".join(f"{report.methods[m].get(k, float('nan')):>24.3f}"
                                  for k in keys))
  throughput(sim, tier, fresh, transformer_orders=args.transformer_orders,
             analytic_orders=args.analytic_orders, repeats=args.repeats)
  answers(sim, tier, fresh, screen_orders=args.screen, repeats=args.repeats)
  if args.search:
    design(sim, tier, verify=args.search)


if __name__ == "__main__":
  main()
