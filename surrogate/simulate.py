"""Training the surrogate on feeding orders: one order by `simulate`, many by `simulate_many`.

Axis legend: N orders, T steps, B batch, S segments (eval intervals), C checkpoints
(= S + 1, step 0 included), E examples, M evaluated examples, P diagnostic probes,
F fragments, L length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from surrogate import adapters
from surrogate import diagnostics as diag_lib
from surrogate import model as model_lib
from surrogate import optim
from surrogate import prefix as prefix_lib
from surrogate.tokenize import PAD_ID, Tokenized

if TYPE_CHECKING:
  from surrogate.fragments import Fragments


@dataclasses.dataclass(frozen=True)
class SimPlan:
  """What a simulation records (static: it sets loop lengths and shapes).

  Attributes:
    eval_every: steps between checkpoints; evals are at steps 0, k, 2k, ... and at T.
    eval_chunk: evaluated examples per forward pass of one order (bounds memory; small
      chunks keep XLA from fusing the whole eval into one slow kernel).
    diagnostics: compute the five diagnostics at every checkpoint.
  """
  eval_every: int = 20
  eval_chunk: int = 16
  diagnostics: bool = True

  def __post_init__(self):
    if self.eval_every < 1 or self.eval_chunk < 1:
      raise ValueError("SimPlan.eval_every and eval_chunk must be >= 1")

  def checkpoint_steps(self, steps: int) -> np.ndarray:
    """The step after which each checkpoint is taken, int [C]."""
    s = math.ceil(steps / self.eval_every)
    return np.minimum(np.arange(s + 1) * self.eval_every, steps)


class SimData(NamedTuple):
  """The arrays every order shares: token table, what to evaluate, how to group it.

  tokens_ExL1 / mask_ExL: every example's tokens and target mask (see `Tokenized`).
  eval_idx_M: the examples whose loss is recorded at each checkpoint (all probes and
    chosen train examples).
  probe_weight_FxM / train_weight_FxM: per-fragment averaging weights over the evaluated
    probe (train) examples; a row sums to 1, or is 0 when the fragment has none.
  probes: the diagnostic probes (a subsample of each fragment's probes).
  fragment_E: the fragment of every example (for the per-fragment gradient push).
  """
  tokens_ExL1: jax.Array
  mask_ExL: jax.Array
  eval_idx_M: jax.Array
  probe_weight_FxM: jax.Array
  train_weight_FxM: jax.Array
  probes: diag_lib.ProbeSet
  fragment_E: jax.Array


class Trajectory(NamedTuple):
  """What one simulated run records (a leading N axis when many orders are simulated).

  eval_loss_CxM: per-example losses of the evaluated examples at each checkpoint.
  train_loss_T: the training loss of each step (the batch's mean token loss).
  diagnostics: the five diagnostics, each CxF (None when the plan skips them).
  diverged_step: the first step whose loss or new parameters were not finite, or whose loss
    rose past `DIVERGED_LOSS_FACTOR` x its first step's (or x a uniform guess's, log V, if
    that is higher); -1 if none. From then on the simulated run is frozen and its later
    checkpoints are NaN.
  grad_push_CxF: how hard each fragment has pushed the training by each checkpoint: the sum
    over the steps so far and over its fed target tokens of (1 - p(target)), the size of
    the loss gradient on the target logit, each step divided by the batch's target-token
    count (as the loss is); 0 at step 0. A fragment's share of the sum (or of its increase
    between checkpoints) is its share of the gradient signal; `surrogate`'s screen calls a
    fed fragment starved when that share is a small fraction of its share of the fed
    examples.
  """
  eval_loss_CxM: jax.Array
  train_loss_T: jax.Array
  diagnostics: diag_lib.Diagnostics | None
  diverged_step: jax.Array
  grad_push_CxF: jax.Array


def build_sim_data(fragments: Fragments, tokenized: Tokenized, *, vocab_size: int,
                   eval_train: int | Sequence[int] = 4, diag_probes: int = 4,
                   key: jax.Array) -> SimData:
  """Chooses what to evaluate and groups it by fragment.

  Args:
    fragments: the data set.
    tokenized: `encode_examples` of all its examples, in order.
    vocab_size: V of the model.
    eval_train: train examples evaluated per fragment (a random subset), or an explicit
      list of example positions.
    diag_probes: probes per fragment used for the diagnostics (a random subset).
    key: chooses the subsets.
  """
  num_f = len(fragments.names)
  probe_pools = fragments.probe_pools()
  train_pools = fragments.train_pools()
  k_train, k_diag = jax.random.split(key)
  if isinstance(eval_train, int):
    keys = jax.random.split(k_train, num_f)
    chosen = [np.sort(np.asarray(jax.random.permutation(k, pool))[:eval_train])
              for k, pool in zip(keys, train_pools)]
    train_idx = np.concatenate(chosen).astype(np.int32)
  else:
    train_idx = np.asarray(eval_train, np.int32)
  probe_idx = np.concatenate(probe_pools).astype(np.int32) if probe_pools else np.zeros(0, np.int32)
  eval_idx = np.concatenate([probe_idx, train_idx]).astype(np.int32)
  frag_M = fragments.fragment_of[eval_idx]
  is_probe_M = np.arange(len(eval_idx)) < len(probe_idx)

  def weights(select_M):
    w = (frag_M[None, :] == np.arange(num_f)[:, None]) & select_M[None, :]
    return (w / np.maximum(w.sum(1, keepdims=True), 1)).astype(np.float32)

  keys = jax.random.split(k_diag, num_f)
  diag_idx = np.concatenate(
      [np.sort(np.asarray(jax.random.permutation(k, pool))[:diag_probes])
       for k, pool in zip(keys, probe_pools)]).astype(np.int32)
  toks = tokenized.tokens_ExL1[diag_idx]
  valid_PxL = toks[:, :-1] != PAD_ID
  frag_P = fragments.fragment_of[diag_idx]
  w = (frag_P[None, :, None] == np.arange(num_f)[:, None, None]) & valid_PxL[None]
  w = w.reshape(num_f, -1).astype(np.float32)
  w /= np.maximum(w.sum(1, keepdims=True), 1)
  tokens_FxV = np.zeros((num_f, vocab_size), np.float32)
  for p, f in enumerate(frag_P):
    tokens_FxV[f, toks[p, :-1][valid_PxL[p]]] = 1.0
  probes = diag_lib.ProbeSet(jnp.asarray(toks), jnp.asarray(w), jnp.asarray(tokens_FxV))
  return SimData(jnp.asarray(tokenized.tokens_ExL1), jnp.asarray(tokenized.mask_ExL),
                 jnp.asarray(eval_idx), jnp.asarray(weights(is_probe_M)),
                 jnp.asarray(weights(~is_probe_M)), probes,
                 jnp.asarray(fragments.fragment_of, jnp.int32))


def _eval_losses(params, data: SimData, cfg: model_lib.ModelConfig, chunk: int) -> jax.Array:
  """Per-example losses of `data.eval_idx_M`, `chunk` examples per forward pass."""
  m = data.eval_idx_M.shape[0]
  pad = -m % chunk
  idx = jnp.concatenate([data.eval_idx_M, jnp.zeros((pad,), jnp.int32)]).reshape(-1, chunk)
  losses = jax.lax.map(
      lambda i: model_lib.example_losses(params, data.tokens_ExL1[i], data.mask_ExL[i], cfg), idx)
  return losses.reshape(-1)[:m]


def _checkpoint(params, data, ref, cfg, plan):
  loss_M = _eval_losses(params, data, cfg, plan.eval_chunk)
  if not plan.diagnostics:
    return loss_M, None
  now = diag_lib.capture(params, data.probes, cfg)
  return loss_M, diag_lib.diagnose(now, ref, data.probes, loss_M, data.probe_weight_FxM,
                                   data.train_weight_FxM)


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _loss_and_push(params, tokens_BxL1, mask_BxL, cfg: model_lib.ModelConfig):
  """The training loss (as `model.batch_loss`) and each example's push (see `Trajectory`)."""
  logits = model_lib.forward(params, tokens_BxL1[:, :-1], cfg)
  tok_BxL = model_lib.token_losses(logits, tokens_BxL1[:, 1:])
  denom = jnp.maximum(mask_BxL.sum(), 1.0)
  push_B = ((1.0 - jnp.exp(-tok_BxL)) * mask_BxL).sum(-1) / denom
  return (tok_BxL * mask_BxL).sum() / denom, jax.lax.stop_gradient(push_B)


