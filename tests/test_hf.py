"""The Hugging Face Trainer path: tiny real GPT-2s trained a few steps under an order.

Gradient accumulation, a resumed run, a `peft` adapter and the header taken from the
trainer; the two-process run is in test_hf_ddp.py.
"""

import numpy as np
import pytest

from calibrate.io.runlog import order_from_runlog, read_runlog
from surrogate import orders
from surrogate.datasets import python_docs
from surrogate.optim import OptimizerConfig, learning_rates
from surrogate.tokenize import train_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("calibrate.io.hf")
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# Runs that should be equal: exact on transformers 5; 4.x logs step losses rounded to 4
# decimals, and its accumulation and DDP loss normalisation differ by up to 6e-4 in eval
# losses after four steps (measured with 4.46.3).
LOSS_TOL, EVAL_TOL = (1e-5, 1e-5) if TRANSFORMERS_5 else (5e-4, 1e-3)


@pytest.fixture(scope="module")
def frags():
  return python_docs(("try", "import", "async"), max_train=8, max_probe=2)


@pytest.fixture(scope="module")
def tok(frags):
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=train_tokenizer(frags.texts_for_tokenizer(), 300),
      bos_token="<bos>", pad_token="<pad>")


def _model(tok, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1,
                                n_head=2, bos_token_id=tok.bos_token_id, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: runs compare exactly
  return transformers.GPT2LMHeadModel(cfg)


def _order(frags, steps, batch, seed=0):
  import jax
  return orders.shuffled(frags.train_pools(), key=jax.random.key(seed), steps=steps,
                         batch_size=batch)


def _args(tmp_path, **kw):
  base = dict(output_dir=str(tmp_path / "out"), logging_steps=1, learning_rate=1e-3,
              lr_scheduler_type="linear", warmup_steps=2, report_to=[], save_strategy="no",
              use_cpu=True, seed=0, disable_tqdm=True)
  return transformers.TrainingArguments(**{**base, **kw})


def _token_mean_loss(model, ds, positions):
  """The batch's loss as the Trainer defines it: the mean over all its loss tokens."""
  batch = hf.pad_collator(ds.tokenizer)([ds[i] for i in positions])
  with torch.no_grad():
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
  tgt = batch["labels"][:, 1:]
  ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tgt.clamp(min=0),
                                         reduction="none")
  valid = tgt != -100
  return float((ce * valid).sum() / valid.sum())


def _train(tmp_path, frags, tok, order, path, *, micro, accum, resume=None, stop_at=None,
           **kw):
  ds = hf.FragmentsDataset(frags, tok, max_length=32)
  model = _model(tok)
  args = _args(tmp_path, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
               max_steps=len(order), **kw)
  trainer = hf.OrderedTrainer(order, model=model, args=args, train_dataset=ds,
                              data_collator=hf.pad_collator(tok))
  trainer.add_callback(hf.RunLogCallback(trainer, path, run_id="r", model="gpt2-tiny",
                                         eval_every=2, eval_train=1))
  if stop_at is not None:
    trainer.add_callback(_Crash(stop_at))
  trainer.train(resume_from_checkpoint=resume)
  return trainer, ds


class _Crash(transformers.TrainerCallback):
  """Dies in optimizer step `step` + 1 (before its log record), as a preempted job does."""

  def __init__(self, step):
    self.step = step

  def on_step_end(self, args, state, control, **kw):
    if state.global_step == self.step + 1:
      raise KeyboardInterrupt("preempted")


def test_accumulation_feeds_and_records_the_order(frags, tok, tmp_path):
  order = _order(frags, 6, 8)
  path = tmp_path / "accum.jsonl"
  before = _token_mean_loss(_model(tok), hf.FragmentsDataset(frags, tok, max_length=32),
                            order[0])
  trainer, ds = _train(tmp_path, frags, tok, order, path, micro=4, accum=2)
  log = read_runlog(path, frags)
  np.testing.assert_array_equal(order_from_runlog(log, frags), order)
  assert log.eval_steps == (0, 2, 4, 6)
  # Step 0's loss is the base model's token mean over the whole effective batch of 8.
  assert log.steps[0].loss == pytest.approx(before, abs=1e-5)
  # The rate of each step is the one it used: HF's linear warmup from 0, then decay to 0.
  lr = 1e-3 * np.array([0, 0.5, 1, 0.75, 0.5, 0.25])
  np.testing.assert_allclose([s.lr for s in log.steps], lr, rtol=1e-6, atol=1e-12)
  # ... and the header says so: the surrogate's schedule from it gives the same rates.
  h = log.header
  assert (h.extra["grad_accum"], h.extra["world_size"], h.batch_size) == (2, 1, 8)
  cfg = OptimizerConfig.from_dict(h.optimizer)
  np.testing.assert_allclose(learning_rates(cfg, 6), lr, rtol=1e-6, atol=1e-9)
  assert h.optimizer["grad_clip"] == 1.0 and h.optimizer["name"] == "adamw"
  assert "adapter" not in h.extra


