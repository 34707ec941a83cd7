"""Tests for surrogate.orders: shapes, validity, determinism, feeding rules."""

from __future__ import annotations

import json
import math

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest

from surrogate import orders

# Three fragments of distinct sizes (5, 7, 4) at interleaved, non-contiguous
# positions; positions 5, 8, 14 and 18 stand for probe examples (in no pool).
POOLS = (
    np.array([0, 4, 9, 13, 17]),
    np.array([1, 3, 6, 10, 12, 15, 19]),
    np.array([2, 7, 11, 16]),
)
F = len(POOLS)
FRAGMENT_OF = np.full(20, -1)
for _f, _pool in enumerate(POOLS):
  FRAGMENT_OF[_pool] = _f
UNION = np.sort(np.concatenate(POOLS))
T, B = 11, 3

# name -> generator called with (key, steps, batch_size).
GENERATORS = {
    "shuffled": lambda key, steps, bs: orders.shuffled(
        POOLS, key=key, steps=steps, batch_size=bs),
    "blocked": lambda key, steps, bs: orders.blocked(
        POOLS, [0, 1, 0, 2], key=key, steps=steps, batch_size=bs,
        shares=[1, 2, 1, 1]),
    "interleaved": lambda key, steps, bs: orders.interleaved(
        POOLS, [2, 0, 2, 1], key=key, steps=steps, batch_size=bs),
    "mixture": lambda key, steps, bs: orders.mixture(
        POOLS, [3.0, 0.0, 1.0], key=key, steps=steps, batch_size=bs),
    "curriculum": lambda key, steps, bs: orders.curriculum(
        POOLS, [0.5, 0.1, 0.9], key=key, steps=steps, batch_size=bs),
    "subset": lambda key, steps, bs: orders.subset(
        POOLS, [0, 2], key=key, steps=steps, batch_size=bs),
}


def _step_fragments(order_TxB: np.ndarray) -> np.ndarray:
  """The single fragment of each step; fails if a step mixes fragments."""
  frag_TxB = FRAGMENT_OF[order_TxB]
  assert np.all(frag_TxB == frag_TxB[:, :1]), frag_TxB
  return frag_TxB[:, 0]


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
  """Run-length encoding: [(value, length), ...]."""
  out: list[tuple[int, int]] = []
  for v in values.tolist():
    if out and out[-1][0] == v:
      out[-1] = (v, out[-1][1] + 1)
    else:
      out.append((v, 1))
  return out


# ---------------------------------------------------------------- common


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_shape_dtype_and_valid_positions(name):
  order = GENERATORS[name](jax.random.key(0), T, B)
  assert order.shape == (T, B)
  assert order.dtype == np.int32
  assert np.isin(order, UNION).all(), order


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_same_key_same_order_other_key_other_order(name):
  gen = GENERATORS[name]
  a = gen(jax.random.key(1), T, B)
  np.testing.assert_array_equal(a, gen(jax.random.key(1), T, B))
  assert not np.array_equal(a, gen(jax.random.key(2), T, B))


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_rejects_bad_shape_and_key(name):
  gen = GENERATORS[name]
  with pytest.raises(ValueError, match="steps"):
    gen(jax.random.key(0), 0, B)
  with pytest.raises(ValueError, match="batch_size"):
    gen(jax.random.key(0), T, 0)
  with pytest.raises(ValueError, match="key"):
    gen(0, T, B)


def test_rejects_bad_pools():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="empty"):
    orders.shuffled([], key=key, steps=2, batch_size=2)
  with pytest.raises(ValueError, match=r"pools\[1\] is empty"):
    orders.shuffled([np.array([0]), np.array([], int)], key=key, steps=2,
                    batch_size=2)
  with pytest.raises(ValueError, match="integer"):
    orders.shuffled([np.array([0.5])], key=key, steps=2, batch_size=2)
  with pytest.raises(ValueError, match="outside"):
    orders.shuffled([np.array([-1, 2])], key=key, steps=2, batch_size=2)


# ---------------------------------------------------------------- shuffled


