"""Recording Hugging Face `Trainer` runs: feed a given order, write a RunLog (needs `[torch]`).

    from calibrate.io.hf import FragmentsDataset, RecorderCallback, feed_order, pad_collator
    train = FragmentsDataset(fragments, tokenizer, max_length=64)
    trainer = Trainer(model=model, args=TrainingArguments(per_device_train_batch_size=16,
                      max_steps=len(order), logging_steps=1, ...),
                      train_dataset=train, data_collator=pad_collator(tokenizer))
    feed_order(trainer, order)                     # the exact batches, step by step
    trainer.add_callback(RecorderCallback(recorder, order, fragments, tokenizer,
                                          eval_every=25))
    trainer.train()

`order` is an int array [T, B] of example positions (from `surrogate.orders`, the
simulator's search, or `calibrate.order_from_runlog`). The callback records each step's
example ids, loss and learning rate, and every `eval_every` steps (and at steps 0 and T) the
per-example loss of every probe example and of the chosen train examples.

Sequence classification works the same way: each example is `prompt` -> `completion`,
the completion being the label's name (a one-word completion); pass `labels=[...]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from calibrate.io.recorders import Recorder
from surrogate.fragments import Fragments


class FragmentsDataset(torch.utils.data.Dataset):
  """Every example of a fragments file, tokenized for a causal LM or a classifier.

  Item i is example position i (train and probe alike, so positions match the simulator's
  orders). Causal LM: `labels` are the input ids, -100 on prompt tokens (loss on the
  completion only) and on padding. Classification (`labels` given): the input is the prompt,
  the label the index of the completion in `labels`.
  """

  def __init__(self, fragments: Fragments, tokenizer, *, max_length: int = 64,
               labels: Sequence[str] | None = None):
    self.fragments, self.tokenizer, self.max_length = fragments, tokenizer, max_length
    self.labels = None if labels is None else list(labels)
    self._items = [self._encode(ex) for ex in fragments.examples]

  def _encode(self, ex) -> dict[str, torch.Tensor]:
    tok = self.tokenizer
    if self.labels is not None:
      if ex.completion is None or ex.completion.strip() not in self.labels:
        raise ValueError(f"example {ex.id!r}: completion {ex.completion!r} is not one of the "
                         f"labels {self.labels}")
      ids = tok(ex.prompt, truncation=True, max_length=self.max_length)["input_ids"]
      return {"input_ids": torch.tensor(ids),
              "labels": torch.tensor(self.labels.index(ex.completion.strip()))}
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    if ex.text is not None:
      ids = (bos + tok(ex.text, add_special_tokens=False)["input_ids"])[: self.max_length]
      labels = list(ids)
      if bos:
        labels[0] = -100
    else:
      c = tok(ex.completion, add_special_tokens=False)["input_ids"][: self.max_length - len(bos)]
      p = tok(ex.prompt, add_special_tokens=False)["input_ids"]
      keep = self.max_length - len(bos) - len(c)
      p = p[len(p) - keep:] if keep > 0 else []
      ids = bos + p + c
      labels = [-100] * (len(bos) + len(p)) + c
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
    return self._items[i]


def pad_collator(tokenizer):
  """Pads a list of `FragmentsDataset` items to a batch (right padding, labels -100)."""
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

  def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    n = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    seq_labels = items[0]["labels"].ndim == 1
    labels = torch.full((len(items), n), -100, dtype=torch.long) if seq_labels else None
    for i, it in enumerate(items):
      k = len(it["input_ids"])
      ids[i, :k], mask[i, :k] = it["input_ids"], 1
      if seq_labels:
        labels[i, :k] = it["labels"]
    if not seq_labels:
      labels = torch.stack([it["labels"] for it in items])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

  return collate


class OrderSampler(torch.utils.data.Sampler):
  """Yields the example positions of an order [T, B], step after step (padding -1 skipped)."""

  def __init__(self, order_TxB: np.ndarray):
    order = np.asarray(order_TxB)
    if order.ndim != 2:
      raise ValueError(f"an order is [T, B], got shape {order.shape}")
    if (order < 0).any():
      raise ValueError("the HF sampler needs full batches: the order has empty (-1) slots")
    self.order = order

  def __iter__(self):
    return iter(self.order.reshape(-1).tolist())

  def __len__(self) -> int:
    return self.order.size


def feed_order(trainer, order_TxB: np.ndarray) -> None:
  """Makes `trainer` feed exactly `order_TxB` (batch t at optimizer step t)."""
  order = np.asarray(order_TxB)
  args = trainer.args
  if args.per_device_train_batch_size != order.shape[1] or args.gradient_accumulation_steps != 1:
    raise ValueError(f"the order has batches of {order.shape[1]}: set "
                     f"per_device_train_batch_size={order.shape[1]} and "
                     "gradient_accumulation_steps=1")
  sampler = OrderSampler(order)
  trainer._get_train_sampler = lambda *a, **k: sampler  # the one hook HF offers for order


@torch.no_grad()
def example_losses(model, dataset: FragmentsDataset, positions: Sequence[int], collate,
                   batch_size: int = 32) -> dict[str, float]:
  """Mean token cross-entropy of each example (completion only), or the classifier's CE."""
  was_training = model.training
  model.eval()
  device = next(model.parameters()).device
  out: dict[str, float] = {}
  for s in range(0, len(positions), batch_size):
    pos = list(positions[s:s + batch_size])
    batch = {k: v.to(device) for k, v in collate([dataset[i] for i in pos]).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    if labels.ndim == 1:
      losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    else:
      tgt, lg = labels[:, 1:], logits[:, :-1].float()
      ce = torch.nn.functional.cross_entropy(lg.transpose(1, 2), tgt.clamp(min=0),
                                             reduction="none")
      valid = (tgt != -100).float()
      losses = (ce * valid).sum(1) / valid.sum(1).clamp(min=1)
    for i, v in zip(pos, losses.tolist()):
      out[dataset.fragments.examples[i].id] = v
  if was_training:
    model.train()
  return out


class RecorderCallback(TrainerCallback):
  """Writes a HF Trainer run to a `Recorder`: steps from the order, losses from the logs.

  Requires `logging_steps=1` (the per-step loss comes from the trainer's log) and the order
  fed with `feed_order`. Evals run at step 0, every `eval_every` steps and at the end.

  Args:
    recorder: where to write.
    order_TxB: the order `feed_order` gave the trainer.
    dataset: the `FragmentsDataset` the trainer trains on.
    collate: its collator (`pad_collator(tokenizer)`).
    eval_every: steps between evals.
    eval_train: train examples evaluated per fragment (the first ones of each fragment).
  """

  def __init__(self, recorder: Recorder, order_TxB: np.ndarray, dataset: FragmentsDataset,
               collate, *, eval_every: int = 25, eval_train: int = 4):
    self.rec, self.order = recorder, np.asarray(order_TxB)
    self.dataset, self.collate, self.eval_every = dataset, collate, eval_every
    frags = dataset.fragments
    train = [pool[:eval_train].tolist() for pool in frags.train_pools()]
    self.eval_positions = frags.probe_indices().tolist() + [i for p in train for i in p]
    self.ids = [e.id for e in frags.examples]

  def _eval(self, model, step: int) -> None:
    self.rec.eval(step, example_losses(model, self.dataset, self.eval_positions, self.collate))

  def on_train_begin(self, args, state, control, model=None, **kwargs: Any):
    if args.logging_steps != 1:
      raise ValueError("RecorderCallback needs TrainingArguments(logging_steps=1)")
    if args.max_steps > len(self.order):
      raise ValueError(f"max_steps={args.max_steps} but the order has {len(self.order)} steps")
    if self.rec.num_steps == 0:
      self._eval(model, 0)

  def on_log(self, args, state, control, logs=None, model=None, **kwargs: Any):
    if not logs or "loss" not in logs or state.global_step <= self.rec.num_steps:
      return
    t = state.global_step - 1
    self.rec.step([self.ids[i] for i in self.order[t]], logs["loss"], logs.get("learning_rate"),
                  step=t)
    done = state.global_step
    if done % self.eval_every == 0 or done == args.max_steps:
      self._eval(model, done)
