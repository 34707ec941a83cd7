"""The reference run set, shared by every task: which orders are run, and how one run goes.

A task (`lm`, `cls`) names its base model, its fragments file and its optimizer; this
module plans the 24 orders and fine-tunes the base on each, recording with `Recorder`
(`runs/`), and the counterfactual family (`counterfactual/`): one base shuffle that is not
a calibration run and the same order without each fragment, all of it run again with a
second training seed, so own contributions and interference are measured on real training
beside their seed noise.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

STEPS, BATCH, EVAL_EVERY, EVAL_TRAIN = 240, 16, 20, 4


@dataclasses.dataclass(frozen=True)
class Task:
  """One reference task.

  Attributes:
    out: its data folder (fragments.jsonl, base/, runs/).
    model_name: written in the RunLogs' headers.
    optimizer: the RunLog optimizer of its fine-tunes (AdamW, linear decay after warmup).
    max_length: tokens per example.
    load: `load(out) -> (model, tokenizer)`, a fresh copy of the pre-trained base.
    labels: class names for a classification task, else None.
    adapter: a `peft.LoraConfig`'s keyword arguments for a LoRA fine-tune (the base frozen),
      recorded through the Hugging Face Trainer path (`calibrate.io.hf`); None: a full
      fine-tune in a plain loop.
  """
  out: str
  model_name: str
  optimizer: dict[str, Any]
  max_length: int
  load: Callable[[str], tuple[Any, Any]]
  labels: Sequence[str] | None = None
  adapter: dict[str, Any] | None = None


def order_plan(num_fragments: int, scores: np.ndarray) -> list[tuple[str, dict, int, int]]:
  """(run_id, order spec, order seed, training seed) of every run: 4 calibration shuffles,
  16 structured held-out orders, and 4 of those again with another training seed (the noise
  ceiling: same batches, other dropout)."""
  f = num_fragments
  rng = np.random.default_rng(7)
  perms = [rng.permutation(f).tolist() for _ in range(4)]
  easy_first = np.argsort(scores).tolist()
  up = np.ones(f)
  up[easy_first[-3:]] = 4.0  # up-weight the three hardest
  down = np.ones(f)
  down[easy_first[:4]] = 0.25  # down-weight the four easiest
  leave: list[list[int]] = []
  while len(leave) < 3:  # three different subsets (few fragments make repeats likely)
    lv = sorted(rng.permutation(f)[: max(1, f // 3)].tolist())
    if lv not in leave:
      leave.append(lv)
  plan = [(f"shuffled-s{s}", {"kind": "shuffled"}, s, s) for s in range(4)]
  plan += [(f"blocked-p{i}", {"kind": "blocked", "sequence": p}, 0, 0)
           for i, p in enumerate(perms)]
  plan += [("blocked-p0-reversed", {"kind": "blocked", "sequence": perms[0][::-1]}, 0, 0),
           ("blocked-p0-twice", {"kind": "blocked", "sequence": perms[0] + perms[0]}, 0, 0)]
  plan += [("interleaved", {"kind": "interleaved", "sequence": perms[1]}, 0, 0),
           ("interleaved-rev", {"kind": "interleaved", "sequence": perms[1][::-1]}, 0, 0)]
  plan += [("curriculum-easy-hard", {"kind": "curriculum", "scores": scores.tolist()}, 0, 0),
           ("curriculum-hard-easy", {"kind": "curriculum", "scores": (-scores).tolist()}, 0, 0)]
  plan += [("mixture-up-hard", {"kind": "mixture", "weights": up.tolist()}, 0, 0),
           ("mixture-down-easy", {"kind": "mixture", "weights": down.tolist()}, 0, 0),
           ("mixture-skewed", {"kind": "mixture",
                               "weights": (1.0 + np.arange(f)[perms[2]]).tolist()}, 0, 0)]
  plan += [(f"subset-{i}", {"kind": "subset", "keep": sorted(set(range(f)) - set(lv))}, 0, 0)
           for i, lv in enumerate(leave)]
  reruns = ("blocked-p0", "interleaved", "mixture-up-hard", "subset-0")
  plan += [(f"{rid}-s1", spec, oseed, 1) for rid, spec, oseed, _ in list(plan) if rid in reruns]
  return plan


def _eval_positions(frags) -> list[int]:
  return frags.probe_indices().tolist() + [
      i for pool in frags.train_pools() for i in pool[:EVAL_TRAIN].tolist()]


def base_probe_losses(task: Task, frags) -> np.ndarray:
  """The pre-trained base's mean probe loss per fragment (the curricula's difficulty)."""
  from calibrate.io.hf import FragmentsDataset, example_losses, pad_collator
  model, tok = task.load(task.out)
  ds = FragmentsDataset(frags, tok, max_length=task.max_length, labels=task.labels)
  losses = example_losses(model, ds, frags.probe_indices().tolist(), pad_collator(tok))
  return np.array([np.mean([losses[frags.examples[i].id] for i in pool])
                   for pool in frags.probe_pools()])


def run_one(task: Task, run_id: str, spec: dict, order_seed: int, seed: int) -> str:
  """Fine-tunes the base on one order, recording it; returns the run's path.

  The log is written as `NAME.jsonl.partial` and renamed when complete, so a killed job
  leaves no half run under a final name, and a rerun skips finished runs.
  """
  import jax

  from surrogate.fragments import read_fragments
  from surrogate.orders import OrderSpec
  path = os.path.join(task.out, "runs", f"{run_id}.jsonl")
  if _done(task, path):
    return path
  frags = read_fragments(os.path.join(task.out, "fragments.jsonl"))
  order = OrderSpec.from_dict(spec).generate(frags.train_pools(), key=jax.random.key(order_seed),
                                             steps=STEPS, batch_size=BATCH)
  return _rerun_checked(path, lambda: run_order(task, run_id, order, seed, path,
                                                order_spec=spec, order_seed=order_seed))


def _records_diagnostics(task: Task) -> bool:
  """Causal LM tasks record the real model's diagnostics at every eval."""
  return task.labels is None