def test_shuffled_one_epoch_feeds_each_example_once():
  order = orders.shuffled(POOLS, key=jax.random.key(3), steps=8, batch_size=2)
  np.testing.assert_array_equal(np.sort(order.ravel()), UNION)


def test_shuffled_epochs_are_fresh_permutations():
  flat = orders.shuffled(POOLS, key=jax.random.key(4), steps=8,
                         batch_size=6).ravel()
  epochs = flat.reshape(3, UNION.size)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), UNION)
  assert not np.array_equal(epochs[0], epochs[1])


# ---------------------------------------------------------------- blocked


def test_blocked_blocks_hold_their_fragment_and_follow_shares():
  order = GENERATORS["blocked"](jax.random.key(0), T, B)
  # Ideal lengths 2.2, 4.4, 2.2, 2.2 floor to 2, 4, 2, 2; the leftover step
  # goes to the largest remainder (0.4, the second block).
  assert _runs(_step_fragments(order)) == [(0, 2), (1, 5), (0, 2), (2, 2)]


def test_blocked_default_equal_shares_and_epochs_within_block():
  order = orders.blocked(POOLS, [2, 1], key=jax.random.key(0), steps=8,
                         batch_size=2)
  assert _runs(_step_fragments(order)) == [(2, 4), (1, 4)]
  # Fragment 2's block holds 8 slots = two full epochs of its 4 examples.
  block = order[:4].ravel()
  for epoch in block.reshape(2, 4):
    np.testing.assert_array_equal(np.sort(epoch), POOLS[2])


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    shares=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=6).filter(
        lambda s: sum(s) > 0.01),
    steps=st.integers(1, 40))
def test_blocked_lengths_sum_to_steps_and_track_shares(shares, steps):
  # Alternate fragments so no two neighbouring blocks merge into one run.
  sequence = [i % 2 for i in range(len(shares))]
  order = orders.blocked(POOLS, sequence, key=jax.random.key(0), steps=steps,
                         batch_size=1, shares=shares)
  assert order.shape == (steps, 1)
  lengths = orders._round_shares(np.array(shares), steps)
  assert lengths.sum() == steps
  ideal = np.array(shares) / sum(shares) * steps
  assert np.all(np.abs(lengths - ideal) < 1.0), (lengths, ideal)
  assert np.all(lengths[np.array(shares) == 0] == 0)
  expected = np.repeat(sequence, lengths)
  np.testing.assert_array_equal(FRAGMENT_OF[order[:, 0]], expected)


def test_blocked_rejects_bad_arguments():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="sequence"):
    orders.blocked(POOLS, [0, 3], key=key, steps=4, batch_size=2)
  with pytest.raises(ValueError, match="sequence"):
    orders.blocked(POOLS, [], key=key, steps=4, batch_size=2)
  with pytest.raises(ValueError, match="shares"):
    orders.blocked(POOLS, [0, 1], key=key, steps=4, batch_size=2,
                   shares=[1.0])
  with pytest.raises(ValueError, match="shares"):
    orders.blocked(POOLS, [0, 1], key=key, steps=4, batch_size=2,
                   shares=[0.0, 0.0])
  with pytest.raises(ValueError, match="shares"):
    orders.blocked(POOLS, [0, 1], key=key, steps=4, batch_size=2,
                   shares=[1.0, -1.0])


# ---------------------------------------------------------------- interleaved


def test_interleaved_step_t_holds_fragment_sequence_t_mod_k():
  sequence = [2, 0, 2, 1]
  order = GENERATORS["interleaved"](jax.random.key(0), T, B)
  expected = np.array(sequence)[np.arange(T) % len(sequence)]
  np.testing.assert_array_equal(_step_fragments(order), expected)


def test_interleaved_default_sequence_and_own_epochs():
  order = orders.interleaved(POOLS, key=jax.random.key(5), steps=12,
                             batch_size=4)
  np.testing.assert_array_equal(_step_fragments(order), np.arange(12) % F)
  # Fragment 2 (4 examples) gets steps 2, 5, 8, 11: four full epochs.
  stream = order[2::3].ravel()
  for epoch in stream.reshape(4, 4):
    np.testing.assert_array_equal(np.sort(epoch), POOLS[2])


