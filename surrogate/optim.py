"""The real run's training rule, for the surrogate: optimizer family, schedule, and knobs.

`OptimizerConfig` is static (it mirrors a RunLog header's `optimizer`); `Knobs` holds what
calibration fits, as arrays, so it can be vmapped over and differentiated.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from surrogate.adapters import LowRank


class OptimizerName(str, enum.Enum):
  ADAMW = "adamw"
  ADAM = "adam"
  SGD = "sgd"


class ScheduleKind(str, enum.Enum):
  CONSTANT = "constant"
  LINEAR = "linear"
  COSINE = "cosine"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer of a run, as in a RunLog header (see DESIGN.md, RunLog v1).

  Semantics follow PyTorch, which the real runs use: `adamw` decays weights decoupled from
  the gradient; `adam` and `sgd` add `weight_decay * param` to the gradient (L2). As in the
  HF Trainer, weight decay applies to matrices and embeddings, not to biases or norms.
  Clipping is by global norm, before the optimizer. The learning rate warms up linearly
  over `warmup_steps`, then follows `schedule` down to `final_lr_fraction * lr`. With an
  `adapter` only low-rank adapters train, the base frozen (`surrogate.adapters`).
  """
  name: OptimizerName = OptimizerName.ADAMW
  lr: float = 1e-3
  weight_decay: float = 0.0
  betas: tuple[float, float] = (0.9, 0.999)
  eps: float = 1e-8
  momentum: float = 0.0
  grad_clip: float | None = None
  warmup_steps: int = 0
  schedule: ScheduleKind = ScheduleKind.CONSTANT
  final_lr_fraction: float = 0.0
  adapter: LowRank | None = None

  def __post_init__(self):
    object.__setattr__(self, "name", OptimizerName(self.name))
    if isinstance(self.adapter, Mapping):
      object.__setattr__(self, "adapter", LowRank.from_dict(self.adapter))
    object.__setattr__(self, "schedule", ScheduleKind(self.schedule))
    object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
    if not (math.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f"OptimizerConfig.lr must be a positive number, got {self.lr}")
    if self.weight_decay < 0 or self.eps <= 0 or not 0 <= self.momentum < 1:
      raise ValueError("OptimizerConfig: weight_decay >= 0, eps > 0 and 0 <= momentum < 1")
    if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
      raise ValueError(f"OptimizerConfig.betas must be two numbers in [0, 1), got {self.betas}")
    if self.grad_clip is not None and self.grad_clip <= 0:
      raise ValueError(f"OptimizerConfig.grad_clip must be > 0, got {self.grad_clip}")
    if self.warmup_steps < 0 or not 0 <= self.final_lr_fraction <= 1:
      raise ValueError("OptimizerConfig: warmup_steps >= 0 and 0 <= final_lr_fraction <= 1")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> OptimizerConfig:
    """From a RunLog header's `optimizer` object (unknown keys are ignored)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in fields}
    if "betas" in kwargs:
      kwargs["betas"] = tuple(kwargs["betas"])
    return cls(**kwargs)

  @classmethod
  def of_run(cls, header) -> OptimizerConfig:
    """The training rule of a RunLog header: its `optimizer`, and its `adapter` (a LoRA
    fine-tune trains low-rank adapters on a frozen base; absent: a full fine-tune)."""
    cfg = cls.from_dict(header.optimizer)
    adapter = header.extra.get("adapter")
    if adapter is None:
      return cfg
    return dataclasses.replace(cfg, adapter=LowRank.from_header(adapter))

  def to_dict(self) -> dict[str, Any]:
    """JSON-friendly settings, as a RunLog header's `optimizer` (unset options left out)."""
    d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
    d["name"], d["schedule"], d["betas"] = self.name.value, self.schedule.value, list(self.betas)
    if self.adapter is not None:
      d["adapter"] = self.adapter.to_dict()
    return d


def learning_rates(cfg: OptimizerConfig, steps: int) -> np.ndarray:
  """The learning rate of each of `steps` optimizer steps, float32 [T].

  Mirrors `transformers.get_{constant,linear,cosine}_schedule_with_warmup` (which decay to
  zero) generalised with `final_lr_fraction`.
  """
  t = np.arange(steps, dtype=np.float64)
  w = cfg.warmup_steps
  warm = np.minimum(1.0, t / w) if w > 0 else np.ones_like(t)
  progress = np.clip((t - w) / max(1, steps - w), 0.0, 1.0)
  floor = cfg.final_lr_fraction
  if cfg.schedule is ScheduleKind.CONSTANT:
    decay = np.ones_like(t)
  elif cfg.schedule is ScheduleKind.LINEAR:
    decay = floor + (1 - floor) * (1 - progress)
  else:
    decay = floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * progress))
  return (cfg.lr * np.where(t < w, warm, decay)).astype(np.float32)


class Knobs(NamedTuple):
  """What calibration fits, as float32 scalars (arrays, so they vmap and differentiate).

  lr_scale: multiplies every step's learning rate.
  weight_decay_scale: multiplies the configured weight decay.
  """
  lr_scale: jax.Array
  weight_decay_scale: jax.Array

  @classmethod
  def identity(cls) -> Knobs:
    return cls(jnp.float32(1.0), jnp.float32(1.0))


class Optimizer(NamedTuple):
  """A pure optimizer: `init(params) -> state`; `update(grads, state, params, lr, wd)`."""
  init: Any
  update: Any


def _decay_mask(params):
  # HF's default: no weight decay on biases and norm parameters (1-D per layer).
  return jax.tree_util.tree_map_with_path(
      lambda path, p: not any(s in jax.tree_util.keystr(path) for s in ("bias", "scale")), params)


def make_optimizer(cfg: OptimizerConfig) -> Optimizer:
  """The update rule of `cfg` with the learning rate and weight decay passed per step.

  `update` returns the parameter updates (to add) and the new state; lr and wd are traced
  scalars so that `Knobs` can scale them.
  """
  clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity()
  if cfg.name is OptimizerName.SGD:
    core = optax.trace(decay=cfg.momentum) if cfg.momentum else optax.identity()
  else:
    core = optax.scale_by_adam(b1=cfg.betas[0], b2=cfg.betas[1], eps=cfg.eps)
  decoupled = cfg.name is OptimizerName.ADAMW

  def init(params):
    return (clip.init(params), core.init(params))

  def update(grads, state, params, lr, wd):
    mask = _decay_mask(params)
    clip_state, core_state = state
    # torch clips the raw gradient (HF calls clip_grad_norm_ before optimizer.step), and
    # Adam/SGD add their L2 term inside step(), after clipping.
    grads, clip_state = clip.update(grads, clip_state, params)
    if not decoupled:
      grads = jax.tree.map(lambda g, p, m: g + wd * p if m else g, grads, params, mask)
    direction, core_state = core.update(grads, core_state, params)
    if decoupled:
      updates = jax.tree.map(lambda d, p, m: -lr * (d + wd * p) if m else -lr * d,
                             direction, params, mask)
    else:
      updates = jax.tree.map(lambda d: -lr * d, direction)
    return updates, (clip_state, core_state)

  return Optimizer(init, update)
