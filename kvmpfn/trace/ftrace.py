"""Import real kvm/kvmmmu tracepoint text (``kvmpfn convert``): tracefs ``trace``/``trace_pipe`` and
``trace-cmd report`` output, as posted in mails and bug reports, into a version-1 trace.

>>> scan = scan_text("trace.txt")                      # doctest: +SKIP
>>> scan.mmu, scan.paging, dict(scan.used)
('tdp', '64', {'kvm_page_fault': 12, 'kvm_mmu_set_spte': 9})
>>> summary = convert_text("trace.txt", "trace.jsonl") # doctest: +SKIP

**Text layouts** (the TP_printk formats of the kvm and kvmmmu tracepoints). A record starts at ``<comm>-<pid> [<cpu>]``,
anchored on
``-<pid> [<cpu>]`` so that a comm may hold blanks and dashes (``CPU 1/KVM-1278472``, ``<...>-35787``); then an
optional ``(tgid)`` column, an optional flags column of any width (none before 2011, 4 characters, 5 since
v5.15, or ``trace-cmd report -l``), the timestamp (``secs.usecs``, or a bare counter), ``: ``, the event name
(``trace-cmd report`` pads it; ``perf script`` prefixes ``kvm:``/``kvmmmu:``) and its text. ``perf script``
lines (``<comm> <tid> [<cpu>] ts: kvm:event: ...``) are read too. Mail quote markers (``> ``, ``>> ``) at
the start of a line are dropped. Skipped without complaint, and counted: ``#`` header lines, ``cpus=N``,
``version = N``, ``CPU N is empty``, ``CPU:N [LOST M EVENTS]`` (M is added up), blank lines, ``<stack trace>``
records and their ``=> func`` lines.

**Wrapped lines.** A record whose text does not yet match its event's format takes the next lines that do
not start a record (at most :data:`MAX_JOINS`), joined with one blank, until it matches — mail clients break
long lines at blanks. A line ending in ``=`` is a quoted-printable soft break: it is joined with no blank and
the ``=`` dropped. A record that never matches is counted as unparsed; a stray line as not understood.
Neither is an error.

**Events and formats** (all kvmmmu numbers are hex without ``0x``; so is ``kvm_page_fault`` before v6.1):

============================== ==================================================================
event                          text read
============================== ==================================================================
``kvm_page_fault``             ``address A error_code E`` (v2.6.31–v6.0) and ``vcpu N rip 0xR address 0xA
                               error_code 0xE`` (v6.1+, with or without the 2023 debug tail ``, seq = ...``)
``kvm_mmu_pagetable_walk``     ``addr A pferr E [FLAGS]``
``kvm_mmu_paging_element``     ``pte P level L``
``kvm_mmu_walker_error``       ``pferr E [FLAGS]``
``kvm_mmu_set_spte``           ``gfn G spte S (rwxu) level L at H``
``kvm_mmu_spte_requested``     ``gfn G pfn P level L``
``kvm_tdp_mmu_spte_changed``   ``as id N gfn G level L old_spte O new_spte N``
``kvm_mmu_get_page``,          ``[sp] [gen X] gfn G ROLE root N sync|unsync [new|existing]`` in every era's
``kvm_mmu_prepare_zap_page``,  kernel text, the trace-cmd plugin's ``new|existing sp gfn G ROLE root N sync``,
``kvm_mmu_zap_page``           and the plugin's role-only zap text (no gfn)
``fast_page_fault``            ``vcpu N gva A error_code FLAGS sptep P old O new N spurious S fixed F``
``kvm_exit``, ``kvm_entry``    ``[vcpu N] reason R ... rip 0xR ...`` (kernel and plugin); ``vcpu N[, rip 0xR]``
============================== ==================================================================

Any other event is counted and skipped.

**The converted trace.** Pass 1 (:func:`scan_text`) reads the whole text and guesses the header; pass 2
(:func:`iter_items`) reads it again and yields one item per record. Standard input is spooled to a temporary
file first. Every ``kvm_page_fault`` becomes a ``pf`` event (``vcpu``, ``t``: the timestamp text, ``addr``,
``err``); every record of the events above but ``kvm_exit``/``kvm_entry`` is kept as a JSON object (the
tracepoint's field names, 64-bit values as ``0x`` hex strings; plus ``event``, ``line`` — the text line —,
``t``, ``cpu``, ``pid``, ``comm`` and ``vcpu`` when known) in the ``x.recorded`` list of the event it follows:
a ``pf``'s list starts with its own fault and goes on with what followed it, up to the next fault. Records
that follow no fault (before the first, or past :data:`BATCH_MAX` records in one list) ride on a *carrier*:
``{"op": "invlpg", "addr": 0, "x": {"carrier": true, "recorded": [...]}}`` — INVLPG is a no-op for the MMU
of the era (docs/trace-format.md, invlpg). The concatenation of the ``x.recorded`` lists, in trace order, is
every kept record in text order: that is what :mod:`kvmpfn.audit.recorded` checks.

**Header guesses** (each overridable: ``convert --mmu --paging``):

- ``mmu``: ``tdp`` on evidence of TDP — a ``kvm_tdp_mmu_spte_changed``, or a ``kvm_exit`` for
  ``EPT_VIOLATION``/``EPT_MISCONFIG``/``npf``; ``shadow`` on evidence of shadow paging — a
  ``kvm_mmu_pagetable_walk`` of the very address that just faulted on the same thread (the shadow fault path
  walks the guest's tables at the faulting gva; TDP faults do not walk), or an indirect (not ``direct``)
  shadow page. The larger count wins; with no evidence, ``tdp`` (what every host with EPT/NPT runs).
- ``guest.paging``: the top level of the guest walks (the first ``kvm_mmu_paging_element`` after each
  ``kvm_mmu_pagetable_walk``): 4 (or 5, not modelled) → ``64``, 3 → ``pae``, 2 → ``32``; else ``64``.
- ``guest.maxphyaddr`` (tdp): widened beyond 40 when a faulting gpa needs it (up to 48).
- ``memslots``: one slot from gfn 0 up to the highest gfn the trace shows mapped (``kvm_mmu_set_spte``,
  ``kvm_mmu_spte_requested``, present leaves of ``kvm_tdp_mmu_spte_changed``), rounded up to 2 MiB, of backing
  ``hugetlb`` when a leaf above 4 KiB was recorded (so that the simulator may map large pages too), else
  ``ram``; the format's default slot when nothing was mapped. Faults above it replay as MMIO.

**Fault fields.** ``vcpu``: the event's own (v6.1+ ``kvm_page_fault``), else the vcpu its thread showed in
``kvm_entry``/``kvm_exit``/``fast_page_fault`` or its comm (``CPU 3/KVM``), else the lowest unused id in
order of first fault; ids of 16 and above are folded modulo 16 (the simulator's ``KVM_MAX_VCPUS``; the record
keeps the real one). ``err``: the recorded error code, except under ``tdp`` when it is a VMX EPT-violation
exit qualification — the thread's last ``kvm_exit`` was ``EPT_VIOLATION``, or, with no exit seen on the
thread, bit 7 or 8 is set (never PFERR bits) — which becomes PFERR as KVM derives it: W from bit 1, FETCH
from bit 2, P when any of bits 3–5 (the gpa was mapped) is set. A fault whose address the simulator cannot
take (a non-canonical or above-4-GiB gva, a gpa of 48 bits or more) is kept as a record only, and counted.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from kvmpfn.errors import InputError
from kvmpfn.trace.events import Guest, Header, Invlpg, Memslot, Pf
from kvmpfn.trace.writer import TraceWriter

__all__ = [
    "BATCH_MAX",
    "MAX_JOINS",
    "NO_RECORDS",
    "EVENTS",
    "ConvertSummary",
    "Item",
    "Parsed",
    "Record",
    "Scan",
    "TextTrace",
    "TextTraceError",
    "convert_text",
    "iter_items",
    "logical_lines",
    "parse_record",
    "scan_text",
]

#: Records in one ``x.recorded`` list at most.
BATCH_MAX = 64
#: Continuation lines a wrapped record may take.
MAX_JOINS = 4
#: Bytes of one physical line that are read; the rest of a longer line is dropped.
MAX_TEXT_LINE = 1 << 16

NO_RECORDS = (
    "no record of an event kvmpfn reads (kvm_page_fault, kvm_exit, kvm_entry, kvmmmu events) in tracefs or "
    "trace-cmd report text"
)
_TRACE_DAT_MAGIC = b"\x17\x08\x44tracing"
_PERF_MAGIC = b"PERFILE2"

_HEX = r"[0-9a-fA-F]+"
_HEAD = re.compile(r"^\s*(?P<comm>.*?)-(?P<pid>\d+)\s+(?:\(\s*(?P<tgid>[\d-]+)\)\s+)?\[(?P<cpu>\d+)\]")
_REST = re.compile(r"\s+(?:(?P<flags>[^\s:]{1,8})\s+)?(?P<ts>\d+(?:\.\d+)?):\s+(?P<what>.*)$")
_PERF = re.compile(
    r"^\s*(?P<comm>\S.*?)\s+(?P<pid>\d+)(?:/\d+)?\s+\[(?P<cpu>\d+)\]\s+(?P<ts>\d+\.\d+):\s+(?P<what>.*)$"
)
_EVENT = re.compile(r"(?P<event>[A-Za-z_]\w*(?::[A-Za-z_]\w*)?):(?:\s+(?P<body>.*)|$)")
_META = re.compile(r"^(?:cpus=\d+|version\s*=\s*\d+|\[?CPU\s+\d+ is empty\]?)$")
_QUOTE = re.compile(r"^(?:>[ \t]?)+")
_LOST = re.compile(r"^(?:CPU:?\s*\d+\s+)?\[LOST (\d+) EVENTS\]$")
_VCPU_COMM = re.compile(r"CPU (\d+)/KVM")


def _f(pattern: str) -> re.Pattern[str]:
    """A format regex; ``%H`` stands for a hex number without ``0x``."""
    return re.compile(pattern.replace("%H", _HEX))


_SP_KERNEL = _f(
    r"sp (?:gen (?P<gen>%H) )?gfn (?P<gfn>%H) (?P<role>.*?) root (?P<root_count>\d+) (?P<sync>sync|unsync)"
    r"(?: (?P<created>new|existing))?"
)
_SP_PLUGIN = _f(
    r"(?P<created>new|existing) sp gfn (?P<gfn>%H) (?P<role>.*?) root (?P<root_count>\d+) (?P<sync>sync|unsync)"
)
_SP_ROLE_ONLY = re.compile(r"(?P<role>l?\d+(?:/\d+)?(?: \S+)*)")

_FORMATS: dict[str, re.Pattern[str]] = {
    "kvm_page_fault": _f(
        r"(?:vcpu (?P<vcpu>\d+) rip (?:0x)?(?P<rip>%H) )?address (?:0x)?(?P<address>%H) "
        r"error_code (?:0x)?(?P<error_code>%H)(?:,.*)?"
    ),
    "kvm_mmu_pagetable_walk": _f(r"addr (?P<addr>%H) pferr (?P<pferr>%H)(?: (?P<flags>[A-Z|]*))?"),
    "kvm_mmu_paging_element": _f(r"pte (?P<pte>%H) level (?P<level>\d+)"),
    "kvm_mmu_walker_error": _f(r"pferr (?P<pferr>%H)(?: (?P<flags>[A-Z|]*))?"),
    "kvm_mmu_set_spte": _f(
        r"gfn (?P<gfn>%H) spte (?P<spte>%H) \((?P<access>[rwxu-]*)\) level (?P<level>\d+) at (?P<at>%H)"
    ),
    "kvm_mmu_spte_requested": _f(r"gfn (?P<gfn>%H) pfn (?P<pfn>%H) level (?P<level>\d+)"),
    "kvm_tdp_mmu_spte_changed": _f(
        r"as id (?P<as_id>\d+) gfn (?P<gfn>%H) level (?P<level>\d+) old_spte (?P<old_spte>%H) "
        r"new_spte (?P<new_spte>%H)"
    ),
    "fast_page_fault": _f(
        r"vcpu (?P<vcpu>\d+) gva (?P<gva>%H) error_code\s*(?P<error_code>[A-Z|]*)\s+sptep (?P<sptep>\S+) "
        r"old (?:0x)?(?P<old>%H) new (?:0x)?(?P<new>%H) spurious (?P<spurious>\d+) fixed (?P<fixed>\d+)"
    ),
    "kvm_exit": _f(r"(?:vcpu (?P<vcpu>\d+) )?reason (?P<reason>[^\s=]\S*).*?\brip (?:0x)?(?P<rip>%H)\b.*"),
    "kvm_entry": _f(r"vcpu (?P<vcpu>\d+)(?:,? rip (?:0x)?(?P<rip>%H))?"),
}
_SP_EVENTS = ("kvm_mmu_get_page", "kvm_mmu_prepare_zap_page", "kvm_mmu_zap_page")

#: Every event the importer reads.
EVENTS = (*_FORMATS, *_SP_EVENTS)
#: Fields printed as decimal by the kernel (kept as JSON integers); every other number is hex.
_DECIMAL = {"vcpu", "level", "as_id", "root_count", "spurious", "fixed"}
#: Events used for conversion state only, not kept in ``x.recorded``.
_STATE_ONLY = ("kvm_exit", "kvm_entry")
_TDP_EXITS = {"EPT_VIOLATION", "EPT_MISCONFIG", "NPF"}


class TextTraceError(InputError):
    """An input error in a text trace: ``str()`` is one line, ``PATH[:LINE]: MESSAGE``."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        Exception.__init__(self, f"{path}:{line}: {message}" if line is not None else f"{path}: {message}")
        self.path = path
        self.line = line
        self.message = message


