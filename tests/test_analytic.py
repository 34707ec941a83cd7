"""The analytic tier's recurrence: what it sees of an order, how it moves, and that fitting
recovers a recurrence from its own rollouts well enough to rank held-out orders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from surrogate import analytic, orders

F, T, B = 3, 40, 4
POOLS = [np.arange(0, 6), np.arange(6, 10), np.arange(10, 15)]
FRAGMENT_E = np.repeat(np.arange(F), [6, 4, 5])
# Each fragment's first two train examples are evaluated, with equal weights.
TRAIN_W_FxE = np.zeros((F, 15))
for f, pool in enumerate(POOLS):
  TRAIN_W_FxE[f, pool[:2]] = 0.5
CHECKPOINTS = np.arange(0, T + 1, 10)
X0 = jnp.asarray([[3.0, 2.5, 4.0], [2.9, 2.4, 3.8]])


def _orders(n, key):
  out = []
  for i, k in enumerate(jax.random.split(key, n)):
    family = orders.FAMILIES[i % len(orders.FAMILIES)]
    k1, k2 = jax.random.split(k)
    spec = orders.random_spec(family, F, key=k1)
    out.append(spec.generate(POOLS, key=k2, steps=T, batch_size=B))
  return np.stack(out)


def _feats(order_NxTxB):
  lr = np.minimum(1.0, (np.arange(T) + 1) / 5) * np.ones((len(order_NxTxB), 1))
  return analytic.features(order_NxTxB, FRAGMENT_E, TRAIN_W_FxE, lr)


def test_features_describe_the_batch():
  order = np.array([[0, 1, 6, -1], [10, 10, 11, 12]] + [[2, 3, 4, 5]] * (T - 2))
  feats = analytic.features(order, FRAGMENT_E, TRAIN_W_FxE, np.linspace(1.0, 0.0, T))
  np.testing.assert_allclose(feats.share_TxF[0], [2 / 3, 1 / 3, 0])  # the empty slot is skipped
  np.testing.assert_allclose(feats.share_TxF[1], [0, 0, 1])
  np.testing.assert_allclose(feats.share_TxF.sum(-1), 1.0, rtol=1e-6)
  # Evaluated: 0 and 1 (fragment 0), 6 and 7 (1), 10 and 11 (2; 10 is fed twice).
  np.testing.assert_allclose(feats.seen_TxF[0], [1.0, 0.5, 0.0])
  np.testing.assert_allclose(feats.seen_TxF[1], [0.0, 0.0, 1.5])
  assert feats.lr_T[0] == 1.0


def test_rollout_starts_at_x0_and_an_unfed_isolated_fragment_stays():
  p = analytic.init_params(F)
  # No transfer between fragments, no forgetting, no fast part (which moves whatever is
  # fed): fragment 1, never fed, cannot move.
  p = p._replace(transfer_2xFxF=p.transfer_2xFxF * jnp.eye(F)[None],
                 fast_2xF=jnp.full((2, F), -30.0))
  order = np.stack([orders.subset(POOLS, [0, 2], key=jax.random.key(0), steps=T, batch_size=B)])
  x = analytic.rollout_many(p, X0, _feats(order), CHECKPOINTS)[0]
  assert x.shape == (len(CHECKPOINTS), 2, F)
  np.testing.assert_allclose(x[0], X0)
  np.testing.assert_allclose(x[:, :, 1], np.broadcast_to(X0[:, 1], (len(CHECKPOINTS), 2)),
                             rtol=1e-6)
  assert np.all(np.diff(np.asarray(x[:, :, 0]), axis=0) < 0)  # a fed fragment learns
  assert np.all(x[-1] > 0)


def test_forgetting_undoes_at_most_what_was_learned():
  p = analytic.init_params(F)
  p = p._replace(forget_2xFxF=jnp.full((2, F, F), 3.0))  # strong forgetting everywhere
  order = np.stack([orders.blocked(POOLS, [0, 1, 2], key=jax.random.key(1), steps=T,
                                   batch_size=B)])
  x = np.asarray(analytic.rollout_many(p, X0, _feats(order), CHECKPOINTS)[0])
  assert np.all(x <= np.asarray(X0)[None] + 1e-5)


def test_fit_recovers_its_own_rollouts_on_held_out_orders():
  key = jax.random.key(3)
  k_truth, k_fit, k_held = jax.random.split(key, 3)
  a, b, c = jax.random.split(k_truth, 3)
  start = analytic.init_params(F)
  truth = start._replace(
      transfer_2xFxF=start.transfer_2xFxF + 0.3 * jax.random.normal(a, (2, F, F)),
      forget_2xFxF=-1.0 + jax.random.normal(b, (2, F, F)),
      floor_2xF=0.5 * jax.random.normal(c, (2, F)))
  fit_orders, held_orders = _orders(24, k_fit), _orders(16, k_held)
  target = analytic.rollout_many(truth, X0, _feats(fit_orders), CHECKPOINTS)
  got = analytic.fit(X0[None], _feats(fit_orders), CHECKPOINTS, target[None], steps=800)
  assert got.mse.shape == (1,)
  params = jax.tree.map(lambda a: a[0], got.params)
  want = np.asarray(analytic.rollout_many(truth, X0, _feats(held_orders), CHECKPOINTS))[:, -1]
  pred = np.asarray(analytic.rollout_many(params, X0, _feats(held_orders), CHECKPOINTS))[:, -1]
  spread = want.std(0)  # how much the held-out orders differ, per fragment and row
  assert np.sqrt(np.mean((pred - want) ** 2)) < 0.2 * spread.mean()
  for f in range(F):  # the held-out orders' ranking per fragment (final probe loss)
    r = np.corrcoef(np.argsort(np.argsort(pred[:, 0, f])), np.argsort(np.argsort(want[:, 0, f])))
    assert r[0, 1] > 0.8


def test_adam_form_steps_hard_on_a_fragment_fed_after_an_absence():
  """Adam's normalised step: a fragment first fed half-way moves, against one fed all along,
  more than under the plain form (its second moment averages the steps it was not fed)."""
  p = analytic.init_params(F)._replace(fast_2xF=jnp.full((2, F), -30.0),
                                        shared_F=jnp.full((F,), -30.0))
  half = T // 2
  late = np.stack([np.concatenate([np.tile([10, 11, 12, 13], (half, 1)),
                                   np.tile([0, 1, 2, 3], (T - half, 1))])])
  along = np.stack([np.tile([0, 1, 2, 3], (T, 1))])
  step_C = jnp.asarray([T - 10, T])

  def drop_ratio(q, betas):  # fragment 0's probe loss drop over the last 10 steps, late / along
    x_late, x_along = (np.asarray(analytic.rollout_many(q, X0, _feats(o), step_C, betas))[0]
                       for o in (late, along))
    return (x_late[0, 0, 0] - x_late[1, 0, 0]) / (x_along[0, 0, 0] - x_along[1, 0, 0])

  # Fed all along at share 1, Adam's step is 1 / F: the plain form with A / F takes the same.
  plain = p._replace(transfer_2xFxF=p.transfer_2xFxF / F)
  assert drop_ratio(p, (0.9, 0.999)) > 1.1 * drop_ratio(plain, None) > 0


def _final_losses(truth, got, held_orders, betas):
  """(the world's, the fit's) final losses of held-out orders; `got` a one-seed fit."""
  params = jax.tree.map(lambda a: a[0], got.params)
  return tuple(np.asarray(analytic.rollout_many(p, X0, _feats(held_orders), CHECKPOINTS,
                                                betas))[:, -1] for p in (truth, params))


def test_adam_form_fit_recovers_its_own_rollouts():
  betas = (0.9, 0.999)
  start = analytic.init_params(F)
  truth = start._replace(
      transfer_2xFxF=start.transfer_2xFxF + 0.3 * jax.random.normal(jax.random.key(7), (2, F, F)),
      shared_F=jnp.asarray([2.0, -2.0, 0.0]))
  fit_orders, held_orders = _orders(24, jax.random.key(8)), _orders(12, jax.random.key(9))
  target = analytic.rollout_many(truth, X0, _feats(fit_orders), CHECKPOINTS, betas)
  got = analytic.fit(X0[None], _feats(fit_orders), CHECKPOINTS, target[None], steps=800,
                     betas=betas)
  want, pred = _final_losses(truth, got, held_orders, betas)
  assert np.sqrt(np.mean((pred - want) ** 2)) < 0.2 * want.std(0).mean()


def test_fit_ignores_missing_targets():
  fit_orders = _orders(8, jax.random.key(5))
  target = np.array(analytic.rollout_many(analytic.init_params(F), X0, _feats(fit_orders),
                                          CHECKPOINTS))
  target[:, :, 1, 2] = np.nan  # fragment 2 has no evaluated train example
  got = analytic.fit(X0[None], _feats(fit_orders), CHECKPOINTS, target[None], steps=50)
  assert np.isfinite(got.mse).all() and float(got.mse[0]) < 1e-3


@pytest.mark.parametrize("bad", [np.zeros((T, B)) - 1])
def test_features_of_an_empty_order_are_zero_shares(bad):
  feats = analytic.features(bad.astype(int), FRAGMENT_E, TRAIN_W_FxE, np.ones(T))
  assert float(feats.share_TxF.sum()) == 0.0


def _random_params(key, latent=False):
  """Coefficients away from the start, so every term shapes the gradient."""
  p = analytic.init_latent(F, 4) if latent else analytic.init_params(F)
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [a + 0.3 * jax.random.normal(k, a.shape)
                                   for a, k in zip(leaves, keys)])


def test_soft_features_are_the_expected_features_of_phased_mixtures():
  weights = np.array([[0.6, 0.4, 0.0], [0.1, 0.2, 0.7]])
  lengths = orders.phase_lengths(T, 2)
  phase_T = np.repeat(np.arange(2), lengths)
  seen_F = np.array([B / len(p) for p in POOLS])  # every fragment has evaluated examples
  soft = analytic.soft_features(jnp.log(jnp.asarray(weights) + 1e-30), phase_T, seen_F,
                                jnp.ones(T))
  drawn = np.stack([orders.phased_mixture(POOLS, weights, key=jax.random.key(i), steps=T,
                                          batch_size=B) for i in range(400)])
  got = analytic.features(drawn, FRAGMENT_E, TRAIN_W_FxE, np.ones(T))
  np.testing.assert_allclose(np.mean(got.share_TxF, (0, 1)), np.mean(soft.share_TxF, 0),
                             atol=0.01)
  for p in range(2):
    sel = phase_T == p
    np.testing.assert_allclose(np.mean(got.seen_TxF[:, sel], (0, 1)),
                               np.mean(soft.seen_TxF[sel], 0), atol=0.02)
    assert not np.asarray(got.share_TxF)[:, sel][..., weights[p] == 0].any()


@pytest.mark.parametrize("form", ["plain", "latent"])
def test_the_phase_objective_has_the_gradient_finite_differences_give(form):
  betas = (0.9, 0.999) if form == "latent" else None
  params = jax.tree.map(lambda a: jnp.stack([a, a * 0.9]),
                        _random_params(jax.random.key(4), latent=form == "latent"))
  x0 = jnp.stack([X0, X0 * 1.1])
  phase_T = jnp.asarray(np.repeat(np.arange(2), orders.phase_lengths(T, 2)))
  seen_F = jnp.asarray([B / len(p) for p in POOLS], jnp.float32)
  lr = jnp.ones(T)
  weight = jnp.asarray([[1.0, 0.5, 2.0]] * 2)
  logits = jnp.asarray([[0.3, -0.2, 0.1], [-0.5, 0.4, 0.0]])
  # Checked with and without the trust region's penalty (its radius inside the start).
  for max_kl, penalty in ((np.inf, 0.0), (0.01, 5.0)):
    f = lambda z: analytic.phase_objective(z, params, x0, phase_T, seen_F, lr, weight,  # noqa
                                           betas, max_kl, penalty)
    grad = np.asarray(jax.grad(f)(logits), np.float64)
    eps = 1e-2
    fd = np.zeros_like(grad)
    for idx in np.ndindex(grad.shape):
      step = np.zeros(grad.shape, np.float32)
      step[idx] = eps
      fd[idx] = (float(f(logits + step)) - float(f(logits - step))) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=0.03, atol=2e-4)
    assert np.abs(grad).max() > 1e-3  # not a trivially flat objective


def _latent_truth(key):
  """A latent world away from the start: centres moved, curvatures and rates uneven."""
  p = analytic.init_latent(F, 4)
  a, b, c = jax.random.split(key, 3)
  return p._replace(centre_2xFxK=p.centre_2xFxK + 0.4 * jax.random.normal(a, (2, F, 4)),
                    curvature_2xFxK=jax.random.normal(b, (2, F, 4)),
                    floor_2xF=0.5 * jax.random.normal(c, (2, F)),
                    rate_K=jnp.asarray([0.5, -0.5, 0.0, 1.0]))


@pytest.mark.parametrize("betas", [(0.9, 0.999), None])
def test_latent_form_starts_at_x0_and_a_fragment_learns_from_its_own_examples(betas):
  p = analytic.init_latent(F, 4)._replace(fast_2xF=jnp.full((2, F), -30.0))
  order = np.stack([orders.subset(POOLS, [0], key=jax.random.key(0), steps=T, batch_size=B)])
  x = np.asarray(analytic.rollout_many(p, X0, _feats(order), CHECKPOINTS, betas)[0])
  assert x.shape == (len(CHECKPOINTS), 2, F)
  np.testing.assert_allclose(x[0], X0, rtol=1e-6)
  # The fed fragment learns, probes and train (Adam may overshoot its minimum a little late
  # on, so the losses need not fall at every checkpoint).
  assert np.all(x[1:, :, 0] < x[0, :, 0])
  # The fed fragment moves most: its probes' drop is larger than any unfed fragment's change.
  drop = x[0, 0] - x[-1, 0]
  assert drop[0] > np.abs(drop[1:]).max()
  assert np.all(x > 0)


def test_latent_form_feeding_a_fragment_with_an_opposite_centre_hurts():
  # Fragments 0 and 1 are curved along coordinate 0 only, fragment 2 along 2 only; 1's
  # centre is 0's reflected. Pulling theta towards one pushes it away from the other, so
  # feeding 0 alone raises 1's loss (interference), and feeding 2 barely moves 1.
  p = analytic.init_latent(F, 4)._replace(fast_2xF=jnp.full((2, F), -30.0))
  c0, c2 = jnp.asarray([1.0, 0.0, 0.0, 0.0]), jnp.asarray([0.0, 0.0, 1.0, 0.0])
  centre = jnp.stack([c0, -c0, c2])
  curved = jnp.where(jnp.stack([c0, c0, c2]) > 0, 0.0, -30.0)
  p = p._replace(centre_2xFxK=jnp.stack([centre, centre]),
                 curvature_2xFxK=jnp.stack([curved, curved]))
  final = {}
  for f in (0, 2):
    order = np.stack([orders.subset(POOLS, [f], key=jax.random.key(1), steps=T, batch_size=B)])
    final[f] = np.asarray(analytic.rollout_many(p, X0, _feats(order), CHECKPOINTS,
                                                (0.9, 0.999)))[0, -1, 0]
  assert final[0][1] > X0[0, 1] and final[0][0] < X0[0, 0]
  assert abs(final[2][1] - X0[0, 1]) < 0.1 * abs(final[0][1] - X0[0, 1])


def test_latent_form_fit_recovers_a_known_world_on_held_out_orders():
  """The synthetic world's coefficients are known (`_latent_truth`); the fit, from the
  library's start, ranks held-out orders as the world does."""
  betas = (0.9, 0.999)
  truth = _latent_truth(jax.random.key(10))
  fit_orders, held_orders = _orders(24, jax.random.key(11)), _orders(16, jax.random.key(12))
  target = analytic.rollout_many(truth, X0, _feats(fit_orders), CHECKPOINTS, betas)
  # The library's default steps: with 800 the fit is still far from the world (its held-out
  # error about a third of the orders' spread).
  got = analytic.fit(X0[None], _feats(fit_orders), CHECKPOINTS, target[None], steps=2000,
                     betas=betas, start=analytic.init_latent(F, 4))
  assert isinstance(got.params, analytic.LatentParams)
  want, pred = _final_losses(truth, got, held_orders, betas)
  assert np.sqrt(np.mean((pred - want) ** 2)) < 0.2 * want.std(0).mean()
  for f in range(F):
    r = np.corrcoef(np.argsort(np.argsort(pred[:, 0, f])), np.argsort(np.argsort(want[:, 0, f])))
    assert r[0, 1] > 0.8


@pytest.mark.parametrize("n", [1, 7, 13])
def test_rollout_blocks_equals_one_vmapped_call_for_any_count(n):
  # Blocks of 4 orders, the last one padded: the same losses as one call over all n, in
  # order, for either form (with Adam's betas, where the state is largest).
  order_NxTxB = _orders(n, jax.random.key(n))
  feats = _feats(order_NxTxB)
  for p in (analytic.init_params(F), analytic.init_latent(F)):
    one = np.asarray(analytic.rollout_many(p, X0, feats, jnp.asarray(CHECKPOINTS), (0.9, 0.99)))
    blocks = analytic.rollout_blocks(p, X0, feats, jnp.asarray(CHECKPOINTS), (0.9, 0.99),
                                     block=4)
    assert blocks.shape == (n, len(CHECKPOINTS), 2, F)
    np.testing.assert_allclose(blocks, one, rtol=1e-5, atol=1e-6)
  empty = analytic.Features(*(np.asarray(a)[:0] for a in feats))
  assert analytic.rollout_blocks(p, X0, empty, jnp.asarray(CHECKPOINTS)).shape == (
      0, len(CHECKPOINTS), 2, F)
