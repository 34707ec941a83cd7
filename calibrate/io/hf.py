"""Recording Hugging Face `Trainer` runs: feed a given order, write a RunLog (needs `[torch]`).

    from calibrate.io.hf import FragmentsDataset, OrderedTrainer, RunLogCallback, pad_collator
    train = FragmentsDataset(fragments, tokenizer, max_length=512)
    trainer = OrderedTrainer(order, model=model, args=TrainingArguments(
                                 per_device_train_batch_size=4, gradient_accumulation_steps=8,
                                 max_steps=len(order), logging_steps=1, ...),
                             train_dataset=train, data_collator=pad_collator(tokenizer))
    trainer.add_callback(RunLogCallback(trainer, "runs/blocked.jsonl", run_id="blocked"))
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

`order` is an int array [T, B] of example positions (from `surrogate.orders`, the
simulator's search, or `calibrate.order_from_runlog`); B is the *effective* batch of one
optimizer step: per-device batch x gradient accumulation x processes. Every optimizer step
t feeds exactly the examples of `order[t]`, however they are split over micro-batches and
processes (`OrderBatchSampler`). The callback fills the RunLog header from the
`TrainingArguments` and the optimizer the Trainer built, records each step's example ids,
loss and the learning rate used, and every `eval_every` steps (and at steps 0 and T) the
per-example loss of every probe example and of a few train examples. Under `torchrun` or
`accelerate launch` every process evaluates its share and process 0 alone writes.

`ordered(cls)` gives the same behaviour to a Trainer subclass, e.g. TRL's `SFTTrainer`.
Sequence classification works the same way: each example is `prompt` -> `completion`, the
completion being the label's name; pass `labels=[...]` to `FragmentsDataset`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from calibrate.io.recorders import Recorder
from surrogate.fragments import Fragments


class FragmentsDataset(torch.utils.data.Dataset):
  """Every example of a fragments file, tokenized for a causal LM or a classifier.

  Item i is example position i (train and probe alike, so positions match the simulator's
  orders). Causal LM: `labels` are the input ids, -100 on prompt tokens (loss on the
  completion only) and on padding. Classification (`labels` given): the input is the prompt,
  the label the index of the completion in `labels`.

  An example longer than `max_length` is cut (a text keeps its start; a prompt/completion
  keeps the completion and the end of the prompt), with a warning saying how many were;
  `truncation()` gives the figures per fragment.
  """

  def __init__(self, fragments: Fragments, tokenizer, *, max_length: int = 64,
               labels: Sequence[str] | None = None):
    self.fragments, self.tokenizer, self.max_length = fragments, tokenizer, max_length
    self.labels = None if labels is None else list(labels)
    encoded = [self._encode(ex) for ex in fragments.examples]
    self._items = [item for item, _ in encoded]
    self._full_tokens = np.array([n for _, n in encoded], np.int64)
    cut = int((self._full_tokens > self.kept_tokens()).sum())
    if cut:
      warnings.warn(f"{cut} of {len(self._items)} examples are longer than max_length="
                    f"{max_length} tokens and were cut (FragmentsDataset.truncation() has the "
                    "figures per fragment)", UserWarning, stacklevel=2)

  def _encode(self, ex) -> tuple[dict[str, torch.Tensor], int]:
    tok = self.tokenizer
    if self.labels is not None:
      if ex.completion is None or ex.completion.strip() not in self.labels:
        raise ValueError(f"example {ex.id!r}: completion {ex.completion!r} is not one of the "
                         f"labels {self.labels}")
      full = tok(ex.prompt)["input_ids"]
      ids = full[: self.max_length]
      return ({"input_ids": torch.tensor(ids),
               "labels": torch.tensor(self.labels.index(ex.completion.strip()))}, len(full))
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    first = tok(ex.text if ex.text is not None else ex.prompt,
                add_special_tokens=False)["input_ids"]
    if bos and first[:1] == bos:  # a chat template that writes the BOS itself
      bos = []
    if ex.text is not None:
      full = bos + first
      ids = full[: self.max_length]
      labels = list(ids)
      if bos:
        labels[0] = -100
      return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}, len(full)
    c_full = tok(ex.completion, add_special_tokens=False)["input_ids"]
    p = first
    c = c_full[: self.max_length - len(bos)]
    keep = self.max_length - len(bos) - len(c)
    n_full = len(bos) + len(p) + len(c_full)
    p = p[len(p) - keep:] if keep > 0 else []
    ids = bos + p + c
    labels = [-100] * (len(bos) + len(p)) + c
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}, n_full

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
    return self._items[i]

  def kept_tokens(self) -> np.ndarray:
    """Tokens of each example the model sees, int [E] (BOS included)."""
    return np.array([len(it["input_ids"]) for it in self._items], np.int64)

  def truncation(self) -> dict[str, dict[str, int]]:
    """Per fragment: `examples`, `cut` (examples longer than `max_length`), `tokens` (all of
    their tokens) and `kept` (the tokens the model sees)."""
    kept = self.kept_tokens()
    out: dict[str, dict[str, int]] = {}
    for i, ex in enumerate(self.fragments.examples):
      row = out.setdefault(ex.fragment, {"examples": 0, "cut": 0, "tokens": 0, "kept": 0})
      row["examples"] += 1
      row["cut"] += int(self._full_tokens[i] > kept[i])
      row["tokens"] += int(self._full_tokens[i])
      row["kept"] += int(kept[i])
    return out

  def to_datasets(self):
    """The same items as a `datasets.Dataset` (columns `input_ids`, `labels`), row i being
    example position i: what TRL's `SFTTrainer` takes (with
    `dataset_kwargs={"skip_prepare_dataset": True}` and `pad_collator`)."""
    import datasets
    return datasets.Dataset.from_dict(
        {"input_ids": [it["input_ids"].tolist() for it in self._items],
         "labels": [it["labels"].tolist() for it in self._items]})


def pad_collator(tokenizer):
  """Pads a list of `FragmentsDataset` items to a batch (right padding, labels -100).

  Items may hold tensors or lists (rows of `FragmentsDataset.to_datasets()`)."""
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

  def collate(items: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    items = [{k: torch.as_tensor(it[k]) for k in ("input_ids", "labels")} for it in items]
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


def _check_order(order_TxB: Any) -> np.ndarray:
  order = np.asarray(order_TxB)
  if order.ndim != 2 or not np.issubdtype(order.dtype, np.integer):
    raise ValueError(f"an order is an int array [T, B], got {order.dtype} {order.shape}")
  if (order < 0).any():
    raise ValueError("a real run needs full batches: the order has empty (-1) slots")
  return order


class OrderBatchSampler(torch.utils.data.Sampler):
  """One process's micro-batches of an order [T, B], step after step.

  With G micro-batches per optimizer step (gradient accumulation) and W processes, the g-th
  micro-batch of process r at step t is `order[t, (r*G + g)*m : (r*G + g + 1)*m]`,
  m = B / (G*W): the union over processes and micro-batches of step t is `order[t]`.
  Use it as a `DataLoader`'s `batch_sampler` (plain loops too).
  """

  def __init__(self, order_TxB: np.ndarray, *, grad_accum: int = 1, world_size: int = 1,
               rank: int = 0):
    self.order = _check_order(order_TxB)
    parts = grad_accum * world_size
    if grad_accum < 1 or world_size < 1 or not 0 <= rank < world_size:
      raise ValueError(f"need grad_accum >= 1 and 0 <= rank < world_size, got {grad_accum}, "
                       f"{rank}, {world_size}")
    if self.order.shape[1] % parts:
      raise ValueError(f"the order's batch of {self.order.shape[1]} does not split into "
                       f"{grad_accum} micro-batches x {world_size} processes")
    self.grad_accum, self.world_size, self.rank = grad_accum, world_size, rank
    self.micro = self.order.shape[1] // parts

  def __iter__(self):
    m, g0 = self.micro, self.rank * self.grad_accum
    for row in self.order:
      for g in range(self.grad_accum):
        yield row[(g0 + g) * m:(g0 + g + 1) * m].tolist()

  def __len__(self) -> int:
    return len(self.order) * self.grad_accum


def check_batching(args, order_TxB: np.ndarray) -> None:
  """Raises `ValueError` unless `args` (TrainingArguments) can feed the order exactly."""
  order = _check_order(order_TxB)
  if getattr(args, "n_gpu", 1) > 1:
    raise ValueError(
        f"{args.n_gpu} GPUs in one process: the Trainer would use torch.nn.DataParallel, "
        "which splits every batch on its own. Launch one process per GPU (torchrun "
        "--nproc_per_node N, or accelerate launch), or show one GPU (CUDA_VISIBLE_DEVICES=0)")
  m, g, w = args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size
  if m * g * w != order.shape[1]:
    raise ValueError(
        f"the order has batches of {order.shape[1]}, but per_device_train_batch_size x "
        f"gradient_accumulation_steps x processes = {m} x {g} x {w} = {m * g * w}")
  if args.max_steps != len(order):
    raise ValueError(f"set max_steps={len(order)} (the order's steps), got {args.max_steps}")


class _OrderedMixin:
  """Feeds `order[t]` at optimizer step t; see `ordered`."""

  def __init__(self, order_TxB: np.ndarray, *args: Any, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self.order = _check_order(order_TxB)
    check_batching(self.args, self.order)

  def get_train_dataloader(self) -> torch.utils.data.DataLoader:
    args = self.args
    sampler = OrderBatchSampler(self.order, grad_accum=args.gradient_accumulation_steps,
                                world_size=args.world_size, rank=args.process_index)
    # Not passed through accelerate's prepare, which would deal the batches out to the
    # processes again; the Trainer moves each batch to its device.
    return torch.utils.data.DataLoader(
        self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
        num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory)


@functools.cache
def ordered(trainer_cls: type) -> type:
  """A subclass of `trainer_cls` (a `transformers.Trainer` subclass, e.g. TRL's
  `SFTTrainer`) whose first argument is the order [T, B] to feed."""
  if not issubclass(trainer_cls, Trainer):
    raise TypeError(f"{trainer_cls.__name__} is not a transformers.Trainer")
  return type(f"Ordered{trainer_cls.__name__}", (_OrderedMixin, trainer_cls),
              {"__doc__": f"`{trainer_cls.__name__}` feeding an exact order; see "
                          "`calibrate.io.hf.ordered`."})


OrderedTrainer = ordered(Trainer)


# ----------------------------------------------------------------------------------------------
# The header: what the Trainer was told and what it built.

_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant",
              "constant_with_warmup": "constant", "cosine_with_min_lr": "cosine",
              "cosine_warmup_with_min_lr": "cosine"}


def _name(v: Any) -> str:
  return str(getattr(v, "value", v))


def _optimizer_name(inner, hf_optim: str) -> tuple[str, str | None]:
  """The surrogate's rule for the optimizer built, and a warning when it is only the nearest."""
  cls = type(inner).__name__
  group = inner.param_groups[0]
  if cls == "AdamW" or (cls == "Adam" and group.get("decoupled_weight_decay")):
    return "adamw", None
  if cls in ("Adam", "SGD"):
    return cls.lower(), None
  key = f"{cls} {hf_optim}".lower()
  nearest = "sgd" if "sgd" in key else "adam" if "adam" in key and "adamw" not in key else "adamw"
  return nearest, (f"the optimizer {cls} (optim={hf_optim!r}) has no surrogate rule of its "
                   f"own; the surrogate trains with the nearest, {nearest}")


