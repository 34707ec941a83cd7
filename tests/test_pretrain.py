"""Pre-training on neutral text lowers the loss on that text and on the (unseen) fragments."""

import jax
import numpy as np

from surrogate import model as model_lib
from surrogate.datasets import python_docs, python_docs_neutral
from surrogate.prepare import prepare
from surrogate.pretrain import pretrain
from surrogate.tokenize import encode_texts

CFG = model_lib.ModelConfig(vocab_size=320, length=16, width=16, depth=1, heads=2, mlp_ratio=2)


def test_pretraining_learns_language_that_transfers():
  frags = python_docs(("try", "import"), max_train=6, max_probe=3)
  prep = prepare(frags, CFG, key=jax.random.key(0), eval_train=0)
  corpus = encode_texts(prep.tokenizer, python_docs_neutral()[:200], CFG.length)
  assert not set(python_docs_neutral()) & {e.text for e in frags.examples}
  params0 = model_lib.init_params(jax.random.key(1), CFG)
  params, loss_T = pretrain(params0, corpus, model_cfg=CFG, key=jax.random.key(2), steps=120,
                            batch_size=8)
  assert loss_T.shape == (120,) and np.isfinite(loss_T).all()
  assert loss_T[-20:].mean() < loss_T[:5].mean() - 1.0
  probe = prep.data.eval_idx_M
  before = model_lib.example_losses(params0, prep.data.tokens_ExL1[probe],
                                    prep.data.mask_ExL[probe], CFG)
  after = model_lib.example_losses(params, prep.data.tokens_ExL1[probe],
                                   prep.data.mask_ExL[probe], CFG)
  assert after.mean() < before.mean() - 0.5  # the fragments were never seen, yet got easier
