"""From a fragments file to everything the simulator needs: tokenizer, token table, eval set."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
from tokenizers import Tokenizer

from surrogate import model as model_lib
from surrogate.fragments import Fragments
from surrogate.simulate import SimData, build_sim_data
from surrogate.tokenize import (
  Tokenized,
  check_vocab,
  compact_tokenizer,
  context_length,
  encode_examples,
  train_tokenizer,
)


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
  """A data set made ready for simulation.

  Attributes:
    fragments: the data set.
    model_cfg: the surrogate's shape (its vocabulary is the tokenizer's).
    tokenizer: the compact BPE trained on the fragments.
    tokenized: every example as token rows and loss masks.
    data: the arrays the simulator shares across orders.
  """
  fragments: Fragments
  model_cfg: model_lib.ModelConfig
  tokenizer: Tokenizer
  tokenized: Tokenized
  data: SimData

  def eval_ids(self) -> list[str]:
    """The example ids whose losses each checkpoint records, in `data.eval_idx_M` order."""
    return [self.fragments.examples[i].id for i in self.data.eval_idx_M.tolist()]


def model_config_for(fragments: Fragments, *, length: int | None = None,
                     real_tokenizer: Tokenizer | None = None,
                     neutral_texts: Sequence[str] | None = None,
                     **shape) -> tuple[model_lib.ModelConfig, Tokenizer]:
  """The surrogate's shape for `fragments`, with the tokenizer it was sized with.

  Args:
    fragments: the data set.
    length: context length in tokens; None picks it from the data (`context_length`: 32,
      or 64 when the median example is longer than 32 tokens).
    real_tokenizer: the real model's tokenizer, to read the fragments as the real model
      does (`compact_tokenizer`; the vocabulary is then the tokens that occur in the
      fragments and `neutral_texts`, and `vocab_size` in `shape` is not allowed). By
      default the surrogate gets a BPE trained on the fragments.
    neutral_texts: the pre-training text `fit` will use (default: its default).
    **shape: other `ModelConfig` fields (their defaults otherwise); `vocab_size` sizes the BPE.

  Returns:
    (model_cfg, tokenizer): pass both to `prepare` or `fit` to reuse the tokenizer.
  """
  if real_tokenizer is not None:
    if "vocab_size" in shape:
      raise ValueError("model_config_for: the vocabulary of a real tokenizer is the tokens "
                       "that occur; do not pass vocab_size with real_tokenizer")
    if neutral_texts is None:
      from surrogate.datasets import python_docs_neutral
      neutral_texts = python_docs_neutral()
    tokenizer, shape["vocab_size"] = compact_tokenizer(
        real_tokenizer, fragments.texts_for_tokenizer() + list(neutral_texts))
  else:
    vocab = shape.get("vocab_size", model_lib.ModelConfig.vocab_size)
    tokenizer = train_tokenizer(fragments.texts_for_tokenizer(), vocab)
  if length is None:
    length = context_length(tokenizer, fragments.examples)
  return model_lib.ModelConfig(length=length, **shape), tokenizer


def prepare(fragments: Fragments, model_cfg: model_lib.ModelConfig = model_lib.ModelConfig(), *,
            key: jax.Array, eval_train: int | Sequence[int] = 4, diag_probes: int = 4,
            tokenizer: Tokenizer | None = None) -> Prepared:
  """Trains the BPE (unless given), tokenizes every example and picks the eval set.

  Args:
    fragments: the data set.
    model_cfg: the surrogate's shape; `vocab_size` is the BPE's size.
    key: picks the evaluated train examples and the diagnostic probes.
    eval_train: train examples evaluated per fragment, or explicit example positions.
    diag_probes: probes per fragment the diagnostics are computed on.
    tokenizer: reuse a trained tokenizer (e.g. a saved simulator's).
  """
  if tokenizer is None:
    tokenizer = train_tokenizer(fragments.texts_for_tokenizer(), model_cfg.vocab_size)
  tokenized = encode_examples(tokenizer, fragments.examples, model_cfg.length)
  check_vocab(tokenized, model_cfg.vocab_size, "the fragments")
  data = build_sim_data(fragments, tokenized, vocab_size=model_cfg.vocab_size,
                        eval_train=eval_train, diag_probes=diag_probes, key=key)
  return Prepared(fragments, model_cfg, tokenizer, tokenized, data)
