"""The surrogate transformer: shapes, causality, loss masking, parameter count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from surrogate import model as model_lib

CFG = model_lib.ModelConfig(vocab_size=263, length=7, width=16, depth=3, heads=2, mlp_ratio=2)


@pytest.fixture(scope="module")
def params():
  return model_lib.init_params(jax.random.key(0), CFG)


def test_shapes_and_param_count(params):
  tokens = jnp.ones((3, 5), jnp.int32)
  logits, cap = model_lib.forward(params, tokens, CFG, capture=True)
  assert logits.shape == (3, 5, 263)
  assert cap.attn_KxBxHxLxL.shape == (3, 3, 2, 5, 5)
  assert cap.hidden_BxLxD.shape == (3, 5, 16)
  assert sum(x.size for x in jax.tree.leaves(params)) == CFG.num_params()
  np.testing.assert_allclose(cap.attn_KxBxHxLxL.sum(-1), 1.0, rtol=1e-5)


def test_causal(params):
  a = jnp.array([[1, 5, 9, 13, 17, 21, 25]], jnp.int32)
  b = a.at[0, 4:].set(99)
  la, lb = model_lib.forward(params, a, CFG), model_lib.forward(params, b, CFG)
  np.testing.assert_allclose(la[:, :4], lb[:, :4], atol=1e-6)
  assert not np.allclose(la[:, 4:], lb[:, 4:])


def test_example_loss_ignores_padding_and_masked_targets(params):
  row = jnp.array([[1, 5, 9, 13, 0, 0, 0, 0]], jnp.int32)  # L + 1 = 8
  other = row.at[0, 5:].set(77)  # differs only after the masked targets
  mask = jnp.array([[0, 1, 1, 0, 0, 0, 0]], jnp.float32)
  la = model_lib.example_losses(params, row, mask, CFG)
  lb = model_lib.example_losses(params, other, mask, CFG)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  logits = model_lib.forward(params, row[:, :-1], CFG)
  logp = jax.nn.log_softmax(logits, -1)
  expected = -(logp[0, 1, 9] + logp[0, 2, 13]) / 2
  np.testing.assert_allclose(la[0], expected, rtol=1e-5)
  assert model_lib.example_losses(params, row, jnp.zeros_like(mask), CFG)[0] == 0.0


def test_batch_loss_is_token_weighted(params):
  rows = jnp.array([[1, 5, 9, 13, 0, 0, 0, 0], [1, 7, 0, 0, 0, 0, 0, 0]], jnp.int32)
  mask = jnp.array([[1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]], jnp.float32)
  per = model_lib.example_losses(params, rows, mask, CFG)
  np.testing.assert_allclose(model_lib.batch_loss(params, rows, mask, CFG),
                             (3 * per[0] + per[1]) / 4, rtol=1e-5)


def test_config_checks():
  with pytest.raises(ValueError, match="heads"):
    model_lib.ModelConfig(width=30, heads=4)
  with pytest.raises(ValueError, match="depth"):
    model_lib.ModelConfig(depth=0)
