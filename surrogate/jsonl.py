"""JSON Lines plumbing shared by the file readers and writers: strict parsing, atomic writes.

Every failure becomes the caller's `DataError` subclass naming the file, line and field.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from surrogate.errors import DataError


class _DuplicateKey(Exception):

  def __init__(self, key: str):
    super().__init__(key)
    self.key = key


def json_safe(obj: Any) -> Any:
  """`obj` with every non-finite float (NaN, inf) as None, numpy scalars and arrays as plain
  Python: the one convention for missing values in JSON output (strict JSON has no NaN)."""
  import math

  import numpy as np
  if isinstance(obj, Mapping):
    return {str(k): json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return json_safe(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  # json.loads silently keeps the last of repeated keys; a file that says two things is an error.
  out = {}
  for key, value in pairs:
    if key in out:
      raise _DuplicateKey(key)
    out[key] = value
  return out


def split_lines(data: bytes) -> list[bytes]:
  """Splits file bytes on b"\\n" only (JSON strings may hold U+2028 etc. raw); line i+1 = [i]."""
  lines = data.split(b"\n")
  if lines[-1] == b"":
    lines.pop()
  return lines


def decode_line(raw: bytes, *, error: type[DataError], path: str | None, line: int) -> str:
  """Decodes one line as strict UTF-8 (no lone surrogates), dropping a BOM on line 1."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise error(f"not valid UTF-8 (bad byte at column {e.start + 1})",
                path=path, line=line) from None
  if line == 1 and text.startswith("\ufeff"):
    text = text[1:]
  return text


def is_blank(text: str) -> bool:
  return not text.strip(" \t\r")


def parse_object(text: str, *, error: type[DataError], path: str | None,
                  line: int) -> dict[str, Any]:
  """Parses one line as a JSON object, turning every failure into `error`."""
  try:
    obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
  except _DuplicateKey as e:
    raise error(f"key {short(e.key)} appears twice", path=path, line=line, field=e.key) from None
  except RecursionError:
    raise error("not valid JSON: nested too deeply", path=path, line=line) from None
  except json.JSONDecodeError as e:
    raise error(f"not valid JSON: {e.msg} at column {e.colno}", path=path, line=line) from None
  except ValueError as e:  # e.g. an integer with more digits than Python converts
    raise error(f"not valid JSON: {e}", path=path, line=line) from None
  if not isinstance(obj, dict):
    raise error(f"not a JSON object (got {json_type(obj)})", path=path, line=line)
  return obj


def json_type(value: Any) -> str:
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "boolean"
  if isinstance(value, (int, float)):
    return "number"
  if isinstance(value, str):
    return "string"
  if isinstance(value, (list, tuple)):
    return "array"
  if isinstance(value, dict):
    return "object"
  return type(value).__name__


def short(value: Any) -> str:
  """A short, safe rendering of a user's value for an error message (never a deep repr)."""
  if isinstance(value, str):
    return repr(value[:60]) + ("..." if len(value) > 60 else "")
  if value is None or isinstance(value, (bool, int, float)):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
  return json_type(value)


def valid_unicode(s: str) -> bool:
  # A JSON "\ud800" escape decodes to a lone surrogate, which no UTF-8 file can hold.
  try:
    s.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def json_line(record: Mapping[str, Any], *, error: type[DataError], path: str | None,
               line: int | None) -> bytes:
  """Encodes one record as a UTF-8 JSON line; floats keep full (repr) precision."""
  try:
    try:
      return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
      # A lone surrogate in an extra value: escape it rather than write invalid UTF-8.
      return (json.dumps(record, ensure_ascii=True) + "\n").encode("ascii")
  except (TypeError, ValueError, RecursionError) as e:
    raise error(f"record cannot be written as JSON: {e}", path=path, line=line) from None


def atomic_write(path: str, data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old file or the new one, never a mix."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp creates 0600; give the file the mode it had, or an ordinary one.
    try:
      mode = os.stat(path).st_mode & 0o777
    except OSError:
      mode = 0o644
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  # Make the rename itself durable; not every platform lets a directory be opened.
  with contextlib.suppress(OSError):
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)
