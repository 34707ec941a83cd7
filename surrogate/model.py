"""The surrogate: a small causal transformer (GPT-2 shaped) as pure functions over a pytree.

Axis legend (suffixes on locals): B batch, L length (context), D width, H heads,
K layers (depth), V vocabulary, E examples.

One example is a row of `length + 1` token ids (a BOS token, then the text); the model
reads the first `length` and predicts the next token at each position, so targets are
the last `length`. Padding sits at the end and, the model being causal, never changes
the outputs at earlier positions; it is excluded from losses by the target mask.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

Params = dict  # a pytree of arrays; see `init_params` for its layout.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of the surrogate. Everything here sets array shapes, so it is static.

  Attributes:
    vocab_size: V, the compact vocabulary (BPE trained on the fragments).
    length: L, context length in tokens (examples are truncated to it).
    width: D, the residual width.
    depth: K, the number of transformer blocks.
    heads: H, attention heads; must divide `width`.
    mlp_ratio: hidden width of each MLP as a multiple of D.
  """
  vocab_size: int = 512
  length: int = 32
  width: int = 32
  depth: int = 2
  heads: int = 2
  mlp_ratio: int = 4

  def __post_init__(self):
    for name in ("vocab_size", "length", "width", "depth", "heads", "mlp_ratio"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.width % self.heads:
      raise ValueError(f"ModelConfig.heads={self.heads} must divide width={self.width}")

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  def train_flops_per_token(self) -> float:
    """Matmul FLOPs of one training token (forward + backward = 3 x forward)."""
    return 3 * self.forward_flops_per_token()

  def forward_flops_per_token(self) -> float:
    """Matmul FLOPs of one token through the model (2 per multiply-add), attention included."""
    d, l = self.width, self.length
    per_block = 2 * (4 * d * d + 2 * self.mlp_ratio * d * d) + 2 * 2 * l * d
    return self.depth * per_block + 2 * d * self.vocab_size

  def num_params(self) -> int:
    d, k = self.width, self.depth
    block = 4 * d * d + 4 * d + 2 * self.mlp_ratio * d * d + self.mlp_ratio * d + d + 4 * d
    return self.vocab_size * d + self.length * d + k * block + 2 * d


class Captured(NamedTuple):
  """Internals of a forward pass that the diagnostics read.

  attn_KxBxHxLxL: attention probabilities of every layer.
  hidden_BxLxD: the final hidden state (after the last layer norm).
  """
  attn_KxBxHxLxL: jax.Array
  hidden_BxLxD: jax.Array


def init_params(key: jax.Array, cfg: ModelConfig) -> Params:
  """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2K).

  Block parameters are stacked on a leading K axis. The output head is tied to the token
  embedding, as in GPT-2.
  """
  d, k, m = cfg.width, cfg.depth, cfg.mlp_ratio * cfg.width
  keys = jax.random.split(key, 6)
  std, resid_std = 0.02, 0.02 / math.sqrt(2 * k)
  normal = lambda kk, shape, s: s * jax.random.normal(kk, shape, jnp.float32)
  return {
      "embed_VxD": normal(keys[0], (cfg.vocab_size, d), std),
      "pos_LxD": normal(keys[1], (cfg.length, d), 0.01),
      "blocks": {
          "ln1_scale_KxD": jnp.ones((k, d)), "ln1_bias_KxD": jnp.zeros((k, d)),
          "qkv_KxDx3D": normal(keys[2], (k, d, 3 * d), std),
          "qkv_bias_Kx3D": jnp.zeros((k, 3 * d)),
          "proj_KxDxD": normal(keys[3], (k, d, d), resid_std),
          "proj_bias_KxD": jnp.zeros((k, d)),
          "ln2_scale_KxD": jnp.ones((k, d)), "ln2_bias_KxD": jnp.zeros((k, d)),
          "fc_KxDxM": normal(keys[4], (k, d, m), std), "fc_bias_KxM": jnp.zeros((k, m)),
          "out_KxMxD": normal(keys[5], (k, m, d), resid_std), "out_bias_KxD": jnp.zeros((k, d)),
      },
      "lnf_scale_D": jnp.ones((d,)), "lnf_bias_D": jnp.zeros((d,)),
  }


def _layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * _lift(scale, x) + _lift(bias, x)


def _lift(v, like):
  """Explicit broadcast of a trailing-axis vector (tests run with rank promotion off)."""
  return v.reshape((1,) * (like.ndim - v.ndim) + v.shape)


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


class _Blocks(nn.Module):
  """The K transformer blocks (pre-LN, GPT-2), parameters stacked on a leading K axis.

  The K axis is unrolled in Python rather than `nn.scan`ned: at depth 2 the straight-line
  graph is what the hand-rolled model compiled to, and a scan would add a loop and slices.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, capture: bool) -> tuple[jax.Array, list[jax.Array]]:
    cfg = self.cfg
    d, k, m = cfg.width, cfg.depth, cfg.mlp_ratio * cfg.width
    std, resid_std = 0.02, 0.02 / math.sqrt(2 * k)
    ones, zeros = nn.initializers.ones, nn.initializers.zeros
    stacked = {
        "ln1_scale_KxD": self.param("ln1_scale_KxD", ones, (k, d)),
        "ln1_bias_KxD": self.param("ln1_bias_KxD", zeros, (k, d)),
        "qkv_KxDx3D": self.param("qkv_KxDx3D", _normal(std), (k, d, 3 * d)),
        "qkv_bias_Kx3D": self.param("qkv_bias_Kx3D", zeros, (k, 3 * d)),
        "proj_KxDxD": self.param("proj_KxDxD", _normal(resid_std), (k, d, d)),
        "proj_bias_KxD": self.param("proj_bias_KxD", zeros, (k, d)),
        "ln2_scale_KxD": self.param("ln2_scale_KxD", ones, (k, d)),
        "ln2_bias_KxD": self.param("ln2_bias_KxD", zeros, (k, d)),
        "fc_KxDxM": self.param("fc_KxDxM", _normal(std), (k, d, m)),
        "fc_bias_KxM": self.param("fc_bias_KxM", zeros, (k, m)),
        "out_KxMxD": self.param("out_KxMxD", _normal(resid_std), (k, m, d)),
        "out_bias_KxD": self.param("out_bias_KxD", zeros, (k, d)),
    }
    b, l, _ = x_BxLxD.shape
    h, hd = cfg.heads, cfg.head_dim
    causal_LxL = jnp.tril(jnp.ones((l, l), bool))
    attns = []
    for i in range(k):
      p = jax.tree.map(lambda a: a[i], stacked)
      y = _layer_norm(x_BxLxD, p["ln1_scale_KxD"], p["ln1_bias_KxD"])
      qkv = y @ p["qkv_KxDx3D"] + _lift(p["qkv_bias_Kx3D"], y)
      q, kk, v = jnp.split(qkv.reshape(b, l, 3, h, hd), 3, axis=2)
      q, kk, v = (a[:, :, 0] for a in (q, kk, v))  # each BxLxHxhd
      scores_BxHxLxL = jnp.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(hd)
      scores_BxHxLxL = jnp.where(causal_LxL[None, None], scores_BxHxLxL, -1e9)
      attn_BxHxLxL = jax.nn.softmax(scores_BxHxLxL, axis=-1)
      if capture:
        attns.append(attn_BxHxLxL)
      ctx = jnp.einsum("bhqk,bkhd->bqhd", attn_BxHxLxL, v).reshape(b, l, d)
      x_BxLxD = x_BxLxD + ctx @ p["proj_KxDxD"] + _lift(p["proj_bias_KxD"], ctx)
      y = _layer_norm(x_BxLxD, p["ln2_scale_KxD"], p["ln2_bias_KxD"])
      y = jax.nn.gelu(y @ p["fc_KxDxM"] + _lift(p["fc_bias_KxM"], y), approximate=True)
      x_BxLxD = x_BxLxD + y @ p["out_KxMxD"] + _lift(p["out_bias_KxD"], y)
    return x_BxLxD, attns


class Transformer(nn.Module):
  """The surrogate as a flax linen module whose parameters are `init_params`'s dict.

  `Transformer(cfg).apply({"params": params}, inputs_BxL)` runs on the plain dict pytree
  that `init_params` returns, saved simulators store and `simulate` vmaps and scans over;
  linen's pure `apply` keeps it a pytree (NNX's stateful modules would need split/merge at
  every vmap and scan boundary). The initialisers declared here have `init_params`'s
  distributions, but `init_params` (its own key splits) is what the library uses: the
  recorded figures depend on its exact numbers. flax checks the shapes on every apply.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, inputs_BxL: jax.Array, capture: bool = False
               ) -> jax.Array | tuple[jax.Array, Captured]:
    cfg = self.cfg
    d = cfg.width
    ones, zeros = nn.initializers.ones, nn.initializers.zeros
    embed_VxD = self.param("embed_VxD", _normal(0.02), (cfg.vocab_size, d))
    pos_LxD = self.param("pos_LxD", _normal(0.01), (cfg.length, d))
    l = inputs_BxL.shape[1]
    x_BxLxD = embed_VxD[inputs_BxL] + pos_LxD[None, :l]
    x_BxLxD, attns = _Blocks(cfg, name="blocks")(x_BxLxD, capture)
    hidden_BxLxD = _layer_norm(x_BxLxD, self.param("lnf_scale_D", ones, (d,)),
                               self.param("lnf_bias_D", zeros, (d,)))
    logits_BxLxV = hidden_BxLxD @ embed_VxD.T  # tied to the token embedding, as in GPT-2
    if capture:
      return logits_BxLxV, Captured(jnp.stack(attns), hidden_BxLxD)
    return logits_BxLxV


