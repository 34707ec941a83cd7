"""Where the predictive intervals' width comes from, and how wide they should be.

A calibrated simulator's predictive distribution of a fragment's probe mean has three
sources of spread (`calibration.Prediction`): the surrogate's seeds, the gain quantiles of
the anchored map (the gain's posterior, which is its prior when shuffles calibrate), and the
leave-one-run-out residual noise (a fragment-shared part, itself the calibration residual
plus `effect_error` x the predicted order effect, and a per-example part). This fits one
simulator on a set's four shuffles (as `benchmarks/accuracy.py` does), predicts the held-out
runs once, and prints the 80 % coverage on them with each source alone, each left out, and
the whole distribution's spread scaled by a factor, beside the sd of each source and the
prediction's RMS error (fragment probe means, every eval step after 0).

  python benchmarks/interval_width.py --task lm-dev --teacher
  python benchmarks/interval_width.py --task whatis multilingual apidocs --teacher
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import accuracy  # noqa: E402  (sets XLA_FLAGS before jax loads)

from calibrate.fitting import metrics, verdicts  # noqa: E402
from calibrate.fitting.calibration import maps_at  # noqa: E402
from calibrate.fitting.fit import FitConfig, fit  # noqa: E402
from calibrate.fitting.runs import predict_runs  # noqa: E402
from calibrate.fitting.validate import group_reruns  # noqa: E402
from calibrate.io.runlog import read_runlog  # noqa: E402
from calibrate.reference import real_tokenizer as reference_tokenizer  # noqa: E402
from surrogate.fragments import read_fragments  # noqa: E402
from surrogate.prepare import model_config_for  # noqa: E402

SOURCES = ("seeds", "gains", "residual")
LEVEL = 0.8


def components(pred, frag_M, probe_M, num_f, maps):
  """The prediction's fragment probe means split into its sources of spread.

  Returns (mean_NxCxF, seed_dev_NxSxCxF, gain_dev_NxGxCxF, loo_sd_NxCxF, effect_sd_NxCxF,
  example_sd_CxF): member deviations from the mean split additively into a seed part (each
  seed's mean over gains) and a gain part (each gain's mean over seeds), and the residual
  noise's sds at fragment level (a fragment's per-example noise averages over its probes).
  """
  members = pred.fragment_members(probe=True)                     # N K C F
  n, k, c, f = members.shape
  g = k // pred.raw_NxSxCxM.shape[1]
  members = members.reshape(n, -1, g, c, f)                       # N S G C F
  mean = np.nanmean(members, (1, 2))
  seed_dev = np.nanmean(members, 2) - mean[:, None]
  gain_dev = np.nanmean(members, 1) - mean[:, None]
  first_M = np.array([np.flatnonzero((frag_M == j) & probe_M)[0] for j in range(num_f)])
  loo_sd = np.broadcast_to(maps.fragment_sd_CxM[None][..., first_M], mean.shape)
  effect_sd = np.sqrt(np.maximum(pred.fragment_sd_NxCxM[..., first_M] ** 2 - loo_sd ** 2, 0))
  count_F = np.array([((frag_M == j) & probe_M).sum() for j in range(num_f)])
  ex_var = metrics.fragment_means(pred.example_sd_CxM ** 2, frag_M, probe_M, num_f) / count_F
  return mean, seed_dev, gain_dev, loo_sd, effect_sd, np.sqrt(ex_var)


def coverage_of(mean, seed_dev, gain_dev, noise_sd, real, use, scale=1.0, gain_scale=1.0,
                draws=64, seed=0):
  """80 % coverage of `real` by the distribution made of the sources in `use`, every member
  deviation and noise sd multiplied by `scale`, the gains' deviations also by `gain_scale`."""
  rng = np.random.default_rng(seed)
  s, g = seed_dev.shape[1], gain_dev.shape[1]
  parts = []
  for i, j in itertools.product(range(s), range(g)):
    dev = ((seed_dev[:, i] if "seeds" in use else 0)
           + (gain_scale * gain_dev[:, j] if "gains" in use else 0))
    for _ in range(draws if "residual" in use else 1):
      noise = rng.standard_normal(mean.shape) * noise_sd if "residual" in use else 0
      parts.append(mean + scale * (dev + noise))
  samples = np.stack(parts)
  lo = np.nanquantile(samples, (1 - LEVEL) / 2, axis=0)
  hi = np.nanquantile(samples, (1 + LEVEL) / 2, axis=0)
  return metrics.coverage(lo[:, 1:], hi[:, 1:], real[:, 1:])


