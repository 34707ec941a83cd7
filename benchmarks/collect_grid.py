"""Raw surrogate trajectories of every run of a reference set, for a grid of knobs and many
seeds, saved for offline analysis (which settings rank best, how many seeds are worth it).

Every (learning-rate scale x weight-decay scale, seed, run) is simulated in one vmapped job
on the first device kind available (built for a GPU: thousands of simulations in seconds).
Writes OUT/grid_{task}_L{length}.npz with `sur_KxSxRxCxF` and `sur_train_KxSxRxCxF` (the
surrogate's fragment means of probe and evaluated train losses at the runs' eval steps;
fragment means keep the files small and are what the metrics and gains use), the same of
the real runs, `diverged_KxSxR`, run ids and kinds, the knob grid.

  python benchmarks/collect_grid.py --tasks lm-dev,cls --seeds 16 --out out/grid
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]

import jax
import numpy as np

from calibrate.fitting.calibration import example_positions, is_probe
from calibrate.fitting.fit import _real_losses, simulate_knob_grid
from calibrate.fitting.metrics import fragment_means
from calibrate.io.runlog import read_runlog
from surrogate import model as model_lib
from surrogate import optim
from surrogate.datasets import python_docs_neutral
from surrogate.fragments import read_fragments
from surrogate.prepare import prepare
from surrogate.pretrain import pretrain_ensemble
from surrogate.simulate import Sharing
from surrogate.tokenize import encode_texts

DATA = os.path.join(HERE, "..", "calibrate", "reference", "data")


def collect(task: str, *, seeds: int, length: int, lr_scales, wd_scales, pretrain_steps: int,
            chunk: int, seed: int = 0) -> dict:
  folder = os.path.join(DATA, task)
  frags = read_fragments(os.path.join(folder, "fragments.jsonl"))
  runs = [read_runlog(p, frags) for p in sorted(glob.glob(os.path.join(folder, "runs", "*.jsonl")))]
  cfg = model_lib.ModelConfig(length=length)
  evaluated = set(runs[0].evals[0].losses)
  pos = example_positions(frags, list(evaluated))
  train_pos = sorted(int(p) for p in pos[~is_probe(frags, pos)])
  k_prep, k_pre = jax.random.split(jax.random.key(seed))  # as `fit` splits its key
  t0 = time.perf_counter()
  prep = prepare(frags, cfg, key=k_prep, eval_train=train_pos, diag_probes=1)
  eval_ids = prep.eval_ids()
  corpus = encode_texts(prep.tokenizer, list(python_docs_neutral()), cfg.length)
  params_S, _ = pretrain_ensemble(corpus, model_cfg=cfg, key=k_pre, seeds=seeds,
                                  steps=pretrain_steps)
  jax.block_until_ready(params_S)
  t_pre = time.perf_counter() - t0
  cands = list(itertools.product(lr_scales, wd_scales))
  opt_cfg = optim.OptimizerConfig.from_dict(runs[0].header.optimizer)
  t1 = time.perf_counter()
  # Prefix sharing goes back to the host between eval intervals: plain vmap on a GPU.
  sur, diverged = simulate_knob_grid(params_S, cands, runs, frags, prep.data, model_cfg=cfg,
                                     opt_cfg=opt_cfg, chunk_size=chunk, progress=False,
                                     sharing=Sharing.NEVER)
  t_sim = time.perf_counter() - t1
  pos = example_positions(frags, eval_ids)
  frag_M, probe_M = frags.fragment_of[pos], is_probe(frags, pos)
  num_f = len(frags.names)
  real = _real_losses(runs, eval_ids)
  print(f"{task} L{length}: {diverged.size} simulations, pretrain {t_pre:.0f} s, "
        f"simulate {t_sim:.0f} s, diverged {(diverged >= 0).sum()}", flush=True)
  return {
      "sur_KxSxRxCxF": fragment_means(sur, frag_M, probe_M, num_f),
      "sur_train_KxSxRxCxF": fragment_means(sur, frag_M, ~probe_M, num_f),
      "diverged_KxSxR": diverged,
      "real_RxCxF": fragment_means(real, frag_M, probe_M, num_f),
      "real_train_RxCxF": fragment_means(real, frag_M, ~probe_M, num_f),
      "run_ids": np.array([r.header.run_id for r in runs]),
      "kinds": np.array([str((r.header.extra.get("order_spec") or {}).get("kind")) for r in runs]),
      "fragment_names": np.array(frags.names),
      "steps_C": np.array(sorted(set(runs[0].eval_steps))),
      "lr_scale_K": np.array([c[0] for c in cands]), "wd_scale_K": np.array([c[1] for c in cands]),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tasks", default="lm-dev,cls")
  p.add_argument("--seeds", type=int, default=16)
  p.add_argument("--lengths", default="32")
  p.add_argument("--lr-scales", default="1,1.5,2,3,4")
  p.add_argument("--wd-scales", default="1,30")
  p.add_argument("--pretrain-steps", type=int, default=800)
  p.add_argument("--chunk", type=int, default=1024)
  p.add_argument("--out", required=True)
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  print("devices:", jax.devices(), flush=True)
  for length in [int(x) for x in a.lengths.split(",")]:
    for task in a.tasks.split(","):
      res = collect(task, seeds=a.seeds, length=length,
                    lr_scales=[float(x) for x in a.lr_scales.split(",")],
                    wd_scales=[float(x) for x in a.wd_scales.split(",")],
                    pretrain_steps=a.pretrain_steps, chunk=a.chunk)
      path = os.path.join(a.out, f"grid_{task}_L{length}.npz")
      np.savez_compressed(path, **res)
      print("wrote", path, os.path.getsize(path) // 1024, "KiB", flush=True)


if __name__ == "__main__":
  main()