def forward(params: Params, inputs_BxL: jax.Array, cfg: ModelConfig, *,
            capture: bool = False) -> jax.Array | tuple[jax.Array, Captured]:
  """Next-token logits for a batch of token rows (`Transformer(cfg)` applied to `params`).

  Args:
    params: from `init_params`.
    inputs_BxL: int token ids, L <= cfg.length.
    cfg: the model's shape.
    capture: also return the attention maps and final hidden states.

  Returns:
    logits_BxLxV, and a `Captured` when `capture` is set.
  """
  return Transformer(cfg).apply({"params": params}, inputs_BxL, capture=capture)


def token_losses(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Cross-entropy of each target token, as logsumexp - target logit (no one-hot: cheaper)."""
  target_logit = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_BxLxV, axis=-1) - target_logit


def example_losses(params: Params, tokens_BxL1: jax.Array, mask_BxL: jax.Array,
                   cfg: ModelConfig) -> jax.Array:
  """Mean token cross-entropy of each example over its target mask (RunLog's `losses`).

  Args:
    tokens_BxL1: token rows of length L + 1 (inputs are [:, :-1], targets [:, 1:]).
    mask_BxL: 1.0 where the target token counts (all text tokens; completion tokens only).

  Returns:
    loss_B; an example whose mask is empty gets 0.
  """
  logits = forward(params, tokens_BxL1[:, :-1], cfg)
  tok_BxL = token_losses(logits, tokens_BxL1[:, 1:])
  return (tok_BxL * mask_BxL).sum(-1) / jnp.maximum(mask_BxL.sum(-1), 1.0)


def batch_loss(params: Params, tokens_BxL1: jax.Array, mask_BxL: jax.Array,
               cfg: ModelConfig) -> jax.Array:
  """Training loss: mean over all target tokens of the batch (as HF causal-LM losses are)."""
  logits = forward(params, tokens_BxL1[:, :-1], cfg)
  tok_BxL = token_losses(logits, tokens_BxL1[:, 1:])
  return (tok_BxL * mask_BxL).sum() / jnp.maximum(mask_BxL.sum(), 1.0)
