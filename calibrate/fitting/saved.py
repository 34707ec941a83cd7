"""The saved simulator: a folder of plain data, written and read here only.

Files: `simulator.json` (settings, gains, how the fit went, every other file's sha256 and its
own),
`arrays.npz` (loaded without pickle), `tokenizer.json` and a copy of the fragments file; and,
once an analytic tier is fitted (`surrogate tier`), `analytic.npz` (its coefficients, one set
per surrogate seed) with its settings and trust check in simulator.json's `analytic`.
Loading checks every file's sha256, so a truncated or edited folder fails clearly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from calibrate.fitting.analytic import AnalyticTier, Fidelity
from calibrate.fitting.baselines import SimfluenceLinear
from calibrate.fitting.calibration import (
  Calibration,
  FitInfo,
  Simulator,
  SimulatorConfig,
)
from surrogate import analytic
from surrogate import model as model_lib
from surrogate import optim
from surrogate.errors import DataError
from surrogate.fragments import Fragments, read_fragments, sha256_file, write_fragments
from surrogate.jsonl import atomic_write

FORMAT = "surrogate-simulator/1"
_FILES = ("arrays.npz", "tokenizer.json", "fragments.jsonl")
# Calibration fields stored in arrays.npz under their own names (params are stored by path).
_ARRAYS = ("steps_C", "anchor_CxM", "sur_cal_SxCxM", "gain_F", "gain_sd_F", "example_sd_CxM",
           "fragment_sd_CxF")


class SimulatorError(DataError):
  """A saved simulator folder is missing, truncated, tampered with or of another format."""


def save(sim: Simulator, path: str | os.PathLike) -> None:
  """Writes the simulator as a folder of plain data (each file written atomically)."""
  cal, cfg = sim.calibration, sim.config
  os.makedirs(path, exist_ok=True)
  flat, _ = jax.tree_util.tree_flatten_with_path(cal.params_S)
  arrays = {f"params/{jax.tree_util.keystr(p)}": np.asarray(a) for p, a in flat}
  arrays.update({name: getattr(cal, name) for name in _ARRAYS})
  arrays.update(simfluence_a_FxF=sim.simfluence.a_FxF, simfluence_b_FxF=sim.simfluence.b_FxF)
  blobs = {"arrays.npz": _npz_bytes(arrays),
           "tokenizer.json": sim.tokenizer.to_str().encode(),
           "fragments.jsonl": _fragments_bytes(sim.fragments)}
  if sim.analytic is not None:
    blobs["analytic.npz"] = _npz_bytes(_tier_arrays(sim.analytic))
  for name, data in blobs.items():
    atomic_write(os.path.join(path, name), data)
  meta = {
      "format": FORMAT,
      "written_by": f"surrogate-sim {package_version()}",
      "model": dataclasses.asdict(cfg.model_cfg),
      "optimizer": cfg.opt_cfg.to_dict(),
      "knobs": {"lr_scale": float(cal.knobs.lr_scale),
                "weight_decay_scale": float(cal.knobs.weight_decay_scale)},
      "num_steps": cfg.num_steps, "batch_size": cfg.batch_size,
      "eval_ids": list(cfg.eval_ids), "gain_quantiles": list(cfg.gain_quantiles),
      "diag_seed": cfg.diag_seed,
      "effect_error": float(cal.effect_error),
      "dataset_sha256": sim.fragments.sha256, "info": sim.fit_info.to_json(),
      "simfluence_ridge": sim.simfluence.ridge,
      "analytic": None if sim.analytic is None else _tier_meta(sim.analytic),
      "files": {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()},
  }
  meta["sha256"] = _self_sha256(meta)
  # simulator.json last: a folder without it (a save killed midway) is no simulator.
  atomic_write(os.path.join(path, "simulator.json"),
               (json.dumps(meta, indent=1) + "\n").encode())


def load(path: str | os.PathLike) -> Simulator:
  """Reads a saved simulator, checking its format and every file's sha256.

  Raises:
    SimulatorError: a file is missing, unreadable, of another format or altered.
  """
  path = os.fspath(path)
  meta_path = os.path.join(path, "simulator.json")
  try:
    with open(meta_path, "rb") as f:
      meta = json.loads(f.read().decode("utf-8"))
  except (FileNotFoundError, NotADirectoryError):
    raise SimulatorError("no saved simulator here (simulator.json is missing)",
                         path=meta_path) from None
  except OSError as e:
    raise SimulatorError(f"cannot be read ({e.strerror})", path=meta_path) from None
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise SimulatorError(f"not valid JSON ({type(e).__name__}: {e})", path=meta_path) from None
  if not isinstance(meta, dict):
    raise SimulatorError(f"expected a JSON object of format {FORMAT!r}", path=meta_path)
  if meta.get("format") != FORMAT:
    by = meta.get("written_by")
    raise SimulatorError(
        f"format {meta.get('format')!r}" + (f" (written by {by})" if isinstance(by, str) else "")
        + f"; surrogate-sim {package_version()} reads {FORMAT!r}: save it again with this version",
        path=meta_path, field="format")
  if "sha256" in meta and meta["sha256"] != _self_sha256(meta):  # absent before 2026-12-01
    raise SimulatorError("it was changed after saving (its own sha256 no longer matches)",
                         path=meta_path, field="sha256")
  try:
    files = meta["files"]
    blobs = {name: _read_checked(path, name, files) for name in _FILES}
    fragments = read_fragments(os.path.join(path, "fragments.jsonl"))
    with np.load(os.path.join(path, "arrays.npz"), allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    model_cfg = model_lib.ModelConfig(**meta["model"])
    skeleton = model_lib.init_params(jax.random.key(0), model_cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    leaves = [jnp.asarray(arrays[f"params/{jax.tree_util.keystr(p)}"]) for p, _ in flat]
    config = SimulatorConfig(
        model_cfg=model_cfg, opt_cfg=optim.OptimizerConfig.from_dict(meta["optimizer"]),
        num_steps=int(meta["num_steps"]), batch_size=int(meta["batch_size"]),
        eval_ids=tuple(meta["eval_ids"]), gain_quantiles=tuple(meta["gain_quantiles"]),
        diag_seed=int(meta.get("diag_seed", 0)))  # absent in folders saved before it existed
    calibration = Calibration(
        params_S=jax.tree_util.tree_unflatten(treedef, leaves),
        knobs=optim.Knobs(jnp.float32(meta["knobs"]["lr_scale"]),
                          jnp.float32(meta["knobs"]["weight_decay_scale"])),
        effect_error=np.float64(meta["effect_error"]),
        **{name: arrays[name] for name in _ARRAYS})
    return Simulator(config=config, calibration=calibration, fragments=fragments,
                     tokenizer=Tokenizer.from_str(blobs["tokenizer.json"].decode()),
                     fit_info=FitInfo.from_json(meta["info"]),
                     simfluence=SimfluenceLinear(arrays["simfluence_a_FxF"],
                                                 arrays["simfluence_b_FxF"],
                                                 float(meta["simfluence_ridge"])),
                     analytic=_load_tier(path, meta, files))
  except SimulatorError:
    raise
  except (KeyError, TypeError, ValueError) as e:
    raise SimulatorError(f"inconsistent saved simulator ({e!r})", path=meta_path) from None


def _read_checked(path: str, name: str, files: dict) -> bytes:
  """A saved file's bytes, checked against simulator.json's sha256 of it."""
  p = os.path.join(path, name)
  try:
    with open(p, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise SimulatorError("missing from the saved simulator", path=p) from None
  if hashlib.sha256(data).hexdigest() != files[name]:
    raise SimulatorError("its sha256 differs from simulator.json's: the file was "
                         "truncated or changed after saving", path=p)
  return data


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def _tier_arrays(tier: AnalyticTier) -> dict[str, np.ndarray]:
  arrays = {f"params/{name}": np.asarray(a) for name, a in tier.params._asdict().items()}
  arrays.update(x0_Sx2xF=tier.x0_Sx2xF, cal_SxCx2xF=tier.cal_SxCx2xF,
                fit_mse_S=np.asarray(tier.fit_mse_S))
  return arrays


def _tier_meta(tier: AnalyticTier) -> dict:
  return {"fit_orders": tier.fit_orders, "seconds": tier.seconds,
          "betas": None if tier.betas is None else list(tier.betas), "form": tier.form,
          "fidelity": None if tier.fidelity is None else tier.fidelity.to_json()}


def _load_tier(path: str, meta: dict, files: dict) -> AnalyticTier | None:
  """The analytic tier of a saved folder, or None where none was fitted (folders saved
  before it existed have no `analytic` field)."""
  info = meta.get("analytic")
  if info is None:
    return None
  data = _read_checked(path, "analytic.npz", files)
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  # Folders saved before the latent form name no form: theirs follows from the betas.
  form = info.get("form", "plain" if info["betas"] is None else "adam")
  kind = analytic.LatentParams if form == "latent" else analytic.Params
  params = kind(**{name: jnp.asarray(arrays[f"params/{name}"]) for name in kind._fields})
  fid = info["fidelity"]
  return AnalyticTier(params=params, x0_Sx2xF=arrays["x0_Sx2xF"],
                      cal_SxCx2xF=arrays["cal_SxCx2xF"], fit_orders=int(info["fit_orders"]),
                      fit_mse_S=arrays["fit_mse_S"],
                      fidelity=None if fid is None else Fidelity.from_json(fid),
                      seconds=float(info["seconds"]),
                      betas=None if info["betas"] is None else tuple(map(float, info["betas"])),
                      form=form)


def _self_sha256(meta: dict) -> str:
  """The sha256 of simulator.json's content without its own `sha256` field (canonical JSON),
  so an edit of any setting is caught as an edit of the other files is."""
  rest = {k: v for k, v in meta.items() if k != "sha256"}
  return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def package_version() -> str:
  """The installed surrogate-sim's version (saved folders record it; `surrogate --version`)."""
  from importlib.metadata import PackageNotFoundError, version
  try:
    return version("surrogate-sim")
  except PackageNotFoundError:  # a checkout that is not installed
    return "(not installed)"


def _fragments_bytes(fragments: Fragments) -> bytes:
  """The fragments file's bytes: the original file when it is unchanged, else re-encoded."""
  if fragments.path and os.path.exists(fragments.path) and \
     sha256_file(fragments.path) == fragments.sha256:
    with open(fragments.path, "rb") as f:
      return f.read()
  with tempfile.TemporaryDirectory() as d:
    p = os.path.join(d, "f.jsonl")
    write_fragments(p, fragments)
    with open(p, "rb") as f:
      data = f.read()
  if hashlib.sha256(data).hexdigest() != fragments.sha256:
    raise ValueError("the fragments do not round-trip to the bytes they were read from")
  return data
