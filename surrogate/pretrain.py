"""Pre-training the surrogate on neutral text, so that it starts as a real model does: knowing
language already, and some fragments better than others.

DESIGN.md, last section: from scratch the surrogate ranked held-out orders with decision
accuracy 0.73; after 600-1,500 steps on neutral text (not the fragments) 0.87-0.89.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from surrogate import model as model_lib
from surrogate import optim
from surrogate.simulate import train
from surrogate.tokenize import Tokenized

DEFAULT_PRETRAIN_OPT = optim.OptimizerConfig(lr=3e-3, weight_decay=0.01, warmup_steps=50,
                                             schedule="cosine", final_lr_fraction=0.1,
                                             grad_clip=1.0)


@functools.partial(jax.jit, static_argnames=("model_cfg", "opt_cfg", "steps", "batch_size"))
def _pretrain(params, tokens_ExL1, mask_ExL, key, *, model_cfg, opt_cfg, steps, batch_size):
  order_TxB = jax.random.randint(key, (steps, batch_size), 0, tokens_ExL1.shape[0])
  lr_T = jnp.asarray(optim.learning_rates(opt_cfg, steps))
  return train(params, optim.Knobs.identity(), order_TxB, lr_T, tokens_ExL1, mask_ExL,
               model_cfg=model_cfg, opt_cfg=opt_cfg)


def pretrain(params: model_lib.Params, corpus: Tokenized, *, model_cfg: model_lib.ModelConfig,
             key: jax.Array, steps: int = 800, batch_size: int = 16,
             opt_cfg: optim.OptimizerConfig = DEFAULT_PRETRAIN_OPT):
  """Trains `params` on random batches (with replacement) of `corpus`.

  Args:
    params: initial parameters.
    corpus: neutral text, tokenized with the surrogate's tokenizer (not the fragments).
    model_cfg: the surrogate's shape.
    key: draws the batches.
    steps, batch_size, opt_cfg: the pre-training schedule.

  Returns:
    (params, loss_T): the pre-trained parameters and each step's training loss.

  Raises:
    FloatingPointError: pre-training diverged (lower `opt_cfg.lr`).
  """
  params, loss_T, diverged = _pretrain(params, jnp.asarray(corpus.tokens_ExL1),
                                       jnp.asarray(corpus.mask_ExL), key, model_cfg=model_cfg,
                                       opt_cfg=opt_cfg, steps=steps, batch_size=batch_size)
  if int(diverged) >= 0:
    raise FloatingPointError(f"pre-training diverged at step {int(diverged)}")
  return params, loss_T


@functools.partial(jax.jit, static_argnames=("model_cfg", "opt_cfg", "steps", "batch_size"))
def _pretrain_ensemble(keys_S, tokens_ExL1, mask_ExL, *, model_cfg, opt_cfg, steps, batch_size):
  def one(key):
    k_init, k_batches = jax.random.split(key)
    params = model_lib.init_params(k_init, model_cfg)
    return _pretrain(params, tokens_ExL1, mask_ExL, k_batches, model_cfg=model_cfg,
                     opt_cfg=opt_cfg, steps=steps, batch_size=batch_size)
  return jax.vmap(one)(keys_S)


def pretrain_ensemble(corpus: Tokenized, *, model_cfg: model_lib.ModelConfig, key: jax.Array,
                      seeds: int, steps: int = 800, batch_size: int = 16,
                      opt_cfg: optim.OptimizerConfig = DEFAULT_PRETRAIN_OPT):
  """`seeds` surrogates, each from its own initialisation and batches, pre-trained at once.

  Averaging a few seeds steadies the simulated order effects (DESIGN.md: one seed's
  Kendall tau of orders swung 0.56-0.74), and their spread is part of the uncertainty.

  Returns:
    (params, loss_SxT): parameters with a leading seed axis, and each seed's step losses.

  Raises:
    FloatingPointError: a seed's pre-training diverged.
  """
  params, loss_SxT, diverged_S = _pretrain_ensemble(
      jax.random.split(key, seeds), jnp.asarray(corpus.tokens_ExL1), jnp.asarray(corpus.mask_ExL),
      model_cfg=model_cfg, opt_cfg=opt_cfg, steps=steps, batch_size=batch_size)
  bad = [int(s) for s in jnp.nonzero(diverged_S >= 0)[0]]
  if bad:
    raise FloatingPointError(f"pre-training diverged for seeds {bad}")
  return params, loss_SxT
