"""Teacher files: the real base model's next-token distributions on the fragments' texts.

The user always has the real base model, since it is what they are about to fine-tune. A
teacher file keeps what it predicts, once, so that the surrogate can learn it (distillation)
without torch: for every text (each example of the fragments file, train and probe, and
optionally neutral texts) and every position of its first `length` tokens, the `k` most
likely next tokens in the *real tokenizer's ids*, their log-probabilities, and the
log-probability of all the rest together.

A teacher is a folder of plain data (never pickle):

    teacher.json   format "surrogate-teacher/1", model, k, length, counts, the fragments
                   file's sha256 and the tokenizer's (of its tokenizer.json bytes)
    tokenizer.json the real tokenizer the ids are in (so the teacher is self-contained)
    arrays.npz     ids_NxL (int32, -1 past a text's end), top_ids_NxLxK (int32),
                   top_logp_NxLxK and rest_logp_NxL (float16), source_N (int32: the example's
                   position in the fragments file, or -1 - i for neutral text i)

written atomically (a temporary folder renamed into place). Memory is bounded for large
vocabularies: logits are formed `chunk` positions at a time from the final hidden states,
never [batch, length, vocabulary] at once.

    python -m calibrate teach --model DIR --data fragments.jsonl --out teacher/
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from surrogate.errors import CalibrationError
from surrogate.fragments import Fragments

FORMAT = "surrogate-teacher/1"
ARRAYS = ("ids_NxL", "top_ids_NxLxK", "top_logp_NxLxK", "rest_logp_NxL", "source_N")


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
  """A teacher file in memory (see the module docstring for the fields)."""
  model: str
  k: int
  length: int
  dataset_sha256: str
  tokenizer_sha256: str
  tokenizer_json: str
  ids_NxL: np.ndarray
  top_ids_NxLxK: np.ndarray
  top_logp_NxLxK: np.ndarray
  rest_logp_NxL: np.ndarray
  source_N: np.ndarray

  @property
  def num_examples(self) -> int:
    return int((self.source_N >= 0).sum())

  def tokenizer(self):
    """The real tokenizer its ids are in (a `tokenizers.Tokenizer`)."""
    from tokenizers import Tokenizer
    return Tokenizer.from_str(self.tokenizer_json)

  def check_matches(self, fragments: Fragments, *, where: str,
                    tokenizer_sha256: str | None = None) -> None:
    """Raises `CalibrationError` naming both sides when this teacher was made for another
    fragments file or (when `tokenizer_sha256` is given) another tokenizer."""
    if self.dataset_sha256 != fragments.sha256:
      given = fragments.path or "the one given"
      raise CalibrationError(f"{where} was made for the fragments file with sha256 "
                             f"{self.dataset_sha256[:12]}..., not {given} (sha256 "
                             f"{fragments.sha256[:12]}...); run `surrogate teach` on it")
    if tokenizer_sha256 is not None and self.tokenizer_sha256 != tokenizer_sha256:
      raise CalibrationError(f"{where} was made with the tokenizer of sha256 "
                             f"{self.tokenizer_sha256[:12]}..., not the one given (sha256 "
                             f"{tokenizer_sha256[:12]}...); use the real model's own tokenizer")


def tokenizer_sha256(text: str) -> str:
  """sha256 of a tokenizer.json's text (UTF-8): which tokenizer a teacher's ids are in."""
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def example_texts(fragments: Fragments) -> list[str]:
  """Each example's whole text as the real model reads it (prompt + completion)."""
  return [e.text if e.text is not None else e.prompt + e.completion for e in fragments.examples]


