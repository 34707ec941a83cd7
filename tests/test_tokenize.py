"""Compact tokenization: BPE size, determinism, loss masks, truncation rules, a real
tokenizer compacted."""

import dataclasses

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer

from surrogate.datasets import python_docs
from surrogate.fragments import Example
from surrogate.prepare import model_config_for, prepare
from surrogate.tokenize import (
  BOS,
  BOS_ID,
  PAD,
  PAD_ID,
  check_vocab,
  compact_tokenizer,
  context_length,
  encode_examples,
  encode_texts,
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


@pytest.fixture(scope="module")
def real_tok():
  """A stand-in for a real model's tokenizer: its own specials, padding and truncation on."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.train_from_iterator(python_docs(("try", "import", "types")).texts_for_tokenizer(),
                        trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                            show_progress=False))
  t.enable_padding(length=300, pad_id=0, pad_token="<|endoftext|>")
  t.enable_truncation(max_length=8)
  return t


def test_compact_tokenizer_reads_as_the_real_model_with_only_the_tokens_that_occur(real_tok):
  texts = python_docs(("try",)).texts_for_tokenizer()
  tok, vocab = compact_tokenizer(real_tok, texts)
  plain = Tokenizer.from_str(real_tok.to_str())
  plain.no_padding()
  plain.no_truncation()
  want = plain.encode_batch(texts, add_special_tokens=False)
  got = tok.encode_batch(texts, add_special_tokens=False)
  assert [w.tokens for w in want] == [g.tokens for g in got]  # untruncated, unpadded
  distinct = {t for w in want for t in w.tokens}
  assert vocab == len(distinct) + 2 < real_tok.get_vocab_size()
  assert max(i for g in got for i in g.ids) == vocab - 1
  assert tok.token_to_id(PAD) == PAD_ID and tok.token_to_id(BOS) == BOS_ID
  again = Tokenizer.from_str(tok.to_str())  # saved with a simulator as plain JSON
  assert again.encode(texts[0], add_special_tokens=False).ids == got[0].ids
  # Text it was not compacted on may need ids the surrogate has no rows for.
  check_vocab(encode_texts(tok, texts, 16), vocab, "the fragments")
  with pytest.raises(ValueError, match="on every text the surrogate reads"):
    check_vocab(encode_texts(tok, python_docs(("types",)).texts_for_tokenizer(), 16), vocab,
                "the pre-training text")


def test_compact_tokenizer_takes_wordpiece_and_refuses_unigram():
  from tokenizers import Tokenizer, models, pre_tokenizers
  wp = Tokenizer(models.WordPiece({"[UNK]": 0, "[PAD]": 1, "hello": 2, "world": 3, "##s": 4,
                                   "unused": 5}, unk_token="[UNK]"))
  wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok, vocab = compact_tokenizer(wp, ["hello worlds"])
  assert tok.encode("hello worlds", add_special_tokens=False).tokens == ["hello", "world", "##s"]
  assert vocab == 5 and sorted(tok.encode("hello worlds").ids) == [2, 3, 4]
  uni = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0))
  with pytest.raises(ValueError, match="Unigram"):
    compact_tokenizer(uni, ["a"])


def test_model_config_for_a_real_tokenizer_sizes_the_vocabulary_from_the_text(real_tok):
  frags = python_docs(("try", "import"), max_train=4, max_probe=2)
  neutral = python_docs(("types",)).texts_for_tokenizer()[:5]
  cfg, tok = model_config_for(frags, real_tokenizer=real_tok, neutral_texts=neutral, width=16)
  assert cfg.width == 16 and cfg.vocab_size < real_tok.get_vocab_size()
  rows = encode_examples(tok, frags.examples, cfg.length).tokens_ExL1
  assert rows.max() < cfg.vocab_size
  check_vocab(encode_texts(tok, neutral, cfg.length), cfg.vocab_size, "the pre-training text")
  with pytest.raises(ValueError, match="vocab_size"):
    model_config_for(frags, real_tokenizer=real_tok, vocab_size=512)
  # A shape too small for the tokenizer is refused before anything is simulated.
  with pytest.raises(ValueError, match="row"):
    prepare(frags, dataclasses.replace(cfg, vocab_size=40), key=jax.random.key(0), tokenizer=tok)
