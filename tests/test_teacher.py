"""Teacher files: a tiny real GPT-2's next-token distributions, kept top-k, saved and checked."""

import dataclasses
import json

import numpy as np
import pytest

from calibrate.io.teacher import load_teacher, save_teacher, teach
from surrogate.datasets import python_docs
from surrogate.errors import CalibrationError
from surrogate.tokenize import train_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

K, LENGTH = 5, 12  # distinct from the vocabulary (300), the texts and the width


def tiny_real_model(texts, vocab_size, folder, seed):
  """A tiny real GPT-2 (random weights) and its tokenizer, saved as `folder/tokenizer.json`."""
  path = folder / "tokenizer.json"
  train_tokenizer(texts, vocab_size).save(str(path))
  tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<bos>",
                                             pad_token="<pad>")
  torch.manual_seed(seed)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1,
      eos_token_id=1))
  return tok, path, model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  frags = python_docs(("try", "import", "async"), max_train=4, max_probe=2)
  return (frags, *tiny_real_model(frags.texts_for_tokenizer(), 300,
                                  tmp_path_factory.mktemp("tok"), 0))


def test_teacher_keeps_the_models_own_top_k(setup):
  frags, tok, path, model = setup
  t = teach(model, tok, frags, tokenizer_file=path, neutral_texts=["a neutral text here"],
            k=K, length=LENGTH, batch_size=3, chunk=7, progress=False)
  n = len(frags.examples) + 1
  assert t.top_ids_NxLxK.shape == (n, LENGTH, K) and t.num_examples == n - 1
  assert t.source_N[-1] == -1 and (t.source_N[:-1] == np.arange(n - 1)).all()
  # An independent computation: the full softmax of one text at once.
  for row in (0, n - 1):
    ids = t.ids_NxL[row][t.ids_NxL[row] >= 0]
    with torch.no_grad():
      logp = torch.log_softmax(model(torch.tensor(ids)[None]).logits[0], -1).numpy()
    want = np.argsort(-logp, -1)[:, :K]
    np.testing.assert_array_equal(t.top_ids_NxLxK[row, :len(ids)], want)
    top = np.take_along_axis(logp, want, -1)
    np.testing.assert_allclose(t.top_logp_NxLxK[row, :len(ids)], top, atol=2e-2, rtol=2e-3)
    rest = np.log1p(-np.exp(top).sum(-1))
    np.testing.assert_allclose(t.rest_logp_NxL[row, :len(ids)], rest, atol=2e-2, rtol=2e-3)


def test_teacher_round_trip_and_clear_errors(setup, tmp_path):
  frags, tok, path, model = setup
  t = teach(model, tok, frags, tokenizer_file=path, k=K, length=LENGTH, progress=False)
  save_teacher(t, tmp_path / "teacher")
  save_teacher(t, tmp_path / "teacher")  # replacing one in place
  back = load_teacher(tmp_path / "teacher")
  for a in ("ids_NxL", "top_ids_NxLxK", "top_logp_NxLxK", "rest_logp_NxL", "source_N"):
    np.testing.assert_array_equal(getattr(back, a), getattr(t, a))
  back.check_matches(frags, where="teacher", tokenizer_sha256=t.tokenizer_sha256)
  other = python_docs(("try", "naming"), max_train=4, max_probe=2)
  with pytest.raises(CalibrationError, match=r"fragments file with sha256 .*not .*sha256"):
    back.check_matches(other, where="teacher")
  with pytest.raises(CalibrationError, match=r"tokenizer of sha256 .*not the one given"):
    back.check_matches(frags, where="teacher", tokenizer_sha256="0" * 64)
  meta = tmp_path / "teacher" / "teacher.json"
  m = json.loads(meta.read_text())
  meta.write_text(json.dumps({**m, "k": "five"}))
  with pytest.raises(CalibrationError, match="teacher.json, field k"):
    load_teacher(tmp_path / "teacher")
  meta.write_text(json.dumps({**m, "k": K + 1}))
  with pytest.raises(CalibrationError, match="array top_ids_NxLxK: shape"):
    load_teacher(tmp_path / "teacher")
  with pytest.raises(CalibrationError, match="no teacher here"):
    load_teacher(tmp_path / "nowhere")


def test_targets_follow_the_teachers_own_tokens(setup):
  from calibrate.io.teacher import targets
  from surrogate.prepare import model_config_for
  from surrogate.tokenize import BOS_ID
  frags, tok, path, model = setup
  t = teach(model, tok, frags, tokenizer_file=path, k=K, length=LENGTH, progress=False)
  cfg, compact = model_config_for(frags, real_tokenizer=t.tokenizer(), length=LENGTH,
                                  neutral_texts=[])
  goal = targets(t, compact, cfg.vocab_size, LENGTH)
  assert goal.tokens_NxL1.shape == (len(frags.examples), LENGTH + 1)
  assert (goal.tokens_NxL1[:, 0] == BOS_ID).all() and (goal.weight_NxL[:, 0] == 0).all()
  # Every example's text is in the compacted vocabulary: its rows are its real tokens,
  # renumbered, and the teacher's distributions apply wherever it has a next token.
  text = t.tokenizer().decode(t.ids_NxL[0][t.ids_NxL[0] >= 0].tolist())
  again = compact.encode(text, add_special_tokens=False).ids[:LENGTH]
  n = len(again)
  assert goal.tokens_NxL1[0, 1:1 + n].tolist() == again
  assert goal.weight_NxL[0, 1:n + 1].sum() == min(n, LENGTH - 1)
  total = np.exp(goal.top_logp_NxLxK[0, 1]).sum() + np.exp(goal.rest_logp_NxL[0, 1])
  assert total == pytest.approx(1.0, abs=1e-2)
  other_tok = train_tokenizer([e.text or e.prompt for e in frags.examples], 280)
  with pytest.raises(CalibrationError, match="another"):
    targets(t, other_tok, 280, LENGTH)


