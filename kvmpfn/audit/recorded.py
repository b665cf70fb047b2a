"""Checks on what a real kernel recorded: the ``x.recorded`` records of a converted trace
(:mod:`kvmpfn.trace.ftrace`), fed in trace order, during ``kvmpfn replay`` or by ``kvmpfn check``.

These judge the recorded kernel, not the simulator: they read only the records and never touch the VM.

>>> checks = RecordedChecks(Findings(), mmu="tdp")     # doctest: +SKIP
>>> for event in events:
...     checks.observe(event.x)                         # a pf's or a carrier's x: {"recorded": [...]}
>>> checks.finish()                                     # close the fault runs still open

============================ ============= ==========================================================
code                         subject       check
============================ ============= ==========================================================
``fault-loop``               vcpu, addr    The same address faults again and again with nothing
                                           changed in between. The faults at one address are counted
                                           across vcpus under ``tdp`` (the address is a gpa, the same
                                           for every vcpu) and per vcpu under ``shadow`` (a gva), from
                                           the first fault until a change to the address's mapping:
                                           under ``tdp`` a ``kvm_mmu_set_spte`` or
                                           ``kvm_tdp_mmu_spte_changed`` covering its gfn, on any thread;
                                           under ``shadow`` one on the faulting vcpu's own thread; in
                                           both, a zap of a shadow page that covers it (a direct page's
                                           gfn range; an indirect page, or a zap the text gives no gfn
                                           for, counts for every address) or a ``fast_page_fault`` with
                                           ``fixed 1`` for it. A vcpu of the run that faults at another
                                           address has moved on and ends the run too, as does a fault
                                           with PFERR.RSVD in its error code (not an EPT qualification):
                                           it hit an MMIO spte and was emulated, which is progress. A
                                           run is a loop when it holds at least
                                           :data:`FAULT_LOOP_MIN` (8, ``--fault-loop-min``) faults, or
                                           at least :data:`SPURIOUS_LOOP_MIN` (3) ``fast_page_fault``
                                           records with ``spurious 1`` and ``old`` equal to ``new``:
                                           the spte already allowed the access, yet the access faulted
                                           again, the signature of a vcpu that cannot make progress
                                           (real posts are excerpts: a handful of faults, alternating
                                           between vcpus). Reported when the run ends (a change, a
                                           vcpu moving on, the end of the trace). Fields: ``addr``,
                                           ``vcpu`` (the first faulting vcpu), ``vcpus`` (all, in
                                           order), ``count``, ``spurious``, ``errs`` (the error codes
                                           seen), ``t_first``, ``t_last`` (the time span, as recorded).
``recorded-spte-mismatch``   gfn, level    A ``kvm_mmu_set_spte`` installs a frame other than the one
                                           the preceding ``kvm_mmu_spte_requested`` of the same thread
                                           asked for, when the spte's range (``gfn`` to ``gfn`` +
                                           512^(level−1)) holds the requested gfn. The frame may be
                                           the requested pfn rounded down to the large page, or the
                                           pfn minus the requested gfn's offset in it: both are the
                                           frame KVM maps. A request is matched at most once. Fields:
                                           ``gfn``, ``level``, ``spte``, ``pfn`` (requested),
                                           ``spte_pfn`` (installed).
``recorded-spte-pfn-change`` gfn, level    A ``kvm_tdp_mmu_spte_changed`` whose old and new values are
                                           both present leaves with different frames: KVM must zap a
                                           leaf (make it non-present, flush) before pointing it at
                                           another frame. Present: any of bits 0–2 set, except the EPT
                                           misconfiguration patterns of MMIO sptes (W, W+X); leaf:
                                           level 1 or PS (bit 7). Fields: ``gfn``, ``level``, ``spte``
                                           (new), ``old_spte``, ``old_pfn``, ``new_pfn``.
============================ ============= ==========================================================

Every finding of these codes has ``point`` ``recorded`` and a provenance entry per record it rests on:
``{"seq", "line", "function": the tracepoint, "task": "comm-pid", "text_line": the line in the text, "t"}``
(no ``caller``: that field names an MMU function in a replay, and the text does not say which one fired it).
Under ``kvmpfn replay`` ``seq``/``line`` are those of the trace event that carries the record; under ``kvmpfn
check`` of a text trace, ``seq`` is the record's index among the kept records and ``line`` its text line.
Records that lack a field a check needs are ignored by that check: annotations are free-form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmpfn.audit.findings import Findings
from kvmpfn.vocab import RECORDED_CODES

__all__ = ["CODES", "FAULT_LOOP_MIN", "SPURIOUS_LOOP_MIN", "RecordedChecks"]

#: The finding codes of this module.
CODES = RECORDED_CODES
#: Faults at one address, with nothing changed in between, that make a loop.
FAULT_LOOP_MIN = 8
#: Spurious ``fast_page_fault`` records (old == new) at one address that make a loop: strong evidence.
SPURIOUS_LOOP_MIN = 3
PFERR_RSVD = 1 << 3

_FRAME_MASK = (1 << 40) - 1


def _int(value: Any) -> int | None:
    """A record's number: an int, or a hex (``0x``) / decimal string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            return None
    return None


