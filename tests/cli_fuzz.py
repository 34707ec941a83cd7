"""The `surrogate` command fed malformed inputs, in process: the harness behind
tests/test_cli_fuzz.py and benchmarks/fuzz_cli.py.

A *case* is a command line with one input to break: a fragments file, a RunLog, an order
file, one file of a saved simulator folder, or a flag's value. A valid world of files is
written once (`materialize`); each trial copies it, puts the target through one to three
random edits (`edit`), runs `calibrate.cli.main.main` and judges the outcome (`judge`).

Documented outcomes (docs/cli.md): exit 0 (the edits left the input valid), or exit 2 with
one line on stderr that names the broken file (for a flag, the flag). Anything else is a
finding: an exception (a traceback for a user), another exit status, several lines, an output
left behind by a failed command, or a changed input file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
from collections.abc import Callable

from calibrate.cli.main import main
from calibrate.fitting.saved import save
from calibrate.io.runlog import write_runlog
from surrogate.fragments import write_fragments

# The tiny surrogate the raw-simulation cases run when an edit leaves the input valid.
TINY = ["--width", "16", "--depth", "1", "--heads", "2", "--length", "12", "--vocab", "300"]
SIM_FILES = ("simulator.json", "arrays.npz", "tokenizer.json", "fragments.jsonl")


@dataclasses.dataclass(frozen=True)
class Case:
  """A command line (`argv(paths, out)`) and the input it breaks (`target(paths)`)."""
  name: str
  argv: Callable[[dict[str, str], str], list[str]]
  target: Callable[[dict[str, str]], str]
  flag: str | None = None  # a flag whose value is replaced instead of a file edited


def _sim_file(name: str) -> Callable[[dict[str, str]], str]:
  return lambda p: os.path.join(p["sim"], name)


CASES = (
    Case("orders/fragments", lambda p, o: ["orders", "--data", p["frags"], "--kind", "shuffled",
                                           "--steps", "5", "--batch-size", "2", "--out", o],
         lambda p: p["frags"]),
    Case("simulate/fragments", lambda p, o: ["simulate", "--data", p["frags"], "--orders",
                                             p["order"], "--out", o, "--quiet", *TINY],
         lambda p: p["frags"]),
    Case("simulate/order", lambda p, o: ["simulate", "--data", p["frags"], "--orders", p["order"],
                                         "--out", o, "--quiet", *TINY], lambda p: p["order"]),
    Case("fit/run", lambda p, o: ["fit", "--data", p["frags"], "--runs", p["run0"], p["run1"],
                                  "--out", o, "--seeds", "1", "--pretrain-steps", "3",
                                  "--lr-scales", "1", "--quiet", *TINY], lambda p: p["run0"]),
    Case("validate/run", lambda p, o: ["validate", "--sim", p["sim"], "--runs", p["run3"],
                                       p["run4"], "--quiet"], lambda p: p["run3"]),
    Case("what-if/order", lambda p, o: ["what-if", "--sim", p["sim"], "--orders", p["order"],
                                        "--quiet"], lambda p: p["order"]),
    *(Case(f"simulate --sim/{name}", lambda p, o: ["simulate", "--sim", p["sim"], "--orders",
                                                   p["order"], "--out", o, "--quiet"],
           _sim_file(name)) for name in SIM_FILES),
    *(Case(f"screen/{name}", lambda p, o: ["screen", "--sim", p["sim"], "--orders", "2",
                                           "--no-diagnostics", "--quiet"], _sim_file(name))
      for name in ("simulator.json", "arrays.npz")),
    Case("fit/fragments", lambda p, o: ["fit", "--data", p["frags"], "--runs", p["run0"],
                                        p["run1"], "--out", o, "--seeds", "1", "--pretrain-steps",
                                        "3", "--lr-scales", "1", "--quiet", *TINY],
         lambda p: p["frags"]),
    Case("validate/simulator.json", lambda p, o: ["validate", "--sim", p["sim"], "--runs",
                                                  p["run3"], p["run4"], "--quiet"],
         _sim_file("simulator.json")),
    Case("search/arrays.npz", lambda p, o: ["search", "--sim", p["sim"], "--budget", "1",
                                            "--quiet"], _sim_file("arrays.npz")),
    Case("next-run/tokenizer.json", lambda p, o: ["next-run", "--sim", p["sim"], "--candidates",
                                                  "1", "--quiet"], _sim_file("tokenizer.json")),
    Case("report/fragments.jsonl", lambda p, o: ["report", "--sim", p["sim"], "--orders", "2",
                                                 "--budget", "1", "--no-diagnostics", "--out", o,
                                                 "--quiet"], _sim_file("fragments.jsonl")),
    Case("report/run", lambda p, o: ["report", "--sim", p["sim"], "--runs", p["run3"], "--orders",
                                     "2", "--budget", "1", "--no-diagnostics", "--out", o,
                                     "--quiet"], lambda p: p["run3"]),
    Case("what-if --level", lambda p, o: ["what-if", "--sim", p["sim"], "--orders", p["order"],
                                          "--level", "@", "--quiet"],
         lambda p: p["sim"], flag="--level"),
    Case("demo --orders", lambda p, o: ["demo", "--orders", "@", "--out", o, "--quiet"],
         lambda p: p["sim"], flag="--orders"),
    Case("orders --steps", lambda p, o: ["orders", "--data", p["frags"], "--kind", "shuffled",
                                         "--steps", "@", "--batch-size", "2", "--out", o],
         lambda p: p["frags"], flag="--steps"),
    Case("orders --batch-size", lambda p, o: ["orders", "--data", p["frags"], "--kind", "blocked",
                                              "--sequence", "try,import", "--steps", "4",
                                              "--batch-size", "@", "--out", o],
         lambda p: p["frags"], flag="--batch-size"),
    Case("orders --lr", lambda p, o: ["orders", "--data", p["frags"], "--kind", "shuffled",
                                      "--steps", "4", "--batch-size", "2", "--lr", "@",
                                      "--out", o], lambda p: p["frags"], flag="--lr"),
    Case("orders --shares", lambda p, o: ["orders", "--data", p["frags"], "--kind", "blocked",
                                          "--sequence", "try,import", "--steps", "4",
                                          "--batch-size", "2", "--shares", "@", "--out", o],
         lambda p: p["frags"], flag="--shares"),
    Case("search --objective", lambda p, o: ["search", "--sim", p["sim"], "--budget", "1",
                                             "--objective", "@", "--quiet"],
         lambda p: p["sim"], flag="--objective"),
    Case("screen --family", lambda p, o: ["screen", "--sim", p["sim"], "--orders", "2",
                                          "--family", "@", "--no-diagnostics", "--quiet"],
         lambda p: p["sim"], flag="--family"),
)
FLAG_VALUES = ("-1", "0", "nan", "inf", "-inf", "1e400", "abc", "", " ", "1,,2", "=", "x=1",
               "try=-1", "try=nan", "99999999999999999999", "0x10", "1.5", "\u00e9", "all,",
               "blocked,zz")


def materialize(world, sim, root: str) -> dict[str, str]:
  """Writes the valid world: the fragments file, four runs (two calibrate `sim`), an order
  file and `sim` saved. Returns the paths by name."""
  frags, runs = world
  os.makedirs(root, exist_ok=True)
  paths = {"frags": os.path.join(root, "fragments.jsonl"), "sim": os.path.join(root, "sim"),
           "order": os.path.join(root, "order.jsonl")}
  write_fragments(paths["frags"], frags)
  for i in (0, 1, 3, 4):
    paths[f"run{i}"] = os.path.join(root, f"run{i}.jsonl")
    write_runlog(paths[f"run{i}"], runs[i])
  write_runlog(paths["order"], dataclasses.replace(runs[5], evals=()))
  save(sim, paths["sim"])
  return paths


def copy_world(paths: dict[str, str], root: str) -> dict[str, str]:
  """A fresh copy of the world under `root` (a trial must not touch the original)."""
  base = os.path.dirname(paths["frags"])
  shutil.copytree(base, root)
  return {k: os.path.join(root, os.path.relpath(v, base)) for k, v in paths.items()}


def edit(data: bytes, draw) -> bytes:
  """One to three random edits of a file's bytes (`draw(strategy)` is Hypothesis's)."""
  from hypothesis import strategies as st
  for _ in range(draw(st.integers(1, 3))):
    lines = data.split(b"\n")
    i = draw(st.integers(0, max(len(lines) - 1, 0)))
    op = draw(st.sampled_from(["truncate", "empty", "bytes", "value", "drop_key", "drop_line",
                               "dup_line", "swap_lines", "huge", "nest"]))
    if op == "truncate":
      data = data[:draw(st.integers(0, len(data)))]
    elif op == "empty":
      data = b""
    elif op == "bytes":
      j = draw(st.integers(0, len(data)))
      data = data[:j] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\n", b"{", b"\"",
                                               b"NaN", b"\xed\xa0\x80"])) + data[j + 1:]
    elif op in ("value", "drop_key", "huge", "nest"):
      try:
        rec = json.loads(lines[i])
      except (ValueError, RecursionError):
        continue
      if not isinstance(rec, dict) or not rec:
        continue
      key = draw(st.sampled_from(sorted(rec)))
      if op == "drop_key":
        rec.pop(key)
      elif op == "value":
        rec[key] = draw(st.sampled_from([None, -1, 0, 1.5, "x", "", [], {}, True, [1, "a"],
                                         {"name": "adamw"}, "zz/train/0"]))
      elif op == "huge":
        rec[key] = draw(st.sampled_from([1e308, -1e308, 2 ** 63, 10 ** 30, "x" * 100_000]))
      else:
        rec[key] = "@@"
      text = json.dumps(rec)
      if op == "nest":
        text = text.replace('"@@"', "[" * 5000 + "]" * 5000)
      lines[i] = text.encode()
      data = b"\n".join(lines)
    elif op == "drop_line" and lines:
      data = b"\n".join(lines[:i] + lines[i + 1:])
    elif op == "dup_line" and lines:
      data = b"\n".join(lines[:i + 1] + lines[i:])
    elif op == "swap_lines" and lines:
      j = draw(st.integers(0, len(lines) - 1))
      lines[i], lines[j] = lines[j], lines[i]
      data = b"\n".join(lines)
  return data


@dataclasses.dataclass
class Outcome:
  case: str
  code: int | None
  stderr: str
  error: str | None          # an exception's repr: never documented
  left_behind: bool          # an output exists after a failed command
  inputs_changed: list[str]
  names: tuple[str, ...]     # what the message must name (one of them)


def _snapshot(root: str) -> dict[str, bytes]:
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      with open(os.path.join(d, f), "rb") as fh:
        out[os.path.join(d, f)] = fh.read()
  return out


def run(case: Case, paths: dict[str, str], out: str, *, new_bytes: bytes | None = None,
        flag_value: str | None = None, delete: bool = False) -> Outcome:
  """Breaks `case`'s target as told, runs the command in process and records the outcome."""
  target = case.target(paths)
  if case.flag is None:
    if delete:
      os.remove(target)
    else:
      with open(target, "wb") as f:
        f.write(new_bytes)
  argv = [flag_value if a == "@" else a for a in case.argv(paths, out)]
  before = _snapshot(os.path.dirname(paths["frags"]))
  err, code, error = io.StringIO(), None, None
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
      code = main(argv)
    except SystemExit as e:  # argparse's usage errors
      code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # noqa: BLE001 - every exception is a finding
      error = f"{type(e).__name__}: {e}"[:300]
  after = _snapshot(os.path.dirname(paths["frags"]))
  changed = sorted(p for p in before if after.get(p) != before[p])
  # An output folder a failed command created, even empty, is left behind.
  left = code != 0 and os.path.exists(out)
  if case.flag:
    names = (case.flag,)
  elif os.path.dirname(target) == paths["sim"]:
    names = (target, paths["sim"])  # the folder's file, or the folder
  else:
    names = (target,)
  return Outcome(case.name, code, err.getvalue(), error, left, changed, names)


