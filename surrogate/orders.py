"""Order generators: which examples are fed at each step of a fine-tune.

An *order* is an int32 array `order_TxB` of example positions (indices into a
dataset's example list); `-1` marks an empty slot, which the simulator skips.
Fragments come in as `pools`: `pools[f]` is the 1-D int array of positions of
fragment f's train examples (non-empty). Probe examples are never in a pool,
so no generator can feed them.

Every generator is a pure function of its arguments and an explicit
`jax.random` key: the same key gives the same order, on any machine.

Axis legend: T steps, B batch (slots per step), F fragments, K blocks or
sequence entries, E epochs, P examples in a pool.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FAMILIES",
    "OrderKind",
    "OrderSpec",
    "blocked",
    "concat",
    "curriculum",
    "fragment_counts",
    "interleaved",
    "mixture",
    "mutate",
    "phase_lengths",
    "phased_mixture",
    "random_orders",
    "random_spec",
    "repeated",
    "shuffled",
    "subset",
]

_INT32_MAX = np.iinfo(np.int32).max


# --------------------------------------------------------------------------
# Validation helpers.


def _check_pools(pools: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Returns the pools as 1-D int64 arrays, or raises a ValueError."""
  if isinstance(pools, np.ndarray) and pools.ndim != 1:
    # A 2-D array would silently be read as equal-sized pools; ask for a list.
    raise ValueError("pools must be a sequence of 1-D int arrays, one per "
                     f"fragment; got an array of shape {pools.shape}")
  if len(pools) == 0:
    raise ValueError("pools is empty: need at least one fragment")
  out = []
  for f, pool in enumerate(pools):
    arr = np.asarray(pool)
    if arr.ndim != 1:
      raise ValueError(f"pools[{f}] must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
      raise ValueError(f"pools[{f}] is empty: every fragment needs at least "
                       "one train example")
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"pools[{f}] must hold integer positions, got dtype "
                       f"{arr.dtype}")
    if arr.min() < 0 or arr.max() > _INT32_MAX:
      raise ValueError(f"pools[{f}] holds positions outside [0, 2**31 - 1]")
    out.append(arr.astype(np.int64))
  return out


def _check_count(name: str, value: Any) -> int:
  """Returns `value` as a positive int, or raises a ValueError naming it."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}")
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}")
  return int(value)


def _check_key(key: Any) -> jax.Array:
  # An int seed here would be the global-RNG habit the design forbids; say so.
  if key is None or isinstance(key, (int, np.integer)):
    raise ValueError("key must be a jax.random key (e.g. jax.random.key(0)), "
                     f"got {key!r}")
  return key


def _check_fragment_numbers(name: str, values: Any, num_fragments: int,
                            *, unique: bool = False) -> np.ndarray:
  """Returns `values` as a non-empty 1-D int64 array of fragment numbers."""
  arr = np.asarray(values)
  if arr.ndim != 1 or arr.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D sequence of fragment "
                     f"numbers, got {values!r}")
  if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{name} must hold integer fragment numbers, got "
                     f"{values!r}")
  bad = arr[(arr < 0) | (arr >= num_fragments)]
  if bad.size:
    raise ValueError(f"{name} holds fragment number(s) {bad.tolist()} outside "
                     f"[0, {num_fragments}) for {num_fragments} fragments")
  if unique and np.unique(arr).size != arr.size:
    raise ValueError(f"{name} repeats a fragment: {arr.tolist()}")
  return arr.astype(np.int64)


def _check_weights(name: str, values: Any, length: int) -> np.ndarray:
  """Returns non-negative finite float64 weights with a positive sum."""
  arr = np.asarray(values, dtype=np.float64)
  if arr.ndim != 1 or arr.size != length:
    raise ValueError(f"{name} must have {length} entries, got "
                     f"{arr.size if arr.ndim == 1 else arr.shape}")
  if not np.all(np.isfinite(arr)) or np.any(arr < 0):
    raise ValueError(f"{name} must be finite and >= 0, got {arr.tolist()}")
  if arr.sum() <= 0:
    raise ValueError(f"{name} must not be all zero, got {arr.tolist()}")
  return arr


# --------------------------------------------------------------------------
# Sampling helpers.


# The key operations are compiled: eager JAX random calls cost 0.1-0.25 ms each here, nearly
# all dispatch, and a blocked order makes two dozen of them; compiled they cost 15-70 us and
# give the very same keys and bits (tests/test_orders.py), so a screen of 10^5 orders draws
# them in minutes rather than an hour.
_fold_in = jax.jit(jax.random.fold_in)
_split2 = jax.jit(lambda key: tuple(jax.random.split(key)))


@functools.partial(jax.jit, static_argnums=1)
def _raw_bits(key: jax.Array, padded: int) -> jax.Array:
  return jax.random.bits(key, (padded, 2), dtype=jnp.uint32)


@functools.partial(jax.jit, static_argnums=1)
def _spec_draws(key: jax.Array, num_fragments: int):
  """`random_spec`'s draws: (a permutation, Dirichlet weights, uniform scores)."""
  k1, k2 = jax.random.split(key)
  return (jax.random.permutation(k1, num_fragments),
          jax.random.dirichlet(k2, jnp.ones(num_fragments, jnp.float32)),
          jax.random.uniform(k2, (num_fragments,)))


