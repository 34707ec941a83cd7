"""Rank figures of surrogate variants combined (development experiments).

Reads the files `surrogate_variants.py --save DIR` wrote (one per variant and rate: each
seed's final per-fragment probe losses on the held-out orders, and the real ones), and
prints decision accuracy per fragment (overall and by real margin) and Kendall tau of orders
for each file, then for their combination: each variant's seed-mean deviations from its
mean over orders, divided by their overall sd (so no variant's loss scale dominates),
summed. The combination uses the first half of each file's seeds (two files combined cost
as many simulations as one), so each file is shown with that half and with all its seeds.
The margins' seed noise comes from the real set's re-run pairs.

  python benchmarks/surrogate_variants.py --task lm-dev --length 64 --lr-scales 3 --seeds 8 \
      --variants 'v=512;v=1024' --save out/variants
  python benchmarks/combine_variants.py --task lm-dev out/variants/*.npz
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import numpy as np
from noise_ceiling import structured_runs

from calibrate.fitting import metrics


def scaled(pred_RxF: np.ndarray) -> np.ndarray:
  dev = pred_RxF - pred_RxF.mean(0)
  return dev / dev.std()


def show(name: str, pred_RxF, real_TxRxF, seed_var_F) -> None:
  real = real_TxRxF[1]
  bands = metrics.decisions_by_margin(pred_RxF, real, seed_var_F)
  print(f"{name:48s} {metrics.decision_accuracy(pred_RxF, real):.3f}  "
        + "  ".join(f"{b['accuracy']:.3f}" for b in bands)
        + f"  {metrics.counterfactual_rank(pred_RxF, real)['kendall_tau']:6.3f}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--task", choices=["lm", "cls", "lm-dev"], required=True)
  p.add_argument("files", nargs="+", help="npz files written by surrogate_variants.py --save")
  args = p.parse_args()
  seed_var_F = structured_runs(args.task)[3]
  loaded = {os.path.basename(f)[:-4]: np.load(f) for f in args.files}
  real = next(iter(loaded.values()))["real_TxRxF"]
  for name, z in loaded.items():
    if not np.array_equal(z["real_TxRxF"], real):
      raise SystemExit(f"{name}: other held-out runs than {next(iter(loaded))}")
  print(f"{args.task}: {real.shape[1]} held-out orders; decision accuracy per fragment (all, "
        "then by real margin <1, 1-2, 2-4, >=4 noise sd), Kendall tau")
  halves = []
  for name, z in loaded.items():
    final_SxRxF = z["sur_SxTxRxF"][:, 1]
    show(f"{name} ({len(final_SxRxF)} seeds)", final_SxRxF.mean(0), real, seed_var_F)
    half = final_SxRxF[: max(1, len(final_SxRxF) // 2)]
    show(f"{name} ({len(half)} seeds)", half.mean(0), real, seed_var_F)
    halves.append(scaled(half.mean(0)))
  if len(halves) > 1:
    show(f"all {len(halves)} combined (half the seeds each)", np.sum(halves, 0), real, seed_var_F)


if __name__ == "__main__":
  main()
