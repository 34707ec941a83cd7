"""The five diagnostics, surrogate against the real model, on the committed LM sets (issue 21).

For each set: calibrate on the four shuffled runs (as `benchmarks/accuracy.py`'s default
plan), then compare the surrogate's final diagnostics with the real model's
(`calibrate.fitting.validate.validate_diagnostics`) across every other distinct order: per
fragment, the Spearman across orders; its median over fragments against the bar fixed before
any real diagnostic was recorded (`metrics.DIAGNOSTIC_AGREEMENT_BAR`, 0.5); beside it the same
figure between two real seeds over the sets' seed re-runs. Then the by-family question a
user asks ("what does blocking do to fragment X compared with shuffling"), on real runs: per
family with held-out runs and fragment, the change of the family's mean final diagnostic
from the four shuffles' mean, real against predicted (the shuffles' diagnostics were not
used in calibration, only their losses): the share of (family, fragment) cells whose sign
agrees, and the Spearman across the cells. Prints one table per set and the spread across
sets; `--json PATH` writes every figure.

  python benchmarks/diagnostics.py                  # lm, lm-dev and lm-lora, about 25 minutes
  python benchmarks/diagnostics.py --task lm

The runs must carry real diagnostics (`python -m calibrate.reference.lm [--set dev|lora]`
records them).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={len(os.sched_getaffinity(0))}").strip()

import jax

from calibrate.fitting.fit import FitConfig, fit
from calibrate.fitting.metrics import DIAGNOSTIC_AGREEMENT_BAR, spearman
from calibrate.fitting.validate import diagnostics_agreement_of, diagnostics_pred_real
from calibrate.io.runlog import DIAGNOSTIC_NAMES, read_runlog
from surrogate.fragments import read_fragments

DATA = os.path.join(os.path.dirname(__file__), "..", "calibrate", "reference", "data")
CALIBRATION = ("shuffled-s0", "shuffled-s1", "shuffled-s2", "shuffled-s3")
SETS = ("lm", "lm-dev", "lm-lora")


def run(task: str, seeds: int) -> dict:
  folder = os.path.join(DATA, task)
  frags = read_fragments(os.path.join(folder, "fragments.jsonl"))
  runs = [read_runlog(p, frags) for p in sorted(glob.glob(os.path.join(folder, "runs", "*.jsonl")))]
  cal = [r for r in runs if r.header.run_id in CALIBRATION]
  held = [r for r in runs if not r.header.run_id.startswith("shuffled-")]
  t0 = time.perf_counter()
  sim = fit(frags, cal, config=FitConfig(seeds=seeds), key=jax.random.key(0), progress=False)
  t_fit = time.perf_counter() - t0
  t0 = time.perf_counter()
  used, pred, real = diagnostics_pred_real(sim, cal + held)
  t_val = time.perf_counter() - t0
  is_held = np.array([not r.header.run_id.startswith("shuffled-") for r in used])
  agree = diagnostics_agreement_of([r for r, h in zip(used, is_held) if h],
                                   {k: v[is_held] for k, v in pred.items()},
                                   {k: v[is_held] for k, v in real.items()})
  families = _family_changes(used, pred, real)
  if not agree:
    raise SystemExit(f"{folder}: fewer than 3 held-out orders carry real diagnostics; record "
                     "them with python -m calibrate.reference.lm")
  n = agree[DIAGNOSTIC_NAMES[0]]["orders"]
  print(f"\n== {task}: calibrated on {len(cal)} shuffles in {t_fit:.0f} s; {n} held-out orders "
        f"in {t_val:.0f} s; surrogate {sim.model_cfg.depth}x{sim.model_cfg.width}, "
        f"{sim.model_cfg.length} tokens, {seeds} seeds"
        + (", low-rank adapters" if sim.opt_cfg.adapter else ""))
  print(f"{'diagnostic':<18}{'median':>8}{'min':>8}{'max':>8}{'two seeds':>11}  "
        f"{'verdict (bar ' + str(DIAGNOSTIC_AGREEMENT_BAR) + ')':<22}"
        f"{'family vs shuffled: sign':>26}{'Spearman':>10}{'cells':>7}")
  for name in DIAGNOSTIC_NAMES:
    v, fam = agree[name], families[name]
    rho = np.array(v["per_fragment"], float)
    ok = rho[np.isfinite(rho)]
    lo, hi = (ok.min(), ok.max()) if len(ok) else (np.nan, np.nan)
    print(f"{name:<18}{v['median']:8.3f}{lo:8.3f}{hi:8.3f}{v['seed_to_seed']:11.3f}  "
          f"{'predicted' if v['predicted'] else 'surrogate-internal':<22}"
          f"{fam['sign_agreement']:26.3f}{fam['spearman']:10.3f}{fam['cells']:7d}")
  return {"fit_seconds": t_fit, "validate_seconds": t_val, "diagnostics": agree,
          "family_vs_shuffled": families}


def _family_changes(runs, pred, real) -> dict[str, dict]:
  """Per diagnostic: real against predicted change of each family's mean final value from
  the shuffles' mean, over the (family, fragment) cells where both are defined."""
  kind = np.array([(r.header.extra.get("order_spec") or {}).get("kind", "?") for r in runs])
  shuf = kind == "shuffled"
  out = {}
  for name in DIAGNOSTIC_NAMES:
    p_d, r_d = [], []
    for k in sorted(set(kind) - {"shuffled", "?"}):
      sel = kind == k
      p_d.append(pred[name][sel].mean(0) - pred[name][shuf].mean(0))
      r_d.append(real[name][sel].mean(0) - real[name][shuf].mean(0))
    p_d, r_d = np.concatenate(p_d), np.concatenate(r_d)
    ok = np.isfinite(p_d) & np.isfinite(r_d) & (r_d != 0)
    out[name] = {"cells": int(ok.sum()),
                 "sign_agreement": float(np.mean(np.sign(p_d[ok]) == np.sign(r_d[ok])))
                 if ok.any() else float("nan"),
                 "spearman": spearman(p_d[ok], r_d[ok]) if ok.sum() > 2 else float("nan")}
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--task", choices=[*SETS, "all"], default="all")
  p.add_argument("--seeds", type=int, default=FitConfig.seeds)
  p.add_argument("--json", help="write every figure to this file")
  args = p.parse_args()
  tasks = list(SETS) if args.task == "all" else [args.task]
  out = {t: run(t, args.seeds) for t in tasks}
  if len(out) > 1:
    print(f"\nspread across the {len(out)} sets (median over fragments per set):")
    for name in DIAGNOSTIC_NAMES:
      m = [out[t]["diagnostics"][name]["median"] for t in tasks]
      print(f"  {name:<18}" + "".join(f"{t}: {x:6.3f}   " for t, x in zip(tasks, m))
            + f"predicted on {sum(out[t]['diagnostics'][name]['predicted'] for t in tasks)}"
            f" of {len(tasks)}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
