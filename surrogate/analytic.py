"""The analytic tier: a fragment-level recurrence fitted on the transformer's own simulations.

The transformer surrogate costs seconds an order on a laptop; this model costs microseconds.
It follows, for every fragment j, two numbers through training: the mean loss of its probes
and the mean loss of its evaluated train examples (`x_2xF`: row 0 probes, row 1 train). At
step t the batch is described by three things only:

- `share_TxF`: the share of the batch's slots that hold fragment i's examples;
- `seen_TxF`: how much of fragment j's *evaluated* train examples the batch holds (the sum of
  their averaging weights; 1 when all of them are fed at once), so repetition and subsets
  of the very examples that are scored can be told from fresh ones;
- `lr_T`: the learning rate as a share of a reference peak (the calibration runs').

and every loss, a slow part x plus a fast part z, moves by

    dx_rj = -lr_t * ( (share_t @ A_r)_j * m_rj(t) * (x_rj - floor_rj)   fed fragments pull j
                      - (share_t @ R_r)_j * max(x0_rj - z0_rj - x_rj, 0)   and undo j's gain
                      + [r = train] D_j * seen_tj * (x_rj - floor_rj) )          memorising
    dz_rj = -lr_t * K_rj * z_rj          the fast drop of the first steps, whatever is fed
    m_rj(t) = exp(V_rj * (1 - sum_i share_ti^2))   mixed batches teach more than pure ones

`A` (transfer, any sign) and `R` (forgetting, >= 0) are per (fed i, evaluated j) pair, so
blocks, curricula, mixtures, subsets and repetition are all expressed; the pull saturates
at a floor below the starting loss, and what is forgotten is at most what was learned. The
fast part (at most 15 % of the starting loss) and the batch-diversity factor were the two
terms that most lowered the error on fresh orders in docs/experiments.md ("The analytic
tier"). With F fragments it has 4 F^2 + 9 F coefficients (684 for 12; the Adam form of
`rollout` adds F), fitted with optax on simulations of random orders of every family
(`fit`); `rollout_many` is one `vmap` over orders.

**The latent form** (`LatentParams`, `init_latent`) models the cause of those effects
instead: a point theta in a fitted K-dimensional space trained by Adam (or SGD), where
fragment j's probe and train losses are quadratics with their own centre c_rj and
curvature h_rj,

    loss_rj(theta) = floor_rj + 1/2 sum_k h_rjk (theta_k - c_rjk)^2      (loss_rj(0) = x0_rj),

the batch's gradient is the share-weighted sum of the fed fragments' train-loss gradients,
Adam's second moment also carries a fitted gradient noise per fed fragment, and weight
decay pulls theta back to 0 (the base model). Transfer (near centres), interference (far
ones), saturation, forgetting, recency and mixing (a pure batch pulls theta towards one
centre, a mixed one towards their compromise) then come from one mechanism. The fast part
and the memorised train examples are as above. `rollout` takes either kind of params.

Axis legend: T steps, C checkpoints, F fragments, K latent coordinates, N orders, S
surrogate seeds, E examples, M evaluated examples, B batch slots; the 2 is (probe, train).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["BLOCK", "Features", "FitResult", "LatentParams", "Params", "features", "fit",
           "init_latent", "init_params", "minimize", "phase_objective", "rollout",
           "rollout_blocks", "rollout_many", "soft_features"]


class Features(NamedTuple):
  """What the recurrence sees of an order (a leading N axis for many)."""
  share_TxF: jax.Array
  seen_TxF: jax.Array
  lr_T: jax.Array


class Params(NamedTuple):
  """Unconstrained coefficients (`rollout` maps them to their ranges); a leading S axis for
  one model per surrogate seed.

  transfer_2xFxF: A, the pull of fed fragment i on evaluated fragment j, per row.
  forget_2xFxF: R before softplus: how much of j's gain feeding i undoes.
  floor_2xF: the floor as a share of the starting loss, before a sigmoid.
  memorize_F: D before softplus: the extra pull on an evaluated train example that is fed.
  fast_2xF: the fast part's share of the starting loss (x 0.15), before a sigmoid.
  fast_rate_2xF: K before softplus: how fast the fast part goes.
  diversity_2xF: V: how much more a batch of many fragments pulls than one of a single one.
  shared_F: rho before a sigmoid, used only with Adam's betas (`rollout`): the part of fed
    fragment i's update whose second moment is shared with every fragment's.
  """
  transfer_2xFxF: jax.Array
  forget_2xFxF: jax.Array
  floor_2xF: jax.Array
  memorize_F: jax.Array
  fast_2xF: jax.Array
  fast_rate_2xF: jax.Array
  diversity_2xF: jax.Array
  shared_F: jax.Array


class LatentParams(NamedTuple):
  """Unconstrained coefficients of the latent form (a leading S axis for one per seed).

  centre_2xFxK: c, each (probe, train) loss's minimum in the latent space.
  curvature_2xFxK: the curvature's shape per coordinate before softplus (its scale is set
    by the floor: every loss starts at its x0 at theta = 0).
  floor_2xF: the floor as a share of the starting loss x0, before a sigmoid (a floor above
    the slow part's start, x0 less the fast part, would make the quadratic concave; nothing
    stops a fit from going there yet, and the fitted tiers were not checked for it).
  noise_FxK: before softplus, the gradient noise a fed fragment adds to Adam's second
    moment per unit share.
  rate_K: before softplus, the step size per coordinate.
  decay: before softplus, weight decay towards theta = 0.
  memorize_F, fast_2xF, fast_rate_2xF: as in `Params`; memorising scales the train loss's
    excess over its floor down while its evaluated examples are fed.
  diversity_F: how much a batch mixing many fragments raises the gradient, by the
    fragments it holds.
  """
  centre_2xFxK: jax.Array
  curvature_2xFxK: jax.Array
  floor_2xF: jax.Array
  noise_FxK: jax.Array
  rate_K: jax.Array
  decay: jax.Array
  memorize_F: jax.Array
  fast_2xF: jax.Array
  fast_rate_2xF: jax.Array
  diversity_F: jax.Array


def init_latent(num_f: int, num_k: int | None = None, *, seed: int = 0) -> LatentParams:
  """A start where coordinate f belongs to fragment f and the others (K >= F; K = 4F by
  default, docs/experiments.md) are shared, a little of every coordinate shared by all,
  probes and train examples at the same centre; the centres are jittered (fixed `seed`) so
  that no two fragments start exactly alike."""
  num_k = 4 * num_f if num_k is None else num_k
  rng = np.random.default_rng(seed)
  own = np.eye(num_f, num_k, dtype=np.float32) + 0.3 / np.sqrt(num_k)
  centre = np.stack([own, own]) + 0.05 * rng.standard_normal((2, num_f, num_k))
  zeros = jnp.zeros((2, num_f), jnp.float32)
  return LatentParams(jnp.asarray(centre, jnp.float32), jnp.zeros((2, num_f, num_k)), zeros,
                      jnp.full((num_f, num_k), -1.0), jnp.zeros((num_k,)), jnp.asarray(-4.0),
                      jnp.full((num_f,), -2.0), zeros - 1.0, zeros, jnp.zeros((num_f,)))


def init_params(num_f: int) -> Params:
  """A start where each fragment learns from itself and a little from the others."""
  eye = np.eye(num_f, dtype=np.float32)
  transfer = np.stack([eye + 0.1 * (1 - eye)] * 2)
  zeros = jnp.zeros((2, num_f), jnp.float32)
  return Params(jnp.asarray(transfer), jnp.full((2, num_f, num_f), -4.0, jnp.float32), zeros,
                jnp.full((num_f,), -2.0, jnp.float32), zeros - 1.0, zeros, zeros,
                jnp.zeros((num_f,), jnp.float32))


def features(order_TxB: np.ndarray, fragment_E: np.ndarray, train_weight_FxE: np.ndarray,
             lr_T: np.ndarray) -> Features:
  """The recurrence's inputs for concrete orders (numpy; any leading axes on the order).

  Args:
    order_TxB: example positions, -1 for an empty slot ([..., T, B]).
    fragment_E: every example's fragment.
    train_weight_FxE: fragment j's averaging weight of example e among its evaluated train
      examples (0 for every other example; rows sum to 1 or are 0).
    lr_T: the learning rate at each step as a share of the reference peak the coefficients
      were fitted at ([..., T]; the calibration runs' peak: an order run at half their rate
      has shares of 0.5).
  """
  order = np.asarray(order_TxB, np.int32)
  frag_E = np.asarray(fragment_E)
  # An example counts towards `seen` only for its own fragment.
  own_E = np.where(frag_E >= 0, train_weight_FxE[np.maximum(frag_E, 0), np.arange(len(frag_E))],
                   0.0)
  share, seen = _counts(order, jnp.asarray(frag_E, jnp.int32), jnp.asarray(own_E, jnp.float32),
                        train_weight_FxE.shape[0])
  lr = np.broadcast_to(np.asarray(lr_T, np.float64), order.shape[:-1])
  return Features(share, seen, jnp.asarray(lr, jnp.float32))


@functools.partial(jax.jit, static_argnums=3)
def _counts(order: jax.Array, frag_E: jax.Array, own_E: jax.Array, num_f: int):
  """(share, seen) of `features`, compiled: the one-hot over fragments is fused into its
  sums (4-5 times faster here than numpy's bincount over the cells)."""
  valid = order >= 0
  safe = jnp.where(valid, order, 0)
  frag = jnp.where(valid, frag_E[safe], -1)[..., None]
  hot = (frag == jnp.arange(num_f).reshape((1,) * order.ndim + (num_f,))).astype(jnp.float32)
  share = hot.sum(-2) / jnp.maximum(valid.sum(-1, keepdims=True), 1)
  return share, (hot * own_E[safe][..., None]).sum(-2)


def soft_features(logits_PxF: jax.Array, phase_T: jax.Array, seen_per_share_F: jax.Array,
                  lr_T: jax.Array) -> Features:
  """The features of a per-phase mixture in expectation, differentiable in its logits
  (`phase_T`: each step's phase, e.g. from `surrogate.orders.phase_lengths`).

  In phase p every slot holds fragment i with probability softmax(logits_p)_i and an
  example drawn uniformly from its pool (`surrogate.orders.mixture`), so the expected share
  is the weight, and fragment j's evaluated train examples are seen `weight_j x batch /
  pool_j` times a step (`seen_per_share_F` = batch / pool, 0 for a fragment with none). A
  weight near 0 is a subset without that fragment; a large weight on a small pool repeats
  its examples.
  """
  share_TxF = jax.nn.softmax(logits_PxF, -1)[phase_T]
  return Features(share_TxF, share_TxF * seen_per_share_F[None], lr_T)


def phase_objective(logits_PxF: jax.Array, params_S: Params, x0_Sx2xF: jax.Array,
                    phase_T: jax.Array, seen_per_share_F: jax.Array, lr_T: jax.Array,
                    weight_SxF: jax.Array, betas: tuple[float, float] | None = None,
                    max_kl: float = np.inf, penalty: float = 0.0) -> jax.Array:
  """The mean over seeds of sum_j weight_sj x fragment j's final probe loss under the
  per-phase mixture `logits_PxF` (`soft_features`): the quantity gradient search lowers.
  `params_S` and `x0_Sx2xF` have a leading seed axis; `betas` as for `rollout`.

  A phase whose weights are further than `max_kl` (nats) from uniform adds `penalty` x the
  squared excess: the trust region that keeps the search where the tier was fitted.
  """
  feats = soft_features(logits_PxF, phase_T, seen_per_share_F, lr_T)
  last = jnp.array([phase_T.shape[0]])
  final_SxF = jax.vmap(lambda p, x0: rollout(p, x0, feats, last, betas)[0, 0])(params_S,
                                                                                x0_Sx2xF)
  logw_PxF = jax.nn.log_softmax(logits_PxF, -1)
  kl_P = jnp.sum(jnp.exp(logw_PxF) * logw_PxF, -1) + jnp.log(logits_PxF.shape[-1])
  excess = jnp.sum(jnp.maximum(kl_P - max_kl, 0.0) ** 2)
  return jnp.mean(jnp.sum(weight_SxF * final_SxF, -1)) + penalty * excess


def rollout(params: Params | LatentParams, x0_2xF: jax.Array, feats: Features,
            checkpoints_C: jax.Array, betas: tuple[float, float] | None = None) -> jax.Array:
  """The losses after each checkpoint's step (0 = before training; steps within 0..T):
  [C, 2, F]. `LatentParams` roll out the latent form (Adam with `betas`, SGD without).

  With `betas` (Adam's b1, b2; static), fed fragment i's share is replaced by Adam's
  normalised step at fragment level, m_i / sqrt(v_i) / F: m_i the b1-average of its share,
  v_i the b2-average of rho_i * sum_k share_k^2 + (1 - rho_i) * share_i^2 (both bias
  corrected). A fragment fed after a long absence then takes large steps (its v is small),
  and a mixed batch, whose sum of squared shares is small, teaches more than a pure one.
  """
  if isinstance(params, LatentParams):
    return _rollout_latent(params, x0_2xF, feats, checkpoints_C, betas)
  num_f, steps = x0_2xF.shape[-1], feats.lr_T.shape[-1]
  scale = num_f / steps  # a fragment fed a 1/F share all along moves O(1) with O(1) coefficients
  transfer = params.transfer_2xFxF * scale
  forget = jax.nn.softplus(params.forget_2xFxF) * scale
  memorize = jax.nn.softplus(params.memorize_F) * scale
  fast_rate = jax.nn.softplus(params.fast_rate_2xF) * scale
  floor = x0_2xF * jax.nn.sigmoid(params.floor_2xF)
  z0_2xF = 0.15 * x0_2xF * jax.nn.sigmoid(params.fast_2xF)
  slow0_2xF = x0_2xF - z0_2xF

  rho_F = jax.nn.sigmoid(params.shared_F)

  def step(carry, inp):
    x_2xF, z_2xF, m_F, v_F, out_Cx2xF = carry
    share_F, seen_F, lr, t = inp
    square = jnp.sum(share_F * share_F)
    mixed = jnp.exp(params.diversity_2xF * (1.0 - square))
    push_F = share_F
    if betas is not None:
      b1, b2 = betas
      m_F = b1 * m_F + (1 - b1) * share_F
      v_F = b2 * v_F + (1 - b2) * (rho_F * square + (1 - rho_F) * share_F * share_F)
      m_hat = m_F / (1 - b1 ** (t + 1.0))
      v_hat = v_F / (1 - b2 ** (t + 1.0))
      push_F = m_hat / jnp.sqrt(v_hat + 1e-6) / num_f
    pull = jnp.einsum("i,rij->rj", push_F, transfer) * mixed
    undo = jnp.einsum("i,rij->rj", share_F, forget)
    dx = pull * (x_2xF - floor) - undo * jnp.maximum(slow0_2xF - x_2xF, 0.0)
    dx = dx.at[1].add(memorize * seen_F * (x_2xF[1] - floor[1]))
    x_2xF = x_2xF - lr * dx
    z_2xF = z_2xF - lr * fast_rate * z_2xF
    # Only the checkpoints are kept: a [T, 2, F] history per order would dominate the cost.
    hit_C = (checkpoints_C == t + 1)[:, None, None]
    return (x_2xF, z_2xF, m_F, v_F, jnp.where(hit_C, (x_2xF + z_2xF)[None], out_Cx2xF)), None

  start_Cx2xF = jnp.broadcast_to(x0_2xF, (checkpoints_C.shape[0], *x0_2xF.shape))
  moment_F = jnp.zeros((num_f,), x0_2xF.dtype)
  (*_, out_Cx2xF), _ = jax.lax.scan(
      step, (slow0_2xF, z0_2xF, moment_F, moment_F, start_Cx2xF), (*feats, jnp.arange(steps)))
  return out_Cx2xF


def _rollout_latent(p: LatentParams, x0_2xF: jax.Array, feats: Features,
                    checkpoints_C: jax.Array, betas: tuple[float, float] | None) -> jax.Array:
  num_f, steps = x0_2xF.shape[-1], feats.lr_T.shape[-1]
  num_k = p.centre_2xFxK.shape[-1]
  scale = num_f / steps
  floor = x0_2xF * jax.nn.sigmoid(p.floor_2xF)
  z0_2xF = 0.15 * x0_2xF * jax.nn.sigmoid(p.fast_2xF)
  slow0_2xF = x0_2xF - z0_2xF
  centre = p.centre_2xFxK
  shape = jax.nn.softplus(p.curvature_2xFxK) + 1e-3
  # Scaled so that every loss starts at its slow part: 1/2 sum_k h c^2 = slow0 - floor.
  curv = shape * (2 * (slow0_2xF - floor) / jnp.sum(shape * centre * centre, -1))[..., None]
  noise_FxK = jax.nn.softplus(p.noise_FxK)
  rate_K = jax.nn.softplus(p.rate_K) * 4.0 / steps  # O(1) latent distance over a run
  decay = jax.nn.softplus(p.decay) * scale
  memorize = jax.nn.softplus(p.memorize_F) * scale
  fast_rate = jax.nn.softplus(p.fast_rate_2xF) * scale

  def losses(theta_K, mem_F):
    d = theta_K[None, None] - centre
    excess = 0.5 * jnp.sum(curv * d * d, -1)
    return floor + excess.at[1].multiply(mem_F)

  # The batch's gradient, sum_i share_i h_ik (theta_k - c_ik), is theta_k (share @ h)_k -
  # (share @ h c)_k: one matrix product per step with the noise's, no [F, K] temporary.
  per_share_Fx3K = jnp.concatenate([curv[1], curv[1] * centre[1], noise_FxK], -1)

  def step(carry, inp):
    theta, m, v, mem, z, theta_C, mem_C, z_C = carry
    share_F, seen_F, lr, t = inp
    mixed = jnp.exp(share_F @ p.diversity_F * (1.0 - jnp.sum(share_F * share_F)))
    a_3K = share_F @ per_share_Fx3K
    grad_K = mixed * (a_3K[:num_k] * theta - a_3K[num_k:2 * num_k])
    if betas is None:
      move = rate_K * grad_K
    else:
      b1, b2 = betas
      m = b1 * m + (1 - b1) * grad_K
      v = b2 * v + (1 - b2) * (grad_K * grad_K + a_3K[2 * num_k:])
      move = rate_K * (m / (1 - b1 ** (t + 1.0))) / jnp.sqrt(v / (1 - b2 ** (t + 1.0)) + 1e-8)
    theta = theta - lr * (move + decay * theta)
    mem = mem * (1 - lr * memorize * seen_F)
    z = z - lr * fast_rate * z
    # Only the checkpoints' states are kept, written in place (the step and the checkpoints
    # are the same for every order, so under vmap this is one slice, not a select over all
    # C); their losses are read off after the scan.
    c = jnp.minimum(jnp.argmax(checkpoints_C == t + 1), n_c - 1)
    hit = jnp.any(checkpoints_C == t + 1)
    keep = lambda new, old_C: jax.lax.dynamic_update_index_in_dim(  # noqa: E731
        old_C, jnp.where(hit, new, old_C[c]), c, 0)
    return (theta, m, v, mem, z, keep(theta, theta_C), keep(mem, mem_C), keep(z, z_C)), None

  n_c = checkpoints_C.shape[0]
  zero_K = jnp.zeros((num_k,), x0_2xF.dtype)
  start = (zero_K, zero_K, zero_K, jnp.ones((num_f,), x0_2xF.dtype), z0_2xF,
           jnp.zeros((n_c, num_k), x0_2xF.dtype), jnp.ones((n_c, num_f), x0_2xF.dtype),
           jnp.broadcast_to(z0_2xF, (n_c, *z0_2xF.shape)))
  (*_, theta_C, mem_C, z_C), _ = jax.lax.scan(step, start, (*feats, jnp.arange(steps)))
  return jax.vmap(losses)(theta_C, mem_C) + z_C


def rollout_many(params: Params | LatentParams, x0_2xF: jax.Array, feats: Features,
                 checkpoints_C: jax.Array, betas: tuple[float, float] | None = None
                 ) -> jax.Array:
  """`rollout` over orders: features with a leading N axis -> [N, C, 2, F]."""
  one = lambda p, x0, f, c: rollout(p, x0, f, c, betas)  # noqa: E731 (betas stays static)
  return jax.vmap(one, in_axes=(None, None, 0, None))(params, x0_2xF, feats, checkpoints_C)


BLOCK = 2048  # orders a compiled call in `rollout_blocks` (docs/results.md, stop 36)


def rollout_blocks(params: Params | LatentParams, x0_2xF: jax.Array, feats: Features,
                   checkpoints_C: jax.Array, betas: tuple[float, float] | None = None, *,
                   block: int = BLOCK) -> np.ndarray:
  """`rollout_many` for any number of orders, in compiled calls of `block` orders each split
  over the host's devices: [N, C, 2, F] (numpy).

  A block of about a thousand orders a device keeps the recurrence's state in the CPU's
  caches: 65,536 orders in one call ran 3 times slower per order on this project's 2-core
  machine than 2,048 split over its two cores (`benchmarks/analytic.py`). With one XLA
  host device per core (the CLI sets that up) the blocks' halves run side by side.
  """
  devices = jax.local_devices()
  n, nd = feats.lr_T.shape[0], len(devices)
  size = -(-min(block, max(n, 1)) // nd) * nd  # a multiple of the devices
  mesh = jax.sharding.Mesh(np.array(devices), ("orders",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("orders"))
  copy = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params, x0_2xF, checkpoints_C = jax.device_put((params, x0_2xF, checkpoints_C), copy)
  pending = []
  for start in range(0, n, size):
    part = [np.asarray(a[start:start + size]) for a in feats]
    got = part[0].shape[0]
    # The last block is padded with copies of its last order, so every call has one shape.
    part = [np.concatenate([a, np.repeat(a[-1:], size - got, 0)]) for a in part]
    pending.append((got, _rollout_many_jit(params, x0_2xF, jax.device_put(Features(*part), split),
                                           checkpoints_C, betas)))
  if not pending:
    return np.empty((0, checkpoints_C.shape[0], *x0_2xF.shape), np.float32)
  return np.concatenate([np.asarray(out)[:got] for got, out in pending])


_rollout_many_jit = jax.jit(rollout_many, static_argnums=4)


def minimize(loss, start, opt: optax.GradientTransformation, steps: int):
  """`steps` full-batch steps of `opt` on `loss` from the pytree `start` (traceable: one
  `lax.scan`, to be compiled by the caller)."""
  def update(carry, _):
    p, state = carry
    upd, state = opt.update(jax.grad(loss)(p), state, p)
    return (optax.apply_updates(p, upd), state), None

  (out, _), _ = jax.lax.scan(update, (start, opt.init(start)), None, length=steps)
  return out


class FitResult(NamedTuple):
  """`fit`'s answer: the coefficients and the fit's mean squared error (over the finite
  targets), each with a leading S axis when fitted per seed."""
  params: Params
  mse: jax.Array


def _mse(params, x0_2xF, feats, checkpoints_C, target_NxCx2xF, betas=None):
  pred = rollout_many(params, x0_2xF, feats, checkpoints_C, betas)
  ok = jnp.isfinite(target_NxCx2xF)
  err = jnp.where(ok, pred - jnp.where(ok, target_NxCx2xF, 0.0), 0.0)
  return jnp.sum(err * err) / jnp.maximum(ok.sum(), 1)


def _fit_one(x0_2xF, feats, checkpoints_C, target_NxCx2xF, *, steps: int, learning_rate: float,
             l2: float, betas: tuple[float, float] | None, start: Params | LatentParams):
  num_f = x0_2xF.shape[-1]
  opt = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05))

  def objective(p):
    shrink = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(start)))
    return (_mse(p, x0_2xF, feats, checkpoints_C, target_NxCx2xF, betas)
            + l2 * shrink / num_f ** 2)

  params = minimize(objective, start, opt, steps)
  return FitResult(params, _mse(params, x0_2xF, feats, checkpoints_C, target_NxCx2xF, betas))