def test_accumulation_trains_as_one_big_batch(frags, tok, tmp_path):
  """2 micro-batches of 4 give the same run as one batch of 8 (up to float noise)."""
  order = _order(frags, 4, 8)
  _train(tmp_path / "a", frags, tok, order, tmp_path / "a.jsonl", micro=4, accum=2)
  _train(tmp_path / "b", frags, tok, order, tmp_path / "b.jsonl", micro=8, accum=1)
  a, b = read_runlog(tmp_path / "a.jsonl", frags), read_runlog(tmp_path / "b.jsonl", frags)
  np.testing.assert_allclose([s.loss for s in a.steps], [s.loss for s in b.steps],
                             atol=LOSS_TOL)
  last_a, last_b = a.evals[-1].losses, b.evals[-1].losses
  np.testing.assert_allclose([last_a[k] for k in last_b], list(last_b.values()), atol=EVAL_TOL)


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4.x cannot reload its own RNG "
                    "state under torch >= 2.6 (torch.load's weights_only default)")
def test_a_resumed_run_leaves_one_log_equal_to_an_uninterrupted_one(frags, tok, tmp_path):
  order = _order(frags, 8, 4)
  whole = tmp_path / "whole.jsonl"
  _train(tmp_path / "w", frags, tok, order, whole, micro=4, accum=1)
  cut = tmp_path / "cut.jsonl"
  out = tmp_path / "c"
  with pytest.raises(KeyboardInterrupt):
    _train(out, frags, tok, order, cut, micro=4, accum=1, stop_at=5, save_strategy="steps",
           save_steps=4)
  assert read_runlog(cut, frags).num_steps == 5  # step 4 came after the checkpoint
  _train(out, frags, tok, order, cut, micro=4, accum=1, resume=str(out / "out" / "checkpoint-4"),
         save_strategy="steps", save_steps=4)
  a, b = read_runlog(whole, frags), read_runlog(cut, frags)
  np.testing.assert_array_equal(order_from_runlog(b, frags), order)
  assert a.eval_steps == b.eval_steps
  np.testing.assert_allclose([s.loss for s in b.steps], [s.loss for s in a.steps], atol=1e-4)
  np.testing.assert_allclose([s.lr for s in b.steps], [s.lr for s in a.steps], rtol=1e-6)
  for ea, eb in zip(a.evals, b.evals):
    np.testing.assert_allclose([eb.losses[k] for k in ea.losses], list(ea.losses.values()),
                               atol=1e-4)


def test_the_batching_must_match_the_order(frags, tok, tmp_path):
  order = _order(frags, 3, 8)
  ds = hf.FragmentsDataset(frags, tok, max_length=32)
  for kw, match in ((dict(per_device_train_batch_size=4, gradient_accumulation_steps=1,
                          max_steps=3), "4 x 1 x 1 = 4"),
                    (dict(per_device_train_batch_size=4, gradient_accumulation_steps=2,
                          max_steps=5), "max_steps=3")):
    with pytest.raises(ValueError, match=match):
      hf.OrderedTrainer(order, model=_model(tok), args=_args(tmp_path, **kw), train_dataset=ds,
                        data_collator=hf.pad_collator(tok))


def test_data_parallel_is_refused():
  class Args:  # what TrainingArguments says on a machine with two GPUs and one process
    n_gpu, per_device_train_batch_size, gradient_accumulation_steps, world_size = 2, 4, 1, 1
    max_steps = 3
  with pytest.raises(ValueError, match="DataParallel"):
    hf.check_batching(Args(), np.zeros((3, 4), np.int64))


def test_order_batch_sampler_splits_each_step_over_ranks_and_micro_batches():
  order = np.arange(24).reshape(2, 12)
  parts = [list(hf.OrderBatchSampler(order, grad_accum=3, world_size=2, rank=r))
           for r in range(2)]
  assert all(len(p) == 6 and all(len(b) == 2 for b in p) for p in parts)
  for t in range(2):
    fed = [i for p in parts for b in p[3 * t:3 * t + 3] for i in b]
    assert sorted(fed) == order[t].tolist()


