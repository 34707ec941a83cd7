"""Does the order `search` recommends do well for real? (issue 5's figure)

Calibrates on four real runs of the committed LM set (two shuffles, `blocked-p1`,
`subset-1`, as the demo), searches for the order with the lowest predicted mean final probe
loss, then fine-tunes the real model on exactly that order with the reference harness
(`calibrate.reference.runs.run_order`: the same GPT-2, optimizer and evals as the committed
runs) and ranks its real mean final probe loss among the committed runs not used for
calibration. Prints the rank, the share of real runs it beats, and whether it is in the top
third.

  python benchmarks/search_real.py             # about 6 minutes here (one real run)
  python benchmarks/search_real.py --budget 32 --length 32   # a wider search, 32 tokens

`--sim DIR` loads a saved simulator instead (the demo's bundled one:
`calibrate/reference/data/lm/demo-simulator`); `--design K` then compares gradient search with
the greedy local search at equal wall time through its analytic tier, the transformer
checking each one's K best (`benchmarks/analytic.py`'s `compare_designs`), and fine-tunes
both winners for real, ranking each as above.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={len(os.sched_getaffinity(0))}").strip()

import numpy as np

from calibrate.answers.search import search
from calibrate.fitting.fit import FitConfig, fit
from calibrate.fitting.saved import load
from calibrate.io.runlog import read_runlog
from calibrate.reference import lm
from calibrate.reference.runs import run_order
from surrogate.fragments import read_fragments
from surrogate.model import ModelConfig

DATA = os.path.join(os.path.dirname(__file__), "..", "calibrate", "reference", "data", "lm")
CALIBRATION = ("shuffled-s0", "shuffled-s1", "blocked-p1", "subset-1")


def mean_final_probe(run, frags) -> float:
  last = run.evals[-1].losses
  return float(np.mean([np.mean([last[frags.examples[i].id] for i in pool])
                        for pool in frags.probe_pools()]))


def _real(order, run_id: str, frags, spec: dict | None) -> tuple[float, float]:
  """Fine-tunes the real model on `order`: (mean final probe loss, seconds)."""
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as d:
    path = run_order(lm.task(DATA), run_id, np.asarray(order), 0,
                     os.path.join(d, f"{run_id}.jsonl"), order_spec=spec)
    run = read_runlog(path, frags)
  return mean_final_probe(run, frags), time.perf_counter() - t0


def _rank(value: float, held: dict[str, float]) -> tuple[int, int]:
  """Prints and returns `value`'s rank among the held-out real runs' and it."""
  values = sorted(held.values())
  rank, n = 1 + sum(v < value for v in values), len(values) + 1
  print(f"rank {rank} of {n} among the {len(values)} committed runs not used for calibration "
        f"and it (best real: {values[0]:.4f}, median {np.median(values):.4f}, worst "
        f"{values[-1]:.4f}); beats {sum(v > value for v in values) / len(values):.0%} of them; "
        f"in the top third: {rank <= n / 3}")
  return rank, n


def _design(sim, frags, held: dict[str, float], *, verify: int, key, path: str | None) -> None:
  """Gradient and greedy design through the tier at equal wall time, both winners real."""
  import analytic as bench  # benchmarks/analytic.py: this script's folder is on sys.path
  print(f"tier: {sim.analytic.fidelity.reason if sim.analytic.fidelity else 'unchecked'}")
  got = bench.compare_designs(sim, "mean", verify=verify, key=key)
  print(f"objective mean final probe loss; shuffled {got['shuffled']:.4f} (transformer)")
  figures = {"shuffled_predicted": got["shuffled"]}
  for method in ("gradient", "greedy"):
    g = got[method]
    print(f"\n{method}: {g['seconds']:.1f} s, {g['candidates']} candidates on the tier, tier's "
          f"best {g['tier_best']:.4f}; transformer's best of its top {g['verified']}: "
          f"{g['score']:.4f} ({g['name']})")
    real, took = _real(g["order"], f"designed-{method}", frags, None)
    print(f"run for real in {took:.0f} s: mean final probe loss {real:.4f}")
    rank, n = _rank(real, held)
    figures[method] = {k: v for k, v in g.items() if k != "order"} | {
        "real": real, "rank": rank, "of": n}
  if path:
    with open(path, "w") as f:
      json.dump(figures | {"held_out_real": held}, f, indent=1)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--budget", type=int, default=32, help="search budget (candidate orders)")
  p.add_argument("--length", type=int, default=None,
                 help="surrogate tokens per example (default: fit's, from the data)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", help="write the figures to this file")
  p.add_argument("--sim", help="load this saved simulator instead of calibrating one")
  p.add_argument("--design", type=int, default=0, metavar="VERIFY",
                 help="gradient against greedy search through the tier at equal wall time, "
                      "the transformer checking each one's VERIFY best; both run for real")
  args = p.parse_args()
  import jax
  frags = read_fragments(os.path.join(DATA, "fragments.jsonl"))
  runs = {r.header.run_id: r for r in (read_runlog(f, frags) for f in
                                         sorted(glob.glob(os.path.join(DATA, "runs", "*.jsonl"))))}
  t0 = time.perf_counter()
  if args.sim:
    sim = load(args.sim)
  else:
    model_cfg = None if args.length is None else ModelConfig(length=args.length)
    sim = fit(frags, [runs[n] for n in CALIBRATION], model_cfg=model_cfg,
              config=FitConfig(), key=jax.random.key(args.seed), progress=False)
  t_fit = time.perf_counter() - t0
  held = {n: mean_final_probe(r, frags) for n, r in runs.items()
          if n not in sim.fit_info.calibration_runs}
  if args.design:
    _design(sim, frags, held, verify=args.design, key=jax.random.key(args.seed),
            path=args.json)
    return
  t0 = time.perf_counter()
  result = search(sim, budget=args.budget, key=jax.random.key(args.seed), progress=True)
  t_search = time.perf_counter() - t0
  print(f"fit {t_fit:.0f} s, search {t_search:.0f} s ({len(result.ranked.names)} candidates)")
  print(result.table())
  spec = result.best_spec
  searched, t_real = _real(result.best_order, "searched", frags,
                           spec.to_dict() if spec is not None else None)
  print(f"\nthe searched order ({result.ranked.names[0]}: "
        f"{spec.to_dict() if spec is not None else 'given order'}), run for real in "
        f"{t_real:.0f} s: mean final probe loss {searched:.4f}")
  rank, n = _rank(searched, held)
  for name, v in sorted(held.items(), key=lambda kv: kv[1])[:8]:
    print(f"  {name:<24}{v:.4f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rank": rank, "of": n, "searched_real": searched, "held_out_real": held,
                 "top_third": rank <= n / 3, "best_spec": spec.to_dict() if spec else None,
                 "predicted_ranking": [[nm, float(sc)] for nm, sc in
                                       zip(result.ranked.names, result.ranked.score_N)],
                 "seconds": {"fit": t_fit, "search": t_search, "real_run": t_real}}, f,
                indent=1)


if __name__ == "__main__":
  main()