def test_distillation_lowers_the_kl_to_the_teacher(setup):
  import jax

  from calibrate.io.teacher import targets
  from surrogate import model as model_lib
  from surrogate.distill import distill_ensemble, distill_kl
  from surrogate.prepare import model_config_for
  frags, tok, path, model = setup
  t = teach(model, tok, frags, tokenizer_file=path, k=K, length=LENGTH, progress=False)
  cfg, compact = model_config_for(frags, real_tokenizer=t.tokenizer(), length=LENGTH,
                                  neutral_texts=[], width=16, depth=1, heads=2, mlp_ratio=2)
  goal = targets(t, compact, cfg.vocab_size, LENGTH)
  keys = jax.random.split(jax.random.key(0), 2)
  params_S = jax.vmap(lambda k: model_lib.init_params(k, cfg))(keys)
  first = lambda p: jax.tree.map(lambda a: a[0], p)  # noqa: E731
  before = distill_kl(first(params_S), goal, cfg)
  after_S, loss_SxT = distill_ensemble(params_S, goal, cfg=cfg, key=jax.random.key(1), steps=80)
  after = distill_kl(first(after_S), goal, cfg)
  assert loss_SxT.shape == (2, 80) and before > 0
  assert after < 0.7 * before, (before, after)


def test_fit_with_a_teacher_end_to_end(world, tmp_path):
  import jax
  from self_made import NEUTRAL

  from calibrate.fitting.fit import FitConfig, fit
  from calibrate.fitting.runs import predict_runs
  from surrogate.prepare import model_config_for
  frags, runs = world
  tok, path, real = tiny_real_model(frags.texts_for_tokenizer() + NEUTRAL, 320, tmp_path, 1)
  t = teach(real, tok, frags, tokenizer_file=path, neutral_texts=NEUTRAL[:20], k=K,
            length=LENGTH, progress=False)
  save_teacher(t, tmp_path / "teacher")
  t = load_teacher(tmp_path / "teacher")
  cfg, compact = model_config_for(frags, real_tokenizer=t.tokenizer(), length=LENGTH,
                                  neutral_texts=NEUTRAL, width=16, depth=2, heads=2, mlp_ratio=2)
  config = FitConfig(seeds=2, pretrain_steps=20, distill_steps=60, lr_scales=(1.0,))
  sim = fit(frags, runs[:3], model_cfg=cfg, tokenizer=compact, teacher=t, config=config,
            key=jax.random.key(0), neutral_texts=NEUTRAL, progress=False)
  info = sim.fit_info.distillation
  assert info is not None and info.steps == 60 and info.kl_after < info.kl_before
  pred = predict_runs(sim, [runs[3]])
  assert np.isfinite(pred.mean_NxCxM).all()
  other = python_docs(("try", "naming"), max_train=4, max_probe=2)
  foreign = dataclasses.replace(t, dataset_sha256=other.sha256)
  with pytest.raises(CalibrationError, match="fragments file with sha256"):
    fit(frags, runs[:3], model_cfg=cfg, tokenizer=compact, teacher=foreign, config=config,
        key=jax.random.key(0), neutral_texts=NEUTRAL, progress=False)


def test_cli_teach_then_fit_refuses_another_tokenizer(setup, tmp_path, capsys):
  from calibrate.cli.main import main
  from surrogate.fragments import write_fragments
  frags, tok, path, model = setup
  model_dir = tmp_path / "base"
  model.save_pretrained(model_dir)
  (model_dir / "tokenizer.json").write_text(path.read_text())
  data = tmp_path / "fragments.jsonl"
  write_fragments(str(data), list(frags.examples))
  out = tmp_path / "teacher"
  assert main(["teach", "--model", str(model_dir), "--data", str(data), "--out", str(out),
               "--k", str(K), "--length", str(LENGTH), "--json"]) == 0
  said = json.loads(capsys.readouterr().out)
  assert said["examples"] == len(frags.examples) and load_teacher(out).k == K
  other = tmp_path / "other.json"
  train_tokenizer([e.text or e.prompt for e in frags.examples], 280).save(str(other))
  code = main(["fit", "--data", str(data), "--runs", str(data), "--out", str(tmp_path / "sim"),
               "--teacher", str(out), "--tokenizer", str(other), "--quiet"])
  err = capsys.readouterr().err
  assert code == 2 and "other.json" in err and str(out) in err and err.count("\n") == 1