def test_interleaved_rejects_bad_sequence():
  with pytest.raises(ValueError, match="sequence"):
    orders.interleaved(POOLS, [0, 5], key=jax.random.key(0), steps=4,
                       batch_size=2)


# ---------------------------------------------------------------- mixture


def test_mixture_shares_match_weights_and_zero_weight_is_never_fed():
  weights = np.array([3.0, 0.0, 1.0])
  steps, bs = 1000, 4
  order = orders.mixture(POOLS, weights, key=jax.random.key(6), steps=steps,
                         batch_size=bs)
  counts = orders.fragment_counts(order, FRAGMENT_OF, F)
  assert counts[1] == 0
  n = steps * bs
  p = weights / weights.sum()
  stderr = np.sqrt(p * (1 - p) / n)
  np.testing.assert_array_less(np.abs(counts / n - p), 5 * stderr + 1e-12)
  # Within a fragment, examples are uniform: every one of them shows up.
  assert set(order.ravel().tolist()) == set(POOLS[0]) | set(POOLS[2])


def test_mixture_rejects_bad_weights():
  key = jax.random.key(0)
  for weights in ([1.0, 1.0], [0.0, 0.0, 0.0], [1.0, -1.0, 1.0],
                  [1.0, np.nan, 1.0]):
    with pytest.raises(ValueError, match="weights"):
      orders.mixture(POOLS, weights, key=key, steps=3, batch_size=2)


# ---------------------------------------------------------------- curriculum


@pytest.mark.parametrize("ascending,rank", [(True, [1, 0, 2]),
                                            (False, [2, 0, 1])])
def test_curriculum_opens_fragments_in_rank_order(ascending, rank):
  steps, bs, start = 60, 4, 0.2
  order = orders.curriculum(POOLS, [0.5, 0.1, 0.9], key=jax.random.key(7),
                            steps=steps, batch_size=bs, ascending=ascending,
                            start=start)
  frag_TxB = FRAGMENT_OF[order]
  for t in range(steps):
    c = min(1.0, math.sqrt(t / steps * (1 - start**2) + start**2))
    allowed = rank[:max(1, math.ceil(c * F - 1e-9))]
    assert np.isin(frag_TxB[t], allowed).all(), (t, frag_TxB[t], allowed)
  # c(0) = 0.2 opens one fragment of three; the last steps draw from all.
  assert set(frag_TxB[:2].ravel().tolist()) == {rank[0]}
  assert set(frag_TxB[-15:].ravel().tolist()) == {0, 1, 2}


def test_curriculum_start_one_is_uniform_over_all_examples():
  order = orders.curriculum(POOLS, [0.0, 1.0, 2.0], key=jax.random.key(8),
                            steps=5, batch_size=10, start=1.0)
  assert set(FRAGMENT_OF[order[0]].tolist()) == {0, 1, 2}


def test_curriculum_rejects_bad_arguments():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="scores"):
    orders.curriculum(POOLS, [1.0, 2.0], key=key, steps=3, batch_size=2)
  with pytest.raises(ValueError, match="start"):
    orders.curriculum(POOLS, [1.0, 2.0, 3.0], key=key, steps=3, batch_size=2,
                      start=1.5)


# ---------------------------------------------------------------- subset


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(keep=st.sets(st.integers(0, F - 1), min_size=1),
                  seed=st.integers(0, 2**31 - 1))
def test_subset_never_feeds_a_left_out_fragment(keep, seed):
  kept = np.concatenate([POOLS[f] for f in sorted(keep)])
  order = orders.subset(POOLS, sorted(keep), key=jax.random.key(seed),
                        steps=6, batch_size=3)
  counts = orders.fragment_counts(order, FRAGMENT_OF, F)
  left_out = [f for f in range(F) if f not in keep]
  assert np.all(counts[left_out] == 0)
  # 18 slots cover one full epoch of any kept set (at most 16 examples).
  assert set(order.ravel().tolist()) == set(kept.tolist())


