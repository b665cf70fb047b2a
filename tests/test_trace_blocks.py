"""The reader's block path (``TraceReader._blocks``): events, line numbers and errors are exactly those of
decoding one line at a time (``TraceReader._lines``), wherever the block boundaries fall."""

from __future__ import annotations

import glob
import gzip
import os

import msgspec
import pytest
import zstandard

from kvmpfn.trace import EVENT_TYPES, Access, Pf, TraceError, Write, open_trace
from kvmpfn.trace import reader as trace_reader
from kvmpfn.trace.unhex import unhex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = b'{"kvmpfn": 1}\n'
#: block sizes: a few bytes (every block boundary falls inside a line), a few lines, the default
BLOCKS = (7, 300, trace_reader._BLOCK)


def collect(items) -> tuple[list, str | None]:
    """Everything an iteration yields, and the error that ended it (or None)."""
    out: list = []
    try:
        for item in items:
            out.append(item)
    except TraceError as e:
        return out, str(e)
    return out, None


def line_by_line(path: str) -> tuple[list, str | None]:
    """The reference: the lines after the header decoded one at a time."""
    with open_trace(path) as reader:
        return collect(reader._lines(reader._stream.read(), reader.line_no))


def in_blocks(path: str, monkeypatch, block: int) -> tuple[list, str | None]:
    monkeypatch.setattr(trace_reader, "_BLOCK", block)
    with open_trace(path) as reader:
        return collect(reader)


def write(tmp_path, body: bytes, name: str = "t.jsonl") -> str:
    path = tmp_path / name
    if name.endswith(".gz"):
        body = gzip.compress(body)
    elif name.endswith(".zst"):
        body = zstandard.ZstdCompressor().compress(body)
    path.write_bytes(body)
    return str(path)


def pf_lines(n: int, hex_every: int = 0) -> list[bytes]:
    """``n`` pf events, every ``hex_every``-th with hex strings (none if 0)."""
    lines = []
    for i in range(n):
        if hex_every and i % hex_every == 0:
            lines.append(b'{"op": "pf", "addr": "%#x", "err": "0x%x"}\n' % (i * 4096, i % 8))
        else:
            lines.append(b'{"op": "pf", "addr": %d, "err": %d}\n' % (i * 4096, i % 8))
    return lines


@pytest.mark.parametrize("block", BLOCKS)
def test_an_error_mid_block_comes_after_the_events_before_it(tmp_path, monkeypatch, block):
    lines = pf_lines(2000)
    lines[1234] = b'{"op": "pf", "addr": "0x10000000000000000", "err": 0}\n'
    path = write(tmp_path, HEADER + b"".join(lines))
    events, error = in_blocks(path, monkeypatch, block)
    assert (events, error) == line_by_line(path)
    assert [line for line, _ in events] == list(range(2, 1236))
    assert events[-1] == (1235, Pf(addr=1233 * 4096, err=1233 % 8))
    assert error == f'{path}:1236: event "pf": field "addr": expected 0 <= addr < 2**64, got "0x10000000000000000"'


@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz", "t.jsonl.zst"])
@pytest.mark.parametrize("block", BLOCKS)
def test_comments_blank_lines_and_mixed_spellings(tmp_path, monkeypatch, name, block):
    lines = pf_lines(3000, hex_every=3)
    lines[10:10] = [b"# a comment\n", b"\n", b"   \n", b"\t# indented comment\n"]
    lines[2000:2000] = [b"\r\n", b'  {"op": "pf", "addr": 1, "err": 2}  \r\n', b"# again\n"]
    lines[-1] = lines[-1].rstrip(b"\n")  # the last line without its newline
    path = write(tmp_path, HEADER + b"".join(lines), name)
    events, error = in_blocks(path, monkeypatch, block)
    assert error is None
    assert (events, error) == line_by_line(path)
    assert len(events) == 3001
    assert events[10] == (16, Pf(addr=10 * 4096, err=10 % 8))
    assert (2003, Pf(addr=1, err=2)) in events
    assert events[-1][0] == len(lines) + 1


@pytest.mark.parametrize("name", ["t.jsonl.gz", "t.jsonl.zst"])
def test_a_bad_line_far_into_a_compressed_stream(tmp_path, monkeypatch, name):
    """Many default-sized blocks, then an error: the line is the one a line-by-line reader names."""
    lines = pf_lines(30_000, hex_every=2)
    lines[25_001] = b'{"op": "pf", "addr": 1, "err": 0, "extra": 1}\n'
    path = write(tmp_path, HEADER + b"".join(lines), name)
    events, error = in_blocks(path, monkeypatch, trace_reader._BLOCK)
    assert len(events) == 25_001 and error == f'{path}:25003: event "pf": field "extra": ' + (
        'unknown field (free-form annotations go under "x")'
    )
    assert (events, error) == line_by_line(path)


@pytest.mark.parametrize(
    "bad",
    [
        b'{"op": "pf", "addr": 1, "err": 0} {"op": "pf", "addr": 2, "err": 0}',  # two values on a line
        b'{"op": "pf", "addr": 1, "err": 0}, {"op": "pf", "addr": 2, "err": 0}',  # ... separated by a comma
        b'{"op": "pf", "addr": 1,',  # a value over two lines
        b'"err": 0}',
        b'{"op": "pf", "addr": "0X10", "err": 0}',  # accepted by the slow path only
        b'{"op": "pf", "addr": "0x1_0", "err": 0}',
        b'{"op": "pf", "addr": "4096", "err": "0x0"}',
        b'{"op": "pf", "addr": 1, "err": 0}\x00',
        b"\xef\xbb\xbf{}",
    ],
)
def test_lines_an_array_would_misread(tmp_path, monkeypatch, bad):
    """Each of these lines, alone or with its neighbours, could make a JSON array of the right length or
    decode differently: every block size gives what one line at a time gives."""
    lines = pf_lines(500, hex_every=2)
    lines[300] = bad + b"\n"
    path = write(tmp_path, HEADER + b"".join(lines))
    expected = line_by_line(path)
    for block in BLOCKS:
        assert in_blocks(path, monkeypatch, block) == expected


