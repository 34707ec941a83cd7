"""Rank figures of surrogate variants on a committed real run set (development experiments).

Simulates every run of the set with S pre-trained seeds for each learning-rate scale, then
scores the seed-mean surrogate's final per-fragment probe losses against the real ones on
the held-out structured orders (the shuffles and seed re-runs are left out): decision
accuracy per fragment, Kendall tau of orders, AUROC of "better than the median order"
(DESIGN.md's metrics; the anchored map cannot change these ranks, so no calibration is
needed). With `--subsample`, also the figures for 1, 2, 4, ... of the S seeds (mean of 20
random draws). These guided the defaults on the classification (development) set.

  python benchmarks/surrogate_variants.py --task cls --lr-scales 1,2
  python benchmarks/surrogate_variants.py --task cls --width 64 --lr-scales 2
  python benchmarks/surrogate_variants.py --task cls --seeds 8 --lr-scales 2 --subsample
  python benchmarks/surrogate_variants.py --task cls --variants 'w=32;w=64,p=3000' --chunk 256
  python benchmarks/surrogate_variants.py --task lm-dev --length 64 --lr-scales 3 \
      --variants 'v=512;v=1024;c=1' --save out/variants  # then combine_variants.py
"""

from __future__ import annotations

import argparse
import glob
import os
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={len(os.sched_getaffinity(0))}").strip()

import jax
import jax.numpy as jnp
import numpy as np

from calibrate.fitting import metrics
from calibrate.reference import real_tokenizer as reference_tokenizer
from calibrate.io.runlog import learning_rates_from_runlog, order_from_runlog, read_runlog
from surrogate import model as model_lib
from surrogate import optim
from surrogate.datasets import python_docs_neutral
from surrogate.fragments import Split, read_fragments
from surrogate.prepare import model_config_for, prepare
from surrogate.pretrain import pretrain_ensemble
from surrogate.simulate import OrderAxes, SimPlan, simulate_many
from surrogate.tokenize import encode_texts

DATA = os.path.join(os.path.dirname(__file__), "..", "calibrate", "reference", "data")


def scores(pred_RxF, real_RxF):
  drop = lambda x0, x: (x0 - x) / x0
  return (metrics.decision_accuracy(pred_RxF[1], real_RxF[1]),
          metrics.counterfactual_rank(pred_RxF[1], real_RxF[1])["kendall_tau"],
          metrics.better_than_median_auroc(drop(pred_RxF[0], pred_RxF[1]),
                                           drop(real_RxF[0], real_RxF[1])))


def _variant(text: str) -> dict:
  """'w=64,l=32,h=2,p=800,v=512,c=0' -> width, length, heads, pre-training steps, vocabulary,
  pre-training corpus (0: `python_docs_neutral`, fit's default; 1: the LM sets' real base
  model's own corpus, man pages and all of `pydoc_data`; 2: 0 plus the set's own train
  texts; 3: 0 plus text like the fine-tune's that is not it: the other LM set's texts, or for
  cls 25 more WordNet definitions of each category, without labels; 4: as 3, a fifth of it),
  and t=1 for the real model's own tokenizer (`model_config_for(real_tokenizer=...)`: the
  LM sets' base BPE, cls's MiniLM WordPiece) instead of a BPE of the fragments (v unused)."""
  names = {"w": "width", "l": "length", "h": "heads", "p": "pretrain_steps", "v": "vocab",
           "c": "corpus", "t": "real_tokenizer"}
  out = {}
  for part in filter(None, text.split(",")):
    k, _, v = part.partition("=")
    if k not in names:
      raise SystemExit(f"--variants: unknown key {k!r} in {text!r}; use {sorted(names)}")
    out[names[k]] = int(v)
  return out


def _pretraining_text(corpus: int, task: str, frags) -> list[str]:
  """The pre-training text of a variant's `c=` (see `_variant`)."""
  if corpus == 1:
    from calibrate.reference.lm import corpus_texts
    return corpus_texts()
  texts = python_docs_neutral()
  if corpus == 2:
    texts += frags.texts_for_tokenizer(Split.TRAIN)
  elif corpus in (3, 4) and task == "cls":
    from calibrate.reference import cls
    used = cls.N_TRAIN + cls.N_PROBE
    texts += [d for defs in cls._definitions().values()
              for d in defs[used:used + (25 if corpus == 3 else 5)]]
  elif corpus in (3, 4):
    other = {"lm": "lm-dev", "lm-dev": "lm"}[task]
    more = read_fragments(os.path.join(DATA, other, "fragments.jsonl")).texts_for_tokenizer()
    texts += more if corpus == 3 else more[::5]
  return texts


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--task", choices=["lm", "cls", "lm-dev"], default="cls")
  p.add_argument("--seeds", type=int, default=4)
  p.add_argument("--lr-scales", default="2", help="learning-rate scales (fit's default: 2)")
  p.add_argument("--width", type=int, default=32)
  p.add_argument("--length", type=int, default=32)
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--pretrain-steps", type=int, default=800)
  p.add_argument("--vocab", type=int, default=512, help="BPE vocabulary size")
  p.add_argument("--variants", help="several surrogates in one run, ';'-separated, each like "
                 "'w=64,l=32,h=2,p=800' (unnamed fields: the flags above)")
  p.add_argument("--chunk", type=int, help="orders per compiled call (default: the library's)")
  p.add_argument("--subsample", action="store_true")
  p.add_argument("--save", metavar="DIR", help="also write each variant's seed-by-seed final "
                 "fragment probe losses (and the real ones) to DIR/<variant>-x<scale>.npz, "
                 "for combining variants afterwards")
  args = p.parse_args()
  folder = os.path.join(DATA, args.task)
  frags = read_fragments(os.path.join(folder, "fragments.jsonl"))
  runs = [read_runlog(f, frags) for f in sorted(glob.glob(os.path.join(folder, "runs", "*.jsonl")))]
  runs = [r for r in runs if not r.header.run_id.startswith("shuffled-")
          and not r.header.run_id.endswith("-s1")]
  base = {"width": args.width, "length": args.length, "heads": args.heads,
          "pretrain_steps": args.pretrain_steps, "vocab": args.vocab}
  variants = [{**base, **_variant(v)} for v in args.variants.split(";")] if args.variants else [base]
  for v in variants:
    evaluate(frags, runs, task=args.task, seeds=args.seeds, lr_scales=args.lr_scales,
             chunk=args.chunk, subsample=args.subsample, save=args.save, **v)


