"""Fragments from a Hugging Face `datasets.Dataset`: plain text, prompt/completion, or chat.

    from calibrate.io.hf_data import fragments_from_dataset
    frags = fragments_from_dataset(ds, fragment="source", messages="messages",
                                   tokenizer=tok)      # chat, through the model's template
    write_fragments("fragments.jsonl", frags.examples)

A chat example becomes a prompt/completion pair: the prompt is every turn but the last,
rendered by the tokenizer's chat template with the generation prompt; the completion is
what the template renders for the last (assistant) turn. The loss is on the completion, as
in SFT with completion-only loss. Rows keep their order within each fragment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from surrogate.fragments import Example, Fragments

_SPLITS = ("train", "probe")


def _chat_pair(messages: Any, tokenizer, row: int) -> tuple[str, str]:
  if (not isinstance(messages, Sequence) or len(messages) < 2
      or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages)):
    raise ValueError(f"row {row}: `messages` must be a list of at least two "
                     "{'role': ..., 'content': ...} turns")
  if messages[-1]["role"] != "assistant":
    raise ValueError(f"row {row}: the last turn is the completion, so it must be the "
                     f"assistant's, not {messages[-1]['role']!r}")
  whole = tokenizer.apply_chat_template(list(messages), tokenize=False)
  prompt = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False,
                                         add_generation_prompt=True)
  if not whole.startswith(prompt) or len(whole) == len(prompt):
    raise ValueError(f"row {row}: the chat template does not render the conversation as its "
                     "prompt followed by the last turn; pass prompt/completion columns instead")
  return prompt, whole[len(prompt):]


def fragments_from_dataset(dataset, *, fragment: str, text: str | None = None,
                           prompt: str | None = None, completion: str | None = None,
                           messages: str | None = None, tokenizer=None,
                           split: str | None = None, probe_every: int = 5,
                           id: str | None = None) -> Fragments:  # noqa: A002 (a column name)
  """The fragments of a `datasets.Dataset` (or any sequence of row mappings).

  Args:
    dataset: the rows.
    fragment: the column naming each row's fragment (its source, topic or task).
    text: the column of plain texts (loss on every token); or
    prompt, completion: the columns of prompt/completion pairs (loss on the completion); or
    messages: the column of chat conversations, rendered with `tokenizer`'s chat template.
    tokenizer: needed with `messages`.
    split: a column of "train"/"probe"; without it every `probe_every`-th row of each
      fragment is a probe (never fed, it measures generalization).
    id: a column of unique example ids; default `<fragment>/<split>/<n>`.

  Raises:
    ValueError: a missing column, a bad row (named by its index), or the wrong set of
      content columns.
  """
  kinds = [k for k, cols in (("text", (text,)), ("prompt/completion", (prompt, completion)),
                              ("messages", (messages,))) if any(c is not None for c in cols)]
  if len(kinds) != 1 or (kinds == ["prompt/completion"] and None in (prompt, completion)):
    raise ValueError("give exactly one of: text=, prompt= and completion=, messages=")
  if messages is not None and tokenizer is None:
    raise ValueError("messages= needs the tokenizer whose chat template renders them")
  if probe_every < 2:
    raise ValueError(f"probe_every must be >= 2, got {probe_every}")
  columns = getattr(dataset, "column_names", None)
  wanted = [c for c in (fragment, text, prompt, completion, messages, split, id) if c]
  if columns is not None:
    missing = [c for c in wanted if c not in columns]
    if missing:
      raise ValueError(f"the dataset has no column {missing[0]!r} (it has {columns})")
  examples, seen = [], {}
  for r, row in enumerate(dataset):
    name = str(row[fragment])
    if split is not None:
      sp = row[split]
      if sp not in _SPLITS:
        raise ValueError(f"row {r}: column {split!r} must be 'train' or 'probe', got {sp!r}")
    else:
      sp = "probe" if sum(seen.get((name, s), 0) for s in _SPLITS) % probe_every == \
          probe_every - 1 else "train"
    n = seen.get((name, sp), 0)
    seen[(name, sp)] = n + 1
    ex_id = str(row[id]) if id is not None else f"{name}/{sp}/{n}"
    if text is not None:
      fields = {"text": row[text]}
    elif messages is not None:
      p, c = _chat_pair(row[messages], tokenizer, r)
      fields = {"prompt": p, "completion": c}
    else:
      fields = {"prompt": row[prompt], "completion": row[completion]}
    examples.append(Example(ex_id, name, sp, **fields))
  return Fragments.from_examples(examples)