def trial(valid: dict[str, str], case: Case, draw) -> Outcome:
  """One trial on a fresh copy of the world `valid`: the case's target edited (or, for a
  simulator folder's file, sometimes deleted; for a flag, its value replaced) and run."""
  import tempfile
  import warnings

  from hypothesis import strategies as st
  root = tempfile.mkdtemp()
  try:
    paths = copy_world(valid, os.path.join(root, "world"))
    out = os.path.join(root, "out")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      if case.flag is not None:
        return run(case, paths, out, flag_value=draw(st.sampled_from(FLAG_VALUES)))
      if os.path.basename(case.target(paths)) in SIM_FILES and draw(st.booleans()):
        return run(case, paths, out, delete=True)
      with open(case.target(paths), "rb") as f:
        return run(case, paths, out, new_bytes=edit(f.read(), draw))
  finally:
    shutil.rmtree(root)


def judge(o: Outcome) -> list[str]:
  """What is not documented about an outcome (empty: as documented)."""
  problems = []
  if o.error is not None:
    problems.append(f"raised {o.error}")
  elif o.code not in (0, 2):
    problems.append(f"exit status {o.code}")
  elif o.code == 2:
    lines = [line for line in o.stderr.splitlines() if line.strip()]
    if len(lines) != 1:
      problems.append(f"{len(lines)} lines on stderr: {o.stderr[:300]!r}")
    elif not any(n in lines[0] for n in o.names):
      problems.append(f"the message does not name {o.names[0]}: {lines[0][:200]!r}")
  if o.left_behind:
    problems.append("an output was left behind by a failed command")
  if o.inputs_changed:
    problems.append(f"inputs changed: {o.inputs_changed}")
  return problems
