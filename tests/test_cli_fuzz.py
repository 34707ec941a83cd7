"""Every command fed malformed inputs in process (tests/cli_fuzz.py): exit 2 with one line
naming the broken file or flag, never a traceback, nothing left behind, inputs unchanged."""

import os
import shutil
import tempfile
import warnings

import pytest
from cli_fuzz import CASES, FLAG_VALUES, SIM_FILES, copy_world, edit, judge, materialize, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def valid(world, sim, tmp_path_factory):
  return materialize(world, sim, str(tmp_path_factory.mktemp("fuzz") / "world"))


def _trial(valid, case, draw):
  root = tempfile.mkdtemp()
  try:
    paths = copy_world(valid, os.path.join(root, "world"))
    out = os.path.join(root, "out")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      if case.flag is not None:
        outcome = run(case, paths, out, flag_value=draw(st.sampled_from(FLAG_VALUES)))
      elif os.path.basename(case.target(paths)) in SIM_FILES and draw(st.booleans()):
        outcome = run(case, paths, out, delete=True)
      else:
        with open(case.target(paths), "rb") as f:
          outcome = run(case, paths, out, new_bytes=edit(f.read(), draw))
    assert judge(outcome) == [], outcome
  finally:
    shutil.rmtree(root)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(case=st.sampled_from(CASES), data=st.data())
def test_every_command_turns_bad_input_into_one_line_and_exit_2(valid, case, data):
  _trial(valid, case, data.draw)


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(case=st.sampled_from(CASES), data=st.data())
def test_every_command_many_more_inputs(valid, case, data):
  _trial(valid, case, data.draw)
