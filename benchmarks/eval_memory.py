"""Peak memory and time of the recorder's per-example eval losses, chunked against full logits.

A model with a large vocabulary (151,936, Qwen2's) and long examples is where full fp32
logits do not fit: `calibrate.io.hf.example_losses` computes the loss from the final hidden
states, `chunk_tokens` rows of logits at a time. Each variant runs in its own process (so
its peak resident memory is its own), alternated over rounds; prints medians.

    python benchmarks/eval_memory.py                 # about 2 minutes on 2 cores
    python benchmarks/eval_memory.py --rounds 1 --length 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _worker(job: dict) -> dict:
  import resource

  import torch
  import transformers

  from calibrate.io import hf
  from surrogate.fragments import Example, Fragments
  torch.set_num_threads(1)
  torch.manual_seed(0)
  vocab, length, n = job["vocab"], job["length"], job["examples"]
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=vocab, n_positions=length, n_embd=64, n_layer=1, n_head=2)).eval()

  class Tok:  # ids straight from the text: this measures the loss, not a tokenizer
    bos_token_id, pad_token_id = 0, 0

    def __call__(self, text, add_special_tokens=False):
      return {"input_ids": [int(w) for w in text.split()]}

  g = torch.Generator().manual_seed(1)
  examples = [Example(f"f/probe/{i}", "f", "probe",
                      text=" ".join(map(str, torch.randint(1, vocab, (length - 1,),
                                                           generator=g).tolist())))
              for i in range(n)]
  examples.append(Example("f/train/0", "f", "train", text="1 2 3"))
  ds = hf.FragmentsDataset(Fragments.from_examples(examples), Tok(), max_length=length)
  collate = hf.pad_collator(Tok())
  positions = list(range(n))
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t = time.perf_counter()
  if job["mode"] == "full":
    with torch.no_grad():
      losses = []
      for s in range(0, n, job["batch"]):
        batch = collate([ds[i] for i in positions[s:s + job["batch"]]])
        losses += hf._full_logit_losses(model, batch).tolist()
  else:
    out = hf.example_losses(model, ds, positions, collate, job["batch"],
                            chunk_tokens=job["chunk"])
    losses = list(out.values())
  seconds = time.perf_counter() - t
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {"seconds": seconds, "peak_gb": peak / 2**20, "model_gb": before / 2**20,
          "mean_loss": sum(losses) / len(losses)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--vocab", type=int, default=151_936)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--examples", type=int, default=16)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--chunk", type=int, default=1024)
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args()
  if args.worker:
    print(json.dumps(_worker(json.loads(args.worker))))
    return
  env = {**os.environ, "OMP_NUM_THREADS": "1"}
  base = {"vocab": args.vocab, "length": args.length, "examples": args.examples,
          "batch": args.batch, "chunk": args.chunk}
  print(f"# eval_memory {time.strftime('%Y-%m-%d %H:%M')}: vocabulary {args.vocab}, "
        f"{args.examples} examples of {args.length} tokens, batches of {args.batch}, chunks of "
        f"{args.chunk} tokens; {args.rounds} rounds, alternated, one process each")
  rows: dict[str, list[dict]] = {"full": [], "chunked": []}
  for _ in range(args.rounds):
    for mode in rows:
      out = subprocess.run([sys.executable, __file__, "--worker", json.dumps({**base,
                                                                              "mode": mode})],
                           capture_output=True, text=True, env=env, check=True)
      rows[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
  med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in rows.items()}
  for m, r in med.items():
    print(f"{m:<8} peak RSS {r['peak_gb']:.2f} GB (model loaded {r['model_gb']:.2f} GB), "
          f"{r['seconds']:.2f} s, mean loss {r['mean_loss']:.5f}")
  print(f"chunked / full: peak {med['chunked']['peak_gb'] / med['full']['peak_gb']:.2f}x, "
        f"time {med['chunked']['seconds'] / med['full']['seconds']:.2f}x; same losses: "
        f"{abs(med['chunked']['mean_loss'] - med['full']['mean_loss']) < 1e-4}")


if __name__ == "__main__":
  main()
