"""Diagnostics: zero against themselves, local to a fragment's tokens, invariant where they should be."""

import jax
import jax.numpy as jnp
import numpy as np

from surrogate import diagnostics as D
from surrogate import model as model_lib

CFG = model_lib.ModelConfig(vocab_size=270, length=6, width=16, depth=2, heads=2, mlp_ratio=2)


def _probes():
  # P = 3 probes, F = 2 fragments: probes 0, 1 are fragment 0, probe 2 is fragment 1.
  tokens = jnp.array([[1, 10, 11, 12, 0, 0, 0], [1, 13, 10, 0, 0, 0, 0],
                      [1, 20, 21, 22, 23, 24, 0]], jnp.int32)
  valid = np.asarray(tokens[:, :-1] != 0)
  frag = np.array([0, 0, 1])
  w = (frag[None, :, None] == np.arange(2)[:, None, None]) & valid[None]
  w = w.reshape(2, -1).astype(np.float32)
  w /= w.sum(1, keepdims=True)
  tok_fv = np.zeros((2, 270), np.float32)
  for p in range(3):
    tok_fv[frag[p], np.asarray(tokens[p, :-1])[valid[p]]] = 1
  return D.ProbeSet(tokens, jnp.asarray(w), jnp.asarray(tok_fv))


def _all(params, ref, probes):
  now = D.capture(params, probes, CFG)
  m = jnp.zeros(3)
  return D.diagnose(now, ref, probes, m, jnp.full((2, 3), 1 / 3), jnp.zeros((2, 3)))


def test_zero_against_itself_and_nan_robustness_without_train():
  params = model_lib.init_params(jax.random.key(0), CFG)
  probes = _probes()
  ref = D.capture(params, probes, CFG)
  d = _all(params, ref, probes)
  for name in ("embedding_drift", "attention_shift", "plasticity", "logit_shift"):
    np.testing.assert_allclose(getattr(d, name), 0.0, atol=1e-5, err_msg=name)
  assert np.isnan(d.robustness).all()  # no train example of either fragment evaluated


def test_embedding_drift_is_local_to_a_fragments_tokens():
  params = model_lib.init_params(jax.random.key(0), CFG)
  probes = _probes()
  ref = D.capture(params, probes, CFG)
  moved = dict(params, embed_VxD=params["embed_VxD"].at[21].multiply(3.0))  # fragment 1's token
  d = _all(moved, ref, probes)
  assert d.embedding_drift[0] == 0.0 and d.embedding_drift[1] > 0.1
  # Fragment 1's inputs changed, so its representation moved; fragment 0's did not (its
  # predictions move a little: the output head is tied to the embedding, row 21 included).
  assert d.logit_shift[1] > 2 * d.logit_shift[0]
  assert d.attention_shift[0] < 1e-6 and d.plasticity[0] < 1e-5
  assert d.attention_shift[1] > 10 * d.attention_shift[0] and d.plasticity[1] > 1e-5


def test_cka_ignores_isotropic_rescaling_of_hidden_states():
  params = model_lib.init_params(jax.random.key(0), CFG)
  probes = _probes()
  ref = D.capture(params, probes, CFG)
  scaled = ref._replace(hidden_PxLxD=2.5 * ref.hidden_PxLxD)
  np.testing.assert_allclose(D.plasticity(scaled.hidden_PxLxD, ref, probes), 0.0, atol=1e-5)
  noise = jax.random.normal(jax.random.key(1), ref.hidden_PxLxD.shape)
  assert (D.plasticity(noise, ref, probes) > 0.2).all()


def test_robustness_is_probe_minus_train_mean():
  loss_M = jnp.array([2.0, 4.0, 1.0, 5.0])
  probe_w = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
  train_w = jnp.array([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  r = D.robustness(loss_M, probe_w, train_w)
  assert r[0] == 2.0 and np.isnan(r[1])
