"""Bad input through the real command line: exit 2, one line on stderr naming PATH:LINE and the field.

Each case writes a file in a temporary directory and runs ``python -m kvmpfn replay PATH`` there, PATH
relative, as a user would type it. The hostile inputs of issue 9 (huge lines and numbers, deep nesting,
broken compression, odd paths ...) are in test_hostile_input.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helper import check_input_error, run_kvmpfn

HEADER = b'{"kvmpfn": 1}\n'
VALID = b'{"op": "audit"}\n{"op": "invlpg", "addr": "0x1000"}\n{"op": "pf", "addr": 4096, "err": 2}\n'


def event(line: bytes) -> bytes:
    return HEADER + line + b"\n"


@dataclass
class Case:
    name: str
    data: bytes
    line: int | None  # None: a file-level error ("PATH: ...")
    field: str | None = None
    filename: str = "bad.jsonl"
    words: str = ""


CASES = [
    Case("malformed JSON", event(b'{"op": "pf", "addr": 1,'), 2, words="malformed JSON"),
    Case("malformed JSON in header", b'{"kvmpfn": 1\n', 1, words="malformed JSON"),
    Case("wrong type", event(b'{"op": "pf", "addr": [1], "err": 0}'), 2, "addr", words="expected an integer"),
    Case("string where a string is wrong", event(b'{"op": "audit", "label": 7}'), 2, "label"),
    Case("unknown op", event(b'{"op": "fault", "addr": 1}'), 2, "op", words='unknown op "fault"'),
    Case("missing op", event(b'{"addr": 1}'), 2, "op"),
    Case(
        "unknown field",
        event(b'{"op": "pf", "addr": 1, "err": 0, "eror": 1}'),
        2,
        "eror",
        words="unknown field",
    ),
    Case("missing field", event(b'{"op": "pf", "addr": 1}'), 2, "err", words="missing"),
    Case("missing header", b'{"op": "audit"}\n', 1, "kvmpfn"),
    Case("wrong version", b'{"kvmpfn": 2}\n', 1, "kvmpfn", words="version"),
    Case("negative int", event(b'{"op": "cr3", "val": -4096}'), 2, "val"),
    Case("bool as int", event(b'{"op": "pf", "addr": true, "err": 0}'), 2, "addr"),
    Case("bad hex string", event(b'{"op": "pf", "addr": 1, "err": "x7"}'), 2, "err", words='got "x7"'),
    Case(
        "flag out of range",
        event(b'{"op": "access", "addr": 0, "write": 2, "user": 0, "fetch": 0}'),
        2,
        "write",
    ),
    Case("empty file", b"", None, words="no header"),
    Case("only comments", b"# nothing\n\n   # here\n", None, words="no header"),
    Case("binary garbage", bytes(range(256)) * 64, 1),
    Case("invalid UTF-8 in a comment", HEADER + b"# caf\xe9\n", 2, words="invalid UTF-8"),
    Case("len 3", event(b'{"op": "write", "gpa": 0, "val": 0, "len": 3}'), 2, "len"),
    Case("val wider than len", event(b'{"op": "pte_write", "gpa": 0, "val": 65536, "len": 2}'), 2, "val"),
    Case(
        "unknown backing",
        b'{"kvmpfn": 1, "memslots": [{"slot": 0, "gfn": 0, "npages": 16, "backing": "rom"}]}\n',
        1,
        "memslots[0].backing",
    ),
    Case(
        "unknown backing in an event",
        event(b'{"op": "memslot", "slot": 1, "gfn": 0, "npages": 1, "backing": 1}'),
        2,
        "backing",
    ),
    Case("unknown kernel", b'{"kvmpfn": 1, "kernel": "2.6.24"}\n', 1, "kernel"),
    Case("maxphyaddr out of range", b'{"kvmpfn": 1, "guest": {"maxphyaddr": 64}}\n', 1, "guest.maxphyaddr"),
    Case("unknown paging mode", b'{"kvmpfn": 1, "guest": {"paging": "la57"}}\n', 1, "guest.paging"),
    Case("gfn >= 2**40", event(b'{"op": "host_remap", "gfn": 1099511627776}'), 2, "gfn"),
    Case(
        "error on line N after valid lines",
        b"# c\n" + HEADER + VALID * 3 + b'{"op": "cr3", "val": "0x"}\n',
        12,
        "val",
    ),
    Case("not an object", event(b'["op", "audit"]'), 2, words="JSON object"),
]


def test_enough_kinds_of_bad_input():
    assert len({case.name for case in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, case: Case):
    (tmp_path / case.filename).write_bytes(case.data)
    proc = run_kvmpfn(tmp_path, "replay", case.filename)
    where = f"{case.filename}:{case.line}: " if case.line is not None else f"{case.filename}: "
    check_input_error(proc, where, case.field, case.words)
