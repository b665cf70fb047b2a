"""Typed trace records of trace format version 1 (docs/trace-format.md): the header and the 13 events.

msgspec Structs; `Event` is a tagged union on ``"op"``. Field names are the format's names.

After decoding (``kvmpfn.trace.reader``), every integer field is a Python ``int``, and every 0/1 flag
(``write``, ``user``, ``fetch``, ``ac``, ``stop``) and boolean guest field is a Python ``bool``. Integer
fields are annotated ``int`` with the format's bounds as msgspec constraints; the reader turns hex and decimal
strings into ints before validation. Flags are annotated ``bool | Literal[0, 1]`` so both spellings decode
on the fast path; ``__post_init__`` turns 0/1 into ``False``/``True``.

Building a Struct in Python runs ``__post_init__`` (range and cross-field checks, flag normalisation, raising
:class:`FieldError`) but, as always with msgspec, no type checks: ``TraceWriter`` validates what it writes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from kvmpfn import vocab
from kvmpfn.errors import InputError

__all__ = [
    "Access",
    "Audit",
    "Backing",
    "Cr3",
    "DirtyLog",
    "Event",
    "EVENT_TYPES",
    "FaultKind",
    "FieldError",
    "Guest",
    "Header",
    "HostConfig",
    "HostRemap",
    "Inject",
    "Invlpg",
    "KernelName",
    "Memslot",
    "MemslotEvent",
    "MmuKind",
    "Paging",
    "PagingMode",
    "Pf",
    "PteWrite",
    "Teardown",
    "Write",
]

U64_LIMIT = 1 << 64
GPA_LIMIT = 1 << 52
GFN_LIMIT = 1 << 40

PagingMode = vocab.PagingMode
Backing = vocab.Backing
MmuKind = vocab.Mmu
KernelName = vocab.Kernel
TdpFlavour = vocab.TdpFlavour
FaultKind = vocab.FaultKind

# Integer fields. msgspec cannot express an upper bound of 2**64, so __post_init__ checks it.
U64 = Annotated[int, Meta(ge=0)]
Gpa = Annotated[int, Meta(ge=0, lt=GPA_LIMIT)]
Gfn = Annotated[int, Meta(ge=0, lt=GFN_LIMIT)]
Npages = Annotated[int, Meta(ge=0, le=GFN_LIMIT)]
Vcpu = Annotated[int, Meta(ge=0, lt=16)]
MaxPhyAddr = Annotated[int, Meta(ge=32, le=52)]
Count = Annotated[int, Meta(ge=1)]
Len = Literal[1, 2, 4, 8]
# A 0/1 flag or boolean field: JSON 0/1 or false/true; a bool once __post_init__ has run.
Flag = bool | Literal[0, 1]


class FieldError(InputError):
    """A field breaks a rule of the format; raised by ``__post_init__``.

    ``field`` is the field's name relative to the Struct that raised it. ``expected`` is set for range errors
    (the reader then appends the value as written in the trace); otherwise ``message`` says it all.
    """

    def __init__(self, field: str, message: str, expected: str | None = None) -> None:
        Exception.__init__(self, f'field "{field}": {message}')
        self.field = field
        self.message = message
        self.expected = expected


def _bound_text(value: int) -> str:
    """``value`` as ``2**k`` when it is a large power of two, else in decimal."""
    bits = value.bit_length() - 1
    return f"2**{bits}" if value > 0 and value == 1 << bits and bits >= 16 else str(value)


def range_text(field: str, lo: int, limit: int) -> str:
    """The bounds ``lo <= field < limit`` as an error message puts them, e.g. ``0 <= vcpu <= 15``."""
    if (limit - 1).bit_length() - 1 >= 16 and limit - 1 == 1 << ((limit - 1).bit_length() - 1):
        return f"{lo} <= {field} <= {_bound_text(limit - 1)}"
    if limit == 1 << (limit.bit_length() - 1) and limit >= 1 << 16:
        return f"{lo} <= {field} < {_bound_text(limit)}"
    return f"{lo} <= {field} <= {limit - 1}"


def _range_error(field: str, value: object, lo: int, limit: int) -> FieldError:
    """The error for ``value`` outside ``lo <= value < limit``."""
    expected = range_text(field, lo, limit)
    return FieldError(field, f"expected {expected}, got {value!r}", expected)


def _check_u64(field: str, value: int) -> None:
    if not 0 <= value < U64_LIMIT:
        raise _range_error(field, value, 0, U64_LIMIT)


def _flag(field: str, value: object) -> bool:
    """A 0/1 flag or boolean field as a bool."""
    if value is True or value is False:
        return value
    if type(value) is int and value in (0, 1):
        return value == 1
    raise FieldError(field, f"expected 0 or 1 (or false/true), got {value!r}", "0 or 1 (or false/true)")


def _check_gpa_write(self: Write | PteWrite) -> None:
    """Shared checks of ``write`` and ``pte_write``: range, page crossing, ``val`` width."""
    gpa, size, val = self.gpa, self.len, self.val
    if not 0 <= gpa < GPA_LIMIT:
        raise _range_error("gpa", gpa, 0, GPA_LIMIT)
    if (gpa & 0xFFF) + size > 0x1000:
        raise FieldError("gpa", f"a {size}-byte write at {gpa:#x} crosses a page boundary")
    if not 0 <= val < 1 << (8 * size):
        raise _range_error("val", val, 0, 1 << (8 * size))


class Guest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The guest CPU state of the header (``guest``)."""

    paging: PagingMode = "64"
    cr3: U64 = 0
    cr0_wp: Flag = True
    efer_nx: Flag = True
    cr4_pse: Flag = True
    cr4_smep: Flag = False
    cr4_smap: Flag = False
    maxphyaddr: MaxPhyAddr = 40
    gbpages: Flag = False

    def __post_init__(self) -> None:
        _check_u64("cr3", self.cr3)
        if not 32 <= self.maxphyaddr <= 52:
            raise _range_error("maxphyaddr", self.maxphyaddr, 32, 53)
        if self.cr0_wp.__class__ is not bool:
            self.cr0_wp = _flag("cr0_wp", self.cr0_wp)
        if self.efer_nx.__class__ is not bool:
            self.efer_nx = _flag("efer_nx", self.efer_nx)
        if self.cr4_pse.__class__ is not bool:
            self.cr4_pse = _flag("cr4_pse", self.cr4_pse)
        if self.cr4_smep.__class__ is not bool:
            self.cr4_smep = _flag("cr4_smep", self.cr4_smep)
        if self.cr4_smap.__class__ is not bool:
            self.cr4_smap = _flag("cr4_smap", self.cr4_smap)
        if self.gbpages.__class__ is not bool:
            self.gbpages = _flag("gbpages", self.gbpages)


