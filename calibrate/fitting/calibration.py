"""A calibrated simulator: the surrogate ensemble plus the map from its losses to real ones.

Prediction of a run under an order (DESIGN.md, "Calibration"; the map is the anchored gain
of DESIGN.md's last section):

    real(t, m) ~ anchor(t, m) + gain_f * (surrogate(t, m | order) - surrogate_cal(t, m))

where `anchor` is the calibration runs' mean real loss of example m after t steps,
`surrogate_cal` the same mean over the surrogate's simulations of the calibration orders, and
f the fragment of m. Every surrogate seed and a few plausible gains are members of an
ensemble; their spread plus the calibration residuals give the predictive intervals.

A saved simulator is a folder of plain data: `simulator.json` (settings, gains, the files'
sha256), `arrays.npz` (loaded without pickle), `tokenizer.json` and a copy of the fragments
file. Loading checks every file's sha256, so a truncated or edited folder fails clearly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from calibrate.fitting.baselines import SimfluenceLinear
from calibrate.fitting.metrics import fragment_means
from calibrate.io.simulated import wanted_eval_steps
from calibrate.io.runlog import (
  EvalRecord,
  RunHeader,
  RunLog,
  StepRecord,
  order_from_runlog,
  run_learning_rates,
)
from surrogate import model as model_lib
from surrogate import optim
from surrogate.errors import CalibrationError, DataError
from surrogate.fragments import (
  Fragments,
  read_fragments,
  sha256_file,
  write_fragments,
)
from surrogate.jsonl import atomic_write
from surrogate.simulate import SimPlan, build_sim_data, simulate_many
from surrogate.tokenize import encode_examples

FORMAT = "surrogate-simulator/1"
_FILES = ("arrays.npz", "tokenizer.json", "fragments.jsonl")


class SimulatorError(DataError):
  """A saved simulator folder is missing, truncated, tampered with or of another format."""


@dataclasses.dataclass(frozen=True, eq=False)
class Prediction:
  """Predicted per-example losses of R runs at their eval steps, on the real scale.

  Attributes:
    run_ids: the R runs' ids.
    steps: the C eval steps shared by the runs.
    eval_ids: the M example ids predicted (every probe, then evaluated train examples).
    frag_M: fragment index of each example.
    is_probe_M: whether each example is a probe.
    members_RxKxCxM: each ensemble member's prediction (seed x gain).
    example_sd_CxM: residual spread of each example around its fragment's residual.
    fragment_sd_RxCxM: spread shared by a fragment's examples (stored per example): the
      calibration residual plus `effect_error` x the fragment's predicted order effect.
      Both come from leave-one-run-out on the calibration runs: spread the members miss.
    raw_RxSxCxM: the surrogate's own losses (its scale), per seed.
    diverged_RxS: the step each seed's simulation diverged at, or -1.
  """
  run_ids: tuple[str, ...]
  steps: np.ndarray
  eval_ids: tuple[str, ...]
  frag_M: np.ndarray
  is_probe_M: np.ndarray
  members_RxKxCxM: np.ndarray
  example_sd_CxM: np.ndarray
  fragment_sd_RxCxM: np.ndarray
  raw_RxSxCxM: np.ndarray
  diverged_RxS: np.ndarray

  @property
  def mean_RxCxM(self) -> np.ndarray:
    """The ensemble mean prediction (over members whose seed did not diverge)."""
    with np.errstate(invalid="ignore"):
      return np.nanmean(self.members_RxKxCxM, 1)

  def samples(self, reduce, *, draws: int = 32, seed: int = 0) -> np.ndarray:
    """Draws from the predictive distribution of `reduce(losses_RxCxM)`.

    Each member is perturbed by Gaussian residual noise, one draw shared by a fragment's
    examples (`fragment_sd_RxCxM`) plus one per example (`example_sd_CxM`), then reduced;
    returns the reductions stacked on a leading axis.
    """
    rng = np.random.default_rng(seed)
    num_f = int(self.frag_M.max()) + 1
    out = []
    for k in range(self.members_RxKxCxM.shape[1]):
      base = self.members_RxKxCxM[:, k]
      for _ in range(draws):
        shared = rng.standard_normal(base.shape[:-1] + (num_f,))[..., self.frag_M]
        own = rng.standard_normal(base.shape)
        out.append(reduce(base + shared * self.fragment_sd_RxCxM + own * self.example_sd_CxM))
    return np.stack(out)

  def interval(self, reduce=lambda x: x, level: float = 0.8, **kw) -> tuple[np.ndarray, np.ndarray]:
    """The central `level` predictive interval of `reduce(losses_RxCxM)`."""
    s = self.samples(reduce, **kw)
    return (np.nanquantile(s, (1 - level) / 2, axis=0),
            np.nanquantile(s, (1 + level) / 2, axis=0))


@dataclasses.dataclass(frozen=True, eq=False)
class Simulator:
  """A surrogate ensemble calibrated to real runs of one fragments file.

  Attributes:
    fragments: the data set it was calibrated on.
    model_cfg: the surrogate's shape.
    opt_cfg: the real runs' optimizer (their family, schedule and settings).
    knobs: the fitted learning-rate and weight-decay scales.
    tokenizer: the surrogate's BPE.
    params_S: the pre-trained surrogate seeds (leading axis S).
    num_steps, batch_size: the calibration runs' length and batch size.
    steps_C: the calibration runs' eval steps.
    eval_ids: examples with an anchor (all probes, then the evaluated train examples).
    anchor_CxM: mean real loss over the calibration runs.
    sur_cal_SxCxM: each seed's mean simulated loss over the calibration orders.
    gain_F, gain_sd_F: the fitted gain of each fragment and its posterior spread.
    example_sd_CxM, fragment_sd_CxF: leave-one-run-out residual spreads (see `Prediction`).
    simfluence: the Simfluence-linear baseline fitted on the same runs.
    info: how the fit went (calibration runs, chosen knobs, fit quality); plain JSON.
  """
  fragments: Fragments
  model_cfg: model_lib.ModelConfig
  opt_cfg: optim.OptimizerConfig
  knobs: optim.Knobs
  tokenizer: Tokenizer
  params_S: model_lib.Params
  num_steps: int
  batch_size: int
  steps_C: np.ndarray
  eval_ids: tuple[str, ...]
  anchor_CxM: np.ndarray
  sur_cal_SxCxM: np.ndarray
  gain_F: np.ndarray
  gain_sd_F: np.ndarray
  example_sd_CxM: np.ndarray
  fragment_sd_CxF: np.ndarray
  simfluence: SimfluenceLinear
  info: dict[str, Any]
  gain_quantiles: tuple[float, ...] = (-1.28, 0.0, 1.28)
  effect_error: float = 0.25

  @property
  def num_seeds(self) -> int:
    return int(self.sur_cal_SxCxM.shape[0])

  # -- predicting ----------------------------------------------------------------------------

  def _sim_setup(self, eval_ids: Sequence[str], num_steps: int, steps: Sequence[int], *,
                 diagnostics: bool = False):
    """Data, plan and the columns / checkpoint rows that give `eval_ids` at `steps`."""
    frags = self.fragments
    pos = _positions(frags, eval_ids)
    train_pos = [p for p in pos if frags.split_of[p] == _TRAIN]
    tokenized = encode_examples(self.tokenizer, frags.examples, self.model_cfg.length)
    data = build_sim_data(frags, tokenized, vocab_size=self.model_cfg.vocab_size,
                          eval_train=train_pos, diag_probes=4 if diagnostics else 1,
                          key=jax.random.key(0))
    data_ids = [frags.examples[i].id for i in np.asarray(data.eval_idx_M)]
    col = np.array([data_ids.index(i) for i in eval_ids])
    inner = [int(x) for x in steps if 0 < x < num_steps]
    plan = SimPlan(eval_every=math.gcd(*inner) if inner else max(num_steps, 1),
                   diagnostics=diagnostics)
    ckpt = plan.checkpoint_steps(num_steps)
    rows = np.searchsorted(ckpt, np.asarray(steps))
    if not np.array_equal(ckpt[np.minimum(rows, len(ckpt) - 1)], np.asarray(steps)):
      raise CalibrationError(f"eval steps {list(steps)} are not within 0..{num_steps}")
    return data, plan, col, rows

  def simulate_raw(self, runs: Sequence[RunLog], steps: Sequence[int], eval_ids: Sequence[str],
                   *, progress: bool = False, chunk_size: int | None = None):
    """The surrogate's own losses (its scale) for every seed: [R, S, C, M], diverged [R, S]."""
    data, plan, col, rows = self._sim_setup(eval_ids, runs[0].num_steps, steps)
    orders = np.stack([order_from_runlog(r, self.fragments) for r in runs])
    lrs = np.stack([run_learning_rates(r) for r in runs])
    n_r, n_s = len(runs), self.num_seeds
    sel_s = np.tile(np.arange(n_s), n_r)
    sel_r = np.repeat(np.arange(n_r), n_s)
    params = jax.tree.map(lambda a: np.asarray(a)[sel_s], self.params_S)
    traj = simulate_many(params, self.knobs, orders[sel_r], lrs[sel_r], data,
                         model_cfg=self.model_cfg, opt_cfg=self.opt_cfg, plan=plan,
                         chunk_size=chunk_size, progress=progress)
    loss = traj.eval_loss_CxM[:, rows][:, :, col]
    shape = (n_r, n_s) + loss.shape[1:]
    return loss.reshape(shape), traj.diverged_step.reshape(n_r, n_s)

  def simulate_orders(self, orders_NxTxB, seed_N=None, *, diagnostics: bool = False,
                      progress: bool = False, chunk_size: int | None = None,
                      folder: str | os.PathLike | None = None,
                      resume: bool = False) -> tuple[np.ndarray, Any]:
    """Real-scale ensemble members for orders of the calibration runs' shape.

    Each order is trained from the seeds `seed_N` (one per order; default every seed, the
    seed axis then following the order axis) with the calibration schedule, evaluated at
    the calibration steps `steps_C` on `eval_ids`, and mapped to the real scale with every
    gain quantile. With `folder`, each chunk's results are written there as it finishes
    (`surrogate.store.simulate_to_folder`), and `resume` continues a killed job.

    Returns:
      (members_NxKxCxM, trajectory): K = gain quantiles (x seeds when `seed_N` is None); the
      surrogate's own `Trajectory` (leading axis N, or N x S flattened), its losses in
      `eval_ids` columns at `steps_C`.
    """
    orders = np.asarray(orders_NxTxB, np.int32)
    if orders.ndim != 3 or orders.shape[1:] != (self.num_steps, self.batch_size):
      raise CalibrationError(f"orders must have shape [N, {self.num_steps}, {self.batch_size}] "
                             f"(the calibration runs' steps and batch), got {orders.shape}")
    n, n_s = len(orders), self.num_seeds
    if seed_N is None:
      seed_N, sel = np.tile(np.arange(n_s), n), np.repeat(np.arange(n), n_s)
    else:
      seed_N, sel = np.asarray(seed_N, np.int64) % n_s, np.arange(n)
    data, plan, col, rows = self._sim_setup(self.eval_ids, self.num_steps,
                                            self.steps_C.tolist(), diagnostics=diagnostics)
    params = jax.tree.map(lambda a: np.asarray(a)[seed_N], self.params_S)
    lrs = optim.learning_rates(self.opt_cfg, self.num_steps)
    # Knobs with an order axis, as `fit` passes them: then the fit's simulations, these and
    # any others of the same chunk shape share one compilation.
    knobs = optim.Knobs(np.full(len(sel), self.knobs.lr_scale, np.float32),
                        np.full(len(sel), self.knobs.weight_decay_scale, np.float32))
    run = dict(model_cfg=self.model_cfg, opt_cfg=self.opt_cfg, plan=plan,
               chunk_size=chunk_size, progress=progress)
    if folder is None:
      traj = simulate_many(params, knobs, orders[sel], lrs, data, **run)
    else:
      from surrogate.store import simulate_to_folder
      traj = simulate_to_folder(folder, params, knobs, orders[sel], lrs, data,
                                resume=resume, **run)
    pick = lambda a: a[:, rows] if a.ndim >= 2 else a  # noqa: E731
    traj = traj._replace(eval_loss_CxM=traj.eval_loss_CxM[:, rows][:, :, col],
                         diagnostics=None if traj.diagnostics is None
                         else jax.tree.map(pick, traj.diagnostics))
    members = self.to_real(traj.eval_loss_CxM, seed_N)            # (N*S) G C M
    members = members.reshape(n, -1, *members.shape[2:])
    return members, traj

  def fragment_means(self, losses_xM: np.ndarray, *, probe: bool = True) -> np.ndarray:
    """Mean over each fragment's probes (or its evaluated train examples) of losses given in
    `eval_ids` columns: [..., M] -> [..., F] (NaN where a fragment has none)."""
    pos = _positions(self.fragments, self.eval_ids)
    is_probe = self.fragments.split_of[pos] == _PROBE
    with np.errstate(invalid="ignore", divide="ignore"):
      return fragment_means(losses_xM, self.fragments.fragment_of[pos],
                            is_probe if probe else ~is_probe, len(self.fragments.names))

  def to_real(self, raw_NxCxM: np.ndarray, seed_N: np.ndarray) -> np.ndarray:
    """The anchored gain map at the calibration steps: [N, G, C, M] for each gain quantile."""
    frag_M = self.fragments.fragment_of[_positions(self.fragments, self.eval_ids)]
    gains_GxF = np.maximum(self.gain_F[None] + np.array(self.gain_quantiles)[:, None]
                           * self.gain_sd_F[None], 0.0)
    dev = np.asarray(raw_NxCxM, np.float64) - self.sur_cal_SxCxM[np.asarray(seed_N)]
    return self.anchor_CxM[None, None] + gains_GxF[None, :, None, frag_M] * dev[:, None]

  def predict(self, runs: Sequence[RunLog], *, progress: bool = False,
              chunk_size: int | None = None) -> Prediction:
    """Predicts the real per-example losses of each run (or order file) at its eval steps.

    The runs must share their eval steps (see `wanted_eval_steps`: an order file is evaluated
    every 20 steps) and have at most `num_steps` steps. Evals present in `runs` are ignored
    except for which steps and which train examples they cover.

    Raises:
      CalibrationError: runs longer than the calibration runs, different eval steps, or a
        different optimizer family.
    """
    if not runs:
      raise CalibrationError("predict needs at least one run or order file")
    self._check_compatible(runs)
    steps = np.array(wanted_eval_steps(runs[0]))
    for r in runs[1:]:
      if list(wanted_eval_steps(r)) != steps.tolist():
        raise CalibrationError(f"run {r.header.run_id!r} is evaluated at other steps than "
                               f"{runs[0].header.run_id!r}; predict them in separate calls")
    if steps.max() > self.steps_C[-1]:
      raise CalibrationError(f"run {runs[0].header.run_id!r} asks for step {int(steps.max())}, "
                             f"after the calibration runs' last eval ({int(self.steps_C[-1])}); "
                             "the real trajectory is unknown there")
    shapes = {order_from_runlog(r, self.fragments).shape for r in runs}
    if len(shapes) > 1:
      raise CalibrationError(f"the runs differ in steps or batch size ({sorted(shapes)}); "
                             "predict them in separate calls")
    eval_ids = self._predicted_ids(runs)
    # Simulate at the calibration eval steps too: the deviation from the calibration mean is
    # taken where both are known and interpolated from there, so no curvature of the loss
    # curve between evals is mistaken for an order effect.
    cal_steps = self.steps_C[self.steps_C <= runs[0].num_steps]
    all_steps = np.union1d(steps, cal_steps)
    raw_all, diverged = self.simulate_raw(runs, all_steps.tolist(), eval_ids, progress=progress,
                                          chunk_size=chunk_size)
    raw = raw_all[:, :, np.searchsorted(all_steps, steps)]
    anchor, _, frag_M, ex_sd, frag_sd = self._maps_at(steps, eval_ids)
    sur_cal_at = self._maps_at(cal_steps, eval_ids)[1]           # S Ccal M, exact there
    dev_cal = raw_all[:, :, np.searchsorted(all_steps, cal_steps)] - sur_cal_at[None]
    dev = _interp_steps(dev_cal, cal_steps, steps)               # R S C M
    # A train example the calibration runs never evaluated has no calibration mean of its
    # own: it takes its fragment's mean deviation over the anchored train examples.
    probe_M = self.fragments.split_of[_positions(self.fragments, eval_ids)] == _PROBE
    known = set(self.eval_ids)
    for m, i in enumerate(eval_ids):
      if i not in known:
        same = [c for c, j in enumerate(eval_ids) if j in known and not probe_M[c]
                and frag_M[c] == frag_M[m]]
        dev[..., m] = dev[..., same].mean(-1)
    gains_GxF = np.maximum(self.gain_F[None] + np.array(self.gain_quantiles)[:, None]
                           * self.gain_sd_F[None], 0.0)
    members = anchor[None, None, None] + gains_GxF[None, None, :, None, frag_M] * dev[:, :, None]
    members = members.reshape(len(runs), -1, *anchor.shape)      # R (S*G) C M
    # The surrogate's effects are right in pattern, not in detail: an error in proportion to
    # each fragment's predicted effect (its probe mean's distance from the anchor).
    num_f = len(self.fragments.names)
    effect_RxCxF = np.abs(fragment_means(np.nanmean(members, 1) - anchor[None], frag_M, probe_M,
                                         num_f))
    frag_sd = np.sqrt(frag_sd[None] ** 2 + (self.effect_error * effect_RxCxF[..., frag_M]) ** 2)
    return Prediction(tuple(r.header.run_id for r in runs), steps, tuple(eval_ids), frag_M,
                      probe_M, members, ex_sd, frag_sd, raw, diverged)

  def what_if(self, order, **kw):
    """What each fragment becomes under `order`; see `calibrate.answers.outcomes.what_if`."""
    from calibrate.answers.outcomes import what_if
    return what_if(self, order, **kw)

  def compare(self, candidates, **kw):
    """Named orders ranked by predicted probe loss; see `calibrate.answers.outcomes.compare`."""
    from calibrate.answers.outcomes import compare
    return compare(self, candidates, **kw)

  def screen(self, **kw):
    """Outcome probabilities, interference and failures over many orders; see
    `calibrate.answers.screen.screen`."""
    from calibrate.answers.screen import screen
    return screen(self, **kw)

  def search(self, **kw):
    """The best feeding order found for an objective; see `calibrate.answers.search.search`."""
    from calibrate.answers.search import search
    return search(self, **kw)

  def next_run(self, candidates=None, **kw):
    """The real run that would most reduce the uncertainty; see `calibrate.answers.search.next_run`."""
    from calibrate.answers.search import next_run
    return next_run(self, candidates, **kw)

  def predicted_runlogs(self, runs: Sequence[RunLog], prediction: Prediction,
                        level: float = 0.8) -> list[RunLog]:
    """Predictions as RunLogs on the real scale: same run ids and steps, predicted evals.

    Each eval record carries the `level` interval per example in the extra keys
    `losses_lo` and `losses_hi`; a header says `"simulated": true`, and `diverged_seeds`
    when some of the ensemble diverged (their losses are left out of the mean).
    """
    lo, hi = prediction.interval(level=level, draws=8)
    mean = prediction.mean_RxCxM
    ids = prediction.eval_ids
    out = []
    for n, run in enumerate(runs):
      extra = {"simulated": True, "source_run": run.header.run_id,
               "simulator": {"interval": level, "seeds": self.num_seeds}}
      bad = [s for s, d in enumerate(prediction.diverged_RxS[n]) if d >= 0]
      if bad:
        extra["diverged_seeds"] = bad
      header = RunHeader(run_id=run.header.run_id, dataset_sha256=self.fragments.sha256,
                         model=f"surrogate-{self.model_cfg.depth}x{self.model_cfg.width}",
                         optimizer=dict(run.header.optimizer), batch_size=run.header.batch_size,
                         seed=run.header.seed, extra=extra)
      steps = [StepRecord(t, s.examples, lr=s.lr) for t, s in enumerate(run.steps)]
      evals = []
      for c, step in enumerate(prediction.steps):
        row = mean[n, c]
        if not np.isfinite(row).all():
          break
        evals.append(EvalRecord(int(step), dict(zip(ids, map(float, row))), extra={
            "losses_lo": dict(zip(ids, map(float, lo[n, c]))),
            "losses_hi": dict(zip(ids, map(float, hi[n, c])))}))
      out.append(RunLog(header, tuple(steps), tuple(evals)))
    return out

  def _check_compatible(self, runs: Sequence[RunLog]) -> None:
    for r in runs:
      rid = r.header.run_id
      if r.header.dataset_sha256.lower() != self.fragments.sha256:
        raise CalibrationError(f"run {rid!r} is of another fragments file (dataset_sha256 differs "
                               "from the simulator's)")
      if r.num_steps > self.num_steps:
        raise CalibrationError(f"run {rid!r} has {r.num_steps} steps; the simulator was calibrated "
                               f"on {self.num_steps}-step runs and cannot predict beyond them")
      name = r.header.optimizer.get("name")
      if name != self.opt_cfg.name.value:
        raise CalibrationError(f"run {rid!r} uses optimizer {name!r}; the simulator was calibrated "
                               f"on {self.opt_cfg.name.value!r} runs")
      if optim.OptimizerConfig.from_dict(r.header.optimizer) != self.opt_cfg:
        warnings.warn(f"run {rid!r} has optimizer settings {r.header.optimizer}, the calibration "
                      f"runs {self.opt_cfg.to_dict()}: its learning rates are simulated as given, "
                      "the other settings as calibrated, and the prediction is an extrapolation",
                      UserWarning, stacklevel=3)

  def _predicted_ids(self, runs: Sequence[RunLog]) -> list[str]:
    known = list(self.eval_ids)
    seen = set(known)
    for r in runs:
      for ev in r.evals:
        for i in ev.losses:
          if i not in seen:
            seen.add(i)
            known.append(i)
    return known

  def _maps_at(self, steps: np.ndarray, eval_ids: Sequence[str]):
    """Anchor, surrogate calibration mean and noise at `steps` for `eval_ids`.

    Steps between calibration evals are interpolated linearly. A train example the
    calibration runs did not evaluate takes its fragment's mean train anchor.
    """
    frags = self.fragments
    pos = _positions(frags, eval_ids)
    frag_M = frags.fragment_of[pos]
    col = {i: c for c, i in enumerate(self.eval_ids)}
    known_frag = frags.fragment_of[_positions(frags, self.eval_ids)]
    known_train = frags.split_of[_positions(frags, self.eval_ids)] == _TRAIN

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
      return _interp_steps(x, self.steps_C, steps)

    anchor = interp(gather(self.anchor_CxM))
    sur_cal = interp(gather(self.sur_cal_SxCxM))
    ex_sd = interp(gather(self.example_sd_CxM))
    frag_sd = interp(self.fragment_sd_CxF[:, frag_M])
    if np.isnan(anchor).any():
      missing = [eval_ids[m] for m in np.nonzero(np.isnan(anchor).any(0))[0]]
      raise CalibrationError(f"no calibration data for the fragment of {missing[:3]} (its train "
                             "examples were never evaluated in the calibration runs)")
    return anchor, sur_cal, frag_M, ex_sd, frag_sd

  # -- saving --------------------------------------------------------------------------------

  def save(self, path: str | os.PathLike) -> None:
    """Writes the simulator as a folder of plain data (each file written atomically)."""
    os.makedirs(path, exist_ok=True)
    flat, _ = jax.tree_util.tree_flatten_with_path(self.params_S)
    arrays = {f"params/{jax.tree_util.keystr(p)}": np.asarray(a) for p, a in flat}
    arrays.update(steps_C=self.steps_C, anchor_CxM=self.anchor_CxM,
                  sur_cal_SxCxM=self.sur_cal_SxCxM, gain_F=self.gain_F,
                  gain_sd_F=self.gain_sd_F, example_sd_CxM=self.example_sd_CxM,
                  fragment_sd_CxF=self.fragment_sd_CxF, simfluence_a_FxF=self.simfluence.a_FxF,
                  simfluence_b_FxF=self.simfluence.b_FxF)
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    blobs = {"arrays.npz": buf.getvalue(),
             "tokenizer.json": self.tokenizer.to_str().encode(),
             "fragments.jsonl": _fragments_bytes(self.fragments)}
    for name, data in blobs.items():
      atomic_write(os.path.join(path, name), data)
    meta = {
        "format": FORMAT,
        "model": dataclasses.asdict(self.model_cfg),
        "optimizer": self.opt_cfg.to_dict(),
        "knobs": {"lr_scale": float(self.knobs.lr_scale),
                  "weight_decay_scale": float(self.knobs.weight_decay_scale)},
        "num_steps": self.num_steps, "batch_size": self.batch_size,
        "eval_ids": list(self.eval_ids), "gain_quantiles": list(self.gain_quantiles),
        "effect_error": self.effect_error,
        "dataset_sha256": self.fragments.sha256, "info": self.info,
        "simfluence_ridge": self.simfluence.ridge,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()},
    }
    atomic_write(os.path.join(path, "simulator.json"),
                 (json.dumps(meta, indent=1) + "\n").encode())

  @classmethod
  def load(cls, path: str | os.PathLike) -> Simulator:
    """Reads a saved simulator, checking its format and every file's sha256.

    Raises:
      SimulatorError: a file is missing, unreadable, of another format or altered.
    """
    path = os.fspath(path)
    meta_path = os.path.join(path, "simulator.json")
    try:
      with open(meta_path, "rb") as f:
        meta = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
      raise SimulatorError("no saved simulator here (simulator.json is missing)",
                           path=meta_path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SimulatorError(f"not valid JSON ({e})", path=meta_path) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
      raise SimulatorError(f"expected format {FORMAT!r}", path=meta_path, field="format")
    try:
      files = meta["files"]
      blobs = {}
      for name in _FILES:
        p = os.path.join(path, name)
        try:
          with open(p, "rb") as f:
            blobs[name] = f.read()
        except FileNotFoundError:
          raise SimulatorError("missing from the saved simulator", path=p) from None
        if hashlib.sha256(blobs[name]).hexdigest() != files[name]:
          raise SimulatorError("its sha256 differs from simulator.json's: the file was "
                               "truncated or changed after saving", path=p)
      fragments = read_fragments(os.path.join(path, "fragments.jsonl"))
      with np.load(os.path.join(path, "arrays.npz"), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
      model_cfg = model_lib.ModelConfig(**meta["model"])
      skeleton = model_lib.init_params(jax.random.key(0), model_cfg)
      flat, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
      leaves = [jnp.asarray(arrays[f"params/{jax.tree_util.keystr(p)}"]) for p, _ in flat]
      params = jax.tree_util.tree_unflatten(treedef, leaves)
      knobs = optim.Knobs(jnp.float32(meta["knobs"]["lr_scale"]),
                          jnp.float32(meta["knobs"]["weight_decay_scale"]))
      return cls(fragments=fragments, model_cfg=model_cfg,
                 opt_cfg=optim.OptimizerConfig.from_dict(meta["optimizer"]), knobs=knobs,
                 tokenizer=Tokenizer.from_str(blobs["tokenizer.json"].decode()),
                 params_S=params, num_steps=int(meta["num_steps"]),
                 batch_size=int(meta["batch_size"]), steps_C=arrays["steps_C"],
                 eval_ids=tuple(meta["eval_ids"]), anchor_CxM=arrays["anchor_CxM"],
                 sur_cal_SxCxM=arrays["sur_cal_SxCxM"], gain_F=arrays["gain_F"],
                 gain_sd_F=arrays["gain_sd_F"], example_sd_CxM=arrays["example_sd_CxM"],
                 fragment_sd_CxF=arrays["fragment_sd_CxF"],
                 simfluence=SimfluenceLinear(arrays["simfluence_a_FxF"],
                                             arrays["simfluence_b_FxF"],
                                             float(meta["simfluence_ridge"])),
                 info=meta["info"], gain_quantiles=tuple(meta["gain_quantiles"]),
                 effect_error=float(meta["effect_error"]))
    except SimulatorError:
      raise
    except (KeyError, TypeError, ValueError) as e:
      raise SimulatorError(f"inconsistent saved simulator ({e!r})", path=meta_path) from None


_TRAIN, _PROBE = 0, 1  # Fragments.split_of codes


def _interp_steps(x: np.ndarray, from_steps: np.ndarray, to_steps: np.ndarray) -> np.ndarray:
  """Linear interpolation along axis -2 ([..., C_from, M] -> [..., C_to, M])."""
  moved = np.moveaxis(x, -2, -1)
  flat = moved.reshape(-1, moved.shape[-1])
  res = np.stack([np.interp(to_steps, from_steps, row) for row in flat])
  return np.moveaxis(res.reshape(moved.shape[:-1] + (len(to_steps),)), -1, -2)


def _positions(fragments: Fragments, ids: Sequence[str]) -> np.ndarray:
  try:
    return np.array([fragments.index[i] for i in ids], np.int64)
  except KeyError as e:
    raise CalibrationError(f"example id {e.args[0]!r} is not in the fragments file") from None


def _fragments_bytes(fragments: Fragments) -> bytes:
  """The fragments file's bytes: the original file when it is unchanged, else re-encoded."""
  import tempfile
  if fragments.path and os.path.exists(fragments.path) and \
     sha256_file(fragments.path) == fragments.sha256:
    with open(fragments.path, "rb") as f:
      return f.read()
  with tempfile.TemporaryDirectory() as d:
    p = os.path.join(d, "f.jsonl")
    write_fragments(p, fragments)
    with open(p, "rb") as f:
      data = f.read()
  if hashlib.sha256(data).hexdigest() != fragments.sha256:
    raise ValueError("the fragments do not round-trip to the bytes they were read from")
  return data

