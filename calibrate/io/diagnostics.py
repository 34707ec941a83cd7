"""The five diagnostics measured on the real model, with the simulator's definitions.

`RealDiagnostics` takes the model's state when it is made (the base, before fine-tuning) as
the reference, and at every eval checkpoint measures, on a subsample of each fragment's probe
inputs, the same five quantities the simulator computes (`surrogate.diagnostics`, whose
functions do the arithmetic here too, so the two cannot drift apart):

  embedding_drift   relative change of the input-embedding rows of the fragment's probe tokens
  attention_shift   Jensen-Shannon divergence of attention maps from the base's
  plasticity        1 - linear CKA of final-layer hidden states against the base's
  logit_shift       KL(base || now) of the next-token distributions
  robustness        mean probe loss - mean train loss (from the eval's losses)

    diag = RealDiagnostics(model, dataset)             # before training: the reference
    ...
    rec.eval(step, losses, diagnostics=diag.measure(model, losses))

Cost, per checkpoint: one forward pass over `probes_per_fragment` x F probes (with attention
maps and hidden states); held between checkpoints: the base's next-token distributions on
those probes (P x L x V floats), their attention maps (layers x P x heads x L x L) and final
hidden states (P x L x D), and the base's embedding rows of the probe tokens. For a 150k
vocabulary, 48 probes of 512 tokens hold 15 GB of distributions: lower `probes_per_fragment`
or the dataset's `max_length` there. Causal LMs only (a classifier's outputs are not
next-token distributions). Attention maps come from eager attention: a model loaded with a
fused kernel (sdpa, flash) is switched to eager for the diagnostics' passes and back; where
that is not possible and no maps come back, `attention_shift` is None.
Under several processes, call it on rank 0 alone (`RunLogCallback` does): it needs whole
parameters, so it does not work under FSDP or DeepSpeed ZeRO-3 sharding.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
import jax.numpy as jnp
import numpy as np
import torch

from calibrate.io.runlog import DIAGNOSTIC_NAMES
from surrogate import diagnostics as diag_lib
from surrogate.fragments import Split


def choose_probes(fragments, per_fragment: int, seed: int = 0) -> list[np.ndarray]:
  """Each fragment's diagnostic probes: `per_fragment` of its probe positions, at random
  (numpy seed `seed`), sorted."""
  rng = np.random.default_rng(seed)
  return [np.sort(rng.permutation(pool)[:per_fragment]) for pool in fragments.probe_pools()]


class RealDiagnostics:
  """Measures the five diagnostics of a causal LM against its state at construction.

  Args:
    model: the model about to be fine-tuned (a `transformers` causal LM, or a `peft` model
      around one); its current state is the reference.
    dataset: a `calibrate.io.hf.FragmentsDataset` of the run's fragments (causal LM).
    probes_per_fragment: probe inputs per fragment the diagnostics are measured on.
    seed: chooses those probes (`choose_probes`).
    batch_size: probes per forward pass.
  """

  def __init__(self, model, dataset, *, probes_per_fragment: int = 4, seed: int = 0,
               batch_size: int = 16):
    if getattr(dataset, "labels", None) is not None:
      raise ValueError("RealDiagnostics needs a causal LM dataset; this one is a classifier's "
                       "(its outputs are not next-token distributions)")
    self.fragments = dataset.fragments
    self.batch_size = batch_size
    chosen = choose_probes(self.fragments, probes_per_fragment, seed)
    self.positions = np.concatenate(chosen).astype(np.int64)
    frag_P = self.fragments.fragment_of[self.positions]
    items = [dataset[int(i)]["input_ids"] for i in self.positions]
    length = max(len(ids) for ids in items)
    pad = dataset.tokenizer.pad_token_id or 0
    self._ids_PxL = torch.full((len(items), length), pad, dtype=torch.long)
    self._mask_PxL = torch.zeros((len(items), length), dtype=torch.long)
    for p, ids in enumerate(items):
      self._ids_PxL[p, : len(ids)] = ids
      self._mask_PxL[p, : len(ids)] = 1
    num_f = len(self.fragments.names)
    valid_PxL = self._mask_PxL.numpy().astype(bool)
    w = (frag_P[None, :, None] == np.arange(num_f)[:, None, None]) & valid_PxL[None]
    w = w.reshape(num_f, -1).astype(np.float32)
    w /= np.maximum(w.sum(1, keepdims=True), 1)
    # The embedding rows of the probes' tokens only (S of them), not the whole vocabulary.
    self._token_ids_S = np.unique(self._ids_PxL.numpy()[valid_PxL])
    where = {int(t): s for s, t in enumerate(self._token_ids_S)}
    tokens_FxS = np.zeros((num_f, len(self._token_ids_S)), np.float32)
    for p, f in enumerate(frag_P):
      tokens_FxS[f, [where[int(t)] for t in self._ids_PxL[p][valid_PxL[p]]]] = 1.0
    self._probes = diag_lib.ProbeSet(None, jnp.asarray(w), jnp.asarray(tokens_FxS))
    self._ref = self._capture(model)
    self._warned = False

  def _embed_S(self, model) -> np.ndarray:
    weight = model.get_input_embeddings().weight
    rows = weight.detach()[torch.as_tensor(self._token_ids_S)]
    return rows.float().cpu().numpy()

  @torch.no_grad()
  def _forward(self, model):
    """(attention K x P x H x L x L or None, hidden P x L x D, log-probs P x L x V) on the
    probes, in eval mode (no dropout); the model's mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    attn, hidden, logp = [], [], []
    # Fused attention kernels return no maps: eager attention for these passes only (the
    # same function; training keeps the user's kernel).
    config = getattr(model, "config", None)
    kernel = getattr(config, "_attn_implementation", None)
    switch = kernel not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
      model.set_attn_implementation("eager")
    try:
      for s in range(0, len(self.positions), self.batch_size):
        sl = slice(s, s + self.batch_size)
        out = model(input_ids=self._ids_PxL[sl].to(device),
                    attention_mask=self._mask_PxL[sl].to(device),
                    output_attentions=True, output_hidden_states=True)
        maps = out.attentions
        attn.append(None if not maps or any(a is None for a in maps)
                    else torch.stack([a.float() for a in maps]).cpu().numpy())
        hidden.append(out.hidden_states[-1].float().cpu().numpy())
        logp.append(torch.log_softmax(out.logits.float(), -1).cpu().numpy())
    finally:
      if switch:
        model.set_attn_implementation(kernel)
      model.train(was_training)
    maps = None if any(a is None for a in attn) else np.concatenate(attn, axis=1)
    return maps, np.concatenate(hidden), np.concatenate(logp)

  def _capture(self, model) -> diag_lib.Reference:
    attn, hidden, logp = self._forward(model)
    p = np.exp(logp)
    return diag_lib.Reference(jnp.asarray(self._embed_S(model)),
                              None if attn is None else jnp.asarray(attn), jnp.asarray(hidden),
                              None, jnp.asarray(p), jnp.asarray((p * logp).sum(-1)))

  def measure(self, model, losses: Mapping[str, float] | None = None
              ) -> dict[str, dict[str, float | None]]:
    """The five diagnostics of `model` now, per fragment (RunLog v1's eval `diagnostics`).

    Args:
      model: the model being fine-tuned.
      losses: the eval's example id -> loss, for `robustness` (None where a fragment has no
        evaluated probe or train example, or when `losses` is None).
    """
    ref, probes = self._ref, self._probes
    attn, hidden, logp = self._forward(model)
    values = {
        "embedding_drift": diag_lib.embedding_drift(jnp.asarray(self._embed_S(model)), ref,
                                                    probes),
        "plasticity": diag_lib.plasticity(jnp.asarray(hidden), ref, probes),
        "logit_shift": diag_lib.logit_shift(jnp.asarray(logp), ref, probes),
    }
    if attn is not None and ref.attn_KxPxHxLxL is not None:
      values["attention_shift"] = diag_lib.attention_shift(jnp.asarray(attn), ref, probes)
    elif not self._warned:
      self._warned = True
      warnings.warn("the model returns no attention maps (load it with "
                    "attn_implementation='eager'); attention_shift is recorded as null",
                    UserWarning, stacklevel=2)
    if losses is not None:
      values["robustness"] = self._robustness(losses)
    out: dict[str, dict[str, float | None]] = {}
    for f, name in enumerate(self.fragments.names):
      row = {}
      for key in DIAGNOSTIC_NAMES:
        v = values.get(key)
        x = None if v is None else float(np.asarray(v)[f])
        row[key] = None if x is None or not np.isfinite(x) else x
      out[name] = row
    return out

  def _robustness(self, losses: Mapping[str, float]) -> np.ndarray:
    frags = self.fragments
    num_f = len(frags.names)
    ids = [i for i in losses if i in frags.index]
    pos = np.array([frags.index[i] for i in ids], np.int64)
    loss_M = np.array([float(losses[i]) for i in ids])
    frag_M = frags.fragment_of[pos]
    is_probe_M = np.array([frags.examples[p].split == Split.PROBE for p in pos], bool)

    def weights(select_M):
      w = (frag_M[None, :] == np.arange(num_f)[:, None]) & select_M[None, :]
      return w / np.maximum(w.sum(1, keepdims=True), 1)

    probe_w, train_w = weights(is_probe_M), weights(~is_probe_M)
    gap = np.asarray(diag_lib.robustness(jnp.asarray(loss_M), jnp.asarray(probe_w),
                                         jnp.asarray(train_w)))
    return np.where(probe_w.sum(-1) > 0, gap, np.nan)