@dataclass(slots=True)
class Record:
    """One parsed tracepoint record: the prefix columns and the event's fields (ints, strings, bools)."""

    line: int
    comm: str
    pid: int
    cpu: int
    ts: str
    event: str
    fields: dict[str, Any]
    flags: str | None = None
    layout: str = "tracefs"

    def as_x(self) -> dict[str, Any]:
        """The record as it is kept in ``x.recorded``: numbers as ``0x`` hex strings, but decimal fields."""
        out: dict[str, Any] = {"event": self.event, "line": self.line, "t": self.ts, "cpu": self.cpu}
        out["pid"] = self.pid
        out["comm"] = self.comm
        for name, value in self.fields.items():
            if value is None:
                continue
            if isinstance(value, int) and not isinstance(value, bool) and name not in _DECIMAL:
                out[name] = f"{value:#x}"
            else:
                out[name] = value
        return out


# --- lines -------------------------------------------------------------------------------------------------


def _physical_lines(fh: BinaryIO) -> Iterator[tuple[int, str]]:
    """``(line_no, text)``: decoded leniently (invalid UTF-8 replaced, NUL bytes dropped), without the newline."""
    line_no = 0
    while True:
        data = fh.readline(MAX_TEXT_LINE)
        if not data:
            return
        if len(data) == MAX_TEXT_LINE and not data.endswith(b"\n"):
            while True:  # drop the rest of an over-long line
                more = fh.readline(MAX_TEXT_LINE)
                if not more or more.endswith(b"\n"):
                    break
        line_no += 1
        text = data.decode("utf-8", "replace").replace("\0", "").rstrip("\r\n")
        yield line_no, text


