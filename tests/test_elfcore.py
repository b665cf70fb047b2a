"""Guest memory from ELF cores (kvmpfn/host/elfcore.py): PT_LOAD by p_paddr, zero fill, both ELF classes,
laziness, the QEMU CPU-state note, bad cores, and replay against a core versus the same memory as writes."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess

import pytest
from elfcore_helper import (
    CR0_PG_WP,
    CR4_PAE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    DESC_L,
    EM_386,
    EM_AARCH64,
    EM_X86_64,
    ET_EXEC,
    CpuState,
    Load,
    build_core,
)

from kvmpfn.host import Host
from kvmpfn.host.elfcore import (
    CACHE_PAGES,
    ElfCoreError,
    ElfCoreImage,
    guest_from_core,
    open_header_memory,
)
from kvmpfn.replay import Replayer, ReplayOptions, replay_file
from kvmpfn.trace import events as ev
from kvmpfn.trace.reader import open_trace

PAGE = 4096


def pattern(seed: int, n: int = PAGE) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n))


# -- reading memory -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("elfclass", [32, 64])
def test_pt_load_segments_are_placed_by_p_paddr_and_zero_filled(tmp_path, elfclass):
    loads = [
        Load(0x1000, pattern(1, 100), memsz=0x3000),  # 100 file bytes, then zeros to 0x4000
        Load(0x10000, pattern(2, 2 * PAGE)),
    ]
    core = build_core(tmp_path / "g.core", loads, elfclass=elfclass)
    image = ElfCoreImage(core)
    assert image.elfclass == elfclass
    assert [(s.p_paddr, s.p_memsz, s.p_filesz) for s in image.segments] == [
        (0x1000, 0x3000, 100),
        (0x10000, 0x2000, 0x2000),
    ]
    assert image.read_page(0x1) == pattern(1, 100) + bytes(PAGE - 100)
    assert image.read_page(0x2) == bytes(PAGE)  # inside p_memsz, past p_filesz
    assert image.read_page(0x3) == bytes(PAGE)
    assert image.read_page(0x10) == pattern(2, 2 * PAGE)[:PAGE]
    assert image.read_page(0x11) == pattern(2, 2 * PAGE)[PAGE:]
    for gfn in (0x0, 0x4, 0xF, 0x12, 0xFFFFF):
        assert image.read_page(gfn) is None
    image.close()


def test_p_vaddr_is_ignored(tmp_path):
    # The same p_vaddr for two segments at different p_paddr: a reader using p_vaddr would see an overlap.
    loads = [Load(0x5000, pattern(3), vaddr=0xC0000000), Load(0x9000, pattern(4), vaddr=0xC0000000)]
    image = ElfCoreImage(build_core(tmp_path / "g.core", loads))
    assert image.read_page(0x5) == pattern(3)
    assert image.read_page(0x9) == pattern(4)
    assert image.read_page(0xC0000) is None


def test_a_page_assembled_from_unaligned_segments(tmp_path):
    loads = [Load(0x2800, pattern(5, 0x800)), Load(0x3000, pattern(6, 0x100), memsz=0x400), Load(0x3C00, b"\xaa" * 8)]
    image = ElfCoreImage(build_core(tmp_path / "g.core", loads))
    assert image.read_page(0x2) == bytes(0x800) + pattern(5, 0x800)
    expected = bytearray(PAGE)
    expected[0:0x100] = pattern(6, 0x100)
    expected[0xC00:0xC08] = b"\xaa" * 8
    assert image.read_page(0x3) == bytes(expected)


def test_reads_are_lazy_and_the_cache_is_bounded(tmp_path, monkeypatch):
    # A 64 GiB segment with one file page: opening and reading cost nothing near its size.
    core = build_core(tmp_path / "big.core", [Load(0x100000000, pattern(7), memsz=64 << 30)])
    calls = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: calls.append((n, off)) or real_pread(fd, n, off))
    image = ElfCoreImage(core)
    assert calls == []
    assert image.read_page(0x100000) == pattern(7)
    assert len(calls) == 1 and calls[0][0] == PAGE
    assert image.read_page(0x100000) == pattern(7)  # from the cache
    assert len(calls) == 1
    assert image.read_page(0x100000 + (63 << 18)) == bytes(PAGE)  # far inside p_memsz: zeros, no file read
    assert len(calls) == 1
    for gfn in range(0x100001, 0x100001 + 2 * CACHE_PAGES):
        image.read_page(gfn)
    assert len(image._cache) == CACHE_PAGES


def test_host_reads_untouched_pages_from_the_image(tmp_path):
    image = ElfCoreImage(build_core(tmp_path / "g.core", [Load(0x3000, pattern(8))]))
    host = Host(memory_image=image)
    host.set_memslot(0, 0, 0x100, "ram")
    assert host.read_guest(0x3008, 8) == int.from_bytes(pattern(8)[8:16], "little")
    assert host.peek_pfn(0x3) is None  # reading never faults a page in
    hva = host.gfn_to_hva(0x3)
    pfn = host.get_user_pages(hva)
    assert bytes(host.frames[pfn].data) == pattern(8)  # faulted in with the image's contents


# -- the QEMU note --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elfclass", "machine", "cpu", "paging"),
    [
        (64, EM_X86_64, CpuState(cr0=0x11), "none"),
        (32, EM_386, CpuState(cr0=CR0_PG_WP), "32"),
        (32, EM_386, CpuState(cr0=CR0_PG_WP, cr4=CR4_PAE), "pae"),
        (64, EM_386, CpuState(cr0=CR0_PG_WP, cr4=CR4_PAE), "pae"),  # class 64 for >4 GiB, still no LMA
        (64, EM_X86_64, CpuState(cr0=CR0_PG_WP, cr4=CR4_PAE), "64"),  # QEMU writes EM_X86_64 iff LMA
        (32, EM_386, CpuState(cr0=CR0_PG_WP, cr4=CR4_PAE, cs_flags=DESC_L), "64"),  # CS.L: long mode
    ],
)
def test_cpu_state_gives_the_paging_mode(tmp_path, elfclass, machine, cpu, paging):
    core = build_core(tmp_path / "g.core", [Load(0, pattern(9))], [cpu], elfclass=elfclass, machine=machine)
    state = ElfCoreImage(core).cpu_state()
    assert state is not None
    assert state["guest"]["paging"] == paging
    assert state["cr0"] == cpu.cr0 and state["cr4"] == cpu.cr4


def test_cpu_state_registers_and_flags(tmp_path):
    cpus = [
        CpuState(cr0=CR0_PG_WP, cr2=0xDEAD000, cr3=0x1234F000, cr4=CR4_PAE | CR4_PSE | CR4_SMEP, rip=0xFFFF8100),
        CpuState(cr0=0x80000011, cr3=0x5000, cr4=CR4_PAE | CR4_SMAP),
    ]
    image = ElfCoreImage(build_core(tmp_path / "g.core", [Load(0, pattern(1))], cpus))
    assert image.ncpus == 2
    s0, s1 = image.cpu_state(0), image.cpu_state(1)
    assert (s0["cr2"], s0["cr3"], s0["rip"]) == (0xDEAD000, 0x1234F000, 0xFFFF8100)
    assert s0["guest"] == {
        "paging": "64",
        "cr3": 0x1234F000,
        "cr0_wp": True,
        "cr4_pse": True,
        "cr4_smep": True,
        "cr4_smap": False,
    }
    assert s1["guest"]["cr0_wp"] is False and s1["guest"]["cr4_smap"] is True and s1["guest"]["cr4_pse"] is False
    assert image.cpu_state(2) is None


def test_no_qemu_note_means_no_cpu_state(tmp_path):
    image = ElfCoreImage(build_core(tmp_path / "g.core", [Load(0, pattern(1))]))
    assert image.cpu_state() is None
    assert guest_from_core(ev.Guest(), image) == ev.Guest()


@pytest.mark.parametrize(
    ("cpu", "words"),
    [
        (CpuState(size=200), "size field 200"),
        (CpuState(size=4000), "size field 4000"),
        (CpuState(version=2), "version 2"),
        (CpuState(length=6), "too short"),
    ],
)
def test_a_malformed_qemu_note_fails_cpu_state_only(tmp_path, cpu, words):
    image = ElfCoreImage(build_core(tmp_path / "g.core", [Load(0, pattern(1))], [cpu]))
    assert image.read_page(0) == pattern(1)  # the memory is still usable
    with pytest.raises(ElfCoreError, match=words) as info:
        image.cpu_state()
    assert "\n" not in str(info.value)


def test_guest_from_core_only_when_the_header_is_silent(tmp_path):
    cpu = CpuState(cr0=CR0_PG_WP, cr3=0x7000, cr4=CR4_PAE)
    image = ElfCoreImage(build_core(tmp_path / "g.core", [Load(0, pattern(1))], [cpu]))
    assert guest_from_core(ev.Guest(), image) == ev.Guest(paging="64", cr3=0x7000, cr4_pse=False)
    said = ev.Guest(paging="pae", cr3=0x3000)
    assert guest_from_core(said, image) is said
    assert guest_from_core(said, None) is said


def test_open_header_memory_is_relative_to_the_trace(tmp_path):
    (tmp_path / "sub").mkdir()
    build_core(tmp_path / "sub" / "g.core", [Load(0x1000, pattern(2))])
    image = open_header_memory("g.core", str(tmp_path / "sub" / "t.jsonl"))
    assert image is not None and image.read_page(1) == pattern(2)
    assert open_header_memory(None, str(tmp_path / "t.jsonl")) is None
    with pytest.raises(ElfCoreError, match="no such file"):
        open_header_memory("g.core", str(tmp_path / "t.jsonl"))


# -- bad cores -------------------------------------------------------------------------------------------------


def _bad(tmp_path, **kw):
    loads = kw.pop("loads", [Load(0x1000, pattern(1, 2 * PAGE))])
    return build_core(tmp_path / "bad.core", loads, **kw)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: p.joinpath("bad.core").write_bytes(b"#!/bin/sh\necho hi\n") and p / "bad.core", "not an ELF"),
        (lambda p: p.joinpath("bad.core").write_bytes(b"\x7fELF\x02\x01") and p / "bad.core", "malformed ELF"),
        (lambda p: _bad(p, truncate=100), "truncated: PT_LOAD 1"),
        (
            lambda p: _bad(p, loads=[Load(0x1000, pattern(1, 2 * PAGE)), Load(0x2000, pattern(2))]),
            "overlapping PT_LOAD segments: [0x1000, 0x3000) and [0x2000, 0x3000)",
        ),
        (lambda p: _bad(p, machine=EM_AARCH64), "unsupported machine"),
        (lambda p: _bad(p, e_type=ET_EXEC), "not a core file"),
        (lambda p: _bad(p, big_endian=True), "big-endian"),
        (lambda p: p / "missing.core", "no such file"),
    ],
)
def test_bad_cores_are_one_line_value_errors(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(ValueError) as info:
        ElfCoreImage(path)
    assert isinstance(info.value, ElfCoreError)
    assert words in str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.field == "memory"


def test_p_filesz_above_p_memsz_is_refused(tmp_path):
    core = build_core(tmp_path / "g.core", [Load(0x1000, pattern(1))])
    data = bytearray(core.read_bytes())
    # The PT_LOAD is the second program header (64 + 56): p_memsz at +40.
    struct.pack_into("<Q", data, 64 + 56 + 40, 0x10)
    core.write_bytes(bytes(data))
    with pytest.raises(ElfCoreError, match="p_filesz 0x1000 > p_memsz 0x10"):
        ElfCoreImage(core)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="GNU readelf is not installed")
@pytest.mark.parametrize("elfclass", [32, 64])
def test_the_helper_writes_what_gnu_readelf_reads(tmp_path, elfclass):
    """A differential check of the test helper itself: GNU readelf sees the same segments and notes."""
    loads = [Load(0x1000, pattern(1, 100), memsz=0x3000), Load(0x10000, pattern(2))]
    core = build_core(tmp_path / "g.core", loads, [CpuState(cr0=CR0_PG_WP)], elfclass=elfclass)
    out = subprocess.run(["readelf", "-W", "-h", "-l", "-n", str(core)], capture_output=True, text=True).stdout
    assert "CORE (Core file)" in out
    assert f"ELF{elfclass}" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("LOAD")]
    assert [(int(r[3], 16), int(r[4], 16), int(r[5], 16)) for r in rows] == [
        (0x1000, 100, 0x3000),
        (0x10000, PAGE, PAGE),
    ]
    assert "QEMU" in out and "0x000001b0" in out  # the QEMU note: 432 bytes of QEMUCPUState
    image = ElfCoreImage(core)
    assert [(s.p_paddr, s.p_filesz, s.p_memsz) for s in image.segments] == [
        (int(r[3], 16), int(r[4], 16), int(r[5], 16)) for r in rows
    ]


# -- replay against a core ---------------------------------------------------------------------------------------
#
# The same guest, once with its page tables in an ELF core (header "memory") and once with them stored by
# `write` events, must give the same outcome records for the same accesses, up to the host frame numbers
# (the writes fault the table pages in first, so frames are handed out in another order).

P, W, U, PS = 1, 2, 4, 0x80


def _tables(paging: str) -> tuple[int, dict[int, bytes]]:
    """Guest page tables (gpa of each table page -> bytes) mapping gva 0x200000+i*4K -> gpa 0x30000+i*4K
    (i < 4) and a large page at gva 0x400000 (2 MiB -> gpa 0x600000; 4 MiB -> gpa 0x800000); cr3."""
    pages: dict[int, bytearray] = {}
    if paging == "64":
        cr3, pdpt, pd, pt = 0x10000, 0x11000, 0x12000, 0x13000
        for gpa in (cr3, pdpt, pd, pt):
            pages[gpa] = bytearray(PAGE)
        struct.pack_into("<Q", pages[cr3], 0, pdpt | P | W | U)
        struct.pack_into("<Q", pages[pdpt], 0, pd | P | W | U)
        struct.pack_into("<Q", pages[pd], 8, pt | P | W | U)  # gva 0x200000
        struct.pack_into("<Q", pages[pd], 16, 0x600000 | P | W | U | PS)  # gva 0x400000, 2 MiB
        for i in range(4):
            struct.pack_into("<Q", pages[pt], 8 * i, (0x30000 + i * PAGE) | P | W | U)
    else:
        cr3, pt = 0x10000, 0x13000
        for gpa in (cr3, pt):
            pages[gpa] = bytearray(PAGE)
        struct.pack_into("<I", pages[cr3], 0, pt | P | W | U)  # gva 0..4 MiB
        struct.pack_into("<I", pages[cr3], 4, 0x800000 | P | W | U | PS)  # gva 0x400000, 4 MiB (PSE)
        for i in range(4):
            struct.pack_into("<I", pages[pt], 4 * (0x200 + i), (0x30000 + i * PAGE) | P | W | U)
    return cr3, {gpa: bytes(data) for gpa, data in pages.items()}


def _events(paging: str) -> list[dict]:
    pte_len = 8 if paging == "64" else 4
    pte0 = 0x13000 if paging == "64" else 0x13000 + 4 * 0x200
    return [
        {"op": "access", "addr": 0x200000, "write": 1, "user": 1, "fetch": 0},
        {"op": "access", "addr": 0x201008, "write": 0, "user": 1, "fetch": 0},
        {"op": "access", "addr": 0x200010, "write": 0, "user": 0, "fetch": 0},
        {"op": "pf", "addr": 0x202000, "err": 6},
        {"op": "access", "addr": 0x400123, "write": 0, "user": 0, "fetch": 0},
        {"op": "access", "addr": 0x205000, "write": 0, "user": 0, "fetch": 0},  # not present: guest fault
        # the guest rewrites the first pte (shadowed now): emulated, the spte follows
        {"op": "write", "gpa": pte0, "val": (0x31000 | P | U), "len": pte_len},
        {"op": "access", "addr": 0x200000, "write": 1, "user": 1, "fetch": 0},
        {"op": "access", "addr": 0x200000, "write": 0, "user": 1, "fetch": 0},
        {"op": "audit"},
    ]


def _write_events(pages: dict[int, bytes]) -> list[dict]:
    out = []
    for gpa, data in sorted(pages.items()):
        for off in range(0, PAGE, 8):
            val = int.from_bytes(data[off : off + 8], "little")
            if val:
                out.append({"op": "write", "gpa": gpa + off, "val": val, "len": 8})
    return out


def _write_trace(path, header: dict, events: list[dict]) -> str:
    with open(path, "w") as fh:
        for obj in (header, *events):
            fh.write(json.dumps(obj) + "\n")
    return str(path)


def _guest_pair(tmp_path, paging: str, elfclass: int) -> tuple[str, str, int]:
    """Trace A (memory in a core whose QEMU note gives the guest state) and trace B (memory as writes)."""
    cr3, pages = _tables(paging)
    # The page tables in one PT_LOAD with a zero-filled tail, the guest's data pages in another.
    first = min(pages)
    blob = b"".join(pages.get(gpa, bytes(PAGE)) for gpa in range(first, max(pages) + PAGE, PAGE))
    loads = [Load(first, blob, memsz=len(blob) + 4 * PAGE), Load(0x30000, pattern(3, 4 * PAGE))]
    cr4 = CR4_PAE if paging == "64" else CR4_PSE
    cpu = CpuState(cr0=CR0_PG_WP, cr3=cr3, cr4=cr4)
    build_core(tmp_path / "guest.core", loads, [cpu], elfclass=elfclass)
    slots = [{"slot": 0, "gfn": 0, "npages": 0x1000, "backing": "ram"}]
    header_a = {"kvmpfn": 1, "mmu": "shadow", "memslots": slots, "memory": "guest.core"}
    guest = {"paging": paging, "cr3": cr3, "cr4_pse": paging == "32"}
    header_b = {"kvmpfn": 1, "mmu": "shadow", "memslots": slots, "guest": guest}
    data_writes = _write_events({0x30000 + i * PAGE: pattern(3, 4 * PAGE)[i * PAGE : (i + 1) * PAGE] for i in range(4)})
    setup = _write_events(pages) + data_writes
    a = _write_trace(tmp_path / "a.jsonl", header_a, _events(paging))
    b = _write_trace(tmp_path / "b.jsonl", header_b, setup + _events(paging))
    return a, b, len(setup)


def _replay_with_core(path: str) -> tuple[list[dict], list[dict]]:
    """A small harness doing what the replay does once the header's ``memory`` is wired: the core's image
    behind the Host, the core's CPU state when the header has no guest."""
    records = []
    with open_trace(path) as reader:
        header = reader.header
        image = open_header_memory(header.memory, path)
        header.guest = guest_from_core(header.guest, image)
        rp = Replayer(header, ReplayOptions())
        rp.host.memory_image = image
        for seq, (line, e) in enumerate(reader):
            records.append(rp.apply(seq, line, e))
        rp.do_teardown()
    return records, rp.findings.items


