"""Tests for surrogate.fragments: the fragments file format and its index arrays."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surrogate.errors import FragmentsError
from surrogate.fragments import (Example, Fragments, Split, read_fragments, sha256_file,
                                 write_fragments)

EXAMPLES = (
    Example("art/train/0", "art", Split.TRAIN, text="Une œuvre d'art."),
    Example("qa/train/0", "qa", Split.TRAIN, prompt="Q: 2+2?", completion=" 4"),
    Example("art/train/1", "art", Split.TRAIN, text="Another one.", extra={"source": "wiki"}),
    Example("qa/probe/0", "qa", Split.PROBE, prompt="", completion=" yes"),
    Example("art/probe/0", "art", Split.PROBE, text="Held out."),
    Example("qa/train/1", "qa", Split.TRAIN, prompt="Q: 3+3?", completion=" 6"),
)


def _write_lines(tmp_path, lines: list[str | bytes], name: str = "f.jsonl") -> str:
  path = tmp_path / name
  path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
  return str(path)


def _rec(**kw) -> str:
  rec = {"id": "a/0", "fragment": "a", "split": "train", "text": "t"}
  rec.update(kw)
  return json.dumps({k: v for k, v in rec.items() if v is not _DROP})


_DROP = object()
# A valid tail so that single-line cases are judged on their own rule, not "no probes".
_TAIL = [json.dumps({"id": "a/p", "fragment": "a", "split": "probe", "text": "p"}),
         json.dumps({"id": "a/t", "fragment": "a", "split": "train", "text": "t"})]


def test_round_trip(tmp_path):
  path = str(tmp_path / "f.jsonl")
  sha = write_fragments(path, EXAMPLES)
  assert sha == sha256_file(path)
  frags = read_fragments(path)
  assert frags.examples == EXAMPLES
  assert frags.sha256 == sha == Fragments.from_examples(EXAMPLES).sha256
  assert frags.path == path
  assert frags.examples[2].extra == {"source": "wiki"}
  assert frags.examples[0].is_text and not frags.examples[1].is_text
  # Keys in the documented order; UTF-8, not escapes.
  text = open(path, encoding="utf-8").read()
  assert "œuvre" in text
  assert list(json.loads(text.splitlines()[2])) == ["id", "fragment", "split", "text", "source"]
  assert list(json.loads(text.splitlines()[1])) == ["id", "fragment", "split", "prompt",
                                                    "completion"]
  # Writing a Fragments gives the same bytes; no temp file is left behind.
  assert write_fragments(tmp_path / "g.jsonl", frags) == sha
  assert sorted(os.listdir(tmp_path)) == ["f.jsonl", "g.jsonl"]


def test_index_arrays():
  frags = Fragments.from_examples(EXAMPLES)
  assert frags.names == ("art", "qa")
  assert dict(frags.index) == {ex.id: e for e, ex in enumerate(EXAMPLES)}
  np.testing.assert_array_equal(frags.fragment_of, [0, 1, 0, 1, 0, 1])
  np.testing.assert_array_equal(frags.split_of, [0, 0, 0, 1, 1, 0])
  assert frags.fragment_of.dtype == np.int32
  train = frags.train_pools()
  assert len(train) == 2 and all(p.dtype == np.int32 for p in train)
  np.testing.assert_array_equal(train[0], [0, 2])
  np.testing.assert_array_equal(train[1], [1, 5])
  probe = frags.probe_pools()
  np.testing.assert_array_equal(probe[0], [4])
  np.testing.assert_array_equal(probe[1], [3])
  np.testing.assert_array_equal(frags.probe_indices(), [3, 4])
  assert frags.probe_indices().dtype == np.int32
  with pytest.raises(ValueError):
    frags.fragment_of[0] = 1  # read-only: a shared array must not be changed by one caller
  assert frags.texts_for_tokenizer() == ["Une œuvre d'art.", "Q: 2+2?", " 4", "Another one.",
                                         " yes", "Held out.", "Q: 3+3?", " 6"]
  assert frags.texts_for_tokenizer(Split.PROBE) == [" yes", "Held out."]


def test_example_equality_ignores_extra_and_accepts_split_strings():
  a = Example("x", "f", "train", text="t", extra={"k": 1})
  b = Example("x", "f", Split.TRAIN, text="t")
  assert a.split is Split.TRAIN
  assert a == b and hash(a) == hash(b)


def test_blank_lines_and_crlf(tmp_path):
  lines = ["", _rec(id="a/0").replace("}", "}\r"), "   ", *_TAIL]
  frags = read_fragments(_write_lines(tmp_path, lines))
  assert [e.id for e in frags.examples] == ["a/0", "a/p", "a/t"]


@pytest.mark.parametrize("line, field", [
    ('{"id": "a/0", "fragment": ', None),
    ("[1, 2]", None),
    ('"just a string"', None),
    (_rec(id=_DROP), "id"),
    (_rec(id=5), "id"),
    (_rec(id=""), "id"),
    (_rec(fragment=_DROP), "fragment"),
    (_rec(fragment=None), "fragment"),
    (_rec(fragment=""), "fragment"),
    (_rec(split=_DROP), "split"),
    (_rec(split="test"), "split"),
    (_rec(split=1), "split"),
    (_rec(prompt="p", completion="c"), "text"),
    (_rec(text=_DROP), "text"),
    (_rec(text=_DROP, prompt="p"), "completion"),
    (_rec(text=_DROP, completion="c"), "prompt"),
    (_rec(text=float("nan")), "text"),
    (_rec(text=None), "text"),
    (_rec(text=_DROP, prompt=3, completion="c"), "prompt"),
    (_rec(text=_DROP, prompt="p", completion=["c"]), "completion"),
    (_rec(text=""), "text"),
    (_rec(text=_DROP, prompt="p", completion=""), "completion"),
    ('{"id": "a/0", "fragment": "a", "split": "train", "text": "\\ud800"}', "text"),
    ('{"id": "a/0", "id": "a/1", "fragment": "a", "split": "train", "text": "t"}', "id"),
    ("[" * 100_000 + "]" * 100_000, None),
    ('{"id": "a/0", "fragment": "a", "split": "train", "text": "t", "n": ' + "9" * 5000 + "}",
     None),
])
def test_record_rules(tmp_path, line, field):
  path = _write_lines(tmp_path, [_TAIL[0], "", line, *_TAIL[1:]])
  with pytest.raises(FragmentsError) as err:
    read_fragments(path)
  assert (err.value.path, err.value.line, err.value.field) == (path, 3, field)


def test_empty_prompt_is_allowed(tmp_path):
  frags = read_fragments(_write_lines(tmp_path, [_rec(text=_DROP, prompt="", completion="c"),
                                                 *_TAIL]))
  assert frags.examples[0].prompt == ""


def test_invalid_utf8_names_the_line(tmp_path):
  path = _write_lines(tmp_path, [*_TAIL, b'{"id": "x", "fragment": "a", "split": "train", '
                                 b'"text": "\xff"}'])
  with pytest.raises(FragmentsError) as err:
    read_fragments(path)
  assert (err.value.line, err.value.field) == (3, None)
  assert "UTF-8" in str(err.value)


def test_duplicate_id_names_both_lines(tmp_path):
  path = _write_lines(tmp_path, [*_TAIL, _rec(id="a/p")])
  with pytest.raises(FragmentsError) as err:
    read_fragments(path)
  assert (err.value.line, err.value.field) == (3, "id")
  assert "first on line 1" in str(err.value)


@pytest.mark.parametrize("lines", [[], ["", "  "]])
def test_no_examples(tmp_path, lines):
  with pytest.raises(FragmentsError) as err:
    read_fragments(_write_lines(tmp_path, lines))
  assert err.value.line is None


def test_fragment_without_train_examples(tmp_path):
  path = _write_lines(tmp_path, [*_TAIL, _rec(id="b/p", fragment="bees", split="probe")])
  with pytest.raises(FragmentsError, match="'bees'") as err:
    read_fragments(path)
  assert (err.value.line, err.value.field) == (None, "fragment")


def test_fragment_without_probes_warns(tmp_path):
  path = _write_lines(tmp_path, [*_TAIL, _rec(id="b/t", fragment="bees")])
  with pytest.warns(UserWarning, match="'bees'") as record:
    frags = read_fragments(path)
  assert record[0].filename == __file__  # points at the caller, not at the library
  assert len(frags.probe_pools()[1]) == 0
  with pytest.warns(UserWarning, match="'bees'"):
    Fragments.from_examples(frags.examples)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    write_fragments(tmp_path / "g.jsonl", frags)  # writing does not warn again


def test_from_examples_validates_with_positions():
  bad = EXAMPLES[:2] + (Example("z", "art", Split.TRAIN, text=""),) + EXAMPLES[2:]
  with pytest.raises(FragmentsError) as err:
    Fragments.from_examples(bad, path="mem.jsonl")
  assert (err.value.path, err.value.line, err.value.field) == ("mem.jsonl", 3, "text")
  clash = (Example("z", "art", Split.TRAIN, text="t", extra={"split": "probe"}),)
  with pytest.raises(FragmentsError) as err:
    Fragments.from_examples(EXAMPLES + clash)
  assert (err.value.line, err.value.field) == (7, "split")
  with pytest.raises(FragmentsError) as err:
    Fragments.from_examples(EXAMPLES + (Example("z", "art", "dev", text="t"),))
  assert (err.value.line, err.value.field) == (7, "split")


def test_failed_write_leaves_nothing(tmp_path):
  path = tmp_path / "f.jsonl"
  with pytest.raises(FragmentsError):
    write_fragments(path, EXAMPLES + (EXAMPLES[0],))  # duplicate id
  assert os.listdir(tmp_path) == []


def test_missing_file_is_os_error(tmp_path):
  with pytest.raises(OSError):
    read_fragments(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------------------------
# Fuzz: any bytes give a Fragments or a FragmentsError naming the file.

_VALID = b"".join(
    (json.dumps(r, ensure_ascii=False) + "\n").encode() for r in [
        {"id": "a/0", "fragment": "a", "split": "train", "text": "héllo"},
        {"id": "a/1", "fragment": "a", "split": "probe", "prompt": "Q", "completion": " A"},
        {"id": "b/0", "fragment": "b", "split": "train", "text": "x", "meta": {"k": [1]}},
        {"id": "b/1", "fragment": "b", "split": "probe", "text": "y"},
    ])
_KEYS = ["id", "fragment", "split", "text", "prompt", "completion", "meta"]
_BAD_BYTES = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\n", b"{", b"}", b'"', b"\\",
              b"\xef\xbb\xbf", b"NaN", b"\r"]

_json_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["train", "probe", "", "\ud800"]),
    st.integers(0, 200_000).map(lambda n: "x" * n),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                         max_size=2))


@st.composite
def _mutated(draw, valid: bytes, keys: list[str]) -> bytes:
  """A valid file put through one to three random edits."""
  data = valid
  for _ in range(draw(st.integers(1, 3))):
    op = draw(st.sampled_from(["truncate", "replace", "insert", "value", "drop_key",
                               "nest", "dup_line", "swap_lines"]))
    lines = data.split(b"\n")
    if op == "truncate":
      data = data[:draw(st.integers(0, len(data)))]
    elif op == "replace" and data:
      i = draw(st.integers(0, len(data) - 1))
      data = data[:i] + draw(st.sampled_from(_BAD_BYTES) | st.binary(min_size=1, max_size=4)) + \
          data[i + 1:]
    elif op == "insert":
      i = draw(st.integers(0, len(data)))
      data = data[:i] + draw(st.sampled_from(_BAD_BYTES) | st.binary(max_size=4)) + data[i:]
    elif op in ("value", "drop_key", "nest"):
      i = draw(st.integers(0, len(lines) - 1))
      try:
        rec = json.loads(lines[i])
      except (ValueError, RecursionError):  # an earlier edit broke the line: leave it
        continue
      if not isinstance(rec, dict):
        continue
      key = draw(st.sampled_from(keys))
      if op == "drop_key":
        rec.pop(key, None)
        lines[i] = json.dumps(rec).encode()
      elif op == "value":
        rec[key] = draw(_json_values)
        lines[i] = json.dumps(rec, ensure_ascii=draw(st.booleans())).encode("utf-8",
                                                                            "surrogatepass")
      else:
        n = draw(st.sampled_from([10, 100, 500, 5000, 100_000]))
        rec[key] = "@@"
        lines[i] = json.dumps(rec).replace('"@@"', "[" * n + "]" * n).encode()
      data = b"\n".join(lines)
    elif op == "dup_line":
      i = draw(st.integers(0, len(lines) - 1))
      data = b"\n".join(lines[:i + 1] + lines[i:])
    elif op == "swap_lines" and len(lines) > 1:
      i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
      lines[i], lines[j] = lines[j], lines[i]
      data = b"\n".join(lines)
  return data


@settings(max_examples=1000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=_mutated(_VALID, _KEYS))
def test_fuzz_reader_raises_only_fragments_error(tmp_path, data):
  path = tmp_path / "fuzz.jsonl"
  path.write_bytes(data)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    try:
      frags = read_fragments(path)
    except FragmentsError as e:
      assert e.path == str(path)
      return
    # What reads must write back and read again to the same examples.
    write_fragments(tmp_path / "again.jsonl", frags)
    assert read_fragments(tmp_path / "again.jsonl").examples == frags.examples


@pytest.mark.slow
@settings(max_examples=20_000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=_mutated(_VALID, _KEYS))
def test_fuzz_reader_many_more_inputs(tmp_path, data):
  test_fuzz_reader_raises_only_fragments_error.hypothesis.inner_test(tmp_path, data)
