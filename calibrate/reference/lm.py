"""The reference real runs, LM task: a small GPT-2, pre-trained on man pages and Python's
documentation, fine-tuned on categories of the `fortunes` quotes under many feeding orders.

    python -m calibrate.reference.lm --out calibrate/reference/data/lm      # about 20 minutes
    python -m calibrate.reference.lm --set dev  # 12 other categories, the same base: lm-dev
    python -m calibrate.reference.lm --set lora  # lm-dev's data and plan, LoRA fine-tunes
    python -m calibrate.reference.lm --counterfactual   # the counterfactual family (runs.py)

Three sets: `test` (the default, `data/lm`) and `dev` (`data/lm-dev`): the same base model and
run plan on twelve other `fortunes` categories, so that settings can be chosen on real runs
of the same kind as the test set's without looking at the test set; and `lora`
(`data/lm-lora`): dev's fragments and plan, LoRA fine-tunes of the same base (`LORA`),
trained and recorded through the Hugging Face Trainer path (`calibrate.io.hf`).

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
import functools
import glob
import gzip
import json
import os
import re
import time

import numpy as np

from calibrate.reference.runs import Task, run_all, run_counterfactuals

FORTUNE_DIR = "/usr/share/games/fortunes"
CATEGORIES = ("people", "definitions", "computers", "songs-poems", "politics", "science",
              "zippy", "platitudes", "art", "linux", "startrek", "law")
N_TRAIN, N_PROBE = 40, 10
LENGTH = 64
OPTIMIZER = {"name": "adamw", "lr": 5e-4, "weight_decay": 0.01, "warmup_steps": 20,
             "schedule": "linear", "grad_clip": 1.0}
DEV_CATEGORIES = ("cookie", "debian", "drugs", "education", "food", "humorists", "kids",
                  "literature", "love", "perl", "riddles", "sports")
MODEL_NAME = "gpt2-2x128"
# The LoRA set (`--set lora`): lm-dev's fragments and plan, rank-8 adapters on the attention
# and first MLP matrices of the frozen base, at 4x the full fine-tune's rate (LoRA moves
# less per step; the factor is fixed here, not tuned on any result).
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["c_attn", "c_fc"],
        "fan_in_fan_out": True}
LORA_OPTIMIZER = {**OPTIMIZER, "lr": 4 * OPTIMIZER["lr"]}
DATA = os.path.join(os.path.dirname(__file__), "data")


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
  """The `lm` sets' base (`out/base`): see the module docstring, steps 1-2."""
  train_base(os.path.join(out, "base"), corpus_texts(), vocab_size=2048, length=LENGTH,
             steps=steps, seed=seed)


def train_base(base: str, texts: list[str], *, vocab_size: int, length: int, steps: int,
               seed: int = 0, architecture: str = "gpt2") -> None:
  """A byte-level BPE of `vocab_size` and a causal LM (2 layers, width 128, 4 heads, `length`
  positions) pre-trained `steps` steps of 32 random chunks of `texts`, saved in `base`
  (skipped when it is there).

  `architecture`: "gpt2" (learned positions, LayerNorm, GELU MLP, dropout 0.1, saved in
  float32) or "llama" (rotary positions, RMSNorm, SwiGLU MLP of width 344, attention dropout
  0.1 so that training seeds differ, tied embeddings; saved in float16 to keep its larger
  vocabulary's weights small, and fine-tuned in float32).
  """
  import torch
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  if os.path.exists(os.path.join(base, "model.safetensors")):
    return
  os.makedirs(base, exist_ok=True)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(os.path.join(base, "tokenizer.json"))
  data = torch.from_numpy(_chunks(tok, texts, length))
  torch.manual_seed(seed)
  model = _new_model(architecture, tok.get_vocab_size(), length)
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
  if architecture == "llama":
    model = model.half()
  model.save_pretrained(base)  # config.json + model.safetensors
  with open(os.path.join(base, "corpus.json"), "w") as f:
    json.dump({"texts": len(texts), "chars": sum(map(len, texts)), "chunks": len(data),
               "steps": steps, "batch": 32, "final_loss": loss.item()}, f, indent=1)


def _new_model(architecture: str, vocab_size: int, length: int):
  import transformers
  if architecture == "gpt2":
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=length, n_embd=128, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0))
  if architecture == "llama":
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=length, hidden_size=128,
        intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, attention_dropout=0.1, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0))
  raise ValueError(f"unknown architecture {architecture!r}; use gpt2 or llama")


# ----------------------------------------------------------------------------------------------
# 3. Fragments.


def _quotes(category: str) -> list[str]:
  raw = open(os.path.join(FORTUNE_DIR, category), encoding="utf-8", errors="replace").read()
  quotes = [re.sub(r"\s+", " ", q).strip() for q in raw.split("\n%\n")]
  return [q for q in quotes if 40 <= len(q) <= 300]


def make_fragments(out: str, categories: tuple[str, ...] = CATEGORIES) -> str:
  from surrogate.fragments import Example, write_fragments
  path = os.path.join(out, "fragments.jsonl")
  if os.path.exists(path):
    return path
  examples = []
  for cat in categories:
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
# 4. The run set (calibrate.reference.runs).


def load_base(out: str, base_dir: str | None = None):
  """A fresh copy of the pre-trained base (`out/base`, or `base_dir`) and its tokenizer; in
  float32 whatever dtype it was saved in."""
  import torch
  import transformers
  base = base_dir or os.path.join(out, "base")
  tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(base, "tokenizer.json"),
                                             bos_token="<|endoftext|>", pad_token="<|endoftext|>")
  return transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tok


def task(out: str, base_dir: str | None = None, *, lora: bool = False) -> Task:
  return Task(out=out, model_name=MODEL_NAME, optimizer=LORA_OPTIMIZER if lora else OPTIMIZER,
              max_length=LENGTH, load=functools.partial(load_base, base_dir=base_dir),
              adapter=LORA if lora else None)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--set", choices=["test", "dev", "lora"], default="test",
                 help="dev: other categories, the test set's base (made first if missing); "
                      "lora: dev's fragments, LoRA fine-tunes through the HF Trainer")
  p.add_argument("--out", help="default: data/lm (test), data/lm-dev (dev), data/lm-lora")
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--counterfactual", action="store_true",
                 help="run the counterfactual family (a base shuffle and the same order without "
                      "each fragment, two seeds) into counterfactual/ instead of the 24-order plan")
  args = p.parse_args()
  import torch
  torch.set_num_threads(1)
  test_out = os.path.join(DATA, "lm")
  out = args.out or (test_out if args.set == "test" else
                     os.path.join(DATA, "lm-dev" if args.set == "dev" else "lm-lora"))
  make_fragments(out, CATEGORIES if args.set == "test" else DEV_CATEGORIES)
  t0 = time.time()
  base_out = out if args.set == "test" else test_out  # dev shares the test set's base
  make_base(base_out)
  print(f"base ready ({time.time() - t0:.0f} s)", flush=True)
  run = run_counterfactuals if args.counterfactual else run_all
  run(task(out, os.path.join(base_out, "base"), lora=args.set == "lora"), workers=args.workers)


if __name__ == "__main__":
  main()
