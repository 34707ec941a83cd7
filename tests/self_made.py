"""A small world whose truth is known: runs made by the surrogate itself with a learning rate
2x the logged one, on four topics of Python's manual. Shared by the calibration and answer
tests (built once per session by the `world` and `sim` fixtures in conftest.py)."""

import dataclasses

import jax
import numpy as np

from calibrate.fitting.fit import FitConfig, fit
from calibrate.io.simulated import simulate_runs
from calibrate.io.runlog import RunHeader, RunLog, StepRecord
from surrogate import model as model_lib
from surrogate import optim, orders
from surrogate.datasets import python_docs, python_docs_neutral
from surrogate.prepare import prepare
from surrogate.pretrain import pretrain_ensemble
from surrogate.tokenize import encode_texts

# Distinct sizes: F=4 fragments, T=30 steps, B=4, L=12, D=16, evals every 10 steps, S=2 seeds.
CFG = model_lib.ModelConfig(vocab_size=300, length=12, width=16, depth=2, heads=2, mlp_ratio=2)
OPT = {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01, "warmup_steps": 2, "schedule": "linear"}
T, B, EVERY, SEED, TRUE_LR_SCALE = 30, 4, 10, 3, 2.0
CONFIG = FitConfig(seeds=2, pretrain_steps=60, lr_scales=(0.5, 1.0, 2.0))
NEUTRAL = python_docs_neutral()[:300]


def order_file(frags, run_id, order_TxB):
  ids = [e.id for e in frags.examples]
  header = RunHeader(run_id=run_id, dataset_sha256=frags.sha256, model="order", optimizer=OPT,
                     batch_size=B, seed=0)
  steps = [StepRecord(t, tuple(ids[i] for i in row if i >= 0)) for t, row in enumerate(order_TxB)]
  return RunLog(header, tuple(steps), ())


def make_world():
  """(fragments, runs): six runs of the truth, evaluated every 10 steps."""
  frags = python_docs(("try", "import", "async", "naming"), max_train=12, max_probe=4)
  pools = frags.train_pools()
  k = jax.random.key(0)
  specs = {"shuffled-a": orders.OrderSpec(orders.OrderKind.SHUFFLED),
           "blocked-a": orders.OrderSpec(orders.OrderKind.BLOCKED, sequence=[0, 1, 2, 3]),
           "shuffled-b": orders.OrderSpec(orders.OrderKind.SHUFFLED),
           "blocked-b": orders.OrderSpec(orders.OrderKind.BLOCKED, sequence=[3, 2, 1, 0]),
           "subset-a": orders.OrderSpec(orders.OrderKind.SUBSET, keep=[0, 1]),
           "interleaved-a": orders.OrderSpec(orders.OrderKind.INTERLEAVED, sequence=[2, 0, 3, 1])}
  files = [order_file(frags, rid, spec.generate(pools, key=jax.random.fold_in(k, n), steps=T,
                                                batch_size=B))
           for n, (rid, spec) in enumerate(specs.items())]
  # The same pre-trained seed 0 that `fit(key=jax.random.key(SEED))` builds, so the truth is in its ensemble.
  k_prep, k_pre = jax.random.split(jax.random.key(SEED))
  prep = prepare(frags, CFG, key=k_prep, eval_train=2, diag_probes=1)
  corpus = encode_texts(prep.tokenizer, NEUTRAL, CFG.length)
  params_S, _ = pretrain_ensemble(corpus, model_cfg=CFG, key=k_pre, seeds=CONFIG.seeds,
                                  steps=CONFIG.pretrain_steps)
  truth = jax.tree.map(lambda a: a[0], params_S)
  knobs = optim.Knobs(np.float32(TRUE_LR_SCALE), np.float32(1.0))
  runs = simulate_runs(prep, truth, files, knobs=knobs, default_every=EVERY, progress=False)
  # Logged learning rates would carry the true scale; a user's log says what was configured.
  runs = [dataclasses.replace(r, steps=tuple(dataclasses.replace(s, lr=None) for s in r.steps))
          for r in runs]
  return frags, runs


def make_sim(world):
  frags, runs = world
  return fit(frags, runs[:3], model_cfg=CFG, config=CONFIG, key=jax.random.key(SEED),
             neutral_texts=NEUTRAL, progress=False)