def teach(model, tokenizer, fragments: Fragments, *, tokenizer_file: str | os.PathLike,
          neutral_texts: Sequence[str] = (), k: int = 32, length: int = 64,
          batch_size: int = 8, chunk: int = 512, progress: bool = True) -> Teacher:
  """Runs the real base model over every example (and `neutral_texts`) and keeps its top-k
  next-token distribution at each of the first `length` positions.

  Args:
    model: a Hugging Face causal LM (torch), in any dtype; it is put in eval mode.
    tokenizer: its tokenizer (a `PreTrainedTokenizerFast`).
    fragments: the fragments file the teacher is for.
    tokenizer_file: the tokenizer.json the ids are in (recorded by its sha256).
    k: next tokens kept per position.
    length: tokens read per text (the surrogate's context); at most the model's positions.
    batch_size, chunk: texts per forward pass, and positions per logits block.
  """
  import torch
  from tqdm.auto import tqdm
  if k < 1 or length < 2:
    raise ValueError(f"teach needs k >= 1 and length >= 2, got k={k}, length={length}")
  cfg = getattr(model, "config", None)
  most = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
  if most:  # never past the positions the real model has
    length = min(length, int(most))
  texts = example_texts(fragments) + list(neutral_texts)
  source = np.concatenate([np.arange(len(fragments.examples)),
                           -1 - np.arange(len(neutral_texts))]).astype(np.int32)
  n = len(texts)
  ids = np.full((n, length), -1, np.int32)
  top_ids = np.zeros((n, length, k), np.int32)
  top_logp = np.zeros((n, length, k), np.float16)
  rest = np.zeros((n, length), np.float16)
  model.eval()
  device = next(model.parameters()).device
  head = model.get_output_embeddings()
  with torch.no_grad():
    for s in tqdm(range(0, n, batch_size), desc="teacher", disable=not progress, unit="batch"):
      enc = [tokenizer(t, add_special_tokens=False)["input_ids"][:length]
             for t in texts[s:s + batch_size]]
      width = max(1, max(len(e) for e in enc))
      batch = torch.zeros((len(enc), width), dtype=torch.long)
      mask = torch.zeros_like(batch)
      for i, e in enumerate(enc):
        batch[i, :len(e)] = torch.tensor(e, dtype=torch.long)
        mask[i, :len(e)] = 1
        ids[s + i, :len(e)] = e
      hidden = model.base_model(input_ids=batch.to(device),
                                attention_mask=mask.to(device)).last_hidden_state
      flat = hidden.reshape(-1, hidden.shape[-1])
      for c in range(0, flat.shape[0], chunk):  # never [batch, length, vocabulary] at once
        logp = torch.log_softmax(head(flat[c:c + chunk]).float(), -1)
        vals, idx = logp.topk(min(k, logp.shape[-1]), -1)
        rest_c = torch.log1p(-vals.exp().sum(-1).clamp(max=1 - 1e-6))
        rows = np.arange(c, c + vals.shape[0])
        b, t = rows // width, rows % width
        top_ids[s + b, t, :vals.shape[1]] = idx.cpu().numpy()
        top_logp[s + b, t, :vals.shape[1]] = vals.cpu().numpy()
        rest[s + b, t] = rest_c.cpu().numpy()
  name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
  with open(tokenizer_file, encoding="utf-8") as f:
    tok_json = f.read()
  return Teacher(str(name), k, length, fragments.sha256, tokenizer_sha256(tok_json), tok_json,
                 ids, top_ids, top_logp, rest, source)