def test_subset_rejects_bad_keep():
  key = jax.random.key(0)
  for keep in ([], [3], [0, 0]):
    with pytest.raises(ValueError, match="keep"):
      orders.subset(POOLS, keep, key=key, steps=3, batch_size=2)


# ---------------------------------------------------------------- helpers


def test_repeated_and_concat():
  a = np.arange(6, dtype=np.int32).reshape(3, 2)
  b = np.array([[7, -1]])
  rep = orders.repeated(a, 2)
  assert rep.shape == (6, 2) and rep.dtype == np.int32
  np.testing.assert_array_equal(rep[:3], a)
  np.testing.assert_array_equal(rep[3:], a)
  joined = orders.concat(a, b, a)
  assert joined.shape == (7, 2) and joined.dtype == np.int32
  np.testing.assert_array_equal(joined[3], [7, -1])
  with pytest.raises(ValueError, match="times"):
    orders.repeated(a, 0)
  with pytest.raises(ValueError, match="batch size"):
    orders.concat(a, np.zeros((2, 3), np.int32))
  with pytest.raises(ValueError):
    orders.concat()


def test_fragment_counts_ignores_padding_and_rejects_probes():
  order = np.array([[0, 1, -1], [2, 4, -1]])
  np.testing.assert_array_equal(orders.fragment_counts(order, FRAGMENT_OF, F),
                                [2, 1, 1])
  with pytest.raises(ValueError, match="no fragment"):
    orders.fragment_counts(np.array([[5]]), FRAGMENT_OF, F)
  with pytest.raises(ValueError, match="outside"):
    orders.fragment_counts(np.array([[20]]), FRAGMENT_OF, F)


# ---------------------------------------------------------------- OrderSpec

SPECS_AND_CALLS = [
    (orders.OrderSpec(orders.OrderKind.SHUFFLED), GENERATORS["shuffled"]),
    (orders.OrderSpec(orders.OrderKind.BLOCKED, sequence=(0, 1, 0, 2),
                      shares=(1, 2, 1, 1)), GENERATORS["blocked"]),
    (orders.OrderSpec(orders.OrderKind.INTERLEAVED, sequence=[2, 0, 2, 1]),
     GENERATORS["interleaved"]),
    (orders.OrderSpec(orders.OrderKind.MIXTURE, weights=np.array([3, 0, 1])),
     GENERATORS["mixture"]),
    (orders.OrderSpec(orders.OrderKind.CURRICULUM, scores=(0.5, 0.1, 0.9)),
     GENERATORS["curriculum"]),
    (orders.OrderSpec(orders.OrderKind.SUBSET, keep=(0, 2)),
     GENERATORS["subset"]),
]


@pytest.mark.parametrize("spec,call", SPECS_AND_CALLS,
                         ids=[s.kind.value for s, _ in SPECS_AND_CALLS])
def test_spec_round_trips_and_generates_like_the_function(spec, call):
  data = json.loads(json.dumps(spec.to_dict()))
  assert data["kind"] == spec.kind.value
  back = orders.OrderSpec.from_dict(data)
  assert back == spec
  key = jax.random.key(9)
  np.testing.assert_array_equal(
      back.generate(POOLS, key=key, steps=T, batch_size=B), call(key, T, B))


def test_spec_curriculum_options_round_trip():
  spec = orders.OrderSpec(orders.OrderKind.CURRICULUM, scores=(1, 2, 3),
                          ascending=False, start=0.5)
  assert orders.OrderSpec.from_dict(json.loads(json.dumps(
      spec.to_dict()))) == spec
  key = jax.random.key(0)
  np.testing.assert_array_equal(
      spec.generate(POOLS, key=key, steps=T, batch_size=B),
      orders.curriculum(POOLS, [1, 2, 3], key=key, steps=T, batch_size=B,
                        ascending=False, start=0.5))