def _bits(n: int, *, key: jax.Array) -> np.ndarray:
  """n independent uniform 64-bit draws, as a uint64 array [n].

  The draw is made at the next power of two and cut, so JAX compiles one
  kernel per size bucket rather than one per order shape: screening
  thousands of blocked orders with different block lengths would otherwise
  pay a compilation (about 0.5 s here) for nearly every order.
  """
  padded = 1 << max(0, n - 1).bit_length()
  words_Nx2 = np.asarray(_raw_bits(key, padded))
  words_Nx2 = words_Nx2[:n].astype(np.uint64)
  return (words_Nx2[:, 0] << np.uint64(32)) | words_Nx2[:, 1]


def _uniform(shape: tuple[int, ...], *, key: jax.Array) -> np.ndarray:
  """float64 draws uniform on [0, 1), 53 random bits each, of `shape`."""
  bits = _bits(math.prod(shape), key=key) >> np.uint64(11)
  return (bits.astype(np.float64) * 2.0**-53).reshape(shape)


def _uniform_index(upper: np.ndarray, *, key: jax.Array) -> np.ndarray:
  """Integers uniform on [0, upper), elementwise, with upper's shape."""
  upper = np.asarray(upper, dtype=np.int64)
  index = np.floor(_uniform(upper.shape, key=key) * upper).astype(np.int64)
  # u * upper can round up to upper itself when u is within 2**-53 of 1.
  return np.minimum(index, upper - 1)


