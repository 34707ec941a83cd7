"""More reference real runs, of other kinds than `lm` and `cls` (development sets).

    python -m calibrate.reference.more --set multilingual   # about 25 minutes here
    python -m calibrate.reference.more --set whatis         # about 10 minutes here
    python -m calibrate.reference.more --set apidocs        # about 25 minutes here

- `multilingual` (`data/multilingual`): its own base — GPT-2 (2 layers, width 128, 4 heads,
  128 positions; 750 steps of 32 x 128 tokens, the `lm` base's token count) with a byte-level
  BPE of 4,096 tokens, both trained on English man pages of
  sections 2-8 (not section 1, the `lm` base's text) and Python's reference manual — fine-tuned
  on man pages in 12 other languages (Debian's translated pages in /usr/share/man/<lang>),
  one fragment a language: long examples (chunks of about 600 characters, up to 128 tokens),
  related languages side by side (Romance, Germanic, Slavic), so fragments help each other.
- `whatis` (`data/whatis`): a prompt/completion task on the `lm` set's base: the prompt
  names a command or function ("What does `ls` do?"), the completion is its man page's
  one-line description (several tokens, loss on the completion only); one fragment a man
  section or family, of very unequal sizes (8 to 60 train examples).
- `apidocs` (`data/apidocs`): a base of another architecture and vocabulary — Llama (rotary
  positions, RMSNorm, SwiGLU; 2 layers, width 128, 4 heads, 96 positions; 750 steps of
  32 x 96 tokens) with a byte-level BPE of 8,192 tokens, both trained on English prose
  (WordNet's glosses and every `fortunes` file) — fine-tuned on the docstrings of Python
  3.11's standard library (a name, its signature and its docstring) in 12 module families,
  related ones side by side (email, web and networking; asyncio and concurrency; files and
  archives). The docstrings are read from the running interpreter, so another Python version
  makes other data.

All three follow the 24-order plan of `calibrate.reference.runs` (240 steps of 16 examples).
Steps are skipped when their output exists, so a killed job resumes. Real training of real
models; requires the `[torch]` extra and Debian's man pages (manpages, manpages-dev and the
`manpages-<lang>` packages; `wordnet-base` and `fortunes` for `apidocs`).
"""

from __future__ import annotations

import argparse
import functools
import glob
import gzip
import os
import re
import time

import numpy as np

from calibrate.reference.lm import OPTIMIZER, load_base, train_base
from calibrate.reference.runs import Task, run_all

DATA = os.path.join(os.path.dirname(__file__), "data")
MAN = "/usr/share/man"
LANGUAGES = ("de", "nl", "sv", "da", "fr", "es", "it", "pt", "ro", "pl", "ru", "uk")
N_TRAIN, N_PROBE = 40, 10
CHUNK_CHARS, LONG = 600, 128


def page_text(path: str) -> str:
  """A man page's running text: troff requests and escapes stripped, whitespace folded."""
  try:
    raw = gzip.decompress(open(path, "rb").read()).decode("utf-8", "replace")
  except (OSError, EOFError):
    return ""
  lines = [re.sub(r"\\f[BIRP]|\\[-&e(]..?|\\\*.|\\.", "", ln) for ln in raw.splitlines()
           if ln and not ln.startswith((".", "'"))]
  return re.sub(r"\s+", " ", " ".join(lines)).strip()


def _chunks(text: str, size: int) -> list[str]:
  """Consecutive pieces of about `size` characters, cut at spaces."""
  out, start = [], 0
  while len(text) - start >= size // 2:
    end = text.rfind(" ", start, start + size) if len(text) - start > size else len(text)
    end = end if end > start else start + size
    out.append(text[start:end].strip())
    start = end
  return out


# ----------------------------------------------------------------------------------------------
# multilingual


def _base_corpus(max_bytes: int = 3_000_000) -> list[str]:
  from pydoc_data.topics import topics
  texts, total = [], 0
  for path in sorted(glob.glob(os.path.join(MAN, "man[2-8]", "*.gz"))):
    t = page_text(path)
    if len(t) > 200:
      texts.append(t)
      total += len(t)
    if total > max_bytes:
      break
  return texts + [re.sub(r"\s+", " ", t).strip() for _, t in sorted(topics.items())]


