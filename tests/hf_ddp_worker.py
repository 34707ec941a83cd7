"""One process of the two-process test run (tests/test_hf_ddp.py): a tiny GPT-2 trained
under an order with `OrderedTrainer` and recorded with `RunLogCallback`.

    python -m torch.distributed.run --nproc_per_node 2 tests/hf_ddp_worker.py OUT
    python tests/hf_ddp_worker.py OUT          # one process, for comparison

Each optimizer step feeds 8 examples: 2 processes x 2 micro-batches of 2, or 2 of 4 in one.
"""

import os
import sys

import jax
import torch
import transformers

from calibrate.io.hf import FragmentsDataset, OrderedTrainer, RunLogCallback, pad_collator
from surrogate import orders
from surrogate.datasets import python_docs
from surrogate.tokenize import train_tokenizer


def main(out: str) -> None:
  world = int(os.environ.get("WORLD_SIZE", "1"))
  micro, accum = 4 // world, 2
  torch.set_num_threads(1)
  frags = python_docs(("try", "import", "async"), max_train=8, max_probe=2)
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=train_tokenizer(frags.texts_for_tokenizer(), 300),
      bos_token="<bos>", pad_token="<pad>")
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2,
      bos_token_id=tok.bos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
  order = orders.shuffled(frags.train_pools(), key=jax.random.key(0), steps=4, batch_size=8)
  args = transformers.TrainingArguments(
      output_dir=os.path.join(out, "trainer", "out"), per_device_train_batch_size=micro,
      gradient_accumulation_steps=accum, max_steps=len(order), logging_steps=1,
      learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, seed=0,
      disable_tqdm=True)
  ds = FragmentsDataset(frags, tok, max_length=32)
  trainer = OrderedTrainer(order, model=model, args=args, train_dataset=ds,
                           data_collator=pad_collator(tok))
  trainer.remove_callback(transformers.PrinterCallback)
  trainer.add_callback(RunLogCallback(trainer, os.path.join(out, "run.jsonl"), run_id="ddp",
                                      eval_every=2, eval_train=1))
  trainer.train()
  if torch.distributed.is_initialized():
    # The Trainer leaves the process group up; tearing gloo down at interpreter exit
    # sometimes aborts a rank ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
  main(sys.argv[1])