def test_the_two_value_line_is_an_error_at_its_line(tmp_path, monkeypatch):
    lines = pf_lines(500)
    lines[300] = b'{"op": "pf", "addr": 1, "err": 0}, {"op": "pf", "addr": 2, "err": 0}\n'
    lines[301] = b"\n"  # a blank line after it: the count of lines would match
    path = write(tmp_path, HEADER + b"".join(lines))
    events, error = in_blocks(path, monkeypatch, trace_reader._BLOCK)
    assert len(events) == 300 and error is not None and error.startswith(f"{path}:302: ")


def test_a_line_over_the_limit_after_events_in_the_same_block(tmp_path, monkeypatch):
    long = b'{"op": "audit", "label": "' + b"a" * trace_reader.MAX_LINE + b'"}\n'
    path = write(tmp_path, HEADER + b"".join(pf_lines(100)) + long + b"".join(pf_lines(10)))
    for block in BLOCKS:
        events, error = in_blocks(path, monkeypatch, block)
        assert len(events) == 100
        assert error == f"{path}:102: line too long (over {trace_reader.MAX_LINE} bytes)"


def test_line_no_follows_the_events_yielded(tmp_path):
    lines = pf_lines(5000)
    lines[4000:4000] = [b"# comment\n"]
    path = write(tmp_path, HEADER + b"".join(lines))
    with open_trace(path) as reader:
        assert reader.line_no == 1
        for line, _ in reader:
            assert reader.line_no == line
        assert reader.line_no == 5002


def test_hex_and_integer_spellings_decode_to_the_same_events(tmp_path):
    hexed = b'{"op": "write", "gpa": "0x1ff8", "val": "0xffffffffffffffff", "len": 8}\n'
    ints = b'{"op": "write", "gpa": 8184, "val": 18446744073709551615, "len": 8}\n'
    access = b'{"op": "access", "addr": "0x7f0000001000", "write": 1, "user": 0, "fetch": false}\n'
    a = open_trace(write(tmp_path, HEADER + (hexed + access) * 1000, "a.jsonl"))
    b = open_trace(write(tmp_path, HEADER + (ints + access) * 1000, "b.jsonl"))
    with a, b:
        assert list(a) == list(b)
    write_event = Write(gpa=0x1FF8, val=(1 << 64) - 1, len=8)
    with open_trace(write(tmp_path, HEADER + hexed + access, "c.jsonl")) as c:
        assert list(c) == [(2, write_event), (3, Access(addr=0x7F0000001000, write=True, user=False, fetch=False))]


CORPUS = sorted(glob.glob(os.path.join(ROOT, "traces", "**", "*.jsonl*"), recursive=True))


def test_the_corpus_reads_the_same_in_blocks(monkeypatch):
    """Every trace of traces/**: the same (line, event) pairs and the same error as line by line."""
    assert len(CORPUS) > 50
    for path in CORPUS:
        expected = line_by_line(path)
        assert expected[0], path
        for block in (64, trace_reader._BLOCK):
            assert in_blocks(path, monkeypatch, block) == expected, path


HEX_LINES = [
    b'{"op": "access", "addr": "0x7f0000001000", "write": 1, "user": false, "fetch": 0, "ac": true}',
    b'{"op": "pf", "addr": "0xffffffffffffffff", "err": "0x1f", "vcpu": 3}',
    b'{"op": "write", "gpa": "0x1ff8", "val": "0xffffffffffffffff", "len": 8}',
    b'{"op": "write", "gpa": "0x1ffc", "val": "0x1", "len": 8}',  # crosses a page: the inline check rejects it
    b'{"op": "pte_write", "gpa": "0x2000", "val": "0x10000", "len": 2}',  # val too wide
    b'{"op": "cr3", "val": "0x1000"}',
    b'{"op": "paging", "cr0_wp": 0, "maxphyaddr": 36}',
    b'{"op": "invlpg", "addr": "0xfff"}',
    b'{"op": "memslot", "slot": "0x1", "gfn": "0xfffffffff0", "npages": "0x10"}',
    b'{"op": "memslot", "slot": "0x1", "gfn": "0xfffffffff0", "npages": "0x11"}',  # past 2**40
    b'{"op": "dirty_log", "slot": "0x2", "stop": 1}',
    b'{"op": "host_remap", "gfn": "0xfffffffff"}',
    b'{"op": "inject", "fault": "enomem", "count": "0x2"}',
]


def test_hex_lines_decode_as_the_slow_path_does():
    """A hex line rewritten by unhex and decoded typed gives the event the slow path (untyped, strings parsed,
    then converted) gives, and is rejected where the slow path rejects it."""
    outcomes = []
    for line in HEX_LINES:
        results = []
        for decode in (
            lambda data: trace_reader._EVENT_DECODER.decode(unhex(data, 1, trace_reader._UNHEX_KEYS)),
            lambda data: trace_reader._decode_slow(data, False),
        ):
            try:
                results.append(decode(line))
            except (msgspec.ValidationError, trace_reader._LineError):
                results.append("rejected")
        assert results[0] == results[1], line
        assert results[0] == "rejected" or type(results[0]) is EVENT_TYPES[msgspec.json.decode(line)["op"]]
        outcomes.append(results[0] == "rejected")
    assert outcomes.count(True) == 3