def optimizer_from_trainer(trainer) -> dict[str, Any]:
  """The RunLog header's `optimizer` for a Trainer whose optimizer and scheduler are built.

  Read from the torch optimizer (class, betas, eps, momentum, peak rate) and the
  `TrainingArguments` (weight decay, schedule, warmup, clipping). An optimizer or schedule
  the surrogate has no rule for is recorded by name (`hf_optim`, `hf_schedule`) and mapped
  to the nearest rule, with a warning; the step records' learning rates are exact anyway.
  """
  args = trainer.args
  inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
  group = inner.param_groups[0]
  hf_optim = _name(args.optim)
  name, warning = _optimizer_name(inner, hf_optim)
  lr = float(group.get("initial_lr", args.learning_rate))
  opt: dict[str, Any] = {"name": name, "lr": lr, "weight_decay": float(args.weight_decay),
                         "hf_optim": hf_optim}
  if warning:
    warnings.warn(warning, UserWarning, stacklevel=3)
  if name != "sgd" and "betas" in group:
    opt["betas"] = [float(b) for b in group["betas"]]
  if name != "sgd" and isinstance(group.get("eps"), float):
    opt["eps"] = float(group["eps"])
  if name == "sgd":
    opt["momentum"] = float(group.get("momentum", 0.0))
  if args.max_grad_norm and args.max_grad_norm > 0:
    opt["grad_clip"] = float(args.max_grad_norm)
  opt["warmup_steps"] = int(args.get_warmup_steps(args.max_steps))
  sched = _name(args.lr_scheduler_type)
  opt["hf_schedule"] = sched
  if sched not in _SCHEDULES:
    warnings.warn(f"the schedule {sched!r} has no surrogate rule; order files made from this "
                  "run use a constant rate (its step records keep the rates used)",
                  UserWarning, stacklevel=3)
  opt["schedule"] = _SCHEDULES.get(sched, "constant")
  if sched == "constant":
    opt["warmup_steps"] = 0
  kw = args.lr_scheduler_kwargs or {}
  if opt["schedule"] == "cosine" and ("min_lr_rate" in kw or "min_lr" in kw):
    opt["final_lr_fraction"] = float(kw["min_lr_rate"] if "min_lr_rate" in kw
                                     else kw["min_lr"] / lr)
  return opt