def _replay_plain(path: str) -> tuple[list[dict], list[dict]]:
    out = io.StringIO()
    result = replay_file(path, ReplayOptions(), out)
    assert result.error is None, result.error
    return [json.loads(line) for line in out.getvalue().splitlines()], result.findings


def _assert_same_up_to_frames(recs_a: list[dict], recs_b: list[dict]) -> None:
    frame_mask = ((1 << 52) - 1) & ~0xFFF
    a_to_b: dict[int, int] = {}
    assert len(recs_a) == len(recs_b)
    for ra, rb in zip(recs_a, recs_b, strict=True):
        ra = {k: v for k, v in ra.items() if k not in ("seq", "line")}
        rb = {k: v for k, v in rb.items() if k not in ("seq", "line")}
        if "pfn" in ra:
            pa, pb = int(ra.pop("pfn"), 16), int(rb.pop("pfn"), 16)
            assert a_to_b.setdefault(pa, pb) == pb, "frames are not renamed consistently"
            sa, sb = int(ra.pop("spte"), 16), int(rb.pop("spte"), 16)
            assert sa & ~frame_mask == sb & ~frame_mask
            assert (sa & frame_mask) >> 12 == pa and (sb & frame_mask) >> 12 == pb
        assert ra == rb
    assert len(set(a_to_b.values())) == len(a_to_b)