def _epochs(pool_P: np.ndarray, n: int, *, key: jax.Array) -> np.ndarray:
  """First `n` entries of back-to-back epochs, each a fresh permutation.

  Args:
    pool_P: positions to cycle through, shape [P].
    n: how many entries to return (>= 0).
    key: a jax.random key.

  Returns:
    int64 array [n]: epoch e occupies entries [e*P, (e+1)*P) and holds every
    entry of `pool_P` exactly once; the last epoch may be cut short.
  """
  size = pool_P.shape[0]
  num_epochs = max(1, -(-n // size))
  # Sorting i.i.d. 64-bit keys gives a uniform permutation of each row (a tie
  # has probability about P^2 / 2^65).
  sort_keys_ExP = _bits(num_epochs * size, key=key).reshape(num_epochs, size)
  perm_ExP = np.argsort(sort_keys_ExP, axis=1, kind="stable")
  return pool_P[perm_ExP.reshape(-1)[:n]]


def _round_shares(shares_K: np.ndarray, steps: int) -> np.ndarray:
  """Splits `steps` into K block lengths following `shares_K` (largest remainders).

  Block i first gets floor(shares[i] / sum(shares) * steps); the leftover steps go, one
  each, to the blocks with the largest fractional remainders (ties to later blocks), so
  the lengths sum to `steps` exactly, each is within one step of its ideal share, and a
  zero share gets zero steps.
  """
  ideal_K = shares_K / shares_K.sum() * steps
  counts_K = np.floor(ideal_K).astype(np.int64)
  leftover = steps - int(counts_K.sum())
  remainder_K = ideal_K - counts_K
  # Stable sort on the negated remainders of the reversed blocks: ties go to later blocks.
  by_remainder = (len(counts_K) - 1 - np.argsort(-remainder_K[::-1], kind="stable"))
  counts_K[by_remainder[:leftover]] += 1
  return counts_K


def _as_order(positions: np.ndarray, steps: int, batch_size: int) -> np.ndarray:
  return np.asarray(positions, dtype=np.int32).reshape(steps, batch_size)


# --------------------------------------------------------------------------
# Generators.


def shuffled(pools: Sequence[np.ndarray], *, key: jax.Array, steps: int,
             batch_size: int) -> np.ndarray:
  """Plain shuffled epochs over all fragments' train examples.

  Feeding rule: the union of all pools (duplicates counted once) is fed in
  epochs, each a fresh uniform permutation; the epochs are concatenated and
  cut to `steps * batch_size` slots, read row by row (slot s goes to step
  s // batch_size). An epoch may therefore straddle steps.

  Args:
    pools: pools[f] is the 1-D int array of fragment f's train positions.
    key: a jax.random key.
    steps: T, the number of optimizer steps.
    batch_size: B, the number of slots per step.

  Returns:
    int32 array [T, B] of example positions.
  """
  pools = _check_pools(pools)
  key = _check_key(key)
  steps = _check_count("steps", steps)
  batch_size = _check_count("batch_size", batch_size)
  union_P = np.unique(np.concatenate(pools))
  return _as_order(_epochs(union_P, steps * batch_size, key=key), steps,
                   batch_size)


def blocked(pools: Sequence[np.ndarray], sequence: Sequence[int], *,
            key: jax.Array, steps: int, batch_size: int,
            shares: Sequence[float] | None = None) -> np.ndarray:
  """Fragments fed one after another, one block each.

  Feeding rule: block i feeds only fragment `sequence[i]`, for n_i steps,
  where n_i is shares[i] / sum(shares) * steps rounded by largest remainders, so the n_i
  sum to `steps` exactly and each is within one step of its ideal share.
  Blocks follow each other in `sequence` order. Within a block, the
  fragment's pool is fed in epochs of fresh permutations (a block fed again
  later, as in sequence [0, 1, 0], starts fresh epochs of its own).

  Args:
    pools: pools[f] is the 1-D int array of fragment f's train positions.
    sequence: K fragment numbers, one per block; a fragment may repeat.
    key: a jax.random key.
    steps: T, the number of optimizer steps.
    batch_size: B, the number of slots per step.
    shares: K non-negative relative block lengths (normalised here); None
      gives equal shares. A zero share gives an empty block.

  Returns:
    int32 array [T, B] of example positions.
  """
  pools = _check_pools(pools)
  key = _check_key(key)
  steps = _check_count("steps", steps)
  batch_size = _check_count("batch_size", batch_size)
  seq_K = _check_fragment_numbers("sequence", sequence, len(pools))
  shares_K = (np.ones(seq_K.size) if shares is None
              else _check_weights("shares", shares, seq_K.size))
  steps_K = _round_shares(shares_K, steps)
  blocks = [
      _epochs(pools[f], int(n) * batch_size, key=_fold_in(key, i))
      for i, (f, n) in enumerate(zip(seq_K, steps_K))
  ]
  return _as_order(np.concatenate(blocks), steps, batch_size)


def interleaved(pools: Sequence[np.ndarray],
                sequence: Sequence[int] | None = None, *, key: jax.Array,
                steps: int, batch_size: int) -> np.ndarray:
  """Round-robin over fragments, one whole batch at a time.

  Feeding rule: step t is a full batch from fragment sequence[t % K]. Each
  fragment draws its batches from its own stream: back-to-back epochs of
  fresh permutations of its pool, continued across all the steps it is given
  (a fragment listed twice in `sequence` simply gets more of its stream).

  Args:
    pools: pools[f] is the 1-D int array of fragment f's train positions.
    sequence: K fragment numbers giving the rotation; None means
      [0, 1, ..., F - 1].
    key: a jax.random key.
    steps: T, the number of optimizer steps.
    batch_size: B, the number of slots per step.

  Returns:
    int32 array [T, B] of example positions.
  """
  pools = _check_pools(pools)
  key = _check_key(key)
  steps = _check_count("steps", steps)
  batch_size = _check_count("batch_size", batch_size)
  if sequence is None:
    sequence = range(len(pools))
  seq_K = _check_fragment_numbers("sequence", list(sequence), len(pools))
  frag_T = seq_K[np.arange(steps) % seq_K.size]
  order_TxB = np.empty((steps, batch_size), dtype=np.int64)
  for f in np.unique(frag_T):
    rows = np.flatnonzero(frag_T == f)
    # Key by fragment number, so a fragment's stream does not depend on which
    # other fragments share the rotation.
    stream = _epochs(pools[f], rows.size * batch_size,
                     key=_fold_in(key, int(f)))
    order_TxB[rows] = stream.reshape(rows.size, batch_size)
  return np.asarray(order_TxB, dtype=np.int32)


def mixture(pools: Sequence[np.ndarray], weights: Sequence[float], *,
            key: jax.Array, steps: int, batch_size: int) -> np.ndarray:
  """Every slot drawn independently from a weighted mixture of fragments.

  Feeding rule: each of the T*B slots independently picks fragment f with
  probability weights[f] / sum(weights), then an example of that fragment's
  pool uniformly at random, with replacement. A zero weight means the
  fragment is never fed. (Unlike `shuffled`, an example may repeat before
  its fragment's other examples have been seen.)

  Args:
    pools: pools[f] is the 1-D int array of fragment f's train positions.
    weights: F non-negative relative weights, not all zero.
    key: a jax.random key.
    steps: T, the number of optimizer steps.
    batch_size: B, the number of slots per step.

  Returns:
    int32 array [T, B] of example positions.
  """
  pools = _check_pools(pools)
  key = _check_key(key)
  steps = _check_count("steps", steps)
  batch_size = _check_count("batch_size", batch_size)
  w_F = _check_weights("weights", weights, len(pools))
  key_frag, key_example = _split2(key)
  # Inverse-CDF sampling with side="right": a zero-weight fragment has an empty
  # interval and so can never be chosen. The last positive-weight fragment's
  # bound is infinite so float round-off cannot push a draw past it.
  cdf_F = np.cumsum(w_F / w_F.sum())
  cdf_F[int(np.flatnonzero(w_F > 0)[-1]):] = np.inf
  u_TxB = _uniform((steps, batch_size), key=key_frag)
  frag_TxB = np.searchsorted(cdf_F, u_TxB, side="right")
  sizes_F = np.array([p.size for p in pools])
  offsets_F = np.concatenate([[0], np.cumsum(sizes_F)[:-1]])
  index_TxB = _uniform_index(sizes_F[frag_TxB], key=key_example)
  flat = np.concatenate(pools)
  return np.asarray(flat[offsets_F[frag_TxB] + index_TxB], dtype=np.int32)


def _competence(steps: int, start: float) -> np.ndarray:
  """c(t) = min(1, sqrt(t / T * (1 - start^2) + start^2)), t = 0..T-1."""
  t_T = np.arange(steps, dtype=np.float64)
  return np.minimum(1.0, np.sqrt(t_T / steps * (1 - start**2) + start**2))


def curriculum(pools: Sequence[np.ndarray], scores: Sequence[float], *,
               key: jax.Array, steps: int, batch_size: int,
               ascending: bool = True, start: float = 0.2) -> np.ndarray:
  """Competence-based curriculum (Platanios et al., NAACL 2019).

  Fragments are ranked by `scores` (ascending=True: lowest score first, e.g.
  easy to hard by loss; ties keep fragment-number order). At step t
  (0-based, of T steps) the model's competence is the square-root schedule

    c(t) = min(1, sqrt(t / T * (1 - start^2) + start^2)),

  so c(0) = start and c grows towards 1 at t = T (the last step, t = T - 1,
  may sit just below 1). Step t feeds only the first
  n(t) = ceil(c(t) * F) fragments in rank order (at least one): each of its
  B slots is an example drawn uniformly, with replacement, from the union of
  those fragments' train examples, so a fragment's share grows with its size.
  Platanios et al. rank single examples by difficulty; here the unit ranked
  is a fragment.

  Args:
    pools: pools[f] is the 1-D int array of fragment f's train positions.
    scores: F finite scores to rank fragments by.
    key: a jax.random key.
    steps: T, the number of optimizer steps.
    batch_size: B, the number of slots per step.
    ascending: rank lowest score first (True) or highest first (False).
    start: c(0), the initial competence, in [0, 1].

  Returns:
    int32 array [T, B] of example positions.
  """
  pools = _check_pools(pools)
  key = _check_key(key)
  steps = _check_count("steps", steps)
  batch_size = _check_count("batch_size", batch_size)
  num_fragments = len(pools)
  scores_F = np.asarray(scores, dtype=np.float64)
  if scores_F.ndim != 1 or scores_F.size != num_fragments:
    got = scores_F.size if scores_F.ndim == 1 else scores_F.shape
    raise ValueError(f"scores must have {num_fragments} entries, one per "
                     f"fragment, got {got}")
  if not np.all(np.isfinite(scores_F)):
    raise ValueError(f"scores must be finite, got {scores_F.tolist()}")
  if not isinstance(ascending, (bool, np.bool_)):
    raise ValueError(f"ascending must be a bool, got {ascending!r}")
  if not 0.0 <= float(start) <= 1.0:
    raise ValueError(f"start must be in [0, 1], got {start}")
  rank_F = np.argsort(scores_F if ascending else -scores_F, kind="stable")
  ranked = [pools[f] for f in rank_F]
  # cum_sizes[n] = number of examples in the first n ranked fragments.
  cum_sizes = np.concatenate([[0], np.cumsum([p.size for p in ranked])])
  # The small tolerance keeps c * F = 1.0000000001 from admitting an extra
  # fragment through round-off.
  open_T = np.clip(np.ceil(_competence(steps, float(start)) * num_fragments
                           - 1e-9), 1, num_fragments).astype(np.int64)
  available_TxB = np.broadcast_to(cum_sizes[open_T][:, None],
                                  (steps, batch_size))
  index_TxB = _uniform_index(available_TxB, key=key)
  flat = np.concatenate(ranked)
  return np.asarray(flat[index_TxB], dtype=np.int32)


def subset(pools: Sequence[np.ndarray], keep: Sequence[int], *,
           key: jax.Array, steps: int, batch_size: int) -> np.ndarray:
  """Shuffled epochs over only some fragments.

  Feeding rule: exactly `shuffled` over the pools of the fragments in `keep`;
  a fragment not in `keep` is never fed.

  Args:
    pools: pools[f] is the 1-D int array of fragment f's train positions.
    keep: fragment numbers to feed, non-empty, without repeats.
    key: a jax.random key.
    steps: T, the number of optimizer steps.
    batch_size: B, the number of slots per step.

  Returns:
    int32 array [T, B] of example positions.
  """
  pools = _check_pools(pools)
  keep_K = _check_fragment_numbers("keep", keep, len(pools), unique=True)
  return shuffled([pools[f] for f in np.sort(keep_K)], key=key, steps=steps,
                  batch_size=batch_size)


# --------------------------------------------------------------------------
# Combinators.


def _check_order(name: str, order: Any) -> np.ndarray:
  arr = np.asarray(order)
  if arr.ndim != 2:
    raise ValueError(f"{name} must be a [T, B] array, got shape {arr.shape}")
  if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{name} must hold integer positions, got dtype "
                     f"{arr.dtype}")
  return arr


def repeated(order: np.ndarray, times: int) -> np.ndarray:
  """An order fed `times` times in a row.

  Args:
    order: int array [T, B].
    times: how many times to feed it (>= 1).

  Returns:
    int32 array [T * times, B]: rows t, t + T, t + 2T, ... all equal order[t].
  """
  order_TxB = _check_order("order", order)
  times = _check_count("times", times)
  return np.tile(order_TxB, (times, 1)).astype(np.int32)


def concat(*orders: np.ndarray) -> np.ndarray:
  """Orders fed one after another.

  Args:
    *orders: int arrays [T_i, B], all with the same B.

  Returns:
    int32 array [sum_i T_i, B].
  """
  if not orders:
    raise ValueError("concat needs at least one order")
  arrays = [_check_order(f"orders[{i}]", o) for i, o in enumerate(orders)]
  widths = [a.shape[1] for a in arrays]
  if len(set(widths)) != 1:
    raise ValueError(f"orders must share one batch size B, got {widths}")
  return np.concatenate(arrays, axis=0).astype(np.int32)


def without_fragment(order: np.ndarray, pools: Sequence[np.ndarray], fragment: int, *,
                     key: jax.Array) -> np.ndarray:
  """The counterfactual of DESIGN.md's outcomes: `order` with one fragment's batches
  replaced by the rest.

  Feeding rule: every slot that holds an example of `fragment` gets instead a train example
  drawn uniformly from the other fragments' pools together; every other slot, every step and
  the batch size stay as they are. Comparing a run with this counterfactual gives the
  fragment's *own contribution* to every loss.

  Args:
    order: int array [T, B] of example positions (-1 for empty slots).
    pools: pools[f] is the 1-D int array of fragment f's train positions.
    fragment: the fragment number to take out.
    key: a jax.random key (draws the replacements).

  Returns:
    int32 array [T, B].

  Raises:
    ValueError: there is no other fragment to draw from.
  """
  order_TxB = _check_order("order", order).astype(np.int32)
  pools = _check_pools(pools)
  (fragment,) = _check_fragment_numbers("fragment", [fragment], len(pools), unique=True)
  rest = np.concatenate([p for f, p in enumerate(pools) if f != fragment]) \
      if len(pools) > 1 else np.zeros(0, np.int32)
  if not rest.size:
    raise ValueError("without_fragment needs another fragment to draw replacements from")
  own = np.isin(order_TxB, pools[fragment])
  out = order_TxB.copy()
  pick = _uniform_index(np.full(int(own.sum()), rest.size), key=_check_key(key))
  out[own] = rest[pick]
  return out


def order_sha256(order: np.ndarray) -> str:
  """sha256 of an order's example positions as int32 (to recognise the same batches)."""
  return hashlib.sha256(np.ascontiguousarray(order, np.int32).tobytes()).hexdigest()


def fragment_counts(order: np.ndarray, fragment_of: np.ndarray,
                    num_fragments: int) -> np.ndarray:
  """How many slots of each fragment an order feeds.

  Args:
    order: int array [T, B] of example positions; -1 slots are ignored.
    fragment_of: int array [N] mapping each example position of the dataset
      to its fragment number (negative for examples in no fragment).
    num_fragments: F.

  Returns:
    int64 array [F]: counts[f] = number of slots holding a fragment-f example.

  Raises:
    ValueError: a slot holds a position outside [0, N), or an example that
      belongs to no fragment, or fragment_of names a fragment >= F.
  """
  order_TxB = _check_order("order", order)
  num_fragments = _check_count("num_fragments", num_fragments)
  fragment_of_N = np.asarray(fragment_of)
  if fragment_of_N.ndim != 1 or not np.issubdtype(fragment_of_N.dtype,
                                                  np.integer):
    raise ValueError("fragment_of must be a 1-D int array, got "
                     f"{fragment_of_N.dtype} of shape {fragment_of_N.shape}")
  fed = order_TxB[order_TxB != -1]
  bad = fed[(fed < 0) | (fed >= fragment_of_N.size)]
  if bad.size:
    raise ValueError(f"order holds position(s) {np.unique(bad)[:5].tolist()} "
                     f"outside [0, {fragment_of_N.size})")
  frag = fragment_of_N[fed]
  if np.any(frag < 0):
    raise ValueError("order feeds position(s) "
                     f"{np.unique(fed[frag < 0])[:5].tolist()} that belong to "
                     "no fragment")
  if np.any(frag >= num_fragments):
    raise ValueError(f"fragment_of names fragment {int(frag.max())}, but "
                     f"num_fragments is {num_fragments}")
  return np.bincount(frag, minlength=num_fragments).astype(np.int64)


# --------------------------------------------------------------------------
# A saveable description of an order.


class OrderKind(enum.Enum):
  """The kinds of order `OrderSpec` can generate."""
  SHUFFLED = "shuffled"
  BLOCKED = "blocked"
  INTERLEAVED = "interleaved"
  MIXTURE = "mixture"
  CURRICULUM = "curriculum"
  SUBSET = "subset"


# Per kind: the parameters it requires, and those it may take.
_REQUIRED = {
    OrderKind.SHUFFLED: (),
    OrderKind.BLOCKED: ("sequence",),
    OrderKind.INTERLEAVED: (),
    OrderKind.MIXTURE: ("weights",),
    OrderKind.CURRICULUM: ("scores",),
    OrderKind.SUBSET: ("keep",),
}
_OPTIONAL = {
    OrderKind.SHUFFLED: (),
    OrderKind.BLOCKED: ("shares",),
    OrderKind.INTERLEAVED: ("sequence",),
    OrderKind.MIXTURE: (),
    OrderKind.CURRICULUM: ("ascending", "start"),
    OrderKind.SUBSET: (),
}
_INT_FIELDS = ("sequence", "keep")
_FLOAT_FIELDS = ("shares", "weights", "scores")


@dataclasses.dataclass(frozen=True)
class OrderSpec:
  """A feeding order described by its kind and parameters, not its indices.

  `generate` turns it into an order for given pools, key and shape; `to_dict`
  and `from_dict` save and load it as JSON-friendly values. Only the
  parameters of the chosen kind may be set (see the generator of that name
  for their meaning); the others must stay at their defaults, so a typo'd
  spec fails loudly instead of being silently ignored. Lengths that depend on
  the number of fragments are checked by `generate`.

  Attributes:
    kind: which generator to use.
    sequence: fragment numbers (blocked: required; interleaved: optional).
    shares: relative block lengths (blocked, optional).
    weights: per-fragment mixture weights (mixture, required).
    scores: per-fragment ranking scores (curriculum, required).
    ascending: curriculum ranks lowest score first when True.
    start: curriculum's initial competence, in [0, 1].
    keep: fragment numbers to feed (subset, required).
  """
  kind: OrderKind
  sequence: tuple[int, ...] | None = None
  shares: tuple[float, ...] | None = None
  weights: tuple[float, ...] | None = None
  scores: tuple[float, ...] | None = None
  ascending: bool = True
  start: float = 0.2
  keep: tuple[int, ...] | None = None

  def __post_init__(self):
    kind = self.kind
    if isinstance(kind, str):
      kind = _parse_kind(kind)
      object.__setattr__(self, "kind", kind)
    if not isinstance(kind, OrderKind):
      raise ValueError(f"kind must be an OrderKind, got {kind!r}")
    # Lists and numpy arrays become tuples of Python numbers: hashable, and
    # JSON-friendly in to_dict.
    for name in _INT_FIELDS + _FLOAT_FIELDS:
      value = getattr(self, name)
      if value is None:
        continue
      arr = np.asarray(value)
      if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got "
                         f"{value!r}")
      if name in _INT_FIELDS:
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
          raise ValueError(f"{name} must hold ints, got {value!r}")
        if np.any(arr < 0):
          raise ValueError(f"{name} holds negative fragment numbers: "
                           f"{arr.tolist()}")
        object.__setattr__(self, name, tuple(int(v) for v in arr))
      else:
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
          raise ValueError(f"{name} must hold numbers, got {value!r}")
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)):
          raise ValueError(f"{name} must be finite, got {arr.tolist()}")
        object.__setattr__(self, name, tuple(float(v) for v in arr))
    if not isinstance(self.ascending, (bool, np.bool_)):
      raise ValueError(f"ascending must be a bool, got {self.ascending!r}")
    object.__setattr__(self, "ascending", bool(self.ascending))
    if (isinstance(self.start, bool)
        or not isinstance(self.start, (int, float, np.integer, np.floating))
        or not 0.0 <= float(self.start) <= 1.0):
      raise ValueError(f"start must be a number in [0, 1], got {self.start!r}")
    object.__setattr__(self, "start", float(self.start))

    for name in _REQUIRED[kind]:
      if getattr(self, name) is None:
        raise ValueError(f"{name} is required for kind '{kind.value}'")
    allowed = set(_REQUIRED[kind]) | set(_OPTIONAL[kind])
    for field in dataclasses.fields(self):
      if field.name == "kind" or field.name in allowed:
        continue
      if getattr(self, field.name) != field.default:
        raise ValueError(f"{field.name} is not a parameter of kind "
                         f"'{kind.value}' (it takes: "
                         f"{', '.join(sorted(allowed)) or 'nothing'})")
    for name in ("shares", "weights"):
      value = getattr(self, name)
      if value is not None and (min(value) < 0 or sum(value) <= 0):
        raise ValueError(f"{name} must be >= 0 and not all zero, got "
                         f"{list(value)}")
    if (self.shares is not None and self.sequence is not None
        and len(self.shares) != len(self.sequence)):
      raise ValueError(f"shares has {len(self.shares)} entries but sequence "
                       f"has {len(self.sequence)}")
    if self.keep is not None and len(set(self.keep)) != len(self.keep):
      raise ValueError(f"keep repeats a fragment: {list(self.keep)}")

  def generate(self, pools: Sequence[np.ndarray], *, key: jax.Array,
               steps: int, batch_size: int) -> np.ndarray:
    """The order this spec describes.

    Args:
      pools: pools[f] is the 1-D int array of fragment f's train positions.
      key: a jax.random key.
      steps: T, the number of optimizer steps.
      batch_size: B, the number of slots per step.

    Returns:
      int32 array [T, B], equal to calling the generator of this kind with
      the same arguments.
    """
    shape = dict(key=key, steps=steps, batch_size=batch_size)
    kind = self.kind
    if kind is OrderKind.SHUFFLED:
      return shuffled(pools, **shape)
    if kind is OrderKind.BLOCKED:
      return blocked(pools, self.sequence, shares=self.shares, **shape)
    if kind is OrderKind.INTERLEAVED:
      return interleaved(pools, self.sequence, **shape)
    if kind is OrderKind.MIXTURE:
      return mixture(pools, self.weights, **shape)
    if kind is OrderKind.CURRICULUM:
      return curriculum(pools, self.scores, ascending=self.ascending,
                        start=self.start, **shape)
    if kind is OrderKind.SUBSET:
      return subset(pools, self.keep, **shape)
    raise AssertionError(f"unhandled kind {kind}")

  def to_dict(self) -> dict[str, Any]:
    """JSON-friendly dict: `kind` as its string value plus the parameters of
    that kind that are set (lists of numbers, bools, floats)."""
    out: dict[str, Any] = {"kind": self.kind.value}
    for name in _REQUIRED[self.kind] + _OPTIONAL[self.kind]:
      value = getattr(self, name)
      if value is None:
        continue
      out[name] = list(value) if isinstance(value, tuple) else value
    return out

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> OrderSpec:
    """Inverse of `to_dict`; unknown keys are an error naming them."""
    if not isinstance(data, Mapping):
      raise ValueError(f"an order spec must be a mapping, got {data!r}")
    if "kind" not in data:
      raise ValueError("an order spec needs a 'kind'")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
      raise ValueError(f"unknown order spec field(s) {unknown}; expected some "
                       f"of {sorted(names)}")
    return cls(**{**data, "kind": _parse_kind(data["kind"])})