def make_multilingual_base(out: str, *, steps: int = 750, seed: int = 0) -> None:
  train_base(os.path.join(out, "base"), _base_corpus(), vocab_size=4096, length=LONG,
             steps=steps, seed=seed)


def make_multilingual_fragments(out: str) -> str:
  """Per language: train chunks from some pages, probe chunks from other pages (every 4th
  page), at most 3 chunks a page, in file order."""
  from surrogate.fragments import Example, write_fragments
  path = os.path.join(out, "fragments.jsonl")
  if os.path.exists(path):
    return path
  examples = []
  for lang in LANGUAGES:
    pages = [t for t in (page_text(p) for p in sorted(glob.glob(os.path.join(MAN, lang, "man*",
                                                                            "*.gz"))))
             if len(t) >= CHUNK_CHARS]
    got = {"train": [], "probe": []}
    for n, text in enumerate(pages):
      split = "probe" if n % 4 == 3 else "train"
      want = N_PROBE if split == "probe" else N_TRAIN
      got[split].extend(_chunks(text, CHUNK_CHARS)[: 3][: want - len(got[split])])
    if len(got["train"]) < N_TRAIN or len(got["probe"]) < N_PROBE:
      raise RuntimeError(f"man pages in {lang!r} give only {len(got['train'])} train and "
                         f"{len(got['probe'])} probe chunks; install manpages-{lang}")
    for split, texts in got.items():
      examples += [Example(f"{lang}/{split}/{i}", lang, split, text=t) for i, t in enumerate(texts)]
  os.makedirs(out, exist_ok=True)
  write_fragments(path, examples)
  return path


def multilingual_task(out: str) -> Task:
  return Task(out=out, model_name="gpt2-2x128-bpe4096-man", optimizer=OPTIMIZER, max_length=LONG,
              load=functools.partial(load_base, base_dir=os.path.join(out, "base")))


# ----------------------------------------------------------------------------------------------
# whatis

# Fragment -> (man section glob, page-name pattern): sections and families of very unequal size.
WHATIS = {
    "syscalls": ("man2", r".*"), "libc": ("man3", r"\.3\.gz$"),
    "perl-modules": ("man3", r"\.3perl\.gz$"), "openssl": ("man1", r"\.1ssl\.gz$"),
    "files": ("man5", r".*"), "misc": ("man7", r".*"), "admin": ("man8", r".*"),
    "git": ("man1", r"^git-"), "types": ("man3", r"\.3type\.gz$"),
    "llvm": ("man1", r"^llvm"), "gcloud": ("man1", r"^gcloud"), "perf": ("man1", r"^perf"),
}
SIZES = (60, 48, 12, 16, 40, 32, 28, 24, 8, 10, 20, 14)  # train examples; probes: a quarter


def _whatis_line(path: str) -> tuple[str, str] | None:
  """(name, description) from a man page's NAME section ("ls \\- list directory contents")."""
  try:
    raw = gzip.decompress(open(path, "rb").read()).decode("utf-8", "replace")
  except (OSError, EOFError):
    return None
  lines = raw.splitlines()
  try:
    at = next(i for i, ln in enumerate(lines) if re.match(r'\.S[Hh] "?(NAME|Name)"?\s*$', ln))
  except StopIteration:
    return None
  text = []
  for ln in lines[at + 1:]:
    if ln.startswith((".SH", ".Sh")) or (text and ln.startswith(".")):
      break
    if ln.strip() and not ln.startswith("."):  # blank lines and requests such as .HP
      text.append(ln)
  line = re.sub(r"\\f[BIRP]|\\\*.|\\&", "", " ".join(text))
  parts = re.split(r"\s+\\?-\s+", line, maxsplit=1)
  if len(parts) != 2:
    return None
  name = parts[0].split(",")[0].strip().replace("\\-", "-")
  desc = re.sub(r"\s+", " ", parts[1].replace("\\-", "-")).strip()
  if not re.fullmatch(r"[\w.+: -]{1,60}", name) or not 8 <= len(desc) <= 120:
    return None
  return name, desc


