"""Compact tokenization: BPE size, determinism, loss masks, truncation rules."""

import numpy as np
import pytest

from surrogate.datasets import python_docs
from surrogate.fragments import Example
from surrogate.tokenize import BOS_ID, PAD_ID, encode_examples, train_tokenizer


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
