"""Fragments file I/O: the examples, grouped in named fragments, split into train and probe.

The file format (JSON Lines, one example a line) is the contract in DESIGN.md, "Fragments file":

  {"id": "art/train/17", "fragment": "art", "split": "train", "text": "..."}
  {"id": "q/probe/3", "fragment": "qa", "split": "probe", "prompt": "Q: ...", "completion": " A"}

Axes: E examples (positions in file order), F fragments (in order of first appearance).

Readers here must never fail with anything but `FragmentsError` (or `OSError` for a file that
cannot be opened), whatever the bytes: the error names the file, the 1-based line and the field.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
import warnings
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, NoReturn

import numpy as np

from surrogate.errors import FragmentsError
from surrogate.jsonl import (atomic_write, decode_line, is_blank, json_line, json_type,
                             parse_object, short, split_lines, valid_unicode)

__all__ = [
    "Example",
    "Fragments",
    "Split",
    "read_fragments",
    "sha256_file",
    "write_fragments",
]


class Split(str, enum.Enum):
  """Which side of a fragment an example is on: fed to training, or held out to probe."""
  TRAIN = "train"
  PROBE = "probe"


# Keys with a meaning in a record, in the order they are written; anything else is an extra.
_KNOWN_KEYS = ("id", "fragment", "split", "text", "prompt", "completion")
_SPLIT_CODE = {Split.TRAIN: 0, Split.PROBE: 1}
_SPLIT_VALUES = frozenset(s.value for s in Split)


@dataclasses.dataclass(frozen=True)
class Example:
  """One training or probe item.

  Exactly one of `text` (loss on all tokens) or `prompt` + `completion` (loss on the completion
  only) is set. Construction does not validate; `Fragments.from_examples` and `read_fragments` do.

  Attributes:
    id: unique id within the fragments file.
    fragment: name of the fragment the example belongs to.
    split: `Split.TRAIN` (fed) or `Split.PROBE` (never fed; measures generalization). A plain
      "train" / "probe" string is converted.
    text: the whole text, or None for a prompt/completion example.
    prompt: the prompt (may be empty), or None for a text example.
    completion: the completion (non-empty), or None for a text example.
    extra: unknown record keys, kept so files stay forward compatible; ignored by `==`.
  """
  id: str
  fragment: str
  split: Split
  text: str | None = None
  prompt: str | None = None
  completion: str | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

  def __post_init__(self):
    # Accept "train"/"probe" for convenience; leave anything else for validation to report.
    if not isinstance(self.split, Split) and isinstance(self.split, str):
      if self.split in _SPLIT_VALUES:
        object.__setattr__(self, "split", Split(self.split))

  @property
  def is_text(self) -> bool:
    """Whether the example is a plain text (loss on all tokens) rather than prompt/completion."""
    return self.text is not None


@dataclasses.dataclass(frozen=True, repr=False)
class Fragments:
  """A validated fragments file, with index arrays for building orders.

  Build one with `read_fragments` or `Fragments.from_examples`, which check every rule of the
  format; the plain constructor only checks what the derived arrays need (unique ids, every
  fragment has a train example).

  Attributes:
    examples: the E examples, in file order; positions in this tuple are the example indices used
      by orders.
    sha256: hex sha256 of the file's bytes (for an in-memory set: of the bytes `write_fragments`
      would write). RunLogs name their dataset by it.
    path: the file it was read from, or None; ignored by `==`.
  """
  examples: tuple[Example, ...]
  sha256: str
  path: str | None = dataclasses.field(default=None, compare=False)
  # Derived in __post_init__; private fields so the object pickles and stays immutable.
  _names: tuple[str, ...] = dataclasses.field(init=False, compare=False)
  _index: dict[str, int] = dataclasses.field(init=False, compare=False)
  _fragment_of: np.ndarray = dataclasses.field(init=False, compare=False)
  _split_of: np.ndarray = dataclasses.field(init=False, compare=False)
  _train_pools: tuple[np.ndarray, ...] = dataclasses.field(init=False, compare=False)
  _probe_pools: tuple[np.ndarray, ...] = dataclasses.field(init=False, compare=False)
  _probe_indices: np.ndarray = dataclasses.field(init=False, compare=False)

  def __post_init__(self):
    examples = tuple(self.examples)
    object.__setattr__(self, "examples", examples)
    if self.path is not None:
      object.__setattr__(self, "path", os.fspath(self.path))
    if not (isinstance(self.sha256, str) and len(self.sha256) == 64
            and all(c in "0123456789abcdef" for c in self.sha256)):
      raise FragmentsError(f"sha256 must be 64 lowercase hex digits, got {short(self.sha256)}",
                           path=self.path, field="sha256")
    if not examples:
      raise FragmentsError("no examples", path=self.path)
    index: dict[str, int] = {}
    fragment_number: dict[str, int] = {}
    fragment_of = np.empty(len(examples), np.int32)
    split_of = np.empty(len(examples), np.int8)
    for e, ex in enumerate(examples):
      if not isinstance(ex, Example):
        raise TypeError(f"examples[{e}] is {type(ex).__name__}, not Example")
      if not isinstance(ex.split, Split):
        raise FragmentsError(f"split must be 'train' or 'probe', got {short(ex.split)}",
                             path=self.path, line=e + 1, field="split")
      if ex.id in index:
        raise FragmentsError(f"duplicate id {short(ex.id)} (first on line {index[ex.id] + 1})",
                             path=self.path, line=e + 1, field="id")
      index[ex.id] = e
      fragment_of[e] = fragment_number.setdefault(ex.fragment, len(fragment_number))
      split_of[e] = _SPLIT_CODE[ex.split]
    names = tuple(fragment_number)
    train_pools, probe_pools = [], []
    for f, name in enumerate(names):
      in_f = fragment_of == f
      train = _frozen(np.flatnonzero(in_f & (split_of == 0)).astype(np.int32))
      if not train.size:
        raise FragmentsError(f"fragment {name!r} has no train examples",
                             path=self.path, field="fragment")
      train_pools.append(train)
      probe_pools.append(_frozen(np.flatnonzero(in_f & (split_of == 1)).astype(np.int32)))
    object.__setattr__(self, "_names", names)
    object.__setattr__(self, "_index", index)
    object.__setattr__(self, "_fragment_of", _frozen(fragment_of))
    object.__setattr__(self, "_split_of", _frozen(split_of))
    object.__setattr__(self, "_train_pools", tuple(train_pools))
    object.__setattr__(self, "_probe_pools", tuple(probe_pools))
    object.__setattr__(self, "_probe_indices",
                       _frozen(np.flatnonzero(split_of == 1).astype(np.int32)))

  @classmethod
  def from_examples(cls, examples: Iterable[Example],
                    path: str | os.PathLike | None = None) -> Fragments:
    """Validates examples with the reader's rules and computes the sha256 of their file form.

    Args:
      examples: the examples, in order. Errors name line = position + 1.
      path: recorded as `path` and named in errors; nothing is read or written.

    Returns:
      The Fragments, with `sha256` of the bytes `write_fragments` would write.

    Raises:
      FragmentsError: an example breaks a rule of the format.
    """
    path = None if path is None else os.fspath(path)
    examples = tuple(examples)
    data = _encode(examples, path, warn_stacklevel=3)
    return cls(examples=examples, sha256=hashlib.sha256(data).hexdigest(), path=path)

  def __repr__(self) -> str:
    return (f"Fragments(path={self.path!r}, examples={len(self.examples)}, "
            f"fragments={len(self._names)}, sha256={self.sha256[:12]}...)")

  @property
  def names(self) -> tuple[str, ...]:
    """The F fragment names, in order of first appearance; fragment number f is names[f]."""
    return self._names

  @property
  def index(self) -> Mapping[str, int]:
    """Read-only map from example id to its position in `examples`."""
    return MappingProxyType(self._index)

  @property
  def fragment_of(self) -> np.ndarray:
    """int32 [E]: fragment number (index into `names`) of each example. Read-only."""
    return self._fragment_of

  @property
  def split_of(self) -> np.ndarray:
    """int8 [E]: 0 for a train example, 1 for a probe example. Read-only."""
    return self._split_of

  def train_pools(self) -> tuple[np.ndarray, ...]:
    """Returns F read-only int32 arrays: the positions of each fragment's train examples."""
    return self._train_pools

  def probe_pools(self) -> tuple[np.ndarray, ...]:
    """Returns F read-only int32 arrays: the positions of each fragment's probe examples.

    A fragment without probes (allowed, with a warning on reading) has an empty array.
    """
    return self._probe_pools

  def probe_indices(self) -> np.ndarray:
    """Returns a read-only int32 array of the positions of all probe examples, in file order."""
    return self._probe_indices

  def texts_for_tokenizer(self, split: Split | None = None) -> list[str]:
    """Returns every non-empty text, prompt and completion, in file order.

    Args:
      split: only examples of this split; None for all (a tokenizer sees no losses, so training
        it on probe texts does not leak what the probes measure).

    Returns:
      The strings, for training a tokenizer on the fragments.
    """
    out = []
    for ex in self.examples:
      if split is not None and ex.split != split:
        continue
      out.extend(s for s in (ex.text, ex.prompt, ex.completion) if s)
    return out