# With Adam and layer norms a run at far too high a rate stays finite while its loss climbs
# by orders of magnitude, so finiteness alone would not catch it. A fine-tune that behaves
# like a real one never multiplies its batch loss by this much.
DIVERGED_LOSS_FACTOR = 4.0


class TrainCarry(NamedTuple):
  """The training scan's carry (one order).

  params, opt_state: what trains (the model, or its low-rank adapters) and its optimizer
    state.
  diverged_step: the step the run diverged at, or -1.
  t: steps taken (fed or not).
  push_F: each fragment's summed gradient push so far (`Trajectory.grad_push_CxF`).
  ref_loss: the first fed step's loss (at least log V), NaN before it.
  frozen: the base model under low-rank adapters (`opt_cfg.adapter`), else empty.
  """
  params: model_lib.Params
  opt_state: Any
  diverged_step: jax.Array
  t: jax.Array
  push_F: jax.Array
  ref_loss: jax.Array
  frozen: model_lib.Params


def _trainer(tokens_ExL1, mask_ExL, fragment_E, num_f: int, knobs: optim.Knobs, opt_cfg,
             model_cfg):
  """The training loop's pieces: `start(params0) -> carry` and the scan body `train_step`.

  The carry is a `TrainCarry`; the body takes one optimizer step on the batch `idx_B` at
  rate `lr`. A step whose loss or new parameters are not finite, or whose loss exceeds
  `DIVERGED_LOSS_FACTOR` x `ref_loss` (the first fed step's loss, at least log V), marks the
  run diverged; from then on, and on steps with no example, nothing moves.
  """
  opt = optim.make_optimizer(opt_cfg)
  wd = opt_cfg.weight_decay * knobs.weight_decay_scale
  spec = opt_cfg.adapter

  def start(params0) -> TrainCarry:
    if spec is None:
      trained, frozen = params0, {}
    else:  # every order and seed starts from the same adapters, as one seeded real init
      trained, frozen = adapters.init(jax.random.key(0), params0, spec), params0
    return TrainCarry(trained, opt.init(trained), jnp.int32(-1), jnp.int32(0),
                      jnp.zeros((num_f,), jnp.float32), jnp.float32(jnp.nan), frozen)

  def train_step(carry: TrainCarry, xs):
    params, opt_state, diverged_step, t, push_F, ref_loss, frozen = carry
    idx_B, lr = xs
    valid_B = idx_B >= 0
    safe_B = jnp.where(valid_B, idx_B, 0)
    tokens = tokens_ExL1[safe_B]
    mask = mask_ExL[safe_B] * valid_B[:, None].astype(jnp.float32)
    (loss, push_B), grads = jax.value_and_grad(
        lambda p: _loss_and_push(model_params(opt_cfg, p, frozen), tokens, mask, model_cfg),
        has_aux=True)(params)
    updates, new_state = opt.update(grads, opt_state, params, lr * knobs.lr_scale, wd)
    new_params = jax.tree.map(jnp.add, params, updates)
    ref_loss = jnp.where(jnp.isnan(ref_loss) & valid_B.any(),
                         jnp.maximum(loss, math.log(model_cfg.vocab_size)), ref_loss)
    healthy = (jnp.isfinite(loss) & _all_finite(new_params)
               & ~(loss > DIVERGED_LOSS_FACTOR * ref_loss))
    newly_diverged = (diverged_step < 0) & ~healthy & valid_B.any()
    diverged_step = jnp.where(newly_diverged, t, diverged_step)
    move = valid_B.any() & (diverged_step < 0)
    params, opt_state = jax.tree.map(lambda a, b: jnp.where(move, a, b),
                                     (new_params, new_state), (params, opt_state))
    push_F = push_F + jnp.where(move, jax.ops.segment_sum(
        push_B, fragment_E[safe_B], num_segments=num_f), 0.0)
    return (TrainCarry(params, opt_state, diverged_step, t + 1, push_F, ref_loss, frozen),
            jnp.where(valid_B.any(), loss, jnp.nan))

  return start, train_step