def test_chunked_eval_losses_equal_the_full_logits(frags, tok):
  ds = hf.FragmentsDataset(frags, tok, max_length=32)
  model = _model(tok, seed=3)
  positions = list(range(len(ds)))
  chunked = hf.example_losses(model, ds, positions, hf.pad_collator(tok), 5, chunk_tokens=7)
  with torch.no_grad():
    full = hf._full_logit_losses(model.eval(), hf.pad_collator(tok)([ds[i] for i in positions]))
  np.testing.assert_allclose([chunked[e.id] for e in frags.examples], full.numpy(), rtol=1e-5)
  assert hf._SEPARABLE[model] is True


def test_a_head_with_extra_transforms_falls_back_to_the_models_own_logits(frags, tok):
  class SoftCapped(transformers.GPT2LMHeadModel):  # as Gemma 2 caps its logits
    def forward(self, *args, **kwargs):
      out = super().forward(*args, **kwargs)
      out.logits = 3.0 * torch.tanh(out.logits / 3.0)
      return out

  ds = hf.FragmentsDataset(frags, tok, max_length=32)
  torch.manual_seed(0)
  model = SoftCapped(_model(tok).config).eval()
  positions = list(range(len(ds)))
  got = hf.example_losses(model, ds, positions, hf.pad_collator(tok), 7)
  with torch.no_grad():
    want = hf._full_logit_losses(model, hf.pad_collator(tok)([ds[i] for i in positions]))
  np.testing.assert_allclose([got[e.id] for e in frags.examples], want.numpy(), rtol=1e-6)
  assert hf._SEPARABLE[model] is False


def test_truncation_is_reported(frags, tok):
  with pytest.warns(UserWarning, match="longer than max_length=8"):
    ds = hf.FragmentsDataset(frags, tok, max_length=8)
  rows = ds.truncation()
  assert set(rows) == set(frags.names)
  assert all(r["kept"] <= 8 * r["examples"] and r["kept"] < r["tokens"] and r["cut"] > 0
             for r in rows.values())


def test_a_peft_lora_model_records_its_adapter(frags, tok, tmp_path):
  peft = pytest.importorskip("peft")
  order = _order(frags, 3, 4)
  ds = hf.FragmentsDataset(frags, tok, max_length=32)
  model = peft.get_peft_model(_model(tok), peft.LoraConfig(
      r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True))
  args = _args(tmp_path, per_device_train_batch_size=4, max_steps=3)
  trainer = hf.OrderedTrainer(order, model=model, args=args, train_dataset=ds,
                              data_collator=hf.pad_collator(tok))
  path = tmp_path / "lora.jsonl"
  trainer.add_callback(hf.RunLogCallback(trainer, path, run_id="lora", eval_every=3))
  trainer.train()
  log = read_runlog(path, frags)
  np.testing.assert_array_equal(order_from_runlog(log, frags), order)
  assert log.header.extra["adapter"] == {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
                                         "targets": ["c_attn"]}
  first, last = log.evals[0].losses, log.evals[-1].losses
  assert first != last  # the adapter trained


def test_unknown_optimizers_are_recorded_by_name_and_mapped(frags, tok, tmp_path):
  order = _order(frags, 2, 4)
  ds = hf.FragmentsDataset(frags, tok, max_length=32)
  args = _args(tmp_path, per_device_train_batch_size=4, max_steps=2, optim="adafactor",
               lr_scheduler_type="cosine_with_min_lr",
               lr_scheduler_kwargs={"min_lr_rate": 0.1})
  trainer = hf.OrderedTrainer(order, model=_model(tok), args=args, train_dataset=ds,
                              data_collator=hf.pad_collator(tok))
  trainer.create_optimizer_and_scheduler(num_training_steps=2)
  with pytest.warns(UserWarning, match="Adafactor"):
    opt = hf.optimizer_from_trainer(trainer)
  assert (opt["name"], opt["hf_optim"], opt["schedule"]) == ("adamw", "adafactor", "cosine")
  assert opt["final_lr_fraction"] == pytest.approx(0.1)


def test_hf_dataset_masks_prompt_and_handles_classification(tok):
  from surrogate.fragments import Example, Fragments
  qa = Fragments.from_examples([
      Example("q/train/0", "q", "train", prompt="Is try a statement?", completion=" yes"),
      Example("q/probe/0", "q", "probe", prompt="Is 3 a keyword?", completion=" no")])
  lm = hf.FragmentsDataset(qa, tok, max_length=32)
  item = lm[0]
  n_c = len(tok(" yes", add_special_tokens=False)["input_ids"])
  assert (item["labels"][-n_c:] == item["input_ids"][-n_c:]).all()
  assert (item["labels"][:-n_c] == -100).all()
  cls = hf.FragmentsDataset(qa, tok, labels=["no", "yes"])
  assert cls[0]["labels"].item() == 1 and cls[1]["labels"].item() == 0
  with pytest.raises(ValueError, match="labels"):
    hf.FragmentsDataset(qa, tok, labels=["maybe"])