def adapter_from_model(model) -> dict[str, Any] | None:
  """The header's `adapter` for a `peft` model (kind, rank, alpha, dropout, targets), else
  None (a full fine-tune)."""
  configs = getattr(model, "peft_config", None)
  if not configs:
    return None
  cfg = configs.get(getattr(model, "active_adapter", "default")) or next(iter(configs.values()))
  kind = _name(getattr(cfg, "peft_type", "adapter")).lower()
  out: dict[str, Any] = {"kind": kind}
  for key, field in (("r", "r"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout")):
    if getattr(cfg, field, None) is not None:
      out[key] = getattr(cfg, field)
  targets = getattr(cfg, "target_modules", None)
  if targets is not None:
    out["targets"] = sorted(targets) if not isinstance(targets, str) else targets
  return out


def header_from_trainer(trainer, batch_size: int) -> dict[str, Any]:
  """RunLog header fields taken from a Trainer: optimizer, batch, seed, accumulation,
  processes, adapter and precision (the caller adds `run_id` and `model`)."""
  args = trainer.args
  header = {"optimizer": optimizer_from_trainer(trainer), "batch_size": int(batch_size),
            "seed": int(args.seed), "grad_accum": int(args.gradient_accumulation_steps),
            "world_size": int(args.world_size),
            "micro_batch_size": int(args.per_device_train_batch_size),
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"}
  adapter = adapter_from_model(trainer.model)
  if adapter is not None:
    header["adapter"] = adapter
  return header


# ----------------------------------------------------------------------------------------------
# Per-example losses, with their memory bounded.


def _per_example(ce_N: torch.Tensor, rows_N: torch.Tensor, n: int) -> torch.Tensor:
  sums = torch.zeros(n, dtype=torch.float32, device=ce_N.device).index_add_(0, rows_N, ce_N)
  counts = torch.zeros(n, dtype=torch.float32, device=ce_N.device).index_add_(
      0, rows_N, torch.ones_like(ce_N))
  return sums / counts.clamp(min=1)


def _full_logit_losses(model, batch) -> torch.Tensor:
  logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
  tgt = batch["labels"][:, 1:]
  valid = tgt != -100
  ce = torch.nn.functional.cross_entropy(logits[:, :-1][valid].float(), tgt[valid],
                                         reduction="none")
  return _per_example(ce, valid.nonzero()[:, 0], len(tgt))


def _body_and_head(model):
  """The model's decoder (to the final hidden states) and its output head, or None."""
  decoder = getattr(model, "get_decoder", lambda: None)()
  if decoder is None:  # transformers 4.x: the body by its attribute name (GPT-2 "transformer")
    decoder = getattr(model, getattr(model, "base_model_prefix", "") or "_", None)
  head = model.get_output_embeddings()
  if decoder is None or head is None or decoder is model:
    return None
  return decoder, head


def _is_separable(model, batch, atol: float) -> bool:
  """Whether the model's logits are head(final hidden state), checked on a small slice (the
  first example's first 32 tokens), so the check costs no full-size logits."""
  parts = _body_and_head(model)
  if parts is None:
    return False
  ids, mask = batch["input_ids"][:1, :32], batch["attention_mask"][:1, :32]
  ours = parts[1](parts[0](input_ids=ids, attention_mask=mask).last_hidden_state).float()
  theirs = model(input_ids=ids, attention_mask=mask).logits.float()
  return ours.shape == theirs.shape and bool(torch.allclose(ours, theirs, rtol=1e-3, atol=atol))


def _chunked_losses(model, batch, chunk_tokens: int) -> torch.Tensor:
  """Loss tokens' cross-entropy from the final hidden states, `chunk_tokens` rows of
  full-vocabulary fp32 logits at a time (`_is_separable` models only)."""
  decoder, head = _body_and_head(model)
  hidden = decoder(input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"]).last_hidden_state
  tgt = batch["labels"][:, 1:]
  valid = tgt != -100
  h, t = hidden[:, :-1][valid], tgt[valid]
  ce = torch.cat([torch.nn.functional.cross_entropy(head(h[s:s + chunk_tokens]).float(),
                                                    t[s:s + chunk_tokens], reduction="none")
                  for s in range(0, len(t), chunk_tokens)] or [h.new_zeros(0)])
  return _per_example(ce, valid.nonzero()[:, 0], len(tgt))


# Per model: whether its logits are head(final hidden state), as `_is_separable` found on
# the first batch evaluated (absent: not checked yet).
_SEPARABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def example_losses(model, dataset: FragmentsDataset, positions: Sequence[int], collate,
                   batch_size: int = 32, *, bf16: bool = False,
                   chunk_tokens: int = 1024) -> dict[str, float]:
  """Mean token cross-entropy of each example (completion only), or the classifier's CE.

  Args:
    model: a causal LM or a sequence classifier (a `peft` model too).
    dataset, positions: the examples, by position.
    collate: the dataset's collator.
    batch_size: examples per forward pass.
    bf16: run the forward in bfloat16 autocast (the loss is still computed in fp32).
    chunk_tokens: for a causal LM, loss tokens whose full-vocabulary fp32 logits are
      materialised at once (from the final hidden states); a slice of the first batch
      checks this against the model's own logits, and a model whose head does more than a
      matrix (e.g. soft-capping) is evaluated from its own full logits instead.
  """
  was_training = model.training
  model.eval()
  device = next(model.parameters()).device
  autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
              else contextlib.nullcontext())
  separable = _SEPARABLE.get(model)
  out: dict[str, float] = {}
  try:
    for s in range(0, len(positions), batch_size):
      pos = list(positions[s:s + batch_size])
      batch = {k: v.to(device) for k, v in collate([dataset[i] for i in pos]).items()}
      with autocast:
        if batch["labels"].ndim == 1:
          logits = model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
          losses = torch.nn.functional.cross_entropy(logits.float(), batch["labels"],
                                                     reduction="none")
        else:
          if separable is None:
            separable = _SEPARABLE[model] = _is_separable(model, batch, 5e-2 if bf16 else 1e-3)
          losses = (_chunked_losses(model, batch, chunk_tokens) if separable
                    else _full_logit_losses(model, batch))
      for i, v in zip(pos, losses.tolist()):
        out[dataset.fragments.examples[i].id] = v
  finally:
    if was_training:
      model.train()
  return out


# ----------------------------------------------------------------------------------------------
# The callback.


def _gather(obj: Any, world_size: int) -> list[Any]:
  if world_size == 1 or not torch.distributed.is_initialized():
    return [obj]
  parts: list[Any] = [None] * world_size
  torch.distributed.all_gather_object(parts, obj)
  return parts


class RunLogCallback(TrainerCallback):
  """Writes an `OrderedTrainer` run as a RunLog: steps from the order, losses from the logs.

  The header comes from the trainer (`header_from_trainer`): the optimizer and schedule it
  built, clipping, accumulation, processes, a `peft` adapter. Needs `logging_steps=1` (the
  per-step loss is the trainer's logged loss). Evals run at step 0, every `eval_every` steps
  and at the end, on every process (each takes a share of the examples); only process 0
  writes. Each eval's mean probe loss per fragment is also logged through the trainer, so
  `report_to` (W&B, TensorBoard) gets it as `probe_loss/<fragment>`.

  A run resumed from a checkpoint (`trainer.train(resume_from_checkpoint=...)`) continues
  the same file: records after the checkpoint's step are dropped and recorded again.

  Args:
    trainer: the `OrderedTrainer` (or `ordered(...)` subclass) to record; its
      `train_dataset` must be a `FragmentsDataset`, or `FragmentsDataset.to_datasets()` with
      `dataset` given.
    path: the RunLog to write.
    run_id: the header's run id.
    model: the header's model name (default: the model's `name_or_path`).
    dataset: the `FragmentsDataset` to evaluate (default: the trainer's train dataset).
    eval_every: steps between evals.
    eval_train: train examples evaluated per fragment (the first ones of each fragment).
    eval_probe: probe examples evaluated per fragment (default: all).
    eval_batch_size: examples per eval forward pass (default: the trainer's eval batch).
    bf16: evaluate in bfloat16 autocast (default: as the trainer trains).
    diagnostics: also measure the five diagnostics at every eval on this many probes per
      fragment (`calibrate.io.diagnostics.RealDiagnostics`; process 0 alone), against the
      model as it is when the callback is made: make it before training, with the base
      weights (also when resuming: `train()` loads the checkpoint later). None: not measured.
    report: log per-fragment probe losses through the trainer's loggers.
    overwrite: replace an existing log when the run starts from step 0.
    fsync: fsync every record.
    **extra: further header keys.
  """

  def __init__(self, trainer, path: str | os.PathLike, *, run_id: str, model: str | None = None,
               dataset: FragmentsDataset | None = None, eval_every: int = 25,
               eval_train: int = 4, eval_probe: int | None = None,
               eval_batch_size: int | None = None, bf16: bool | None = None,
               diagnostics: int | None = None, report: bool = True, overwrite: bool = False,
               fsync: bool = False, **extra: Any):
    order = getattr(trainer, "order", None)
    if order is None:
      raise TypeError("RunLogCallback records an OrderedTrainer (calibrate.io.hf.ordered)")
    dataset = trainer.train_dataset if dataset is None else dataset
    if not isinstance(dataset, FragmentsDataset):
      raise TypeError("pass dataset=<the FragmentsDataset> when the trainer's train_dataset "
                      f"is a {type(dataset).__name__}")
    if eval_every < 1:
      raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    self.trainer, self.path, self.order, self.dataset = trainer, os.fspath(path), order, dataset
    self.collate = pad_collator(dataset.tokenizer)
    self.eval_every, self.report = eval_every, report
    self.eval_batch_size = eval_batch_size or trainer.args.per_device_eval_batch_size
    self.bf16 = bool(trainer.args.bf16) if bf16 is None else bf16
    self.run_id, self.model_name = run_id, model
    self.overwrite, self.fsync, self.extra = overwrite, fsync, extra
    frags = dataset.fragments
    probes = [p if eval_probe is None else p[:eval_probe] for p in frags.probe_pools()]
    train = [pool[:eval_train] for pool in frags.train_pools()]
    self.eval_positions = [int(i) for p in probes + train for i in p]
    self.ids = [e.id for e in frags.examples]
    self.diagnostics = None
    if diagnostics and trainer.args.process_index == 0:
      from calibrate.io.diagnostics import RealDiagnostics
      self.diagnostics = RealDiagnostics(trainer.model, dataset,
                                         probes_per_fragment=diagnostics)
    self.rec: Recorder | None = None
    self._lr: float | None = None
    self._steps = 0

  @property
  def _is_writer(self) -> bool:
    return self.trainer.args.process_index == 0

  def _open(self, start: int) -> None:
    frags = self.dataset.fragments
    if start > 0:
      self.rec = Recorder.resume(self.path, frags, at_step=start, fsync=self.fsync)
      return
    model = self.model_name or getattr(self.trainer.model, "name_or_path", "") or "hf-model"
    self.rec = Recorder(self.path, frags, run_id=self.run_id, model=str(model),
                        fsync=self.fsync, overwrite=self.overwrite,
                        **{**header_from_trainer(self.trainer, self.order.shape[1]),
                           **self.extra})

  def _eval(self, step: int) -> None:
    args = self.trainer.args
    share = self.eval_positions[args.process_index::args.world_size]
    mine = example_losses(self.trainer.model, self.dataset, share, self.collate,
                          self.eval_batch_size, bf16=self.bf16)
    losses = {k: v for part in _gather(mine, args.world_size) for k, v in part.items()}
    if self.rec is not None:
      diags = (None if self.diagnostics is None
               else self.diagnostics.measure(self.trainer.model, losses))
      self.rec.eval(step, losses, diagnostics=diags)
    if self.report:
      frags = self.dataset.fragments
      by_fragment: dict[str, list[float]] = {}
      for i in frags.probe_indices():
        ex = frags.examples[i]
        if ex.id in losses:
          by_fragment.setdefault(ex.fragment, []).append(losses[ex.id])
      self.trainer.log({f"probe_loss/{f}": float(np.mean(v)) for f, v in by_fragment.items()})

  def on_train_begin(self, args, state, control, **kwargs: Any):
    if args.logging_steps != 1:
      raise ValueError("RunLogCallback needs TrainingArguments(logging_steps=1)")
    check_batching(args, self.order)
    self._steps = state.global_step
    if self._is_writer:
      self._open(state.global_step)
    if state.global_step == 0:
      self._eval(0)

  def on_step_begin(self, args, state, control, **kwargs: Any):
    # The rate this step will use: the scheduler has stepped after the previous update (the
    # trainer's own logged rate is, on some versions, the next step's).
    self._lr = float(self.trainer.optimizer.param_groups[0]["lr"])

  def on_log(self, args, state, control, logs=None, **kwargs: Any):
    if not logs or "loss" not in logs or state.global_step <= self._steps:
      return
    t = state.global_step - 1
    if self.rec is not None:
      self.rec.step([self.ids[i] for i in self.order[t]], logs["loss"], self._lr, step=t)
    self._steps = done = state.global_step
    if done % self.eval_every == 0 or done == args.max_steps:
      self._eval(done)

  def on_train_end(self, args, state, control, **kwargs: Any):
    if self.rec is not None:
      self.rec.close()
      self.rec = None