def model_params(opt_cfg: optim.OptimizerConfig, trained, frozen) -> model_lib.Params:
  """The parameters the model computes with: `trained` itself, or under low-rank adapters
  the frozen base with them merged in."""
  if opt_cfg.adapter is None:
    return trained
  return adapters.merge(frozen, trained, opt_cfg.adapter)


def train(params0, knobs: optim.Knobs, order_TxB: jax.Array, lr_T: jax.Array,
          tokens_ExL1: jax.Array, mask_ExL: jax.Array, *, model_cfg: model_lib.ModelConfig,
          opt_cfg: optim.OptimizerConfig):
  """Trains on one order without evaluating; returns (params, train_loss_T, diverged_step).

  The same step rule as `simulate` (used for pre-training and wherever only the end state
  matters).
  """
  fragment_E = jnp.zeros(tokens_ExL1.shape[:1], jnp.int32)
  start, step = _trainer(tokens_ExL1, mask_ExL, fragment_E, 1, knobs, opt_cfg, model_cfg)
  carry, loss_T = jax.lax.scan(step, start(params0), (order_TxB, lr_T))
  return model_params(opt_cfg, carry.params, carry.frozen), loss_T, carry.diverged_step


def _begin(params0, data: SimData, model_cfg: model_lib.ModelConfig, plan: SimPlan):
  """The diagnostics' reference state and the checkpoint at step 0: (ref, (eval_M, diag))."""
  ref = diag_lib.capture(params0, data.probes, model_cfg) if plan.diagnostics else None
  return ref, _checkpoint(params0, data, ref, model_cfg, plan)