def _parse_kind(value: Any) -> OrderKind:
  if isinstance(value, OrderKind):
    return value
  try:
    return OrderKind(value)
  except ValueError:
    raise ValueError(f"kind must be one of "
                     f"{[k.value for k in OrderKind]}, got {value!r}") from None


FAMILIES = tuple(k.value for k in OrderKind)


def phase_lengths(steps: int, phases: int) -> np.ndarray:
  """`steps` split into `phases` near-equal phases (largest remainders): [P] lengths."""
  return _round_shares(np.ones(_check_count("phases", phases)), _check_count("steps", steps))


def phased_mixture(pools: Sequence[np.ndarray], weights_PxF: Any, *, key: jax.Array,
                   steps: int, batch_size: int) -> np.ndarray:
  """A mixture whose weights change by phase: phase p (`phase_lengths`) is `mixture` with
  weights `weights_PxF[p]` (drawn with `fold_in(key, p)`); gradient search's orders.

  Returns:
    int32 array [T, B] of example positions.
  """
  w = np.asarray(weights_PxF, np.float64)
  if w.ndim != 2 or w.shape[1] != len(pools):
    raise ValueError(f"weights_PxF must have shape [phases, {len(pools)}], got {w.shape}")
  key = _check_key(key)
  return np.concatenate([mixture(pools, w[p], key=_fold_in(key, p), steps=int(n),
                                 batch_size=batch_size)
                         for p, n in enumerate(phase_lengths(steps, len(w))) if n])