def _sp_fields(event: str, body: str) -> dict[str, Any] | None:
    m = _SP_PLUGIN.fullmatch(body) or _SP_KERNEL.fullmatch(body)
    if m is None:
        if event == "kvm_mmu_get_page":
            return None
        m = _SP_ROLE_ONLY.fullmatch(body)  # the trace-cmd plugin's zap text: the role only
        if m is None:
            return None
    elif event == "kvm_mmu_get_page" and m.group("created") is None:
        return None  # the kernel always appends new/existing: the line was cut
    groups = m.groupdict()
    role = groups["role"]
    tokens = role.split()
    level_m = re.fullmatch(r"l?(\d+)(?:/\d+)?", tokens[0]) if tokens else None
    fields: dict[str, Any] = {}
    if groups.get("gfn") is not None:
        fields["gfn"] = int(groups["gfn"], 16)
    fields["role"] = role
    fields["level"] = int(level_m.group(1)) if level_m else None
    fields["direct"] = "direct" in tokens
    if groups.get("root_count") is not None:
        fields["root_count"] = int(groups["root_count"])
        fields["unsync"] = groups["sync"] == "unsync"
    if groups.get("created") is not None:
        fields["created"] = groups["created"] == "new"
    return fields


def _body_fields(event: str, body: str) -> dict[str, Any] | None:
    """The fields of ``event``'s text ``body``, or None when it does not match the event's formats."""
    if event in _SP_EVENTS:
        return _sp_fields(event, body)
    m = _FORMATS[event].fullmatch(body)
    if m is None:
        return None
    fields: dict[str, Any] = {}
    for name, value in m.groupdict().items():
        if value is None:
            continue
        if name in ("flags", "access", "reason", "sptep"):
            fields[name] = value
        elif name == "error_code" and event == "fast_page_fault":
            fields[name] = value
        elif name in _DECIMAL:
            fields[name] = int(value)
        else:
            fields[name] = int(value, 16)
    if event == "kvm_page_fault":
        fields["format"] = "6.1" if "vcpu" in fields else "pre-6.1"
    return fields


