"""Tests for calibrate.io.runlog: the RunLog v1 format, its writer and the arrays it yields."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calibrate import (FORMAT, EvalRecord, RunHeader, RunLog, RunLogWriter, StepRecord,
                       learning_rates_from_runlog, order_from_runlog, read_runlog, write_runlog)
from surrogate.errors import RunLogError
from surrogate.fragments import Example, Fragments, Split

FRAGS = Fragments.from_examples([
    Example("a/t/0", "a", Split.TRAIN, text="alpha"),
    Example("a/t/1", "a", Split.TRAIN, text="beta"),
    Example("a/p/0", "a", Split.PROBE, text="gamma"),
    Example("b/t/0", "b", Split.TRAIN, prompt="Q", completion=" A"),
    Example("b/p/0", "b", Split.PROBE, prompt="Q2", completion=" B"),
])
HEADER = {"run_id": "r0", "model": "gpt2-2x128",
          "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.01,
                        "betas": [0.9, 0.999], "warmup_steps": 2, "schedule": "cosine"},
          "batch_size": 2, "seed": 0, "loss_on": "text"}


def _header(**kw) -> dict:
  rec = {"type": "header", "format": FORMAT, "dataset_sha256": FRAGS.sha256, **HEADER}
  rec.update(kw)
  return {k: v for k, v in rec.items() if v is not _DROP}


_DROP = object()


def _step(t: int, examples=("a/t/0", "b/t/0"), **kw) -> dict:
  loss = 2.0 - t / 10 if isinstance(t, int) else 2.0
  if isinstance(examples, tuple):
    examples = list(examples)
  return {"type": "step", "step": t, "examples": examples, "loss": loss, "lr": 0.001, **kw}


def _eval(t: int, **losses) -> dict:
  return {"type": "eval", "step": t, "losses": losses or {"a/p/0": 3.0, "b/p/0": 2.5}}


def _write(tmp_path, records, name="run.jsonl", tail: bytes = b"") -> str:
  path = tmp_path / name
  lines = [r if isinstance(r, (str, bytes)) else json.dumps(r) for r in records]
  path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n"
                            for l in lines) + tail)
  return str(path)


def _good() -> list:
  return [_header(), _eval(0), _step(0), _step(1, ["a/t/1"]), _eval(2), _step(2)]


def _expect(path, line, field, fragments=None, **kw) -> RunLogError:
  with pytest.raises(RunLogError) as err:
    read_runlog(path, fragments, **kw)
  assert (err.value.path, err.value.line, err.value.field) == (path, line, field), err.value
  return err.value


def test_read_good_log(tmp_path):
  log = read_runlog(_write(tmp_path, _good()), FRAGS)
  assert log.num_steps == 3 and not log.is_order_file
  assert log.eval_steps == (0, 2)
  assert log.header == RunHeader(run_id="r0", dataset_sha256=FRAGS.sha256, model="gpt2-2x128",
                                 optimizer=HEADER["optimizer"], batch_size=2, seed=0)
  assert log.header.extra == {"loss_on": "text"}
  assert log.steps[1] == StepRecord(step=1, examples=("a/t/1",), loss=1.9, lr=0.001)
  assert log.evals[1] == EvalRecord(step=2, losses={"a/p/0": 3.0, "b/p/0": 2.5})


def test_order_file_needs_only_examples(tmp_path):
  path = _write(tmp_path, [_header(seed=_DROP), {"type": "step", "step": 0, "examples": ["a/t/0"]},
                           {"type": "step", "step": 1, "examples": ["b/t/0"], "loss": None}])
  log = read_runlog(path, FRAGS)
  assert log.is_order_file and log.header.seed is None
  assert log.steps[1].loss is None and log.steps[1].lr is None
  assert learning_rates_from_runlog(log) is None


def test_writer_round_trip(tmp_path):
  path = tmp_path / "run.jsonl"
  with RunLogWriter(path, HEADER, FRAGS) as w:
    w.eval(0, {"a/p/0": np.float32(3.0), "b/p/0": 2.5})
    w.step(0, ["a/t/0", "b/t/0"], loss=np.float64(0.1 + 0.2), lr=1e-3)
    w.step(np.int64(1), np.array(["a/t/1"]), loss=1.0 / 3.0, lr=5e-4, extra={"tokens": 7})
    w.eval(2, {"a/p/0": 2.0}, extra={"note": "end"})
  log = read_runlog(path, FRAGS)
  assert log.header.dataset_sha256 == FRAGS.sha256  # filled in from the fragments
  assert log.steps[0].loss == 0.1 + 0.2  # full precision
  assert log.steps[1].examples == ("a/t/1",) and log.steps[1].extra == {"tokens": 7}
  assert log.evals[1].extra == {"note": "end"}
  # write_runlog gives back the same log and the same bytes.
  again = tmp_path / "again.jsonl"
  write_runlog(again, log)
  assert read_runlog(again, FRAGS) == log
  assert again.read_bytes() == path.read_bytes()
  assert sorted(os.listdir(tmp_path)) == ["again.jsonl", "run.jsonl"]


def test_write_runlog_places_evals_after_their_steps(tmp_path):
  log = RunLog(header=RunHeader(run_id="r", dataset_sha256=FRAGS.sha256, model="m",
                                optimizer={"name": "sgd", "lr": 0.1}, batch_size=1),
               steps=[StepRecord(t, ("a/t/0",)) for t in range(3)],
               evals=[EvalRecord(1, {"a/p/0": 1.0}), EvalRecord(3, {"a/p/0": 0.5})])
  path = tmp_path / "r.jsonl"
  write_runlog(path, log)
  types = [(r["type"], r["step"]) for r in map(json.loads, path.read_text().splitlines()[1:])]
  assert types == [("step", 0), ("eval", 1), ("step", 1), ("step", 2), ("eval", 3)]
  assert read_runlog(path) == log
  bad = RunLog(header=log.header, steps=log.steps, evals=[EvalRecord(4, {"a/p/0": 1.0})])
  with pytest.raises(RunLogError) as err:
    write_runlog(tmp_path / "bad.jsonl", bad)
  assert err.value.field == "step"
  assert not (tmp_path / "bad.jsonl").exists()


@pytest.mark.parametrize("header, field", [
    (_header(format=_DROP), "format"),
    (_header(format="surrogate-runlog/2"), "format"),
    (_header(run_id=_DROP), "run_id"),
    (_header(run_id=7), "run_id"),
    (_header(dataset_sha256="abc"), "dataset_sha256"),
    (_header(model=_DROP), "model"),
    (_header(optimizer=_DROP), "optimizer"),
    (_header(optimizer=[]), "optimizer"),
    (_header(optimizer={"lr": 0.1}), "optimizer.name"),
    (_header(optimizer={"name": "lion", "lr": 0.1}), "optimizer.name"),
    (_header(optimizer={"name": "sgd"}), "optimizer.lr"),
    (_header(optimizer={"name": "sgd", "lr": 0}), "optimizer.lr"),
    (_header(optimizer={"name": "sgd", "lr": float("nan")}), "optimizer.lr"),
    (_header(optimizer={"name": "sgd", "lr": True}), "optimizer.lr"),
    (_header(optimizer={"name": "sgd", "lr": 0.1, "weight_decay": -1}), "optimizer.weight_decay"),
    (_header(optimizer={"name": "sgd", "lr": 0.1, "eps": float("inf")}), "optimizer.eps"),
    (_header(optimizer={"name": "sgd", "lr": 0.1, "betas": [0.9]}), "optimizer.betas"),
    (_header(optimizer={"name": "sgd", "lr": 0.1, "betas": [0.9, 1.0]}), "optimizer.betas"),
    (_header(optimizer={"name": "sgd", "lr": 0.1, "warmup_steps": 1.5}),
     "optimizer.warmup_steps"),
    (_header(optimizer={"name": "sgd", "lr": 0.1, "schedule": "exp"}), "optimizer.schedule"),
    (_header(batch_size=0), "batch_size"),
    (_header(batch_size=True), "batch_size"),
    (_header(batch_size=_DROP), "batch_size"),
    (_header(seed="0"), "seed"),
])
def test_header_rules(tmp_path, header, field):
  _expect(_write(tmp_path, ["", header, _step(0)]), 2, field)


@pytest.mark.parametrize("record, field", [
    ({"step": 0, "examples": ["a/t/0"]}, "type"),
    ({"type": "metrics", "step": 0}, "type"),
    (_header(run_id="again"), "type"),
    (_step(2), "step"),
    (_step(0), "step"),
    (_step("1"), "step"),
    ({"type": "step", "step": 1}, "examples"),
    (_step(1, []), "examples"),
    (_step(1, "a/t/0"), "examples"),
    (_step(1, ["a/t/0", 3]), "examples"),
    (_step(1, loss=float("nan")), "loss"),
    (_step(1, loss="2.0"), "loss"),
    (_step(1, lr=float("inf")), "lr"),
    (_step(1, lr=-0.1), "lr"),
    ({"type": "eval", "step": 1}, "losses"),
    ({"type": "eval", "step": -1, "losses": {"a/p/0": 1.0}}, "step"),
    ({"type": "eval", "step": 1.0, "losses": {"a/p/0": 1.0}}, "step"),
    (_eval(0), "step"),  # after an eval at step 1: not nondecreasing
    (_eval(1, **{"a/p/0": float("-inf")}), "losses"),
    (_eval(1, **{"a/p/0": None}), "losses"),
    ({"type": "eval", "step": 1, "losses": {}}, "losses"),
    ({"type": "eval", "step": 1, "losses": [1.0]}, "losses"),
])
def test_record_rules(tmp_path, record, field):
  path = _write(tmp_path, [_header(), _step(0), _eval(1), record, _step(2)])
  _expect(path, 4, field)


def test_first_record_must_be_header(tmp_path):
  _expect(_write(tmp_path, ["", _step(0), _header()]), 2, "type")


def test_empty_file(tmp_path):
  _expect(_write(tmp_path, []), None, None)
  _expect(_write(tmp_path, ["", " "], name="blank.jsonl"), None, None)


def test_eval_beyond_last_step_is_checked_at_the_end(tmp_path):
  path = _write(tmp_path, [_header(), _eval(0), _eval(3), _step(0), _step(1)])
  err = _expect(path, 3, "step")
  assert "only 2 steps" in err.reason
  # The same eval is fine once the steps are there, wherever they are in the file.
  read_runlog(_write(tmp_path, [_header(), _eval(0), _eval(3), _step(0), _step(1), _step(2)],
                     name="ok.jsonl"))


def test_fragments_checks(tmp_path):
  other = "0" * 64
  _expect(_write(tmp_path, [_header(dataset_sha256=other), _step(0)]), 1, "dataset_sha256",
          FRAGS)
  read_runlog(_write(tmp_path, [_header(dataset_sha256=other), _step(0)], name="nofrag.jsonl"))
  err = _expect(_write(tmp_path, [*_good(), _step(3, ["a/t/0", "zz/9"])], name="u.jsonl"), 7,
                "examples", FRAGS)
  assert "'zz/9'" in err.reason
  err = _expect(_write(tmp_path, [*_good(), _step(3, ["a/p/0"])], name="p.jsonl"), 7,
                "examples", FRAGS)
  assert "probe" in err.reason
  err = _expect(_write(tmp_path, [*_good(), _eval(3, **{"zz/9": 1.0})], name="e.jsonl"), 7,
                "losses", FRAGS)
  assert "'zz/9'" in err.reason
  # Evals may measure train examples.
  read_runlog(_write(tmp_path, [*_good(), _eval(3, **{"a/t/0": 1.0})], name="t.jsonl"), FRAGS)


def test_truncated_tail(tmp_path):
  cut = json.dumps(_step(3)).encode()[:25]
  path = _write(tmp_path, _good(), tail=cut)
  with pytest.warns(UserWarning, match="line 7"):
    log = read_runlog(path, FRAGS)
  assert log == read_runlog(_write(tmp_path, _good(), name="full.jsonl"), FRAGS)
  _expect(path, 7, None, FRAGS, allow_truncated_tail=False)
  # Cut inside a multi-byte character: still a truncated tail.
  path = _write(tmp_path, _good(), name="utf.jsonl", tail='{"type": "step", "x": "é'.encode()[:-1])
  with pytest.warns(UserWarning):
    assert read_runlog(path, FRAGS).num_steps == 3
  # A bad last line that ends with a newline was written whole: an error, not a cut.
  _expect(_write(tmp_path, _good() + [cut], name="nl.jsonl"), 7, None, FRAGS)
  # A bad line before the last is damage, not a cut.
  _expect(_write(tmp_path, [*_good(), cut], name="mid.jsonl", tail=b'{"type": "step"'), 7,
          None, FRAGS)


def test_writer_leaves_a_valid_prefix(tmp_path):
  path = tmp_path / "run.jsonl"
  w = RunLogWriter(path, HEADER, FRAGS)
  w.eval(0, {"a/p/0": 3.0})
  w.step(0, ["a/t/0"], loss=2.0)
  bad_calls = [
      (lambda: w.step(2, ["a/t/0"]), 4, "step"),
      (lambda: w.step(1, ["a/t/0"], loss=float("nan")), 4, "loss"),
      (lambda: w.step(1, ["zz/9"]), 4, "examples"),
      (lambda: w.step(1, ["a/p/0"]), 4, "examples"),
      (lambda: w.step(1, "a/t/0"), 4, "examples"),
      (lambda: w.step(1, ["a/t/0"], extra={"loss": 1.0}), 4, "loss"),
      (lambda: w.step(1, ["a/t/0"], extra={"blob": object()}), 4, None),
      (lambda: w.eval(2, {"a/p/0": 1.0}), 4, "step"),
      (lambda: w.eval(1, {"a/p/0": np.float32("inf")}), 4, "losses"),
      (lambda: w.eval(1, {"b/x": 1.0}), 4, "losses"),
  ]
  for call, line, field in bad_calls:
    with pytest.raises(RunLogError) as err:
      call()
    assert (err.value.path, err.value.line, err.value.field) == (str(path), line, field)
    log = read_runlog(path, FRAGS)  # readable while the writer is open, after each error
    assert log.num_steps == 1 and log.eval_steps == (0,)
  w.step(1, ["a/t/1"])  # the writer goes on after errors
  w.close()
  w.close()
  assert read_runlog(path, FRAGS).num_steps == 2
  with pytest.raises(ValueError):
    w.step(2, ["a/t/0"])


def test_resume_drops_what_came_after_the_checkpoint_and_goes_on(tmp_path):
  path = tmp_path / "run.jsonl"
  with RunLogWriter(path, HEADER, FRAGS) as w:
    w.eval(0, {"a/p/0": 3.0})
    for t in range(5):
      w.step(t, ["a/t/0", "b/t/0"], loss=2.0 - 0.1 * t)
      if t in (1, 3):
        w.eval(t + 1, {"a/p/0": 2.0 - t})
  with open(path, "ab") as f:
    f.write(b'{"type": "step", "step": 5, "exam')  # killed mid-write
  with pytest.warns(UserWarning, match="incomplete last record"):
    w = RunLogWriter.resume(path, FRAGS, at_step=2)
  log = read_runlog(path, FRAGS)  # valid at once: the kept prefix
  assert log.num_steps == 2 and log.eval_steps == (0, 2)
  assert log.header.extra["loss_on"] == "text"
  with pytest.raises(RunLogError, match="step"):
    w.step(3, ["a/t/0"])  # the restarted run records step 2 next
  w.step(2, ["a/t/1"], loss=1.5)
  w.eval(3, {"a/p/0": 0.5})
  w.close()
  log = read_runlog(path, FRAGS)
  assert [s.examples for s in log.steps][2] == ("a/t/1",) and log.eval_steps == (0, 2, 3)
  with pytest.raises(RunLogError, match="has 3 steps"):
    RunLogWriter.resume(path, FRAGS, at_step=4)
  assert read_runlog(path, FRAGS).num_steps == 3  # a refused resume changes nothing


def test_writer_header_errors_create_no_file(tmp_path):
  path = tmp_path / "run.jsonl"
  with pytest.raises(RunLogError) as err:
    RunLogWriter(path, {**HEADER, "batch_size": 0}, FRAGS)
  assert (err.value.line, err.value.field) == (1, "batch_size")
  with pytest.raises(RunLogError) as err:
    RunLogWriter(path, {**HEADER, "dataset_sha256": "f" * 64}, FRAGS)
  assert err.value.field == "dataset_sha256"
  assert not path.exists()
  RunLogWriter(path, HEADER, FRAGS).close()
  with pytest.raises(FileExistsError):  # a real run's log is not clobbered by accident
    RunLogWriter(path, HEADER, FRAGS)
  RunLogWriter(path, HEADER, FRAGS, overwrite=True, fsync=True).close()


def test_killed_writer_leaves_a_readable_file(tmp_path):
  path = tmp_path / "run.jsonl"
  with RunLogWriter(path, HEADER, FRAGS) as w:
    w.step(0, ["a/t/0"])
  with open(path, "ab") as f:  # what a kill in the middle of a write leaves
    f.write(json.dumps(_step(1)).encode()[:30])
  with pytest.warns(UserWarning):
    assert read_runlog(path, FRAGS).num_steps == 1


def test_order_and_learning_rates(tmp_path):
  log = read_runlog(_write(tmp_path, _good()), FRAGS)
  order_TxB = order_from_runlog(log, FRAGS)
  assert order_TxB.dtype == np.int32
  np.testing.assert_array_equal(order_TxB, [[0, 3], [1, -1], [0, 3]])
  lr_T = learning_rates_from_runlog(log)
  assert lr_T.dtype == np.float32
  np.testing.assert_allclose(lr_T, [1e-3] * 3)
  unknown = RunLog(header=log.header, steps=[StepRecord(0, ("a/t/0", "zz"))])
  with pytest.raises(RunLogError, match="'zz'") as err:
    order_from_runlog(unknown, FRAGS)
  assert err.value.field == "examples"
  empty = RunLog(header=log.header)
  assert order_from_runlog(empty, FRAGS).shape == (0, 0)


def test_missing_file_is_os_error(tmp_path):
  with pytest.raises(OSError):
    read_runlog(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------------------------
# Fuzz: any bytes give a RunLog or a RunLogError naming the file.

_VALID = b"".join((json.dumps(r) + "\n").encode() for r in _good())
_KEYS = ["type", "format", "step", "examples", "loss", "lr", "losses", "optimizer",
         "batch_size", "seed", "dataset_sha256", "run_id", "model"]
_BAD_BYTES = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\n", b"{", b"}", b'"', b"\\",
              b"NaN", b"Infinity", b"-", b"1e999", b"\r"]
_json_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10), st.sampled_from(["header", "step", "eval", "a/t/0", "a/p/0", "\ud800",
                                           FORMAT, "adamw"]),
    st.integers(0, 200_000).map(lambda n: "x" * n),
    st.lists(st.sampled_from(["a/t/0", "a/p/0", "zz", 1, None]), max_size=3),
    st.dictionaries(st.sampled_from(["a/p/0", "zz", "name", "lr", "betas"]),
                    st.floats() | st.integers() | st.none() | st.text(max_size=3), max_size=3))


@st.composite
def _mutated(draw) -> bytes:
  """A valid log put through one to three random edits."""
  data = _VALID
  for _ in range(draw(st.integers(1, 3))):
    op = draw(st.sampled_from(["truncate", "replace", "insert", "value", "drop_key", "nest",
                               "dup_line", "swap_lines", "drop_line"]))
    lines = data.split(b"\n")
    i = draw(st.integers(0, len(lines) - 1))
    if op == "truncate":
      data = data[:draw(st.integers(0, len(data)))]
    elif op == "replace" and data:
      j = draw(st.integers(0, len(data) - 1))
      data = data[:j] + draw(st.sampled_from(_BAD_BYTES) | st.binary(min_size=1, max_size=4)) + \
          data[j + 1:]
    elif op == "insert":
      j = draw(st.integers(0, len(data)))
      data = data[:j] + draw(st.sampled_from(_BAD_BYTES) | st.binary(max_size=4)) + data[j:]
    elif op in ("value", "drop_key", "nest"):
      try:
        rec = json.loads(lines[i])
      except (ValueError, RecursionError):  # an earlier edit broke the line: leave it
        continue
      if not isinstance(rec, dict):
        continue
      key = draw(st.sampled_from(_KEYS))
      if op == "drop_key":
        rec.pop(key, None)
        lines[i] = json.dumps(rec).encode()
      elif op == "value":
        rec[key] = draw(_json_values)
        lines[i] = json.dumps(rec, ensure_ascii=draw(st.booleans())).encode("utf-8",
                                                                            "surrogatepass")
      else:
        n = draw(st.sampled_from([10, 100, 500, 5000, 100_000]))
        rec[key] = "@@"
        lines[i] = json.dumps(rec).replace('"@@"', "[" * n + "]" * n).encode()
      data = b"\n".join(lines)
    elif op == "dup_line":
      data = b"\n".join(lines[:i + 1] + lines[i:])
    elif op == "drop_line":
      data = b"\n".join(lines[:i] + lines[i + 1:])
    elif op == "swap_lines":
      j = draw(st.integers(0, len(lines) - 1))
      lines[i], lines[j] = lines[j], lines[i]
      data = b"\n".join(lines)
  return data


@settings(max_examples=1000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=_mutated(), with_fragments=st.booleans(), allow_tail=st.booleans())
def test_fuzz_reader_raises_only_runlog_error(tmp_path, data, with_fragments, allow_tail):
  path = tmp_path / "fuzz.jsonl"
  path.write_bytes(data)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    try:
      log = read_runlog(path, FRAGS if with_fragments else None,
                        allow_truncated_tail=allow_tail)
    except RunLogError as e:
      assert e.path == str(path)
      return
  # What reads must write back and read again to the same log.
  write_runlog(tmp_path / "again.jsonl", log)
  assert read_runlog(tmp_path / "again.jsonl") == log


@pytest.mark.slow
@settings(max_examples=20_000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=_mutated(), with_fragments=st.booleans(), allow_tail=st.booleans())
def test_fuzz_reader_many_more_inputs(tmp_path, data, with_fragments, allow_tail):
  test_fuzz_reader_raises_only_runlog_error.hypothesis.inner_test(tmp_path, data,
                                                                  with_fragments, allow_tail)
