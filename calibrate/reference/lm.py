"""The reference real runs, LM task: a small GPT-2, pre-trained on man pages and Python's
documentation, fine-tuned on categories of the `fortunes` quotes under many feeding orders.

    python -m calibrate.reference.lm --out calibrate/reference/data/lm      # about 20 minutes

Steps (each skipped when its output exists, so a killed job resumes):
  1. corpus: the text of the man pages in /usr/share/man/man1 (troff requests stripped) and
     of Python's reference manual (`pydoc_data`); a byte-level BPE of 2,048 tokens on it.
  2. base: GPT-2 (2 layers, width 128, 4 heads, 64 positions) pre-trained on the corpus;
     saved as `base/model.safetensors` (about 3 MB) with its config and tokenizer.
  3. fragments: 12 categories of Debian's `fortunes` package (apt install fortunes), 40 train
     and 10 probe quotes each -> `fragments.jsonl`.
  4. runs: 240 fine-tuning steps of 16 x 64 tokens each (AdamW, lr 5e-4, 20 warmup steps, linear
     decay; dropout 0.1, so seeds differ), evals every 20 steps of every probe and 4 train
     examples per fragment -> `runs/*.jsonl`, two processes of one thread each.

Real training of a real model; nothing here imitates one. Requires the `[torch]` extra.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

FORTUNE_DIR = "/usr/share/games/fortunes"
CATEGORIES = ("people", "definitions", "computers", "songs-poems", "politics", "science",
              "zippy", "platitudes", "art", "linux", "startrek", "law")
N_TRAIN, N_PROBE = 40, 10
STEPS, BATCH, LENGTH, EVAL_EVERY, EVAL_TRAIN = 240, 16, 64, 20, 4
OPTIMIZER = {"name": "adamw", "lr": 5e-4, "weight_decay": 0.01, "warmup_steps": 20,
             "schedule": "linear", "grad_clip": 1.0}
MODEL_NAME = "gpt2-2x128"


# ----------------------------------------------------------------------------------------------
# 1-2. Corpus, tokenizer, pre-trained base.


def _man_text(max_bytes: int) -> list[str]:
  out, total = [], 0
  for path in sorted(glob.glob("/usr/share/man/man1/*.gz")):
    try:
      raw = gzip.decompress(open(path, "rb").read()).decode("utf-8", "replace")
    except (OSError, EOFError):
      continue
    lines = [re.sub(r"\\f[BIRP]|\\[-&e(]..?|\\\*.", "", ln) for ln in raw.splitlines()
             if ln and not ln.startswith((".", "'"))]
    text = re.sub(r"\s+", " ", " ".join(lines)).strip()
    if len(text) > 200:
      out.append(text)
      total += len(text)
    if total > max_bytes:
      break
  return out


def corpus_texts(max_bytes: int = 3_000_000) -> list[str]:
  from pydoc_data.topics import topics
  docs = [re.sub(r"\s+", " ", t).strip() for _, t in sorted(topics.items())]
  return _man_text(max_bytes) + docs


def _chunks(tokenizer, texts: list[str], length: int) -> np.ndarray:
  ids = []
  for enc in tokenizer.encode_batch(texts):
    ids.extend(enc.ids + [tokenizer.token_to_id("<|endoftext|>")])
  n = len(ids) // length
  return np.asarray(ids[: n * length], np.int64).reshape(n, length)


def make_base(out: str, *, steps: int = 1500, seed: int = 0) -> None:
  import torch
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  base = os.path.join(out, "base")
  if os.path.exists(os.path.join(base, "model.safetensors")):
    return
  os.makedirs(base, exist_ok=True)
  texts = corpus_texts()
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=2048, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(os.path.join(base, "tokenizer.json"))
  data = torch.from_numpy(_chunks(tok, texts, LENGTH))
  torch.manual_seed(seed)
  cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=LENGTH,
                                n_embd=128, n_layer=2, n_head=4,
                                bos_token_id=0, eos_token_id=0)
  model = transformers.GPT2LMHeadModel(cfg)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
  sched = transformers.get_cosine_schedule_with_warmup(opt, 100, steps)
  gen = torch.Generator().manual_seed(seed)
  t0 = time.time()
  for step in range(steps):
    batch = data[torch.randint(len(data), (32,), generator=gen)]
    loss = model(input_ids=batch, labels=batch).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    if step % 250 == 0 or step == steps - 1:
      print(f"pretrain step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
  model.save_pretrained(base)  # config.json + model.safetensors
  with open(os.path.join(base, "corpus.json"), "w") as f:
    json.dump({"texts": len(texts), "chars": sum(map(len, texts)), "chunks": len(data),
               "steps": steps, "batch": 32, "final_loss": loss.item()}, f, indent=1)


# ----------------------------------------------------------------------------------------------
# 3. Fragments.


def _quotes(category: str) -> list[str]:
  raw = open(os.path.join(FORTUNE_DIR, category), encoding="utf-8", errors="replace").read()
  quotes = [re.sub(r"\s+", " ", q).strip() for q in raw.split("\n%\n")]
  return [q for q in quotes if 40 <= len(q) <= 300]


def make_fragments(out: str) -> str:
  from surrogate.fragments import Example, write_fragments
  path = os.path.join(out, "fragments.jsonl")
  if os.path.exists(path):
    return path
  examples = []
  for cat in CATEGORIES:
    qs = _quotes(cat)[: N_TRAIN + N_PROBE]
    if len(qs) < N_TRAIN + N_PROBE:
      raise RuntimeError(f"fortunes category {cat!r} has only {len(qs)} usable quotes")
    for i, q in enumerate(qs):  # every 5th quote is a probe
      split = "probe" if i % 5 == 4 else "train"
      n = sum(1 for e in examples if e.fragment == cat and e.split.value == split)
      examples.append(Example(f"{cat}/{split}/{n}", cat, split, text=q))
  os.makedirs(out, exist_ok=True)
  write_fragments(path, examples)
  return path


# ----------------------------------------------------------------------------------------------
# 4. The run set.


def order_plan(frags, scores: np.ndarray) -> list[tuple[str, dict, int, int]]:
  """(run_id, order spec, order seed, training seed) of every run: 4 calibration shuffles,
  16 structured held-out orders, and 4 of those again with another training seed (the noise
  ceiling: same batches, other dropout)."""
  f = len(frags.names)
  rng = np.random.default_rng(7)
  perms = [rng.permutation(f).tolist() for _ in range(4)]
  easy_first = np.argsort(scores).tolist()
  up = np.ones(f)
  up[easy_first[-3:]] = 4.0  # up-weight the three hardest
  down = np.ones(f)
  down[easy_first[:4]] = 0.25  # down-weight the four easiest
  leave = [rng.permutation(f)[:4].tolist() for _ in range(3)]
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


def _load_base(out: str):
  import transformers
  base = os.path.join(out, "base")
  tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(base, "tokenizer.json"),
                                             bos_token="<|endoftext|>", pad_token="<|endoftext|>")
  return transformers.GPT2LMHeadModel.from_pretrained(base), tok


def base_probe_losses(out: str, frags) -> np.ndarray:
  """The pre-trained base's mean probe loss per fragment (the curriculum's difficulty)."""
  from calibrate.hf import FragmentsDataset, example_losses, pad_collator
  model, tok = _load_base(out)
  ds = FragmentsDataset(frags, tok, max_length=LENGTH)
  losses = example_losses(model, ds, frags.probe_indices().tolist(), pad_collator(tok))
  return np.array([np.mean([losses[frags.examples[i].id] for i in pool])
                   for pool in frags.probe_pools()])


def run_one(out: str, run_id: str, spec: dict, order_seed: int, seed: int) -> str:
  """Fine-tunes the base on one order, recording it; returns the run's path."""
  import jax
  import torch
  import transformers

  from calibrate.hf import FragmentsDataset, example_losses, pad_collator
  from calibrate.recorders import Recorder
  from surrogate.fragments import read_fragments
  from surrogate.orders import OrderSpec
  torch.set_num_threads(1)
  path = os.path.join(out, "runs", f"{run_id}.jsonl")
  if os.path.exists(path):
    return path
  frags = read_fragments(os.path.join(out, "fragments.jsonl"))
  order = OrderSpec.from_dict(spec).generate(frags.train_pools(), key=jax.random.key(order_seed),
                                             steps=STEPS, batch_size=BATCH)
  model, tok = _load_base(out)
  torch.manual_seed(seed)
  model.train()
  ds = FragmentsDataset(frags, tok, max_length=LENGTH)
  collate = pad_collator(tok)
  evals = frags.probe_indices().tolist() + [
      i for pool in frags.train_pools() for i in pool[:EVAL_TRAIN].tolist()]
  ids = [e.id for e in frags.examples]
  opt = torch.optim.AdamW(model.parameters(), lr=OPTIMIZER["lr"],
                          weight_decay=OPTIMIZER["weight_decay"])
  sched = transformers.get_linear_schedule_with_warmup(opt, OPTIMIZER["warmup_steps"], STEPS)
  tmp = path + ".partial"
  t0 = time.time()
  with Recorder(tmp, frags, run_id=run_id, model=MODEL_NAME, optimizer=OPTIMIZER,
                batch_size=BATCH, seed=seed, overwrite=True, order_spec=spec,
                order_seed=order_seed) as rec:
    rec.eval(0, example_losses(model, ds, evals, collate))
    for t in range(STEPS):
      batch = collate([ds[i] for i in order[t]])
      lr = sched.get_last_lr()[0]
      loss = model(**batch).loss
      opt.zero_grad()
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER["grad_clip"])
      opt.step()
      sched.step()
      rec.step([ids[i] for i in order[t]], loss, lr)
      if (t + 1) % EVAL_EVERY == 0:
        rec.eval(t + 1, example_losses(model, ds, evals, collate))
  os.replace(tmp, path)  # only complete runs carry the final name
  print(f"{run_id}: {time.time() - t0:.1f} s", flush=True)
  return path


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data", "lm"))
  p.add_argument("--workers", type=int, default=2)
  args = p.parse_args()
  import torch
  torch.set_num_threads(1)
  from surrogate.fragments import read_fragments
  make_fragments(args.out)
  t0 = time.time()
  make_base(args.out)
  print(f"base ready ({time.time() - t0:.0f} s)", flush=True)
  frags = read_fragments(os.path.join(args.out, "fragments.jsonl"))
  scores = base_probe_losses(args.out, frags)
  plan = order_plan(frags, scores)
  os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
  with ProcessPoolExecutor(args.workers) as pool:
    list(pool.map(run_one, *zip(*[(args.out, *run) for run in plan])))
  print(f"{len(plan)} runs in {args.out}/runs ({time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
  main()