def fit(x0_Sx2xF: jax.Array, feats: Features, checkpoints_C: np.ndarray,
        target_SxNxCx2xF: jax.Array, *, steps: int = 2000, learning_rate: float = 0.05,
        l2: float = 1e-4, betas: tuple[float, float] | None = None,
        start: Params | LatentParams | None = None) -> FitResult:
  """Fits one recurrence per surrogate seed to that seed's simulations of N orders.

  Args:
    x0_Sx2xF: each seed's losses before training (the recurrence starts there).
    feats: the N orders' features (`features`).
    checkpoints_C: the steps the targets are taken after (0 = before training).
    target_SxNxCx2xF: each seed's fragment means at the checkpoints; NaN where a fragment
      has no example of that kind (ignored), or where a simulated run diverged.
    steps, learning_rate: Adam's steps (full batch) and peak rate (cosine decay).
    l2: pull of the coefficients towards the start, per coefficient: a fragment that the
      orders never vary keeps sensible coefficients instead of arbitrary ones.
    betas: Adam's (b1, b2) for the Adam form of `rollout` or the latent form's Adam; None
      for the plain form (or the latent form under SGD).
    start: where the fit starts, and the form it fits: `init_params(F)` (the default) or
      `init_latent(F, K)`.

  Returns:
    `FitResult` with a leading S axis.
  """
  start = init_params(x0_Sx2xF.shape[-1]) if start is None else start
  one = jax.jit(lambda x0, tgt: _fit_one(x0, feats, jnp.asarray(checkpoints_C), tgt, steps=steps,
                                         learning_rate=learning_rate, l2=l2, betas=betas,
                                         start=start))
  return jax.vmap(one)(jnp.asarray(x0_Sx2xF, jnp.float32),
                       jnp.asarray(target_SxNxCx2xF, jnp.float32))
