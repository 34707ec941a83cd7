"""Resumable simulation of many orders: results stream to a folder, one file per chunk.

`simulate_to_folder` runs `simulate_many` chunk by chunk and writes each chunk's results
atomically (temporary file, fsync, rename) as soon as it is done, so a job killed at any
moment (even `kill -9`) leaves only whole chunks behind. With `resume=True` it checks that
the inputs are the ones the folder was started with (a fingerprint in `manifest.json`),
keeps every readable chunk and simulates only the missing ones. Every order is simulated
independently, so a resumed job gives the same numbers as an uninterrupted one.

Folder layout: `manifest.json` (format, N, chunk size, fingerprint) and
`chunk-000000.npz`, ... (plain arrays, read without pickle; each names its order range and
the sha256 of its orders).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from surrogate import diagnostics as diag_lib
from surrogate import model as model_lib
from surrogate import optim
from surrogate.errors import DataError
from surrogate.jsonl import atomic_write
from surrogate.orders import order_sha256
from surrogate.simulate import (
  SHARED,
  OrderAxes,
  Sharing,
  SimData,
  SimPlan,
  Trajectory,
  default_chunk_size,
  simulate_many,
)

FORMAT = "surrogate-results/1"
_DIAG_FIELDS = diag_lib.Diagnostics._fields


class ResultsError(DataError):
  """A results folder is missing, truncated, tampered with, or from other inputs."""


def fingerprint(params0, knobs: optim.Knobs, orders_NxTxB, lr_NxT, data: SimData, *,
                model_cfg: model_lib.ModelConfig, opt_cfg: optim.OptimizerConfig,
                plan: SimPlan, chunk_size: int) -> str:
  """sha256 of everything that determines the results (arrays by their bytes)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves((params0, knobs, data)):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(str((a.dtype, a.shape)).encode())
    h.update(a.tobytes())
  for a in (np.asarray(orders_NxTxB, np.int32), np.asarray(lr_NxT, np.float32)):
    h.update(str(a.shape).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  h.update(json.dumps([dataclasses.asdict(model_cfg), opt_cfg.to_dict(),
                       dataclasses.asdict(plan), chunk_size], sort_keys=True).encode())
  return h.hexdigest()


def _chunk_path(folder: str, i: int) -> str:
  return os.path.join(folder, f"chunk-{i:06d}.npz")


def _write_chunk(path: str, start: int, orders: np.ndarray, out: Trajectory) -> None:
  arrays = {"start": np.int64(start), "stop": np.int64(start + len(orders)),
            "orders_sha256": np.array(order_sha256(orders)),
            "eval_loss_CxM": out.eval_loss_CxM, "train_loss_T": out.train_loss_T,
            "diverged_step": out.diverged_step, "grad_push_CxF": out.grad_push_CxF}
  if out.diagnostics is not None:
    arrays.update({f"diag_{k}": v for k, v in out.diagnostics._asdict().items()})
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  atomic_write(path, buf.getvalue())


def _read_chunk(path: str, start: int, orders: np.ndarray) -> Trajectory:
  """A chunk's results; raises ResultsError if unreadable or not for these orders."""
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except FileNotFoundError:
    raise ResultsError("chunk file is missing", path=path) from None
  except Exception as e:  # zipfile/npz errors of a truncated or altered file
    raise ResultsError(f"unreadable chunk ({type(e).__name__}: {e})", path=path) from None
  try:
    ok = (int(arrays["start"]) == start and int(arrays["stop"]) == start + len(orders)
          and str(arrays["orders_sha256"]) == order_sha256(orders))
    diag = None
    if "diag_embedding_drift" in arrays:
      diag = diag_lib.Diagnostics(*(arrays[f"diag_{k}"] for k in _DIAG_FIELDS))
    traj = Trajectory(arrays["eval_loss_CxM"], arrays["train_loss_T"], diag,
                      arrays["diverged_step"], arrays["grad_push_CxF"])
  except KeyError as e:
    raise ResultsError(f"chunk lacks the array {e.args[0]!r}", path=path) from None
  except (TypeError, ValueError) as e:
    raise ResultsError(f"malformed chunk ({e})", path=path) from None
  if not ok or len(traj.eval_loss_CxM) != len(orders):
    raise ResultsError("chunk holds results of other orders", path=path)
  return traj


class ProcessShare(NamedTuple):
  """Which share of a streamed simulation this process takes (see `simulate_to_folder`).

  index, count: process i of n simulates the chunks c with c % n == i; None: from
    `jax.distributed` (`jax.process_index()`, `jax.process_count()`).
  wait_s: how long to wait for the other processes' chunks before giving up.
  """
  index: int | None = None
  count: int | None = None
  wait_s: float = 86400.0


def simulate_to_folder(folder: str | os.PathLike, params0, knobs: optim.Knobs, orders_NxTxB,
                       lr_NxT, data: SimData, *, model_cfg: model_lib.ModelConfig,
                       opt_cfg: optim.OptimizerConfig, plan: SimPlan,
                       chunk_size: int | None = None, resume: bool = False,
                       devices: Sequence[jax.Device] | None = None,
                       progress: bool = True, processes: ProcessShare = ProcessShare(),
                       sharing: Sharing = Sharing.AUTO,
                       axes: OrderAxes = SHARED) -> Trajectory:
  """`simulate_many`, with each chunk's results written to `folder` as it finishes.

  Several processes (hosts) share the work through the folder: process i of n simulates
  the chunks c with c % n == i on its local devices, then waits for the others' chunk files
  and returns the whole result. Orders are independent, so no collective communication is
  needed, only a folder every process sees. By default i and n come from `jax.distributed`
  (`jax.process_index()`, `jax.process_count()`: 0 of 1 on a single host).

  Args:
    folder: where results go; created if needed. Without `resume` it must hold no results.
    params0 ... plan: as for `simulate_many` (params0 and knobs may carry an N axis).
    chunk_size: orders per chunk file and per compiled call. Default: files of 64 orders
      (or `default_chunk_size`, if larger), simulated in calls of `default_chunk_size`.
    resume: keep the chunks already in `folder` and simulate only the missing ones.
    devices, progress: as for `simulate_many`.
    processes: this process's share of the chunks, and how long to wait for the others'
      (`ProcessShare`, see above).
    sharing: as for `simulate_many`, within each chunk file.
    axes: which of `params0` and `knobs` carry an order axis, as for `simulate_many`.

  Returns:
    The whole `Trajectory` (numpy), read back from the chunk files.

  Raises:
    ResultsError: the folder holds results of other inputs, or results without `resume`.
  """
  folder = os.fspath(folder)
  index = jax.process_index() if processes.index is None else processes.index
  count = jax.process_count() if processes.count is None else processes.count
  if not 0 <= index < count:
    raise ValueError(f"ProcessShare index {index} is not in [0, {count})")
  orders = np.asarray(orders_NxTxB, np.int32)
  n, steps = orders.shape[:2]
  lrs = np.broadcast_to(np.asarray(lr_NxT, np.float32), (n, steps))
  devices = list(devices or jax.local_devices())
  call = max(1, chunk_size or default_chunk_size(devices))
  chunk = max(1, chunk_size or max(64, call))
  fp = fingerprint(params0, knobs, orders, lrs, data, model_cfg=model_cfg, opt_cfg=opt_cfg,
                   plan=plan, chunk_size=chunk)
  manifest_path = os.path.join(folder, "manifest.json")
  manifest = {"format": FORMAT, "num_orders": n, "chunk_size": chunk, "fingerprint": fp}
  os.makedirs(folder, exist_ok=True)
  if count > 1 and index > 0:
    # Process 0 writes the manifest; the others wait for it, then check it is theirs.
    _wait_for(lambda: os.path.exists(manifest_path), processes.wait_s, manifest_path)
    if _read_manifest(manifest_path).get("fingerprint") != fp:
      raise ResultsError("process 0 started these results with other inputs", path=manifest_path)
  elif os.path.exists(manifest_path):
    if not resume:
      raise ResultsError("results already exist here; pass resume=True (--resume) to "
                         "continue them, or choose another folder", path=manifest_path)
    old = _read_manifest(manifest_path)
    if old.get("fingerprint") != fp:
      raise ResultsError("these results were started with other inputs (orders, data, model, "
                         "optimizer, plan or chunk size); cannot resume them", path=manifest_path)
    for name in os.listdir(folder):  # half-written chunks of a killed job
      if name.startswith(".chunk-") and name.endswith(".tmp"):
        os.remove(os.path.join(folder, name))
  else:
    if any(name.startswith("chunk-") for name in os.listdir(folder)):
      raise ResultsError("chunk files without a manifest: results of an unknown job; "
                         "choose an empty folder", path=folder)
    atomic_write(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())

  per_order_params, per_order_knobs = axes.params == 0, axes.knobs == 0
  starts = list(range(0, n, chunk))
  todo = []
  for i, start in enumerate(starts):
    if i % count != index:
      continue
    sel = slice(start, min(start + chunk, n))
    try:
      _read_chunk(_chunk_path(folder, i), start, orders[sel])
    except ResultsError:
      todo.append(i)
  from tqdm.auto import tqdm
  bar = tqdm(total=n, initial=n - sum(min(chunk, n - starts[i]) for i in todo), unit="order",
             desc="simulating", disable=not progress, leave=False)
  for i in todo:
    start = starts[i]
    idx = np.arange(start, min(start + chunk, n))
    real = len(idx)
    # A short last chunk is padded with copies of its first order to a whole call: one
    # compiled shape for every chunk.
    idx = np.concatenate([idx, np.full(max(0, call - real), start)])
    take = lambda tree: jax.tree.map(lambda a: np.asarray(a)[idx], tree)  # noqa: E731
    out = simulate_many(take(params0) if per_order_params else params0,
                        take(knobs) if per_order_knobs else knobs, orders[idx], lrs[idx], data,
                        model_cfg=model_cfg, opt_cfg=opt_cfg, plan=plan, chunk_size=call,
                        devices=devices, progress=False, sharing=sharing, axes=axes)
    out = jax.tree.map(lambda a: np.asarray(a)[:real], out)
    _write_chunk(_chunk_path(folder, i), start, orders[start:start + real], out)
    bar.update(real)
  bar.close()
  if count > 1:
    paths = [_chunk_path(folder, i) for i in range(len(starts))]
    _wait_for(lambda: all(os.path.exists(p) for p in paths), processes.wait_s, folder)
  return load_results(folder, orders)


def _wait_for(ready, wait_s: float, path: str) -> None:
  import time
  deadline = time.monotonic() + wait_s
  while not ready():
    if time.monotonic() > deadline:
      raise ResultsError(f"gave up after {wait_s:.0f} s waiting for the other processes' "
                         "results", path=path)
    time.sleep(0.2)


def _read_manifest(path: str) -> dict:
  try:
    with open(path, "rb") as f:
      manifest = json.loads(f.read().decode("utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ResultsError(f"unreadable manifest ({e})", path=path) from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ResultsError(f"not a results manifest (format should be {FORMAT!r})", path=path,
                       field="format")
  return manifest


def load_results(folder: str | os.PathLike, orders_NxTxB) -> Trajectory:
  """Reads a complete results folder for `orders_NxTxB`; raises ResultsError naming the file
  if a chunk is missing, truncated, altered, or holds other orders."""
  folder = os.fspath(folder)
  manifest = _read_manifest(os.path.join(folder, "manifest.json"))
  orders = np.asarray(orders_NxTxB, np.int32)
  n, chunk = int(manifest["num_orders"]), int(manifest["chunk_size"])
  if n != len(orders):
    raise ResultsError(f"holds {n} orders, not {len(orders)}",
                       path=os.path.join(folder, "manifest.json"))
  parts = [_read_chunk(_chunk_path(folder, i), start, orders[start:start + chunk])
           for i, start in enumerate(range(0, n, chunk))]
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
