"""surrogate: simulate fine-tuning feeding orders with a small JAX transformer.

The pipeline: a fragments file (`read_fragments`) is prepared for simulation (`prepare`:
BPE, token table, eval set); orders come from `orders`; `simulate` trains the surrogate on
one order and `simulate_many` on thousands (vmapped, sharded, chunked).
"""

from surrogate import orders
from surrogate.diagnostics import Diagnostics
from surrogate.errors import DataError, FragmentsError, RunLogError
from surrogate.fragments import Example, Fragments, Split, read_fragments, write_fragments
from surrogate.model import ModelConfig, init_params
from surrogate.optim import Knobs, OptimizerConfig, OptimizerName, ScheduleKind, learning_rates
from surrogate.prepare import Prepared, prepare
from surrogate.simulate import SimData, SimPlan, Trajectory, simulate, simulate_many

__all__ = [
    "DataError",
    "Diagnostics",
    "Example",
    "Fragments",
    "FragmentsError",
    "Knobs",
    "ModelConfig",
    "OptimizerConfig",
    "OptimizerName",
    "Prepared",
    "RunLogError",
    "ScheduleKind",
    "SimData",
    "SimPlan",
    "Split",
    "Trajectory",
    "init_params",
    "learning_rates",
    "orders",
    "prepare",
    "read_fragments",
    "simulate",
    "simulate_many",
    "write_fragments",
]
