"""Baselines a calibrated simulator must beat, fitted on the same calibration runs.

- `order_agnostic`: every order gets the calibration runs' mean trajectory.
- `SimfluenceLinear`: Guu et al. (2023), "Simfluence", the linear simulator, per fragment:
  between two evals, fragment j's probe loss moves as
      L_j(c) = L_j(c-1) * (1 + sum_i n_i a_ij) + sum_i n_i b_ij,
  where n_i is the learning-rate-weighted share of fragment i in the batches of that interval
  (the paper's per-step update summed over the steps between evals, since real runs are not
  evaluated every step). a and b are fitted by ridge regression that shrinks each fragment's
  effects towards the mean effect of all fragments (not towards zero: with calibration runs
  that feed every fragment alike, only the mean effect is identified, and the fallback should
  be "every fragment helps alike", not an arbitrary split). Its strength is the largest on a
  grid whose leave-one-run-out error is within 5 % of the best. Predictions roll forward from
  the step-0 loss.
"""

from __future__ import annotations

import dataclasses

import numpy as np

RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def fragment_shares(order_TxB: np.ndarray, lr_T: np.ndarray, fragment_of: np.ndarray,
                    num_fragments: int, steps_C: np.ndarray, lr_ref: float) -> np.ndarray:
  """n[c, i]: fragment i's learning-rate-weighted share of the batches between evals c-1, c.

  Returns [C-1, F] for the C eval steps (each a count of steps taken).
  """
  valid = order_TxB >= 0
  frag = np.where(valid, fragment_of[np.maximum(order_TxB, 0)], -1)
  per_step_TxF = (frag[..., None] == np.arange(num_fragments)).sum(1) / order_TxB.shape[1]
  weighted = per_step_TxF * (lr_T / lr_ref)[:, None]
  cum = np.concatenate([np.zeros((1, num_fragments)), np.cumsum(weighted, 0)])
  return np.diff(cum[np.asarray(steps_C)], axis=0)


@dataclasses.dataclass(frozen=True)
class SimfluenceLinear:
  """The fitted linear simulator: a_FxF[i, j], b_FxF[i, j] (effect of fragment i on j)."""
  a_FxF: np.ndarray
  b_FxF: np.ndarray
  ridge: float

  @staticmethod
  def _design(loss_prev_F, n_F):
    # Columns: L_j(c-1) * n_i for every i, then n_i; one row per target fragment j.
    return np.concatenate([loss_prev_F[:, None] * n_F[None, :],
                           np.broadcast_to(n_F, (len(loss_prev_F), len(n_F)))], 1)

  @classmethod
  def fit(cls, loss_RxCxF: np.ndarray, shares_RxCxF: np.ndarray,
          ridge: float | None = None) -> SimfluenceLinear:
    """Fits a and b on calibration runs.

    Args:
      loss_RxCxF: real mean probe loss per fragment at each eval.
      shares_RxCxF: `fragment_shares` of each run ([R, C-1, F]).
      ridge: the ridge strength; by default chosen by leave-one-run-out over `RIDGE_GRID`
        (a fixed 1e-2 when there is a single run).
    """
    r = loss_RxCxF.shape[0]
    if ridge is None:
      if r < 2:
        ridge = 1e-2
      else:
        errs = []
        for lam in RIDGE_GRID:
          e = 0.0
          for out in range(r):
            keep = [i for i in range(r) if i != out]
            m = cls.fit(loss_RxCxF[keep], shares_RxCxF[keep], ridge=lam)
            pred = m.predict(loss_RxCxF[out, 0], shares_RxCxF[out])
            e += float(np.mean((pred - loss_RxCxF[out]) ** 2))
          errs.append(e)
        ridge = max(lam for lam, e in zip(RIDGE_GRID, errs) if e <= 1.05 * min(errs))
    f = loss_RxCxF.shape[-1]
    centre = np.eye(f) - np.full((f, f), 1 / f)  # penalises deviations from the mean effect
    penalty = np.kron(np.eye(2), centre)
    a, b = np.zeros((f, f)), np.zeros((f, f))
    for j in range(f):
      xs, ys = [], []
      for run in range(r):
        for c in range(1, loss_RxCxF.shape[1]):
          prev = loss_RxCxF[run, c - 1, j]
          n = shares_RxCxF[run, c - 1]
          xs.append(np.concatenate([prev * n, n]))
          ys.append(loss_RxCxF[run, c, j] - prev)
      x, y = np.array(xs), np.array(ys)
      if not np.isfinite(y).all():
        continue  # a fragment without probes: nothing to fit, no effects
      gram = x.T @ x + ridge * len(y) * penalty
      theta = np.linalg.lstsq(gram, x.T @ y, rcond=None)[0]
      a[:, j], b[:, j] = theta[:f], theta[f:]
    return cls(a, b, float(ridge))

  def predict(self, loss0_F: np.ndarray, shares_CxF: np.ndarray) -> np.ndarray:
    """Rolls fragment probe losses forward from step 0: [C, F] for C-1 intervals + step 0."""
    out = [np.asarray(loss0_F, np.float64)]
    for n in shares_CxF:
      prev = out[-1]
      out.append(prev * (1 + n @ self.a_FxF) + n @ self.b_FxF)
    return np.stack(out)
