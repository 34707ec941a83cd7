"""Compact tokenization: BPE size, determinism, loss masks, truncation rules."""

import numpy as np
import pytest

from surrogate.datasets import python_docs
from surrogate.fragments import Example
from surrogate.tokenize import (
  BOS_ID,
  PAD_ID,
  context_length,
  encode_examples,
  token_counts,
  train_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
  return train_tokenizer(python_docs(("try", "import")).texts_for_tokenizer(), 300)


def test_vocab_bounded_and_deterministic(tok):
  texts = python_docs(("try", "import")).texts_for_tokenizer()
  again = train_tokenizer(texts, 300)
  assert tok.get_vocab_size() <= 300
  assert tok.to_str() == again.to_str()
  with pytest.raises(ValueError, match="258"):
    train_tokenizer(texts, 100)


def test_text_masks_every_token_and_pads(tok):
  ex = Example("a", "f", "train", text="try: pass")
  n = len(tok.encode("try: pass", add_special_tokens=False).ids)
  out = encode_examples(tok, [ex], length=20)
  assert out.tokens_ExL1.shape == (1, 21) and out.mask_ExL.shape == (1, 20)
  assert out.tokens_ExL1[0, 0] == BOS_ID and (out.tokens_ExL1[0, n + 1:] == PAD_ID).all()
  np.testing.assert_array_equal(out.mask_ExL[0], np.arange(20) < n)
  assert not out.truncated_E[0]


def test_prompt_completion_masks_completion_only_and_keeps_it_when_cut(tok):
  prompt, completion = "Q: what does import do? " * 5, " binds names"
  ids_p = tok.encode(prompt, add_special_tokens=False).ids
  ids_c = tok.encode(completion, add_special_tokens=False).ids
  ex = Example("q", "f", "probe", prompt=prompt, completion=completion)
  out = encode_examples(tok, [ex], length=12)
  row, mask = out.tokens_ExL1[0], out.mask_ExL[0]
  assert out.truncated_E[0] and len(ids_p) + len(ids_c) > 12
  # The completion is the tail of the row, and exactly its tokens are targets.
  np.testing.assert_array_equal(row[13 - len(ids_c):], ids_c)
  np.testing.assert_array_equal(row[1:13 - len(ids_c)], ids_p[len(ids_p) - (12 - len(ids_c)):])
  assert mask.sum() == len(ids_c) and mask[-len(ids_c):].all()


def _texts_of(tok, counts):
  """Examples of exactly `counts` tokens each (a word the BPE keeps whole, repeated)."""
  word = next(w for w in (" import", " try", " the", " a") if
              len(tok.encode(w * 3, add_special_tokens=False).ids) == 3)
  return [Example(str(i), "f", "train", text=word * n) for i, n in enumerate(counts)]


def test_context_length_holds_the_median_example(tok):
  short = _texts_of(tok, [10, 20, 30, 40, 90])       # median 30
  long = _texts_of(tok, [10, 40, 50, 60, 90])        # median 50
  np.testing.assert_array_equal(token_counts(tok, long), [10, 40, 50, 60, 90])
  assert context_length(tok, short) == 32
  assert context_length(tok, long) == 64
  assert context_length(tok, _texts_of(tok, [200, 300, 400])) == 64   # none fits: the longest
  assert context_length(tok, long, choices=(16, 48, 128)) == 128
  qa = [Example("q", "f", "probe", prompt=ex.text, completion=" try") for ex in long]
  n_completion = len(tok.encode(" try", add_special_tokens=False).ids)
  np.testing.assert_array_equal(token_counts(tok, qa), token_counts(tok, long) + n_completion)
  with pytest.raises(ValueError, match="choices"):
    context_length(tok, short, choices=())
