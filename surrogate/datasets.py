"""Small real-text fragment sets that need no download, for tests, examples and benchmarks.

`python_docs` builds fragments from the topic help texts of Python's reference manual,
shipped with every CPython as `pydoc_data.topics` (the text `help("if")` shows). Each topic
is a fragment; its paragraphs are the examples, and a fixed share of them are probes.
"""

from __future__ import annotations

import re

from surrogate.fragments import Example, Fragments, Split

# Topics with enough text, chosen to span distinct parts of the manual.
PYTHON_DOC_TOPICS = (
    "specialnames", "compound", "types", "formatstrings", "string-methods", "typesseq",
    "debugger", "attribute-access", "customization", "typesmapping", "assignment",
    "comparisons", "execmodel", "import", "try", "naming", "async",
)


def python_docs_neutral(exclude: tuple[str, ...] = PYTHON_DOC_TOPICS, *,
                        min_chars: int = 40) -> list[str]:
  """Paragraphs of every `pydoc_data` topic not in `exclude`: neutral pre-training text."""
  from pydoc_data.topics import topics as docs  # ships with CPython
  return [p for name in sorted(docs) if name not in exclude
          for p in _paragraphs(docs[name], min_chars)]


def _paragraphs(text: str, min_chars: int) -> list[str]:
  paras = [re.sub(r"\s+", " ", p).strip() for p in text.split("\n\n")]
  return [p for p in paras if len(p) >= min_chars]


def python_docs(topics: tuple[str, ...] = PYTHON_DOC_TOPICS, *, max_train: int = 40,
                max_probe: int = 10, probe_every: int = 5, min_chars: int = 40) -> Fragments:
  """Fragments from `pydoc_data.topics`: one per topic, paragraphs as `text` examples.

  Args:
    topics: topic names (keys of `pydoc_data.topics.topics`).
    max_train, max_probe: caps per fragment.
    probe_every: every n-th paragraph of a topic is a probe (never fed), the rest train.
    min_chars: shorter paragraphs (headings, blank code lines) are dropped.

  Returns:
    Deterministic `Fragments` (the same Python version gives the same bytes).
  """
  from pydoc_data.topics import topics as docs  # ships with CPython
  examples = []
  for name in topics:
    if name not in docs:
      raise ValueError(f"unknown pydoc topic {name!r}")
    paras = _paragraphs(docs[name], min_chars)
    n_train = n_probe = 0
    for i, text in enumerate(paras):
      split = Split.PROBE if i % probe_every == probe_every - 1 else Split.TRAIN
      if split is Split.PROBE and n_probe < max_probe:
        examples.append(Example(f"{name}/probe/{n_probe}", name, split, text=text))
        n_probe += 1
      elif split is Split.TRAIN and n_train < max_train:
        examples.append(Example(f"{name}/train/{n_train}", name, split, text=text))
        n_train += 1
  return Fragments.from_examples(examples)