def test_spec_validation_names_the_field():
  kind = orders.OrderKind
  with pytest.raises(ValueError, match="sequence"):
    orders.OrderSpec(kind.BLOCKED)
  with pytest.raises(ValueError, match="weights"):
    orders.OrderSpec(kind.SHUFFLED, weights=(1.0, 2.0))
  with pytest.raises(ValueError, match="start"):
    orders.OrderSpec(kind.CURRICULUM, scores=(1.0,), start=2.0)
  with pytest.raises(ValueError, match="shares"):
    orders.OrderSpec(kind.BLOCKED, sequence=(0, 1), shares=(1.0,))
  with pytest.raises(ValueError, match="keep"):
    orders.OrderSpec(kind.SUBSET, keep=(1, 1))
  with pytest.raises(ValueError, match="kind"):
    orders.OrderSpec.from_dict({"kind": "zigzag"})
  with pytest.raises(ValueError, match="colour"):
    orders.OrderSpec.from_dict({"kind": "shuffled", "colour": "red"})
  # Lengths that depend on F are checked when generating.
  spec = orders.OrderSpec(kind.MIXTURE, weights=(1.0, 2.0))
  with pytest.raises(ValueError, match="weights"):
    spec.generate(POOLS, key=jax.random.key(0), steps=2, batch_size=2)


def test_without_fragment_replaces_only_that_fragment():
  order = orders.shuffled(POOLS, key=jax.random.key(5), steps=9, batch_size=4)
  order[0, 0] = -1  # an empty slot stays empty
  out = orders.without_fragment(order, POOLS, 1, key=jax.random.key(6))
  assert out.shape == order.shape and out.dtype == np.int32
  own = np.isin(order, POOLS[1])
  assert own.any() and not np.isin(out, POOLS[1]).any()
  np.testing.assert_array_equal(out[~own], order[~own])
  others = np.concatenate([p for f, p in enumerate(POOLS) if f != 1])
  assert np.isin(out[own], others).all()
  with pytest.raises(ValueError, match="another fragment"):
    orders.without_fragment(order[:, :1] * 0 + POOLS[0][0], POOLS[:1], 0, key=jax.random.key(0))


@pytest.mark.parametrize("family", orders.FAMILIES)
def test_random_specs_and_their_mutations_generate_valid_orders(family):
  pools = [np.arange(0, 5), np.arange(5, 8), np.arange(8, 15), np.arange(15, 17)]
  spec = orders.random_spec(family, 4, key=jax.random.key(0))
  assert spec.kind.value == family
  for i in range(6):
    child = orders.mutate(spec, 4, key=jax.random.key(i))
    # A shuffle has no parameters to vary: it becomes a mixture; others keep their family.
    assert child.kind.value == ("mixture" if family == "shuffled" else family)
    order = child.generate(pools, key=jax.random.key(i), steps=7, batch_size=3)
    assert order.shape == (7, 3) and order.min() >= 0 and order.max() < 17
    if family == "subset":
      assert 1 <= len(child.keep) <= 4 and child != spec
    if family in ("blocked", "interleaved"):
      assert sorted(child.sequence) == sorted(spec.sequence) and child != spec
    if family == "mixture":
      assert abs(sum(child.weights) - 1) < 1e-9


def test_compiled_key_operations_draw_what_eager_jax_draws():
  # The generators' key operations are compiled for speed; the keys and bits must be the
  # ones eager JAX gives, or every order drawn from a key would change.
  key = jax.random.key(7)
  words = np.asarray(jax.random.bits(key, (64, 2), dtype=np.uint32)).astype(np.uint64)
  np.testing.assert_array_equal(orders._bits(64, key=key), (words[:, 0] << np.uint64(32))
                                | words[:, 1])
  np.testing.assert_array_equal(jax.random.key_data(orders._fold_in(key, 3)),
                                jax.random.key_data(jax.random.fold_in(key, 3)))
  for got, want in zip(orders._split2(key), jax.random.split(key)):
    np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
  k1, k2 = jax.random.split(key)
  mix = orders.random_spec("mixture", 5, key=key)
  np.testing.assert_array_equal(
      np.asarray(mix.weights, np.float32),
      np.asarray(jax.random.dirichlet(k2, np.ones(5, np.float32))))
  blocked = orders.random_spec("blocked", 5, key=key)
  assert list(blocked.sequence) == [int(i) for i in jax.random.permutation(k1, 5)]
