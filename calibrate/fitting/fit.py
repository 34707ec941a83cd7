"""`fit`: calibrate the surrogate to a few real runs, giving a `Simulator`.

What is fitted, and why this way (DESIGN.md, last section):

1. **Initial state.** An ensemble of surrogate seeds is pre-trained on neutral text (never
   the fragments), so each starts knowing language, as the real pretrained model does. What
   the real model already knows of each example is taken from the runs' step-0 evals: the
   anchor below starts exactly there.
2. **Optimizer knobs.** The real runs' optimizer, schedule and logged learning rates are used
   as they are; a learning-rate scale and a weight-decay scale are chosen from a grid: every
   candidate x seed x calibration order is simulated at once (`vmap`), and the candidate whose
   per-fragment loss curves best match the real curves' shape (an affine map per fragment,
   so only the shape counts) wins, with a prior that favours the real settings.
3. **Output map: the anchored gain.** Real loss = the calibration runs' mean real trajectory
   + gain_f x (the surrogate's trajectory for this order - its mean over the calibration
   orders). The gains are Bayesian ridge estimates: the calibration deviations move them
   only as far as they carry order effects larger than `effect_noise`; otherwise they stay
   at the prior (shuffled runs barely differ, so they cannot tell the gain).
4. **Uncertainty.** Seeds x gain quantiles form an ensemble; leave-one-run-out residuals on
   the calibration runs add the spread the ensemble does not show, plus an error in
   proportion to each fragment's predicted order effect (`effect_error`). Its prior comes
   from how well the surrogate follows what even shuffled runs show, the dips of the
   evaluated train examples when they are fed (`train_fidelity`); left-out runs that carry
   order effects estimate it directly.
5. **Baselines** on the same runs (order-agnostic mean, Simfluence-linear) are fitted too and
   saved with the simulator, so `validate` can report them beside it.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from calibrate.fitting.baselines import SimfluenceLinear, fragment_shares
from calibrate.fitting.calibration import (
  BaselineInfo,
  Calibration,
  ContextInfo,
  DistillInfo,
  EffectErrorFit,
  FitInfo,
  FitSeconds,
  GainFit,
  KnobCandidate,
  LeaveOneRunOut,
  Simulator,
  SimulatorConfig,
  anchored_map,
  example_positions,
  is_probe,
)
from calibrate.fitting.metrics import fragment_means
from calibrate.io.runlog import RunLog, order_from_runlog, run_learning_rates, where
from calibrate.io.simulated import plan_for
from calibrate.io.teacher import Teacher, targets
from surrogate import model as model_lib
from surrogate import optim
from surrogate.datasets import python_docs_neutral
from surrogate.distill import distill_ensemble, distill_kl
from surrogate.errors import CalibrationError
from surrogate.fragments import Fragments
from surrogate.orders import order_sha256
from surrogate.prepare import Prepared, model_config_for, prepare
from surrogate.pretrain import pretrain_ensemble
from surrogate.simulate import PER_ORDER, Sharing, simulate_many
from surrogate.tokenize import check_vocab, encode_texts, token_counts


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """Settings of `fit`. The defaults are what the docs' figures were measured with.

  Attributes:
    seeds: surrogate seeds in the ensemble.
    pretrain_steps: steps of pre-training on neutral text per seed.
    lr_scales, weight_decay_scales: the candidate knobs (every combination is simulated).
      None (default): one scale, `default_lr_scale` of the surrogate's context length:
      twice the real learning rate at 32 tokens, three times at 64 (docs/experiments.md).
    knob_prior_sd: sd of the prior on log(scale), centred on the real settings.
    gain_prior, gain_prior_sd: prior of the common gain. The default 1.6 is the gain that
      structured runs of both development sets gave at the default rates (1.60 each;
      1.65 and 1.59 when both were simulated with 32 tokens at twice the real rate);
      at the real rate it was 2.5 (DESIGN.md: the surrogate's effects were 2-3x too small).
      The sd is 0.5 since the intervals' model error comes from the runs (below); it was
      1.0, which made the intervals of LM-like sets too wide (docs/experiments.md).
    teacher_gain_prior: the gain prior in its place when a teacher distils the surrogate:
      1.15, the mean of the gains structured runs gave with the teacher on the four causal
      development sets (lm-dev 1.17, whatis 1.29, multilingual 1.12, apidocs 1.01); the
      distilled surrogate's order effects are nearer the real ones' size.
    teacher_gain_prior_sd: its sd, 0.12: the spread of those four gains (sd 0.116). With
      shuffled runs only, the prior's spread sets most of the intervals' width; the teacher's
      model error is left to the effect error, which its train fidelity sets
      (docs/experiments.md, round 4: 0.36 made the intervals too wide on three of four sets).
    teacher_fragment_gain_sd: `fragment_gain_sd` with a teacher, the same 0.12.
    fragment_gain_sd: how far a fragment's gain may stray from the common gain, a priori.
    effect_noise: order effects (nats, mean over a run's checkpoints) below this size are
      treated as noise when fitting gains.
    effect_error: prior of the predictive sd of a fragment's loss as a share of its
      predicted order effect (the surrogate's effects are right in pattern, not in detail).
      None (default): from the runs, `misfit_to_error` x sqrt(1 / rho^2 - 1), rho being
      `train_fidelity` (how well the surrogate follows the evaluated train examples' dips
      in the calibration runs: 0.8 on LM-like data, 0.4 on classification), or
      `fallback_effect_error` when the runs evaluate no train example. The value used
      blends the prior with the leave-one-run-out estimate (`effect_error_from`) by the
      gain's data weight: shuffled runs keep the prior, structured runs replace it.
    misfit_to_error: the constant above; 0.3, from a grid (0.3, 0.4, 0.5) whose 80 %
      intervals, calibrated on four shuffles, came nearest covering 80 % of the held-out
      runs over both development sets (docs/experiments.md).
    fallback_effect_error: the prior without train evals; 0.5, by the same rule over a grid
      of fixed values (0, 0.25, 0.5, 1, 1.5, 2, 3).
    distill_steps: with a teacher (`fit(teacher=...)`), steps of distillation per seed
      after the pre-training on neutral text (`pretrain_steps`, which may be 0).
    min_steps: runs shorter than this cannot be fitted.
    chunk_size: orders per compiled simulation call (default: `simulate.default_chunk_size`).
    low_rank: when the runs' header names a LoRA adapter, the surrogate trains low-rank
      adapters on its frozen pre-trained weights (`surrogate.adapters`); False: a full
      fine-tune whatever the runs did (the comparison in docs/results.md).
  """
  seeds: int = 4
  pretrain_steps: int = 800
  lr_scales: tuple[float, ...] | None = None
  weight_decay_scales: tuple[float, ...] = (1.0,)
  knob_prior_sd: float = 0.35
  gain_prior: float = 1.6
  teacher_gain_prior: float = 1.15
  teacher_gain_prior_sd: float = 0.12
  teacher_fragment_gain_sd: float = 0.12
  gain_prior_sd: float = 0.5
  fragment_gain_sd: float = 0.5
  effect_noise: float = 0.05
  effect_error: float | None = None
  misfit_to_error: float = 0.3
  fallback_effect_error: float = 0.5
  distill_steps: int = 800
  min_steps: int = 10
  chunk_size: int | None = None
  low_rank: bool = True


def default_lr_scale(length: int) -> float:
  """The surrogate's learning rate as a multiple of the real one, by its context length.

  Chosen on the two development sets (docs/experiments.md): with 32 tokens per example twice
  the real rate ranked fragments better than the real rate on both. With 64 tokens (the
  context `model_config_for` picks for long examples) the surrogate's order effects come
  out smaller, and three times the real rate ranked, and fitted, better than twice it on
  the LM-like set, with structured runs giving the same gain (1.6) as 32 tokens at x2.
  """
  return 2.0 if length <= 32 else 3.0


class FitError(CalibrationError):
  """The runs cannot be fitted (mixed optimizers, other data, too short, no probes...)."""


def check_runs(fragments: Fragments, runs: Sequence[RunLog], *, min_steps: int = 10) -> None:
  """Raises `FitError` naming the run and the problem if `runs` cannot be calibrated on.

  Warns (UserWarning) on a single run: its gain and intervals then rest on the priors.
  """
  if not runs:
    raise FitError("fit needs at least one real run with evals")
  first = runs[0]
  for r in runs:
    at = where(r)
    if r.header.dataset_sha256.lower() != fragments.sha256:
      raise FitError(f"{at} was recorded on another fragments file: its dataset_sha256 "
                     f"{r.header.dataset_sha256[:12]}... is not {fragments.sha256[:12]}...")
    if r.is_order_file:
      raise FitError(f"{at} has no evals: an order file cannot calibrate")
    if optim.OptimizerConfig.of_run(r.header) != optim.OptimizerConfig.of_run(first.header):
      raise FitError(f"{at} uses optimizer {r.header.optimizer} (adapter "
                     f"{r.header.extra.get('adapter')}), but {where(first)} uses "
                     f"{first.header.optimizer} (adapter {first.header.extra.get('adapter')}): "
                     "calibrate on runs of one optimizer setting")
    if r.num_steps != first.num_steps or r.header.batch_size != first.header.batch_size:
      raise FitError(f"{at} has {r.num_steps} steps of batch {r.header.batch_size}, but "
                     f"{where(first)} has {first.num_steps} of {first.header.batch_size}")
    if r.num_steps < min_steps:
      raise FitError(f"{at} is too short to fit: {r.num_steps} steps (at least {min_steps})")
    steps = r.eval_steps
    if len(set(steps)) < 2 or 0 not in steps:
      raise FitError(f"{at} is too short to fit: it needs evals at step 0 and at least one "
                     f"later step, it has steps {sorted(set(steps))}")
    if sorted(set(steps)) != sorted(set(first.eval_steps)):
      raise FitError(f"{at} is evaluated at steps {sorted(set(steps))}, "
                     f"{where(first)} at {sorted(set(first.eval_steps))}")
    probes = {fragments.examples[i].id for i in fragments.probe_indices()}
    for ev in r.evals:
      missing = probes - ev.losses.keys()
      if missing:
        raise FitError(f"{at}: the eval at step {ev.step} lacks probe examples, e.g. "
                       f"{sorted(missing)[:3]}; calibration needs every probe at every eval")
  if len(runs) == 1:
    warnings.warn("fitting on a single run: the order-effect gain stays at its prior and the "
                  "intervals show only the seed spread; record 2-4 runs (ideally with "
                  "different orders) for a real calibration", UserWarning, stacklevel=3)


def _real_losses(runs: Sequence[RunLog], eval_ids: Sequence[str]):
  """[R, C, M] real losses at each run's distinct eval steps (the last record of a step)."""
  out = []
  for r in runs:
    by_step = {ev.step: ev.losses for ev in r.evals}
    out.append([[by_step[s][i] for i in eval_ids] for s in sorted(by_step)])
  return np.array(out, np.float64)


def _shape_misfit(sur_RxCxF: np.ndarray, real_RxCxF: np.ndarray) -> float:
  """Mean residual of the best affine map, per fragment, from surrogate to real curves."""
  res = []
  for f in range(real_RxCxF.shape[-1]):
    x, y = sur_RxCxF[..., f].ravel(), real_RxCxF[..., f].ravel()
    if np.isnan(y).all():
      continue  # a fragment with no such examples evaluated (no probes, or no train evals)
    if not np.isfinite(x).all() or not np.isfinite(y).all():
      return float("inf")
    a = np.stack([x, np.ones_like(x)], 1)
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    res.append(np.mean((a @ coef - y) ** 2))
  return float(np.mean(res)) if res else float("inf")


class Gains(NamedTuple):
  """The fitted gains of the anchored map (`fit_gains`)."""
  gain_F: np.ndarray
  gain_sd_F: np.ndarray
  common: GainFit


class Residuals(NamedTuple):
  """Leave-one-run-out residuals of the anchored map on the calibration runs.

  fragment_sd_CxF: spread of fragment-mean probe residuals.
  example_sd_CxM: spread of each example's residual around its fragment's.
  loo: the leave-one-out MSEs (map and order-agnostic) on fragment probe means.
  res_RxCxF, effect_RxCxF: each left-out run's fragment residuals and predicted order effects
    (|prediction - anchor|).
  The last three are None with one run.
  """
  fragment_sd_CxF: np.ndarray
  example_sd_CxM: np.ndarray
  loo: LeaveOneRunOut | None
  res_RxCxF: np.ndarray | None
  effect_RxCxF: np.ndarray | None


def fit_gains(real_RxCxF: np.ndarray, sur_SxRxCxF: np.ndarray, cfg: FitConfig):
  """Bayesian gains of the anchored map, common and per fragment.

  Each (run, fragment) trajectory is one observation; over its checkpoints after step 0,
  `x_raw` is the mean squared deviation of the seed-mean surrogate from its calibration mean,
  `x` the same less the part that is seed noise (estimated from the seeds' spread), and `xy`
  the mean product with the real deviation. With real deviations of noise `effect_noise`,
  sum(xy) ~ Normal(gain * sum(x), effect_noise^2 * sum(x_raw)): an errors-in-variables
  likelihood, so deviations that are only seed noise tell nothing about the gain (the
  posterior stays at the prior) instead of pulling it towards zero.

  Returns:
    `Gains`: posterior means and sds per fragment, and the common gain's posterior.
  """
  n_s = sur_SxRxCxF.shape[0]
  sur_RxCxF = sur_SxRxCxF.mean(0)
  n_r = real_RxCxF.shape[0]
  # A fragment without probes has NaN means: it carries no information (zero deviations).
  dr = np.nan_to_num(real_RxCxF - real_RxCxF.mean(0, keepdims=True))
  ds = np.nan_to_num(sur_RxCxF - sur_RxCxF.mean(0, keepdims=True))
  # Noise of the seed mean, as it survives centring over the R runs.
  seed_var = (np.nan_to_num(sur_SxRxCxF.var(0, ddof=1)) / n_s * (n_r - 1) / n_r
              if n_s > 1 else np.zeros_like(ds))
  x_raw_RxF = (ds * ds)[:, 1:].mean(1)
  x_RxF = np.maximum((ds * ds - seed_var)[:, 1:].mean(1), 0.0)
  xy_RxF = (dr * ds)[:, 1:].mean(1)
  noise = cfg.effect_noise ** 2

  def posterior(prior_mean, prior_var, x, x_raw, xy):
    info = x * x / (noise * x_raw) if x_raw > 0 else 0.0
    prec = 1 / prior_var + info
    mean = (prior_mean / prior_var + (xy / x * info if x > 0 else 0.0)) / prec
    return mean, prec

  g, prec = posterior(cfg.gain_prior, cfg.gain_prior_sd ** 2, x_RxF.sum(), x_raw_RxF.sum(),
                      xy_RxF.sum())
  g_sd = prec ** -0.5
  prior_var_f = cfg.fragment_gain_sd ** 2 + g_sd ** 2
  post_f = [posterior(g, prior_var_f, x, xr, xy) for x, xr, xy in
            zip(x_RxF.sum(0), x_raw_RxF.sum(0), xy_RxF.sum(0))]
  gain_F = np.array([m for m, _ in post_f])
  gain_sd_F = np.array([p ** -0.5 for _, p in post_f])
  common = GainFit(float(g), float(g_sd), float(1 - (1 / cfg.gain_prior_sd ** 2) / prec))
  return Gains(np.maximum(gain_F, 0.0), gain_sd_F, common)


def residuals(real_RxCxM, sur_RxSxCxM, frag_M, probe_M, num_f, cfg: FitConfig) -> Residuals:
  """Leave-one-run-out residuals of the anchored map on the calibration runs: each run is
  predicted from the others' anchor and gains."""
  r = real_RxCxM.shape[0]
  c, m = real_RxCxM.shape[1:]
  if r < 2:
    return Residuals(np.zeros((c, num_f)), np.zeros((c, m)), None, None, None)
  frag_res, ex_res, effects, mse_map, mse_mean = [], [], [], [], []
  for out in range(r):
    keep = [i for i in range(r) if i != out]
    anchor = real_RxCxM[keep].mean(0)
    real_f = fragment_means(real_RxCxM[keep], frag_M, probe_M, num_f)
    sur_f = fragment_means(np.moveaxis(sur_RxSxCxM[keep], 1, 0), frag_M, probe_M, num_f)
    gain_F = fit_gains(real_f, sur_f, cfg).gain_F
    dev = sur_RxSxCxM[out].mean(0) - sur_RxSxCxM[keep].mean((0, 1))
    pred = anchored_map(anchor, gain_F[None], frag_M, dev[None])[0, 0]
    res = real_RxCxM[out] - pred
    res_f = fragment_means(res, frag_M, probe_M, num_f)
    frag_res.append(res_f)
    ex_res.append(res - res_f[:, frag_M])
    effects.append(np.abs(fragment_means(pred - anchor, frag_M, probe_M, num_f)))
    real_out_f = fragment_means(real_RxCxM[out], frag_M, probe_M, num_f)
    mse_map.append(np.mean(res_f ** 2))
    mse_mean.append(np.mean((fragment_means(anchor, frag_M, probe_M, num_f) - real_out_f) ** 2))
  frag_sd = np.nan_to_num(np.sqrt(np.mean(np.square(frag_res), 0)))
  ex_sd = np.nan_to_num(np.sqrt(np.mean(np.square(ex_res), 0)))
  loo = LeaveOneRunOut(float(np.mean(mse_map)), float(np.mean(mse_mean)))
  return Residuals(frag_sd, ex_sd, loo, np.array(frag_res), np.array(effects))


def train_fidelity(real_RxCxF: np.ndarray, sur_SxRxCxF: np.ndarray) -> float | None:
  """How well the surrogate tracks what the calibration runs do show: the correlation of
  its (seed-mean) deviations from the calibration mean with the real ones, over runs, eval
  steps after 0 and fragments, on fragment means of the evaluated train examples.

  Shuffled runs hardly move the probes, but each evaluated train example is fed at other
  times in each shuffle, so its loss dips and recovers at other steps (memorisation): a
  signal of order even there. None without two runs or finite deviations.
  """
  if real_RxCxF.shape[0] < 2:
    return None
  dr = real_RxCxF - real_RxCxF.mean(0, keepdims=True)
  sur_RxCxF = sur_SxRxCxF.mean(0)
  ds = sur_RxCxF - sur_RxCxF.mean(0, keepdims=True)
  dr, ds = dr[:, 1:].ravel(), ds[:, 1:].ravel()
  ok = np.isfinite(dr) & np.isfinite(ds)
  if ok.sum() < 3 or dr[ok].std() == 0 or ds[ok].std() == 0:
    return None
  return float(np.corrcoef(ds[ok], dr[ok])[0, 1])


def effect_error_prior(config: FitConfig, rho: float | None) -> float:
  """The `effect_error` prior: the configured one, else `misfit_to_error` x the surrogate's
  misfit sqrt(1 / rho^2 - 1) (the sd of what it misses per unit of what it follows, were
  the misses independent of it; rho <= 0.124 counts as 0.124, a misfit of 8)."""
  if config.effect_error is not None:
    return config.effect_error
  if rho is None:
    return config.fallback_effect_error
  return config.misfit_to_error * float(np.sqrt(1 / max(rho, 0.124) ** 2 - 1))


def effect_error_from(res_RxCxF: np.ndarray, effect_RxCxF: np.ndarray,
                      frag_sd_CxF: np.ndarray) -> float:
  """Maximum-likelihood share of the predicted order effect that is error, from
  leave-one-run-out residuals.

  The predictive model of a fragment's probe mean is Normal(prediction, frag_sd^2 +
  (e x effect)^2), as `calibration.predict` uses it; this is the e under which the left-out
  runs' residuals are most likely (steps after 0; a grid from 0 to 8). It is large only when
  residuals grow with the predicted effect beyond the common spread `frag_sd`.
  """
  res, eff = res_RxCxF[:, 1:], effect_RxCxF[:, 1:]
  s2 = np.square(frag_sd_CxF[1:])[None]
  ok = np.isfinite(res) & np.isfinite(eff)
  res, eff, s2 = res[ok], eff[ok], np.broadcast_to(s2, ok.shape)[ok]
  grid = np.concatenate([[0.0], np.geomspace(0.01, 8.0, 120)])
  var = np.maximum(s2[None] + np.square(grid[:, None] * eff[None]), 1e-12)
  loglik = -0.5 * (np.log(var) + np.square(res)[None] / var).sum(1)
  return float(grid[int(np.argmax(loglik))])


def simulate_knob_grid(params_S, cands: Sequence[tuple[float, float]], runs: Sequence[RunLog],
                       fragments: Fragments, data, *, model_cfg: model_lib.ModelConfig,
                       opt_cfg: optim.OptimizerConfig, chunk_size: int | None = None,
                       progress: bool = True, sharing: Sharing = Sharing.AUTO):
  """Every (knobs, seed, run) simulated at once, on the runs' exact batches and rates.

  Args:
    params_S: surrogate seeds (leading axis S).
    cands: K (learning-rate scale, weight-decay scale) pairs.
    runs: R runs of one length, evaluated at the same steps (their C distinct eval steps).
    fragments, data: the data set and its `SimData`.
    model_cfg, opt_cfg, chunk_size, progress, sharing: as for `simulate_many`.

  Returns:
    (sur_KxSxRxCxM, diverged_KxSxR): eval losses at the runs' eval steps, and the step each
    simulation diverged at (-1 if none).
  """
  n_k, n_s, n_r = len(cands), int(jax.tree.leaves(params_S)[0].shape[0]), len(runs)
  steps_C = np.array(sorted(set(runs[0].eval_steps)))
  orders = np.stack([order_from_runlog(r, fragments) for r in runs])
  lrs = np.stack([run_learning_rates(r) for r in runs])
  idx_k, idx_s, idx_r = (a.ravel() for a in np.meshgrid(np.arange(n_k), np.arange(n_s),
                                                        np.arange(n_r), indexing="ij"))
  knobs = optim.Knobs(jnp.asarray([cands[k][0] for k in idx_k], jnp.float32),
                      jnp.asarray([cands[k][1] for k in idx_k], jnp.float32))
  plan = dataclasses.replace(plan_for(runs), diagnostics=False)
  ckpt = plan.checkpoint_steps(runs[0].num_steps)
  traj = simulate_many(jax.tree.map(lambda a: np.asarray(a)[idx_s], params_S), knobs,
                       orders[idx_r], lrs[idx_r], data, model_cfg=model_cfg, opt_cfg=opt_cfg,
                       plan=plan, chunk_size=chunk_size, progress=progress,
                       sharing=sharing, axes=PER_ORDER)
  sur = traj.eval_loss_CxM[:, np.searchsorted(ckpt, steps_C)]
  return (sur.reshape(n_k, n_s, n_r, len(steps_C), -1),
          traj.diverged_step.reshape(n_k, n_s, n_r))


class Pretrained(NamedTuple):
  """The pre-training stage: the surrogate seeds, the data prepared for them, and how the
  distillation went (None without a teacher)."""
  params_S: model_lib.Params
  prep: Prepared
  distillation: DistillInfo | None = None


class KnobChoice(NamedTuple):
  """The knob stage: every candidate's shape misfit and the one chosen (its simulations)."""
  candidates: tuple[KnobCandidate, ...]
  best: int
  sur_SxRxCxM: np.ndarray


class EvalSet(NamedTuple):
  """Which examples the fit predicts: positions in `eval_ids` order, their fragments and
  whether each is a probe."""
  eval_ids: tuple[str, ...]
  frag_M: np.ndarray
  probe_M: np.ndarray


def pretrain_stage(fragments: Fragments, runs: Sequence[RunLog], model_cfg: model_lib.ModelConfig,
                   tokenizer: Tokenizer | None, config: FitConfig, neutral_texts, *,
                   key: jax.Array, teacher: Teacher | None = None) -> Pretrained:
  """Prepares the data (every train example all runs evaluate is predicted too),
  pre-trains the surrogate seeds on neutral text and, with a teacher, distils the real base
  model's next-token distributions into them."""
  evaluated = {i for r in runs for ev in r.evals for i in ev.losses}
  common = [i for i in evaluated if all(i in ev.losses for r in runs for ev in r.evals)]
  pos = example_positions(fragments, common)
  train_pos = sorted(int(p) for p in pos[~is_probe(fragments, pos)])
  k_prep, k_pre = jax.random.split(key)
  prep = prepare(fragments, model_cfg, key=k_prep, eval_train=train_pos, diag_probes=1,
                 tokenizer=tokenizer)
  corpus = encode_texts(prep.tokenizer, list(neutral_texts or python_docs_neutral()),
                        model_cfg.length)
  check_vocab(corpus, model_cfg.vocab_size, "the pre-training text")
  params_S, _ = pretrain_ensemble(corpus, model_cfg=model_cfg, key=k_pre, seeds=config.seeds,
                                  steps=config.pretrain_steps)
  if teacher is None:
    return Pretrained(params_S, prep)
  goal = targets(teacher, prep.tokenizer, model_cfg.vocab_size, model_cfg.length)
  first = lambda p: jax.tree.map(lambda a: a[0], p)  # noqa: E731
  kl_before = distill_kl(first(params_S), goal, model_cfg)
  params_S, _ = distill_ensemble(params_S, goal, cfg=model_cfg, key=jax.random.fold_in(k_pre, 1),
                                 steps=config.distill_steps)
  info = DistillInfo(teacher.model, teacher.dataset_sha256, teacher.tokenizer_sha256,
                     config.distill_steps, kl_before, distill_kl(first(params_S), goal, model_cfg))
  return Pretrained(params_S, prep, info)


def choose_knobs(sur_KxSxRxCxM: np.ndarray, diverged_KxSxR: np.ndarray, real_RxCxM: np.ndarray,
                 evals: EvalSet, num_f: int, cands: Sequence[tuple[float, float]],
                 config: FitConfig) -> KnobChoice:
  """The candidate whose per-fragment curves (probe and train means) best match the real
  curves' shape, with a prior on log(scale) centred on the real settings.

  Raises:
    FitError: every candidate diverged.
  """
  scores = []
  for k in range(len(cands)):
    if (diverged_KxSxR[k] >= 0).any():
      scores.append(float("inf"))
      continue
    misfit = np.mean([_shape_misfit(fragment_means(sur_KxSxRxCxM[k].mean(0), evals.frag_M,
                                                   sel, num_f),
                                    fragment_means(real_RxCxM, evals.frag_M, sel, num_f))
                      for sel in (evals.probe_M, ~evals.probe_M) if sel.any()])
    scores.append(misfit)
  best_misfit = min(scores)
  if not np.isfinite(best_misfit):
    raise FitError("the surrogate diverged at every candidate learning-rate scale "
                   f"{sorted({lr for lr, _ in cands})} (x the runs' logged rates); pass lower "
                   "ones, e.g. FitConfig(lr_scales=(1.0,)) or `surrogate fit --lr-scales 1`")
  n_curves = 2 * num_f
  post = [0.5 * n_curves * s / max(best_misfit, 1e-12)
          + (np.log(lr) ** 2 + np.log(wd) ** 2) / (2 * config.knob_prior_sd ** 2)
          for s, (lr, wd) in zip(scores, cands)]
  best = int(np.argmin(post))
  return KnobChoice(tuple(KnobCandidate(lr, wd, s) for (lr, wd), s in zip(cands, scores)), best,
                    sur_KxSxRxCxM[best])


def effect_error_used(config: FitConfig, rho: float | None, gains: Gains,
                      res: Residuals) -> EffectErrorFit:
  """The effect error: the prior blended with the left-out runs' estimate by the gain's data
  weight. The order effects that pin the gain also show how wrong the predicted effects are;
  shuffled runs show neither, and the prior stands."""
  e_runs = (effect_error_from(res.res_RxCxF, res.effect_RxCxF, res.fragment_sd_CxF)
            if res.res_RxCxF is not None else None)
  e_prior = effect_error_prior(config, rho)
  weight = gains.common.data_weight
  used = e_prior if e_runs is None else weight * e_runs + (1 - weight) * e_prior
  return EffectErrorFit(e_prior, e_runs, used)


def fit(fragments: Fragments, runs: Sequence[RunLog], *,
        model_cfg: model_lib.ModelConfig | None = None,
        key: jax.Array, config: FitConfig = FitConfig(),
        neutral_texts: Sequence[str] | None = None, tokenizer: Tokenizer | None = None,
        teacher: Teacher | None = None, progress: bool = True) -> Simulator:
  """Calibrates the surrogate to real runs of `fragments`.

  The stages, each a function of its own: `check_runs`, `pretrain_stage`,
  `simulate_knob_grid` and `choose_knobs`, `fit_gains`, `residuals`, `effect_error_used`,
  and the Simfluence baseline.

  Args:
    fragments: the data set the runs were recorded on.
    runs: the calibration runs (RunLogs with evals), of one optimizer setting and length.
    model_cfg: the surrogate's shape (default: `ModelConfig`'s, with the context length
      picked from the data by `surrogate.prepare.model_config_for`).
    key: drives every random choice (initialisations, pre-training batches); the CLI's
      `--seed S` is `jax.random.key(S)`.
    config: fit settings.
    neutral_texts: pre-training text (default: paragraphs of Python's reference manual from
      `pydoc_data`, which ships with Python). It must not contain the fragments' examples.
    tokenizer: the surrogate's tokenizer for `model_cfg`, as `model_config_for` returns it
      with the shape: a BPE already trained on `fragments`, or the real model's tokenizer
      compacted (`model_config_for(real_tokenizer=...)`); by default a BPE is trained here,
      or, with a teacher, the teacher's tokenizer is compacted.
    teacher: the real base model's next-token distributions on these fragments
      (`calibrate.io.teacher`, `surrogate teach`): the surrogate then reads the real
      tokenizer's tokens and is distilled towards the teacher after pre-training
      (`FitConfig.distill_steps`).
    progress: show progress bars.

  Returns:
    The calibrated `Simulator`; `sim.fit_info` says how the fit went.

  Raises:
    FitError: the runs cannot be calibrated on (see `check_runs`).
    CalibrationError: a teacher of another fragments file, or a tokenizer that is not the
      teacher's.
    ValueError: a `tokenizer` without the `model_cfg` it was trained for.
  """
  t0 = time.perf_counter()
  check_runs(fragments, runs, min_steps=config.min_steps)
  if teacher is not None:
    teacher.check_matches(fragments, where="the teacher")  # its tokenizer: in `targets`
    config = dataclasses.replace(config, gain_prior=config.teacher_gain_prior,
                                 gain_prior_sd=config.teacher_gain_prior_sd,
                                 fragment_gain_sd=config.teacher_fragment_gain_sd)
  first = runs[0]
  opt_cfg = optim.OptimizerConfig.of_run(first.header)
  if not config.low_rank:
    opt_cfg = dataclasses.replace(opt_cfg, adapter=None)
  if model_cfg is None:
    if tokenizer is not None:
      raise ValueError("fit: pass `model_cfg` with `tokenizer` (the shape it was trained for)")
    model_cfg, tokenizer = model_config_for(
        fragments, real_tokenizer=None if teacher is None else teacher.tokenizer(),
        neutral_texts=neutral_texts)
  elif teacher is not None and tokenizer is None:
    raise ValueError("fit: with a teacher and a `model_cfg`, pass the tokenizer it was sized "
                     "with (`model_config_for(real_tokenizer=teacher.tokenizer())`)")
  pre = pretrain_stage(fragments, runs, model_cfg, tokenizer, config, neutral_texts,
                       key=key, teacher=teacher)
  t_pre = time.perf_counter() - t0  # the BPE and the checks included, as before
  eval_ids = tuple(pre.prep.eval_ids())
  pos = example_positions(fragments, eval_ids)
  evals = EvalSet(eval_ids, fragments.fragment_of[pos], is_probe(fragments, pos))
  num_f = len(fragments.names)

  lr_scales = config.lr_scales or (default_lr_scale(model_cfg.length),)
  cands = list(itertools.product(lr_scales, config.weight_decay_scales))
  steps_C = np.array(sorted(set(first.eval_steps)))
  sur, diverged = simulate_knob_grid(pre.params_S, cands, runs, fragments, pre.prep.data,
                                     model_cfg=model_cfg, opt_cfg=opt_cfg,
                                     chunk_size=config.chunk_size, progress=progress)
  real = _real_losses(runs, eval_ids)
  knobs = choose_knobs(sur.astype(np.float64), diverged, real, evals, num_f, cands, config)
  sur_k = knobs.sur_SxRxCxM                                       # S R C M
  frag_M, probe_M = evals.frag_M, evals.probe_M
  real_f = fragment_means(real, frag_M, probe_M, num_f)
  gains = fit_gains(real_f, fragment_means(sur_k, frag_M, probe_M, num_f), config)
  rho = (train_fidelity(fragment_means(real, frag_M, ~probe_M, num_f),
                        fragment_means(sur_k, frag_M, ~probe_M, num_f))
         if (~probe_M).any() else None)
  res = residuals(real, np.moveaxis(sur_k, 0, 1), frag_M, probe_M, num_f, config)
  effect_error = effect_error_used(config, rho, gains, res)
  anchor = real.mean(0)
  sur_cal = sur_k.mean(1)                                         # S C M
  fitted = anchored_map(anchor, gains.gain_F[None], frag_M,
                        (sur_k.mean(0) - sur_cal.mean(0))[None])[0, 0]
  fit_mse = float(np.mean((fragment_means(fitted, frag_M, probe_M, num_f) - real_f) ** 2))

  orders = np.stack([order_from_runlog(r, fragments) for r in runs])
  lrs = np.stack([run_learning_rates(r) for r in runs])
  shares = np.stack([fragment_shares(o, lr, fragments.fragment_of, num_f, steps_C,
                                     float(lrs.max())) for o, lr in zip(orders, lrs)])
  simfluence = SimfluenceLinear.fit(real_f, shares)
  chosen = knobs.candidates[knobs.best]
  fit_info = FitInfo(
      calibration_runs=tuple(r.header.run_id for r in runs),
      calibration_orders_sha256=tuple(order_sha256(o) for o in orders),
      knob_candidates=knobs.candidates, lr_scale=chosen.lr_scale,
      weight_decay_scale=chosen.weight_decay_scale, gain=gains.common, fit_mse=fit_mse,
      leave_one_run_out=res.loo, train_fidelity=rho, effect_error=effect_error,
      seconds=FitSeconds(t_pre, time.perf_counter() - t0),
      baselines=BaselineInfo(simfluence.ridge, float(lrs.max())),
      distillation=pre.distillation,
      context=ContextInfo.of(fragments, token_counts(pre.prep.tokenizer, fragments.examples),
                             model_cfg.length))
  calibration = Calibration(
      params_S=pre.params_S,
      knobs=optim.Knobs(jnp.float32(chosen.lr_scale), jnp.float32(chosen.weight_decay_scale)),
      steps_C=steps_C, anchor_CxM=anchor, sur_cal_SxCxM=sur_cal, gain_F=gains.gain_F,
      gain_sd_F=gains.gain_sd_F, example_sd_CxM=res.example_sd_CxM,
      fragment_sd_CxF=res.fragment_sd_CxF, effect_error=np.float64(effect_error.used))
  config_ = SimulatorConfig(model_cfg=model_cfg, opt_cfg=opt_cfg, num_steps=first.num_steps,
                            batch_size=first.header.batch_size, eval_ids=eval_ids)
  return Simulator(config=config_, calibration=calibration, fragments=fragments,
                   tokenizer=pre.prep.tokenizer, fit_info=fit_info, simfluence=simfluence)