def make_whatis_fragments(out: str) -> str:
  from surrogate.fragments import Example, write_fragments
  path = os.path.join(out, "fragments.jsonl")
  if os.path.exists(path):
    return path
  examples = []
  for (frag, (section, pattern)), n_train in zip(WHATIS.items(), SIZES):
    n_probe = max(4, n_train // 4)
    lines, seen = [], set()
    for p in sorted(glob.glob(os.path.join(MAN, section, "*.gz"))):
      if re.search(pattern, os.path.basename(p)):
        got = _whatis_line(p)
        if got and got[0] not in seen:
          seen.add(got[0])
          lines.append(got)
    rng = np.random.default_rng(len(examples))
    lines = [lines[i] for i in rng.permutation(len(lines))]
    if len(lines) < n_train + n_probe:
      raise RuntimeError(f"{frag}: only {len(lines)} man pages with a NAME line")
    for split, chosen in (("train", lines[:n_train]),
                          ("probe", lines[n_train:n_train + n_probe])):
      examples += [Example(f"{frag}/{split}/{i}", frag, split,
                           prompt=f"What does `{name}` do?\n", completion=f" {desc}.")
                   for i, (name, desc) in enumerate(chosen)]
  os.makedirs(out, exist_ok=True)
  write_fragments(path, examples)
  return path


def whatis_task(out: str) -> Task:
  base = os.path.join(DATA, "lm", "base")
  return Task(out=out, model_name="gpt2-2x128", optimizer=OPTIMIZER, max_length=64,
              load=functools.partial(load_base, base_dir=base))


# ----------------------------------------------------------------------------------------------
# apidocs

WORDNET, FORTUNES = "/usr/share/wordnet", "/usr/share/games/fortunes"
API_FAMILIES = {
    "email": ("email", "mailbox", "smtplib", "imaplib", "poplib"),
    "web": ("http", "urllib", "html", "wsgiref", "xmlrpc", "ftplib"),
    "net": ("socket", "ssl", "ipaddress", "socketserver", "uuid", "hashlib", "hmac", "secrets",
            "base64", "binascii"),
    "xml": ("xml",),
    "asyncio": ("asyncio",),
    "concurrency": ("multiprocessing", "concurrent", "threading", "queue", "subprocess", "sched",
                    "selectors", "signal"),
    "logging": ("logging", "warnings", "traceback"),
    "imports": ("importlib", "pkgutil", "zipimport", "runpy", "site", "sysconfig"),
    "containers": ("collections", "functools", "itertools", "heapq", "bisect", "operator",
                   "copy", "weakref", "enum", "dataclasses"),
    "files": ("os", "shutil", "pathlib", "tempfile", "glob", "fnmatch", "filecmp", "stat", "io"),
    "archives": ("tarfile", "zipfile", "gzip", "bz2", "lzma", "zlib", "shelve", "dbm", "pickle",
                 "csv", "configparser", "plistlib"),
    "text": ("string", "textwrap", "difflib", "re", "codecs", "locale", "gettext", "unicodedata",
             "calendar", "datetime", "argparse", "optparse", "getopt"),
}
API_LENGTH, API_CHARS = 96, 480


def _prose_corpus(max_bytes: int = 1_500_000) -> list[str]:
  """The apidocs base's text: WordNet glosses ("word: gloss", 20 synsets a text, at most
  `max_bytes` in all, a quarter from each part of speech) and `fortunes` quotes (at most
  `max_bytes`)."""
  glosses = []
  for pos in ("noun", "verb", "adj", "adv"):
    total = 0
    for line in open(os.path.join(WORDNET, f"data.{pos}"), encoding="utf-8", errors="replace"):
      if line.startswith(" ") or "|" not in line:  # the licence header
        continue
      word = line.split()[4].replace("_", " ")
      glosses.append(f"{word}: {line.split('|', 1)[1].strip()}")
      total += len(glosses[-1])
      if total > max_bytes // 4:
        break
  texts = [" ".join(glosses[i:i + 20]) for i in range(0, len(glosses), 20)]
  total = 0
  for path in sorted(glob.glob(os.path.join(FORTUNES, "*"))):
    if "." in os.path.basename(path) or not os.path.isfile(path):
      continue  # index files (.dat) and links (.u8)
    raw = open(path, encoding="utf-8", errors="replace").read()
    for q in raw.split("\n%\n"):
      q = re.sub(r"\s+", " ", q).strip()
      if q and total < max_bytes:
        texts.append(q)
        total += len(q)
  return texts


def make_apidocs_base(out: str, *, steps: int = 750, seed: int = 0) -> None:
  train_base(os.path.join(out, "base"), _prose_corpus(), vocab_size=8192, length=API_LENGTH,
             steps=steps, seed=seed, architecture="llama")


def _modules(name: str) -> list:
  """A module and, for a package, its importable submodules (tests and __main__ left out)."""
  import importlib
  import pkgutil
  try:
    mod = importlib.import_module(name)
  except ImportError:
    return []
  out = [mod]
  for info in sorted(pkgutil.walk_packages(getattr(mod, "__path__", []), name + "."),
                     key=lambda i: i.name):
    if not re.search(r"\.(_|test)|__main__", info.name):
      try:
        out.append(importlib.import_module(info.name))
      except ImportError:
        pass
  return out


def _documented(modules: list) -> list[str]:
  """"name(signature)\ndocstring" of every public function, class and method defined in
  `modules` whose docstring has 80 characters or more, each docstring once, in module order."""
  import inspect

  def entry(qualname, obj):
    try:
      sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
      sig = "(...)"
    return f"{qualname}{sig}\n{inspect.getdoc(obj)}"[:API_CHARS]

  out, seen = [], set()
  for mod in modules:
    for name, obj in sorted(vars(mod).items()):
      if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
        continue
      if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        continue
      found = [(f"{mod.__name__}.{name}", obj)]
      if inspect.isclass(obj):
        found += [(f"{mod.__name__}.{name}.{m}", f) for m, f in sorted(vars(obj).items())
                  if not m.startswith("_") and inspect.isfunction(f)]
      for qualname, o in found:
        doc = inspect.getdoc(o)
        if doc and len(doc) >= 80 and doc not in seen:
          seen.add(doc)
          out.append(entry(qualname, o))
  return out


def make_apidocs_fragments(out: str) -> str:
  """Per family: 50 docstrings drawn at random (seeded by the family's position), every 5th a
  probe."""
  import warnings

  from surrogate.fragments import Example, write_fragments
  path = os.path.join(out, "fragments.jsonl")
  if os.path.exists(path):
    return path
  examples = []
  for f, (frag, names) in enumerate(API_FAMILIES.items()):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # deprecated modules say so on import
      docs = _documented([m for n in names for m in _modules(n)])
    if len(docs) < N_TRAIN + N_PROBE:
      raise RuntimeError(f"{frag}: only {len(docs)} docstrings in {', '.join(names)}")
    chosen = [docs[i] for i in np.random.default_rng(f).permutation(len(docs))[:N_TRAIN + N_PROBE]]
    for split in ("train", "probe"):
      texts = [t for i, t in enumerate(chosen) if (i % 5 == 4) == (split == "probe")]
      examples += [Example(f"{frag}/{split}/{i}", frag, split, text=t)
                   for i, t in enumerate(texts)]
  os.makedirs(out, exist_ok=True)
  write_fragments(path, examples)
  return path


def apidocs_task(out: str) -> Task:
  return Task(out=out, model_name="llama-2x128-bpe8192-prose", optimizer=OPTIMIZER,
              max_length=API_LENGTH,
              load=functools.partial(load_base, base_dir=os.path.join(out, "base")))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--set", choices=["multilingual", "whatis", "apidocs"], required=True)
  p.add_argument("--out", help="default: data/<set>")
  p.add_argument("--workers", type=int, default=2)
  args = p.parse_args()
  import torch
  torch.set_num_threads(1)
  out = args.out or os.path.join(DATA, args.set)
  t0 = time.time()
  if args.set == "multilingual":
    make_multilingual_fragments(out)
    make_multilingual_base(out)
    task = multilingual_task(out)
  elif args.set == "apidocs":
    make_apidocs_fragments(out)
    make_apidocs_base(out)
    task = apidocs_task(out)
  else:
    make_whatis_fragments(out)
    task = whatis_task(out)
  print(f"fragments and base ready ({time.time() - t0:.0f} s)", flush=True)
  run_all(task, workers=args.workers)


if __name__ == "__main__":
  main()
