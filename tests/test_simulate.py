"""The simulator: vmapped equals looped, determinism, compile once, devices, divergence, learning."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from surrogate import model as model_lib
from surrogate import optim, orders, prefix
from surrogate.datasets import python_docs
from surrogate.prepare import prepare
from surrogate.simulate import (
  DIVERGED_LOSS_FACTOR,
  PER_ORDER,
  OrderAxes,
  Sharing,
  SimPlan,
  compiled_count,
  simulate,
  simulate_many,
)

# Distinct sizes: N=3 orders, T=10 steps, B=3, L=12, D=16, F=3, eval every 4 (padded tail).
CFG = model_lib.ModelConfig(vocab_size=300, length=12, width=16, depth=2, heads=2, mlp_ratio=2)
OPT = optim.OptimizerConfig(lr=3e-3, weight_decay=0.01, warmup_steps=2, schedule="linear")
PLAN = SimPlan(eval_every=4, eval_chunk=5)
T, B = 10, 3
# The module (the package's `simulate` attribute is the function of that name).
simulate_lib = importlib.import_module("surrogate.simulate")


@pytest.fixture(scope="module")
def setup():
  frags = python_docs(("try", "import", "async"), max_train=9, max_probe=4)
  prep = prepare(frags, CFG, key=jax.random.key(0), eval_train=2, diag_probes=2)
  params = model_lib.init_params(jax.random.key(1), CFG)
  pools = frags.train_pools()
  order_NxTxB = np.stack([orders.shuffled(pools, key=jax.random.key(i), steps=T, batch_size=B)
                          for i in range(3)])
  lr_T = optim.learning_rates(OPT, T)
  return prep, params, order_NxTxB, lr_T


def _many(setup, order_NxTxB=None, **kw):
  prep, params, orders_, lr_T = setup
  return simulate_many(params, optim.Knobs.identity(),
                       orders_ if order_NxTxB is None else order_NxTxB, lr_T, prep.data,
                       model_cfg=CFG, opt_cfg=OPT, plan=PLAN, progress=False, **kw)


def _assert_trees_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


def test_shapes_and_checkpoints(setup):
  prep = setup[0]
  out = _many(setup)
  m, f = prep.data.eval_idx_M.shape[0], len(prep.fragments.names)
  assert out.eval_loss_CxM.shape == (3, 4, m)  # checkpoints after 0, 4, 8, 10 steps
  np.testing.assert_array_equal(PLAN.checkpoint_steps(T), [0, 4, 8, 10])
  assert out.train_loss_T.shape == (3, T)
  assert all(d.shape == (3, 4, f) for d in out.diagnostics)
  np.testing.assert_array_equal(out.diverged_step, -1)
  assert np.isfinite(out.eval_loss_CxM).all() and np.isfinite(out.train_loss_T).all()
  # All orders start from the same state, so step-0 evals and diagnostics agree.
  np.testing.assert_allclose(out.eval_loss_CxM[:, 0], out.eval_loss_CxM[:1, 0].repeat(3, 0))
  np.testing.assert_allclose(out.diagnostics.embedding_drift[:, 0], 0.0, atol=1e-7)
  np.testing.assert_allclose(out.diagnostics.logit_shift[:, 0], 0.0, atol=1e-6)
  assert (out.diagnostics.embedding_drift[:, -1] > 0).all()
  assert (out.diagnostics.plasticity[:, -1] > 0).all()


def test_vmapped_equals_looped(setup):
  prep, params, order_NxTxB, lr_T = setup
  many = _many(setup)
  one = jax.jit(lambda o: simulate(params, optim.Knobs.identity(), o, jnp.asarray(lr_T),
                                   prep.data, model_cfg=CFG, opt_cfg=OPT, plan=PLAN))
  for n in range(3):
    _assert_trees_close(jax.tree.map(lambda a: a[n], many), one(order_NxTxB[n]),
                        rtol=2e-4, atol=2e-5)


def test_deterministic_and_compiles_once(setup):
  first = _many(setup)
  count = compiled_count()
  again = _many(setup)
  new_orders = setup[2][::-1] % 7  # different orders, same shape
  _many(setup, new_orders)
  assert compiled_count() == count, "a second call with new orders must not retrace"
  _assert_trees_close(first, again, rtol=0, atol=0)


def test_chunks_and_devices_do_not_change_results(setup):
  assert len(jax.devices()) == 4, "conftest forces 4 host devices"
  four = _many(setup, chunk_size=4)
  one = _many(setup, chunk_size=1, devices=jax.devices()[:1])
  _assert_trees_close(four, one, rtol=2e-4, atol=2e-5)


def test_a_loss_that_explodes_but_stays_finite_is_divergence(setup):
  prep, params, order_NxTxB, lr_T = setup
  # Adam's steps are bounded by the rate, so a far too high one blows the loss up by orders
  # of magnitude without ever producing inf or NaN.
  knobs = optim.Knobs(jnp.array([1.0, 3e4, 1.0]), jnp.ones(3))
  out = simulate_many(params, knobs, order_NxTxB, lr_T, prep.data, model_cfg=CFG, opt_cfg=OPT,
                      plan=PLAN, progress=False, axes=OrderAxes(knobs=0))
  step = int(out.diverged_step[1])
  assert step > 0 and (out.diverged_step[[0, 2]] == -1).all()
  loss_T = np.asarray(out.train_loss_T[1])
  assert np.isfinite(loss_T[:step + 1]).all()
  ref = max(loss_T[0], np.log(CFG.vocab_size))
  assert loss_T[step] > DIVERGED_LOSS_FACTOR * ref >= loss_T[:step].max()


def test_divergence_is_reported_for_that_order_alone(setup):
  prep, params, order_NxTxB, lr_T = setup
  knobs = optim.Knobs(jnp.array([1.0, 1e12, 1.0]), jnp.ones(3))
  out = simulate_many(params, knobs, order_NxTxB, lr_T, prep.data, model_cfg=CFG, opt_cfg=OPT,
                      plan=PLAN, progress=False, axes=OrderAxes(knobs=0))
  calm = _many(setup)
  assert out.diverged_step[1] >= 0 and (out.diverged_step[[0, 2]] == -1).all()
  after = PLAN.checkpoint_steps(T) > out.diverged_step[1]
  assert np.isnan(out.eval_loss_CxM[1, after]).all()
  for n in (0, 2):
    _assert_trees_close(jax.tree.map(lambda a: a[n], out), jax.tree.map(lambda a: a[n], calm),
                        rtol=2e-4, atol=2e-5)


def test_padding_slots_and_empty_steps_are_skipped(setup):
  prep, params, order_NxTxB, lr_T = setup
  padded = np.concatenate([order_NxTxB[:1], np.full((1, 3, B), -1, np.int32)], axis=1)
  plan = SimPlan(eval_every=13, eval_chunk=5)
  lr = np.concatenate([lr_T, np.full(3, 1.0, np.float32)])  # a huge lr on empty steps: unused
  kw = dict(model_cfg=CFG, opt_cfg=OPT, plan=plan, progress=False)
  a = simulate_many(params, optim.Knobs.identity(), padded, lr, prep.data, **kw)
  b = simulate_many(params, optim.Knobs.identity(), order_NxTxB[:1], lr_T, prep.data, **kw)
  np.testing.assert_allclose(a.eval_loss_CxM[:, -1], b.eval_loss_CxM[:, -1], rtol=1e-5)
  assert np.isnan(a.train_loss_T[0, T:]).all()


def test_training_on_one_fragment_teaches_it_not_the_untouched_one():
  """Real text: feeding only fragment A lowers A's probe loss far more than untouched C's."""
  cfg = model_lib.ModelConfig(vocab_size=400, length=24, width=32, depth=2, heads=2)
  frags = python_docs(("string-methods", "debugger", "compound"), max_train=40, max_probe=10)
  prep = prepare(frags, cfg, key=jax.random.key(0), eval_train=0, diag_probes=2)
  opt = optim.OptimizerConfig(lr=3e-3)
  steps = 150
  order = orders.subset(frags.train_pools(), [0], key=jax.random.key(3), steps=steps,
                        batch_size=8)
  out = simulate_many(model_lib.init_params(jax.random.key(2), cfg), optim.Knobs.identity(),
                      order[None], optim.learning_rates(opt, steps), prep.data, model_cfg=cfg,
                      opt_cfg=opt, plan=SimPlan(eval_every=30, diagnostics=False),
                      progress=False)
  probe_CxF = out.eval_loss_CxM[0] @ np.asarray(prep.data.probe_weight_FxM).T
  drop_CxF = probe_CxF[0] - probe_CxF
  a, c = 0, 2
  # A's probe loss falls, and stays down (it may creep back up late, from memorization).
  assert (probe_CxF[1:, a] < probe_CxF[0, a] - 1.0).all(), probe_CxF[:, a]
  # ...and from the first checkpoint on, A gained more than the fragment never fed.
  assert (drop_CxF[1:, a] > drop_CxF[1:, c] + 0.1).all(), drop_CxF
  assert probe_CxF[-1, a] < probe_CxF[-1, c], probe_CxF[-1]


def test_gradient_push_goes_to_the_fragments_fed(setup):
  prep, _, _, _ = setup
  pools = prep.fragments.train_pools()
  only_first = orders.subset(pools, [0], key=jax.random.key(3), steps=T, batch_size=B)
  out = _many(setup, np.stack([only_first, setup[2][0]]))
  push_CxF = out.grad_push_CxF
  assert push_CxF.shape[0] == 2 and push_CxF.shape[2] == 3
  # Cumulative: zero at step 0, never falling.
  assert (push_CxF[:, 0] == 0).all() and (np.diff(push_CxF, axis=1) >= 0).all()
  push = push_CxF[:, -1]
  assert push[0, 0] > 0 and (push[0, 1:] == 0).all()
  # A shuffled order pushes every fragment; each step's push is at most 1 per fed token share.
  assert (push[1] > 0).all() and push[1].sum() <= T + 1e-5
  # Output entropy: a positive number of nats, at most ln V.
  ent = out.diagnostics.entropy
  assert ((ent > 0) & (ent <= np.log(CFG.vocab_size) + 1e-4)).all()


def _branched(order_NxTxB):
  """Five orders: 0, 0 changed from step 8, 0 changed from step 4, 1, and 0 again."""
  a, b, c = order_NxTxB
  late, early = a.copy(), a.copy()
  late[8:], early[4:] = c[8:], c[4:]
  return np.stack([a, late, early, b, a])


def test_prefix_tree_groups_orders_by_their_common_prefix(setup):
  o = _branched(setup[2])
  lrs = np.broadcast_to(setup[3], (5, T))
  seg_o, seg_lr = prefix.segment_orders(o, lrs, PLAN.eval_every)
  assert seg_o.shape == (5, 3, 4, B) and (seg_o[:, -1, 2:] == -1).all()  # tail padded empty
  tree = prefix.prefix_tree(seg_o, seg_lr, np.zeros(5, np.int64))
  # After segment 1 (steps 0-3) orders 0, 1, 2, 4 are alike; after 2 only 0, 1, 4; then 0, 4.
  assert [len(f) for f in tree.first_S] == [2, 3, 4]
  for s, alike in enumerate([[0, 1, 2, 4], [0, 1, 4], [0, 4]]):
    assert len(set(tree.node_SxN[s, alike])) == 1
    assert len(set(tree.node_SxN[s])) == 5 - len(alike) + 1
  assert tree.saved() == pytest.approx(1 - 9 / 15)
  # Each node's parent is the node its orders were in one segment earlier.
  for s in range(1, 3):
    np.testing.assert_array_equal(tree.parent_S[s][tree.node_SxN[s]], tree.node_SxN[s - 1])
  # Different roots (initial states) never share; a different learning rate neither.
  assert prefix.prefix_tree(seg_o, seg_lr, np.arange(5)).saved() == 0
  lr2 = seg_lr.copy()
  lr2[4, 0, 1] *= 1.0001  # (step 0 of the warm-up has rate 0)
  assert len(set(prefix.prefix_tree(seg_o, lr2, np.zeros(5, np.int64)).node_SxN[2, [0, 4]])) == 2


def test_roots_are_equal_for_equal_initial_states():
  a, b = np.arange(6.0).reshape(3, 2), np.array([[1], [2], [3]])
  np.testing.assert_array_equal(prefix.roots_of([a[[0, 1, 0]], b]), [0, 1, 2])
  np.testing.assert_array_equal(prefix.roots_of([a[[0, 1, 0]], b[[0, 1, 0]]]), [0, 1, 0])


def test_prefix_sharing_gives_the_same_results(setup):
  prep, params, order_NxTxB, lr_T = setup
  o = _branched(order_NxTxB)
  # Two initial states (orders 0, 1, 4 from one, 2 and 3 from another), and a learning-rate
  # scale that makes order 1 diverge after it parts from the others.
  params_N = jax.tree.map(lambda a, b: np.stack([a, a, b, b, a]), params,
                          model_lib.init_params(jax.random.key(7), CFG))
  knobs = optim.Knobs(jnp.array([1.0, 1e12, 1.0, 1.0, 1.0]), jnp.ones(5))
  kw = {"model_cfg": CFG, "opt_cfg": OPT, "plan": PLAN, "progress": False, "axes": PER_ORDER}
  plain = simulate_many(params_N, knobs, o, lr_T, prep.data, sharing=Sharing.NEVER, **kw)
  shared = simulate_many(params_N, knobs, o, lr_T, prep.data, sharing=Sharing.ALWAYS, **kw)
  assert plain.diverged_step[1] >= 0 and (np.delete(plain.diverged_step, 1) == -1).all()
  _assert_trees_close(shared, plain, rtol=2e-4, atol=2e-5)
  count = compiled_count()
  rev = lambda t: jax.tree.map(lambda a: a[::-1], t)
  again = simulate_many(rev(params_N), rev(knobs), o[::-1], lr_T, prep.data,
                        sharing=Sharing.ALWAYS, **kw)
  assert compiled_count() == count, "a second shared call must not retrace"
  _assert_trees_close(again, rev(shared), rtol=2e-4, atol=2e-5)


def test_sharing_is_chosen_when_it_saves_enough(setup, monkeypatch):
  o = np.repeat(setup[2][:1], 4, 0)  # four identical orders: 3/4 of the work is shared
  calls = []
  real = simulate_lib._simulate_shared
  monkeypatch.setattr(simulate_lib, "_simulate_shared",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  _many(setup, o)
  assert not calls, "3 orders' worth saved is below SHARE_MIN_ORDERS: not worth a compilation"
  monkeypatch.setattr(simulate_lib, "SHARE_MIN_ORDERS", 2)
  out = _many(setup, o)
  assert calls
  _assert_trees_close(out, _many(setup, o, sharing=Sharing.NEVER), rtol=2e-4, atol=2e-5)


def test_sharers_are_sorted_together_across_blocks(setup, monkeypatch):
  o = _branched(setup[2])[[0, 3, 1, 4, 2]]  # sharers apart: 0, 2, 3 and 4 begin alike
  seg_o, seg_lr = prefix.segment_orders(o, np.broadcast_to(setup[3], (5, T)), PLAN.eval_every)
  h = prefix.segment_hashes(seg_o, seg_lr, rows=2)  # row batches of 2: the same hashes
  np.testing.assert_array_equal(h, prefix.segment_hashes(seg_o, seg_lr))
  assert (h[[0, 2, 3, 4], 0] == h[0, 0]).all() and h[1, 0] != h[0, 0]
  monkeypatch.setattr(simulate_lib, "SHARE_BLOCK", 2)
  blocks = simulate_lib._prefix_blocks(None, None, seg_o, seg_lr, check=False)
  assert [len(b.sel_N) for b in blocks] == [2, 2, 1]
  perm = np.concatenate([b.sel_N for b in blocks])
  at = np.sort(np.nonzero(np.isin(perm, [0, 2, 3, 4]))[0])
  np.testing.assert_array_equal(at, np.arange(at[0], at[0] + 4))  # the sharers are adjacent
  assert sum(b.tree.saved() > 0 for b in blocks) >= 1
  _assert_trees_close(_many(setup, o, sharing=Sharing.ALWAYS),
                      _many(setup, o, sharing=Sharing.NEVER), rtol=2e-4, atol=2e-5)


def test_order_axes_are_declared_and_checked(setup):
  prep, params, order_NxTxB, lr_T = setup
  kw = dict(model_cfg=CFG, opt_cfg=OPT, plan=PLAN, progress=False)
  n = len(order_NxTxB)
  params_N = jax.tree.map(lambda a: np.stack([a] * n), params)
  with pytest.raises(ValueError, match=r"params0 does not match OrderAxes\(params=None\)"):
    simulate_many(params_N, optim.Knobs.identity(), order_NxTxB, lr_T, prep.data, **kw)
  with pytest.raises(ValueError, match=r"knobs.lr_scale has shape \(\)"):
    simulate_many(params_N, optim.Knobs.identity(), order_NxTxB, lr_T, prep.data,
                  axes=PER_ORDER, **kw)
  # Declared per order, the same state for every order gives the shared result.
  same = simulate_many(params_N, optim.Knobs.identity(), order_NxTxB, lr_T, prep.data,
                       axes=OrderAxes(params=0), **kw)
  _assert_trees_close(same, _many(setup), rtol=2e-4, atol=2e-5)