def _segment(carry, xs, train_step, data, ref, model_cfg, opt_cfg, plan):
  """Trains the `eval_every` steps of `xs` = (idx_KxB, lr_K), then takes a checkpoint."""
  carry, loss_K = jax.lax.scan(train_step, carry, xs)
  params = model_params(opt_cfg, carry.params, carry.frozen)
  return carry, (loss_K, _checkpoint(params, data, ref, model_cfg, plan), carry.push_F)


def _assemble(first, carry, outs, *, steps: int, plan: SimPlan) -> Trajectory:
  """One order's `Trajectory` from its step-0 checkpoint, last carry and segment outputs."""
  eval0_M, diag0 = first
  loss_SxK, (eval_SxM, diag_S), push_SxF = outs
  stack = lambda a, b: jnp.concatenate([a[None], b])
  diverged_step = carry.diverged_step
  # A checkpoint taken after the divergence shows a frozen model: report it as NaN.
  ckpt_C = jnp.asarray(plan.checkpoint_steps(steps))
  bad_C = (diverged_step >= 0) & (ckpt_C > diverged_step)
  eval_CxM = jnp.where(bad_C[:, None], jnp.nan, stack(eval0_M, eval_SxM))
  diags = None
  if plan.diagnostics:
    diags = jax.tree.map(lambda a, b: jnp.where(bad_C[:, None], jnp.nan, stack(a, b)),
                         diag0, diag_S)
  push_CxF = stack(jnp.zeros_like(carry.push_F), push_SxF)
  return Trajectory(eval_CxM, loss_SxK.reshape(-1)[:steps], diags, diverged_step, push_CxF)


def _split_segments(order_TxB, lr_T, k: int):
  """Pads T with empty steps to a multiple of k and splits it: [S, K, B], [S, K]."""
  steps = order_TxB.shape[0]
  segs = math.ceil(steps / k)
  pad = segs * k - steps
  order_SxKxB = jnp.concatenate(
      [order_TxB, jnp.full((pad, order_TxB.shape[1]), -1, order_TxB.dtype)]).reshape(segs, k, -1)
  lr_SxK = jnp.concatenate([lr_T, jnp.zeros((pad,), lr_T.dtype)]).reshape(segs, k)
  return order_SxKxB, lr_SxK


def simulate(params0, knobs: optim.Knobs, order_TxB: jax.Array, lr_T: jax.Array,
             data: SimData, *, model_cfg: model_lib.ModelConfig,
             opt_cfg: optim.OptimizerConfig, plan: SimPlan) -> Trajectory:
  """Trains the surrogate from `params0` on one feeding order. Pure; vmap it for many.

  Args:
    params0: the initial (pre-trained) parameters.
    knobs: calibrated scales of the learning rate and weight decay.
    order_TxB: example positions fed at each step; -1 marks an empty slot, and a step with
      no example is skipped (the optimizer does not move).
    lr_T: the learning rate of each step before `knobs.lr_scale` (see
      `optim.learning_rates`, or a real run's logged rates).
    data: the shared token table and eval selection.
    model_cfg, opt_cfg, plan: static configuration.

  Returns:
    The run's `Trajectory`; checkpoints at `plan.checkpoint_steps(T)`.
  """
  order_SxKxB, lr_SxK = _split_segments(order_TxB, lr_T, plan.eval_every)
  start, train_step = _trainer(data.tokens_ExL1, data.mask_ExL, data.fragment_E,
                               data.probe_weight_FxM.shape[0], knobs, opt_cfg, model_cfg)
  ref, first = _begin(params0, data, model_cfg, plan)
  segment = functools.partial(_segment, train_step=train_step, data=data, ref=ref,
                              model_cfg=model_cfg, opt_cfg=opt_cfg, plan=plan)
  carry, outs = jax.lax.scan(segment, start(params0), (order_SxKxB, lr_SxK))
  return _assemble(first, carry, outs, steps=order_TxB.shape[0], plan=plan)


