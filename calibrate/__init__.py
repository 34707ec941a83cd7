"""Calibration: real-run logs in, fitted surrogate out."""

from __future__ import annotations

from calibrate.runlog import (FORMAT, EvalRecord, RunHeader, RunLog, RunLogWriter, StepRecord,
                              learning_rates_from_runlog, order_from_runlog, read_runlog,
                              write_runlog)

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
    "write_runlog",
]
