"""Calibration: real-run logs in, fitted surrogate out."""

from __future__ import annotations

from calibrate.predict import simulate_runs
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
    "simulate_runs",
    "write_runlog",
]