def random_spec(family: str | OrderKind, num_fragments: int, *, key: jax.Array) -> OrderSpec:
  """A random member of an order family: a random sequence (blocked, interleaved),
  Dirichlet mixture weights, uniform curriculum scores, or a random two-thirds subset."""
  kind = _parse_kind(family)
  if kind is OrderKind.SHUFFLED:
    return OrderSpec(kind)
  perm_F, weights_F, scores_F = (np.asarray(a) for a in _spec_draws(key, num_fragments))
  perm = [int(i) for i in perm_F]
  if kind in (OrderKind.BLOCKED, OrderKind.INTERLEAVED):
    return OrderSpec(kind, sequence=perm)
  if kind is OrderKind.MIXTURE:
    return OrderSpec(kind, weights=[float(x) for x in weights_F])
  if kind is OrderKind.CURRICULUM:
    return OrderSpec(kind, scores=[float(x) for x in scores_F])
  return OrderSpec(kind, keep=sorted(perm[: max(1, (2 * num_fragments) // 3)]))


def random_orders(pools: Sequence[np.ndarray], n: int, *, key: jax.Array, steps: int,
                  batch_size: int, families: Sequence[str] = FAMILIES,
                  ) -> tuple[list[OrderSpec], np.ndarray]:
  """`n` random orders, the families taking turns (`random_spec`, then `generate`).

  Returns:
    (specs, orders_NxTxB).
  """
  specs, out = [], []
  for i, k in enumerate(jax.random.split(key, n)):
    ks, kg = _split2(k)
    spec = random_spec(families[i % len(families)], len(pools), key=ks)
    specs.append(spec)
    out.append(spec.generate(pools, key=kg, steps=steps, batch_size=batch_size))
  return specs, np.stack(out) if out else np.zeros((0, steps, batch_size), np.int32)


def mutate(spec: OrderSpec, num_fragments: int, *, key: jax.Array) -> OrderSpec:
  """A neighbour of `spec` in its family, for local search.

  Blocked and interleaved sequences swap two entries (block shares go with their block);
  mixture weights and curriculum scores are multiplied by log-normal noise (sd 0.5); a
  subset adds or drops one fragment (never all); a shuffled order becomes a mixture near
  uniform, so that search can leave it.
  """
  k1, k2 = jax.random.split(key)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(k1)).ravel())
  kind = spec.kind
  if kind in (OrderKind.BLOCKED, OrderKind.INTERLEAVED):
    seq = list(spec.sequence if spec.sequence is not None else range(num_fragments))
    shares = list(spec.shares) if spec.shares is not None else None
    if len(seq) < 2:
      return spec
    i, j = rng.choice(len(seq), 2, replace=False)
    seq[i], seq[j] = seq[j], seq[i]
    if shares is not None:
      shares[i], shares[j] = shares[j], shares[i]
    return dataclasses.replace(spec, sequence=tuple(seq),
                               shares=tuple(shares) if shares is not None else None)
  if kind is OrderKind.MIXTURE:
    w = np.asarray(spec.weights) * np.exp(0.5 * rng.standard_normal(len(spec.weights)))
    return dataclasses.replace(spec, weights=tuple(w / w.sum()))
  if kind is OrderKind.CURRICULUM:
    sc = np.asarray(spec.scores) * np.exp(0.5 * rng.standard_normal(len(spec.scores)))
    return dataclasses.replace(spec, scores=tuple(sc))
  if kind is OrderKind.SUBSET:
    keep = set(spec.keep)
    f = int(rng.integers(num_fragments))
    if f in keep and len(keep) > 1:
      keep.remove(f)
    else:
      keep.add(f)
    return OrderSpec(kind, keep=tuple(sorted(keep)))
  w = np.exp(0.5 * np.asarray(jax.random.normal(k2, (num_fragments,))))
  return OrderSpec(OrderKind.MIXTURE, weights=tuple(w / w.sum()))