@dataclass(slots=True)
class Parsed:
    """What one logical line is: ``kind`` is ``record``, ``unknown`` (another event), ``stack``,
    ``other`` (a record prefix without ``event:``, e.g. the function tracer), or ``incomplete``."""

    kind: str
    record: Record | None = None
    event: str | None = None


def parse_record(text: str, line: int = 0) -> Parsed:
    """Parse one logical line that starts a record."""
    try:
        return _parse_record(text, line)
    except ValueError:  # a number too long to convert (over 4,300 decimal digits): not a record kvmpfn can use
        return Parsed("incomplete")


def _parse_record(text: str, line: int) -> Parsed:
    layout = "tracefs"
    head = _HEAD.match(text)
    rest = _REST.match(text, head.end()) if head else None
    if rest is None:
        perf = _PERF.match(text)
        if perf is None:
            return Parsed("incomplete")
        head, rest, layout = perf, perf, "perf"
    what = rest.group("what").strip()
    if what.startswith("<"):
        return Parsed("stack")
    em = _EVENT.fullmatch(what)
    if em is None:
        return Parsed("other")
    event = em.group("event").rpartition(":")[2]
    if event not in EVENTS:
        return Parsed("unknown", event=event)
    fields = _body_fields(event, (em.group("body") or "").strip())
    if fields is None:
        return Parsed("incomplete", event=event)
    flags = rest.groupdict().get("flags")
    record = Record(
        line=line,
        comm=head.group("comm").strip(),
        pid=int(head.group("pid")),
        cpu=int(head.group("cpu")),
        ts=rest.group("ts"),
        event=event,
        fields=fields,
        flags=flags,
        layout=layout,
    )
    return Parsed("record", record, event)