def _ident(value: Any) -> Any:
    """A record's ``vcpu`` or ``pid``, used as a key: a JSON scalar, else None (as if absent)."""
    return value if value is None or isinstance(value, (str, int, float)) else None


def _pages(level: int | None) -> int:
    level = level if level is not None and 1 <= level <= 5 else 1
    return 1 << (9 * (level - 1))


def _present(spte: int) -> bool:
    return (spte & 0x7) not in (0, 0b010, 0b110)


def _leaf(spte: int, level: int) -> bool:
    return _present(spte) and (level == 1 or bool(spte & (1 << 7)))


def _frame(spte: int, level: int | None) -> int:
    return ((spte >> 12) & _FRAME_MASK) & ~(_pages(level) - 1)


@dataclass
class _Where:
    """Where a record was seen: the carrying event (or the record itself) and the record's own identity."""

    seq: int
    line: int
    rec: dict[str, Any]

    def provenance(self) -> dict[str, Any]:
        rec = self.rec
        out: dict[str, Any] = {
            "seq": self.seq,
            "line": self.line,
            "function": str(rec.get("event")),
            "task": f"{rec.get('comm', '?')}-{rec.get('pid', '?')}",
        }
        if isinstance(rec.get("line"), int):
            out["text_line"] = rec["line"]
        if rec.get("t") is not None:
            out["t"] = rec["t"]
        return out


@dataclass
class _Run:
    """The faults at one address (of one vcpu under ``shadow``) since its mapping last changed."""

    vcpu: Any
    addr: int
    gfn: int | None
    pid: Any
    first: _Where
    last: _Where
    count: int = 1
    errs: list[int] = field(default_factory=list)
    vcpus: list[Any] = field(default_factory=list)  # the vcpu keys that faulted here, in order
    pids: set[Any] = field(default_factory=set)
    spurious: int = 0


