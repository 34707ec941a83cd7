"""The surrogate transformer: shapes, causality, loss masking, parameter count; the flax module
against the hand-rolled forward it replaced."""

import math

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


# ----------------------------------------------------------------------------------------------
# The flax module against the hand-rolled forward it replaced.


def _ref_layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * _ref_lift(scale, x) + _ref_lift(bias, x)


def _ref_lift(v, like):
  return v.reshape((1,) * (like.ndim - v.ndim) + v.shape)


def _reference_forward(params, inputs_BxL, cfg, *, capture=False):
  """The hand-rolled forward of surrogate/model.py before the flax module (kept verbatim)."""
  b, l = inputs_BxL.shape
  h, hd = cfg.heads, cfg.head_dim
  x_BxLxD = params["embed_VxD"][inputs_BxL] + params["pos_LxD"][None, :l]
  causal_LxL = jnp.tril(jnp.ones((l, l), bool))
  attns = []
  blocks = params["blocks"]
  for k in range(cfg.depth):
    p = jax.tree.map(lambda a: a[k], blocks)
    y = _ref_layer_norm(x_BxLxD, p["ln1_scale_KxD"], p["ln1_bias_KxD"])
    qkv = y @ p["qkv_KxDx3D"] + _ref_lift(p["qkv_bias_Kx3D"], y)
    q, kk, v = jnp.split(qkv.reshape(b, l, 3, h, hd), 3, axis=2)
    q, kk, v = (a[:, :, 0] for a in (q, kk, v))
    scores_BxHxLxL = jnp.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(hd)
    scores_BxHxLxL = jnp.where(causal_LxL[None, None], scores_BxHxLxL, -1e9)
    attn_BxHxLxL = jax.nn.softmax(scores_BxHxLxL, axis=-1)
    if capture:
      attns.append(attn_BxHxLxL)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", attn_BxHxLxL, v).reshape(b, l, cfg.width)
    x_BxLxD = x_BxLxD + ctx @ p["proj_KxDxD"] + _ref_lift(p["proj_bias_KxD"], ctx)
    y = _ref_layer_norm(x_BxLxD, p["ln2_scale_KxD"], p["ln2_bias_KxD"])
    y = jax.nn.gelu(y @ p["fc_KxDxM"] + _ref_lift(p["fc_bias_KxM"], y), approximate=True)
    x_BxLxD = x_BxLxD + y @ p["out_KxMxD"] + _ref_lift(p["out_bias_KxD"], y)
  hidden_BxLxD = _ref_layer_norm(x_BxLxD, params["lnf_scale_D"], params["lnf_bias_D"])
  logits_BxLxV = hidden_BxLxD @ params["embed_VxD"].T
  if capture:
    return logits_BxLxV, model_lib.Captured(jnp.stack(attns), hidden_BxLxD)
  return logits_BxLxV


# Distinct tiny dims, L < cfg.length (the position table is sliced), depth 2 as by default.
CFG2 = model_lib.ModelConfig(vocab_size=37, length=9, width=12, depth=2, heads=3, mlp_ratio=3)
B2, L2, N2 = 4, 6, 5  # batch, tokens read, vmapped orders


def _assert_trees_close(a, b, **tol):
  """Same structure, and every leaf close; a failure names the leaf and shows the diff."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **tol)


def _tokens(key, shape):
  return jax.random.randint(key, shape, 0, CFG2.vocab_size)


def test_init_params_matches_the_declared_flax_parameters():
  # The module's parameters carry init_params's names and shapes, so apply runs on its dict.
  params = model_lib.init_params(jax.random.key(3), CFG2)
  declared = jax.eval_shape(
      model_lib.Transformer(CFG2).init, jax.random.key(0), jnp.zeros((1, L2), jnp.int32))
  assert jax.tree.structure(declared["params"]) == jax.tree.structure(params)
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  assert shapes(declared["params"]) == shapes(params)


@pytest.mark.parametrize("jit", [False, True])
def test_flax_forward_equals_the_hand_rolled_one(jit):
  params = model_lib.init_params(jax.random.key(3), CFG2)
  # Perturb the ones/zeros so every parameter takes part in the comparison.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  tokens = _tokens(jax.random.key(5), (B2, L2))
  new = lambda p, t: model_lib.forward(p, t, CFG2, capture=True)
  ref = lambda p, t: _reference_forward(p, t, CFG2, capture=True)
  if jit:
    new, ref = jax.jit(new), jax.jit(ref)
  # Bitwise: the module emits the very operations the hand-rolled forward did.
  _assert_trees_close(new(params, tokens), ref(params, tokens), rtol=0, atol=0)


def test_flax_losses_and_grads_equal_the_hand_rolled_ones_vmapped_over_orders():
  # As simulate runs them: N orders' params, vmapped under jit, loss and gradient.
  keys = jax.random.split(jax.random.key(6), N2)
  params_N = jax.vmap(lambda k: model_lib.init_params(k, CFG2))(keys)
  tokens_NxBxL1 = _tokens(jax.random.key(7), (N2, B2, L2 + 1))
  mask_NxBxL = (jax.random.uniform(jax.random.key(8), (N2, B2, L2)) < 0.7).astype(jnp.float32)

  def loss(fwd, p, tokens_BxL1, mask_BxL):
    logits = fwd(p, tokens_BxL1[:, :-1], CFG2)
    tok_BxL = model_lib.token_losses(logits, tokens_BxL1[:, 1:])
    return (tok_BxL * mask_BxL).sum() / jnp.maximum(mask_BxL.sum(), 1.0)

  def run(fwd):
    return jax.jit(jax.vmap(jax.value_and_grad(lambda *a: loss(fwd, *a))))(
        params_N, tokens_NxBxL1, mask_NxBxL)

  new, ref = run(model_lib.forward), run(_reference_forward)
  _assert_trees_close(new, ref, rtol=0, atol=0)
  batch = jax.vmap(lambda *a: model_lib.batch_loss(*a, CFG2))(params_N, tokens_NxBxL1, mask_NxBxL)
  np.testing.assert_allclose(batch, ref[0], rtol=1e-6)


def test_flax_forward_lowers_to_the_hand_rolled_program():
  # Identical StableHLO (source locations aside), so XLA compiles the same program: the flax
  # path cannot be slower once compiled. benchmarks/simulate_throughput.py --flax-vs-hand times it.
  params = model_lib.init_params(jax.random.key(3), CFG2)
  tokens = jnp.zeros((B2, L2 + 1), jnp.int32)
  mask = jnp.ones((B2, L2))

  def lowered(fwd):
    def loss(p):
      tok_BxL = model_lib.token_losses(fwd(p, tokens[:, :-1], CFG2), tokens[:, 1:])
      return (tok_BxL * mask).sum()
    return jax.jit(jax.value_and_grad(loss)).lower(params).as_text(debug_info=False)

  assert lowered(model_lib.forward) == lowered(_reference_forward)


def test_flax_forward_rejects_params_of_the_wrong_shape():
  params = model_lib.init_params(jax.random.key(3), CFG2)
  other = model_lib.ModelConfig(vocab_size=37, length=9, width=12, depth=3, heads=3, mlp_ratio=3)
  with pytest.raises(Exception, match="qkv|shape"):
    model_lib.forward(params, _tokens(jax.random.key(5), (B2, L2)), other)