def logical_lines(lines: Iterator[tuple[int, str]], counts: Counter | None = None) -> Iterator[Parsed]:
    """Assemble physical lines into parsed records (joining wrapped lines); count the rest in ``counts``:
    ``header``, ``trace-cmd header``, ``blank``, ``stack``, ``not understood``, ``other``, ``unknown:EVENT``,
    ``unparsed:EVENT``, and ``lost events`` (the number the ring buffer reported lost, not lines)."""
    counts = counts if counts is not None else Counter()
    pending: list[Any] | None = None  # [line_no, text, joins]

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            parsed = parse_record(pending[1], pending[0])
            counts[f"unparsed:{parsed.event}" if parsed.event else "not understood"] += 1
            pending = None

    def finish(parsed: Parsed) -> Parsed | None:
        if parsed.kind == "record":
            return parsed
        if parsed.kind == "unknown":
            counts[f"unknown:{parsed.event}"] += 1
        else:
            counts[parsed.kind] += 1
        return None

    for line_no, raw in lines:
        text = _QUOTE.sub("", raw) if raw.startswith(">") else raw
        stripped = text.strip()
        if not stripped:
            flush()
            counts["blank"] += 1
            continue
        if stripped.startswith("#"):
            flush()
            counts["header"] += 1
            continue
        if _META.match(stripped):
            flush()
            counts["trace-cmd header"] += 1
            continue
        if (lost := _LOST.match(stripped)) is not None:
            flush()
            counts["lost events"] += int(lost.group(1))
            continue
        if stripped.startswith("=>"):
            flush()
            counts["stack"] += 1
            continue
        if _HEAD.match(text) or _PERF.match(text):
            flush()
            parsed = parse_record(text, line_no)
            if parsed.kind == "incomplete":
                pending = [line_no, text, 0]
            elif (done := finish(parsed)) is not None:
                yield done
            continue
        if pending is not None and pending[2] < MAX_JOINS:
            joined = pending[1][:-1] + stripped if pending[1].endswith("=") else pending[1].rstrip() + " " + stripped
            pending[1] = joined
            pending[2] += 1
            parsed = parse_record(joined, pending[0])
            if parsed.kind != "incomplete":
                pending = None
                if (done := finish(parsed)) is not None:
                    yield done
            continue
        flush()
        counts["not understood"] += 1
    flush()


# --- pass 1: what the trace shows ----------------------------------------------------------------------------


@dataclass
class Scan:
    """Pass 1 over a text trace: counts, the header guesses and the evidence behind them."""

    path: str
    lines: int = 0
    used: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    layouts: Counter = field(default_factory=Counter)
    tdp_evidence: Counter = field(default_factory=Counter)
    shadow_evidence: Counter = field(default_factory=Counter)
    walk_top: Counter = field(default_factory=Counter)
    pid_vcpu: dict[int, int] = field(default_factory=dict)
    fault_pids: list[int] = field(default_factory=list)
    max_fault_addr: int = 0
    max_mapped_gfn: int | None = None
    large_leaf: bool = False
    faults: int = 0
    mmu: str = "tdp"
    paging: str = "64"
    mmu_reason: str = "no evidence: default"
    paging_reason: str = "no guest walks: default"

    @property
    def records(self) -> int:
        return sum(self.used.values())

    def vcpu_of(self, pid: int) -> int | None:
        return self.pid_vcpu.get(pid)

    def layout_text(self) -> str:
        if not self.layouts:
            return "no records"
        text = ", ".join(f"{name} ({n})" for name, n in self.layouts.most_common())
        return f"trace-cmd report, {text}" if self.skipped.get("trace-cmd header") else text


def _pages(level: int | None) -> int:
    """4 KiB frames mapped by one entry at ``level`` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB)."""
    level = level if level and 1 <= level <= 5 else 1
    return 1 << (9 * (level - 1))


def spte_present(spte: int) -> bool:
    """A recorded spte value that maps something: any of bits 0–2 (P, or EPT R/W/X) set, but not EPT's
    misconfiguration patterns W-only and W+X that MMIO sptes use; 0, the TDP MMU's removed marker ``5a0`` and
    the suppress-#VE non-present value have none of bits 0–2."""
    low = spte & 0x7
    return low not in (0, 0b010, 0b110)


def spte_leaf(spte: int, level: int | None) -> bool:
    """A present spte that maps a frame: level 1, or PS (bit 7) at a higher level."""
    return spte_present(spte) and (level == 1 or bool(spte & (1 << 7)))


def spte_frame(spte: int, level: int | None = 1) -> int:
    """The frame number in a leaf spte (bits 12–51), aligned to the leaf's size (bit 12 is PAT in a large
    non-EPT leaf)."""
    return ((spte >> 12) & ((1 << 40) - 1)) & ~(_pages(level) - 1)


def _layout(record: Record) -> str:
    if record.layout == "perf":
        return "perf script"
    if record.flags is None:
        return "no flags column"
    return f"flags column {len(record.flags)} wide"


