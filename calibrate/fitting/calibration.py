"""A calibrated simulator as data, and the one prediction path over arrays.

Prediction of a run under an order (DESIGN.md, "Calibration"; the map is the anchored gain
of DESIGN.md's last section):

    real(t, m) ~ anchor(t, m) + gain_f * (surrogate(t, m | order) - surrogate_cal(t, m))

where `anchor` is the calibration runs' mean real loss of example m after t steps,
`surrogate_cal` the same mean over the surrogate's simulations of the calibration orders, and
f the fragment of m. Every surrogate seed and a few plausible gains are members of an
ensemble; their spread plus the calibration residuals give the predictive intervals.

The parts:
- `SimulatorConfig`: what sets shapes and loops (frozen, static);
- `Calibration`: what `fit` fitted, arrays only (a pytree);
- `FitInfo`: how the fit went (typed, saved as JSON);
- `Simulator`: those three with the fragments, the tokenizer and the baseline, no methods
  beyond read-only views;
- `predict(sim, orders_NxTxB, lr_NxT, eval_steps)`: the one path from orders to real-scale
  ensemble members; RunLogs come in and go out only at the edges (`calibrate.fitting.runs`).
  Its `tier` says which model simulates the orders: the transformer surrogate, or the
  analytic tier fitted on it (`calibrate.fitting.analytic`, held in `Simulator.analytic`)
  where that passed its trust check (`resolve_tier`); the map to the real scale is the same.

Saving and loading live in `calibrate.fitting.saved`.

Axis legend: N orders, S surrogate seeds, G gain quantiles, K ensemble members, C eval steps,
M evaluated examples, F fragments, T steps, B batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np
from tokenizers import Tokenizer

from calibrate.fitting.baselines import SimfluenceLinear
from calibrate.fitting.metrics import fragment_means as _fragment_means
from surrogate import model as model_lib
from surrogate import optim
from surrogate.errors import CalibrationError
from surrogate.fragments import Fragments, Split
from surrogate.simulate import (
  PER_ORDER,
  SimPlan,
  Trajectory,
  build_sim_data,
  simulate_many,
)
from surrogate.tokenize import encode_examples

# Fragments.split_of codes.
SPLIT_CODE = {Split.TRAIN: 0, Split.PROBE: 1}


@dataclasses.dataclass(frozen=True)
class SimulatorConfig:
  """What a calibrated simulator's shapes and loops follow (static).

  Attributes:
    model_cfg: the surrogate's shape.
    opt_cfg: the real runs' optimizer (their family, schedule and settings).
    num_steps, batch_size: the calibration runs' length and batch size.
    eval_ids: examples with an anchor (all probes, then the evaluated train examples).
    gain_quantiles: the gain quantiles (in sds) that form the ensemble with the seeds.
    diag_seed: chooses, once per simulator, the probes the diagnostics are measured on, so
      every answer of one simulator measures the same ones.
  """
  model_cfg: model_lib.ModelConfig
  opt_cfg: optim.OptimizerConfig
  num_steps: int
  batch_size: int
  eval_ids: tuple[str, ...]
  gain_quantiles: tuple[float, ...] = (-1.28, 0.0, 1.28)
  diag_seed: int = 0


class Calibration(NamedTuple):
  """What `fit` fitted: arrays only, so it maps, saves and differentiates as a pytree.

  Attributes:
    params_S: the pre-trained surrogate seeds (leading axis S).
    knobs: the fitted learning-rate and weight-decay scales.
    steps_C: the calibration runs' eval steps.
    anchor_CxM: mean real loss over the calibration runs.
    sur_cal_SxCxM: each seed's mean simulated loss over the calibration orders.
    gain_F, gain_sd_F: the fitted gain of each fragment and its posterior spread.
    example_sd_CxM, fragment_sd_CxF: leave-one-run-out residual spreads (see `Prediction`).
    effect_error: the predictive sd of a fragment's loss as a share of its predicted order
      effect.
  """
  params_S: model_lib.Params
  knobs: optim.Knobs
  steps_C: np.ndarray
  anchor_CxM: np.ndarray
  sur_cal_SxCxM: np.ndarray
  gain_F: np.ndarray
  gain_sd_F: np.ndarray
  example_sd_CxM: np.ndarray
  fragment_sd_CxF: np.ndarray
  effect_error: np.ndarray


@dataclasses.dataclass(frozen=True)
class KnobCandidate:
  """One candidate of the knob grid and how well its curves' shape fitted."""
  lr_scale: float
  weight_decay_scale: float
  shape_misfit: float


@dataclasses.dataclass(frozen=True)
class GainFit:
  """The common gain's posterior; `data_weight` is the runs' weight against the prior."""
  common_gain: float
  common_gain_sd: float
  data_weight: float


@dataclasses.dataclass(frozen=True)
class LeaveOneRunOut:
  """Leave-one-run-out MSE of fragment probe means: the map's and the order-agnostic mean's."""
  mse: float
  order_agnostic_mse: float


