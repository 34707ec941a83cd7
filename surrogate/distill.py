"""Distillation: the surrogate learns the real base model's next-token distributions.

The targets are a teacher's top-k next tokens per position and the mass of all the rest
(a `Targets` made by `calibrate.io.teacher.targets` from a teacher file). The loss is the
cross-entropy of the surrogate's distribution, coarsened to the same k + 1 outcomes, against
the teacher's; minus the teacher's entropy that is the KL divergence of the coarsened
distributions, which `distill_kl` reports.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from surrogate import model as model_lib
from surrogate import optim
from surrogate.pretrain import DEFAULT_PRETRAIN_OPT


class Targets(NamedTuple):
  """A teacher's distributions aligned with the surrogate's token rows.

  tokens_NxL1: int32 [N, L + 1] surrogate rows (BOS, the text's tokens, PAD).
  top_ids_NxLxK: int32 surrogate ids of the teacher's k most likely next tokens at each
    input position (position p predicts token p + 1).
  top_logp_NxLxK: float32 their log-probabilities; -inf for a token the surrogate has no
    row for (its mass is in the rest).
  rest_logp_NxL: float32 log-probability of every other token together.
  weight_NxL: float32 1 where the teacher's distribution applies (the surrogate's row and
    the teacher's tokens agree up to there), else 0.
  """
  tokens_NxL1: np.ndarray
  top_ids_NxLxK: np.ndarray
  top_logp_NxLxK: np.ndarray
  rest_logp_NxL: np.ndarray
  weight_NxL: np.ndarray


def _cross_entropy_and_entropy(params, tokens, top_ids, top_logp, rest_logp, weight, cfg):
  logq = jax.nn.log_softmax(forward_logits(params, tokens, cfg), -1)
  q_top = jnp.take_along_axis(logq, top_ids, -1)
  valid = jnp.isfinite(top_logp)
  p_top = jnp.where(valid, jnp.exp(top_logp), 0.0)
  q_mass = jnp.sum(jnp.where(valid, jnp.exp(q_top), 0.0), -1)
  log_q_rest = jnp.log1p(-jnp.clip(q_mass, 0.0, 1.0 - 1e-6))
  p_rest = jnp.exp(rest_logp)
  ce = -jnp.sum(p_top * q_top, -1) - p_rest * log_q_rest
  ent = -jnp.sum(jnp.where(valid, p_top * top_logp, 0.0), -1) - p_rest * rest_logp
  n = jnp.maximum(weight.sum(), 1.0)
  return (ce * weight).sum() / n, (ent * weight).sum() / n


def forward_logits(params, tokens_BxL1, cfg):
  return model_lib.forward(params, tokens_BxL1[:, :-1], cfg)


def distill_kl(params: model_lib.Params, targets: Targets, cfg: model_lib.ModelConfig,
               batch_size: int = 64) -> float:
  """Mean KL divergence (nats per weighted position) of the teacher's coarsened next-token
  distribution from the surrogate's, over all of `targets`."""
  ce_sum = ent_sum = 0.0
  n_sum = 0.0
  for s in range(0, len(targets.tokens_NxL1), batch_size):
    part = [jnp.asarray(a[s:s + batch_size]) for a in targets]
    ce, ent = _measure(params, *part, cfg=cfg)
    n = float(part[-1].sum())
    ce_sum, ent_sum, n_sum = ce_sum + float(ce) * n, ent_sum + float(ent) * n, n_sum + n
  return (ce_sum - ent_sum) / max(n_sum, 1.0)


_measure = jax.jit(_cross_entropy_and_entropy, static_argnames=("cfg",))  # compiled once


@functools.partial(jax.jit, static_argnames=("cfg", "opt_cfg", "steps", "batch_size"))
def _distill(params, targets, key, *, cfg, opt_cfg, steps, batch_size):
  opt = optim.make_optimizer(opt_cfg)
  lr_T = jnp.asarray(optim.learning_rates(opt_cfg, steps))
  idx_TxB = jax.random.randint(key, (steps, batch_size), 0, targets[0].shape[0])

  def step(carry, xs):
    params, state = carry
    idx_B, lr = xs
    batch = [a[idx_B] for a in targets]
    (loss, _), grads = jax.value_and_grad(_cross_entropy_and_entropy, has_aux=True)(
        params, *batch, cfg)
    updates, state = opt.update(grads, state, params, lr, opt_cfg.weight_decay)
    return (jax.tree.map(jnp.add, params, updates), state), loss

  (params, _), loss_T = jax.lax.scan(step, (params, opt.init(params)), (idx_TxB, lr_T))
  return params, loss_T


def distill_ensemble(params_S: model_lib.Params, targets: Targets, *,
                     cfg: model_lib.ModelConfig, key: jax.Array, steps: int,
                     batch_size: int = 16,
                     opt_cfg: optim.OptimizerConfig = DEFAULT_PRETRAIN_OPT):
  """Trains every seed of `params_S` (a leading seed axis) towards the teacher, each on its
  own random batches (with replacement) of `targets`.

  Returns:
    (params_S, loss_SxT): the distilled parameters and each step's cross-entropy.

  Raises:
    FloatingPointError: a seed's loss or parameters became non-finite (lower the rate).
  """
  arrays = tuple(jnp.asarray(a) for a in targets)
  n_seeds = jax.tree.leaves(params_S)[0].shape[0]
  params_S, loss_SxT = jax.vmap(
      lambda p, k: _distill(p, arrays, k, cfg=cfg, opt_cfg=opt_cfg, steps=steps,
                            batch_size=batch_size))(params_S, jax.random.split(key, n_seeds))
  finite = np.isfinite(np.asarray(loss_SxT)).all(1)
  for leaf in jax.tree.leaves(params_S):
    finite &= np.isfinite(np.asarray(leaf)).reshape(n_seeds, -1).all(1)
  if not finite.all():
    raise FloatingPointError(f"distillation diverged for seeds {np.flatnonzero(~finite).tolist()}")
  return params_S, loss_SxT
