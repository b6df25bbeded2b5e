"""Property-based tests: the file loaders and the judge's score parser on arbitrary input.

Loaders must either load or raise one UserError naming the file and line, never another exception;
the parser must never raise and must find a well-formed last `Score: N` whatever precedes it.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from selfreward.data.limits import WORD_SLACK, truncate_text
from selfreward.data.seeds import load_eft, load_ift
from selfreward.errors import UserError
from selfreward.judge.parse import INVISIBLE, LABEL, parse_score
from selfreward.run.jsonl import append_jsonl, read_jsonl, repair_tail, write_jsonl_atomic

FAST = settings(max_examples=200, deadline=None)

# Any character, lone surrogates included: JSON can carry them ("\ud800") and models can emit odd text.
TEXT = st.text(st.characters(), max_size=30)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
OBJECTS = st.dictionaries(TEXT, JSON_VALUES, max_size=5)
# Lines no random generator would write, each once made a loader raise something other than UserError.
HOSTILE_LINES = [b"[" * 5000, b"1" * 5000, b'{"n": ' + b"9" * 5000 + b"}", b"\xff\xfe", b'"\\ud800"', b"NaN"]


def in_temp_file(data: bytes, action):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.jsonl"
        path.write_bytes(data)
        return action(path)


def json_line(record: dict) -> bytes:
    return json.dumps(record).encode() + b"\n"


@FAST
@given(st.lists(OBJECTS, max_size=6), st.integers(0, 6))
def test_jsonl_writers_and_reader_round_trip_any_objects(records, split):
    with tempfile.TemporaryDirectory() as folder:
        atomic, appended = Path(folder) / "a.jsonl", Path(folder) / "b.jsonl"
        assert write_jsonl_atomic(atomic, records) == len(records)
        appended.touch()  # appending nothing creates nothing
        append_jsonl(appended, records[:split])
        append_jsonl(appended, records[split:])
        assert read_jsonl(atomic) == records == read_jsonl(appended)


@FAST
@given(st.lists(st.binary(max_size=40) | OBJECTS.map(json_line) | st.sampled_from(HOSTILE_LINES), max_size=6))
@example([b'{"a": 1}\n', b"[" * 5000])
@example([b"1" * 5000])
def test_any_bytes_load_or_name_the_file_and_line(chunks):
    data = b"\n".join(chunks)
    lines = data.split(b"\n")
    try:
        records = in_temp_file(data, read_jsonl)
    except UserError as error:
        match = re.match(r"(.+?):(\d+): ", str(error))
        assert match and match.group(1).endswith("x.jsonl") and 1 <= int(match.group(2)) <= len(lines)
        return
    assert all(isinstance(record, dict) for record in records)
    assert len(records) == sum(bool(line.decode().strip()) for line in lines)


@FAST
@given(st.lists(OBJECTS, min_size=1, max_size=6), st.data())
def test_repair_tail_after_a_cut_at_any_byte_leaves_exactly_the_complete_records(records, data):
    lines = [json_line(record) for record in records]
    whole = b"".join(lines)
    offset = data.draw(st.integers(0, len(whole)), label="offset")

    def cut_and_repair(path: Path):
        repair_tail(path)
        return path.read_bytes(), read_jsonl(path)

    kept_bytes, kept = in_temp_file(whole[:offset], cut_and_repair)
    ends = [len(b"".join(lines[: i + 1])) for i in range(len(lines))]
    complete = sum(end <= offset for end in ends)
    assert kept == records[:complete]
    assert kept_bytes == b"".join(lines[:complete])


SEED_KEYS = st.sampled_from(["id", "instruction", "response", "judgment", "score", "rank"])
SEED_VALUES = JSON_VALUES | st.text(min_size=1, max_size=8) | st.integers(0, 5) | st.builds(
    lambda text, n: f"{text}\nScore: {n}", TEXT, st.integers(0, 6)
)
SEED_LINES = st.dictionaries(SEED_KEYS, SEED_VALUES, max_size=6).map(json_line) | JSON_VALUES.map(
    lambda value: json.dumps(value).encode() + b"\n"
)


@FAST
@given(st.lists(SEED_LINES, max_size=5), st.booleans())
@example([json_line({"id": "a", "instruction": "q", "response": "r", "judgment": "ok\nScore: 3", "score": 3})] * 2, True)
@example([json_line({"id": "a", "instruction": "q", "response": "r", "judgment": "ok\nScore: 3", "score": True})], True)
def test_seed_loaders_load_valid_examples_or_raise_a_user_error(lines, eft):
    try:
        records = in_temp_file(b"".join(lines), load_eft if eft else load_ift)
    except UserError as error:
        assert str(error).startswith(tempfile.gettempdir())
        return
    fields = ("id", "instruction", "response") + (("judgment",) if eft else ())
    for record in records:
        assert all(isinstance(record[key], str) and record[key].strip() for key in fields)
        if eft:
            assert parse_score(record["judgment"]) == record["score"] and type(record["score"]) is int
    assert len({record["id"] for record in records}) == len(records)


@FAST
@given(st.text(st.characters()), st.integers(1, 50))
def test_cut_returns_a_prefix_within_the_limit(text, limit):
    short = truncate_text(text, limit)
    assert text.startswith(short) and len(short) <= limit
    assert short == text if len(text) <= limit else len(short) >= limit * (1 - WORD_SLACK)


# parse_score


@FAST
@given(st.text(st.characters()))
@example("Score: 4\u200b" * 3)
def test_parse_score_never_raises_and_returns_none_or_0_to_5(text):
    score = parse_score(text)
    assert score is None or type(score) is int and 0 <= score <= 5


LABELS = st.sampled_from([
    "Score: {}", "score: {}", "SCORE:{}", "**Score:** {}", "**Score: {}**", "__Score:__ {}", "*Score*: {}",
    "Score: **{}**", "Score: {}/5", "Score: {} / 5.", "Score: {} out of 5", "Score: {}.", "Score:\t{} ",
])


@st.composite
def with_invisibles(draw, text: str) -> str:
    """`text` with zero-width characters (the kinds the parser promises to ignore) put anywhere."""
    chars = list(text)
    for _ in range(draw(st.integers(0, 3))):
        chars.insert(draw(st.integers(0, len(chars))), draw(st.sampled_from([chr(c) for c in INVISIBLE])))
    return "".join(chars)


@FAST
@given(st.text(st.characters()), LABELS, st.integers(0, 5), st.data())
def test_a_last_score_label_gives_its_number_whatever_precedes_it(prefix, label, number, data):
    suffix = data.draw(with_invisibles(label.format(number)), label="suffix")
    assert parse_score(f"{prefix}\n{suffix}") == number


@FAST
@given(st.text(st.characters()), st.integers(0, 5), st.text(st.characters()))
def test_text_after_the_score_line_without_another_label_changes_nothing(prefix, number, tail):
    if LABEL.search(tail.translate(INVISIBLE)):
        tail = ""
    assert parse_score(f"{prefix}\nScore: {number}\n{tail}") == number


OUT_OF_RANGE = st.integers(6, 10**30).map(str) | st.integers(-(10**6), -1).map(str)
DECIMALS = st.builds(lambda a, b, sep: f"{a}{sep}{b}", st.integers(0, 99), st.integers(0, 99), st.sampled_from(".,"))


@FAST
@given(st.text(st.characters()), LABELS, OUT_OF_RANGE | DECIMALS)
def test_numbers_outside_0_to_5_and_decimals_are_unparseable(prefix, label, number):
    assert parse_score(f"{prefix}\n{label.format(number)}") is None


def test_parse_score_survives_a_number_too_long_to_convert():
    assert parse_score("Score: " + "1" * 5000) is None
