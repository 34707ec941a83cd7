"""From Hugging Face Trainer runs to a pre-screening report (docs/tutorial.md, end to end).

Records four real fine-tunes of the bundled small GPT-2 (`calibrate/reference/data/lm/base`,
pre-trained offline on man pages) with the Hugging Face Trainer (`OrderedTrainer` and
`RunLogCallback`), calibrates the simulator on them, screens orders, searches the best one, picks the next real
run and writes the report. Needs the torch extra: `pip install -e ".[torch]"`.

    python examples/hf_trainer_to_report.py --out tutorial-out

About 10 minutes on a 2-core CPU: 4 real runs (one thread each, two at a time), then the
calibration, a 128-run screen, a search of 16 orders, next-run and the report.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor

DATA = os.path.join(os.path.dirname(__file__), "..", "calibrate", "reference", "data", "lm")
OPTIMIZER = {"name": "adamw", "lr": 5e-4, "weight_decay": 0.01, "warmup_steps": 20,
             "schedule": "linear", "grad_clip": 1.0}
STEPS, BATCH = 240, 16
# Two shuffles and two structured orders: structured runs pin the size of order effects.
RUNS = {"shuffled-a": ({"kind": "shuffled"}, 0), "shuffled-b": ({"kind": "shuffled"}, 1),
        "blocked": ({"kind": "blocked", "sequence": [3, 1, 4, 0, 5, 9, 2, 6, 8, 7, 11, 10]}, 0),
        "subset": ({"kind": "subset", "keep": [0, 2, 4, 6, 8, 10]}, 0)}


def record(out: str, run_id: str) -> str:
  """One real fine-tune with the Hugging Face Trainer, recorded as a RunLog."""
  import jax
  import torch
  import transformers

  from calibrate.io.hf import FragmentsDataset, OrderedTrainer, RunLogCallback, pad_collator
  from surrogate import read_fragments
  from surrogate.orders import OrderSpec
  torch.set_num_threads(1)
  path = os.path.join(out, "runs", f"{run_id}.jsonl")
  if os.path.exists(path):
    return path
  frags = read_fragments(os.path.join(DATA, "fragments.jsonl"))
  spec, seed = RUNS[run_id]
  order = OrderSpec.from_dict(spec).generate(frags.train_pools(), key=jax.random.key(seed),
                                             steps=STEPS, batch_size=BATCH)
  base = os.path.join(DATA, "base")
  tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(base, "tokenizer.json"),
                                             bos_token="<|endoftext|>", pad_token="<|endoftext|>")
  model = transformers.GPT2LMHeadModel.from_pretrained(base)
  train = FragmentsDataset(frags, tok, max_length=64)
  args = transformers.TrainingArguments(
      output_dir=os.path.join(out, "trainer", run_id), per_device_train_batch_size=BATCH,
      max_steps=STEPS, learning_rate=OPTIMIZER["lr"], weight_decay=OPTIMIZER["weight_decay"],
      warmup_steps=OPTIMIZER["warmup_steps"], lr_scheduler_type="linear",
      max_grad_norm=OPTIMIZER["grad_clip"], logging_steps=1, save_strategy="no", report_to=[],
      seed=seed, use_cpu=True, disable_tqdm=True)
  trainer = OrderedTrainer(order, model=model, args=args, train_dataset=train,
                           data_collator=pad_collator(tok))
  trainer.remove_callback(transformers.PrinterCallback)  # no per-step log lines on stdout
  os.makedirs(os.path.dirname(path), exist_ok=True)
  trainer.add_callback(RunLogCallback(trainer, path, run_id=run_id, model="gpt2-2x128",
                                      eval_every=20, order_spec=spec, order_seed=seed))
  trainer.train()
  return path


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="tutorial-out")
  args = p.parse_args()
  # 1. Record the real runs, two processes side by side (one thread each).
  with ProcessPoolExecutor(2) as pool:
    paths = list(pool.map(record, [args.out] * len(RUNS), list(RUNS)))
  print("recorded", paths)

  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                                     "--xla_cpu_multi_thread_eigen=false")
  import jax

  from calibrate import fit, next_run, save, screen, search
  from calibrate.answers.report import trajectories_of, write_report
  from calibrate.io.runlog import read_runlog
  from surrogate import read_fragments
  frags = read_fragments(os.path.join(DATA, "fragments.jsonl"))
  runs = [read_runlog(path, frags) for path in paths]

  # 2. Calibrate, and save the simulator (a folder of plain data).
  k_fit, k_screen, k_search, k_next = jax.random.split(jax.random.key(0), 4)
  sim = fit(frags, runs, key=k_fit)
  save(sim, os.path.join(args.out, "sim"))
  # 3. What happens to each fragment over many orders?
  screened = screen(sim, n_orders=128, key=k_screen, progress=True)
  print(screened.table())
  # 4. The best order, exported for the next real run.
  result = search(sim, budget=16, key=k_search, progress=True)
  print(result.table())
  result.save_order(sim, os.path.join(args.out, "best-order.jsonl"))
  # 5. Which real run would teach the simulator most?
  nxt = next_run(sim, key=k_next, progress=True)
  print(nxt.table())
  nxt.save_order(sim, os.path.join(args.out, "next-run.jsonl"))
  # 6. The report.
  plots = trajectories_of(sim, runs)
  print("wrote", write_report(os.path.join(args.out, "report"), sim, screen=screened,
                              search=result, trajectories=plots))


if __name__ == "__main__":
  main()
