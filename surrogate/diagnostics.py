"""The five per-fragment diagnostics, each comparing a checkpoint with the initial state,
and the output entropy.

All are computed on a fragment's probe inputs (never fed), at every checkpoint, from the
same forward pass. Axis legend: F fragments, P diagnostic probe examples, L length,
D width, H heads, K layers, V vocabulary, M evaluated examples.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from surrogate import model as model_lib


class Diagnostics(NamedTuple):
  """Per-fragment diagnostics at one checkpoint (each F; stacked as CxF by the simulator).

  embedding_drift: ||E_t[S_f] - E_0[S_f]||_F / ||E_0[S_f]||_F, the relative change of the
    token-embedding rows of S_f, the set of tokens occurring in fragment f's probe inputs.
  attention_shift: Jensen-Shannon divergence (nats, in [0, ln 2]) between the attention
    distribution of each query position now and at the start, averaged over layers,
    heads and the non-padding query positions of f's probes.
  plasticity: 1 - linear CKA (Kornblith et al. 2019) between the final-layer hidden states
    of f's non-padding probe positions now and at the start (0: same geometry, 1: unrelated).
  logit_shift: KL(p_0 || p_t) of the next-token distributions, in nats, averaged over f's
    non-padding probe positions (how far predictions moved, whether or not they improved).
  robustness: mean probe loss - mean train loss of f over the evaluated examples (the
    generalization gap on unseen inputs; NaN when no train example of f is evaluated).
  entropy: the entropy (nats) of the next-token distribution, averaged over f's non-padding
    probe positions; not a comparison but the state itself, to spot output collapse (a
    model that grows certain of its next token on unseen inputs).
  """
  embedding_drift: jax.Array
  attention_shift: jax.Array
  plasticity: jax.Array
  logit_shift: jax.Array
  robustness: jax.Array
  entropy: jax.Array


class ProbeSet(NamedTuple):
  """The probe inputs diagnostics are measured on, and what they are grouped by.

  tokens_PxL1: token rows of the diagnostic probes.
  weight_FxPL: 1 / (number of f's valid positions) at each valid position of f's probes,
    0 elsewhere (rows sum to 1), flattened over P*L.
  tokens_FxV: 1 where token v occurs in f's probe inputs.
  """
  tokens_PxL1: jax.Array
  weight_FxPL: jax.Array
  tokens_FxV: jax.Array


class Reference(NamedTuple):
  """A state's view of the probes; the initial state's is the baseline for every diagnostic.

  p_PxLxV and negent_PxL (sum of p log p) are kept so that the KL against this state costs
  one multiply-add per entry instead of an exponential.
  """
  embed_VxD: jax.Array
  attn_KxPxHxLxL: jax.Array
  hidden_PxLxD: jax.Array
  logp_PxLxV: jax.Array
  p_PxLxV: jax.Array
  negent_PxL: jax.Array


def capture(params, probes: ProbeSet, cfg: model_lib.ModelConfig) -> Reference:
  """What the model at `params` shows on the probes (used for the start and each checkpoint)."""
  logits, cap = model_lib.forward(params, probes.tokens_PxL1[:, :-1], cfg, capture=True)
  logp = jax.nn.log_softmax(logits, axis=-1)
  p = jnp.exp(logp)
  return Reference(params["embed_VxD"], cap.attn_KxBxHxLxL, cap.hidden_BxLxD, logp, p,
                   (p * logp).sum(-1))


def _weighted_mean_F(value_PL: jax.Array, probes: ProbeSet) -> jax.Array:
  return probes.weight_FxPL @ value_PL


def embedding_drift(embed_VxD, ref: Reference, probes: ProbeSet) -> jax.Array:
  delta_V = jnp.square(embed_VxD - ref.embed_VxD).sum(-1)
  base_V = jnp.square(ref.embed_VxD).sum(-1)
  return jnp.sqrt((probes.tokens_FxV @ delta_V) / jnp.maximum(probes.tokens_FxV @ base_V, 1e-30))


def attention_js_PxL(attn_KxPxHxLxL, ref_attn_KxPxHxLxL) -> jax.Array:
  """Jensen-Shannon divergence of each query position's attention now and at the start,
  averaged over layers and heads."""
  p, q = attn_KxPxHxLxL, ref_attn_KxPxHxLxL
  m = 0.5 * (p + q)
  # xlogy treats 0 log 0 as 0: masked (future) keys carry exactly zero probability.
  kl = lambda a: (jax.scipy.special.xlogy(a, a) - jax.scipy.special.xlogy(a, m)).sum(-1)
  return (0.5 * (kl(p) + kl(q))).mean(axis=(0, 2))


def attention_shift(attn_KxPxHxLxL, ref: Reference, probes: ProbeSet) -> jax.Array:
  js_PxL = attention_js_PxL(attn_KxPxHxLxL, ref.attn_KxPxHxLxL)
  return _weighted_mean_F(js_PxL.reshape(-1), probes)


def plasticity(hidden_PxLxD, ref: Reference, probes: ProbeSet) -> jax.Array:
  w_FxN = probes.weight_FxPL
  y = hidden_PxLxD.reshape(w_FxN.shape[1], -1)
  x = ref.hidden_PxLxD.reshape(w_FxN.shape[1], -1)
  # Weighted centring per fragment: c = x - mean_f(x), without materialising F copies.
  mx_FxD, my_FxD = w_FxN @ x, w_FxN @ y
  def gram(a, ma, b, mb):  # sum_n w_fn (a_n - ma_f)(b_n - mb_f)^T
    return (jnp.einsum("fn,nd,ne->fde", w_FxN, a, b)
            - jnp.einsum("fd,fe->fde", ma, mb))
  yx, xx, yy = gram(y, my_FxD, x, mx_FxD), gram(x, mx_FxD, x, mx_FxD), gram(y, my_FxD, y, my_FxD)
  norm = lambda g: jnp.sqrt(jnp.square(g).sum(axis=(1, 2)))
  cka = jnp.square(yx).sum(axis=(1, 2)) / jnp.maximum(norm(xx) * norm(yy), 1e-30)
  return 1.0 - cka


def logit_kl_PxL(logp_PxLxV, ref_p_PxLxV, ref_negent_PxL) -> jax.Array:
  """KL(p_0 || p_t) of each position's next-token distribution (p_0 given with its sum of
  p log p)."""
  return ref_negent_PxL - (ref_p_PxLxV * logp_PxLxV).sum(-1)


def logit_shift(logp_PxLxV, ref: Reference, probes: ProbeSet) -> jax.Array:
  kl_PxL = logit_kl_PxL(logp_PxLxV, ref.p_PxLxV, ref.negent_PxL)
  return _weighted_mean_F(kl_PxL.reshape(-1), probes)


def entropy(negent_PxL, probes: ProbeSet) -> jax.Array:
  h_PxL = -negent_PxL
  return _weighted_mean_F(h_PxL.reshape(-1), probes)


def robustness(eval_loss_M, probe_weight_FxM, train_weight_FxM) -> jax.Array:
  """Mean probe loss minus mean train loss per fragment (weights rows sum to 1, or 0)."""
  has_train = train_weight_FxM.sum(-1) > 0
  gap = probe_weight_FxM @ eval_loss_M - train_weight_FxM @ eval_loss_M
  return jnp.where(has_train, gap, jnp.nan)


def diagnose(now: Reference, ref: Reference, probes: ProbeSet, eval_loss_M,
             probe_weight_FxM, train_weight_FxM) -> Diagnostics:
  """All five diagnostics of the state `now` against the initial state `ref`."""
  return Diagnostics(
      embedding_drift=embedding_drift(now.embed_VxD, ref, probes),
      attention_shift=attention_shift(now.attn_KxPxHxLxL, ref, probes),
      plasticity=plasticity(now.hidden_PxLxD, ref, probes),
      logit_shift=logit_shift(now.logp_PxLxV, ref, probes),
      robustness=robustness(eval_loss_M, probe_weight_FxM, train_weight_FxM),
      entropy=entropy(now.negent_PxL, probes),
  )