def _open_input(path: str) -> BinaryIO:
    """The input as a seekable binary file. Standard input and pipes (``<(...)``) are copied into an anonymous
    temporary file first: it has no name, so nothing is left behind whatever stops the command."""
    try:
        fh = sys.stdin.buffer if path == "-" else open(path, "rb")  # closed by the caller
        if path == "-" or not fh.seekable():
            spool = tempfile.TemporaryFile(prefix="kvmpfn-")  # closed by the caller
            try:
                shutil.copyfileobj(fh, spool)
            finally:
                if path != "-":
                    fh.close()
            spool.seek(0)
            fh = spool
    except OSError as err:
        raise TextTraceError("<stdin>" if path == "-" else path, None, (err.strerror or str(err)).lower()) from None
    magic = fh.read(len(_TRACE_DAT_MAGIC))
    fh.seek(0)
    if magic.startswith(_TRACE_DAT_MAGIC):
        fh.close()
        raise TextTraceError(path, 1, "a binary trace-cmd trace.dat: convert its `trace-cmd report` text")
    if magic.startswith(_PERF_MAGIC):
        fh.close()
        raise TextTraceError(path, 1, "a binary perf.data: convert its `perf script` text")
    return fh


class TextTrace:
    """An open text trace, read twice: :attr:`scan` (pass 1, once) and :meth:`items` (pass 2). Standard input
    (``-``) and pipes are spooled to an anonymous temporary file. A context manager.

    :raises TextTraceError: the file cannot be read, or is a binary trace
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.display = "<stdin>" if path == "-" else path
        self.fh = _open_input(path)
        self._scan: Scan | None = None

    def lines(self) -> Iterator[tuple[int, str]]:
        self.fh.seek(0)
        return _physical_lines(self.fh)

    @property
    def scan(self) -> Scan:
        """Pass 1: counts and header guesses."""
        if self._scan is None:
            self._scan = _scan(self)
        return self._scan

    def items(self, mmu: str | None = None, paging: str | None = None) -> Iterator[Item]:
        """Pass 2: every kept record in text order, each fault with its ``pf`` event; ``mmu``/``paging``
        instead of the guesses."""
        scan = self.scan
        return _items(self, scan, mmu or scan.mmu, paging or scan.paging)

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> TextTrace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _scan(inp: TextTrace) -> Scan:
    scan = Scan(inp.display)
    counts: Counter = Counter()
    walk_addr: dict[int, int] = {}  # pid -> address of the walk whose first element is still to come
    last_fault: dict[int, int] = {}  # pid -> address of its last fault
    lines = inp.lines()

    def counted() -> Iterator[tuple[int, str]]:
        for item in lines:
            scan.lines = item[0]
            yield item

    for parsed in logical_lines(counted(), counts):
        r = parsed.record
        assert r is not None
        scan.used[r.event] += 1
        scan.layouts[_layout(r)] += 1
        f = r.fields
        if (m := _VCPU_COMM.search(r.comm)) is not None:
            scan.pid_vcpu.setdefault(r.pid, int(m.group(1)))
        if r.event in ("kvm_entry", "kvm_exit", "fast_page_fault", "kvm_page_fault") and "vcpu" in f:
            scan.pid_vcpu.setdefault(r.pid, f["vcpu"])
        if r.event == "kvm_page_fault":
            scan.faults += 1
            if r.pid not in scan.fault_pids:
                scan.fault_pids.append(r.pid)
            scan.max_fault_addr = max(scan.max_fault_addr, f["address"])
            last_fault[r.pid] = f["address"]
        elif r.event == "kvm_exit":
            if f["reason"].upper() in _TDP_EXITS:
                scan.tdp_evidence[f"kvm_exit {f['reason']}"] += 1
        elif r.event == "kvm_tdp_mmu_spte_changed":
            scan.tdp_evidence["kvm_tdp_mmu_spte_changed"] += 1
            if spte_leaf(f["new_spte"], f["level"]):
                _mapped(scan, f["gfn"], f["level"])
        elif r.event == "kvm_mmu_pagetable_walk":
            walk_addr[r.pid] = f["addr"]
            if last_fault.pop(r.pid, None) == f["addr"]:
                scan.shadow_evidence["guest walk of the faulting address"] += 1
        elif r.event == "kvm_mmu_paging_element":
            if walk_addr.pop(r.pid, None) is not None:
                scan.walk_top[f["level"]] += 1
        elif r.event in ("kvm_mmu_set_spte", "kvm_mmu_spte_requested"):
            _mapped(scan, f["gfn"], f["level"])
        elif r.event in _SP_EVENTS and f.get("gfn") is not None and f["level"] is not None and not f["direct"]:
            scan.shadow_evidence["indirect shadow page"] += 1
    for key, n in counts.items():
        if key.startswith("unknown:"):
            scan.skipped[key.partition(":")[2]] += n
        else:
            scan.skipped[key] += n
    _guess(scan)
    return scan


def _mapped(scan: Scan, gfn: int, level: int) -> None:
    if level >= 2:
        scan.large_leaf = True
    pages = _pages(level)
    last = (gfn & ~(pages - 1)) + pages - 1
    scan.max_mapped_gfn = last if scan.max_mapped_gfn is None else max(scan.max_mapped_gfn, last)


def _guess(scan: Scan) -> None:
    tdp, shadow = sum(scan.tdp_evidence.values()), sum(scan.shadow_evidence.values())
    if tdp or shadow:
        scan.mmu = "tdp" if tdp >= shadow else "shadow"
        evidence = scan.tdp_evidence if scan.mmu == "tdp" else scan.shadow_evidence
        scan.mmu_reason = ", ".join(f"{what} ({n})" for what, n in evidence.most_common())
    if scan.walk_top:
        top = scan.walk_top.most_common(1)[0][0]
        scan.paging = {2: "32", 3: "pae"}.get(top, "64")
        scan.paging_reason = f"guest walks start at level {top}"
    # The vcpus of fault threads that showed none: the lowest free ids, in order of first fault.
    taken = set(scan.pid_vcpu.values())
    free = (i for i in range(1 << 20) if i not in taken)
    for pid in scan.fault_pids:
        if pid not in scan.pid_vcpu:
            scan.pid_vcpu[pid] = next(free)


def scan_text(path: str) -> Scan:
    """Pass 1 alone: the counts and header guesses of the text trace at ``path``.

    :raises TextTraceError: the file cannot be read, or is a binary trace
    """
    with TextTrace(path) as inp:
        return inp.scan


# --- pass 2: records and fault events ----------------------------------------------------------------------


@dataclass(slots=True)
class Item:
    """One kept record of pass 2 (``x`` form) and, for a fault the simulator can take, its ``pf`` event;
    ``skip`` says why a fault has none."""

    record: dict[str, Any]
    pf: Pf | None = None
    skip: str | None = None


def _ept_to_pferr(qual: int) -> int:
    """KVM's PFERR for an EPT violation: W from the write bit, FETCH from the fetch bit, P when the gpa was
    mapped with any access (bits 3–5)."""
    return (1 if qual & 0x38 else 0) | (2 if qual & 0x2 else 0) | (16 if qual & 0x4 else 0)


def _addr_ok(scan: Scan, mmu: str, paging: str, maxphyaddr: int, addr: int) -> str | None:
    if mmu == "tdp":
        return None if addr >> min(maxphyaddr, 48) == 0 else "gpa beyond the guest's physical address space"
    if paging == "64":
        top = addr >> 47
        return None if top in (0, (1 << 17) - 1) else "gva not canonical"
    return None if addr >> 32 == 0 else "gva beyond 4 GiB"


def _maxphyaddr(scan: Scan, mmu: str) -> int:
    if mmu != "tdp":
        return 40
    return min(48, max(40, scan.max_fault_addr.bit_length()))


def iter_items(path: str, *, mmu: str | None = None, paging: str | None = None) -> Iterator[Item]:
    """Both passes over the text trace at ``path``: every kept record in text order, each ``kvm_page_fault``
    with its ``pf`` event. ``mmu``/``paging`` override the scan's guesses.

    :raises TextTraceError: the file cannot be read, or is a binary trace
    """
    with TextTrace(path) as inp:
        yield from inp.items(mmu, paging)


def _items(inp: TextTrace, scan: Scan, mmu: str, paging: str) -> Iterator[Item]:
    last_exit: dict[int, str] = {}
    maxphyaddr = _maxphyaddr(scan, mmu)
    for parsed in logical_lines(inp.lines()):
        r = parsed.record
        assert r is not None
        if r.event == "kvm_exit":
            last_exit[r.pid] = r.fields["reason"].upper()
            continue
        if r.event in _STATE_ONLY:
            continue
        rec = r.as_x()
        vcpu = r.fields.get("vcpu")
        if vcpu is None:
            vcpu = scan.vcpu_of(r.pid)
            if vcpu is not None:
                rec["vcpu"] = vcpu
        if r.event != "kvm_page_fault":
            yield Item(rec)
            continue
        addr, err = r.fields["address"], r.fields["error_code"]
        if mmu == "tdp":
            reason = last_exit.get(r.pid)
            if reason == "EPT_VIOLATION" or (reason is None and err & 0x180):
                err = _ept_to_pferr(err)
                rec["ept_qualification"] = True
        why = _addr_ok(scan, mmu, paging, maxphyaddr, addr)
        if why is not None:
            rec["skipped"] = why
            yield Item(rec, skip=why)
            continue
        pf = Pf(addr=addr, err=err & ((1 << 64) - 1), vcpu=(vcpu or 0) % 16, t=r.ts)
        yield Item(rec, pf)


# --- the converted trace -------------------------------------------------------------------------------------


@dataclass
class ConvertSummary:
    """What :func:`convert_text` used and skipped."""

    scan: Scan
    mmu: str
    paging: str
    faults: int = 0
    carriers: int = 0
    skipped_faults: Counter = field(default_factory=Counter)
    folded_vcpus: set[int] = field(default_factory=set)

    def text(self, output: str) -> str:
        """The summary as a few lines (for standard error)."""
        s = self.scan
        out = [f"{s.path} -> {output}: {s.lines} lines, {s.records} records; layout: {s.layout_text()}"]
        out.append(f"  mmu {self.mmu} ({s.mmu_reason}); guest paging {self.paging} ({s.paging_reason})")
        if s.used:
            out.append("  used: " + ", ".join(f"{e} {n}" for e, n in sorted(s.used.items())))
        if s.skipped:
            out.append("  skipped: " + ", ".join(f"{e} {n}" for e, n in sorted(s.skipped.items())))
        wrote = f"  wrote {self.faults} pf events, {self.carriers} carrier events"
        if self.skipped_faults:
            wrote += "; faults kept as records only: " + ", ".join(
                f"{why} {n}" for why, n in sorted(self.skipped_faults.items())
            )
        if self.folded_vcpus:
            wrote += f"; vcpu ids folded modulo 16: {', '.join(map(str, sorted(self.folded_vcpus)))}"
        out.append(wrote)
        return "\n".join(out) + "\n"


def _source(scan: Scan) -> str:
    """The input's file name (no directory: the converted trace does not depend on where it was made)."""
    return "<stdin>" if scan.path == "<stdin>" else os.path.basename(scan.path)


