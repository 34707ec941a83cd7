"""Common prefixes of feeding orders: which orders can share the first part of a simulation.

Two orders that feed the same batches at the same learning rates from the same initial state
for their first s segments (a segment is the `eval_every` steps between two checkpoints)
are in the same state after them, checkpoints included: that part needs simulating once.
`PrefixTree` finds, at every segment boundary, the distinct states ("nodes") among N orders.

Axis legend: N orders, S segments, K steps per segment, B batch, U nodes at one depth.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np


class PrefixTree(NamedTuple):
  """The distinct prefixes of N orders at every segment boundary.

  node_SxN: node_SxN[s, n] is the node order n is in after segment s (0 .. U_s - 1).
  first_S: first_S[s] holds, for each node after segment s, one order in it (its
    representative; int [U_s]).
  parent_S: parent_S[s] holds each node's node after segment s - 1 (for s = 0: its root).
  """
  node_SxN: np.ndarray
  first_S: tuple[np.ndarray, ...]
  parent_S: tuple[np.ndarray, ...]

  @property
  def work(self) -> int:
    """Segments to simulate with sharing: the number of nodes over all depths."""
    return int(sum(len(f) for f in self.first_S))

  def saved(self) -> float:
    """The share of segment simulations that sharing saves (0: none)."""
    s, n = self.node_SxN.shape
    return 1.0 - self.work / max(s * n, 1)


def segment_orders(orders_NxTxB: np.ndarray, lrs_NxT: np.ndarray,
                   eval_every: int) -> tuple[np.ndarray, np.ndarray]:
  """Pads T to a multiple of `eval_every` (empty steps) and splits it: [N,S,K,B], [N,S,K]."""
  n, steps, b = orders_NxTxB.shape
  segs = -(-steps // eval_every)
  pad = segs * eval_every - steps
  orders = np.concatenate([orders_NxTxB, np.full((n, pad, b), -1, np.int32)], axis=1)
  lrs = np.concatenate([lrs_NxT, np.zeros((n, pad), np.float32)], axis=1)
  return (orders.reshape(n, segs, eval_every, b),
          lrs.reshape(n, segs, eval_every).astype(np.float32))


def _segment_rows(orders_NxSxKxB: np.ndarray, lrs_NxSxK: np.ndarray, s: int) -> np.ndarray:
  """Segment s of every order as one int64 row: its batches, then its learning rates
  (compared bit for bit, as int32 views of the float32s)."""
  n = len(orders_NxSxKxB)
  return np.concatenate([orders_NxSxKxB[:, s].reshape(n, -1),
                         lrs_NxSxK[:, s].view(np.int32)], axis=1).astype(np.int64)


def prefix_tree(orders_NxSxKxB: np.ndarray, lrs_NxSxK: np.ndarray,
                root_N: np.ndarray) -> PrefixTree:
  """Groups orders by identical (root, batches, learning rates) up to each segment's end.

  Args:
    orders_NxSxKxB: int32 example positions per segment (see `segment_orders`).
    lrs_NxSxK: float32 learning rates per segment.
    root_N: int id of each order's initial state (parameters and knobs); orders with
      different roots never share.

  Returns:
    The `PrefixTree`. Nodes at each depth are numbered in sorted order of their prefix, so
    nodes with the same root are contiguous.
  """
  n, segs = orders_NxSxKxB.shape[:2]
  node = np.asarray(root_N, np.int64)
  nodes, firsts, parents = [], [], []
  for s in range(segs):
    key = np.concatenate([node[:, None], _segment_rows(orders_NxSxKxB, lrs_NxSxK, s)], axis=1)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    parents.append(node[first])
    node = inverse.reshape(-1).astype(np.int64)
    nodes.append(node)
    firsts.append(first)
  return PrefixTree(np.stack(nodes) if nodes else np.zeros((0, n), np.int64),
                    tuple(firsts), tuple(parents))


def segment_hashes(orders_NxSxKxB: np.ndarray, lrs_NxSxK: np.ndarray,
                   rows: int = 4096) -> np.ndarray:
  """A 64-bit hash of each order's every segment (batches and learning rates), uint64 [N, S].

  Equal segments get equal hashes; unequal ones almost surely differ. Used to sort orders so
  that those with a common prefix are adjacent (a collision only places an order badly;
  `prefix_tree` compares the segments themselves).
  """
  n, segs = orders_NxSxKxB.shape[:2]
  out = np.zeros((n, segs), np.uint64)
  width = int(np.prod(orders_NxSxKxB.shape[2:])) + lrs_NxSxK.shape[2]
  powers = np.random.default_rng(0).integers(1, 2**63, size=width, dtype=np.uint64) | 1
  with np.errstate(over="ignore"):
    for r0 in range(0, n, rows):  # row batches bound the temporary copies
      batch = slice(r0, r0 + rows)
      for s in range(segs):
        x = _segment_rows(orders_NxSxKxB[batch], lrs_NxSxK[batch], s)
        out[batch, s] = (x.view(np.uint64) * powers[None]).sum(1)
  return out


def roots_of(arrays_N: list[np.ndarray]) -> np.ndarray:
  """An int id per order, equal for two orders iff all their rows of `arrays_N` are equal.

  Args:
    arrays_N: arrays with a leading N axis (the leaves of per-order parameters and knobs).
      Rows are compared by a 128-bit BLAKE2 digest of their bytes.
  """
  n = len(arrays_N[0]) if arrays_N else 0
  digests = []
  for i in range(n):
    h = hashlib.blake2b(digest_size=16)
    for a in arrays_N:
      h.update(np.ascontiguousarray(a[i]).tobytes())
    digests.append(h.digest())
  ids: dict[bytes, int] = {}
  return np.array([ids.setdefault(d, len(ids)) for d in digests], np.int64)