@pytest.mark.parametrize(("paging", "elfclass"), [("64", 64), ("32", 32)])
def test_replay_against_a_core_equals_replay_with_the_memory_written(tmp_path, paging, elfclass):
    a, b, nsetup = _guest_pair(tmp_path, paging, elfclass)
    recs_a, findings_a = _replay_with_core(a)
    recs_b, findings_b = _replay_plain(b)
    assert all(r["result"] == "ok" for r in recs_b[:nsetup])
    _assert_same_up_to_frames(recs_a, recs_b[nsetup:])
    results = [r["result"] for r in recs_a]
    # The core's page tables were used: the accesses map, the absent pte faults, the pte rewrite is emulated.
    assert results[:6] == ["mapped", "mapped", "hit", "mapped", "mapped", "guest_fault"]
    assert results[6] == "emulated"
    assert recs_a[0]["set_accessed"] != []
    assert findings_a == [] and findings_b == []


def test_replay_file_uses_the_header_memory(tmp_path):
    """A replay reads guest memory from the core the header names (``open_header_memory``) and takes the
    guest's paging state from its CPU note (``guest_from_core``)."""
    a, b, nsetup = _guest_pair(tmp_path, "64", 64)
    recs_a, findings_a = _replay_plain(a)
    recs_b, findings_b = _replay_plain(b)
    _assert_same_up_to_frames(recs_a, recs_b[nsetup:])
    assert findings_a == findings_b == []
    bad = _write_trace(tmp_path / "bad.jsonl", {"kvmpfn": 1, "memory": "a.jsonl"}, [])
    error = replay_file(bad).error
    assert error is not None and "bad.jsonl:1" in error and "not an ELF file" in error
