"""The training rule: schedules, and optimizer semantics matching optax/PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from surrogate import optim


def test_schedules():
  cfg = optim.OptimizerConfig(lr=0.1, warmup_steps=4, schedule="linear")
  lr = optim.learning_rates(cfg, 14)
  np.testing.assert_allclose(lr[:5], [0.0, 0.025, 0.05, 0.075, 0.1], rtol=1e-6)
  assert lr[-1] == pytest.approx(0.01) and np.all(np.diff(lr[4:]) < 0)  # 0.1 * (1 - 9/10)
  cos = optim.learning_rates(optim.OptimizerConfig(lr=1.0, schedule="cosine",
                                                   final_lr_fraction=0.1), 11)
  # As HF's schedules: step t has progress t / T, so the floor is reached just after the end.
  assert cos[0] == pytest.approx(1.0)
  assert cos[-1] == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 10 / 11)), rel=1e-5)
  assert np.all(optim.learning_rates(optim.OptimizerConfig(lr=0.3), 5) == np.float32(0.3))


def _params():
  k1, k2 = jax.random.split(jax.random.key(1))
  return {"w_DxE": jax.random.normal(k1, (3, 5)), "bias_E": jax.random.normal(k2, (5,))}


def test_adamw_matches_optax_with_hf_decay_mask():
  params = _params()
  grads = jax.tree.map(lambda p: 0.5 * p + 1.0, params)
  opt = optim.make_optimizer(optim.OptimizerConfig(lr=0.01, weight_decay=0.1))
  state = opt.init(params)
  ref = optax.adamw(0.01, weight_decay=0.1, mask={"w_DxE": True, "bias_E": False})
  ref_state = ref.init(params)
  for _ in range(3):
    ours, state = opt.update(grads, state, params, 0.01, 0.1)
    theirs, ref_state = ref.update(grads, ref_state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ours, theirs)


def test_sgd_momentum_l2_and_clipping_follow_torch():
  params = _params()
  grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), params)
  cfg = optim.OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.5, grad_clip=1.0)
  opt = optim.make_optimizer(cfg)
  state = opt.init(params)
  buf = None
  norm = np.sqrt(sum(float(jnp.square(g).sum()) for g in jax.tree.leaves(grads)))
  for _ in range(2):
    upd, state = opt.update(grads, state, params, 0.1, 0.5)
    # torch: clip_grad_norm_, then g += wd * p (matrices only here), buf = m * buf + g
    g = {k: grads[k] / norm + (0.5 * params[k] if k == "w_DxE" else 0.0) for k in grads}
    buf = g if buf is None else {k: 0.9 * buf[k] + g[k] for k in g}
    for k in g:
      np.testing.assert_allclose(upd[k], -0.1 * buf[k], rtol=1e-5)


def test_config_from_runlog_dict_and_checks():
  cfg = optim.OptimizerConfig.from_dict(
      {"name": "adam", "lr": 0.002, "betas": [0.8, 0.99], "schedule": "cosine", "note": "x"})
  assert cfg.name is optim.OptimizerName.ADAM and cfg.betas == (0.8, 0.99)
  assert optim.OptimizerConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError):
    optim.OptimizerConfig(name="lion")
  with pytest.raises(ValueError, match="lr"):
    optim.OptimizerConfig(lr=0.0)