@dataclasses.dataclass(frozen=True)
class EffectErrorFit:
  """The effect error's prior, the runs' estimate (None with one run) and the value used."""
  prior: float
  leave_one_run_out: float | None
  used: float


@dataclasses.dataclass(frozen=True)
class FitSeconds:
  pretrain: float
  total: float


@dataclasses.dataclass(frozen=True)
class BaselineInfo:
  """What the baselines need beyond their arrays: Simfluence's ridge and reference rate."""
  simfluence_ridge: float
  lr_ref: float


@dataclasses.dataclass(frozen=True)
class DistillInfo:
  """How the surrogate was distilled from a teacher (`fit(teacher=...)`).

  kl_before, kl_after: the mean KL divergence (nats per position) of the teacher's coarsened
  next-token distributions from the first seed's, before and after distillation."""
  teacher_model: str
  dataset_sha256: str
  tokenizer_sha256: str
  steps: int
  kl_before: float
  kl_after: float


@dataclasses.dataclass(frozen=True)
class ContextInfo:
  """How much of the examples the surrogate reads at its context length.

  length: the surrogate's tokens per example.
  examples_cut: the share of examples longer than that (in the surrogate's tokens).
  tokens_seen: the share of all example tokens it reads.
  by_fragment: (fragment, examples cut, tokens seen) for each fragment.
  """
  length: int
  examples_cut: float
  tokens_seen: float
  by_fragment: tuple[tuple[str, float, float], ...]

  @classmethod
  def of(cls, fragments, counts_E: np.ndarray, length: int) -> ContextInfo:
    """From each example's token count in the surrogate's tokenizer (`token_counts`)."""
    seen_E = np.minimum(counts_E, length)
    rows = []
    for f, name in enumerate(fragments.names):
      sel = fragments.fragment_of == f
      rows.append((name, float((counts_E[sel] > length).mean()),
                   float(seen_E[sel].sum() / max(1, counts_E[sel].sum()))))
    return cls(length, float((counts_E > length).mean()),
               float(seen_E.sum() / max(1, counts_E.sum())), tuple(rows))


@dataclasses.dataclass(frozen=True)
class FitInfo:
  """How the fit went. Saved as JSON (`to_json`), in the layout `surrogate fit` prints."""
  calibration_runs: tuple[str, ...]
  calibration_orders_sha256: tuple[str, ...]
  knob_candidates: tuple[KnobCandidate, ...]
  lr_scale: float
  weight_decay_scale: float
  gain: GainFit
  fit_mse: float
  leave_one_run_out: LeaveOneRunOut | None
  train_fidelity: float | None
  effect_error: EffectErrorFit
  seconds: FitSeconds
  baselines: BaselineInfo
  distillation: DistillInfo | None = None
  context: ContextInfo | None = None

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> FitInfo:
    """The inverse of `to_json`; raises KeyError or TypeError on another layout.

    Folders of the same format saved before a field existed are read too (the format is
    extended, never broken): no `calibration_orders_sha256` (validate then checks run ids
    only), no `train_fidelity`, `distillation` or `context`, and `effect_error` a plain
    number (the value used).
    """
    loo = d["leave_one_run_out"]
    err = d["effect_error"]
    err = (EffectErrorFit(float(err), None, float(err)) if isinstance(err, (int, float))
           else EffectErrorFit(**err))
    return cls(
        calibration_runs=tuple(d["calibration_runs"]),
        calibration_orders_sha256=tuple(d.get("calibration_orders_sha256", ())),
        knob_candidates=tuple(KnobCandidate(**c) for c in d["knob_candidates"]),
        lr_scale=float(d["lr_scale"]), weight_decay_scale=float(d["weight_decay_scale"]),
        gain=GainFit(**d["gain"]), fit_mse=float(d["fit_mse"]),
        leave_one_run_out=None if loo is None else LeaveOneRunOut(**loo),
        train_fidelity=d.get("train_fidelity"), effect_error=err,
        seconds=FitSeconds(**d["seconds"]), baselines=BaselineInfo(**d["baselines"]),
        distillation=None if d.get("distillation") is None
        else DistillInfo(**d["distillation"]),
        context=None if d.get("context") is None else ContextInfo(
            **{**d["context"], "by_fragment": tuple(tuple(r) for r in
                                                    d["context"]["by_fragment"])}))


class FragmentTier(Protocol):
  """What `predict` needs of a tier that answers in the transformer's place: the analytic
  tier (`calibrate.fitting.analytic.AnalyticTier`, which builds on this module)."""
  cal_SxCx2xF: np.ndarray
  fidelity: Any  # its trust check (`analytic.Fidelity`: .trusted, .reason) or None

  @property
  def trusted(self) -> bool: ...

  def fragment_rows(self, sim: Simulator, orders_RxTxB: np.ndarray, lr_RxT: np.ndarray,
                    steps_C: np.ndarray, seed_R: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True, eq=False)
