"""The trace reader: decoding, line numbers, compression, streaming, and the validation rules of
docs/trace-format.md."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import sys
import threading

import msgspec
import pytest
import zstandard

from kvmpfn.trace import (
    MAX_LINE,
    Access,
    Audit,
    Cr3,
    DirtyLog,
    Guest,
    Header,
    HostConfig,
    HostRemap,
    Inject,
    Invlpg,
    Memslot,
    MemslotEvent,
    Paging,
    Pf,
    PteWrite,
    Teardown,
    TraceError,
    Write,
    open_trace,
)

HEADER = b'{"kvmpfn": 1}\n'


def write(tmp_path, data: bytes, name: str = "t.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def read_all(path: str) -> tuple[Header, list]:
    with open_trace(path) as reader:
        return reader.header, list(reader)


def events_of(tmp_path, *lines: bytes) -> list:
    return [ev for _, ev in read_all(write(tmp_path, HEADER + b"".join(line + b"\n" for line in lines)))[1]]


def one_event(tmp_path, line: bytes):
    (event,) = events_of(tmp_path, line)
    return event


def error_of(tmp_path, data: bytes, name: str = "t.jsonl") -> TraceError:
    path = write(tmp_path, data, name)
    with pytest.raises(TraceError) as info:
        read_all(path)
    err = info.value
    assert "\n" not in str(err)
    return err


def event_error(tmp_path, line: bytes) -> TraceError:
    return error_of(tmp_path, HEADER + line + b"\n")


def header_error(tmp_path, line: bytes) -> TraceError:
    return error_of(tmp_path, line + b"\n")


# --- values -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        (b"4096", 4096),
        (b'"4096"', 4096),
        (b'"0x1000"', 4096),
        (b'"0X1000"', 4096),
        (b'"0x00001000"', 4096),
        (b'"007"', 7),
        (b"0", 0),
        (b"18446744073709551615", 2**64 - 1),
        (b'"0xffffffffffffffff"', 2**64 - 1),
        (b'"18446744073709551615"', 2**64 - 1),
        (b'"0x' + b"0" * 100 + b'1"', 1),
    ],
)
def test_integer_spellings(tmp_path, text, value):
    event = one_event(tmp_path, b'{"op": "pf", "addr": ' + text + b', "err": ' + text + b"}")
    assert event == Pf(addr=value, err=value)
    assert type(event.addr) is int and type(event.err) is int


def test_integer_strings_in_every_kind_of_field(tmp_path):
    events = events_of(
        tmp_path,
        b'{"op": "write", "gpa": "0x1ff8", "val": "0xffffffffffffffff", "len": "8", "vcpu": "15"}',
        b'{"op": "memslot", "slot": "3", "gfn": "0x100", "npages": "0x10", "backing": "mmio"}',
        b'{"op": "inject", "fault": "enomem", "count": "0x2"}',
        b'{"op": "paging", "maxphyaddr": "0x24"}',
        b'{"op": "host_remap", "gfn": "0xfffffffff"}',
    )
    assert events == [
        Write(gpa=0x1FF8, val=2**64 - 1, len=8, vcpu=15),
        MemslotEvent(slot=3, gfn=0x100, npages=0x10, backing="mmio"),
        Inject(fault="enomem", count=2),
        Paging(maxphyaddr=36),
        HostRemap(gfn=0xFFFFFFFFF),
    ]


@pytest.mark.parametrize("spelling, value", [(b"1", True), (b"0", False), (b"true", True), (b"false", False)])
def test_flags_are_bools(tmp_path, spelling, value):
    s = spelling
    event = one_event(
        tmp_path,
        b'{"op": "access", "addr": 0, "write": %s, "user": %s, "fetch": %s, "ac": %s}' % (s, s, s, s),
    )
    for name in ("write", "user", "fetch", "ac"):
        assert getattr(event, name) is value
    stop = one_event(tmp_path, b'{"op": "dirty_log", "slot": 0, "stop": %s}' % s).stop
    assert stop is value


def test_a_field_given_twice_takes_the_last_value(tmp_path):
    """As docs/trace-format.md says (Values): the last value counts, hex or not, in a block or alone."""
    assert events_of(tmp_path, b'{"op": "audit", "op": "teardown"}') == [Teardown()]
    twice = b'{"op": "cr3", "val": "0x1000", "val": 8192}'
    assert events_of(tmp_path, twice, twice) == [Cr3(val=8192), Cr3(val=8192)]


def test_defaults(tmp_path):
    access, dirty, inject, memslot, audit, paging = events_of(
        tmp_path,
        b'{"op": "access", "addr": 1, "write": 0, "user": 0, "fetch": 0}',
        b'{"op": "dirty_log", "slot": 0}',
        b'{"op": "inject", "fault": "gup_fail"}',
        b'{"op": "memslot", "slot": 1, "gfn": 0, "npages": 0}',
        b'{"op": "audit"}',
        b'{"op": "paging", "paging": "pae"}',
    )
    assert access.ac is False and access.vcpu == 0 and access.t is None and access.x is None
    assert dirty.stop is False
    assert inject.count == 1
    assert memslot.backing == "ram" and memslot.npages == 0
    assert audit.label is None
    assert paging == Paging(paging="pae") and paging.cr0_wp is None and paging.maxphyaddr is None


def test_header_defaults(tmp_path):
    header, events = read_all(write(tmp_path, HEADER))
    assert events == []
    assert header == Header(kvmpfn=1)
    assert header.mmu == "shadow" and header.kernel == "pfn" and header.teardown is True and header.memory is None
    assert header.guest == Guest(paging="64", cr3=0, maxphyaddr=40)
    assert (header.guest.cr0_wp, header.guest.efer_nx, header.guest.cr4_pse) == (True, True, True)
    assert (header.guest.cr4_smep, header.guest.cr4_smap, header.guest.gbpages) == (False, False, False)
    assert header.memslots == [Memslot(slot=0, gfn=0, npages=65536, backing="ram")]
    assert header.host == HostConfig(first_pfn=0x100000)


def test_header_of_the_format_document(tmp_path):
    line = (
        b'{"kvmpfn": 1, "mmu": "shadow", '
        b'"guest": {"paging": "64", "cr3": "0x1000", "cr0_wp": true, "efer_nx": true, "cr4_pse": true}, '
        b'"memslots": [{"slot": 0, "gfn": 0, "npages": 16384, "backing": "ram"}, '
        b'{"slot": 1, "gfn": "0xfe000", "npages": 16, "backing": "mmio"}], '
        b'"memory": "guest.core", "kernel": "pfn", "teardown": true}'
    )
    header, _ = read_all(write(tmp_path, line + b"\n"))
    assert header.guest.cr3 == 0x1000
    assert header.memslots[1] == Memslot(slot=1, gfn=0xFE000, npages=16, backing="mmio")
    assert header.memory == "guest.core"


def test_header_flags_and_annotation(tmp_path):
    line = (
        b'{"kvmpfn": "1", "mmu": "tdp", "kernel": "notifier", "teardown": 0, "x": {"why": [1, 2]}, '
        b'"guest": {"paging": "pae", "cr0_wp": 0, "efer_nx": false, "cr4_smep": 1, "gbpages": true, '
        b'"maxphyaddr": 52}, "host": {"first_pfn": "0x200000"}}'
    )
    header, _ = read_all(write(tmp_path, line + b"\n"))
    assert header.teardown is False and header.x == {"why": [1, 2]}
    assert header.guest == Guest(paging="pae", cr0_wp=False, efer_nx=False, cr4_smep=True, gbpages=True, maxphyaddr=52)
    assert header.guest.cr4_smep is True and header.guest.cr0_wp is False
    assert header.host.first_pfn == 0x200000


def test_t_and_x_carry_any_json(tmp_path):
    event = one_event(tmp_path, b'{"op": "teardown", "t": 12.5, "x": {"k": [1, null, "s", {"d": true}]}}')
    assert event == Teardown(t=12.5, x={"k": [1, None, "s", {"d": True}]})


def test_every_event_type(tmp_path):
    events = events_of(
        tmp_path,
        b'{"op": "access", "addr": 1, "write": 1, "user": 0, "fetch": 0, "ac": 1, "vcpu": 3}',
        b'{"op": "pf", "addr": 2, "err": 31}',
        b'{"op": "write", "gpa": 8, "val": 255, "len": 1}',
        b'{"op": "pte_write", "gpa": 16, "val": 65535, "len": 2}',
        b'{"op": "cr3", "val": 4096}',
        b'{"op": "paging", "paging": "32", "cr0_wp": 1, "efer_nx": 0, "cr4_pse": true, "cr4_smep": false, '
        b'"cr4_smap": 1, "maxphyaddr": 36, "gbpages": 0}',
        b'{"op": "invlpg", "addr": 4096}',
        b'{"op": "memslot", "slot": 2, "gfn": 256, "npages": 16, "backing": "hugetlb"}',
        b'{"op": "dirty_log", "slot": 2, "stop": 1}',
        b'{"op": "host_remap", "gfn": 5}',
        b'{"op": "inject", "fault": "pte_race", "count": 3}',
        b'{"op": "audit", "label": "after boot"}',
        b'{"op": "teardown"}',
    )
    assert events == [
        Access(addr=1, write=True, user=False, fetch=False, ac=True, vcpu=3),
        Pf(addr=2, err=31),
        Write(gpa=8, val=255, len=1),
        PteWrite(gpa=16, val=65535, len=2),
        Cr3(val=4096),
        Paging(
            paging="32",
            cr0_wp=True,
            efer_nx=False,
            cr4_pse=True,
            cr4_smep=False,
            cr4_smap=True,
            maxphyaddr=36,
            gbpages=False,
        ),
        Invlpg(addr=4096),
        MemslotEvent(slot=2, gfn=256, npages=16, backing="hugetlb"),
        DirtyLog(slot=2, stop=True),
        HostRemap(gfn=5),
        Inject(fault="pte_race", count=3),
        Audit(label="after boot"),
        Teardown(),
    ]


def test_boundaries_accepted(tmp_path):
    events = events_of(
        tmp_path,
        b'{"op": "write", "gpa": "0xffffffffffff8", "val": "0xffffffffffffffff", "len": 8}',
        b'{"op": "write", "gpa": "0xfff", "val": 255, "len": 1}',
        b'{"op": "memslot", "slot": 1, "gfn": "0xfffffffff0", "npages": 16}',
        b'{"op": "pf", "addr": 0, "err": 0, "vcpu": 15}',
    )
    assert events[0].gpa == 2**52 - 8 and events[2].gfn + events[2].npages == 2**40 and events[3].vcpu == 15


# --- lines --------------------------------------------------------------------------------------------------


def test_comments_blank_lines_and_line_numbers(tmp_path):
    data = (
        b"# leading comment\n"
        b"\n"
        b'  {"kvmpfn": 1}\r\n'
        b"   # indented comment\n"
        b"\t\n"
        b'{"op": "audit"}\n'
        b"#\n"
        b'\t {"op": "teardown"}\n'
        b'{"op": "audit", "label": "no newline at the end"}'
    )
    with open_trace(write(tmp_path, data)) as reader:
        assert reader.header_line == 3
        got = list(reader)
    assert [line for line, _ in got] == [6, 8, 9]
    assert got[2][1] == Audit(label="no newline at the end")


def test_error_comes_after_the_valid_lines_before_it(tmp_path):
    data = HEADER + b'{"op": "audit"}\n' * 5 + b'{"op": "pf", "addr": "x7", "err": 0}\n' + b'{"op": "audit"}\n'
    seen = []
    with open_trace(write(tmp_path, data)) as reader, pytest.raises(TraceError) as info:
        for line, _event in reader:
            seen.append(line)
    assert seen == [2, 3, 4, 5, 6]
    assert info.value.line == 7 and info.value.field == "addr"
    assert str(info.value).endswith('t.jsonl:7: event "pf": field "addr": expected an integer, got "x7"')


def test_error_message_shape(tmp_path):
    path = write(tmp_path, HEADER + b'{"op": "pf", "addr": 1, "err": "x7"}\n', "trace.jsonl")
    with pytest.raises(TraceError) as info:
        read_all(path)
    assert str(info.value) == f'{path}:2: event "pf": field "err": expected an integer, got "x7"'
    assert (info.value.path, info.value.line, info.value.field) == (path, 2, "err")


def test_paths_are_shown_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel.jsonl").write_bytes(b'{"kvmpfn": 3}\n')
    with pytest.raises(TraceError) as info:
        open_trace("rel.jsonl")
    assert str(info.value).startswith('rel.jsonl:1: header: field "kvmpfn": ')


def test_trace_error_pickles():
    err = TraceError("t.jsonl", 5, "expected an integer", field="addr", context='event "pf"')
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) == 't.jsonl:5: event "pf": field "addr": expected an integer'
    assert (copy.path, copy.line, copy.field, copy.context) == ("t.jsonl", 5, "addr", 'event "pf"')


def test_trace_error_is_one_line():
    err = TraceError("a\nb.jsonl", 1, "bad\nvalue")
    assert "\n" not in str(err)


def test_line_length_limit(tmp_path):
    ok = b"#" + b"a" * (MAX_LINE - 1) + b"\n"
    _, events = read_all(write(tmp_path, HEADER + ok + b'{"op": "audit"}\n'))
    assert [line for line, _ in events] == [3]
    err = error_of(tmp_path, HEADER + b"#" + b"a" * MAX_LINE + b"\n")
    assert err.line == 2 and "line too long" in str(err)
    err = error_of(tmp_path, HEADER + b'{"op": "audit", "label": "' + b"a" * (4 * MAX_LINE) + b'"}\n')
    assert err.line == 2 and "line too long" in str(err)


def test_deep_nesting_is_an_input_error(tmp_path):
    deep = b"[" * 100_000 + b"]" * 100_000
    err = event_error(tmp_path, b'{"op": "audit", "x": ' + deep + b"}")
    assert err.line == 2 and "nested too deeply" in str(err)
    err = header_error(tmp_path, b'{"kvmpfn": 1, "x": ' + deep + b"}")
    assert err.line == 1 and "nested too deeply" in str(err)


@pytest.mark.parametrize(
    "data, needle",
    [
        (HEADER + b'{"op": "audit", "label": "\xff"}\n', "invalid UTF-8"),
        (HEADER + b"# comment \xc3\n", "invalid UTF-8"),
        (HEADER + b'{"op": "audit",\x00 "label": "a"}\n', "NUL byte"),
        (HEADER + b"# nul \x00 in a comment\n", "NUL byte"),
        (HEADER + b'{"op": "audit"\n', "malformed JSON"),
        (HEADER + b'{"op": "audit"} {}\n', "malformed JSON"),
        (HEADER + b"[1, 2]\n", "expected a JSON object"),
    ],
)
def test_bytes_and_syntax(tmp_path, data, needle):
    err = error_of(tmp_path, data)
    assert err.line == 2 and needle in str(err)


# --- files and compression ----------------------------------------------------------------------------------

BODY = HEADER + b"# comment\n" + b"".join(b'{"op": "pf", "addr": %d, "err": 2}\n' % (i * 4096) for i in range(5000))


def check_body(path: str) -> None:
    header, events = read_all(path)
    assert header == Header(kvmpfn=1)
    assert len(events) == 5000
    assert events[0] == (3, Pf(addr=0, err=2)) and events[-1] == (5002, Pf(addr=4999 * 4096, err=2))


def test_plain_gzip_zstd(tmp_path):
    check_body(write(tmp_path, BODY, "t.jsonl"))
    check_body(write(tmp_path, gzip.compress(BODY), "t.jsonl.gz"))
    check_body(write(tmp_path, zstandard.ZstdCompressor().compress(BODY), "t.jsonl.zst"))
    check_body(write(tmp_path, BODY, "t.txt"))


def test_multi_member_gzip_and_multi_frame_zstd(tmp_path):
    half = BODY.index(b'{"op": "pf", "addr": 40960,')
    parts = BODY[:half], BODY[half:]
    check_body(write(tmp_path, b"".join(gzip.compress(p) for p in parts), "t.jsonl.gz"))
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    check_body(write(tmp_path, b"".join(cctx.compress(p) for p in parts), "t.jsonl.zst"))


def test_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(BODY)))
    with open_trace("-") as reader:
        assert reader.path == "<stdin>"
        assert sum(1 for _ in reader) == 5000


def test_stdin_error_names_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(HEADER + b"{}\n")))
    with pytest.raises(TraceError) as info, open_trace("-") as reader:
        list(reader)
    assert str(info.value).startswith('<stdin>:2: event: field "op"')


def test_truncated_gzip(tmp_path):
    data = gzip.compress(BODY)
    err = error_of(tmp_path, data[: len(data) // 2], "t.jsonl.gz")
    assert "gzip stream truncated" in str(err)
    assert 3 < err.line < 5002


def test_truncated_zstd_reports_the_line_where_it_broke(tmp_path):
    body = HEADER + b"".join(b'{"op": "pf", "addr": %d, "err": %d}\n' % (i * 4096, i % 7) for i in range(100_000))
    data = zstandard.ZstdCompressor(write_checksum=True).compress(body)
    path = write(tmp_path, data[: len(data) // 2], "t.jsonl.zst")
    seen = 0
    with pytest.raises(TraceError) as info, open_trace(path) as reader:
        for _ in reader:
            seen += 1
    assert "zstd stream truncated" in str(info.value)
    assert seen > 1000 and info.value.line == seen + 2


def test_zstd_missing_only_its_checksum_is_truncated(tmp_path):
    data = zstandard.ZstdCompressor(write_checksum=True).compress(BODY)
    err = error_of(tmp_path, data[:-2], "t.jsonl.zst")
    assert "zstd stream truncated" in str(err)


def test_corrupt_zstd(tmp_path):
    data = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(BODY))
    data[len(data) // 2] ^= 0x55
    err = error_of(tmp_path, bytes(data), "t.jsonl.zst")
    assert "zstd" in str(err) and err.line is not None


@pytest.mark.parametrize("name, needle", [("t.jsonl.gz", "not a gzip file"), ("t.jsonl.zst", "not a zstd file")])
def test_not_compressed(tmp_path, name, needle):
    err = error_of(tmp_path, BODY, name)
    assert str(err).endswith(f"{name}:1: {needle}")


def test_file_level_errors(tmp_path):
    missing = str(tmp_path / "nosuch.jsonl")
    with pytest.raises(TraceError) as info:
        open_trace(missing)
    assert str(info.value) == f"{missing}: no such file" and info.value.line is None
    with pytest.raises(TraceError) as info:
        open_trace(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: is a directory"
    for data in (b"", b"# only\n\n  # comments\n"):
        err = error_of(tmp_path, data)
        assert err.line is None and "no header" in str(err)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = write(tmp_path, BODY)
    os.chmod(path, 0)
    with pytest.raises(TraceError) as info:
        open_trace(path)
    assert str(info.value) == f"{path}: permission denied"


def test_reader_closes_its_files(tmp_path):
    path = write(tmp_path, gzip.compress(BODY), "t.jsonl.gz")
    with open_trace(path) as reader:
        next(iter(reader))
        files = list(reader._owned)
    assert files and all(f.closed for f in files)


# --- streaming ----------------------------------------------------------------------------------------------


def test_events_are_decoded_lazily(tmp_path):
    """Line 13 is invalid: the first ten events come out before the reader gets there."""
    lines = [b'{"op": "pf", "addr": %d, "err": 0}\n' % i for i in range(200_000)]
    lines[11] = b'{"op": "pf", "addr": "bad", "err": 0}\n'
    path = write(tmp_path, HEADER + b"".join(lines))
    with open_trace(path) as reader:
        it = iter(reader)
        first = [next(it) for _ in range(10)]
        assert [line for line, _ in first] == list(range(2, 12))
        assert reader.line_no == 11
        next(it)
        with pytest.raises(TraceError) as info:
            next(it)
    assert info.value.line == 13


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_reader_streams_from_a_generator_backed_file(tmp_path):
    """A producer generates 200k lines into a pipe; ten events are read while it has written only a few."""
    fifo = tmp_path / "trace.jsonl"
    os.mkfifo(fifo)
    produced = [0]

    def lines():
        yield HEADER
        for i in range(200_000):
            produced[0] = i + 1
            yield b'{"op": "access", "addr": %d, "write": 1, "user": 0, "fetch": 0}\n' % (i * 4096)

    def producer():
        try:
            with open(fifo, "wb", buffering=0) as fh:
                for line in lines():
                    fh.write(line)
        except BrokenPipeError:
            pass

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    with open_trace(str(fifo)) as reader:
        it = iter(reader)
        first = [next(it) for _ in range(10)]
        assert first[9] == (11, Access(addr=9 * 4096, write=True, user=False, fetch=False))
        # The pipe holds at most ~64 KiB and the reader buffers ~64 KiB: about 2,000 lines of 60 bytes.
        assert produced[0] < 20_000
    thread.join(timeout=10)
    assert not thread.is_alive()


# --- rules --------------------------------------------------------------------------------------------------

EVENT_RULES = [
    # (line, field, words in the message)
    (b'{"op": "pf", "addr": -1, "err": 0}', "addr", "0 <= addr < 2**64, got -1"),
    (b'{"op": "pf", "addr": "-0x1", "err": 0}', "addr", '0 <= addr < 2**64, got "-0x1"'),
    (b'{"op": "pf", "addr": 18446744073709551616, "err": 0}', "addr", "< 2**64"),
    (b'{"op": "pf", "addr": 0, "err": "0x10000000000000000"}', "err", "< 2**64"),
    (b'{"op": "pf", "addr": "' + b"9" * 5000 + b'", "err": 0}', "addr", "< 2**64"),
    (b'{"op": "pf", "addr": true, "err": 0}', "addr", "expected an integer, got true"),
    (b'{"op": "pf", "addr": 1.0, "err": 0}', "addr", "expected an integer, got 1.0"),
    (b'{"op": "pf", "addr": null, "err": 0}', "addr", "expected an integer, got null"),
    (b'{"op": "pf", "addr": [1], "err": 0}', "addr", "expected an integer, got an array"),
    (b'{"op": "pf", "addr": "0xg", "err": 0}', "addr", 'expected an integer, got "0xg"'),
    (b'{"op": "pf", "addr": "0x", "err": 0}', "addr", "expected an integer"),
    (b'{"op": "pf", "addr": "1_000", "err": 0}', "addr", "expected an integer"),
    (b'{"op": "pf", "addr": " 12", "err": 0}', "addr", "expected an integer"),
    (b'{"op": "pf", "addr": "+12", "err": 0}', "addr", "expected an integer"),
    (b'{"op": "cr3", "val": -5}', "val", "0 <= val < 2**64, got -5"),
    (b'{"op": "invlpg", "addr": 18446744073709551616}', "addr", "< 2**64"),
    (b'{"op": "access", "addr": 0, "write": 2, "user": 0, "fetch": 0}', "write", "0 or 1"),
    (b'{"op": "access", "addr": 0, "write": 0, "user": "1", "fetch": 0}', "user", "0 or 1"),
    (b'{"op": "access", "addr": 0, "write": 0, "user": 0, "fetch": null}', "fetch", "0 or 1"),
    (b'{"op": "access", "addr": 0, "write": 0, "user": 0, "fetch": 0, "ac": -1}', "ac", "0 or 1"),
    (b'{"op": "access", "addr": 0, "write": 0, "user": 0}', "fetch", "missing required field"),
    (b'{"op": "dirty_log", "slot": 0, "stop": 5}', "stop", "0 or 1"),
    (b'{"op": "pf", "addr": 0, "err": 0, "vcpu": 16}', "vcpu", "0 <= vcpu <= 15, got 16"),
    (b'{"op": "pf", "addr": 0, "err": 0, "vcpu": "0x10"}', "vcpu", '0 <= vcpu <= 15, got "0x10"'),
    (b'{"op": "pf", "addr": 0, "err": 0, "vcpu": -1}', "vcpu", "0 <= vcpu <= 15"),
    (b'{"op": "write", "gpa": 0, "val": 0, "len": 3}', "len", "expected one of 1, 2, 4, 8, got 3"),
    (b'{"op": "write", "gpa": 0, "val": 0, "len": "16"}', "len", "expected one of 1, 2, 4, 8"),
    (b'{"op": "write", "gpa": 4094, "val": 0, "len": 4}', "gpa", "crosses a page boundary"),
    (b'{"op": "pte_write", "gpa": "0xff9", "val": 0, "len": 8}', "gpa", "crosses a page boundary"),
    (b'{"op": "write", "gpa": "0x10000000000000", "val": 0, "len": 8}', "gpa", "0 <= gpa < 2**52"),
    (b'{"op": "pte_write", "gpa": 4503599627370496, "val": 0, "len": 8}', "gpa", "0 <= gpa < 2**52"),
    (b'{"op": "write", "gpa": 0, "val": 256, "len": 1}', "val", "0 <= val <= 255, got 256"),
    (b'{"op": "write", "gpa": 0, "val": "0x10000", "len": 2}', "val", '0 <= val < 2**16, got "0x10000"'),
    (b'{"op": "write", "gpa": 0, "val": "0x100000000", "len": 4}', "val", "0 <= val < 2**32"),
    (b'{"op": "write", "gpa": 0, "len": 4}', "val", "missing required field"),
    (b'{"op": "host_remap", "gfn": "0x10000000000"}', "gfn", "0 <= gfn < 2**40"),
    (b'{"op": "memslot", "slot": 0, "gfn": "0x10000000000", "npages": 0}', "gfn", "0 <= gfn < 2**40"),
    (b'{"op": "memslot", "slot": 0, "gfn": "0xffffffffff", "npages": 2}', "npages", "2**40"),
    (b'{"op": "memslot", "slot": 0, "gfn": 0, "npages": 1, "backing": "rom"}', "backing", '"rom"'),
    (b'{"op": "memslot", "slot": -1, "gfn": 0, "npages": 1}', "slot", "0 <= slot < 2**64"),
    (b'{"op": "inject", "fault": "oom"}', "fault", 'expected one of "enomem", "gup_fail", "pte_race"'),
    (b'{"op": "inject", "fault": "enomem", "count": 0}', "count", "1 <= count < 2**64, got 0"),
    (b'{"op": "audit", "label": 5}', "label", "expected a string, got 5"),
    (b'{"op": "paging", "paging": "48"}', "paging", '"48"'),
    (b'{"op": "paging", "maxphyaddr": 31}', "maxphyaddr", "32 <= maxphyaddr <= 52, got 31"),
    (b'{"op": "paging", "cr3": 4096}', "cr3", "unknown field"),
    (b'{"op": "paging", "gbpages": 3}', "gbpages", "0 or 1"),
    (b'{"op": "pf", "addr": 0, "err": 0, "erro": 1}', "erro", "unknown field"),
    (b'{"op": "teardown", "X": 1}', "X", "unknown field"),
    (b'{"op": "pff", "addr": 0}', "op", 'unknown op "pff"'),
    (b'{"op": 7}', "op", "expected a string, got 7"),
    (b'{"addr": 0, "err": 0}', "op", "missing required field"),
    (b'{"kvmpfn": 1}', "op", "missing required field"),
]


@pytest.mark.parametrize(
    "line, field, words", EVENT_RULES, ids=[r[1] + "-" + str(i) for i, r in enumerate(EVENT_RULES)]
)
def test_event_rules(tmp_path, line, field, words):
    err = event_error(tmp_path, line)
    assert err.line == 2
    assert err.field == field
    assert f'field "{field}": ' in str(err)
    assert words in str(err)
    op = msgspec.json.decode(line).get("op")
    if op in ("pf", "cr3", "invlpg", "access", "dirty_log", "write", "pte_write", "host_remap", "memslot"):
        assert f'event "{op}"' in str(err)


HEADER_RULES = [
    (b'{"kvmpfn": 2}', "kvmpfn", "unsupported trace format version 2"),
    (b'{"kvmpfn": "0x2"}', "kvmpfn", "unsupported trace format version"),
    (b'{"kvmpfn": true}', "kvmpfn", "expected one of 1, got true"),
    (b'{"mmu": "shadow"}', "kvmpfn", "missing (the first line that is not blank or a comment is the header"),
    (b'{"op": "access", "addr": 0, "write": 0, "user": 0, "fetch": 0}', "kvmpfn", "this one is an event"),
    (b'{"kvmpfn": 1, "mmu": "ept"}', "mmu", '"ept"'),
    (
        b'{"kvmpfn": 1, "kernel": "linux"}',
        "kernel",
        'expected one of "page", "pfn", "pfn-io", "notifier", got "linux"',
    ),
    (b'{"kvmpfn": 1, "teardown": 2}', "teardown", "0 or 1"),
    (b'{"kvmpfn": 1, "memory": 5}', "memory", "expected a string"),
    (b'{"kvmpfn": 1, "guest": {"paging": "48"}}', "guest.paging", 'got "48"'),
    (b'{"kvmpfn": 1, "guest": {"maxphyaddr": 53}}', "guest.maxphyaddr", "32 <= maxphyaddr <= 52, got 53"),
    (b'{"kvmpfn": 1, "guest": {"maxphyaddr": "0x1f"}}', "guest.maxphyaddr", 'got "0x1f"'),
    (b'{"kvmpfn": 1, "guest": {"cr3": -1}}', "guest.cr3", "0 <= cr3 < 2**64"),
    (b'{"kvmpfn": 1, "guest": {"cr3": "0x10000000000000000"}}', "guest.cr3", "< 2**64"),
    (b'{"kvmpfn": 1, "guest": {"cr0_wp": "yes"}}', "guest.cr0_wp", "0 or 1"),
    (b'{"kvmpfn": 1, "guest": {"pagin": "64"}}', "guest.pagin", "unknown field"),
    (b'{"kvmpfn": 1, "guest": []}', "guest", "expected an object, got an array"),
    (b'{"kvmpfn": 1, "memslots": {}}', "memslots", "expected an array, got an object"),
    (
        b'{"kvmpfn": 1, "memslots": [{"slot": 0, "gfn": 0, "npages": 0, "backing": "ram"}]}',
        "memslots[0].npages",
        "1 <= npages",
    ),
    (
        b'{"kvmpfn": 1, "memslots": [{"slot": 0, "gfn": 0, "npages": 1, "backing": "rom"}]}',
        "memslots[0].backing",
        '"rom"',
    ),
    (b'{"kvmpfn": 1, "memslots": [{"slot": 0, "gfn": 0, "npages": 1}]}', "memslots[0].backing", "missing"),
    (
        b'{"kvmpfn": 1, "memslots": [{"slot": 0, "gfn": 0, "npages": 1, "backing": "ram", "size": 1}]}',
        "memslots[0].size",
        "unknown",
    ),
    (
        b'{"kvmpfn": 1, "memslots": [{"slot": 0, "gfn": "0xfffffffff0", "npages": 17, "backing": "ram"}]}',
        "memslots[0].npages",
        "2**40",
    ),
    (
        b'{"kvmpfn": 1, "memslots": [{"slot": 0, "gfn": 0, "npages": 16, "backing": "ram"}, '
        b'{"slot": 1, "gfn": 8, "npages": 16, "backing": "ram"}]}',
        "memslots[1]",
        "overlaps slot 0",
    ),
    (
        b'{"kvmpfn": 1, "memslots": [{"slot": 4, "gfn": 0, "npages": 16, "backing": "ram"}, '
        b'{"slot": 4, "gfn": 16, "npages": 16, "backing": "ram"}]}',
        "memslots[1].slot",
        "slot 4 is already memslots[0]",
    ),
    (b'{"kvmpfn": 1, "host": {"first_pfn": -1}}', "host.first_pfn", "0 <= first_pfn < 2**40"),
    (b'{"kvmpfn": 1, "host": {"first": 1}}', "host.first", "unknown field"),
    (b'{"kvmpfn": 1, "vcpu": 0}', "vcpu", "unknown field"),
]


@pytest.mark.parametrize(
    "line, field, words", HEADER_RULES, ids=[r[1] + "-" + str(i) for i, r in enumerate(HEADER_RULES)]
)
def test_header_rules(tmp_path, line, field, words):
    err = error_of(tmp_path, b"# a comment first\n" + line + b"\n")
    assert err.line == 2
    assert err.field == field
    assert f'2: header: field "{field}": ' in str(err)
    assert words in str(err)