class Sharing(enum.Enum):
  """Whether `simulate_many` simulates the common prefixes of orders once.

  AUTO: when that saves at least `SHARE_MIN_SAVED` of the work and `SHARE_MIN_ORDERS`
  orders' worth; ALWAYS and NEVER as they say. Results equal those without sharing up to
  float rounding.
  """
  AUTO = "auto"
  ALWAYS = "always"
  NEVER = "never"


class OrderAxes(NamedTuple):
  """Which of `simulate_many`'s inputs carry their own leading order axis (0) and which
  every order shares (None), as `jax.vmap`'s `in_axes` say it.

  params: the initial parameters (0 for an ensemble or one state per order).
  knobs: the learning-rate and weight-decay scales (0 for a knob grid).
  """
  params: int | None = None
  knobs: int | None = None


SHARED = OrderAxes()
PER_ORDER = OrderAxes(params=0, knobs=0)


def check_axes(params0, knobs: optim.Knobs, axes: OrderAxes, n: int,
               model_cfg: model_lib.ModelConfig) -> None:
  """Raises ValueError unless `params0` and `knobs` have the shapes `axes` declares for
  `n` orders."""
  want = jax.eval_shape(lambda k: model_lib.init_params(k, model_cfg), jax.random.key(0))
  lead = () if axes.params is None else (n,)
  got = jax.tree.map(lambda a: tuple(np.shape(a)), params0)
  expected = jax.tree.map(lambda a: lead + tuple(a.shape), want)
  if got != expected:
    raise ValueError(f"params0 does not match OrderAxes(params={axes.params}) for {n} orders "
                     f"(embedding {got.get('embed_VxD') if isinstance(got, dict) else got}, "
                     f"expected {expected['embed_VxD']})")
  k_shape = (n,) if axes.knobs == 0 else ()
  for name, v in zip(knobs._fields, knobs):
    if np.shape(v) != k_shape:
      raise ValueError(f"knobs.{name} has shape {np.shape(v)}; OrderAxes(knobs={axes.knobs}) "
                       f"for {n} orders needs {k_shape}")


@functools.partial(jax.jit, static_argnames=("model_cfg", "opt_cfg", "plan", "axes"))
def _simulate_batch(params0, knobs, orders_NxTxB, lr_NxT, data, *, model_cfg, opt_cfg, plan,
                    axes: OrderAxes):
  fn = functools.partial(simulate, data=data, model_cfg=model_cfg, opt_cfg=opt_cfg, plan=plan)
  return jax.vmap(fn, in_axes=(axes.params, axes.knobs, 0, 0))(params0, knobs, orders_NxTxB,
                                                                lr_NxT)


def compiled_count() -> int:
  """How many programs the many-orders simulator has compiled in this process (jit's own
  cache of `_simulate_batch` and of prefix sharing's `_advance_batch`): tests check that a
  second call with new data of the same shapes compiles nothing."""
  return _simulate_batch._cache_size() + _advance_batch._cache_size()


@functools.partial(jax.jit, static_argnames=("model_cfg", "opt_cfg", "plan"))
def _begin_root(params0, knobs, data, *, model_cfg, opt_cfg, plan):
  """One initial state's training carry, diagnostics reference and step-0 checkpoint."""
  start, _ = _trainer(data.tokens_ExL1, data.mask_ExL, data.fragment_E,
                      data.probe_weight_FxM.shape[0], knobs, opt_cfg, model_cfg)
  return start(params0), *_begin(params0, data, model_cfg, plan)


@functools.partial(jax.jit, static_argnames=("model_cfg", "opt_cfg", "plan"))
def _advance_batch(carry_W, order_WxKxB, lr_WxK, ref, knobs, data, *, model_cfg, opt_cfg, plan):
  """One segment for W states of one root: vmapped `_segment`."""
  _, train_step = _trainer(data.tokens_ExL1, data.mask_ExL, data.fragment_E,
                           data.probe_weight_FxM.shape[0], knobs, opt_cfg, model_cfg)
  seg = lambda c, o, lr: _segment(c, (o, lr), train_step, data, ref, model_cfg, opt_cfg, plan)
  return jax.vmap(seg)(carry_W, order_WxKxB, lr_WxK)


