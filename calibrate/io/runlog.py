"""RunLog v1 I/O: what a real run fed and measured, or (without evals) an order to simulate.

The file format (JSON Lines, one record a line) is the contract in DESIGN.md, "RunLog v1":

  {"type": "header", "format": "surrogate-runlog/1", "run_id": "blocked-s0",
   "dataset_sha256": "<sha256 of fragments.jsonl>", "model": "gpt2-2x128",
   "optimizer": {"name": "adamw", "lr": 0.001}, "batch_size": 16, "seed": 0}
  {"type": "step", "step": 0, "examples": ["art/train/17", "..."], "loss": 9.04, "lr": 0.001}
  {"type": "eval", "step": 0, "losses": {"art/probe/3": 9.01}}

Axes: T steps, B batch (the longest batch in a log).

Readers here must never fail with anything but `RunLogError` (or `OSError` for a file that cannot
be opened), whatever the bytes: the error names the file, the 1-based line and the field. The
writer checks each record with the reader's rules before writing it, so a run killed at any
point leaves a file that reads back (at worst with its last, half-written line dropped).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn

import numpy as np

from surrogate.errors import RunLogError
from surrogate.fragments import Fragments, Split
from surrogate.jsonl import (
  atomic_write,
  decode_line,
  is_blank,
  json_line,
  json_type,
  parse_object,
  short,
  split_lines,
  valid_unicode,
)

__all__ = [
    "FORMAT",
    "EvalRecord",
    "RunHeader",
    "RunLog",
    "RunLogWriter",
    "StepRecord",
    "learning_rates_from_runlog",
    "order_from_runlog",
    "read_runlog",
    "run_learning_rates",
    "write_runlog",
]

FORMAT = "surrogate-runlog/1"

_HEADER_KEYS = ("type", "format", "run_id", "dataset_sha256", "model", "optimizer",
                "batch_size", "seed")
_STEP_KEYS = ("type", "step", "examples", "loss", "lr")
_EVAL_KEYS = ("type", "step", "losses", "diagnostics")
# The optional eval field `diagnostics` (DESIGN.md): the simulator's five, on the real model.
DIAGNOSTIC_NAMES = ("embedding_drift", "attention_shift", "plasticity", "logit_shift",
                    "robustness")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")

_OPTIMIZER_NAMES = ("adamw", "adam", "sgd")
_SCHEDULES = ("constant", "linear", "cosine")
_OPTIMIZER_NONNEGATIVE = ("weight_decay", "eps", "momentum", "grad_clip", "final_lr_fraction")


@dataclasses.dataclass(frozen=True)
class RunHeader:
  """The first record of a RunLog: what was trained, on what, with which optimizer.

  Attributes:
    run_id: a name for the run.
    dataset_sha256: hex sha256 of the fragments file's bytes.
    model: the real model's name (free text).
    optimizer: `name` (adamw | adam | sgd) and `lr` required; optional `weight_decay`, `betas`,
      `eps`, `momentum`, `grad_clip`, `warmup_steps`, `schedule` (constant | linear | cosine),
      `final_lr_fraction`; unknown keys are kept.
    batch_size: examples per optimizer step (> 0).
    seed: the real run's seed, or None.
    extra: unknown header keys (e.g. `loss_on`), kept and ignored; ignored by `==`.
  """
  run_id: str
  dataset_sha256: str
  model: str
  optimizer: dict[str, Any]
  batch_size: int
  seed: int | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """One optimizer step: the example ids fed and, in a real run, the loss and rate used.

  Attributes:
    step: 0-based optimizer step; steps are contiguous 0..T-1.
    examples: the ids of the batch's examples (train examples only).
    loss: the training loss of the step, or None (order files).
    lr: the learning rate actually used (wins over the header's schedule), or None.
    extra: unknown keys, kept and ignored; ignored by `==`.
  """
  step: int
  examples: tuple[str, ...]
  loss: float | None = None
  lr: float | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

  def __post_init__(self):
    if not isinstance(self.examples, tuple) and not isinstance(self.examples, str):
      object.__setattr__(self, "examples", tuple(self.examples))


@dataclasses.dataclass(frozen=True)
class EvalRecord:
  """Per-example losses measured after `step` optimizer steps (step 0 = before training).

  Attributes:
    step: number of steps taken before the evaluation, in [0, T].
    losses: example id -> mean token cross-entropy (completion tokens only for prompt/completion).
    diagnostics: fragment -> {diagnostic name -> value (None where undefined)}, the five
      diagnostics measured on the real model at this step (`DIAGNOSTIC_NAMES`), or None.
    extra: unknown keys, kept and ignored; ignored by `==`.
  """
  step: int
  losses: dict[str, float]
  diagnostics: dict[str, dict[str, float | None]] | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass(frozen=True)
class RunLog:
  """A whole RunLog: header, T step records, evals in nondecreasing step order.

  Attributes:
    header: the run's header.
    steps: the T step records, step t at position t.
    evals: the evaluations, in nondecreasing step order.
    path: the file it was read from, or None; ignored by `==`.
  """
  header: RunHeader
  steps: tuple[StepRecord, ...] = ()
  evals: tuple[EvalRecord, ...] = ()
  path: str | None = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    object.__setattr__(self, "steps", tuple(self.steps))
    object.__setattr__(self, "evals", tuple(self.evals))
    if self.path is not None:
      object.__setattr__(self, "path", os.fspath(self.path))

  @property
  def num_steps(self) -> int:
    """T, the number of optimizer steps."""
    return len(self.steps)

  @property
  def is_order_file(self) -> bool:
    """Whether the log has no evals: an order to simulate rather than a measured run."""
    return not self.evals

  @property
  def eval_steps(self) -> tuple[int, ...]:
    """The step of each eval record, parallel to `evals` (repeats if a step has two records)."""
    return tuple(e.step for e in self.evals)


# ----------------------------------------------------------------------------------------------
# Checking records: one set of rules for the reader, the writer and write_runlog.


def _fail(reason: str, path: str | None, line: int | None, field: str | None = None) -> NoReturn:
  raise RunLogError(reason, path=path, line=line, field=field)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: Any, path: str | None, line: int, field: str, *,
            minimum: float | None = None, strict: bool = False, what: str = "") -> float:
  """Returns v as a float, or fails unless it is a finite number (>= / > minimum if given).

  Args:
    v: the parsed JSON value.
    path: named in errors.
    line: named in errors.
    field: named in errors.
    minimum: the lower bound, if any.
    strict: whether the bound is exclusive.
    what: what the value is, to start the reason with (e.g. "loss of 'a/p/0' "); the field
      is named anyway.

  Returns:
    The value as a float.
  """
  if not _is_number(v):
    _fail(f"{what}must be a number, got {json_type(v)}", path, line, field)
  try:
    x = float(v)
  except OverflowError:  # an integer too large for a float
    _fail(f"{what}is out of range", path, line, field)
  if not math.isfinite(x):
    _fail(f"{what}must be a finite number, got {x!r}", path, line, field)
  if minimum is not None and (x <= minimum if strict else x < minimum):
    _fail(f"{what}must be {'>' if strict else '>='} {minimum}, got {x!r}", path, line, field)
  return x


def _string(rec: Mapping[str, Any], key: str, path: str | None, line: int) -> str:
  if key not in rec:
    _fail("missing required field", path, line, key)
  v = rec[key]
  if not isinstance(v, str):
    _fail(f"must be a string, got {json_type(v)}", path, line, key)
  if not v:
    _fail("must not be empty", path, line, key)
  if not valid_unicode(v):
    _fail("contains a lone surrogate (not valid Unicode)", path, line, key)
  return v


def _check_optimizer(opt: Any, path: str | None, line: int) -> dict[str, Any]:
  """Checks the header's optimizer object; unknown keys are kept."""
  if not isinstance(opt, dict):
    _fail(f"must be an object, got {json_type(opt)}", path, line, "optimizer")
  if "name" not in opt:
    _fail("missing required field", path, line, "optimizer.name")
  if not isinstance(opt["name"], str) or opt["name"] not in _OPTIMIZER_NAMES:
    _fail(f"must be one of {', '.join(_OPTIMIZER_NAMES)}, got {short(opt['name'])}",
          path, line, "optimizer.name")
  if "lr" not in opt:
    _fail("missing required field", path, line, "optimizer.lr")
  _finite(opt["lr"], path, line, "optimizer.lr", minimum=0.0, strict=True)
  for key in _OPTIMIZER_NONNEGATIVE:
    if key in opt:
      _finite(opt[key], path, line, f"optimizer.{key}", minimum=0.0)
  if "betas" in opt:
    betas = opt["betas"]
    if not isinstance(betas, list) or len(betas) != 2:
      _fail("must be a list of two numbers", path, line, "optimizer.betas")
    for b in betas:
      if _finite(b, path, line, "optimizer.betas", minimum=0.0) >= 1.0:
        _fail(f"each beta must be in [0, 1), got {short(b)}", path, line, "optimizer.betas")
  if "warmup_steps" in opt:
    w = opt["warmup_steps"]
    if not _is_int(w) or w < 0:
      _fail(f"must be an integer >= 0, got {short(w)}", path, line, "optimizer.warmup_steps")
  if "schedule" in opt and opt["schedule"] not in _SCHEDULES:
    _fail(f"must be one of {', '.join(_SCHEDULES)}, got {short(opt['schedule'])}",
          path, line, "optimizer.schedule")
  return dict(opt)


class _Checker:
  """Checks records in file order and builds the RunLog; state changes only on success."""

  def __init__(self, path: str | None, fragments: Fragments | None):
    self.path = path
    self.fragments = fragments
    self.header: RunHeader | None = None
    self.header_line: int | None = None
    self.steps: list[StepRecord] = []
    self.evals: list[EvalRecord] = []
    self.eval_lines: list[int] = []

  def feed(self, rec: Mapping[str, Any], line: int) -> RunHeader | StepRecord | EvalRecord:
    """Checks one record against the rules and what came before, and takes it in."""
    parsed = self.check(rec, line)
    self.commit(parsed, line)
    return parsed

  def commit(self, parsed: RunHeader | StepRecord | EvalRecord, line: int) -> None:
    """Takes in a record that `check` returned."""
    if isinstance(parsed, RunHeader):
      self.header, self.header_line = parsed, line
    elif isinstance(parsed, StepRecord):
      self.steps.append(parsed)
    else:
      self.evals.append(parsed)
      self.eval_lines.append(line)

  def check(self, rec: Mapping[str, Any], line: int) -> RunHeader | StepRecord | EvalRecord:
    """Checks one record against the rules and what came before; returns it parsed."""
    path = self.path
    if "type" not in rec:
      _fail("missing required field", path, line, "type")
    kind = rec["type"]
    if kind not in ("header", "step", "eval"):
      _fail(f"unknown record type {short(kind)} (expected header, step or eval)", path, line,
            "type")
    if self.header is None and kind != "header":
      _fail(f"the first record must be the header, got a {kind!r} record", path, line, "type")
    if kind == "header":
      if self.header is not None:
        _fail(f"a second header (the first is on line {self.header_line})", path, line, "type")
      return self._header(rec, line)
    if kind == "step":
      return self._step(rec, line)
    return self._eval(rec, line)

  def finish(self) -> RunLog:
    """Checks what needs the whole file (a header; eval steps <= T) and returns the RunLog."""
    if self.header is None:
      _fail("no header record: the file holds no complete record", self.path, None)
    for ev, line in zip(self.evals, self.eval_lines):
      if ev.step > len(self.steps):
        _fail(f"eval at step {ev.step}, but the log has only {len(self.steps)} steps",
              self.path, line, "step")
    return RunLog(header=self.header, steps=tuple(self.steps), evals=tuple(self.evals),
                  path=self.path)

  def _header(self, rec: Mapping[str, Any], line: int) -> RunHeader:
    path = self.path
    if "format" not in rec:
      _fail("missing required field", path, line, "format")
    if rec["format"] != FORMAT:
      _fail(f"unsupported format {short(rec['format'])} (this reader knows {FORMAT!r})",
            path, line, "format")
    run_id = _string(rec, "run_id", path, line)
    sha = _string(rec, "dataset_sha256", path, line)
    if not _SHA256.fullmatch(sha):
      _fail(f"must be 64 hex digits, got {short(sha)}", path, line, "dataset_sha256")
    model = _string(rec, "model", path, line)
    if "optimizer" not in rec:
      _fail("missing required field", path, line, "optimizer")
    optimizer = _check_optimizer(rec["optimizer"], path, line)
    if "batch_size" not in rec:
      _fail("missing required field", path, line, "batch_size")
    batch_size = rec["batch_size"]
    if not _is_int(batch_size) or batch_size <= 0:
      _fail(f"must be an integer > 0, got {short(batch_size)}", path, line, "batch_size")
    seed = rec.get("seed")
    if seed is not None and not _is_int(seed):
      _fail(f"must be an integer or null, got {json_type(seed)}", path, line, "seed")
    if self.fragments is not None and sha.lower() != self.fragments.sha256:
      _fail(f"is {sha} but the fragments file {self.fragments.path or '<in memory>'} has "
            f"sha256 {self.fragments.sha256}: the log was made on other data",
            path, line, "dataset_sha256")
    return RunHeader(run_id=run_id, dataset_sha256=sha, model=model, optimizer=optimizer,
                     batch_size=batch_size, seed=seed,
                     extra={k: v for k, v in rec.items() if k not in _HEADER_KEYS})

  def _known_id(self, example_id: Any, line: int, field: str, *, train: bool) -> str:
    path = self.path
    if not isinstance(example_id, str):
      _fail(f"example ids must be strings, got {json_type(example_id)}", path, line, field)
    if not example_id:
      _fail("example ids must not be empty", path, line, field)
    if not valid_unicode(example_id):
      _fail("example id contains a lone surrogate (not valid Unicode)", path, line, field)
    if self.fragments is not None:
      position = self.fragments.index.get(example_id)
      if position is None:
        _fail(f"example id {short(example_id)} is not in the fragments file", path, line,
              field)
      if train and self.fragments.examples[position].split != Split.TRAIN:
        _fail(f"example {short(example_id)} is a probe example; probes are never fed",
              path, line, field)
    return example_id

  def _step(self, rec: Mapping[str, Any], line: int) -> StepRecord:
    path = self.path
    if "step" not in rec:
      _fail("missing required field", path, line, "step")
    step = rec["step"]
    if not _is_int(step):
      _fail(f"must be an integer, got {json_type(step)}", path, line, "step")
    if step != len(self.steps):
      _fail(f"steps must be contiguous from 0 in file order: expected step {len(self.steps)}, "
            f"got {step}", path, line, "step")
    if "examples" not in rec:
      _fail("missing required field", path, line, "examples")
    examples = rec["examples"]
    if not isinstance(examples, list):
      _fail(f"must be a list of example ids, got {json_type(examples)}", path, line, "examples")
    if not examples:
      _fail("must not be empty", path, line, "examples")
    ids = tuple(self._known_id(e, line, "examples", train=True) for e in examples)
    # null reads as absent: recorders write None for what they did not measure.
    loss = rec.get("loss")
    if loss is not None:
      loss = _finite(loss, path, line, "loss")
    lr = rec.get("lr")
    if lr is not None:
      lr = _finite(lr, path, line, "lr", minimum=0.0)
    return StepRecord(step=step, examples=ids, loss=loss, lr=lr,
                      extra={k: v for k, v in rec.items() if k not in _STEP_KEYS})

  def _eval(self, rec: Mapping[str, Any], line: int) -> EvalRecord:
    path = self.path
    if "step" not in rec:
      _fail("missing required field", path, line, "step")
    step = rec["step"]
    if not _is_int(step):
      _fail(f"must be an integer, got {json_type(step)}", path, line, "step")
    if step < 0:
      _fail(f"must be >= 0, got {step}", path, line, "step")
    if self.evals and step < self.evals[-1].step:
      _fail(f"evals must be in nondecreasing step order: step {step} after step "
            f"{self.evals[-1].step} (line {self.eval_lines[-1]})", path, line, "step")
    if "losses" not in rec:
      _fail("missing required field", path, line, "losses")
    losses = rec["losses"]
    if not isinstance(losses, dict):
      _fail(f"must be an object of example id -> loss, got {json_type(losses)}",
            path, line, "losses")
    if not losses:
      _fail("must not be empty", path, line, "losses")
    out = {}
    for example_id, value in losses.items():
      self._known_id(example_id, line, "losses", train=False)
      out[example_id] = _finite(value, path, line, "losses",
                                what=f"loss of {short(example_id)} ")
    diags = self._diagnostics(rec["diagnostics"], line) if "diagnostics" in rec else None
    return EvalRecord(step=step, losses=out, diagnostics=diags,
                      extra={k: v for k, v in rec.items() if k not in _EVAL_KEYS})

  def _diagnostics(self, diags: Any, line: int) -> dict[str, dict[str, float | None]]:
    path = self.path
    if not isinstance(diags, dict):
      _fail(f"must be an object of fragment -> diagnostics, got {json_type(diags)}",
            path, line, "diagnostics")
    names = set(self.fragments.names) if self.fragments is not None else None
    out = {}
    for frag, values in diags.items():
      where = f"diagnostics.{frag}"
      if names is not None and frag not in names:
        _fail(f"fragment {short(frag)} is not in the fragments file", path, line, where)
      if not isinstance(values, dict):
        _fail(f"must be an object of diagnostic -> value, got {json_type(values)}",
              path, line, where)
      for name, value in values.items():
        if name not in DIAGNOSTIC_NAMES:
          _fail(f"unknown diagnostic {short(name)} (expected one of "
                f"{', '.join(DIAGNOSTIC_NAMES)})", path, line, where)
      out[frag] = {name: None if v is None else _finite(v, path, line, f"{where}.{name}")
                   for name, v in values.items()}
    return out


# ----------------------------------------------------------------------------------------------
# Reading.


def read_runlog(path: str | os.PathLike, fragments: Fragments | None = None, *,
                allow_truncated_tail: bool = True) -> RunLog:
  """Reads and validates a RunLog (DESIGN.md, "RunLog v1").

  Args:
    path: the JSON Lines file.
    fragments: when given, the header's `dataset_sha256` must be its sha256, every id must be
      one of its examples, and step examples must be train examples.
    allow_truncated_tail: drop, with a `UserWarning`, a last line that is not valid JSON and has
      no newline after it (a run killed mid-write); when False, such a line is an error.

  Returns:
    The RunLog, with `path` as given.

  Raises:
    RunLogError: the content breaks a rule; names the path, 1-based line and field.
    OSError: the file cannot be read.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  lines = split_lines(data)
  unterminated = len(lines) if data and not data.endswith(b"\n") else None
  checker = _Checker(path, fragments)
  for i, raw in enumerate(lines):
    line = i + 1
    try:
      text = decode_line(raw, error=RunLogError, path=path, line=line)
      if is_blank(text):
        continue
      rec = parse_object(text, error=RunLogError, path=path, line=line)
    except RunLogError as e:
      # Only a last line cut off mid-write is forgiven; anything else is damage.
      if line == unterminated and allow_truncated_tail:
        warnings.warn(f"{path}, line {line}: dropped an incomplete last record (the run was "
                      f"probably killed while writing it): {e.reason}", UserWarning,
                      stacklevel=2)
        break
      if line == unterminated:
        raise RunLogError(f"{e.reason} (an incomplete last record; pass "
                          "allow_truncated_tail=True to drop it)", path=path, line=line,
                          field=e.field) from None
      raise
    checker.feed(rec, line)
  return checker.finish()


# ----------------------------------------------------------------------------------------------
# Writing.


def _plain_int(v: Any) -> Any:
  """numpy / jax integer scalars -> int; anything else unchanged, for the checker to judge."""
  if isinstance(v, (bool, np.bool_, str, bytes)):
    return v
  try:
    return operator.index(v)
  except TypeError:
    return v


def _plain_float(v: Any) -> Any:
  """numpy / jax real scalars -> float; anything else unchanged, for the checker to judge."""
  if isinstance(v, (bool, np.bool_, str, bytes)) or _is_number(v):
    return v
  if isinstance(v, numbers.Real) or (hasattr(v, "__float__")
                                     and getattr(v, "shape", None) == ()):
    try:
      # `.item()` reads a torch loss that still requires grad without a warning.
      return float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError, OverflowError):
      return v
  return v


def _ids(examples: Any) -> Any:
  if isinstance(examples, (str, bytes)) or not isinstance(examples, Iterable):
    return examples  # the checker says it must be a list
  return [str(e) if isinstance(e, np.str_) else e for e in examples]


def _with_extra(rec: dict[str, Any], extra: Mapping[str, Any] | None, known: tuple[str, ...],
                path: str | None, line: int) -> dict[str, Any]:
  """Appends extra keys to a record, refusing any that the format gives a meaning."""
  if extra is None:
    return rec
  if not isinstance(extra, Mapping):
    _fail(f"extra must be a mapping, got {type(extra).__name__}", path, line, "extra")
  for key, value in extra.items():
    if not isinstance(key, str):
      _fail(f"extra key {short(key)} is not a string", path, line, "extra")
    if key in known:
      _fail(f"extra key {short(key)} clashes with a field of the format", path, line, key)
    rec[key] = value
  return rec


def _header_record(header: RunHeader | Mapping[str, Any], fragments: Fragments | None,
                   path: str | None) -> dict[str, Any]:
  """The header as a file record, keys in file order, numpy scalars made plain."""
  if isinstance(header, RunHeader):
    fields = {"run_id": header.run_id, "dataset_sha256": header.dataset_sha256,
              "model": header.model, "optimizer": header.optimizer,
              "batch_size": header.batch_size, "seed": header.seed}
    extra = dict(header.extra)
  elif isinstance(header, Mapping):
    fields = {k: header[k] for k in _HEADER_KEYS[2:] if k in header}
    extra = {k: v for k, v in header.items() if k not in _HEADER_KEYS}
  else:
    raise TypeError(f"header must be a RunHeader or a mapping, got {type(header).__name__}")
  rec: dict[str, Any] = {"type": "header", "format": FORMAT}
  if isinstance(header, Mapping):  # a wrong type or format given by the caller is reported
    rec["type"] = header.get("type", "header")
    rec["format"] = header.get("format", FORMAT)
  if fragments is not None and not fields.get("dataset_sha256"):
    fields["dataset_sha256"] = fragments.sha256
  for key in _HEADER_KEYS[2:]:
    if key not in fields or (key == "seed" and fields[key] is None):
      continue
    value = fields[key]
    if key in ("batch_size", "seed"):
      value = _plain_int(value)
    elif key == "optimizer" and isinstance(value, Mapping):
      value = {k: (_plain_int(v) if k == "warmup_steps"
                   else [_plain_float(b) for b in v]
                   if k == "betas" and isinstance(v, (list, tuple))
                   else _plain_float(v)) for k, v in value.items()}
    rec[key] = value
  return _with_extra(rec, extra, _HEADER_KEYS, path, 1)


def _step_record(step: Any, examples: Any, loss: Any, lr: Any,
                 extra: Mapping[str, Any] | None, path: str | None, line: int) -> dict[str, Any]:
  rec: dict[str, Any] = {"type": "step", "step": _plain_int(step), "examples": _ids(examples)}
  if loss is not None:
    rec["loss"] = _plain_float(loss)
  if lr is not None:
    rec["lr"] = _plain_float(lr)
  return _with_extra(rec, extra, _STEP_KEYS, path, line)


def _eval_record(step: Any, losses: Any, extra: Mapping[str, Any] | None, path: str | None,
                 line: int, diagnostics: Any = None) -> dict[str, Any]:
  if isinstance(losses, Mapping):
    losses = {(str(k) if isinstance(k, np.str_) else k): _plain_float(v)
              for k, v in losses.items()}
  rec: dict[str, Any] = {"type": "eval", "step": _plain_int(step), "losses": losses}
  if diagnostics is not None:
    # NaN (undefined, e.g. robustness without evaluated train examples) is written as null.
    rec["diagnostics"] = {
        f: ({k: (None if v is None or v != v else _plain_float(v)) for k, v in d.items()}
            if isinstance(d, Mapping) else d)
        for f, d in diagnostics.items()} if isinstance(diagnostics, Mapping) else diagnostics
  return _with_extra(rec, extra, _EVAL_KEYS, path, line)


class RunLogWriter:
  """Appends a RunLog record by record, checking each before it is written.

  Every record is one line, flushed when written (and fsynced with `fsync=True`), so a run
  killed at any point leaves a file `read_runlog` reads. A bad record raises `RunLogError`
  before anything of it is written; the file stays valid and writing may go on.

  Example:
    with RunLogWriter("run.jsonl", {"run_id": "r0", "model": "m", "batch_size": 2,
                                    "optimizer": {"name": "adamw", "lr": 1e-3}},
                      fragments) as log:
      log.eval(0, losses)
      log.step(0, ["a/train/0", "a/train/1"], loss=2.3, lr=1e-3)
  """

  def __init__(self, path: str | os.PathLike, header: RunHeader | Mapping[str, Any],
               fragments: Fragments | None = None, *, fsync: bool = False,
               overwrite: bool = False):
    """Checks the header and writes it as the file's first line.

    Args:
      path: the file to create.
      header: a RunHeader or a mapping of its fields (extra keys kept). `type` and `format`
        are added; `dataset_sha256` is taken from `fragments` when missing or empty.
      fragments: when given, the header's sha256 must match it and every id must be one of its
        examples (step ids: train examples).
      fsync: fsync after every record, not just flush (durable against power loss; slower).
      overwrite: replace an existing file; by default an existing file is an error, so a real
        run's log is never clobbered by accident.

    Raises:
      RunLogError: the header breaks a rule; no file is created.
      OSError: the file exists (without `overwrite`) or cannot be created.
    """
    self.path = os.fspath(path)
    self._fsync = fsync
    self._checker = _Checker(self.path, fragments)
    rec = _header_record(header, fragments, self.path)
    self.header: RunHeader = self._checker.feed(rec, 1)
    data = json_line(rec, error=RunLogError, path=self.path, line=1)
    self._file = open(self.path, "wb" if overwrite else "xb")
    self._line = 1
    self._write(data)

  @classmethod
  def resume(cls, path: str | os.PathLike, fragments: Fragments | None = None, *,
             at_step: int, fsync: bool = False) -> RunLogWriter:
    """Continues the RunLog of a run restarted from a checkpoint taken after `at_step` steps.

    Steps from `at_step` on and evals after it are dropped, since the restarted run records
    them again; the kept prefix is rewritten atomically (temp file, fsync, rename), so the
    file is a valid RunLog at every moment, and writing goes on after it.

    Raises:
      RunLogError: the log is damaged, or has fewer than `at_step` steps (it cannot be
        continued from that checkpoint).
    """
    path = os.fspath(path)
    old = read_runlog(path, fragments)
    if not _is_int(at_step) or not 0 <= at_step <= old.num_steps:
      raise RunLogError(f"cannot continue from a checkpoint at step {at_step}: the log has "
                        f"{old.num_steps} steps", path=path)
    kept = RunLog(old.header, old.steps[:at_step],
                  tuple(e for e in old.evals if e.step <= at_step))
    records = _records(kept, path)
    self = cls.__new__(cls)
    self.path, self._fsync = path, fsync
    self._checker = _Checker(path, fragments)
    chunks = []
    for i, rec in enumerate(records):
      parsed = self._checker.feed(rec, i + 1)
      if i == 0:
        self.header = parsed
      chunks.append(json_line(rec, error=RunLogError, path=path, line=i + 1))
    atomic_write(path, b"".join(chunks))
    self._line = len(records)
    self._file = open(path, "ab")
    return self

  @property
  def num_steps(self) -> int:
    """The number of step records written so far."""
    return len(self._checker.steps)

  @property
  def closed(self) -> bool:
    return self._file.closed

  def _write(self, data: bytes) -> None:
    self._file.write(data)
    self._file.flush()
    if self._fsync:
      os.fsync(self._file.fileno())

  def _append(self, rec: dict[str, Any]) -> None:
    if self._file.closed:
      raise ValueError(f"{self.path}: the RunLogWriter is closed")
    line = self._line + 1
    parsed = self._checker.check(rec, line)
    data = json_line(rec, error=RunLogError, path=self.path, line=line)
    self._write(data)
    self._checker.commit(parsed, line)
    self._line = line

  def step(self, step: int, examples: Sequence[str], loss: float | None = None,
           lr: float | None = None, *, extra: Mapping[str, Any] | None = None) -> None:
    """Writes a step record.

    Args:
      step: 0-based optimizer step; must be the number of steps written so far.
      examples: the non-empty batch of example ids fed at this step.
      loss: the step's training loss, or None.
      lr: the learning rate used, or None.
      extra: further keys to keep in the record.

    Raises:
      RunLogError: the record breaks a rule; nothing is written.
    """
    self._append(_step_record(step, examples, loss, lr, extra, self.path, self._line + 1))

  def eval(self, step: int, losses: Mapping[str, float], *,
           diagnostics: Mapping[str, Mapping[str, float | None]] | None = None,
           extra: Mapping[str, Any] | None = None) -> None:
    """Writes an eval record.

    Args:
      step: steps taken before this evaluation (0 = before training); at most the number of
        steps written so far, and not below the previous eval's step.
      losses: example id -> finite mean token cross-entropy.
      diagnostics: fragment -> {diagnostic -> value} measured on the real model (NaN or None
        where undefined), e.g. from `calibrate.io.diagnostics.RealDiagnostics`.
      extra: further keys to keep in the record.

    Raises:
      RunLogError: the record breaks a rule; nothing is written.
    """
    line = self._line + 1
    rec = _eval_record(step, losses, extra, self.path, line, diagnostics)
    s = rec["step"]
    # The reader checks this only at the end; a live log must be valid after every line.
    if _is_int(s) and s > self.num_steps:
      _fail(f"eval at step {s}, but only {self.num_steps} steps are written", self.path, line,
            "step")
    self._append(rec)

  def close(self) -> None:
    """Closes the file (idempotent)."""
    if not self._file.closed:
      self._file.close()

  def __enter__(self) -> RunLogWriter:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def _records(runlog: RunLog, path: str | None) -> list[dict[str, Any]]:
  """The file records of a RunLog, each eval placed after the steps it follows."""
  if not isinstance(runlog, RunLog):
    raise TypeError(f"expected a RunLog, got {type(runlog).__name__}")
  records = [_header_record(runlog.header, None, path)]
  evals = list(runlog.evals)
  e = 0
  for t, s in enumerate(runlog.steps):
    while e < len(evals) and _is_int(evals[e].step) and evals[e].step <= t:
      records.append(_eval_record(evals[e].step, evals[e].losses, evals[e].extra, path,
                                  len(records) + 1, evals[e].diagnostics))
      e += 1
    if not isinstance(s, StepRecord):
      raise TypeError(f"steps[{t}] is {type(s).__name__}, not StepRecord")
    records.append(_step_record(s.step, s.examples, s.loss, s.lr, s.extra, path,
                                len(records) + 1))
  for ev in evals[e:]:
    if not isinstance(ev, EvalRecord):
      raise TypeError(f"evals contains {type(ev).__name__}, not EvalRecord")
    records.append(_eval_record(ev.step, ev.losses, ev.extra, path, len(records) + 1,
                                ev.diagnostics))
  return records


def write_runlog(path: str | os.PathLike, runlog: RunLog) -> None:
  """Checks a whole RunLog and writes it atomically (temp file, fsync, rename).

  Evals are placed in the file after the steps they follow; floats keep full precision, so
  `read_runlog` gives back an equal RunLog.

  Args:
    path: the file to write; replaced if it exists.
    runlog: the log (checked without a fragments file).

  Raises:
    RunLogError: a record breaks a rule (line = where it would be written); nothing is written.
    OSError: the file cannot be written.
  """
  path = os.fspath(path)
  records = _records(runlog, path)
  checker = _Checker(path, None)
  chunks = []
  for i, rec in enumerate(records):
    checker.feed(rec, i + 1)
    chunks.append(json_line(rec, error=RunLogError, path=path, line=i + 1))
  checker.finish()
  atomic_write(path, b"".join(chunks))


# ----------------------------------------------------------------------------------------------
# Arrays for the simulator.


def diagnostics_arrays(runlog: RunLog, fragment_names: Sequence[str]
                       ) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
  """A run's real diagnostics as arrays: (the steps of the evals that carry them, name ->
  [C, F] in the order of `fragment_names`, NaN where a value is null or missing)."""
  evals = [e for e in runlog.evals if e.diagnostics is not None]
  out = {n: np.full((len(evals), len(fragment_names)), np.nan) for n in DIAGNOSTIC_NAMES}
  for c, ev in enumerate(evals):
    for f, frag in enumerate(fragment_names):
      for n, v in ev.diagnostics.get(frag, {}).items():
        if v is not None:
          out[n][c, f] = v
  return tuple(e.step for e in evals), out


def order_from_runlog(runlog: RunLog, fragments: Fragments) -> np.ndarray:
  """Returns the order a RunLog fed, as example positions in `fragments`.

  Args:
    runlog: the log; its ids are looked up by id, so it need not have been read with fragments.
    fragments: gives each id its position (`fragments.index`).

  Returns:
    int32 [T, B], B the longest batch in the log; shorter batches are padded with -1.

  Raises:
    RunLogError: an id is not a train example of `fragments` (line None: a RunLog keeps no
      line numbers; the reason names the step).
  """
  steps = runlog.steps
  width = max((len(s.examples) for s in steps), default=0)
  order_TxB = np.full((len(steps), width), -1, np.int32)
  index, split_of = fragments.index, fragments.split_of
  for t, s in enumerate(steps):
    for b, example_id in enumerate(s.examples):
      position = index.get(example_id)
      if position is None:
        _fail(f"step {t}: example id {short(example_id)} is not in the fragments file",
              runlog.path, None, "examples")
      if split_of[position] != 0:
        _fail(f"step {t}: example {short(example_id)} is a probe example; probes are never fed",
              runlog.path, None, "examples")
      order_TxB[t, b] = position
  return order_TxB


def learning_rates_from_runlog(runlog: RunLog) -> np.ndarray | None:
  """Returns the per-step learning rates, float32 [T], or None if any step lacks `lr`."""
  if any(s.lr is None for s in runlog.steps):
    return None
  return np.array([s.lr for s in runlog.steps], np.float32)


def where(run: RunLog) -> str:
  """How messages name a run: its id, and its file when it was read from one."""
  return f"run {run.header.run_id!r}" + (f" ({run.path})" if run.path else "")


def run_learning_rates(runlog: RunLog) -> np.ndarray:
  """The run's learning rates: the logged ones, else its own header's schedule."""
  from surrogate import optim
  logged = learning_rates_from_runlog(runlog)
  if logged is not None:
    return logged
  return optim.learning_rates(optim.OptimizerConfig.from_dict(runlog.header.optimizer),
                              runlog.num_steps)
