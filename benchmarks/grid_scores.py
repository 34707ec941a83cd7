"""Calibrated accuracy figures from `collect_grid.py`'s trajectories, per knob and seed group.

For each grid file, plan (`shuffles`: calibrate on the 4 shuffled runs; `mixed`: 2 shuffles
and 2 structured runs, as `accuracy.py`) and knob, the anchored gain is fitted exactly as
`calibrate.fitting.fit` fits it (`fit_gains`, the default gain prior) and the held-out orders are
scored as `calibrate.fitting.validate` scores them: trajectory MSE ratio to the order-agnostic mean,
Kendall tau of orders, per-fragment and order decision accuracy, AUROC. Each figure is the
mean +- sd over disjoint groups of `--group` seeds (the default ensemble's size), then the
figure for all seeds together; the common gain the plan's runs give is printed too.

  python benchmarks/grid_scores.py out/grid/grid_lm-dev_L64.npz out/grid/grid_cls_L32.npz
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]

import numpy as np
from accuracy import CALIBRATION, DATA

from calibrate.fitting.fit import FitConfig, fit_gains
from calibrate.io.runlog import read_runlog
from calibrate.fitting.validate import _scores, group_reruns
from surrogate.fragments import read_fragments

NAMES = ("mse_ratio", "tau", "decisions", "orders", "auroc")


def split(run_ids, runs, plan: str) -> tuple[list[int], list[int]]:
  """Calibration runs and one held-out run per distinct order (re-runs left out)."""
  cal = [i for i, r in enumerate(run_ids) if r in CALIBRATION[plan]]
  held = [i for i, r in enumerate(run_ids)
          if r not in CALIBRATION[plan] and not r.startswith("shuffled-")]
  reps, _ = group_reruns([runs[i] for i in held])
  return cal, [held[i] for i in reps]


def scores(real_RxCxF, sur_SxRxCxF, cal, held, config: FitConfig) -> tuple[list[float], float]:
  """The five figures of the anchored-gain prediction of `held`, and the common gain."""
  gains = fit_gains(real_RxCxF[cal], sur_SxRxCxF[:, cal], config)
  gain_F = gains.gain_F
  anchor = real_RxCxF[cal].mean(0)
  dev = sur_SxRxCxF[:, held].mean(0) - sur_SxRxCxF[:, cal].mean((0, 1))
  real = real_RxCxF[held]
  base = float(np.mean((anchor[None, 1:] - real[:, 1:]) ** 2))
  s = _scores(anchor + gain_F * dev, real, base)
  figures = [s["trajectory_mse_ratio"], s["kendall_tau"], s["decision_accuracy"],
             s["order_decision_accuracy"], s["auroc_better_than_median"]]
  return figures, gains.common.common_gain


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("files", nargs="+", help="grid_{task}_L{length}.npz files")
  p.add_argument("--group", type=int, default=FitConfig.seeds, help="seeds per group")
  p.add_argument("--gain-prior", type=float, default=FitConfig.gain_prior)
  a = p.parse_args()
  config = FitConfig(gain_prior=a.gain_prior)
  for path in a.files:
    z = np.load(path)
    task = os.path.basename(path).split("_")[1]
    folder = os.path.join(DATA, task)
    frags = read_fragments(os.path.join(folder, "fragments.jsonl"))
    runs = [read_runlog(f, frags) for f in sorted(glob.glob(os.path.join(folder, "runs", "*.jsonl")))]
    run_ids = [r.header.run_id for r in runs]
    if run_ids != list(z["run_ids"]):
      raise SystemExit(f"{path}: its runs are not those of {folder}")
    real = z["real_RxCxF"].astype(np.float64)
    sur_K = z["sur_KxSxRxCxF"].astype(np.float64)
    n_groups = sur_K.shape[1] // a.group
    for plan in CALIBRATION:
      cal, held = split(run_ids, runs, plan)
      print(f"\n== {os.path.basename(path)}, plan {plan}: {len(held)} held-out orders; "
            f"mean +- sd over {n_groups} groups of {a.group} seeds | all {sur_K.shape[1]} seeds")
      for k in range(sur_K.shape[0]):
        groups = [scores(real, sur_K[k, g * a.group:(g + 1) * a.group], cal, held, config)
                  for g in range(n_groups)]
        figs = np.array([f for f, _ in groups])
        every, _ = scores(real, sur_K[k], cal, held, config)
        gain = np.mean([g for _, g in groups])
        print(f"lr x{z['lr_scale_K'][k]:g} wd x{z['wd_scale_K'][k]:g}  gain {gain:.2f}  " + "  ".join(
            f"{n} {m:.3f}+-{s:.3f}|{v:.3f}" for n, m, s, v in
            zip(NAMES, figs.mean(0), figs.std(0), every)))


if __name__ == "__main__":
  main()