class Simulator:
  """A surrogate ensemble calibrated to real runs of one fragments file.

  Attributes:
    config: shapes and settings (`SimulatorConfig`).
    calibration: the fitted arrays (`Calibration`).
    fragments: the data set it was calibrated on.
    tokenizer: the surrogate's tokenizer.
    fit_info: how the fit went (`FitInfo`).
    simfluence: the Simfluence-linear baseline fitted on the same runs.
    analytic: the analytic tier fitted on this simulator's own simulations, with its trust
      check (`calibrate.fitting.analytic.fit_tier`), or None before one is fitted.
  """
  config: SimulatorConfig
  calibration: Calibration
  fragments: Fragments
  tokenizer: Tokenizer
  fit_info: FitInfo
  simfluence: SimfluenceLinear
  analytic: FragmentTier | None = None

  # Read-only views of the parts, for the answers' convenience.
  @property
  def model_cfg(self) -> model_lib.ModelConfig:
    return self.config.model_cfg

  @property
  def opt_cfg(self) -> optim.OptimizerConfig:
    return self.config.opt_cfg

  @property
  def num_steps(self) -> int:
    return self.config.num_steps

  @property
  def batch_size(self) -> int:
    return self.config.batch_size

  @property
  def eval_ids(self) -> tuple[str, ...]:
    return self.config.eval_ids

  @property
  def steps_C(self) -> np.ndarray:
    return self.calibration.steps_C

  @property
  def num_seeds(self) -> int:
    return int(self.calibration.sur_cal_SxCxM.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Prediction:
  """Predicted per-example losses of N orders at their eval steps, on the real scale.

  Attributes:
    steps: the C eval steps.
    eval_ids: the M example ids predicted (every probe, then evaluated train examples).
    frag_M: fragment index of each example.
    is_probe_M: whether each example is a probe.
    members_NxKxCxM: each ensemble member's prediction (seed x gain).
    example_sd_CxM: residual spread of each example around its fragment's residual.
    fragment_sd_NxCxM: spread shared by a fragment's examples (stored per example): the
      calibration residual plus `effect_error` x the fragment's predicted order effect.
      Both come from leave-one-run-out on the calibration runs: spread the members miss.
    raw_NxSxCxM: the surrogate's own losses (its scale), per seed simulated; from the
      analytic tier, each example holds its fragment's probe or train mean.
    diverged_NxS: the step each seed's simulation diverged at, or -1.
    tier: which model simulated the orders: "transformer" or "analytic".
    tier_reason: why that one answered (`resolve_tier`), in words.
  """
  steps: np.ndarray
  eval_ids: tuple[str, ...]
  frag_M: np.ndarray
  is_probe_M: np.ndarray
  members_NxKxCxM: np.ndarray
  example_sd_CxM: np.ndarray
  fragment_sd_NxCxM: np.ndarray
  raw_NxSxCxM: np.ndarray
  diverged_NxS: np.ndarray
  tier: str = "transformer"
  tier_reason: str = ""

  @property
  def mean_NxCxM(self) -> np.ndarray:
    """The ensemble mean prediction (over members whose seed did not diverge)."""
    with np.errstate(invalid="ignore"):
      return np.nanmean(self.members_NxKxCxM, 1)

  def samples(self, reduce, *, draws: int = 32, seed: int = 0) -> np.ndarray:
    """Draws from the predictive distribution of `reduce(losses_NxCxM)`.

    Each member is perturbed by Gaussian residual noise, one draw shared by a fragment's
    examples (`fragment_sd_NxCxM`) plus one per example (`example_sd_CxM`), then reduced;
    returns the reductions stacked on a leading axis.
    """
    rng = np.random.default_rng(seed)
    num_f = int(self.frag_M.max()) + 1
    out = []
    for k in range(self.members_NxKxCxM.shape[1]):
      base = self.members_NxKxCxM[:, k]
      for _ in range(draws):
        shared = rng.standard_normal(base.shape[:-1] + (num_f,))[..., self.frag_M]
        own = rng.standard_normal(base.shape)
        out.append(reduce(base + shared * self.fragment_sd_NxCxM + own * self.example_sd_CxM))
    return np.stack(out)

  def interval(self, reduce=lambda x: x, level: float = 0.8, **kw) -> tuple[np.ndarray, np.ndarray]:
    """The central `level` predictive interval of `reduce(losses_NxCxM)`."""
    s = self.samples(reduce, **kw)
    return (np.nanquantile(s, (1 - level) / 2, axis=0),
            np.nanquantile(s, (1 + level) / 2, axis=0))

  def fragment_members(self, probe: bool = True) -> np.ndarray:
    """[N, K, C, F] fragment means of each member (probe or evaluated train examples)."""
    num_f = int(self.frag_M.max()) + 1
    select = self.is_probe_M if probe else ~self.is_probe_M
    return _fragment_means(self.members_NxKxCxM, self.frag_M, select, num_f)


# -- the map from the surrogate's scale to the real one ---------------------------------------


def example_positions(fragments: Fragments, ids: Sequence[str]) -> np.ndarray:
  """Positions of example ids in the fragments file."""
  try:
    return np.array([fragments.index[i] for i in ids], np.int64)
  except KeyError as e:
    raise CalibrationError(f"example id {e.args[0]!r} is not in the fragments file") from None


def is_probe(fragments: Fragments, positions: np.ndarray) -> np.ndarray:
  return fragments.split_of[positions] == SPLIT_CODE[Split.PROBE]


def gains_GxF(calibration: Calibration, quantiles: Sequence[float]) -> np.ndarray:
  """Each gain quantile's gain per fragment (the posterior mean + q sd, at least 0)."""
  return np.maximum(calibration.gain_F[None] + np.array(quantiles)[:, None]
                    * calibration.gain_sd_F[None], 0.0)


def anchored_map(anchor_CxM: np.ndarray, gain_GxF: np.ndarray, frag_M: np.ndarray,
                 dev_NxCxM: np.ndarray) -> np.ndarray:
  """The anchored gain map: anchor + gain of the example's fragment x the surrogate's
  deviation from its calibration mean, for every gain row: [N, G, C, M]."""
  return anchor_CxM[None, None] + gain_GxF[None, :, None, frag_M] * dev_NxCxM[:, None]


def fragment_means(sim: Simulator, losses_xM: np.ndarray, *, probe: bool = True) -> np.ndarray:
  """Mean over each fragment's probes (or its evaluated train examples) of losses given in
  `sim.eval_ids` columns: [..., M] -> [..., F] (NaN where a fragment has none)."""
  pos = example_positions(sim.fragments, sim.eval_ids)
  probe_M = is_probe(sim.fragments, pos)
  with np.errstate(invalid="ignore", divide="ignore"):
    return _fragment_means(losses_xM, sim.fragments.fragment_of[pos],
                           probe_M if probe else ~probe_M, len(sim.fragments.names))


def to_real(sim: Simulator, dev_NxCxM: np.ndarray, anchor_CxM: np.ndarray,
            frag_M: np.ndarray) -> np.ndarray:
  """The surrogate's deviations from its calibration mean on the real scale: the anchored
  map with every gain quantile, [N, G, C, M]."""
  return anchored_map(anchor_CxM, gains_GxF(sim.calibration, sim.config.gain_quantiles), frag_M,
                      dev_NxCxM)


def interp_steps(x: np.ndarray, from_steps: np.ndarray, to_steps: np.ndarray) -> np.ndarray:
  """Linear interpolation along axis -2 ([..., C_from, M] -> [..., C_to, M])."""
  if np.array_equal(from_steps, to_steps):
    return x
  moved = np.moveaxis(x, -2, -1)
  flat = moved.reshape(-1, moved.shape[-1])
  res = np.stack([np.interp(to_steps, from_steps, row) for row in flat])
  return np.moveaxis(res.reshape(moved.shape[:-1] + (len(to_steps),)), -1, -2)


class Maps(NamedTuple):
  """The calibration's arrays at some steps, for some examples (see `maps_at`)."""
  anchor_CxM: np.ndarray
  sur_cal_SxCxM: np.ndarray
  frag_M: np.ndarray
  example_sd_CxM: np.ndarray
  fragment_sd_CxM: np.ndarray


def maps_at(sim: Simulator, steps: np.ndarray, eval_ids: Sequence[str]) -> Maps:
  """Anchor, surrogate calibration mean and noise at `steps` for `eval_ids`.

  Steps between calibration evals are interpolated linearly. A train example the
  calibration runs did not evaluate takes its fragment's mean train anchor.
  """
  frags, cal = sim.fragments, sim.calibration
  pos = example_positions(frags, eval_ids)
  frag_M = frags.fragment_of[pos]
  col = {i: c for c, i in enumerate(sim.eval_ids)}
  known_pos = example_positions(frags, sim.eval_ids)
  known_frag = frags.fragment_of[known_pos]
  known_train = ~is_probe(frags, known_pos)

  def gather(x_CxM):
    out = np.empty(x_CxM.shape[:-1] + (len(eval_ids),), np.float64)
    for m, i in enumerate(eval_ids):
      if i in col:
        out[..., m] = x_CxM[..., col[i]]
      else:
        same = known_train & (known_frag == frag_M[m])
        out[..., m] = x_CxM[..., same].mean(-1) if same.any() else np.nan
    return out

  def interp(x):  # [..., C_cal, M] -> [..., C, M]
    return interp_steps(x, cal.steps_C, steps)

  anchor = interp(gather(cal.anchor_CxM))
  if np.isnan(anchor).any():
    missing = [eval_ids[m] for m in np.nonzero(np.isnan(anchor).any(0))[0]]
    raise CalibrationError(f"no calibration data for the fragment of {missing[:3]} (its train "
                           "examples were never evaluated in the calibration runs)")
  return Maps(anchor, interp(gather(cal.sur_cal_SxCxM)), frag_M,
              interp(gather(cal.example_sd_CxM)), interp(cal.fragment_sd_CxF[:, frag_M]))


# -- the one prediction path ------------------------------------------------------------------

TIERS = ("auto", "analytic", "transformer")


def resolve_tier(sim: Simulator, tier: str = "auto", *,
                 diagnostics: bool = False) -> tuple[FragmentTier | None, str]:
  """Which model answers: (the analytic tier, or None for the transformer; why, in words).

  "auto" takes the analytic tier only where it exists and passed its trust check and the
  diagnostics are not asked for (the tier has none); "analytic" takes it whatever its check
  said (the reason says so); "transformer" never does.

  Raises:
    CalibrationError: an unknown tier, or "analytic" without a fitted tier or with
      diagnostics.
  """
  if tier not in TIERS:
    raise CalibrationError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
  ana = sim.analytic
  if tier == "transformer":
    return None, "transformer: asked for"
  if tier == "analytic":
    if ana is None:
      raise CalibrationError("this simulator has no analytic tier: fit one first "
                             "(`surrogate tier SIM`, or `calibrate.fitting.analytic.fit_tier`)")
    if diagnostics:
      raise CalibrationError("the analytic tier has no diagnostics: ask the transformer "
                             "(tier 'transformer' or 'auto')")
    check = "never checked" if ana.fidelity is None else ana.fidelity.reason
    return ana, f"analytic: asked for ({check})"
  if ana is None:
    return None, "transformer: no analytic tier was fitted (`surrogate tier SIM`)"
  if ana.fidelity is None:
    return None, "transformer: the analytic tier was never checked against it"
  if not ana.fidelity.trusted:
    return None, f"transformer: the analytic tier is {ana.fidelity.reason}"
  if diagnostics:
    return None, "transformer: the diagnostics need it (the analytic tier has none)"
  return ana, f"analytic: {ana.fidelity.reason}"


def schedule(sim: Simulator) -> np.ndarray:
  """The calibration runs' learning rate at each step: [T]."""
  return optim.learning_rates(sim.opt_cfg, sim.num_steps)


def _sim_setup(sim: Simulator, eval_ids: Sequence[str], num_steps: int, steps: np.ndarray,
               diagnostics: bool):
  """Data, plan and the columns / checkpoint rows that give `eval_ids` at `steps`."""
  frags = sim.fragments
  pos = example_positions(frags, eval_ids)
  train_pos = [int(p) for p in pos[~is_probe(frags, pos)]]
  tokenized = encode_examples(sim.tokenizer, frags.examples, sim.model_cfg.length)
  data = build_sim_data(frags, tokenized, vocab_size=sim.model_cfg.vocab_size,
                        eval_train=train_pos, diag_probes=4 if diagnostics else 1,
                        key=jax.random.key(sim.config.diag_seed))
  data_ids = [frags.examples[i].id for i in np.asarray(data.eval_idx_M)]
  col = np.array([data_ids.index(i) for i in eval_ids])
  inner = [int(x) for x in steps if 0 < x < num_steps]
  plan = SimPlan(eval_every=math.gcd(*inner) if inner else max(num_steps, 1),
                 diagnostics=diagnostics)
  ckpt = plan.checkpoint_steps(num_steps)
  rows = np.searchsorted(ckpt, steps)
  if not np.array_equal(ckpt[np.minimum(rows, len(ckpt) - 1)], steps):
    raise CalibrationError(f"eval steps {steps.tolist()} are not within 0..{num_steps}")
  return data, plan, col, rows


class _Runs(NamedTuple):
  """`predict`'s checked inputs: one row per simulated run (an order x a seed)."""
  orders: np.ndarray     # N T B
  lrs: np.ndarray        # [T] shared, or one row per run [R, T]
  steps: np.ndarray      # the asked eval steps, sorted
  seed_R: np.ndarray     # each run's seed
  sel: np.ndarray        # each run's order
  cal_steps: np.ndarray  # the calibration steps the orders reach
  all_steps: np.ndarray  # both
  at_steps: np.ndarray   # where the asked steps are in all_steps
  at_cal: np.ndarray     # where the calibration steps are


def _runs(sim: Simulator, orders_NxTxB, lr_NxT, eval_steps: Sequence[int],
          seed_N: np.ndarray | None) -> _Runs:
  """Checks `predict`'s inputs and lays out its runs (an order per seed, or per `seed_N`)."""
  cal, cfg = sim.calibration, sim.config
  orders = np.asarray(orders_NxTxB, np.int32)
  if orders.ndim != 3 or 0 in orders.shape:
    raise CalibrationError(f"orders must have shape [N >= 1, T >= 1, B >= 1], got {orders.shape}")
  n, num_steps = orders.shape[0], orders.shape[1]
  if num_steps > cfg.num_steps:
    raise CalibrationError(f"orders of {num_steps} steps: the simulator was calibrated on "
                           f"{cfg.num_steps}-step runs and cannot predict beyond them")
  steps = np.unique(np.asarray(eval_steps, np.int64))
  if steps.size == 0 or steps.min() < 0 or steps.max() > num_steps:
    raise CalibrationError(f"eval steps {steps.tolist()} are not within 0..{num_steps}")
  if steps.max() > cal.steps_C[-1]:
    raise CalibrationError(f"step {int(steps.max())} is after the calibration runs' last eval "
                           f"({int(cal.steps_C[-1])}); the real trajectory is unknown there")
  lrs = np.asarray(lr_NxT, np.float32)
  if lrs.shape not in ((num_steps,), (n, num_steps)):
    raise CalibrationError(f"learning rates of shape {lrs.shape} for {n} orders of {num_steps} "
                           f"steps: give [T] or [N, T] (e.g. schedule(sim)[:{num_steps}])")
  if seed_N is not None and np.shape(seed_N) != (n,):
    raise CalibrationError(f"seed_N of shape {np.shape(seed_N)}: one seed per order ({n},)")
  n_s = sim.num_seeds
  if seed_N is None:
    seed_R, sel = np.tile(np.arange(n_s), n), np.repeat(np.arange(n), n_s)
  else:
    seed_R, sel = np.asarray(seed_N, np.int64) % n_s, np.arange(n)
  cal_steps = cal.steps_C[cal.steps_C <= num_steps]
  all_steps = np.union1d(steps, cal_steps)
  return _Runs(orders, lrs if lrs.ndim == 1 else lrs[sel], steps, seed_R, sel, cal_steps,
               all_steps, np.searchsorted(all_steps, steps), np.searchsorted(all_steps, cal_steps))


def predict(sim: Simulator, orders_NxTxB, lr_NxT, eval_steps: Sequence[int], *,
            seed_N: np.ndarray | None = None, eval_ids: Sequence[str] | None = None,
            diagnostics: bool = False, progress: bool = False, chunk_size: int | None = None,
            folder: str | os.PathLike | None = None, resume: bool = False,
            tier: str = "transformer") -> tuple[Prediction, Trajectory]:
  """Predicts the real per-example losses of orders at `eval_steps`: the one prediction path.

  Each order is trained from the seeds `seed_N` (one per order; default every seed, the seed
  axis then following the order axis) with its learning rates, evaluated at `eval_steps`
  and at the calibration steps it reaches, and mapped to the real scale with every gain
  quantile. The deviation from the calibration mean is taken at the calibration steps, where
  both are known, and interpolated from there, so no curvature of the loss curve between
  evals is mistaken for an order effect. Nothing here is random: the same inputs give the
  same prediction.

  Args:
    sim: the calibrated simulator.
    orders_NxTxB: int example positions, -1 for empty slots; T <= `sim.num_steps`.
    lr_NxT: base learning rates per order and step, or [T] shared (`schedule(sim)` for the
      calibration runs' own).
    eval_steps: the C steps to predict (within 0..T and the calibration runs' last eval).
    seed_N: the surrogate seed of each order (taken modulo the number of seeds), or None
      for every seed.
    eval_ids: the examples to predict (default `sim.eval_ids`); a train example the
      calibration runs never evaluated takes its fragment's mean deviation.
    diagnostics: also compute the diagnostics (returned in the trajectory).
    progress, chunk_size: passed to `simulate_many`.
    folder, resume: stream each chunk's results into `folder` as it finishes
      (`surrogate.store.simulate_to_folder`); `resume` continues a killed job.
    tier: "transformer" (the default here), "analytic" or "auto" (`resolve_tier`). The
      analytic tier's trajectory has the losses only (its `grad_push_CxF` is NaN) and
      never diverges; `folder` is ignored by it (it takes microseconds an order).

  Returns:
    (prediction, trajectory): the `Prediction` (K = gain quantiles, x seeds when `seed_N`
    is None) and the surrogate's own `Trajectory` (leading axis N, or N x S flattened), its
    losses in `eval_ids` columns at `eval_steps`.

  Raises:
    CalibrationError: orders longer than the calibration runs, or steps it cannot predict.
  """
  cal, cfg = sim.calibration, sim.config
  run = _runs(sim, orders_NxTxB, lr_NxT, eval_steps, seed_N)
  orders, lrs, steps, seed_R, sel = run.orders, run.lrs, run.steps, run.seed_R, run.sel
  n, all_steps, at_steps, cal_steps = len(orders), run.all_steps, run.at_steps, run.cal_steps
  at_cal = run.at_cal
  eval_ids = tuple(cfg.eval_ids if eval_ids is None else eval_ids)
  ana, reason = resolve_tier(sim, tier, diagnostics=diagnostics)
  if ana is None:
    raw_all, traj, sur_cal_at = _transformer_run(
        sim, orders[sel], lrs, seed_R, eval_ids, all_steps, at_steps, cal_steps,
        diagnostics=diagnostics, chunk_size=chunk_size, progress=progress, folder=folder,
        resume=resume)
  else:
    raw_all, traj, sur_cal_at = _analytic_run(sim, ana, orders[sel], lrs, seed_R, eval_ids,
                                              all_steps, at_steps, cal_steps)
  dev_cal = raw_all[:, at_cal] - sur_cal_at
  dev = interp_steps(dev_cal, cal_steps, steps)                     # (N S) C M
  maps = maps_at(sim, steps, eval_ids)
  frag_M = maps.frag_M
  probe_M = is_probe(sim.fragments, example_positions(sim.fragments, eval_ids))
  known = set(cfg.eval_ids)
  for m, i in enumerate(eval_ids):
    if i not in known:
      same = [c for c, j in enumerate(eval_ids) if j in known and not probe_M[c]
              and frag_M[c] == frag_M[m]]
      dev[..., m] = dev[..., same].mean(-1)
  members = to_real(sim, dev, maps.anchor_CxM, frag_M)
  members = members.reshape(n, -1, *maps.anchor_CxM.shape)          # N K C M
  # The surrogate's effects are right in pattern, not in detail: an error in proportion to
  # each fragment's predicted effect (its probe mean's distance from the anchor).
  num_f = len(sim.fragments.names)
  effect_NxCxF = np.abs(_fragment_means(np.nanmean(members, 1) - maps.anchor_CxM[None],
                                        frag_M, probe_M, num_f))
  frag_sd = np.sqrt(maps.fragment_sd_CxM[None] ** 2
                    + (float(cal.effect_error) * effect_NxCxF[..., frag_M]) ** 2)
  raw = raw_all[:, at_steps].reshape(n, -1, len(steps), len(eval_ids))
  prediction = Prediction(steps, eval_ids, frag_M, probe_M, members, maps.example_sd_CxM,
                          frag_sd, raw, np.asarray(traj.diverged_step).reshape(n, -1),
                          tier="transformer" if ana is None else "analytic",
                          tier_reason=reason)
  return prediction, traj


class FragmentPrediction(NamedTuple):
  """Predicted fragment means of N orders on the real scale (`predict_fragments`).

  Attributes:
    steps: the C eval steps.
    members_NxKxCx2xF: each ensemble member's fragment means, row 0 over the fragment's
      probes, row 1 over its evaluated train examples (NaN where it has none).
    tier, tier_reason: which model simulated the orders, and why (`resolve_tier`).
  """
  steps: np.ndarray
  members_NxKxCx2xF: np.ndarray
  tier: str
  tier_reason: str


def predict_fragments(sim: Simulator, orders_NxTxB, lr_NxT, eval_steps: Sequence[int], *,
                      seed_N: np.ndarray | None = None, diagnostics: bool = False,
                      progress: bool = False, chunk_size: int | None = None,
                      folder: str | os.PathLike | None = None, resume: bool = False,
                      tier: str = "transformer") -> tuple[FragmentPrediction, Trajectory]:
  """`predict`, reduced to fragment means of `sim.eval_ids`: what screens of many orders
  need. The analytic tier answers at fragment level directly, without a [N, K, C, M] array
  of examples (about 100 times smaller for the bundled sets); the transformer's examples
  are reduced after `predict`. Arguments as `predict`'s.
  """
  ana, reason = resolve_tier(sim, tier, diagnostics=diagnostics)
  if ana is None:
    pred, traj = predict(sim, orders_NxTxB, lr_NxT, eval_steps, seed_N=seed_N,
                         diagnostics=diagnostics, progress=progress, chunk_size=chunk_size,
                         folder=folder, resume=resume, tier=tier)
    members = np.stack([fragment_means(sim, pred.members_NxKxCxM),
                        fragment_means(sim, pred.members_NxKxCxM, probe=False)], -2)
    return FragmentPrediction(pred.steps, members, pred.tier, pred.tier_reason), traj
  run = _runs(sim, orders_NxTxB, lr_NxT, eval_steps, seed_N)
  num_r, num_f = len(run.seed_R), len(sim.fragments.names)
  rows_RxCx2xF = ana.fragment_rows(sim, run.orders[run.sel], run.lrs, run.all_steps, run.seed_R)
  cal_rows = ana.cal_SxCx2xF[run.seed_R][:, : len(run.cal_steps)]
  dev_cal = (rows_RxCx2xF[:, run.at_cal] - cal_rows).reshape(num_r, len(run.cal_steps), -1)
  dev = interp_steps(dev_cal, run.cal_steps, run.steps).reshape(num_r, -1, 2, num_f)
  anchor_CxM = maps_at(sim, run.steps, sim.eval_ids).anchor_CxM
  anchor_Cx2xF = np.stack([fragment_means(sim, anchor_CxM),
                           fragment_means(sim, anchor_CxM, probe=False)], -2)
  gain_GxF = gains_GxF(sim.calibration, sim.config.gain_quantiles)
  members = anchor_Cx2xF[None, None] + gain_GxF[None, :, None, None] * dev[:, None]
  traj = Trajectory(eval_loss_CxM=np.zeros((num_r, len(run.steps), 0), np.float32),
                    train_loss_T=np.full((num_r, run.orders.shape[1]), np.nan), diagnostics=None,
                    diverged_step=np.full(num_r, -1),
                    grad_push_CxF=np.full((num_r, len(run.steps), num_f), np.nan))
  return FragmentPrediction(run.steps, members.reshape(len(run.orders), -1, *members.shape[2:]),
                            "analytic", reason), traj


def _transformer_run(sim: Simulator, orders_RxTxB: np.ndarray, lrs: np.ndarray,
                     seed_R: np.ndarray, eval_ids: tuple[str, ...], all_steps: np.ndarray,
                     at_steps: np.ndarray, cal_steps: np.ndarray, *, diagnostics: bool,
                     chunk_size: int | None, progress: bool,
                     folder: str | os.PathLike | None, resume: bool):
  """The transformer's runs of `predict`: (losses [R, C_all, M] at `all_steps`, its
  trajectory at the asked steps, its calibration mean [R, C_cal, M] for each run's seed)."""
  cal, cfg = sim.calibration, sim.config
  num_steps = orders_RxTxB.shape[1]
  data, plan, col, rows = _sim_setup(sim, eval_ids, num_steps, all_steps, diagnostics)
  params = jax.tree.map(lambda a: np.asarray(a)[seed_R], cal.params_S)
  # Knobs with an order axis, as `fit` passes them: then the fit's simulations, these and
  # any others of the same chunk shape share one compilation.
  knobs = optim.Knobs(np.full(len(seed_R), cal.knobs.lr_scale, np.float32),
                      np.full(len(seed_R), cal.knobs.weight_decay_scale, np.float32))
  run = dict(model_cfg=cfg.model_cfg, opt_cfg=cfg.opt_cfg, plan=plan, chunk_size=chunk_size,
             progress=progress, axes=PER_ORDER)
  if folder is None:
    traj = simulate_many(params, knobs, orders_RxTxB, lrs, data, **run)
  else:
    from surrogate.store import simulate_to_folder
    traj = simulate_to_folder(folder, params, knobs, orders_RxTxB, lrs, data, resume=resume,
                              **run)
  raw_all = traj.eval_loss_CxM[:, rows][:, :, col]                  # R C_all M
  pick = lambda a: a[:, rows][:, at_steps] if a.ndim >= 2 else a  # noqa: E731
  traj = traj._replace(eval_loss_CxM=raw_all[:, at_steps], grad_push_CxF=pick(traj.grad_push_CxF),
                       diagnostics=None if traj.diagnostics is None
                       else jax.tree.map(pick, traj.diagnostics))
  sur_cal_at = maps_at(sim, cal_steps, eval_ids).sur_cal_SxCxM    # S C_cal M, exact there
  return raw_all, traj, sur_cal_at[seed_R]


def _analytic_run(sim: Simulator, ana: FragmentTier, orders_RxTxB: np.ndarray, lrs: np.ndarray,
                  seed_R: np.ndarray, eval_ids: tuple[str, ...], all_steps: np.ndarray,
                  at_steps: np.ndarray, cal_steps: np.ndarray):
  """The analytic tier's runs of `predict`, shaped as `_transformer_run`'s: each example
  takes its fragment's probe or train mean."""
  frags = sim.fragments
  pos = example_positions(frags, eval_ids)
  row_M, frag_M = (~is_probe(frags, pos)).astype(np.int64), frags.fragment_of[pos]
  rows_RxCx2xF = ana.fragment_rows(sim, orders_RxTxB, lrs, all_steps, seed_R)
  raw_all = rows_RxCx2xF[:, :, row_M, frag_M]                       # R C_all M
  cal_rows = ana.cal_SxCx2xF[seed_R][:, : len(cal_steps)]           # R C_cal 2 F
  num_f = len(frags.names)
  traj = Trajectory(eval_loss_CxM=raw_all[:, at_steps],
                    train_loss_T=np.full((len(seed_R), orders_RxTxB.shape[1]), np.nan),
                    diagnostics=None, diverged_step=np.full(len(seed_R), -1),
                    grad_push_CxF=np.full((len(seed_R), len(at_steps), num_f), np.nan))
  return raw_all, traj, cal_rows[:, :, row_M, frag_M]
