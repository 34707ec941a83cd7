"""Calibration: real-run logs in, fitted simulator out, answers and accuracy on held-out runs.

The pipeline, one subpackage a stage:
- `calibrate.io`: RunLog v1 files, the recorders of real runs, and the raw surrogate on
  given runs;
- `calibrate.fitting`: `fit` (real runs -> `Simulator`), the calibration and its one
  prediction path (`predict`) with its RunLog edge (`runs`), the saved simulator folder
  (`saved`), baselines, and `validate` on held-out runs;
- `calibrate.answers`: `what_if`, `compare`, `screen`, `search`, `next_run`, the report;
- `calibrate.cli`: the `surrogate` command and its demo.
"""

from __future__ import annotations

from calibrate.answers.outcomes import (
                                           Comparison,
                                           Outcome,
                                           Thresholds,
                                           WhatIf,
                                           compare,
                                           what_if,
)
from calibrate.answers.screen import Screen, screen
from calibrate.answers.search import NextRun, SearchResult, next_run, search
from calibrate.fitting.calibration import (
                                           Calibration,
                                           FitInfo,
                                           Prediction,
                                           Simulator,
                                           SimulatorConfig,
                                           predict,
)
from calibrate.fitting.fit import FitConfig, FitError, fit
from calibrate.fitting.runs import predict_runs, predicted_runlogs
from calibrate.fitting.saved import SimulatorError, load, save
from calibrate.fitting.validate import ValidationReport, validate
from calibrate.io.runlog import (
                                           FORMAT,
                                           EvalRecord,
                                           RunHeader,
                                           RunLog,
                                           RunLogWriter,
                                           StepRecord,
                                           learning_rates_from_runlog,
                                           order_from_runlog,
                                           read_runlog,
                                           write_runlog,
)
from calibrate.io.simulated import simulate_runs

__all__ = [
    "FORMAT",
    "Calibration",
    "Comparison",
    "EvalRecord",
    "FitConfig",
    "FitError",
    "FitInfo",
    "NextRun",
    "Outcome",
    "Prediction",
    "RunHeader",
    "RunLog",
    "RunLogWriter",
    "Screen",
    "SearchResult",
    "Simulator",
    "SimulatorConfig",
    "SimulatorError",
    "StepRecord",
    "Thresholds",
    "ValidationReport",
    "WhatIf",
    "compare",
    "fit",
    "learning_rates_from_runlog",
    "load",
    "next_run",
    "order_from_runlog",
    "predict",
    "predict_runs",
    "predicted_runlogs",
    "read_runlog",
    "save",
    "screen",
    "search",
    "simulate_runs",
    "validate",
    "what_if",
    "write_runlog",
]