class Memslot(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A KVM memory slot of the header: ``npages`` > 0 and ``gfn + npages`` <= 2**40."""

    slot: U64
    gfn: Gfn
    npages: Annotated[int, Meta(gt=0, le=GFN_LIMIT)]
    backing: Backing

    def __post_init__(self) -> None:
        _check_u64("slot", self.slot)
        if not 0 <= self.gfn < GFN_LIMIT:
            raise _range_error("gfn", self.gfn, 0, GFN_LIMIT)
        if not 0 < self.npages or self.gfn + self.npages > GFN_LIMIT:
            raise FieldError("npages", f"gfn {self.gfn:#x} + npages {self.npages:#x} is outside 1..2**40 frames")


class HostConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The simulated host (``host``): the first pfn its allocator hands out, below 2**40 (52-bit frames)."""

    first_pfn: Gfn = 0x100000


def _default_memslots() -> list[Memslot]:
    return [Memslot(slot=0, gfn=0, npages=65536, backing="ram")]


class Header(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The first line of a trace that is not blank or a comment."""

    kvmpfn: Literal[1]
    mmu: MmuKind = "shadow"
    guest: Guest = msgspec.field(default_factory=Guest)
    memslots: list[Memslot] = msgspec.field(default_factory=_default_memslots)
    memory: str | None = None
    kernel: KernelName = "pfn"
    tdp: TdpFlavour = "npt"
    teardown: Flag = True
    host: HostConfig = msgspec.field(default_factory=HostConfig)
    x: Any = None

    def __post_init__(self) -> None:
        if self.teardown.__class__ is not bool:
            self.teardown = _flag("teardown", self.teardown)
        seen: dict[int, int] = {}
        spans: list[tuple[int, int, int]] = []
        for i, ms in enumerate(self.memslots):
            if ms.slot in seen:
                raise FieldError(f"memslots[{i}].slot", f"slot {ms.slot} is already memslots[{seen[ms.slot]}]")
            seen[ms.slot] = i
            spans.append((ms.gfn, ms.gfn + ms.npages, i))
        spans.sort()
        for (_, end, j), (start, _, i) in zip(spans, spans[1:], strict=False):
            if start < end:
                a, b = self.memslots[j], self.memslots[i]
                raise FieldError(
                    f"memslots[{i}]",
                    f"slot {b.slot} (gfn {b.gfn:#x}+{b.npages:#x}) overlaps slot {a.slot} "
                    f"(gfn {a.gfn:#x}+{a.npages:#x})",
                )


class _EventBase(
    msgspec.Struct, tag_field="op", forbid_unknown_fields=True, omit_defaults=True, kw_only=True, gc=False
):
    """Fields every event may carry: ``vcpu`` (0..15), ``t`` (a timestamp), ``x`` (annotation)."""

    vcpu: Vcpu = 0
    t: Any = None
    x: Any = None


class Access(_EventBase, tag="access"):
    """A guest memory access at guest-virtual ``addr`` (a gpa with paging ``none``)."""

    addr: U64
    write: Flag
    user: Flag
    fetch: Flag
    ac: Flag = False

    def __post_init__(self) -> None:
        if self.addr >> 64:  # never negative (U64)
            raise _range_error("addr", self.addr, 0, U64_LIMIT)
        if self.write.__class__ is not bool:
            self.write = _flag("write", self.write)
        if self.user.__class__ is not bool:
            self.user = _flag("user", self.user)
        if self.fetch.__class__ is not bool:
            self.fetch = _flag("fetch", self.fetch)
        if self.ac.__class__ is not bool:
            self.ac = _flag("ac", self.ac)


class Pf(_EventBase, tag="pf"):
    """A page fault taken by KVM, as recorded: ``addr`` and the PFERR bits ``err``."""

    addr: U64
    err: U64

    def __post_init__(self) -> None:
        if not 0 <= self.addr < U64_LIMIT:
            raise _range_error("addr", self.addr, 0, U64_LIMIT)
        _check_u64("err", self.err)


class Write(_EventBase, tag="write"):
    """A guest store of ``len`` bytes of ``val`` at ``gpa`` (not crossing a page)."""

    gpa: Gpa
    val: U64
    len: Len

    def __post_init__(self) -> None:
        _check_gpa_write(self)


class PteWrite(_EventBase, tag="pte_write"):
    """An emulated guest write, as recorded: memory updated, then ``kvm_mmu_pte_write``."""

    gpa: Gpa
    val: U64
    len: Len

    def __post_init__(self) -> None:
        _check_gpa_write(self)


class Cr3(_EventBase, tag="cr3"):
    """The guest loads CR3 (``kvm_mmu_new_cr3``)."""

    val: U64

    def __post_init__(self) -> None:
        _check_u64("val", self.val)


class Paging(_EventBase, tag="paging"):
    """The guest changes paging mode or CPU features; ``None`` leaves a field unchanged."""

    paging: PagingMode | None = None
    cr0_wp: Flag | None = None
    efer_nx: Flag | None = None
    cr4_pse: Flag | None = None
    cr4_smep: Flag | None = None
    cr4_smap: Flag | None = None
    maxphyaddr: MaxPhyAddr | None = None
    gbpages: Flag | None = None

    def __post_init__(self) -> None:
        for name in ("cr0_wp", "efer_nx", "cr4_pse", "cr4_smep", "cr4_smap", "gbpages"):
            value = getattr(self, name)
            if value is not None and value.__class__ is not bool:
                setattr(self, name, _flag(name, value))
        if self.maxphyaddr is not None and not 32 <= self.maxphyaddr <= 52:
            raise _range_error("maxphyaddr", self.maxphyaddr, 32, 53)


class Invlpg(_EventBase, tag="invlpg"):
    """The guest invalidates one gva."""

    addr: U64

    def __post_init__(self) -> None:
        _check_u64("addr", self.addr)


class MemslotEvent(_EventBase, tag="memslot"):
    """Create, move or resize a memslot; ``npages`` 0 deletes it."""

    slot: U64
    gfn: Gfn
    npages: Npages
    backing: Backing = "ram"

    def __post_init__(self) -> None:
        _check_u64("slot", self.slot)
        if not 0 <= self.gfn < GFN_LIMIT:
            raise _range_error("gfn", self.gfn, 0, GFN_LIMIT)
        if not 0 <= self.npages or self.gfn + self.npages > GFN_LIMIT:
            raise FieldError("npages", f"gfn {self.gfn:#x} + npages {self.npages:#x} is outside 0..2**40 frames")


class DirtyLog(_EventBase, tag="dirty_log"):
    """KVM_GET_DIRTY_LOG on ``slot``; ``stop`` switches logging off."""

    slot: U64
    stop: Flag = False

    def __post_init__(self) -> None:
        _check_u64("slot", self.slot)
        if self.stop.__class__ is not bool:
            self.stop = _flag("stop", self.stop)


class HostRemap(_EventBase, tag="host_remap"):
    """The host moves the memory behind ``gfn`` to a new frame."""

    gfn: Gfn

    def __post_init__(self) -> None:
        if not 0 <= self.gfn < GFN_LIMIT:
            raise _range_error("gfn", self.gfn, 0, GFN_LIMIT)


class Inject(_EventBase, tag="inject"):
    """Make the next ``count`` operations of kind ``fault`` fail."""

    fault: FaultKind
    count: Count = 1

    def __post_init__(self) -> None:
        if not 1 <= self.count < U64_LIMIT:
            raise _range_error("count", self.count, 1, U64_LIMIT)


class Audit(_EventBase, tag="audit"):
    """Run the full audit now."""

    label: str | None = None


class Teardown(_EventBase, tag="teardown"):
    """Destroy the VM now."""


Event = (
    Access
    | Pf
    | Write
    | PteWrite
    | Cr3
    | Paging
    | Invlpg
    | MemslotEvent
    | DirtyLog
    | HostRemap
    | Inject
    | Audit
    | Teardown
)

#: Event class by ``op``.
EVENT_TYPES: dict[str, type[_EventBase]] = {
    "access": Access,
    "pf": Pf,
    "write": Write,
    "pte_write": PteWrite,
    "cr3": Cr3,
    "paging": Paging,
    "invlpg": Invlpg,
    "memslot": MemslotEvent,
    "dirty_log": DirtyLog,
    "host_remap": HostRemap,
    "inject": Inject,
    "audit": Audit,
    "teardown": Teardown,
}
