"""Bad input through the real command line: exit 2, one line on stderr naming PATH:LINE and the field.

Each case writes a file (or not) in a temporary directory and runs
``python -m kvmpfn replay PATH`` there, PATH relative, as a user would type it.
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

HEADER = b'{"kvmpfn": 1}\n'
VALID = b'{"op": "audit"}\n{"op": "invlpg", "addr": "0x1000"}\n{"op": "pf", "addr": 4096, "err": 2}\n'
BIG_BODY = HEADER + b"".join(b'{"op": "invlpg", "addr": %d, "x": "%d"}\n' % (i * 4096, i) for i in range(200_000))


def event(line: bytes) -> bytes:
    return HEADER + line + b"\n"


def zstd_cut_in_the_middle() -> bytes:
    data = zstandard.ZstdCompressor(write_checksum=True).compress(BIG_BODY)
    return data[: len(data) // 2]


ANY_LINE = "any"


@dataclass
class Case:
    name: str
    data: bytes | None  # None: the path does not exist; b"<dir>": a directory
    line: int | str | None  # None: a file-level error ("PATH: ..."); ANY_LINE: the line where a stream broke
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
    Case("int over 64 bits", event(b'{"op": "pf", "addr": 18446744073709551616, "err": 0}'), 2, "addr"),
    Case("hex over 64 bits", event(b'{"op": "invlpg", "addr": "0x10000000000000000"}'), 2, "addr"),
    Case("bool as int", event(b'{"op": "pf", "addr": true, "err": 0}'), 2, "addr"),
    Case("bad hex string", event(b'{"op": "pf", "addr": 1, "err": "x7"}'), 2, "err", words='got "x7"'),
    Case(
        "flag out of range",
        event(b'{"op": "access", "addr": 0, "write": 2, "user": 0, "fetch": 0}'),
        2,
        "write",
    ),
    Case(
        "truncated gzip",
        gzip.compress(BIG_BODY)[:-4000],
        ANY_LINE,
        filename="bad.jsonl.gz",
        words="truncated",
    ),
    Case(".gz that is not gzip", HEADER + VALID, 1, filename="bad.jsonl.gz", words="not a gzip file"),
    Case(
        ".zst cut in the middle",
        zstd_cut_in_the_middle(),
        ANY_LINE,
        filename="bad.jsonl.zst",
        words="truncated",
    ),
    Case(".zst that is not zstd", HEADER + VALID, 1, filename="bad.jsonl.zst", words="not a zstd file"),
    Case("empty file", b"", None, words="no header"),
    Case("only comments", b"# nothing\n\n   # here\n", None, words="no header"),
    Case("binary garbage", bytes(range(256)) * 64, 1),
    Case("NUL bytes", HEADER + VALID + b'{"op": "audit"\x00}\n', 5, words="NUL byte"),
    Case("invalid UTF-8", HEADER + VALID + b'{"op": "audit", "label": "caf\xe9"}\n', 5, words="invalid UTF-8"),
    Case("invalid UTF-8 in a comment", HEADER + b"# caf\xe9\n", 2, words="invalid UTF-8"),
    Case("missing file", None, None, filename="nosuch.jsonl", words="no such file"),
    Case("directory as trace", b"<dir>", None, filename="traces.jsonl", words="is a directory"),
    Case("len 3", event(b'{"op": "write", "gpa": 0, "val": 0, "len": 3}'), 2, "len"),
    Case("write crossing a page", event(b'{"op": "write", "gpa": "0x1ffe", "val": 0, "len": 4}'), 2, "gpa"),
    Case("val wider than len", event(b'{"op": "pte_write", "gpa": 0, "val": 65536, "len": 2}'), 2, "val"),
    Case("vcpu 16", event(b'{"op": "audit", "vcpu": 16}'), 2, "vcpu"),
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
    Case("gpa >= 2**52", event(b'{"op": "write", "gpa": "0x10000000000000", "val": 0, "len": 1}'), 2, "gpa"),
    Case("gfn >= 2**40", event(b'{"op": "host_remap", "gfn": 1099511627776}'), 2, "gfn"),
    Case(
        "memslots overlap",
        b'{"kvmpfn": 1, "memslots": [{"slot": 0, "gfn": 0, "npages": 16, "backing": "ram"}, '
        b'{"slot": 1, "gfn": 15, "npages": 1, "backing": "mmio"}]}\n',
        1,
        "memslots[1]",
    ),
    Case(
        "error on line N after valid lines",
        b"# c\n" + HEADER + VALID * 3 + b'{"op": "cr3", "val": "0x"}\n',
        12,
        "val",
    ),
    Case(
        "line too long",
        event(b'{"op": "audit", "label": "' + b"a" * (2 << 20) + b'"}'),
        2,
        words="line too long",
    ),
    Case("deep nesting", event(b'{"op": "audit", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 2),
    Case("not an object", event(b'["op", "audit"]'), 2, words="JSON object"),
]


def test_enough_kinds_of_bad_input():
    assert len({case.name for case in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, case: Case):
    target = tmp_path / case.filename
    if case.data == b"<dir>":
        target.mkdir()
    elif case.data is not None:
        target.write_bytes(case.data)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-m", "kvmpfn", "replay", case.filename],
        cwd=tmp_path,
        capture_output=True,
        env=env,
        timeout=120,
    )
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    (message,) = lines
    if case.line == ANY_LINE:
        match = re.search(rf"{re.escape(case.filename)}:(\d+): ", message)
        assert match and int(match.group(1)) > 1000, message  # lines before the break were read
    else:
        where = f"{case.filename}:{case.line}: " if case.line is not None else f"{case.filename}: "
        assert where in message, message
    if case.field is not None:
        assert f'field "{case.field}"' in message, message
    assert case.words in message, message
