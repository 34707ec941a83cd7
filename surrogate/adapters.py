"""Low-rank adapters on the surrogate's matrices: the surrogate's side of a LoRA fine-tune.

When the real runs train LoRA adapters on a frozen base (the RunLog header's `adapter`), the
surrogate does the same: each targeted block matrix W [K, Din, Dout] gains A [K, Din, r] and
B [K, r, Dout], the model computes with W + (alpha / r) A B, and only A and B train. As in
`peft`, A starts uniform in +-1/sqrt(Din) and B at zero, so the adapted model starts as the
base. Axis legend as in `surrogate.model`; R the rank.

The real model's module names map onto the surrogate's four matrices by what they do:
attention's input projections (GPT-2 `c_attn`, Llama/Mistral `q_proj`/`k_proj`/`v_proj`,
BERT `query`/`key`/`value`) onto `qkv`, its output projection onto `proj`, the MLP's first
matrix (`c_fc`, `gate_proj`/`up_proj`, `intermediate.dense`) onto `fc` and its second onto
`out`. GPT-2's `c_proj`, in both attention and MLP, maps onto both.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from surrogate.model import Params

MATRICES = {"qkv": "qkv_KxDx3D", "proj": "proj_KxDxD", "fc": "fc_KxDxM", "out": "out_KxMxD"}

_REAL_NAMES = {
    "c_attn": ("qkv",), "q_proj": ("qkv",), "k_proj": ("qkv",), "v_proj": ("qkv",),
    "qkv_proj": ("qkv",), "query": ("qkv",), "key": ("qkv",), "value": ("qkv",),
    "Wqkv": ("qkv",), "query_key_value": ("qkv",),
    "o_proj": ("proj",), "out_proj": ("proj",), "dense": ("proj",),
    "c_proj": ("proj", "out"),
    "c_fc": ("fc",), "gate_proj": ("fc",), "up_proj": ("fc",), "fc1": ("fc",),
    "dense_h_to_4h": ("fc",), "intermediate.dense": ("fc",), "gate_up_proj": ("fc",),
    "down_proj": ("out",), "fc2": ("out",), "dense_4h_to_h": ("out",), "output.dense": ("out",),
}


@dataclasses.dataclass(frozen=True)
class LowRank:
  """The adapters of a low-rank fine-tune (static: it sets shapes).

  Attributes:
    rank: R, the adapters' rank (capped at half the surrogate's width when applied).
    alpha: the update is scaled by alpha / R, as in `peft`.
    targets: the surrogate matrices adapted, a subset of `MATRICES`' keys.
  """
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("qkv", "fc")

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(sorted(set(self.targets))))
    if self.rank < 1 or not self.alpha > 0:
      raise ValueError(f"LowRank needs rank >= 1 and alpha > 0, got {self.rank}, {self.alpha}")
    bad = [t for t in self.targets if t not in MATRICES]
    if bad or not self.targets:
      raise ValueError(f"LowRank.targets must be some of {sorted(MATRICES)}, got "
                       f"{list(self.targets)}")

  @classmethod
  def from_header(cls, adapter: Mapping[str, Any]) -> LowRank:
    """From a RunLog header's `adapter` (real module names mapped as the module doc says).

    Raises:
      ValueError: not a LoRA adapter, or no rank.
    """
    kind = str(adapter.get("kind", "lora")).lower()
    if kind != "lora":
      raise ValueError(f"the surrogate has a low-rank mode for LoRA adapters, not {kind!r}")
    if "r" not in adapter:
      raise ValueError("the header's adapter has no rank `r`")
    targets = adapter.get("targets") or ()
    names = [targets] if isinstance(targets, str) else list(targets)
    mapped = {m for n in names for m in _matrices_of(str(n))}
    if not mapped:
      warnings.warn(f"no LoRA target in {names} maps onto a surrogate matrix; adapting qkv and "
                    "fc", UserWarning, stacklevel=2)
      mapped = {"qkv", "fc"}
    r = int(adapter["r"])
    return cls(rank=r, alpha=float(adapter.get("alpha", r)), targets=tuple(mapped))

  def to_dict(self) -> dict[str, Any]:
    return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> LowRank:
    return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), targets=tuple(d["targets"]))


def _matrices_of(name: str) -> tuple[str, ...]:
  for key in sorted(_REAL_NAMES, key=len, reverse=True):  # "output.dense" before "dense"
    if name == key or name.endswith("." + key):
      return _REAL_NAMES[key]
  return ()


def _rank(params: Params, spec: LowRank) -> int:
  width = params["embed_VxD"].shape[-1]
  return max(1, min(spec.rank, width // 2))


def init(key: jax.Array, params: Params, spec: LowRank) -> Params:
  """Adapters for `params`: {"<target>_A": [K, Din, R], "<target>_B": [K, R, Dout]}."""
  r = _rank(params, spec)
  out = {}
  for name, k in zip(spec.targets, jax.random.split(key, len(spec.targets))):
    w = params["blocks"][MATRICES[name]]
    depth, d_in, d_out = w.shape
    bound = 1.0 / jnp.sqrt(jnp.float32(d_in))
    out[f"{name}_A"] = jax.random.uniform(k, (depth, d_in, r), jnp.float32, -bound, bound)
    out[f"{name}_B"] = jnp.zeros((depth, r, d_out), jnp.float32)
  return out


def merge(params: Params, adapters: Params, spec: LowRank) -> Params:
  """The parameters the adapted model computes with: W + (alpha / R) A B on each target."""
  blocks = dict(params["blocks"])
  for name in spec.targets:
    a, b = adapters[f"{name}_A"], adapters[f"{name}_B"]
    scale = spec.alpha / a.shape[-1]
    key = MATRICES[name]
    blocks[key] = blocks[key] + scale * jnp.einsum("kir,kro->kio", a, b)
  return {**params, "blocks": blocks}