def _frozen(a: np.ndarray) -> np.ndarray:
  a.flags.writeable = False
  return a


# ----------------------------------------------------------------------------------------------
# Fragments records.


def _fail(reason: str, path: str | None, line: int | None, field: str | None = None) -> NoReturn:
  raise FragmentsError(reason, path=path, line=line, field=field)


def _example_from_record(rec: Mapping[str, Any], path: str | None, line: int) -> Example:
  """Checks one record's own rules (not those across records) and builds its Example."""
  for key in ("id", "fragment", "split"):
    if key not in rec:
      _fail("missing required field", path, line, key)
    if not isinstance(rec[key], str):
      _fail(f"must be a string, got {json_type(rec[key])}", path, line, key)
    if not rec[key]:
      _fail("must not be empty", path, line, key)
    if not valid_unicode(rec[key]):
      _fail("contains a lone surrogate (not valid Unicode)", path, line, key)
  if rec["split"] not in _SPLIT_VALUES:
    _fail(f"must be 'train' or 'probe', got {short(rec['split'])}", path, line, "split")
  has_text = "text" in rec
  has_prompt, has_completion = "prompt" in rec, "completion" in rec
  if has_text and (has_prompt or has_completion):
    _fail("has both 'text' and 'prompt'/'completion'; give one or the other", path, line, "text")
  if not (has_text or has_prompt or has_completion):
    _fail("needs 'text', or 'prompt' and 'completion'", path, line, "text")
  if has_prompt != has_completion:
    missing = "completion" if has_prompt else "prompt"
    other = "prompt" if has_prompt else "completion"
    _fail(f"'{other}' without '{missing}'", path, line, missing)
  for key in ("text", "prompt", "completion"):
    if key in rec:
      value = rec[key]
      if not isinstance(value, str):
        _fail(f"must be a string, got {json_type(value)}", path, line, key)
      if not value and key != "prompt":  # an empty prompt is unconditional generation
        _fail("must not be empty", path, line, key)
      if not valid_unicode(value):
        _fail("contains a lone surrogate (not valid Unicode)", path, line, key)
  return Example(
      id=rec["id"], fragment=rec["fragment"], split=Split(rec["split"]),
      text=rec.get("text"), prompt=rec.get("prompt"), completion=rec.get("completion"),
      extra={k: v for k, v in rec.items() if k not in _KNOWN_KEYS})