def evaluate(frags, runs, *, task: str, width: int, length: int, heads: int, pretrain_steps: int,
             seeds: int, lr_scales: str, chunk: int | None, subsample: bool,
             vocab: int = 512, corpus: int = 0, real_tokenizer: int = 0,
             save: str | None = None) -> None:
  """Prints the rank figures of one surrogate shape at each learning-rate scale."""
  t0 = time.perf_counter()
  texts = _pretraining_text(corpus, task, frags)
  if real_tokenizer:
    cfg, tokenizer = model_config_for(frags, length=length,
                                      real_tokenizer=reference_tokenizer(task),
                                      neutral_texts=texts, width=width, heads=heads)
  else:
    cfg, tokenizer = model_lib.ModelConfig(vocab_size=vocab, width=width, length=length,
                                           heads=heads), None
  probes = frags.probe_indices()
  prep = prepare(frags, cfg, key=jax.random.key(0), eval_train=[int(probes[0])], diag_probes=1,
                 tokenizer=tokenizer)
  ids = prep.eval_ids()
  frag_M = frags.fragment_of[[frags.index[i] for i in ids]]
  probe_M = frags.split_of[[frags.index[i] for i in ids]] == 1
  num_f = len(frags.names)
  params_S, _ = pretrain_ensemble(encode_texts(prep.tokenizer, texts, cfg.length), model_cfg=cfg,
                                  key=jax.random.key(1), seeds=seeds, steps=pretrain_steps)
  opt = optim.OptimizerConfig.from_dict(runs[0].header.optimizer)
  orders = np.stack([order_from_runlog(r, frags) for r in runs])
  lrs = np.stack([learning_rates_from_runlog(r) for r in runs])
  t = runs[0].num_steps
  real = np.array([[[ev.losses[i] for i in ids] for ev in (r.evals[0], r.evals[-1])] for r in runs])
  real_f = np.moveaxis(metrics.fragment_means(real, frag_M, probe_M, num_f), 1, 0)
  n_s, n_r = seeds, len(runs)
  sel_s, sel_r = np.repeat(np.arange(n_s), n_r), np.tile(np.arange(n_r), n_s)
  print(f"\n{task}: {n_r} held-out orders, surrogate {cfg.depth}x{cfg.width}, {cfg.heads} heads, "
        f"{cfg.length} tokens, vocabulary {cfg.vocab_size}, {n_s} seeds pre-trained "
        f"{pretrain_steps} steps on corpus {corpus}", flush=True)
  print("lr_scale  decision_accuracy  kendall_tau  auroc  diverged  seconds")
  for lr_scale in (float(x) for x in lr_scales.split(",")):
    knobs = optim.Knobs(jnp.float32(lr_scale), jnp.float32(1.0))
    traj = simulate_many(jax.tree.map(lambda a: np.asarray(a)[sel_s], params_S), knobs,
                         orders[sel_r], lrs[sel_r], prep.data, model_cfg=cfg, opt_cfg=opt,
                         plan=SimPlan(eval_every=t, diagnostics=False), chunk_size=chunk,
                         progress=False, axes=OrderAxes(params=0, knobs=None))
    sur = traj.eval_loss_CxM[:, [0, -1]].reshape(n_s, n_r, 2, -1)
    sur_f = np.moveaxis(metrics.fragment_means(sur, frag_M, probe_M, num_f), 2, 1)  # S 2 R F
    d, tau, auc = scores(sur_f.mean(0), real_f)
    if save:
      os.makedirs(save, exist_ok=True)
      name = (f"w{width}-l{length}-h{heads}-p{pretrain_steps}-v{cfg.vocab_size}-c{corpus}"
              f"-t{real_tokenizer}-s{seeds}-x{lr_scale:g}")
      np.savez(os.path.join(save, name + ".npz"), sur_SxTxRxF=sur_f, real_TxRxF=real_f,
               run_ids=np.array([r.header.run_id for r in runs]))
    print(f"{lr_scale:8g}  {d:17.3f}  {tau:11.3f}  {auc:5.3f}  "
          f"{int((traj.diverged_step >= 0).sum()):8d}  {time.perf_counter() - t0:7.0f}", flush=True)
    if subsample:
      rng = np.random.default_rng(0)
      k = 1
      while k <= n_s:
        draws = [scores(sur_f[rng.choice(n_s, k, replace=False)].mean(0), real_f)
                 for _ in range(20)]
        m = np.mean(draws, 0)
        print(f"   {k} seeds: decision {m[0]:.3f}, tau {m[1]:.3f}, auroc {m[2]:.3f}", flush=True)
        k *= 2


if __name__ == "__main__":
  main()
