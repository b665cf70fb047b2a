"""Build small ELF cores for tests, byte by byte with ``struct`` (no pyelftools: the reader is what is tested).

A core is laid out as QEMU's ``dump-guest-memory`` lays it out: the ELF header, the program headers (one
``PT_NOTE``, then the ``PT_LOAD`` segments), the notes (a ``CORE``/``NT_PRSTATUS`` placeholder and a ``QEMU``
note per CPU), then the segments' file bytes. ELFCLASS32 and ELFCLASS64; ``p_paddr`` is the guest-physical
address and ``p_vaddr`` is set to something else on purpose (a reader must not use it).

>>> build_core(path, [Load(0x0, b"\\x01" * 4096, memsz=0x3000)], cpus=[CpuState(cr0=0x80010011, cr3=0x1000)])
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

ET_CORE, ET_EXEC = 4, 2
EM_386, EM_X86_64, EM_AARCH64 = 3, 62, 183
PT_LOAD, PT_NOTE = 1, 4
NT_PRSTATUS = 1
QEMUCPUSTATE_SIZE = 432

#: CR0 of a guest with paging on (PG, WP, ET, PE) and the CR4 bits the tests use.
CR0_PG_WP = 0x80010011
CR4_PAE, CR4_PSE, CR4_SMEP, CR4_SMAP = 1 << 5, 1 << 4, 1 << 20, 1 << 21
DESC_L = 1 << 21


@dataclass
class Load:
    """A PT_LOAD: ``data`` (the ``p_filesz`` bytes) at guest-physical ``paddr``; ``memsz`` defaults to
    ``len(data)`` (larger: zero-filled). ``vaddr`` defaults to a value unrelated to ``paddr``."""

    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int | None = None


@dataclass
class CpuState:
    """The registers a QEMU note carries that kvmpfn reads; ``size``/``version`` override the header words,
    ``length`` truncates or pads the descriptor."""

    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    rip: int = 0xFFF0
    cs_flags: int = 0
    version: int = 1
    size: int | None = None
    length: int | None = None
    regs: list[int] = field(default_factory=lambda: list(range(16)))


def qemu_cpu_state(cpu: CpuState) -> bytes:
    """A ``QEMUCPUState`` descriptor (version 1 layout, 432 bytes) for ``cpu``."""
    out = struct.pack("<II", cpu.version, QEMUCPUSTATE_SIZE if cpu.size is None else cpu.size)
    out += struct.pack("<16Q", *cpu.regs)
    out += struct.pack("<QQ", cpu.rip, 0x2)
    for i in range(10):  # cs ds es fs gs ss ldt tr gdt idt
        flags = cpu.cs_flags if i == 0 else 0
        out += struct.pack("<IIIIQ", 0x10 + i, 0xFFFFFFFF, flags, 0, 0)
    out += struct.pack("<5Q", cpu.cr0, 0, cpu.cr2, cpu.cr3, cpu.cr4)
    assert len(out) == QEMUCPUSTATE_SIZE
    if cpu.length is not None:
        out = out[: cpu.length].ljust(cpu.length, b"\0")
    return out


def _note(name: bytes, n_type: int, desc: bytes) -> bytes:
    namez = name + b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(namez), len(desc), n_type) + pad(namez) + pad(desc)


def build_core(
    path: str | Path,
    loads: list[Load],
    cpus: list[CpuState] | None = None,
    *,
    elfclass: int = 64,
    machine: int | None = None,
    e_type: int = ET_CORE,
    truncate: int = 0,
    big_endian: bool = False,
) -> Path:
    """Write an ELF core to ``path`` and return it.

    :param elfclass: 32 or 64
    :param machine: ``e_machine`` (default EM_X86_64 for class 64, EM_386 for class 32)
    :param truncate: drop this many bytes from the end of the file
    :param big_endian: set EI_DATA to ELFDATA2MSB (the rest stays little-endian: only the flag is tested)
    """
    path = Path(path)
    if machine is None:
        machine = EM_X86_64 if elfclass == 64 else EM_386
    notes = _note(b"CORE", NT_PRSTATUS, bytes(32))
    for cpu in cpus or []:
        notes += _note(b"QEMU", 0, qemu_cpu_state(cpu))
    if elfclass == 64:
        ehsize, phentsize = 64, 56
    else:
        ehsize, phentsize = 52, 32
    phnum = 1 + len(loads)
    notes_off = ehsize + phnum * phentsize
    data_off = (notes_off + len(notes) + 0xFFF) & ~0xFFF
    phdrs = []
    blobs = []
    offset = data_off
    phdrs.append((PT_NOTE, notes_off, 0, 0, len(notes), 0, 0, 0))
    for load in loads:
        memsz = len(load.data) if load.memsz is None else load.memsz
        vaddr = load.vaddr if load.vaddr is not None else 0xFFFF8000_0000_0000 + load.paddr * 3 + 0x123000
        if elfclass == 32:
            vaddr &= 0xFFFFFFFF
        phdrs.append((PT_LOAD, offset, vaddr, load.paddr, len(load.data), memsz, 0x7, 0))
        blobs.append(load.data)
        offset += len(load.data)
    ident = b"\x7fELF" + bytes([2 if elfclass == 64 else 1, 2 if big_endian else 1, 1]) + bytes(9)
    if elfclass == 64:
        header = ident + struct.pack(
            "<HHIQQQIHHHHHH", e_type, machine, 1, 0, ehsize, 0, 0, ehsize, phentsize, phnum, 0, 0, 0
        )
        table = b"".join(
            struct.pack("<IIQQQQQQ", t, flags, off, va, pa, filesz, memsz, align)
            for t, off, va, pa, filesz, memsz, flags, align in phdrs
        )
    else:
        header = ident + struct.pack(
            "<HHIIIIIHHHHHH", e_type, machine, 1, 0, ehsize, 0, 0, ehsize, phentsize, phnum, 0, 0, 0
        )
        table = b"".join(
            struct.pack("<IIIIIIII", t, off, va, pa, filesz, memsz, flags, align)
            for t, off, va, pa, filesz, memsz, flags, align in phdrs
        )
    image = header + table + notes
    image = image.ljust(data_off, b"\0") + b"".join(blobs)
    if truncate:
        image = image[:-truncate]
    path.write_bytes(image)
    return path