def _record_of(ex: Example, path: str | None, line: int) -> dict[str, Any]:
  """The file record of an in-memory Example, keys in file order."""
  if not isinstance(ex, Example):
    _fail(f"not an Example (got {type(ex).__name__})", path, line)
  split = ex.split.value if isinstance(ex.split, Split) else ex.split
  rec: dict[str, Any] = {"id": ex.id, "fragment": ex.fragment, "split": split}
  for key in ("text", "prompt", "completion"):
    value = getattr(ex, key)
    if value is not None:
      rec[key] = value
  if not isinstance(ex.extra, Mapping):
    _fail(f"extra must be a mapping, got {type(ex.extra).__name__}", path, line, "extra")
  for key, value in ex.extra.items():
    if not isinstance(key, str):
      _fail(f"extra key {key!r} is not a string", path, line, "extra")
    if key in _KNOWN_KEYS:
      _fail(f"extra key {key!r} clashes with a field of the format", path, line, key)
    rec[key] = value
  return rec


def _check_across(ids_lines: Iterable[tuple[Example, int]], path: str | None,
                  warn_stacklevel: int | None) -> None:
  """Checks the rules across records: unique ids, a train example in every fragment.

  Args:
    ids_lines: each example with the line it is on.
    path: named in errors.
    warn_stacklevel: None for no warning about fragments without probes, else the stack level
      (counted from here) of the user's call, so the warning points at it.
  """
  first_line: dict[str, int] = {}
  has_train: dict[str, bool] = {}
  has_probe: dict[str, bool] = {}
  for ex, line in ids_lines:
    if ex.id in first_line:
      _fail(f"duplicate id {short(ex.id)} (first on line {first_line[ex.id]})", path, line,
            "id")
    first_line[ex.id] = line
    has_train.setdefault(ex.fragment, False)
    has_probe.setdefault(ex.fragment, False)
    if ex.split == Split.TRAIN:
      has_train[ex.fragment] = True
    else:
      has_probe[ex.fragment] = True
  if not first_line:
    _fail("no examples", path, None)
  for name, ok in has_train.items():
    if not ok:
      _fail(f"fragment {short(name)} has no train examples", path, None, "fragment")
  if warn_stacklevel is not None:
    for name, ok in has_probe.items():
      if not ok:
        warnings.warn(f"{path or '<input>'}: fragment {name!r} has no probe examples; its "
                      "generalization cannot be measured", UserWarning,
                      stacklevel=warn_stacklevel)