def _done(task: Task, path: str) -> bool:
  """Whether the run is on disk, with diagnostics where its task records them (a log made
  before they were recorded is run again: `_rerun_checked`)."""
  if not os.path.exists(path):
    return False
  if not _records_diagnostics(task):
    return True
  from calibrate.io.runlog import read_runlog
  return all(e.diagnostics is not None for e in read_runlog(path).evals)


def _rerun_checked(path: str, run: Callable[[], str]) -> str:
  """Runs `run`; when it replaces an older log of the same run, says how far the new
  losses are from the old (measured on lm: 2.4e-6, float noise of the same training)."""
  from calibrate.io.runlog import read_runlog
  old = read_runlog(path) if os.path.exists(path) else None
  out = run()
  if old is not None:
    new = read_runlog(out)
    diff = max([abs(a.loss - b.loss) for a, b in zip(old.steps, new.steps)]
               + [abs(a.losses[k] - b.losses[k]) for a, b in zip(old.evals, new.evals)
                  for k in a.losses])
    print(f"{os.path.basename(path)}: recorded again with diagnostics; largest loss change "
          f"{diff:.2e}", flush=True)
  return out


def run_order(task: Task, run_id: str, order, seed: int, path: str, **header) -> str:
  """Fine-tunes the base on an exact order [STEPS, BATCH] of example positions, recording
  it at `path` (extra header fields in `header`); returns `path`."""
  import torch
  import transformers

  from calibrate.io.diagnostics import RealDiagnostics
  from calibrate.io.hf import FragmentsDataset, example_losses, pad_collator
  from calibrate.io.recorders import Recorder
  from surrogate.fragments import read_fragments
  torch.set_num_threads(1)
  if task.adapter is not None:
    return _run_order_trainer(task, run_id, order, seed, path, **header)
  frags = read_fragments(os.path.join(task.out, "fragments.jsonl"))
  model, tok = task.load(task.out)
  torch.manual_seed(seed)
  model.train()
  ds = FragmentsDataset(frags, tok, max_length=task.max_length, labels=task.labels)
  collate = pad_collator(tok)
  evals = _eval_positions(frags)
  ids = [e.id for e in frags.examples]
  diag = RealDiagnostics(model, ds) if _records_diagnostics(task) else None

  def evaluate(rec, step):
    losses = example_losses(model, ds, evals, collate)
    rec.eval(step, losses, diagnostics=None if diag is None else diag.measure(model, losses))

  opt_cfg = task.optimizer
  opt = torch.optim.AdamW(model.parameters(), lr=opt_cfg["lr"],
                          weight_decay=opt_cfg["weight_decay"])
  sched = transformers.get_linear_schedule_with_warmup(opt, opt_cfg["warmup_steps"], STEPS)
  tmp = path + ".partial"
  t0 = time.time()
  with Recorder(tmp, frags, run_id=run_id, model=task.model_name, optimizer=opt_cfg,
                batch_size=BATCH, seed=seed, overwrite=True, **header) as rec:
    evaluate(rec, 0)
    for t in range(STEPS):
      batch = collate([ds[i] for i in order[t]])
      lr = sched.get_last_lr()[0]
      loss = model(**batch).loss
      opt.zero_grad()
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg["grad_clip"])
      opt.step()
      sched.step()
      rec.step([ids[i] for i in order[t]], loss.detach(), lr)
      if (t + 1) % EVAL_EVERY == 0:
        evaluate(rec, t + 1)
  os.replace(tmp, path)
  print(f"{run_id}: {time.time() - t0:.1f} s", flush=True)
  return path


