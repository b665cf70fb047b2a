"""Guest-physical memory from an ELF core, as QEMU's ``dump-guest-memory`` writes it (docs/trace-format.md, The header).

>>> image = ElfCoreImage("guest.core")                 # doctest: +SKIP
>>> len(image.read_page(0x1f))                         # gpa 0x1f000: file bytes, zero-filled
4096
>>> image.read_page(0x7fffffff) is None                # outside every PT_LOAD
True
>>> image.cpu_state()["guest"]                         # from the QEMU note of the first CPU
{'paging': '64', 'cr3': 4096, 'cr0_wp': True, 'cr4_pse': True, 'cr4_smep': False, 'cr4_smap': False}

The layout is the ELF specification's (read with pyelftools): every ``PT_LOAD`` segment places ``p_filesz``
bytes from ``p_offset`` at guest-physical ``p_paddr`` (never ``p_vaddr``: QEMU puts the guest-virtual address
there, or 0), and zeros up to ``p_memsz``. ELFCLASS32 and ELFCLASS64, little-endian, ``EM_386`` or
``EM_X86_64``, ``ET_CORE``.

Lazy: opening reads the ELF and program headers only; a sorted index of segments by ``p_paddr`` answers
``read_page`` with ``bisect`` and one ``pread`` of at most 4 KiB per segment the page touches. A small LRU
keeps the last ``CACHE_PAGES`` pages (the walker rereads guest page tables that the host has not faulted in),
so a multi-GiB core costs a file handle and a few hundred KiB.

**The QEMU note.** ``dump-guest-memory`` writes, per CPU, a note named ``"QEMU"`` (type 0) whose descriptor
is QEMU's ``QEMUCPUState`` (target/i386/arch_dump.c): ``u32 version`` (1), ``u32 size`` (the structure's size,
432), 16 general registers, ``rip``, ``rflags`` (u64 each), ten segments (``cs ds es fs gs ss ldt tr gdt
idt``, each ``u32 selector, limit, flags, pad; u64 base``: 24 bytes), then ``u64 cr[5]``. So ``cr0`` is at
byte 392, ``cr3`` at 416, ``cr4`` at 424, and ``cs.flags`` at 160.

**Paging mode from the note** (``cpu_state()["guest"]["paging"]``). The note has no EFER, so EFER.LMA is
inferred:

- CR0.PG (bit 31) clear: ``"none"``;
- CR0.PG set, CR4.PAE (bit 5) clear: ``"32"``;
- CR0.PG and CR4.PAE set: ``"64"`` if long mode is active, else ``"pae"``. Long mode is taken as active when
  the core's ``e_machine`` is ``EM_X86_64`` — QEMU chooses ``EM_X86_64`` exactly when the first CPU has
  EFER.LMA (``cpu_get_dump_info``) — or when the CPU's CS descriptor has L (bit 21 of ``cs.flags``: only a
  64-bit code segment has it, and only in long mode). An ``EM_386`` core whose CS lacks L is ``"pae"``.

CR0.WP (bit 16), CR4.PSE (bit 4), CR4.SMEP (bit 20) and CR4.SMAP (bit 21) give the header's ``cr0_wp``,
``cr4_pse``, ``cr4_smep`` and ``cr4_smap``; ``efer_nx`` is not in the note and is left to the header's default.

Errors. A bad core raises :class:`ElfCoreError` (a ``ValueError`` through :class:`HostError`, field
``memory``) with a one-line message: not an ELF file, not a core, big-endian, an unsupported machine, a
``PT_LOAD`` whose file bytes lie beyond the end of the file (truncated) or with ``p_filesz > p_memsz``,
overlapping segments. A QEMU note that is too short, has a ``size`` field smaller than ``QEMUCPUState`` or
larger than the note, or a version other than 1 is an error of :meth:`cpu_state` only: the memory stays
usable.
"""

from __future__ import annotations

import bisect
import os
import stat
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.notes import iter_notes

from kvmpfn.host.errors import HostError
from kvmpfn.x86 import PAGE_SHIFT, PAGE_SIZE

__all__ = [
    "CACHE_PAGES",
    "QEMU_CPUSTATE_SIZE",
    "ElfCoreError",
    "ElfCoreImage",
    "LoadSegment",
    "guest_from_core",
    "open_header_memory",
]

#: Pages kept by the read cache of one image.
CACHE_PAGES = 256
#: ``sizeof(QEMUCPUState)`` of version 1.
QEMU_CPUSTATE_SIZE = 432
QEMU_CPUSTATE_VERSION = 1

# Byte offsets in QEMUCPUState (version 1).
_OFF_RIP = 8 + 16 * 8
_OFF_RFLAGS = _OFF_RIP + 8
_OFF_SEGMENTS = _OFF_RFLAGS + 8  # cs first; each segment: selector, limit, flags, pad (u32), base (u64)
_OFF_CS_FLAGS = _OFF_SEGMENTS + 8
_OFF_CR = _OFF_SEGMENTS + 10 * 24  # cr[0..4]

CR0_PG = 1 << 31
CR0_WP = 1 << 16
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
DESC_L = 1 << 21  # QEMU's segment flags keep the descriptor's high word: L is bit 21

