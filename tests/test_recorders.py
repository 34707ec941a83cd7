"""Recorders: a tiny real torch model trained a few steps; the logs match what was fed."""

import math

import numpy as np
import pytest

from calibrate.io.recorders import Recorder
from calibrate.io.runlog import order_from_runlog, read_runlog
from surrogate import orders
from surrogate.datasets import python_docs
from surrogate.errors import RunLogError
from surrogate.tokenize import train_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

OPT = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0}


@pytest.fixture(scope="module")
def frags():
  return python_docs(("try", "import", "async"), max_train=6, max_probe=2)


@pytest.fixture(scope="module")
def hf_tokenizer(frags):
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=train_tokenizer(frags.texts_for_tokenizer(), 300),
      bos_token="<bos>", pad_token="<pad>")
  return tok


def _order(frags, steps, batch):
  import jax
  return orders.shuffled(frags.train_pools(), key=jax.random.key(0), steps=steps,
                         batch_size=batch)


def test_plain_torch_loop_recorder(frags, tmp_path):
  torch.manual_seed(0)
  emb = torch.nn.EmbeddingBag(50, 4)
  head = torch.nn.Linear(4, 1)
  params = list(emb.parameters()) + list(head.parameters())
  opt = torch.optim.AdamW(params, lr=1e-2)
  order = _order(frags, 5, 3)
  ids = [e.id for e in frags.examples]
  feats = {e.id: torch.tensor([len(e.text) % 50, hash(e.fragment) % 50]) for e in frags.examples}
  path = tmp_path / "plain.jsonl"
  with Recorder(path, frags, run_id="plain", model="bag", optimizer=OPT, batch_size=3) as rec:
    for t, row in enumerate(order):
      batch = [ids[i] for i in row]
      loss = head(emb(torch.stack([feats[i] for i in batch]))).pow(2).mean()
      opt.zero_grad()
      loss.backward()
      opt.step()
      assert rec.step(batch, loss, 1e-2) == t
    with torch.no_grad():
      rec.eval(5, {i: head(emb(feats[i][None])).pow(2).item() for i in ids[:4]})
  log = read_runlog(path, frags)
  assert log.num_steps == 5 and log.eval_steps == (5,)
  np.testing.assert_array_equal(order_from_runlog(log, frags), order)
  assert all(math.isfinite(s.loss) and s.lr == 1e-2 for s in log.steps)


def test_optax_loop_recorder(frags, tmp_path):
  import jax
  import jax.numpy as jnp
  import optax
  ids = [e.id for e in frags.examples]
  feats = jnp.asarray([[len(e.text) / 100.0, float(frags.index[e.id] % 3)] for e in frags.examples])
  params = {"w": jnp.zeros(2)}
  opt = optax.sgd(0.1)
  state = opt.init(params)
  loss_fn = lambda p, x: jnp.mean((x @ p["w"] - 1.0) ** 2)
  order = _order(frags, 4, 2)
  path = tmp_path / "optax.jsonl"
  with Recorder(path, frags, run_id="optax", model="linear",
                optimizer={"name": "sgd", "lr": 0.1}, batch_size=2) as rec:
    for row in order:
      loss, grads = jax.value_and_grad(loss_fn)(params, feats[row])
      updates, state = opt.update(grads, state)
      params = optax.apply_updates(params, updates)
      rec.step([ids[i] for i in row], loss, 0.1)  # a jax scalar is fine
  log = read_runlog(path, frags)
  np.testing.assert_array_equal(order_from_runlog(log, frags), order)
  assert log.steps[-1].loss < log.steps[0].loss


def test_recorder_rejects_bad_input_and_keeps_log_valid(frags, tmp_path):
  path = tmp_path / "bad.jsonl"
  train_id = frags.examples[int(frags.train_pools()[0][0])].id
  probe_id = frags.examples[int(frags.probe_indices()[0])].id
  with Recorder(path, frags, run_id="bad", model="m", optimizer=OPT, batch_size=1) as rec:
    rec.step([train_id], 1.0)
    with pytest.raises(RunLogError, match="nope"):
      rec.step(["nope"], 1.0)
    with pytest.raises(RunLogError, match="probe"):
      rec.step([probe_id], 1.0)
    with pytest.raises(RunLogError, match="loss"):
      rec.step([train_id], float("nan"))
    with pytest.raises(RunLogError, match="step"):
      rec.step([train_id], 1.0, step=5)
    rec.step([train_id], 0.5)
  log = read_runlog(path, frags)
  assert [s.loss for s in log.steps] == [1.0, 0.5]


def test_hf_trainer_callback_records_the_order_it_fed(frags, hf_tokenizer, tmp_path):
  from calibrate.io.hf import FragmentsDataset, RecorderCallback, feed_order, pad_collator
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=len(hf_tokenizer), n_positions=32, n_embd=16,
                                n_layer=1, n_head=2, bos_token_id=hf_tokenizer.bos_token_id)
  model = transformers.GPT2LMHeadModel(cfg)
  steps, batch = 6, 2
  order = _order(frags, steps, batch)
  ds = FragmentsDataset(frags, hf_tokenizer, max_length=32)
  collate = pad_collator(hf_tokenizer)
  args = transformers.TrainingArguments(
      output_dir=str(tmp_path / "hf"), per_device_train_batch_size=batch, max_steps=steps,
      logging_steps=1, learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=2,
      report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
  trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, data_collator=collate)
  feed_order(trainer, order)
  path = tmp_path / "hf.jsonl"
  with Recorder(path, frags, run_id="hf", model="gpt2-tiny",
                optimizer={"name": "adamw", "lr": 1e-3, "warmup_steps": 2, "schedule": "linear"},
                batch_size=batch) as rec:
    trainer.add_callback(RecorderCallback(rec, order, ds, collate, eval_every=4, eval_train=1))
    trainer.train()
  log = read_runlog(path, frags)
  np.testing.assert_array_equal(order_from_runlog(log, frags), order)
  assert log.eval_steps == (0, 4, 6)
  probes = {frags.examples[i].id for i in frags.probe_indices()}
  assert probes <= set(log.evals[0].losses)
  lrs = [s.lr for s in log.steps]
  assert lrs[0] < lrs[1] and lrs[-1] < lrs[2]  # warmup, then linear decay
  # The recorded step losses are the real model's: training lowers the eval losses.
  first, last = log.evals[0].losses, log.evals[-1].losses
  assert np.mean([last[k] for k in first]) < np.mean(list(first.values()))


def test_hf_dataset_masks_prompt_and_handles_classification(frags, hf_tokenizer):
  from calibrate.io.hf import FragmentsDataset
  from surrogate.fragments import Example, Fragments
  qa = Fragments.from_examples([
      Example("q/train/0", "q", "train", prompt="Is try a statement?", completion=" yes"),
      Example("q/probe/0", "q", "probe", prompt="Is 3 a keyword?", completion=" no")])
  lm = FragmentsDataset(qa, hf_tokenizer, max_length=32)
  item = lm[0]
  n_c = len(hf_tokenizer(" yes", add_special_tokens=False)["input_ids"])
  assert (item["labels"][-n_c:] == item["input_ids"][-n_c:]).all()
  assert (item["labels"][:-n_c] == -100).all()
  cls = FragmentsDataset(qa, hf_tokenizer, labels=["no", "yes"])
  assert cls[0]["labels"].item() == 1 and cls[1]["labels"].item() == 0
  with pytest.raises(ValueError, match="labels"):
    FragmentsDataset(qa, hf_tokenizer, labels=["maybe"])
