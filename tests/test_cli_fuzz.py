"""Every command fed malformed inputs in process (tests/cli_fuzz.py): exit 2 with one line
naming the broken file or flag, never a traceback, nothing left behind, inputs unchanged."""

import pytest
from cli_fuzz import CASES, judge, materialize, trial
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_CHECKS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


@pytest.fixture(scope="module")
def valid(world, sim, tmp_path_factory):
  return materialize(world, sim, str(tmp_path_factory.mktemp("fuzz") / "world"))


@settings(max_examples=150, deadline=None, suppress_health_check=_CHECKS)
@given(case=st.sampled_from(CASES), data=st.data())
def test_every_command_turns_bad_input_into_one_line_and_exit_2(valid, case, data):
  outcome = trial(valid, case, data.draw)
  assert judge(outcome) == [], outcome


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, suppress_health_check=_CHECKS)
@given(case=st.sampled_from(CASES), data=st.data())
def test_every_command_many_more_inputs(valid, case, data):
  outcome = trial(valid, case, data.draw)
  assert judge(outcome) == [], outcome
