"""Recording a real run, from any training loop, as a RunLog v1 file.

`Recorder` is the plain recorder for a PyTorch, optax/flax or any other loop:

    with Recorder("runs/r0.jsonl", fragments, run_id="r0", model="gpt2-small",
                  optimizer={"name": "adamw", "lr": 1e-3}, batch_size=16) as rec:
      rec.eval(0, losses_before_training)          # {example id: mean token loss}
      for batch_ids in order:
        loss = train_step(batch_ids)
        rec.step(batch_ids, loss, lr)
        if rec.num_steps % 25 == 0:
          rec.eval(rec.num_steps, evaluate())

Every record is checked, then written and flushed at once, so a run killed at any moment
leaves a valid, readable prefix. Bad input (an id not in the fragments file, a probe
example fed, a non-finite loss, a step out of order) raises `RunLogError` and writes nothing
of the bad record. The Hugging Face integration is in `calibrate.io.hf`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from calibrate.io.runlog import RunLogWriter
from surrogate.fragments import Fragments


class Recorder:
  """Writes one run's RunLog as it happens: steps (batch ids, loss, lr) and evals.

  Args:
    path: the RunLog file to create (an existing file is an error unless `overwrite`).
    fragments: the fragments file the run feeds; its sha256 goes in the header and every id
      is checked against it.
    run_id, model, optimizer, batch_size, seed: header fields (DESIGN.md, RunLog v1);
      `optimizer` needs `name` (adamw | adam | sgd) and `lr`, with the run's schedule.
    fsync: fsync every record (durable against power loss, slower).
    overwrite: replace an existing file.
    **extra: further header keys (e.g. `loss_on="completion"`, notes), kept in the file.
  """

  def __init__(self, path: str | os.PathLike, fragments: Fragments, *, run_id: str, model: str,
               optimizer: Mapping[str, Any], batch_size: int, seed: int | None = None,
               fsync: bool = False, overwrite: bool = False, **extra: Any):
    header = {"run_id": run_id, "model": model, "optimizer": dict(optimizer),
              "batch_size": batch_size, "seed": seed, **extra}
    self._writer = RunLogWriter(path, header, fragments, fsync=fsync, overwrite=overwrite)
    self.path = self._writer.path

  @classmethod
  def resume(cls, path: str | os.PathLike, fragments: Fragments, *, at_step: int,
             fsync: bool = False) -> Recorder:
    """Continues a run restarted from a checkpoint taken after `at_step` steps: the log's
    steps from `at_step` on and evals after it are dropped (the restarted run records them
    again), atomically, and recording goes on after them.

    Raises:
      RunLogError: the log is damaged or has fewer than `at_step` steps.
    """
    self = cls.__new__(cls)
    self._writer = RunLogWriter.resume(path, fragments, at_step=at_step, fsync=fsync)
    self.path = self._writer.path
    return self

  @property
  def num_steps(self) -> int:
    """Optimizer steps recorded so far (the next step's index)."""
    return self._writer.num_steps

  def step(self, example_ids: Sequence[str], loss: Any, lr: Any = None, *,
           step: int | None = None) -> int:
    """Records one optimizer step; returns its index.

    Args:
      example_ids: the ids of the batch fed at this step (train examples).
      loss: the step's training loss (a float or a scalar tensor/array); must be finite.
      lr: the learning rate used at this step, or None.
      step: the step's index, checked against the steps recorded so far (optional).

    Raises:
      RunLogError: unknown or probe id, non-finite loss, or a step out of order.
    """
    t = self.num_steps if step is None else step
    # The writer turns numpy/jax/torch scalars into floats and refuses non-finite ones.
    self._writer.step(t, list(example_ids), loss=loss, lr=lr)
    return t

  def eval(self, step: int, losses: Mapping[str, Any], *,
           diagnostics: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Records per-example losses measured after `step` optimizer steps (0 = before training).

    Args:
      step: optimizer steps taken.
      losses: example id -> mean token loss.
      diagnostics: the five diagnostics of the model now, per fragment
        (`calibrate.io.diagnostics.RealDiagnostics.measure`), or None.

    Raises:
      RunLogError: unknown id or fragment, non-finite loss, or a step beyond those recorded.
    """
    self._writer.eval(step, dict(losses), diagnostics=diagnostics)

  def close(self) -> None:
    self._writer.close()

  def __enter__(self) -> Recorder:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
