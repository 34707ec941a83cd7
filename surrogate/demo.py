"""`surrogate demo`: simulate hundreds of feeding orders of the bundled data set, and summarise.

The bundled data set is built from Python's own reference manual (`pydoc_data`, shipped with
CPython): 17 topics are the fragments. The demo draws orders from every family (shuffled,
blocked, interleaved, mixture, curriculum, subset), trains the surrogate on each, and prints
per fragment how far its probe loss falls and which family of orders serves it best.
"""

from __future__ import annotations

import io
import json
import os
import time

import jax
import numpy as np

from surrogate import model as model_lib
from surrogate import optim, orders
from surrogate.datasets import python_docs, python_docs_neutral
from surrogate.jsonl import atomic_write
from surrogate.prepare import prepare
from surrogate.pretrain import pretrain
from surrogate.simulate import SimPlan, simulate_many
from surrogate.tokenize import encode_texts

def run_demo(n_orders: int = 256, out: str = "surrogate-demo", seed: int = 0,
             steps: int = 200, batch_size: int = 16) -> int:
  """Runs the demo; prints a fragment table; writes `summary.json` and `trajectories.npz`."""
  t_start = time.perf_counter()
  frags = python_docs()
  cfg = model_lib.ModelConfig()
  opt = optim.OptimizerConfig(lr=1e-3, weight_decay=0.01, warmup_steps=20, schedule="linear")
  key = jax.random.key(seed)
  k_prep, k_init, k_pre, k_orders = jax.random.split(key, 4)
  prep = prepare(frags, cfg, key=k_prep)
  # Start from a surrogate that already knows related text, as a real pretrained model
  # does: the manual's other topics, never the fragments' own.
  corpus = encode_texts(prep.tokenizer, python_docs_neutral(), cfg.length)
  params0, pre_loss = pretrain(model_lib.init_params(k_init, cfg), corpus, model_cfg=cfg,
                               key=k_pre)
  num_f, pools = len(frags.names), frags.train_pools()
  specs, order_list = [], []
  for n, k in enumerate(jax.random.split(k_orders, n_orders)):
    ks, kg = jax.random.split(k)
    spec = orders.random_spec(orders.FAMILIES[n % len(orders.FAMILIES)], num_f, key=ks)
    specs.append(spec)
    order_list.append(spec.generate(pools, key=kg, steps=steps, batch_size=batch_size))
  print(f"data: {len(frags.examples)} examples in {num_f} fragments (Python reference manual); "
        f"surrogate {cfg.depth}x{cfg.width}, {cfg.length} tokens, vocab {cfg.vocab_size}; "
        f"{n_orders} orders x {steps} steps x {batch_size}")
  print(f"pre-trained {len(pre_loss)} steps on {len(corpus.tokens_ExL1)} paragraphs of the "
        f"manual's other topics (loss {float(pre_loss[:20].mean()):.2f} -> "
        f"{float(pre_loss[-20:].mean()):.2f})")
  plan = SimPlan(eval_every=25, diagnostics=True)
  t_sim = time.perf_counter()
  traj = simulate_many(params0, optim.Knobs.identity(), np.stack(order_list),
                       optim.learning_rates(opt, steps), prep.data, model_cfg=cfg, opt_cfg=opt,
                       plan=plan)
  sim_seconds = time.perf_counter() - t_sim
  probe_NxCxF = traj.eval_loss_CxM @ np.asarray(prep.data.probe_weight_FxM).T
  start_F, final_NxF = probe_NxCxF[0, 0], probe_NxCxF[:, -1]
  fams = np.array([s.kind.value for s in specs])
  print(f"\n{'fragment':<18}{'start':>7}{'final mean':>11}{'best':>7}{'worst':>7}  best family")
  rows = []
  for f, name in enumerate(frags.names):
    by_family = {fam: float(np.nanmean(final_NxF[fams == fam, f])) for fam in orders.FAMILIES
                 if (fams == fam).any()}
    best_family = min(by_family, key=by_family.get)
    rows.append({"fragment": name, "start_probe_loss": float(start_F[f]),
                 "final_probe_loss_mean": float(np.nanmean(final_NxF[:, f])),
                 "final_probe_loss_by_family": by_family, "best_family": best_family})
    print(f"{name:<18}{start_F[f]:7.3f}{np.nanmean(final_NxF[:, f]):11.3f}"
          f"{np.nanmin(final_NxF[:, f]):7.3f}{np.nanmax(final_NxF[:, f]):7.3f}  {best_family}")
  mean_final_N = np.nanmean(final_NxF, axis=1)
  best = int(np.nanargmin(mean_final_N))
  diverged = int((traj.diverged_step >= 0).sum())
  print(f"\nbest order: #{best} {json.dumps(specs[best].to_dict())} "
        f"(mean final probe loss {mean_final_N[best]:.3f}; median order "
        f"{np.nanmedian(mean_final_N):.3f})")
  if diverged:
    print(f"{diverged} simulated runs diverged and are reported as NaN")
  per_order = sim_seconds / n_orders
  print(f"simulated {n_orders} orders in {sim_seconds:.1f} s ({per_order:.3f} s per order, "
        f"compilation included); total {time.perf_counter() - t_start:.1f} s")
  os.makedirs(out, exist_ok=True)
  summary = {"fragments": rows, "best_order": specs[best].to_dict(), "n_orders": n_orders,
             "seconds_per_order": per_order, "diverged": diverged,
             "orders": [s.to_dict() for s in specs]}
  atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=1).encode())
  buf = io.BytesIO()
  np.savez_compressed(buf, eval_loss_NxCxM=traj.eval_loss_CxM, train_loss_NxT=traj.train_loss_T,
                      diverged_step_N=traj.diverged_step,
                      checkpoint_steps_C=plan.checkpoint_steps(steps))
  atomic_write(os.path.join(out, "trajectories.npz"), buf.getvalue())
  print(f"wrote {out}/summary.json and {out}/trajectories.npz")
  return 0