def run(task: str, teacher: bool) -> dict:
  folder = os.path.join(accuracy.DATA, task)
  frags = read_fragments(os.path.join(folder, "fragments.jsonl"))
  runs = [read_runlog(p, frags) for p in sorted(glob.glob(os.path.join(folder, "runs", "*.jsonl")))]
  cal = [r for r in runs if r.header.run_id in accuracy.CALIBRATION["shuffles"]]
  held_all = [r for r in runs if not r.header.run_id.startswith("shuffled-")]
  reps, _ = group_reruns(held_all)
  held = [held_all[i] for i in reps]
  t0 = time.perf_counter()
  cfg = tokenizer = the_teacher = None
  if teacher:
    the_teacher = accuracy._make_teacher(task, frags)
    cfg, tokenizer = model_config_for(frags, real_tokenizer=reference_tokenizer(task))
  sim = fit(frags, cal, model_cfg=cfg, tokenizer=tokenizer, teacher=the_teacher,
            config=FitConfig(), key=accuracy._key(0), progress=False)
  t_fit = time.perf_counter() - t0
  pred = predict_runs(sim, held)
  ids, frag_M, probe_M = pred.eval_ids, pred.frag_M, pred.is_probe_M
  num_f = len(frags.names)
  probe_ids = [i for i, p in zip(ids, probe_M) if p]
  real = metrics.fragment_means(verdicts.real_losses(held, pred.steps, probe_ids),
                                frag_M[probe_M], np.ones(len(probe_ids), bool), num_f)
  maps = maps_at(sim, pred.steps, ids)
  mean, seed_dev, gain_dev, loo_sd, effect_sd, ex_sd = components(
      pred, frag_M, probe_M, num_f, maps)
  err = (mean - real)[:, 1:]
  rms = lambda x: float(np.sqrt(np.nanmean(np.square(x))))  # noqa: E731
  sds = {"seeds": rms(seed_dev[:, :, 1:]), "gains": rms(gain_dev[:, :, 1:]),
         "residual, calibration": rms(loo_sd[:, 1:]),
         "residual, effect error": rms(effect_sd[:, 1:]),
         "residual, per example": rms(np.broadcast_to(ex_sd[1:], err.shape[1:]))}
  noise_sd = np.sqrt(loo_sd ** 2 + effect_sd ** 2 + ex_sd[None] ** 2)
  cov = {}
  for r in range(1, 4):
    for use in itertools.combinations(SOURCES, r):
      cov[" + ".join(use)] = coverage_of(mean, seed_dev, gain_dev, noise_sd, real, use)
  no_effect = np.sqrt(loo_sd ** 2 + ex_sd[None] ** 2)
  cov["seeds + gains + residual without effect error"] = coverage_of(
      mean, seed_dev, gain_dev, no_effect, real, SOURCES)
  scaled = {s: coverage_of(mean, seed_dev, gain_dev, noise_sd, real, SOURCES, scale=s)
            for s in (0.4, 0.5, 0.6, 0.7, 0.8, 1.0)}
  by_gain = {s: coverage_of(mean, seed_dev, gain_dev, noise_sd, real, SOURCES, gain_scale=s)
             for s in (0.25, 0.5, 0.75)}
  total_sd = np.sqrt(np.nanmean(seed_dev ** 2, 1) + np.nanmean(gain_dev ** 2, 1) + noise_sd ** 2)
  z = err / total_sd[:, 1:]
  out = {"task": task, "teacher": teacher, "fit_seconds": t_fit,
         "gain": [sim.fit_info.gain.common_gain, sim.fit_info.gain.common_gain_sd],
         "effect_error": float(sim.calibration.effect_error), "rms_error": rms(err),
         "rms_error_final": rms(err[:, -1]), "sd": sds, "coverage": cov, "coverage_scaled": scaled,
         "coverage_gain_scaled": by_gain, "train_fidelity": sim.fit_info.train_fidelity,
         "rms_z": rms(z)}
  print(f"\n== {task}{', teacher' if teacher else ''} (fit {t_fit:.0f} s): gain "
        f"{out['gain'][0]:.2f} +- {out['gain'][1]:.2f}, effect error {out['effect_error']:.3f}")
  print(f"train fidelity {out['train_fidelity']}")
  print(f"RMS error of the mean {out['rms_error']:.4f} (final step {out['rms_error_final']:.4f});"
        f" RMS of error / predictive sd {out['rms_z']:.2f} (1 if calibrated)")
  for k, v in sds.items():
    print(f"  sd from {k:<24} {v:.4f}")
  for k, v in cov.items():
    print(f"  coverage, {k:<46} {v:.3f}")
  print("  coverage with the whole spread scaled: "
        + ", ".join(f"x{s:g} {c:.3f}" for s, c in scaled.items()))
  print("  coverage with the gains' spread alone scaled: "
        + ", ".join(f"x{s:g} {c:.3f}" for s, c in by_gain.items()))
  sys.stdout.flush()
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--task", nargs="+", default=["lm-dev"])
  p.add_argument("--teacher", action="store_true")
  p.add_argument("--both", action="store_true", help="each task with and without the teacher")
  p.add_argument("--json", help="write every figure to this file")
  a = p.parse_args()
  out = [run(t, teach) for t in a.task
         for teach in ((False, True) if a.both else (a.teacher,))]
  if a.json:
    with open(a.json, "w") as fh:
      json.dump(out, fh, indent=1)


if __name__ == "__main__":
  main()