class RecordedChecks:
    """The checks of this module over one stream of records.

    :param findings: where findings go (the replay's, or a fresh one for ``kvmpfn check``)
    :param mmu: what the recorded addresses are: ``tdp`` (faults at gpas) or ``shadow`` (faults at gvas)
    :param fault_loop_min: the faults at one address that make a ``fault-loop``
    :param spurious_loop_min: the spurious ``fast_page_fault`` records at one address that make one
    """

    def __init__(
        self,
        findings: Findings,
        mmu: str = "tdp",
        fault_loop_min: int = FAULT_LOOP_MIN,
        spurious_loop_min: int = SPURIOUS_LOOP_MIN,
    ) -> None:
        self.findings = findings
        self.mmu = mmu
        self.fault_loop_min = fault_loop_min
        self.spurious_loop_min = spurious_loop_min
        self.records = 0
        self._runs: dict[Any, _Run] = {}  # run key (addr, or (vcpu key, addr) under shadow) -> run
        self._vcpu_run: dict[Any, Any] = {}  # vcpu key -> the key of the run it last faulted in
        self._requested: dict[Any, tuple[int, int, _Where]] = {}  # pid -> (gfn, pfn, where)
        self._dispatch = {
            "kvm_page_fault": self._page_fault,
            "kvm_mmu_spte_requested": self._spte_requested,
            "kvm_mmu_set_spte": self._set_spte,
            "kvm_tdp_mmu_spte_changed": self._spte_changed,
            "kvm_mmu_prepare_zap_page": self._zap,
            "kvm_mmu_zap_page": self._zap,
            "fast_page_fault": self._fast_page_fault,
        }

    @classmethod
    def for_header(cls, findings: Findings, header: Any) -> RecordedChecks:
        """The checks for a converted trace: its header's ``mmu`` says what the recorded addresses are (a
        ``--mmu`` override of the replay does not change what was recorded)."""
        return cls(findings, mmu=getattr(header, "mmu", "tdp"))

    # -- feeding ----------------------------------------------------------------------------------------
    def observe(self, x: Any) -> None:
        """The records of one trace event's ``x`` annotation (anything else is ignored), located at the
        findings' current ``seq``/``line`` (set by the replay for the event being applied)."""
        if not isinstance(x, dict):
            return
        records = x.get("recorded")
        if not isinstance(records, list):
            return
        for rec in records:
            self.feed(rec, self.findings.seq, self.findings.line)

    def feed(self, rec: Any, seq: int, line: int) -> None:
        """One record (``x`` form), seen at ``seq``/``line``."""
        if not isinstance(rec, dict):
            return
        event = rec.get("event")
        handler = self._dispatch.get(event) if isinstance(event, str) else None
        self.records += 1
        if handler is not None:
            handler(rec, _Where(seq, line, rec))

    def finish(self) -> None:
        """End of the trace: report the fault runs still open."""
        for key in list(self._runs):
            self._close(key)

    # -- reporting --------------------------------------------------------------------------------------
    def _report(
        self, at: _Where, code: str, message: str, subject: tuple[object, ...], prov: list[_Where], **fields: Any
    ) -> None:
        f = self.findings
        saved = f.seq, f.line, f.point
        f.seq, f.line, f.point = at.seq, at.line, "recorded"
        try:
            f.report(code, message, subject, [w.provenance() for w in prov], **fields)
        finally:
            f.seq, f.line, f.point = saved

    # -- fault-loop -------------------------------------------------------------------------------------
    def _run_key(self, vkey: Any, addr: int) -> Any:
        return addr if self.mmu == "tdp" else (vkey, addr)

    def _page_fault(self, rec: dict[str, Any], where: _Where) -> None:
        addr = _int(rec.get("address"))
        err = _int(rec.get("error_code"))
        if addr is None:
            return
        vcpu = _ident(rec.get("vcpu"))
        vkey = vcpu if vcpu is not None else ("pid", _ident(rec.get("pid")))
        key = self._run_key(vkey, addr)
        previous = self._vcpu_run.get(vkey)
        if previous is not None and previous != key and previous in self._runs:
            self._close(previous)  # the vcpu moved on
        if err is not None and err & PFERR_RSVD and rec.get("ept_qualification") is not True:
            # An MMIO spte hit: KVM emulates the access, so the vcpu made progress.
            if key in self._runs:
                self._close(key)
            self._vcpu_run.pop(vkey, None)
            return
        run = self._runs.get(key)
        if run is None:
            gfn = addr >> 12 if self.mmu == "tdp" else None
            run = self._runs[key] = _Run(vcpu, addr, gfn, _ident(rec.get("pid")), where, where)
        else:
            run.count += 1
            run.last = where
        self._vcpu_run[vkey] = key
        if vkey not in run.vcpus:
            run.vcpus.append(vkey)
        run.pids.add(_ident(rec.get("pid")))
        if err is not None and err not in run.errs:
            run.errs.append(err)

    def _close(self, key: Any) -> None:
        run = self._runs.pop(key)
        if run.count < self.fault_loop_min and run.spurious < self.spurious_loop_min:
            return
        t_first, t_last = run.first.rec.get("t"), run.last.rec.get("t")
        errs = [f"{e:#x}" for e in run.errs]
        vcpus = [v if not isinstance(v, tuple) else None for v in run.vcpus]
        if len(run.vcpus) > 1:
            who = "vcpus " + ", ".join(str(v) for v in vcpus)
        else:
            who = f"vcpu {run.vcpu}" if run.vcpu is not None else f"thread {run.pid}"
        span = f" from t={t_first} to t={t_last}" if t_first is not None else ""
        spurious = f", {run.spurious} spurious fast_page_fault with old == new" if run.spurious else ""
        self._report(
            run.last,
            "fault-loop",
            f"{who} faulted {run.count} times at {run.addr:#x}{span} (error codes {', '.join(errs)}{spurious}) "
            "with no spte installed, changed or zapped for it in between",
            (key, run.addr) if self.mmu != "tdp" else (run.vcpus[0] if run.vcpus else None, run.addr),
            [run.first, run.last],
            addr=run.addr,
            vcpu=run.vcpu,
            vcpus=vcpus,
            count=run.count,
            spurious=run.spurious,
            errs=errs,
            t_first=t_first,
            t_last=t_last,
        )

    def _close_where(self, covers: Callable[[int], bool], same_pid: Any = None) -> None:
        """Close the runs whose gfn ``covers(gfn)``; runs of unknown gfn (shadow) only on ``same_pid``."""
        for key, run in list(self._runs.items()):
            if run.gfn is not None:
                if covers(run.gfn):
                    self._close(key)
            elif same_pid is not None and same_pid in run.pids:
                self._close(key)

    def _zap(self, rec: dict[str, Any], where: _Where) -> None:
        gfn, level = _int(rec.get("gfn")), _int(rec.get("level"))
        if gfn is None or level is None or rec.get("direct") is not True:
            for key in list(self._runs):
                self._close(key)
            return
        end = gfn + _pages(level + 1)  # a direct page at level L maps 512^L frames from its gfn
        for key, run in list(self._runs.items()):
            if run.gfn is None or gfn <= run.gfn < end:
                self._close(key)

    def _fast_page_fault(self, rec: dict[str, Any], where: _Where) -> None:
        gva, vcpu = _int(rec.get("gva")), _ident(rec.get("vcpu"))
        if gva is None:
            return
        key = self._run_key(vcpu, gva)
        run = self._runs.get(key)
        if _int(rec.get("fixed")) == 1:
            if run is not None:
                self._close(key)
            return
        old, new = _int(rec.get("old")), _int(rec.get("new"))
        if _int(rec.get("spurious")) != 1 or old is None or old != new:
            return
        if run is None:  # an excerpt that starts after the fault record
            gfn = gva >> 12 if self.mmu == "tdp" else None
            run = self._runs[key] = _Run(vcpu, gva, gfn, _ident(rec.get("pid")), where, where, count=0)
            run.vcpus.append(vcpu)
            self._vcpu_run[vcpu] = key
        run.spurious += 1
        run.last = where

    # -- recorded-spte-mismatch -------------------------------------------------------------------------
    def _spte_requested(self, rec: dict[str, Any], where: _Where) -> None:
        gfn, pfn = _int(rec.get("gfn")), _int(rec.get("pfn"))
        if gfn is not None and pfn is not None:
            self._requested[_ident(rec.get("pid"))] = (gfn, pfn, where)

    def _set_spte(self, rec: dict[str, Any], where: _Where) -> None:
        gfn, spte, level = _int(rec.get("gfn")), _int(rec.get("spte")), _int(rec.get("level"))
        if gfn is None or spte is None:
            return
        pages = _pages(level)
        pid = _ident(rec.get("pid"))
        self._close_where(lambda g: gfn <= g < gfn + pages, pid)
        req = self._requested.get(pid)
        if req is None:
            return
        req_gfn, req_pfn, req_where = req
        if not gfn <= req_gfn < gfn + pages:
            return  # a prefetched neighbour, not the requested gfn
        del self._requested[pid]
        frame = _frame(spte, level)
        if frame in (req_pfn - (req_gfn - gfn), req_pfn & ~(pages - 1)):
            return
        self._report(
            where,
            "recorded-spte-mismatch",
            f"kvm_mmu_set_spte maps gfn {gfn:#x} (level {level}) to frame {frame:#x}, but "
            f"kvm_mmu_spte_requested asked for pfn {req_pfn:#x} for gfn {req_gfn:#x}",
            (gfn, level),
            [req_where, where],
            gfn=gfn,
            level=level,
            spte=spte,
            pfn=req_pfn,
            spte_pfn=f"{frame:#x}",
        )

    # -- recorded-spte-pfn-change -----------------------------------------------------------------------
    def _spte_changed(self, rec: dict[str, Any], where: _Where) -> None:
        gfn, level = _int(rec.get("gfn")), _int(rec.get("level"))
        old, new = _int(rec.get("old_spte")), _int(rec.get("new_spte"))
        if gfn is None or level is None or old is None or new is None:
            return
        pages = _pages(level)
        self._close_where(lambda g: gfn <= g < gfn + pages, _ident(rec.get("pid")))
        if not (_leaf(old, level) and _leaf(new, level)):
            return
        old_pfn, new_pfn = _frame(old, level), _frame(new, level)
        if old_pfn == new_pfn:
            return
        as_id = _int(rec.get("as_id")) or 0
        self._report(
            where,
            "recorded-spte-pfn-change",
            f"the level-{level} leaf of gfn {gfn:#x} went from frame {old_pfn:#x} to {new_pfn:#x} without "
            f"being zapped first (old_spte {old:#x}, new_spte {new:#x})",
            (as_id, gfn, level),
            [where],
            gfn=gfn,
            level=level,
            spte=new,
            old_spte=f"{old:#x}",
            old_pfn=f"{old_pfn:#x}",
            new_pfn=f"{new_pfn:#x}",
        )
