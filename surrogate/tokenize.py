"""Compact tokenization for the surrogate: a small byte-level BPE trained on the fragments.

A real tokenizer's 50k vocabulary would make the surrogate's embedding and output head its
most expensive parts; a BPE of a few hundred tokens trained on the user's own fragments
keeps every example short and the head small. Axis legend: E examples, L context length.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:
  from surrogate.fragments import Example

PAD, BOS = "<pad>", "<bos>"
PAD_ID, BOS_ID = 0, 1


class Tokenized(NamedTuple):
  """Examples as fixed-size arrays.

  tokens_ExL1: int32 [E, L + 1]: BOS, then the example's tokens, then PAD.
  mask_ExL: float32 [E, L]: 1 where target token j + 1 counts in the loss (every text
    token; only completion tokens for prompt/completion examples).
  truncated_E: bool [E]: the example was longer than the context and was cut.
  """
  tokens_ExL1: np.ndarray
  mask_ExL: np.ndarray
  truncated_E: np.ndarray


def train_tokenizer(texts: Sequence[str], vocab_size: int = 512) -> Tokenizer:
  """Trains a byte-level BPE (so no text is ever out of vocabulary) on `texts`.

  Args:
    texts: the strings to learn merges from (all of the fragments' texts).
    vocab_size: final vocabulary including the 256 byte tokens and 2 special tokens.

  Returns:
    A `tokenizers.Tokenizer`; PAD has id 0 and BOS id 1.
  """
  if vocab_size < 258:
    raise ValueError(f"vocab_size must be >= 258 (256 bytes + PAD + BOS), got {vocab_size}")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, BOS],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(list(texts), trainer=trainer)
  assert tok.token_to_id(PAD) == PAD_ID and tok.token_to_id(BOS) == BOS_ID
  return tok


def compact_tokenizer(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[Tokenizer, int]:
  """The real model's own tokenizer, renumbered for the surrogate.

  The surrogate then reads the fragments cut into the very tokens the real model reads
  (against a BPE trained on the fragments: better ranks on the LM development set, not on
  the LM test set; docs/experiments.md), while its vocabulary holds only the tokens that occur
  in `texts`: PAD and BOS take ids 0 and 1, the occurring tokens the next ids, every other
  token of the real vocabulary the ids after those (never produced by these texts, so the
  surrogate needs no rows for them). `texts` must hold everything the surrogate will
  read: the fragments' texts and the pre-training text (`prepare` and `fit` check).

  Args:
    tokenizer: a `tokenizers.Tokenizer` with a BPE, WordPiece or WordLevel model, e.g. from a
      Hugging Face model's `tokenizer.json` with `Tokenizer.from_file`.
    texts: the strings the surrogate will read.

  Returns:
    (tokenizer, vocab_size): the renumbered tokenizer and the surrogate's vocabulary size.

  Raises:
    ValueError: a tokenizer model without a token -> id table (e.g. Unigram).
  """
  spec = json.loads(tokenizer.to_str())
  model = spec["model"]
  if model.get("type") not in ("BPE", "WordPiece", "WordLevel"):
    raise ValueError(f"compact_tokenizer: a {model.get('type')} tokenizer has no token -> id "
                     "table to renumber; BPE, WordPiece and WordLevel tokenizers are supported")
  # The surrogate adds its own BOS and never pads or truncates through the tokenizer.
  spec.update(post_processor=None, truncation=None, padding=None)
  plain = Tokenizer.from_str(json.dumps(spec))
  old = dict(model["vocab"])
  for added in spec.get("added_tokens") or []:
    old.setdefault(added["content"], added["id"])
  token_of = {i: t for t, i in old.items()}
  used = sorted({i for enc in plain.encode_batch(list(texts), add_special_tokens=False)
                 for i in enc.ids})
  first = [PAD, BOS] + [token_of[i] for i in used if token_of[i] not in (PAD, BOS)]
  taken = set(first)
  rest = [t for t, _ in sorted(old.items(), key=lambda kv: kv[1]) if t not in taken]
  model["vocab"] = {t: n for n, t in enumerate(first + rest)}
  spec["added_tokens"] = [dict(a, id=model["vocab"][a["content"]])
                          for a in spec.get("added_tokens") or []]
  return Tokenizer.from_str(json.dumps(spec)), len(first)


def check_vocab(tokenized: Tokenized, vocab_size: int, what: str) -> None:
  """Raises ValueError when `tokenized` holds a token id the surrogate has no row for."""
  top = int(tokenized.tokens_ExL1.max(initial=0))
  if top >= vocab_size:
    row = int(np.argwhere(tokenized.tokens_ExL1 >= vocab_size)[0, 0])
    raise ValueError(f"{what}: row {row} has token id {top} but the surrogate's vocabulary "
                     f"(model_cfg.vocab_size) has {vocab_size} ids: pass the shape the "
                     "tokenizer was sized with, and compact a real tokenizer "
                     "(`compact_tokenizer`) on every text the surrogate reads")


def encode_examples(tokenizer: Tokenizer, examples: Sequence[Example], length: int) -> Tokenized:
  """Token rows and loss masks for `examples` at context length `length`.

  A text example is BOS + its tokens, cut to `length` targets. A prompt/completion example
  is BOS + prompt + completion; when too long the prompt loses tokens from its start, since
  the completion is what the loss is on (a completion longer than the context is cut at
  its end).
  """
  e = len(examples)
  tokens = np.full((e, length + 1), PAD_ID, np.int32)
  mask = np.zeros((e, length), np.float32)
  truncated = np.zeros(e, bool)
  first, second = _encoded_parts(tokenizer, examples)
  for i, ex in enumerate(examples):
    a = first[i].ids
    if ex.text is not None:
      row, n_prompt = a[:length], 0
      truncated[i] = len(a) > length
    else:
      c = second[i].ids[:length]
      keep = max(0, length - len(c))
      truncated[i] = len(a) > keep or len(second[i].ids) > length
      a = a[len(a) - keep:] if keep else []
      row, n_prompt = a + c, len(a)
    tokens[i, 0] = BOS_ID
    tokens[i, 1:1 + len(row)] = row
    # Target j is token j + 1: prompt targets are positions < n_prompt.
    mask[i, n_prompt:len(row)] = 1.0
  return Tokenized(tokens, mask, truncated)


def _encoded_parts(tokenizer: Tokenizer, examples: Sequence[Example]):
  """Each example's text (or prompt) and completion ("" for a text), encoded without BOS."""
  texts = [ex.text if ex.text is not None else ex.prompt for ex in examples]
  completions = [ex.completion or "" for ex in examples]
  return (tokenizer.encode_batch(texts, add_special_tokens=False),
          tokenizer.encode_batch(completions, add_special_tokens=False))


def token_counts(tokenizer: Tokenizer, examples: Sequence[Example]) -> np.ndarray:
  """Tokens of each example, uncut: a text's, or a prompt's plus its completion's (no BOS)."""
  first, second = _encoded_parts(tokenizer, examples)
  return np.array([len(a.ids) + len(b.ids) for a, b in zip(first, second)], np.int64)


def context_length(tokenizer: Tokenizer, examples: Sequence[Example],
                   choices: Sequence[int] = (32, 64)) -> int:
  """The surrogate's default context length for `examples`: the shortest of `choices`
  that holds the median example whole, else the longest.

  Measured on the two development sets (docs/experiments.md): on LM-like text (median 50
  tokens, 81 % of examples cut at 32) 64 tokens ranked fragments better and cut the
  calibrated trajectory error to a third; 128 added nothing. On short classification
  examples (median 26) 64 ranked no better than 32, at twice the cost.
  """
  if not choices:
    raise ValueError("choices must name at least one context length")
  median = float(np.median(token_counts(tokenizer, examples))) if len(examples) else 0.0
  fits = [c for c in sorted(choices) if c >= median]
  return fits[0] if fits else max(choices)


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], length: int) -> Tokenized:
  """`encode_examples` for plain texts (e.g. a neutral pre-training corpus)."""
  from surrogate.fragments import Example, Split
  return encode_examples(tokenizer, [Example(str(i), "corpus", Split.TRAIN, text=t)
                                     for i, t in enumerate(texts)], length)
