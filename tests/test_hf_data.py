"""Data in the ecosystem's shapes: a `datasets.Dataset` of chats becomes fragments and
trains; TRL's SFTTrainer feeds an order."""

import numpy as np
import pytest

from calibrate.io.runlog import order_from_runlog, read_runlog
from surrogate import orders
from surrogate.tokenize import train_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
hf = pytest.importorskip("calibrate.io.hf")
from calibrate.io.hf_data import fragments_from_dataset  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
TOPICS = {"math": ["What is {} plus {}?", "{}"], "words": ["Spell {} then {}.", "{} {}"]}


def _chats():
  rows = []
  for topic, (q, a) in TOPICS.items():
    for i in range(10):
      rows.append({"source": topic, "messages": [
          {"role": "system", "content": "Answer briefly."},
          {"role": "user", "content": q.format(i, i + 1)},
          {"role": "assistant", "content": a.format(2 * i + 1, i)}]})
  return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def chat_tok():
  texts = [m["content"] for r in _chats() for m in r["messages"]] + ["<|user|><|assistant|>"]
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(texts, 300),
                                             bos_token="<bos>", pad_token="<pad>")
  tok.chat_template = TEMPLATE
  return tok


def _model(tok):
  torch.manual_seed(0)
  return transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2,
      bos_token_id=tok.bos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def test_chat_messages_become_prompt_completion_fragments(chat_tok):
  frags = fragments_from_dataset(_chats(), fragment="source", messages="messages",
                                 tokenizer=chat_tok)
  assert frags.names == ("math", "words")
  assert [len(p) for p in frags.train_pools()] == [8, 8]
  assert [len(p) for p in frags.probe_pools()] == [2, 2]
  ex = frags.examples[0]
  assert ex.prompt.endswith("<|user|>What is 0 plus 1?\n<|assistant|>")
  assert ex.completion == "1\n"
  ds = hf.FragmentsDataset(frags, chat_tok, max_length=64)
  item = ds[0]
  bos = chat_tok.bos_token_id
  assert item["input_ids"][0] == bos and (item["input_ids"] == bos).sum() == 1
  n_c = len(chat_tok("1\n", add_special_tokens=False)["input_ids"])
  assert (item["labels"][-n_c:] == item["input_ids"][-n_c:]).all()
  assert (item["labels"][:-n_c] == -100).all()


def test_bad_rows_are_named(chat_tok):
  rows = _chats().to_list()
  rows[3]["messages"] = rows[3]["messages"][:2]  # ends with the user's turn
  with pytest.raises(ValueError, match="row 3: the last turn"):
    fragments_from_dataset(rows, fragment="source", messages="messages", tokenizer=chat_tok)
  with pytest.raises(ValueError, match="no column 'topic'"):
    fragments_from_dataset(_chats(), fragment="topic", messages="messages", tokenizer=chat_tok)
  with pytest.raises(ValueError, match="exactly one"):
    fragments_from_dataset(_chats(), fragment="source", text="messages", messages="messages")


def _order(frags, steps, batch):
  import jax
  return orders.shuffled(frags.train_pools(), key=jax.random.key(0), steps=steps,
                         batch_size=batch)


def test_a_chat_dataset_trains_under_an_order(chat_tok, tmp_path):
  frags = fragments_from_dataset(_chats(), fragment="source", messages="messages",
                                 tokenizer=chat_tok)
  order = _order(frags, 6, 4)
  ds = hf.FragmentsDataset(frags, chat_tok, max_length=64)
  args = transformers.TrainingArguments(
      output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
      gradient_accumulation_steps=2, max_steps=6, logging_steps=1, learning_rate=3e-3,
      report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
  trainer = hf.OrderedTrainer(order, model=_model(chat_tok), args=args, train_dataset=ds,
                              data_collator=hf.pad_collator(chat_tok))
  trainer.add_callback(hf.RunLogCallback(trainer, tmp_path / "chat.jsonl", run_id="chat",
                                         eval_every=3, eval_probe=1))
  trainer.train()
  log = read_runlog(tmp_path / "chat.jsonl", frags)
  np.testing.assert_array_equal(order_from_runlog(log, frags), order)
  probes = {e for e in log.evals[0].losses if "/probe/" in e}
  assert probes == {"math/probe/0", "words/probe/0"}  # eval_probe=1: one per fragment
  assert log.evals[-1].losses["math/probe/0"] < log.evals[0].losses["math/probe/0"]
  # ... and the trainer's own loggers got each fragment's probe loss.
  logged = [h for h in trainer.state.log_history if "probe_loss/math" in h]
  assert len(logged) == len(log.evals)


def test_trl_sft_trainer_feeds_an_order(chat_tok, tmp_path):
  trl = pytest.importorskip("trl")
  frags = fragments_from_dataset(_chats(), fragment="source", messages="messages",
                                 tokenizer=chat_tok)
  order = _order(frags, 4, 4)
  ds = hf.FragmentsDataset(frags, chat_tok, max_length=64)
  args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4,
                       max_steps=4, logging_steps=1, learning_rate=3e-3, report_to=[],
                       save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                       dataset_kwargs={"skip_prepare_dataset": True})
  model = _model(chat_tok)
  batch = hf.pad_collator(chat_tok)([ds[i] for i in order[0]])
  with torch.no_grad():
    before = float(model.eval()(**batch).loss)  # the token mean over the batch
  trainer = hf.ordered(trl.SFTTrainer)(order, model=model, args=args,
                                       train_dataset=ds.to_datasets(),
                                       processing_class=chat_tok,
                                       data_collator=hf.pad_collator(chat_tok))
  trainer.add_callback(hf.RunLogCallback(trainer, tmp_path / "sft.jsonl", run_id="sft",
                                         dataset=ds, eval_every=2))
  trainer.train()
  log = read_runlog(tmp_path / "sft.jsonl", frags)
  np.testing.assert_array_equal(order_from_runlog(log, frags), order)
  assert log.steps[0].loss == pytest.approx(before, abs=1e-4)  # no dropout in the GPT-2