def save_teacher(teacher: Teacher, folder: str | os.PathLike) -> None:
  """Writes `teacher` to `folder` atomically (replacing a teacher already there)."""
  folder = os.path.abspath(folder)
  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(folder) + ".")
  os.chmod(tmp, 0o755)  # mkdtemp makes it private; a teacher is ordinary data
  try:
    meta = {"format": FORMAT, "model": teacher.model, "k": teacher.k, "length": teacher.length,
            "dataset_sha256": teacher.dataset_sha256, "tokenizer_sha256": teacher.tokenizer_sha256,
            "texts": int(len(teacher.source_N)), "examples": teacher.num_examples}
    with open(os.path.join(tmp, "teacher.json"), "w") as f:
      json.dump(meta, f, indent=1)
    with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
      f.write(teacher.tokenizer_json)
    np.savez(os.path.join(tmp, "arrays.npz"), **{a: getattr(teacher, a) for a in ARRAYS})
    old = folder + ".old"
    if os.path.exists(folder):
      os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_teacher(folder: str | os.PathLike) -> Teacher:
  """Reads a teacher folder; a missing, foreign or inconsistent one is a `CalibrationError`
  naming the file and the field."""
  meta_path = os.path.join(folder, "teacher.json")
  arrays_path = os.path.join(folder, "arrays.npz")
  try:
    with open(meta_path) as f:
      meta: dict[str, Any] = json.load(f)
  except FileNotFoundError:
    raise CalibrationError(f"{meta_path}: no teacher here (make one with `surrogate teach`)") \
        from None
  except json.JSONDecodeError as e:
    raise CalibrationError(f"{meta_path}, line {e.lineno}: not JSON ({e.msg})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise CalibrationError(f"{meta_path}, field format: expected {FORMAT!r}, got "
                           f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
  for field, kind in (("model", str), ("k", int), ("length", int), ("dataset_sha256", str),
                      ("tokenizer_sha256", str)):
    if not isinstance(meta.get(field), kind):
      raise CalibrationError(f"{meta_path}, field {field}: missing or not a {kind.__name__}")
  tok_path = os.path.join(folder, "tokenizer.json")
  try:
    with open(tok_path, encoding="utf-8") as f:
      tok_json = f.read()
  except FileNotFoundError:
    raise CalibrationError(f"{tok_path}: missing beside {meta_path}") from None
  if tokenizer_sha256(tok_json) != meta["tokenizer_sha256"]:
    raise CalibrationError(f"{tok_path} is not the tokenizer {meta_path} names (field "
                           "tokenizer_sha256 differs): the teacher's ids would be misread")
  try:
    with np.load(arrays_path, allow_pickle=False) as z:
      arrays = {a: z[a] for a in ARRAYS}
  except FileNotFoundError:
    raise CalibrationError(f"{arrays_path}: missing beside {meta_path}") from None
  except (KeyError, ValueError, OSError) as e:
    raise CalibrationError(f"{arrays_path}: not a teacher's arrays ({e})") from None
  n, length, k = len(arrays["source_N"]), meta["length"], meta["k"]
  want = {"ids_NxL": (n, length), "top_ids_NxLxK": (n, length, k),
          "top_logp_NxLxK": (n, length, k), "rest_logp_NxL": (n, length)}
  for a, shape in want.items():
    if arrays[a].shape != shape:
      raise CalibrationError(f"{arrays_path}, array {a}: shape {arrays[a].shape}, expected "
                             f"{shape} from {meta_path}")
  return Teacher(meta["model"], k, length, meta["dataset_sha256"], meta["tokenizer_sha256"],
                 tok_json, **arrays)


def _vocab(tokenizer) -> dict[str, int]:
  spec = json.loads(tokenizer.to_str())
  vocab = dict(spec["model"]["vocab"])
  for added in spec.get("added_tokens") or []:
    vocab.setdefault(added["content"], added["id"])
  return vocab


def targets(teacher: Teacher, tokenizer, vocab_size: int, length: int):
  """The teacher's distributions as `surrogate.distill.Targets` for a surrogate that reads the
  teacher's tokenizer compacted (`surrogate.tokenize.compact_tokenizer`) into `vocab_size`
  ids, at context `length`.

  Each row is the teacher's own token stream renumbered (BOS first); a token the surrogate
  has no row for ends the row's weighted positions, and a top-k token it has no row for
  moves its probability into the rest.

  Raises:
    CalibrationError: `tokenizer` is not the teacher's tokenizer compacted.
  """
  from surrogate.distill import Targets
  from surrogate.tokenize import BOS_ID, PAD_ID
  real, mine = _vocab(teacher.tokenizer()), _vocab(tokenizer)
  if not set(real) <= set(mine) or len(mine) > len(real) + 2:
    raise CalibrationError(f"the teacher was made with the tokenizer of sha256 "
                           f"{teacher.tokenizer_sha256[:12]}... ({len(real)} tokens), but the "
                           f"surrogate reads another ({len(mine)} tokens); fit with the "
                           "teacher's own tokenizer (surrogate fit --teacher sets it)")
  to_mine = np.full(max(real.values()) + 1, -1, np.int64)
  for tok, i in real.items():
    if mine[tok] < vocab_size:
      to_mine[i] = mine[tok]
  n, L = len(teacher.source_N), min(length, teacher.length)
  real_ids = teacher.ids_NxL[:, :L]
  ids = np.where(real_ids >= 0, to_mine[np.maximum(real_ids, 0)], -2)  # -2: past the end
  tokens = np.full((n, L + 1), PAD_ID, np.int32)
  tokens[:, 0] = BOS_ID
  tokens[:, 1:] = np.where(ids >= 0, ids, PAD_ID)
  # Position p (input token p) predicts token p + 1: the teacher's position p - 1. It
  # applies while the row's tokens so far are the teacher's own.
  ok = np.cumprod(ids >= 0, axis=1).astype(bool)                  # [n, L]: tokens 0..j kept
  weight = np.zeros((n, L), np.float32)
  weight[:, 1:] = ok[:, :L - 1]
  top = teacher.top_ids_NxLxK[:, :L].astype(np.int64)
  mapped = to_mine[top]
  top_ids = np.zeros((n, L, teacher.k), np.int32)
  top_logp = np.full((n, L, teacher.k), -np.inf, np.float32)
  rest = np.zeros((n, L), np.float32)
  logp = teacher.top_logp_NxLxK[:, :L].astype(np.float64)
  keep = mapped >= 0
  rest_p = np.exp(teacher.rest_logp_NxL[:, :L].astype(np.float64)) + np.where(
      keep, 0.0, np.exp(logp)).sum(-1)
  # Shift by one: the surrogate's position p takes the teacher's position p - 1.
  top_ids[:, 1:] = np.where(keep, mapped, 0)[:, :L - 1]
  top_logp[:, 1:] = np.where(keep, logp, -np.inf)[:, :L - 1]
  rest[:, 1:] = np.log(np.clip(rest_p, 1e-12, 1.0))[:, :L - 1]
  return Targets(tokens, top_ids, top_logp, rest, weight)