def _encode(examples: tuple[Example, ...], path: str | None,
            warn_stacklevel: int | None) -> bytes:
  """Validates in-memory examples (line = position + 1) and returns the file bytes."""
  chunks = []
  for e, ex in enumerate(examples):
    rec = _record_of(ex, path, e + 1)
    _example_from_record(rec, path, e + 1)
    chunks.append(json_line(rec, error=FragmentsError, path=path, line=e + 1))
  _check_across(((ex, e + 1) for e, ex in enumerate(examples)), path,
                None if warn_stacklevel is None else warn_stacklevel + 1)
  return b"".join(chunks)


# ----------------------------------------------------------------------------------------------
# Public file functions.


def sha256_file(path: str | os.PathLike) -> str:
  """Returns the hex sha256 of a file's bytes, read in chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def read_fragments(path: str | os.PathLike) -> Fragments:
  """Reads and validates a fragments file (DESIGN.md, "Fragments file").

  Blank lines are skipped; unknown keys are kept in `Example.extra`. A fragment without probe
  examples is allowed, with a `UserWarning`.

  Args:
    path: the JSON Lines file.

  Returns:
    The Fragments, with `sha256` of the file's bytes and `path` as given.

  Raises:
    FragmentsError: the content breaks a rule; names the path, 1-based line and field.
    OSError: the file cannot be read.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  examples, lines = [], []
  for i, raw in enumerate(split_lines(data)):
    text = decode_line(raw, error=FragmentsError, path=path, line=i + 1)
    if is_blank(text):
      continue
    rec = parse_object(text, error=FragmentsError, path=path, line=i + 1)
    examples.append(_example_from_record(rec, path, i + 1))
    lines.append(i + 1)
  _check_across(zip(examples, lines), path, warn_stacklevel=3)
  return Fragments(examples=tuple(examples), sha256=hashlib.sha256(data).hexdigest(), path=path)


def write_fragments(path: str | os.PathLike,
                    examples_or_fragments: Fragments | Iterable[Example]) -> str:
  """Validates and writes a fragments file atomically (temp file, fsync, rename).

  Keys are written in the order id, fragment, split, text | prompt, completion, then extras;
  non-ASCII characters are written as UTF-8, not escaped.

  Args:
    path: the file to write; replaced if it exists.
    examples_or_fragments: a Fragments, or the examples in order.

  Returns:
    The hex sha256 of the bytes written (what RunLogs give as `dataset_sha256`).

  Raises:
    FragmentsError: an example breaks a rule (line = position + 1); nothing is written.
    OSError: the file cannot be written.
  """
  path = os.fspath(path)
  if isinstance(examples_or_fragments, Fragments):
    examples = examples_or_fragments.examples
  else:
    examples = tuple(examples_or_fragments)
  data = _encode(examples, path, warn_stacklevel=None)
  atomic_write(path, data)
  return hashlib.sha256(data).hexdigest()