def _header(scan: Scan, mmu: str, paging: str, memory: str | None, guest: dict[str, Any] | None) -> Header:
    fields: dict[str, Any] = dict(guest or {})
    fields["paging"] = paging
    maxphyaddr = _maxphyaddr(scan, mmu)
    if maxphyaddr != 40:
        fields["maxphyaddr"] = maxphyaddr
    header = Header(kvmpfn=1, mmu=mmu, guest=Guest(**fields), memory=memory)
    if scan.max_mapped_gfn is not None:
        npages = min((scan.max_mapped_gfn + 512) & ~511, 1 << 40)
        header.memslots = [Memslot(slot=0, gfn=0, npages=npages, backing="hugetlb" if scan.large_leaf else "ram")]
    header.x = {"recorded": {"source": _source(scan), "mmu": scan.mmu_reason, "paging": scan.paging_reason}}
    return header


def convert_text(
    path: str,
    output: str,
    *,
    mmu: str | None = None,
    paging: str | None = None,
    memory: str | None = None,
    guest: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ConvertSummary:
    """Convert the text trace at ``path`` (``-``: standard input) into the trace ``output``.

    :param mmu: ``shadow``/``tdp`` instead of the guess
    :param paging: the guest paging mode instead of the guess
    :param memory: the header's ``memory`` field (a path relative to ``output``'s directory)
    :param guest: header ``guest`` fields to start from (e.g. an ELF core's CPU state); ``paging`` and the
        guessed paging mode take precedence over its ``paging`` only when the text shows guest walks or
        ``paging`` is given
    :param progress: called as ``progress(records done, records in all)`` every few thousand records
    :raises TextTraceError: the input cannot be read, is binary, or holds no tracepoint record
    """
    with TextTrace(path) as inp:
        scan = inp.scan
        if not scan.records:
            raise TextTraceError(inp.display, None, NO_RECORDS)
        mmu = mmu or scan.mmu
        if paging is None:
            paging = scan.paging if (scan.walk_top or not guest) else guest.get("paging", scan.paging)
        summary = ConvertSummary(scan, mmu, paging)
        carrier_vcpu = scan.pid_vcpu.get(scan.fault_pids[0], 0) % 16 if scan.fault_pids else 0
        with TraceWriter(output) as writer:
            writer.comment(f"converted by kvmpfn convert from {_source(scan)}")
            writer.write_header(_header(scan, mmu, paging, memory, guest))
            pending: Pf | Invlpg | None = None
            batch: list[dict[str, Any]] = []

            def flush() -> None:
                nonlocal pending
                if pending is not None:
                    pending.x = {**(pending.x or {}), "recorded": list(batch)}
                    writer.write_event(pending)
                batch.clear()
                pending = None

            for done, item in enumerate(_items(inp, scan, mmu, paging)):
                if progress is not None and not done % 4096:
                    progress(done, scan.records)
                if item.pf is not None:
                    flush()
                    pending = item.pf
                    carrier_vcpu = item.pf.vcpu
                    summary.faults += 1
                    if item.record.get("vcpu", 0) >= 16:
                        summary.folded_vcpus.add(item.record["vcpu"])
                elif len(batch) >= BATCH_MAX or pending is None:
                    flush()
                    pending = Invlpg(addr=0, vcpu=carrier_vcpu, x={"carrier": True})
                    summary.carriers += 1
                if item.skip is not None:
                    summary.skipped_faults[item.skip] += 1
                batch.append(item.record)
            flush()
    return summary
