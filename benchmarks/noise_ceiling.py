"""The noise ceiling of per-fragment decision accuracy on each committed real run set.

`validate` measures the ceiling on the pairs of re-run orders (two real seeds of each): on
the reference sets, 4 orders, 6 pairs. Those may differ more than most pairs. This prints,
from the real runs alone, that measured ceiling beside an estimate for all pairs of the 16
held-out structured orders (`calibrate.fitting.metrics.expected_seed_agreement`: each fragment's
seed variance from the re-runs, the pairs' differences deconvolved from it), the seed sd
of a fragment's final probe loss, and the share of decisions whose real difference is
smaller than twice the seed sd of a difference.

  python benchmarks/noise_ceiling.py
"""

from __future__ import annotations

import glob
import itertools
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]

import numpy as np

from calibrate.fitting import metrics
from calibrate.io.runlog import read_runlog
from calibrate.fitting.validate import group_reruns
from surrogate.fragments import read_fragments

DATA = os.path.join(HERE, "..", "calibrate", "reference", "data")


def final_probe_means(runs, frags) -> np.ndarray:
  """[R, F] mean probe loss of each fragment at each run's last eval."""
  probes = [frags.examples[i].id for i in frags.probe_indices()]
  frag_M = frags.fragment_of[frags.probe_indices()]
  out = []
  for r in runs:
    last = max(r.evals, key=lambda e: e.step).losses
    x = np.array([last[i] for i in probes])
    out.append([x[frag_M == f].mean() for f in range(len(frags.names))])
  return np.array(out)


def structured_runs(task: str):
  """A set's runs other than the shuffles -> (final probe means R x F, representatives,
  re-run pairs, seed variance F from those pairs), as `group_reruns` pairs them."""
  folder = os.path.join(DATA, task)
  frags = read_fragments(os.path.join(folder, "fragments.jsonl"))
  runs = [read_runlog(p, frags) for p in sorted(glob.glob(os.path.join(folder, "runs", "*.jsonl")))
          if not os.path.basename(p).startswith("shuffled-")]
  reps, pairs = group_reruns(runs)
  final = final_probe_means(runs, frags)
  seed_var = np.mean((final[[b for _, b in pairs]] - final[[a for a, _ in pairs]]) ** 2, 0) / 2
  return final, reps, pairs, seed_var


def main() -> None:
  for task in ("lm", "lm-dev", "cls"):
    final, reps, pairs, seed_var = structured_runs(task)
    first, again = final[[a for a, _ in pairs]], final[[b for _, b in pairs]]
    held = final[reps]
    measured = metrics.decision_accuracy(again, first,
                                         list(itertools.combinations(range(len(pairs)), 2)))
    estimate = metrics.expected_seed_agreement(held, seed_var)
    diffs = np.array([held[a] - held[b] for a, b in itertools.combinations(range(len(reps)), 2)])
    close = float(np.mean(np.abs(diffs) < 2 * np.sqrt(2 * seed_var)))
    print(f"{task:7} {len(reps)} orders, {len(pairs)} re-run: ceiling on the re-run pairs "
          f"{measured:.3f}; estimated over all pairs {estimate:.3f}; seed sd "
          f"{np.sqrt(seed_var).mean():.4f} nats (mean over fragments); decisions within 2 sd "
          f"{close:.3f}")


if __name__ == "__main__":
  main()
