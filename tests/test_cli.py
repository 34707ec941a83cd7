"""The command line, end to end on real text: orders -> simulate -> RunLogs that read back."""

import json

import pytest

from calibrate.cli.main import main
from calibrate.io.runlog import read_runlog
from surrogate.datasets import python_docs
from surrogate.fragments import read_fragments, write_fragments

TINY = ["--width", "16", "--depth", "1", "--heads", "2", "--length", "12", "--vocab", "300"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  path = tmp_path_factory.mktemp("cli") / "fragments.jsonl"
  write_fragments(path, python_docs(("try", "import", "async"), max_train=8, max_probe=3))
  return path


def test_orders_then_simulate_writes_valid_runlogs(data, tmp_path, capsys):
  blocked, mixture = tmp_path / "blocked.jsonl", tmp_path / "mixture.jsonl"
  assert main(["orders", "--data", str(data), "--kind", "blocked", "--sequence", "async,try",
               "--steps", "9", "--batch-size", "2", "--out", str(blocked)]) == 0
  assert main(["orders", "--data", str(data), "--kind", "mixture", "--weights", "try=1,import=3",
               "--steps", "9", "--batch-size", "2", "--seed", "3", "--out", str(mixture)]) == 0
  out = tmp_path / "sim"
  assert main(["simulate", "--data", str(data), "--orders", str(blocked), str(mixture),
               "--out", str(out), "--eval-every", "4", "--quiet", *TINY]) == 0
  frags = read_fragments(data)
  for src in (blocked, mixture):
    given, sim = read_runlog(src, frags), read_runlog(out / src.name, frags)
    assert sim.header.extra["simulated"] is True
    assert sim.header.run_id == given.header.run_id
    assert [s.examples for s in sim.steps] == [s.examples for s in given.steps]
    assert all(s.loss is not None and s.lr is not None for s in sim.steps)
    assert sim.eval_steps == (0, 4, 8, 9)
    probes = {e.id for e in frags.examples if e.split.value == "probe"}
    assert probes <= set(sim.evals[0].losses)
  order = read_runlog(blocked, frags)
  fed = [frags.examples[frags.index[i]].fragment for s in order.steps for i in s.examples]
  assert set(fed[:8]) == {"async"} and fed[-1] == "try"
  assert json.loads(blocked.read_text().splitlines()[0])["order_spec"]["kind"] == "blocked"


def test_bad_input_is_a_clear_error(data, tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(data.read_text().splitlines()[0] + "\n{\"id\": 3}\n")
  assert main(["simulate", "--data", str(bad), "--orders", str(bad), "--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "bad.jsonl, line 2, field 'id'" in err
  assert main(["orders", "--data", str(data), "--kind", "subset", "--keep", "nope", "--steps",
               "3", "--batch-size", "2", "--out", str(tmp_path / "o.jsonl")]) == 2
  assert "unknown fragment 'nope'" in capsys.readouterr().err


def test_fit_validate_and_predict_from_the_command_line(data, tmp_path, capsys):
  # Raw surrogate runs stand in for real ones: orders -> simulate -> fit -> validate -> predict.
  specs = [("shuffled", []), ("blocked", ["--sequence", "async,try,import"]),
           ("blocked", ["--sequence", "import,try,async"]), ("subset", ["--keep", "try,async"]),
           ("interleaved", ["--sequence", "try,import,async"])]
  files = []
  for n, (kind, extra) in enumerate(specs):
    files.append(tmp_path / f"o{n}.jsonl")
    assert main(["orders", "--data", str(data), "--kind", kind, *extra, "--steps", "12",
                 "--batch-size", "3", "--seed", str(n), "--run-id", f"{kind}-{n}",
                 "--out", str(files[-1])]) == 0
  runs = tmp_path / "runs"
  assert main(["simulate", "--data", str(data), "--orders", *map(str, files), "--out", str(runs),
               "--eval-every", "4", "--quiet", "--seed", "7", *TINY]) == 0
  real = [str(runs / f.name) for f in files]
  sim = tmp_path / "sim"
  assert main(["fit", "--data", str(data), "--runs", *real[:2], "--out", str(sim), "--seeds", "2",
               "--pretrain-steps", "20", "--lr-scales", "1", "--quiet", *TINY]) == 0
  out = capsys.readouterr().out
  assert "calibrated on 2 runs" in out and "common gain" in out and "effect error" in out
  assert (sim / "simulator.json").exists() and (sim / "arrays.npz").exists()
  # Runs without order effects are told that the priors decide, and what to run next.
  weight = json.loads((sim / "simulator.json").read_text())["info"]["gain"]["data_weight"]
  assert ("rest on priors" in out and "next-run" in out) == (weight < 0.5)
  assert main(["validate", "--sim", str(sim), "--runs", *real[2:], "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert set(report["methods"]) >= {"simulator", "order_agnostic", "simfluence_linear"}
  assert main(["validate", "--sim", str(sim), "--runs", *real[:3]]) == 2
  assert "used to calibrate" in capsys.readouterr().err
  pred = tmp_path / "pred"
  assert main(["simulate", "--sim", str(sim), "--orders", str(files[3]), real[4],
               "--out", str(pred), "--quiet"]) == 0
  frags = read_fragments(data)
  from_order = read_runlog(pred / files[3].name, frags)
  assert from_order.header.run_id == "subset-3" and from_order.eval_steps == (0, 12)
  from_run = read_runlog(pred / files[4].name, frags)
  assert from_run.eval_steps == read_runlog(real[4], frags).eval_steps
  assert "losses_lo" in from_run.evals[-1].extra
  capsys.readouterr()
  assert main(["what-if", "--sim", str(sim), "--orders", str(files[3]), real[4], "--json",
               "--quiet"]) == 0
  answer = json.loads(capsys.readouterr().out)
  assert [o["run_id"] for o in answer["orders"]] == ["subset-3", "interleaved-4"]
  for o in answer["orders"]:
    assert all(abs(sum(p.values()) - 1) < 1e-9 for p in o["outcomes"].values())
  assert {r["run_id"] for r in answer["ranking"]} == {"subset-3", "interleaved-4"}
  # Screening streams into a results folder; a second call resumes it to the same answer.
  results = tmp_path / "screen"
  screen = ["screen", "--sim", str(sim), "--orders", "6", "--results", str(results), "--json",
            "--quiet"]
  assert main(screen) == 0
  first = json.loads(capsys.readouterr().out)
  assert len(first["orders"]) == 3 and len(first["outcome_probabilities"]) == 3
  assert sum(first["by_family"]["orders"]) == 3 and "interactions" in first
  assert "P(generalizes)" in first["by_family"]["measures"]
  assert main(screen[:-2] + ["--by-family", "nonsense"]) == 2
  assert "--by-family" in capsys.readouterr().err
  assert main(screen + ["--resume"]) == 0
  assert json.loads(capsys.readouterr().out)["outcome_probabilities"] == \
      first["outcome_probabilities"]
  assert main(screen) == 2
  assert "--resume" in capsys.readouterr().err
  best = tmp_path / "best.jsonl"
  assert main(["search", "--sim", str(sim), "--budget", "3", "--objective", "try=1,async=1",
               "--out", str(best), "--quiet"]) == 0
  assert "best of the start set" in capsys.readouterr().out
  assert read_runlog(best, frags).num_steps == 12
  nxt = tmp_path / "next.jsonl"
  assert main(["next-run", "--sim", str(sim), "--orders", str(files[3]), str(files[4]),
               "--out", str(nxt), "--json", "--quiet"]) == 0
  ranked = json.loads(capsys.readouterr().out)["ranked"]
  assert {r["name"] for r in ranked} == {"subset-3", "interleaved-4"}
  assert ranked[0]["disagreement"] >= ranked[1]["disagreement"]
  report = tmp_path / "report"
  assert main(["report", "--sim", str(sim), "--runs", real[0], real[4], "--orders", "4",
               "--budget", "2", "--out", str(report), "--quiet"]) == 0
  assert (report / "report.html").exists() and (report / "interference.png").exists()


@pytest.fixture(scope="module")
def real_tokenizer(tmp_path_factory):
  """A stand-in for a real model's tokenizer.json (its own special token, padding on)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.train_from_iterator(python_docs(("try", "import", "async", "types")).texts_for_tokenizer(),
                        trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"],
                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                            show_progress=False))
  t.enable_padding(length=128)
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  t.save(str(path))
  return path


def test_fit_with_the_real_models_tokenizer(data, real_tokenizer, tmp_path, capsys):
  shape = [a for a in TINY if a not in ("--vocab", "300")]
  order = tmp_path / "order.jsonl"
  assert main(["orders", "--data", str(data), "--kind", "shuffled", "--steps", "12",
               "--batch-size", "3", "--out", str(order)]) == 0
  runs = tmp_path / "runs"
  assert main(["simulate", "--data", str(data), "--orders", str(order), "--out", str(runs),
               "--eval-every", "4", "--quiet", "--tokenizer", str(real_tokenizer), *shape]) == 0
  again = tmp_path / "again.jsonl"
  assert main(["orders", "--data", str(data), "--kind", "blocked", "--sequence",
               "async,try,import", "--steps", "12", "--batch-size", "3", "--out", str(again)]) == 0
  assert main(["simulate", "--data", str(data), "--orders", str(again), "--out", str(runs),
               "--eval-every", "4", "--quiet", "--seed", "3", *TINY]) == 0
  sim = tmp_path / "sim"
  capsys.readouterr()
  assert main(["fit", "--data", str(data), "--runs", str(runs / order.name),
               str(runs / again.name), "--out", str(sim), "--seeds", "2", "--pretrain-steps",
               "10", "--lr-scales", "1", "--quiet", "--tokenizer", str(real_tokenizer),
               *shape]) == 0
  out = capsys.readouterr().out
  vocab = json.loads((sim / "simulator.json").read_text())["model"]["vocab_size"]
  assert f"the real tokenizer's {vocab - 2} tokens that occur" in out and vocab < 700
  # The saved simulator reads with its compacted tokenizer and predicts.
  assert main(["simulate", "--sim", str(sim), "--orders", str(order), "--out",
               str(tmp_path / "pred"), "--quiet"]) == 0
  assert main(["fit", "--data", str(data), "--runs", str(runs / order.name), "--out", str(sim),
               "--tokenizer", str(real_tokenizer), "--vocab", "300"]) == 2
  assert "--vocab sizes" in capsys.readouterr().err
  (tmp_path / "junk.json").write_text("{not json")
  assert main(["simulate", "--data", str(data), "--orders", str(order), "--out", str(runs),
               "--tokenizer", str(tmp_path / "junk.json")]) == 2
  assert "junk.json: not a readable tokenizer.json" in capsys.readouterr().err


def _subparsers():
  import argparse

  from calibrate.cli.main import build_parser
  parser = build_parser()
  sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
  return parser, sub.choices


def test_every_command_is_listed_and_every_option_explained():
  parser, commands = _subparsers()
  top = parser.format_help()
  for name, p in commands.items():
    assert name in top
    for action in p._actions:
      if action.dest != "help":
        assert action.help, f"surrogate {name} {action.option_strings}: no help text"
  # Every command that prints results can print them as JSON.
  assert all(any("--json" in a.option_strings for a in p._actions) for p in commands.values())


def test_version(capsys):
  with pytest.raises(SystemExit) as e:
    main(["--version"])
  assert e.value.code == 0 and capsys.readouterr().out.startswith("surrogate ")


def test_bad_input_is_one_line_and_exit_2(data, tmp_path, capsys):
  missing = tmp_path / "missing.jsonl"
  assert main(["simulate", "--data", str(missing), "--orders", str(missing), "--out",
               str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and str(missing) in err and "Traceback" not in err
  assert main(["validate", "--sim", str(tmp_path), "--runs", str(missing)]) == 2
  assert "simulator.json is missing" in capsys.readouterr().err
  assert main(["orders", "--data", str(data), "--kind", "blocked", "--sequence", "nope",
               "--steps", "3", "--batch-size", "2", "--out", str(tmp_path / "o.jsonl")]) == 2
  assert "unknown fragment 'nope'" in capsys.readouterr().err
  for bad, says in [(["--kind", "blocked", "--shares", "x"], "--shares: 'x'"),
                    (["--kind", "mixture", "--weights", "try=-1"], "weights must be >= 0"),
                    (["--kind", "shuffled", "--steps", "0"], "argument --steps: must be an integer")]:
    args = ["orders", "--data", str(data), "--steps", "3", "--batch-size", "2", "--out",
            str(tmp_path / "o.jsonl"), *bad]
    try:
      code = main(args)
    except SystemExit as e:                             # argparse's checks of flag values
      code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
  assert not (tmp_path / "o.jsonl").exists()           # nothing written on bad input
  order = tmp_path / "good.jsonl"
  assert main(["orders", "--data", str(data), "--kind", "shuffled", "--steps", "3",
               "--batch-size", "2", "--out", str(order)]) == 0
  capsys.readouterr()
  assert main(["simulate", "--data", str(data), "--orders", str(order), "--out",
               str(tmp_path / "out"), "--heads", "3", "--width", "16"]) == 2
  assert "heads=3 must divide width=16" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:                  # argparse's own usage errors
    main(["orders", "--data", str(data)])
  assert e.value.code == 2


def test_json_output_is_strict(data, tmp_path, capsys):
  assert main(["orders", "--data", str(data), "--kind", "shuffled", "--steps", "3",
               "--batch-size", "2", "--out", str(tmp_path / "o.jsonl"), "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["steps"] == 3 and out["wrote"].endswith("o.jsonl")
  import numpy as np

  from surrogate.jsonl import json_safe
  assert json_safe({"a": [1.0, float("nan")], "b": np.float32(np.inf), "c": np.arange(2)}) == {
      "a": [1.0, None], "b": None, "c": [0, 1]}


def test_an_order_file_without_steps_is_named_not_a_crash(data, tmp_path, capsys):
  order = tmp_path / "empty.jsonl"
  assert main(["orders", "--data", str(data), "--kind", "shuffled", "--steps", "3",
               "--batch-size", "2", "--out", str(order)]) == 0
  order.write_text(order.read_text().splitlines()[0] + "\n")      # the header alone
  capsys.readouterr()
  assert main(["simulate", "--data", str(data), "--orders", str(order), "--out",
               str(tmp_path / "out"), "--quiet", *TINY]) == 2
  err = capsys.readouterr().err
  assert f"{order}: the order has no steps" in err and "Traceback" not in err
