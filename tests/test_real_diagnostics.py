"""The five diagnostics measured on a real (tiny) model by the recorders, checked against a
computation written out here from saved model states, and their RunLog field."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from calibrate.io.runlog import DIAGNOSTIC_NAMES, RunLogError, read_runlog
from surrogate import orders
from surrogate.datasets import python_docs
from surrogate.tokenize import train_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("calibrate.io.hf")
from calibrate.io.diagnostics import RealDiagnostics, choose_probes  # noqa: E402
from calibrate.io.recorders import Recorder  # noqa: E402

PROBES = 2


@pytest.fixture(scope="module")
def frags():
  return python_docs(("try", "import", "async"), max_train=8, max_probe=3)


@pytest.fixture(scope="module")
def tok(frags):
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=train_tokenizer(frags.texts_for_tokenizer(), 300),
      bos_token="<bos>", pad_token="<pad>")


def _model(tok, attn="sdpa"):
  """A tiny GPT-2; the recorders get the fused kernel (switched to eager for the maps)."""
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=24, n_layer=2,
                                n_head=3, bos_token_id=tok.bos_token_id,
                                attn_implementation=attn)
  return transformers.GPT2LMHeadModel(cfg)


def _losses(model, ds, positions):
  return hf.example_losses(model, ds, positions, hf.pad_collator(ds.tokenizer))


def _record_fed_on_first_fragment(tmp_path, frags, tok, steps=6, every=3):
  """Trains on fragment 0 only, recording diagnostics; returns the log and saved states."""
  ds = hf.FragmentsDataset(frags, tok, max_length=64)
  model = _model(tok)
  states = {0: copy.deepcopy(model.state_dict())}
  diag = RealDiagnostics(model, ds, probes_per_fragment=PROBES)
  evals = frags.probe_indices().tolist() + [p[0] for p in frags.train_pools()]
  opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
  pool = frags.train_pools()[0]
  path = tmp_path / "fed.jsonl"
  with Recorder(path, frags, run_id="fed", model="gpt2-tiny",
                optimizer={"name": "adamw", "lr": 3e-3}, batch_size=4) as rec:
    ids = [e.id for e in frags.examples]
    losses = _losses(model, ds, evals)
    rec.eval(0, losses, diagnostics=diag.measure(model, losses))
    for t in range(steps):
      batch_pos = pool[(4 * t + np.arange(4)) % len(pool)]
      loss = model(**hf.pad_collator(tok)([ds[int(i)] for i in batch_pos])).loss
      opt.zero_grad()
      loss.backward()
      opt.step()
      rec.step([ids[int(i)] for i in batch_pos], loss.detach(), 3e-3)
      if (t + 1) % every == 0:
        states[t + 1] = copy.deepcopy(model.state_dict())
        losses = _losses(model, ds, evals)
        rec.eval(t + 1, losses, diagnostics=diag.measure(model, losses))
  return read_runlog(path, frags), states, ds


def _by_hand(frags, tok, ds, state0, state, losses):
  """The five diagnostics from the definitions, in numpy, from two saved states."""
  def outputs(state):
    model = _model(tok, attn="eager")
    model.load_state_dict(state)
    model.eval()
    out = []
    for pos in choose_probes(frags, PROBES):
      for i in pos:
        ids = ds[int(i)]["input_ids"][None]
        with torch.no_grad():
          o = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
        out.append((ids[0].numpy(), np.stack([a[0].numpy() for a in o.attentions]),
                    o.hidden_states[-1][0].numpy().astype(np.float64),
                    torch.log_softmax(o.logits[0].double(), -1).numpy()))
    return model.get_input_embeddings().weight.detach().numpy().astype(np.float64), out

  e0, base = outputs(state0)
  e1, now = outputs(state)
  result, p = {}, 0
  for f, pos in enumerate(choose_probes(frags, PROBES)):
    rows = list(zip(base[p:p + len(pos)], now[p:p + len(pos)]))
    p += len(pos)
    toks = np.unique(np.concatenate([b[0] for b, _ in rows]))
    drift = np.sqrt(((e1[toks] - e0[toks]) ** 2).sum() / (e0[toks] ** 2).sum())
    js, kl = [], []
    for (_, a0, _, l0), (_, a1, _, l1) in rows:
      for q in range(a0.shape[-1]):
        per = []
        for k in range(a0.shape[0]):
          for h in range(a0.shape[1]):
            x, y = a1[k, h, q, : q + 1].astype(np.float64), a0[k, h, q, : q + 1]
            m = (x + y) / 2
            per.append(0.5 * (x * np.log(x / m)).sum() + 0.5 * (y * np.log(y / m)).sum())
        js.append(np.mean(per))
        kl.append((np.exp(l0[q]) * (l0[q] - l1[q])).sum())
    x = np.concatenate([b[2] for b, _ in rows])
    y = np.concatenate([n[2] for _, n in rows])
    x, y = x - x.mean(0), y - y.mean(0)
    cka = np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    name = frags.names[f]
    probe = [v for k, v in losses.items() if k.startswith(f"{name}/probe/")]
    train = [v for k, v in losses.items() if k.startswith(f"{name}/train/")]
    result[name] = {"embedding_drift": drift, "attention_shift": np.mean(js),
                    "plasticity": 1 - cka, "logit_shift": np.mean(kl),
                    "robustness": np.mean(probe) - np.mean(train)}
  return result


def test_recorded_diagnostics_match_the_definitions_on_saved_states(frags, tok, tmp_path):
  log, states, ds = _record_fed_on_first_fragment(tmp_path, frags, tok)
  assert [e.step for e in log.evals] == [0, 3, 6]
  for ev in log.evals:
    expected = _by_hand(frags, tok, ds, states[0], states[ev.step], ev.losses)
    assert set(ev.diagnostics) == set(frags.names)
    for name in frags.names:
      for key in DIAGNOSTIC_NAMES:
        got, want = ev.diagnostics[name][key], expected[name][key]
        assert got == pytest.approx(want, rel=2e-3, abs=2e-6), (ev.step, name, key)


def test_zero_at_the_start_and_growing_on_the_fed_fragment(frags, tok, tmp_path):
  log, _, _ = _record_fed_on_first_fragment(tmp_path, frags, tok)
  fed = frags.names[0]
  first, mid, last = (e.diagnostics for e in log.evals)
  for name in frags.names:
    for key in ("embedding_drift", "attention_shift", "plasticity", "logit_shift"):
      assert first[name][key] == pytest.approx(0.0, abs=1e-5), (name, key)
  for key in ("embedding_drift", "attention_shift", "plasticity", "logit_shift"):
    assert 0 < mid[fed][key] < last[fed][key], key
  # Its train loss falls below its probe loss: the generalization gap opens.
  assert last[fed]["robustness"] > first[fed]["robustness"]


def test_runlog_diagnostics_field_round_trips_and_bad_values_are_named(frags, tmp_path):
  ids = [e.id for e in frags.examples]
  path = tmp_path / "r.jsonl"
  d = {frags.names[0]: {"embedding_drift": 0.5, "robustness": float("nan")}}
  with Recorder(path, frags, run_id="r", model="m", optimizer={"name": "sgd", "lr": 0.1},
                batch_size=1) as rec:
    rec.eval(0, {ids[0]: 1.0}, diagnostics=d)
  ev = read_runlog(path, frags).evals[0]
  assert ev.diagnostics == {frags.names[0]: {"embedding_drift": 0.5, "robustness": None}}
  lines = path.read_text().splitlines()
  for bad, field in [({"nope": {"plasticity": 0.1}}, "diagnostics.nope"),
                     ({frags.names[0]: {"drift": 0.1}}, f"diagnostics.{frags.names[0]}"),
                     ({frags.names[0]: {"plasticity": "x"}},
                      f"diagnostics.{frags.names[0]}.plasticity")]:
    rec = json.loads(lines[1])
    rec["diagnostics"] = bad
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], json.dumps(rec)]) + "\n")
    with pytest.raises(RunLogError) as err:
      read_runlog(tmp_path / "bad.jsonl", frags)
    assert "line 2" in str(err.value) and field in str(err.value)
    with Recorder(tmp_path / "w.jsonl", frags, run_id="r", model="m", overwrite=True,
                  optimizer={"name": "sgd", "lr": 0.1}, batch_size=1) as writer:
      with pytest.raises(RunLogError):
        writer.eval(0, {ids[0]: 1.0}, diagnostics=bad)
    assert len(read_runlog(tmp_path / "w.jsonl", frags).evals) == 0  # nothing half written


def test_trainer_path_records_diagnostics_at_every_eval(frags, tok, tmp_path):
  import jax
  ds = hf.FragmentsDataset(frags, tok, max_length=64)
  order = orders.shuffled(frags.train_pools(), key=jax.random.key(0), steps=4, batch_size=4)
  args = transformers.TrainingArguments(
      output_dir=str(tmp_path / "out"), logging_steps=1, learning_rate=3e-3, max_steps=4,
      per_device_train_batch_size=4, report_to=[], save_strategy="no", use_cpu=True,
      disable_tqdm=True)
  trainer = hf.OrderedTrainer(order, model=_model(tok), args=args, train_dataset=ds,
                              data_collator=hf.pad_collator(tok))
  path = tmp_path / "t.jsonl"
  trainer.add_callback(hf.RunLogCallback(trainer, path, run_id="t", eval_every=2,
                                         eval_train=1, diagnostics=PROBES, report=False))
  trainer.train()
  log = read_runlog(path, frags)
  assert [e.step for e in log.evals] == [0, 2, 4]
  assert all(set(e.diagnostics) == set(frags.names) for e in log.evals)
  assert log.evals[0].diagnostics[frags.names[1]]["logit_shift"] == pytest.approx(0, abs=1e-6)
  assert all(log.evals[-1].diagnostics[n]["logit_shift"] > 0 for n in frags.names)


def test_diagnostics_arrays_read_a_log_in_fragment_order(frags, tok, tmp_path):
  from calibrate.io.runlog import diagnostics_arrays
  log, _, _ = _record_fed_on_first_fragment(tmp_path, frags, tok)
  names = list(reversed(frags.names))
  steps, arrays = diagnostics_arrays(log, names)
  assert steps == (0, 3, 6) and set(arrays) == set(DIAGNOSTIC_NAMES)
  assert arrays["logit_shift"].shape == (3, len(names))
  assert arrays["logit_shift"][2, -1] == log.evals[2].diagnostics[frags.names[0]]["logit_shift"]


def test_diagnostic_agreement_ranks_across_orders():
  from calibrate.fitting.metrics import diagnostic_agreement
  rng = np.random.default_rng(0)
  real = rng.normal(size=(9, 4))
  same = diagnostic_agreement(3 * real + 1, real)  # scale-free
  assert same["median"] == pytest.approx(1.0) and same["predicted"]
  flipped = diagnostic_agreement(-real, real)
  assert flipped["median"] == pytest.approx(-1.0) and not flipped["predicted"]
  real[:, 2] = 0.5  # a constant fragment has no rank: left out of the median
  part = diagnostic_agreement(real, real)
  assert np.isnan(part["per_fragment"][2]) and part["median"] == pytest.approx(1.0)
  assert np.isnan(diagnostic_agreement(np.zeros((3, 2)), np.zeros((3, 2)))["median"])
