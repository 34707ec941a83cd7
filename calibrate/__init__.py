"""Calibration: real-run logs in, fitted simulator out, accuracy on held-out runs."""

from __future__ import annotations

from calibrate.fitting.fit import FitConfig, FitError, fit
from calibrate.answers.outcomes import Comparison, Outcome, Thresholds, WhatIf, compare, what_if
from calibrate.io.simulated import simulate_runs
from calibrate.io.runlog import (FORMAT, EvalRecord, RunHeader, RunLog, RunLogWriter, StepRecord,
                              learning_rates_from_runlog, order_from_runlog, read_runlog,
                              write_runlog)
from calibrate.fitting.calibration import Prediction, Simulator, SimulatorError
from calibrate.fitting.validate import ValidationReport, validate

__all__ = [
    "FORMAT",
    "Comparison",
    "EvalRecord",
    "FitConfig",
    "FitError",
    "Outcome",
    "Prediction",
    "RunHeader",
    "RunLog",
    "RunLogWriter",
    "Simulator",
    "SimulatorError",
    "StepRecord",
    "Thresholds",
    "ValidationReport",
    "WhatIf",
    "compare",
    "fit",
    "learning_rates_from_runlog",
    "order_from_runlog",
    "read_runlog",
    "simulate_runs",
    "validate",
    "what_if",
    "write_runlog",
]
