"""Errors raised for bad input files: each names the file, the line and the field."""

from __future__ import annotations


class DataError(ValueError):
  """A user's file is malformed.

  Attributes:
    path: the file, as given.
    line: 1-based line number, or None when the problem is not tied to a line.
    field: the record field at fault, or None.
    reason: what is wrong, in words.
  """

  def __init__(self, reason: str, *, path: str | None = None,
               line: int | None = None, field: str | None = None):
    self.path, self.line, self.field, self.reason = path, line, field, reason
    where = str(path) if path is not None else "<input>"
    if line is not None:
      where += f", line {line}"
    if field is not None:
      where += f", field '{field}'"
    super().__init__(f"{where}: {reason}")


class FragmentsError(DataError):
  """A fragments file (JSON Lines of examples) is malformed."""


class RunLogError(DataError):
  """A RunLog (JSON Lines of header, step and eval records) is malformed."""


class CalibrationError(ValueError):
  """Runs cannot be calibrated on, predicted or validated as asked (the message says why)."""