def default_chunk_size(devices: Sequence[jax.Device]) -> int:
  """Orders per compiled call when none is given: what ran fastest per platform.

  CPU: 2 orders per device. On this project's 2-core machine the default workload ran
  1.14-1.41x faster per order in chunks of 2 per device than of 16 per device, side by
  side, and 1.3x faster than in chunks of 32 per device, the earlier default
  (docs/experiments.md):
  `vmap` over orders buys nothing on a CPU (each order has its own weights), and a small
  chunk's working set stays in cache.

  Accelerators: 64 per device. An H200 ran chunks of 1,024 orders 1.5x faster per order
  than chunks of 64 (10.4 GB against 1.6 GB), but each new chunk shape costs a compilation
  of about 35 s there, and smaller jobs (N < chunk) get a shape of their own: with 512 the
  demo took longer than with 16. For jobs of thousands of orders pass a larger chunk_size.
  """
  per_device = 2 if devices[0].platform == "cpu" else 64
  return per_device * len(devices)


# Prefix sharing is used by default when it saves at least this share of the segments and
# this many orders' worth of work. Its own compilation costs about 15-20 orders' worth on a
# CPU, but replaces the whole-run one in a process that has not compiled that yet (the 17
# variants of docs/simulator.md's example, a fresh process: 30.7 s shared, 46.6 s not).
SHARE_MIN_SAVED = 0.2
SHARE_MIN_ORDERS = 8
SHARE_BLOCK = 256  # orders whose prefix tree is held at once (bounds the states in memory)