def _run_order_trainer(task: Task, run_id: str, order, seed: int, path: str, **header) -> str:
  """`run_order` for a LoRA task: `peft` adapters on the frozen base, trained by the Hugging
  Face Trainer (`OrderedTrainer`) and recorded by `RunLogCallback`, which reads the header
  (optimizer, schedule, clipping, adapter) from the trainer itself."""
  import peft
  import torch
  import transformers

  from calibrate.io.hf import FragmentsDataset, OrderedTrainer, RunLogCallback, pad_collator
  from surrogate.fragments import read_fragments
  frags = read_fragments(os.path.join(task.out, "fragments.jsonl"))
  base, tok = task.load(task.out)
  torch.manual_seed(seed)  # the adapters' initialisation
  model = peft.get_peft_model(base, peft.LoraConfig(**task.adapter))
  opt = task.optimizer
  args = transformers.TrainingArguments(
      output_dir=os.path.join(task.out, ".trainer", run_id), per_device_train_batch_size=BATCH,
      max_steps=STEPS, learning_rate=opt["lr"], weight_decay=opt["weight_decay"],
      warmup_steps=opt["warmup_steps"], lr_scheduler_type=opt["schedule"],
      max_grad_norm=opt["grad_clip"], optim="adamw_torch", logging_steps=1,
      save_strategy="no", report_to=[], seed=seed, use_cpu=True, disable_tqdm=True)
  ds = FragmentsDataset(frags, tok, max_length=task.max_length, labels=task.labels)
  trainer = OrderedTrainer(order, model=model, args=args, train_dataset=ds,
                           data_collator=pad_collator(tok))
  trainer.remove_callback(transformers.PrinterCallback)
  tmp = path + ".partial"
  trainer.add_callback(RunLogCallback(trainer, tmp, run_id=run_id, model=task.model_name,
                                      eval_every=EVAL_EVERY, eval_train=EVAL_TRAIN,
                                      diagnostics=4 if _records_diagnostics(task) else None,
                                      report=False, overwrite=True, **header))
  t0 = time.time()
  trainer.train()
  os.replace(tmp, path)
  print(f"{run_id}: {time.time() - t0:.1f} s", flush=True)
  return path


CF_BASE, CF_ORDER_SEED = "cf-base", 100  # order seeds 0-3 are the calibration shuffles


def counterfactual_plan(frags) -> list[tuple[str, np.ndarray, int, dict]]:
  """(run_id, order [STEPS, BATCH], training seed, extra header) of the counterfactual
  family: `cf-base` (a shuffle drawn with order seed 100), `cf-without-<fragment>` for every
  fragment (`orders.without_fragment` of the base order, replacements drawn with key
  100 + 1 + f), and each of them again with training seed 1 (`...-s1`: same batches)."""
  import jax

  from surrogate import orders
  pools = frags.train_pools()
  base = orders.OrderSpec(kind="shuffled").generate(
      pools, key=jax.random.key(CF_ORDER_SEED), steps=STEPS, batch_size=BATCH)
  family = [(CF_BASE, base, {"order_spec": {"kind": "shuffled"}, "order_seed": CF_ORDER_SEED})]
  for f, name in enumerate(frags.names):
    without = orders.without_fragment(base, pools, f, key=jax.random.key(CF_ORDER_SEED + 1 + f))
    family.append((f"cf-without-{_slug(name)}", without,
                   {"counterfactual_of": {"base": CF_BASE, "without": name}}))
  plan = [(rid, order, 0, header) for rid, order, header in family]
  for rid, order, header in family:
    header = dict(header)
    if "counterfactual_of" in header:
      header["counterfactual_of"] = {**header["counterfactual_of"], "base": f"{CF_BASE}-s1"}
    plan.append((f"{rid}-s1", order, 1, header))
  return plan


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _run_planned(task: Task, run_id: str, order: np.ndarray, seed: int, header: dict) -> str:
  path = os.path.join(task.out, "counterfactual", f"{run_id}.jsonl")
  if _done(task, path):
    return path
  return _rerun_checked(path, lambda: run_order(task, run_id, order, seed, path, **header))


def _pool(workers: int) -> ProcessPoolExecutor:
  """Worker processes started fresh ("spawn"): the counterfactual plan draws its orders with
  JAX in this process, and a forked child that then uses JAX (the real diagnostics do)
  deadlocks on the parent's threads; it hung there on 2026-12-02."""
  return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def run_counterfactuals(task: Task, workers: int = 2) -> None:
  """Runs every run of `counterfactual_plan` not yet in `task.out/counterfactual`."""
  from surrogate.fragments import read_fragments
  frags = read_fragments(os.path.join(task.out, "fragments.jsonl"))
  plan = counterfactual_plan(frags)
  os.makedirs(os.path.join(task.out, "counterfactual"), exist_ok=True)
  t0 = time.time()
  with _pool(workers) as pool:
    list(pool.map(_run_planned, *zip(*[(task, *run) for run in plan])))
  print(f"{len(plan)} runs in {task.out}/counterfactual ({time.time() - t0:.0f} s)")


def run_all(task: Task, workers: int = 2) -> None:
  """Plans the orders from the base's probe losses and runs every one not yet on disk."""
  from surrogate.fragments import read_fragments
  frags = read_fragments(os.path.join(task.out, "fragments.jsonl"))
  plan = order_plan(len(frags.names), base_probe_losses(task, frags))
  os.makedirs(os.path.join(task.out, "runs"), exist_ok=True)
  t0 = time.time()
  with _pool(workers) as pool:
    list(pool.map(run_one, *zip(*[(task, *run) for run in plan])))
  print(f"{len(plan)} runs in {task.out}/runs ({time.time() - t0:.0f} s)")
