from __future__ import annotations

import json

import pytest

from selfreward.errors import UserError
from selfreward.run.jsonl import append_jsonl, read_jsonl, repair_tail, resume_records


def test_torn_last_line_is_cut_on_resume(tmp_path):
    path = tmp_path / "x.jsonl"
    append_jsonl(path, [{"id": "a"}, {"id": "b"}])
    with path.open("a") as handle:
        handle.write('{"id": "c", "resp')
    assert [r["id"] for r in resume_records(path)] == ["a", "b"]
    assert path.read_text().endswith("}\n")
    assert repair_tail(path) == 0


def test_incomplete_group_is_removed_whole(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [{"id": f"p1-{i}", "prompt_id": "p1"} for i in range(3)])
    append_jsonl(path, [{"id": "p2-0", "prompt_id": "p2"}])  # a crash after one of three lines
    kept = resume_records(path, "prompt_id", 3)
    assert {r["prompt_id"] for r in kept} == {"p1"}
    assert len(read_jsonl(path)) == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"instruction": "a"}\nnot json\n', "x.jsonl:2: not valid JSON"),
        (b'[1, 2]\n', "x.jsonl:1: expected a JSON object"),
        (b'{"id": "a", "instruction": "  "}\n', "x.jsonl:1: field 'instruction' is empty"),
        (b'{"id": "a"}\n', "x.jsonl:1: missing field 'instruction'"),
        (b'{"id": "a", "instruction": 3}\n', "x.jsonl:1: field 'instruction' must be str"),
        (b'{"id": "a", "instruction": "\xff"}\n', "x.jsonl:1: not valid UTF-8"),
        (b'{"id": "a", "instruction": "q"}\n' + b"[" * 5000 + b"\n", r"x.jsonl:2: not valid JSON \(nested too deeply\)"),
        (b'{"id": ' + b"9" * 5000 + b"}\n", r"x.jsonl:1: not valid JSON \(a number is too long\)"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_jsonl(path, {"instruction": str})


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"id": "a"}) + "\n\n  \n" + json.dumps({"id": "b"}) + "\n")
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