def simulate_many(params0, knobs: optim.Knobs, orders_NxTxB, lr_NxT, data: SimData, *,
                  model_cfg: model_lib.ModelConfig, opt_cfg: optim.OptimizerConfig,
                  plan: SimPlan, chunk_size: int | None = None,
                  devices: Sequence[jax.Device] | None = None,
                  progress: bool = True, sharing: Sharing = Sharing.AUTO,
                  axes: OrderAxes = SHARED) -> Trajectory:
  """Simulates N orders: `simulate` vmapped, in chunks, each chunk sharded over devices.

  Memory is bounded by `chunk_size`, not N. Every chunk has the same shape (the last is
  padded by repeating its first order), so the function compiles once per shape.

  Orders that begin alike (the same batches and learning rates from the same initial state
  for one or more whole eval intervals) can share that part: with prefix sharing the orders
  are simulated an eval interval at a time, each distinct prefix once
  (`surrogate.prefix`), and the states branch where the orders part.

  Args:
    params0: initial parameters, shared or with a leading N axis (one per order), as
      `axes.params` says.
    knobs: shared, or with a leading N axis, as `axes.knobs` says.
    orders_NxTxB: int example positions, -1 for empty slots.
    lr_NxT: base learning rate of each step of each order (or [T], shared).
    data, model_cfg, opt_cfg, plan: as for `simulate`.
    chunk_size: orders (or, with prefix sharing, states) per compiled call, rounded up to a
      multiple of the device count (default: `default_chunk_size`). Results do not depend
      on it beyond float rounding (the vmap width can reorder a reduction's sums).
    devices: devices to shard the order axis over (default: all local devices).
    progress: show a progress bar.
    sharing: whether to simulate common prefixes once (`Sharing`; default AUTO).
    axes: which of `params0` and `knobs` have an order axis (`OrderAxes`; checked).

  Returns:
    A `Trajectory` of numpy arrays with a leading N axis.
  """
  orders = np.asarray(orders_NxTxB, np.int32)
  n, steps = orders.shape[:2]
  check_axes(params0, knobs, axes, n, model_cfg)
  lrs = np.broadcast_to(np.asarray(lr_NxT, np.float32), (n, steps))
  devices = list(devices or jax.local_devices())
  chunk = max(1, min(chunk_size or default_chunk_size(devices), n))
  chunk = -(-chunk // len(devices)) * len(devices)
  place = _Placement.over(devices)
  per_order_params, per_order_knobs = axes.params == 0, axes.knobs == 0
  data = place.replicated(data)
  bar = _progress(n, progress)

  if sharing is not Sharing.NEVER and n > 1 and steps > 0:
    o_NxSxKxB, lr_NxSxK = prefix_lib.segment_orders(orders, lrs, plan.eval_every)
    blocks = _prefix_blocks(params0 if per_order_params else None,
                            knobs if per_order_knobs else None, o_NxSxKxB, lr_NxSxK,
                            check=sharing is Sharing.AUTO)
    if blocks:
      static = _Static(model_cfg, opt_cfg, plan, axes, steps)
      out = [_simulate_shared(params0, knobs, b, data, chunk=chunk, place=place, bar=bar,
                              static=static) for b in blocks]
      bar.close()
      perm = np.concatenate([b.sel_N for b in blocks])
      inverse = np.empty_like(perm)
      inverse[perm] = np.arange(n)
      return jax.tree.map(lambda *xs: np.concatenate(xs)[inverse], *out)

  if not per_order_params:
    params0 = place.replicated(params0)
  if not per_order_knobs:
    knobs = place.replicated(knobs)

  def take(tree, sel):
    return place.sharded(jax.tree.map(lambda a: np.asarray(a)[sel], tree))

  results = []
  for start in range(0, n, chunk):
    sel = np.arange(start, start + chunk)
    sel = np.where(sel < n, sel, start)  # pad the last chunk with a copy of its first order
    out = _simulate_batch(
        take(params0, sel) if per_order_params else params0,
        take(knobs, sel) if per_order_knobs else knobs,
        take(orders, sel), take(lrs, sel), data,
        model_cfg=model_cfg, opt_cfg=opt_cfg, plan=plan, axes=axes)
    real = min(chunk, n - start)
    results.append(jax.tree.map(functools.partial(_head, k=real), out))
    bar.update(real)
  bar.close()
  return jax.tree.map(lambda *xs: np.concatenate(xs), *results)


def _prefix_blocks(params_N, knobs_N, o_NxSxKxB, lr_NxSxK, *, check: bool):
  """Sorts the orders so that sharers are adjacent and cuts them into blocks.

  Args:
    check: return [] unless sharing saves `SHARE_MIN_SAVED` of the work and
      `SHARE_MIN_ORDERS` orders' worth.

  Returns:
    The `_Block`s.
  """
  n = len(o_NxSxKxB)
  per_order = [np.asarray(a) for t in (params_N, knobs_N) if t is not None
               for a in jax.tree.leaves(t)]
  root_N = prefix_lib.roots_of(per_order) if per_order else np.zeros(n, np.int64)
  hash_NxS = prefix_lib.segment_hashes(o_NxSxKxB, lr_NxSxK)
  segs = hash_NxS.shape[1]
  need = max(SHARE_MIN_SAVED * n * segs, SHARE_MIN_ORDERS * segs)
  # Quick bound: every depth has at least as many states as the first.
  first_states = len(np.unique(np.stack([root_N.astype(np.uint64), hash_NxS[:, 0]], 1), axis=0))
  if check and n * segs - first_states * segs < need:
    return []
  # Sorted by root, then by each segment's hash in turn: orders alike up to any depth are
  # adjacent, so the blocks keep them together.
  perm = np.lexsort(np.concatenate([hash_NxS[:, ::-1], root_N[:, None].astype(np.uint64)],
                                   axis=1).T)
  blocks = []
  for start in range(0, n, SHARE_BLOCK):
    sel = perm[start:start + SHARE_BLOCK]
    _, root_b = np.unique(root_N[sel], return_inverse=True)  # the block's roots: 0 .. R-1
    root_b = root_b.reshape(-1).astype(np.int64)
    blocks.append(_Block(sel, o_NxSxKxB[sel], lr_NxSxK[sel], root_b,
                         prefix_lib.prefix_tree(o_NxSxKxB[sel], lr_NxSxK[sel], root_b)))
  if check and n * segs - sum(b.tree.work for b in blocks) < need:
    return []
  return blocks


class _Placement(NamedTuple):
  """Where `simulate_many` puts arrays: the order axis split over the devices, or copied."""
  shard: NamedSharding
  replicate: NamedSharding

  @classmethod
  def over(cls, devices: Sequence[jax.Device]) -> _Placement:
    mesh = jax.sharding.Mesh(np.array(devices), ("orders",))
    return cls(NamedSharding(mesh, PartitionSpec("orders")), NamedSharding(mesh, PartitionSpec()))

  def sharded(self, tree):
    return jax.device_put(tree, self.shard)

  def replicated(self, tree):
    return jax.device_put(tree, self.replicate)


class _Block(NamedTuple):
  """Orders simulated together with prefix sharing: their positions, their segmented
  batches and rates, the root (initial state) of each and their `prefix.PrefixTree`."""
  sel_N: np.ndarray
  o_NxSxKxB: np.ndarray
  lr_NxSxK: np.ndarray
  root_N: np.ndarray
  tree: prefix_lib.PrefixTree


class _Static(NamedTuple):
  """What is fixed for a whole `simulate_many` call."""
  model_cfg: model_lib.ModelConfig
  opt_cfg: optim.OptimizerConfig
  plan: SimPlan
  axes: OrderAxes
  steps: int


def _simulate_shared(params0, knobs, block: _Block, data, *, chunk: int, place: _Placement,
                     bar, static: _Static) -> Trajectory:
  """A block's orders simulated an eval interval at a time, each prefix once; numpy
  results."""
  sel_N, o_NxSxKxB, lr_NxSxK, root_N, tree = block
  n = len(sel_N)
  axes, steps, plan = static.axes, static.steps, static.plan
  put_rep, put_sharded = place.replicated, place.sharded
  static = {"model_cfg": static.model_cfg, "opt_cfg": static.opt_cfg, "plan": plan}
  pick = lambda t, i: jax.tree.map(lambda a: np.asarray(a)[i], t)
  # Per root (0 .. R-1): knobs and diagnostics reference on the devices; training carry and
  # step-0 checkpoint on the host.
  own_params, own_knobs = axes.params == 0, axes.knobs == 0
  roots, carry0, first0 = [], [], []
  for r in range(int(root_N.max()) + 1):
    i = sel_N[np.argmax(root_N == r)]
    k_r = put_rep(pick(knobs, i) if own_knobs else knobs)
    p_r = put_rep(pick(params0, i) if own_params else params0)
    c, ref, first = _begin_root(p_r, k_r, data, **static)
    roots.append((k_r, ref))
    carry0.append(jax.device_get(c))
    first0.append(jax.device_get(first))
  carry = jax.tree.map(lambda *xs: np.stack(xs), *carry0)
  done, shown = 0, 0
  outs_S = []
  for s, (first_U, parent_U) in enumerate(zip(tree.first_S, tree.parent_S)):
    root_U = root_N[first_U]
    new_carry, out = None, None
    for r in np.unique(root_U):
      idx = np.nonzero(root_U == r)[0]
      for c in range(0, len(idx), chunk):
        sel = idx[c:c + chunk]
        pad = np.concatenate([sel, np.repeat(sel[:1], chunk - len(sel))])
        k_r, ref = roots[r]
        res = _advance_batch(put_sharded(pick(carry, parent_U[pad])),
                             put_sharded(o_NxSxKxB[first_U[pad], s]),
                             put_sharded(lr_NxSxK[first_U[pad], s]), ref, k_r, data, **static)
        res = jax.device_get(res)
        if out is None:
          new_carry, out = jax.tree.map(
              functools.partial(_empty_like_rows, rows=len(first_U)), res)
        jax.tree.map(functools.partial(_put_rows, sel=sel), (new_carry, out), res)
        done += len(sel)
        now = n * done // tree.work
        bar.update(now - shown)
        shown = now
    carry = new_carry
    outs_S.append(out)
  # Each order's path through the tree: its node's outputs at every depth.
  node_SxN = tree.node_SxN
  outs = jax.tree.map(lambda *xs: np.stack([x[node_SxN[s]] for s, x in enumerate(xs)], 1),
                      *outs_S)
  last = pick(carry, node_SxN[-1])
  first = jax.tree.map(lambda *xs: np.stack(xs)[root_N], *first0)
  traj = jax.vmap(functools.partial(_assemble, steps=steps, plan=plan))(first, last, outs)
  return jax.tree.map(np.asarray, traj)


def _head(a, k: int) -> np.ndarray:
  return np.asarray(a)[:k]


def _empty_like_rows(a, rows: int) -> np.ndarray:
  return np.empty((rows,) + a.shape[1:], a.dtype)


def _put_rows(buf: np.ndarray, a: np.ndarray, sel: np.ndarray) -> None:
  buf[sel] = a[:len(sel)]


def _progress(total: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, unit="order", desc="simulating", disable=not enabled, leave=False)