_MACHINES = ("EM_386", "EM_X86_64")


class ElfCoreError(HostError):
    """A guest memory core kvmpfn cannot use; ``str()`` is one line naming the file."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__("memory", f"{path}: {message}")
        self.path = path


@dataclass(frozen=True, slots=True)
class LoadSegment:
    """One ``PT_LOAD``: guest-physical ``[p_paddr, p_paddr + p_memsz)``, file bytes for the first ``p_filesz``."""

    p_paddr: int
    p_memsz: int
    p_filesz: int
    p_offset: int

    @property
    def end(self) -> int:
        return self.p_paddr + self.p_memsz


class ElfCoreImage:
    """Initial guest memory from an ELF core: ``read_page(gfn)`` (the ``MemoryImage`` protocol of
    :class:`kvmpfn.host.memory.Host`) and the QEMU CPU state.

    :param path: the core file
    :raises ElfCoreError: the file is not a usable core (see the module docstring)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; only a regular file is read
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
            raise ElfCoreError(self.path, (getattr(err, "strerror", None) or str(err)).lower()) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ElfCoreError(self.path, "not a regular file")
        self._fh = os.fdopen(fd, "rb")  # kept open for lazy reads; close() closes it
        try:
            self._load_headers()
        except BaseException:
            self._fh.close()
            raise

    # -- opening --------------------------------------------------------------------------------------
    def _fail(self, message: str) -> ElfCoreError:
        return ElfCoreError(self.path, message)

    def _load_headers(self) -> None:
        size = os.fstat(self._fh.fileno()).st_size
        try:
            magic = self._fh.read(4)
        except OSError as err:  # e.g. /proc/self/mem: EIO
            raise self._fail((err.strerror or str(err)).lower()) from None
        if magic != b"\x7fELF":
            raise self._fail("not an ELF file")
        self._fh.seek(0)
        try:
            elf = ELFFile(self._fh)
            header = elf.header
            self.elfclass: int = elf.elfclass
            if not elf.little_endian:
                raise self._fail("big-endian ELF: guest memory cores are little-endian x86")
            if header["e_type"] != "ET_CORE":
                raise self._fail(f"not a core file (e_type {header['e_type']})")
            self.e_machine: str | int = header["e_machine"]
            if self.e_machine not in _MACHINES:
                raise self._fail(f"unsupported machine {self.e_machine} (x86 cores only: EM_386, EM_X86_64)")
            segments: list[LoadSegment] = []
            notes: list[tuple[int, int]] = []
            for i, seg in enumerate(elf.iter_segments()):
                p_type = seg["p_type"]
                if p_type == "PT_NOTE":
                    notes.append((seg["p_offset"], seg["p_filesz"]))
                if p_type != "PT_LOAD":
                    continue
                load = LoadSegment(seg["p_paddr"], seg["p_memsz"], seg["p_filesz"], seg["p_offset"])
                if load.p_filesz > load.p_memsz:
                    raise self._fail(f"PT_LOAD {i}: p_filesz {load.p_filesz:#x} > p_memsz {load.p_memsz:#x}")
                if load.p_offset + load.p_filesz > size:
                    raise self._fail(
                        f"truncated: PT_LOAD {i} (p_paddr {load.p_paddr:#x}) needs file bytes up to "
                        f"{load.p_offset + load.p_filesz:#x}, the file has {size:#x}"
                    )
                if load.p_memsz:
                    segments.append(load)
            self._qemu_notes = self._find_qemu_notes(elf, notes)
        except ElfCoreError:
            raise
        except (ELFError, struct.error, ValueError, OSError, EOFError) as err:
            raise self._fail(f"malformed ELF: {err}") from None
        except Exception as err:  # construct/pyelftools raise assorted errors on junk
            raise self._fail(f"malformed ELF: {type(err).__name__}: {err}") from None
        segments.sort(key=lambda s: s.p_paddr)
        for a, b in zip(segments, segments[1:], strict=False):
            if b.p_paddr < a.end:
                hint = " (all at p_paddr 0: a process core, not guest memory?)" if a.p_paddr == b.p_paddr == 0 else ""
                raise self._fail(
                    f"overlapping PT_LOAD segments: [{a.p_paddr:#x}, {a.end:#x}) and [{b.p_paddr:#x}, {b.end:#x})"
                    + hint
                )
        self.segments: tuple[LoadSegment, ...] = tuple(segments)
        self._starts = [s.p_paddr for s in segments]

    def _find_qemu_notes(self, elf: ELFFile, notes: list[tuple[int, int]]) -> list[bytes]:
        found = []
        for offset, filesz in notes:
            for note in iter_notes(elf, offset, filesz):
                if note["n_name"] == "QEMU":
                    found.append(bytes(note["n_descdata"]))
        return found

    # -- the MemoryImage protocol ---------------------------------------------------------------------
    def read_page(self, gfn: int) -> bytes | None:
        """The 4 KiB at guest frame ``gfn``: file bytes, zeros past ``p_filesz``; None outside every segment."""
        cached = self._cache.get(gfn)
        if cached is not None:
            self._cache.move_to_end(gfn)
            return cached
        start = gfn << PAGE_SHIFT
        end = start + PAGE_SIZE
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or self.segments[i].end <= start:
            i += 1
        page: bytearray | None = None
        while i < len(self.segments) and self.segments[i].p_paddr < end:
            seg = self.segments[i]
            lo, hi = max(start, seg.p_paddr), min(end, seg.end)
            if lo < hi:
                if page is None:
                    page = bytearray(PAGE_SIZE)
                file_hi = min(hi, seg.p_paddr + seg.p_filesz)
                if lo < file_hi:
                    data = os.pread(self._fh.fileno(), file_hi - lo, seg.p_offset + (lo - seg.p_paddr))
                    page[lo - start : lo - start + len(data)] = data
            i += 1
        if page is None:
            return None
        out = bytes(page)
        self._cache[gfn] = out
        if len(self._cache) > CACHE_PAGES:
            self._cache.popitem(last=False)
        return out

    # -- CPU state ------------------------------------------------------------------------------------
    @property
    def ncpus(self) -> int:
        """The number of QEMU CPU-state notes."""
        return len(self._qemu_notes)

    def cpu_state(self, cpu: int = 0) -> dict[str, Any] | None:
        """The registers of CPU ``cpu`` from its QEMU note, and the guest paging state they give; None when
        the core has no such note (cores not written by QEMU).

        Keys: ``cr0``, ``cr2``, ``cr3``, ``cr4``, ``rip``, ``rflags``, ``cs_flags`` (ints) and ``guest``: the
        header's ``guest`` fields (``paging``, ``cr3``, ``cr0_wp``, ``cr4_pse``, ``cr4_smep``, ``cr4_smap``).

        :raises ElfCoreError: the note is malformed (short, a bad ``size`` field, an unknown version)
        """
        if not 0 <= cpu < len(self._qemu_notes):
            return None
        desc = self._qemu_notes[cpu]
        if len(desc) < 8:
            raise self._fail(f"QEMU note of CPU {cpu}: {len(desc)} bytes, too short for version and size")
        version, size = struct.unpack_from("<II", desc, 0)
        if version != QEMU_CPUSTATE_VERSION:
            raise self._fail(f"QEMU note of CPU {cpu}: QEMUCPUState version {version} (kvmpfn reads version 1)")
        if size < QEMU_CPUSTATE_SIZE or size > len(desc):
            raise self._fail(
                f"QEMU note of CPU {cpu}: size field {size} (QEMUCPUState is {QEMU_CPUSTATE_SIZE} bytes, "
                f"the note holds {len(desc)})"
            )
        rip, rflags = struct.unpack_from("<QQ", desc, _OFF_RIP)
        (cs_flags,) = struct.unpack_from("<I", desc, _OFF_CS_FLAGS)
        cr0, _cr1, cr2, cr3, cr4 = struct.unpack_from("<5Q", desc, _OFF_CR)
        long_mode = self.e_machine == "EM_X86_64" or bool(cs_flags & DESC_L)
        if not cr0 & CR0_PG:
            paging = "none"
        elif not cr4 & CR4_PAE:
            paging = "32"
        else:
            paging = "64" if long_mode else "pae"
        guest = {
            "paging": paging,
            "cr3": cr3,
            "cr0_wp": bool(cr0 & CR0_WP),
            "cr4_pse": bool(cr4 & CR4_PSE),
            "cr4_smep": bool(cr4 & CR4_SMEP),
            "cr4_smap": bool(cr4 & CR4_SMAP),
        }
        return {
            "cr0": cr0,
            "cr2": cr2,
            "cr3": cr3,
            "cr4": cr4,
            "rip": rip,
            "rflags": rflags,
            "cs_flags": cs_flags,
            "guest": guest,
        }

    # -- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the file; ``read_page`` must not be called afterwards."""
        self._fh.close()
        self._cache.clear()

    def __enter__(self) -> ElfCoreImage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()

    def __repr__(self) -> str:
        return f"ElfCoreImage({self.path!r}, ELFCLASS{self.elfclass}, {len(self.segments)} PT_LOAD)"


def open_header_memory(memory: str | None, trace_path: str) -> ElfCoreImage | None:
    """The image named by a trace header's ``memory`` field, relative to the trace's directory (to the
    current directory for ``-``, standard input); None when the header names none.

    :raises ElfCoreError: the core is missing or unusable
    """
    if memory is None:
        return None
    base = "" if trace_path in ("-", "<stdin>") else os.path.dirname(trace_path)
    return ElfCoreImage(os.path.join(base, memory))


def guest_from_core(guest: Any, image: ElfCoreImage | None) -> Any:
    """The header's ``guest`` (a ``kvmpfn.trace.events.Guest``), replaced by the core's CPU state when the
    header leaves every guest field at its default and the core has a QEMU note.

    "The header does not say" is judged by value: a header that spells out the defaults is taken as silent.

    :raises ElfCoreError: the QEMU note is malformed
    """
    if image is None or guest != type(guest)():
        return guest
    state = image.cpu_state()
    if state is None:
        return guest
    return type(guest)(**state["guest"])
