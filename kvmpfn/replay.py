"""Replay a trace through the simulated KVM: build the VM from the header, apply each event, emit outcome
records (docs/trace-format.md, Outcome records), run audits at checkpoints and collect findings. The vcpu run loop's
counterpart.
"""

from __future__ import annotations

import gc
import json
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import IO, Any

from kvmpfn.audit import Auditor
from kvmpfn.audit.findings import hexs
from kvmpfn.audit.paranoid import check_mmu_structures
from kvmpfn.audit.recorded import RecordedChecks
from kvmpfn.errors import InputError, InternalError, KernelBug
from kvmpfn.host import Host, HostError
from kvmpfn.host.elfcore import guest_from_core, open_header_memory
from kvmpfn.kvm.context import (
    emulator_write_phys,
    guest_access,
    kvm_mmu_reset_context,
    kvm_set_cr3,
    new_vcpu,
    recorded_fault,
)
from kvmpfn.kvm.mmu import (
    kvm_arch_destroy_vm,
    kvm_mmu_calculate_mmu_pages,
    kvm_mmu_change_mmu_pages,
    kvm_mmu_notifier_invalidate_range,
    kvm_mmu_slot_remove_write_access,
    kvm_mmu_zap_all,
    kvm_slot_init,
)
from kvmpfn.kvm.pfn import PfnApi
from kvmpfn.kvm.spte import is_last_spte, is_shadow_present_pte
from kvmpfn.kvm.vm import Kvm
from kvmpfn.kvm.walker import gva_in_range, load_pdptrs
from kvmpfn.limits import CHECK_EVERY, over_limit, resolve_max_memory
from kvmpfn.trace import events as ev
from kvmpfn.trace.reader import TraceError, open_trace
from kvmpfn.x86 import KVM_MAX_VCPUS

KVM_MEMORY_SLOTS = 32
GUEST_STATE = ("paging", "cr0_wp", "efer_nx", "cr4_pse", "cr4_smep", "cr4_smap", "maxphyaddr", "gbpages")
STORE_OR_FAULT = frozenset({"access", "pf", "write", "pte_write"})
#: events that change the VM as a whole (guest paging state, memory map, host pages, dirty logging)
VM_WIDE = frozenset({"paging", "memslot", "dirty_log", "host_remap", "teardown"})
#: what :meth:`Replayer.do_access` returns when no outcome records are written (shared: never mutated)
RESULT_ONLY = {r: {"result": r} for r in ("hit", "mapped", "mmio", "emulated", "guest_fault", "error", "ok")}
TDP_GPA_BITS = 48  # a 4-level TDP table maps 48 bits of guest-physical address


@dataclass
class ReplayOptions:
    """Command-line overrides and audit settings (``kvmpfn replay`` options)."""

    mmu: str | None = None
    kernel: str | None = None
    audit_every: int = 0
    bugs: frozenset[str] = frozenset()
    kernel_audit: bool = False  # also audit at the kernel's own four kvm_mmu_audit() points
    paranoid: bool = False  # full audit and a check of the simulator's own structures after every event
    tdp: str | None = None  # "npt" or "ept": overrides the header's ``tdp`` (``--tdp``)
    #: bytes the simulated VM may hold (kvmpfn.limits): None is half the machine's memory, 0 no limit
    max_memory: int | None = None
    full_audit: bool = False  # every audit point checks everything, not only what changed since the last one

    def model(self) -> dict[str, Any]:
        """The options that change the MMU being modelled (``mmu``, ``kernel``, ``tdp``, ``bugs``), those set
        only: what a baseline records about the run that wrote it."""
        out: dict[str, Any] = {name: getattr(self, name) for name in ("mmu", "kernel", "tdp") if getattr(self, name)}
        if self.bugs:
            out["bugs"] = sorted(self.bugs)
        return out

    def document(self) -> dict[str, Any]:
        """Every option, as reports record them (``kvmpfn merge`` refuses reports whose options differ)."""
        doc = asdict(self)
        doc["bugs"] = sorted(self.bugs)
        return doc

    def with_model(self, model: dict[str, Any]) -> ReplayOptions:
        """These options with ``model`` (as :meth:`model` gives it) applied."""
        return replace(self, **{k: frozenset(v) if k == "bugs" else v for k, v in model.items()})


@dataclass
class ReplayResult:
    """What a replay produced; ``error`` is the one-line input error that stopped it, if any."""

    trace: str
    events: int = 0
    findings: list[dict] = field(default_factory=list)
    results: Counter = field(default_factory=Counter)
    error: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    mmu: str | None = None  # as replayed (the header's, or the option that overrode it)
    kernel: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # ReplayOptions.document() of the replay
    interrupted: bool = False  # Ctrl-C: ``events`` is where the replay stopped
    exception: BaseException | None = None  # the defect behind an "internal error" (``--debug`` shows it)

    def summary(self) -> dict[str, Any]:
        by_code = Counter(f["code"] for f in self.findings)
        return {
            "results": dict(sorted(self.results.items())),
            "by_code": dict(sorted(by_code.items())),
            **self.stats,
        }


class Replayer:
    """One VM and the state of one replay. ``records``: :meth:`apply` returns whole outcome records (else
    the ``result`` alone, which is all a replay that writes no records needs)."""

    def __init__(self, header: ev.Header, options: ReplayOptions, memory_image=None, records: bool = True) -> None:
        self.header = header
        self.records = records
        self.audit_points = bool(options.paranoid or options.audit_every)  # after events, not only at `audit`
        self.mmu = options.mmu or header.mmu
        self.kernel = options.kernel or header.kernel
        self.options = options
        self.host = Host(first_pfn=header.host.first_pfn, memory_image=memory_image)
        self.api = PfnApi(self.host, self.kernel, bugs=options.bugs)
        self.tdp = options.tdp or header.tdp
        self.kvm = Kvm(
            self.host, self.api, kernel=self.kernel, tdp=self.mmu == "tdp", bugs=options.bugs, tdp_flavour=self.tdp
        )
        # the mutant audit-no-release is the audit's own leak, one reference per leaf checked: it needs every point full
        incremental = not options.full_audit and "audit-no-release" not in options.bugs
        incremental = incremental and bool(self.audit_points or options.kernel_audit)
        self.auditor = Auditor(self.kvm, kernel_points=options.kernel_audit, incremental=incremental)
        self.changes = self.auditor.changes  # None unless auditing incrementally
        self.findings = self.auditor.findings
        self.recorded = RecordedChecks.for_header(self.findings, header)
        self.torn_down = False
        self.cpuid: tuple[int, bool] | None = None  # (maxphyaddr, gbpages) after a CPUID change
        self.seq = -1
        self.line = 0
        if self.kvm.notifiers:
            self.host.add_invalidate_hook(self._invalidate_range)
        for i, ms in enumerate(header.memslots):
            self._check_slot_id(ms.slot, f"memslots[{i}].slot")
            self.kvm_set_memory_region(ms.slot, ms.gfn, ms.npages, ms.backing)
        self.dispatch = {
            cls: (getattr(self, "do_" + cls.__struct_config__.tag), cls.__struct_config__.tag)
            for cls in ev.EVENT_TYPES.values()
        }

    # -- helpers ---------------------------------------------------------------------------------------------

    def vcpu(self, vcpu_id: int):
        vcpu = self.kvm.vcpus.get(vcpu_id)
        if vcpu is None:
            if not 0 <= vcpu_id < KVM_MAX_VCPUS:
                raise InputError("vcpu", f"must be below {KVM_MAX_VCPUS}")
            vcpu = new_vcpu(self.kvm, vcpu_id, self.header.guest)
            if self.cpuid is not None:
                vcpu.cpu.maxphyaddr, vcpu.cpu.gbpages = self.cpuid
        return vcpu

    def _check_slot_id(self, slot: int, name: str = "slot") -> None:
        if slot >= KVM_MEMORY_SLOTS:
            raise InputError(name, f"slot {slot} is not below KVM_MEMORY_SLOTS ({KVM_MEMORY_SLOTS})")

    def _check_addr(self, vcpu, addr: int, is_gpa: bool) -> None:
        if not is_gpa and not addr >> 32:
            return  # valid in every paging mode
        paging = vcpu.cpu.paging
        if is_gpa:
            limit = min(vcpu.cpu.maxphyaddr, TDP_GPA_BITS)
            if addr >> limit:
                raise InputError("addr", f"gpa {addr:#x} is beyond the guest's {limit}-bit physical address space")
        elif paging == "none":
            if addr >> 32:
                raise InputError("addr", f"{addr:#x} is beyond 4 GiB with paging off")
        elif not gva_in_range(paging, addr):
            what = "not canonical" if paging == "64" else "beyond 4 GiB"
            raise InputError("addr", f"gva {addr:#x} is {what} in {paging}-bit paging")

    def _invalidate_range(self, start: int, end: int) -> None:
        kvm_mmu_notifier_invalidate_range(self.kvm, start, end)

    def kvm_set_memory_region(self, slot: int, gfn: int, npages: int, backing: str) -> bool:
        """``__kvm_set_memory_region`` + ``kvm_arch_set_memory_region``: a new size for a slot that exists is
        refused (-EINVAL: "Disallow changing a memory slot's size", kvm_main.c v2.6.26 and v2.6.27; False, nothing
        changes); deletion zaps everything first under ``notifier`` (``kvm_arch_flush_shadow``, v2.6.27) and
        nothing before it (v2.6.26: sptes stay); then the shadow-page budget is recomputed and the slot's sptes
        lose write access."""
        kvm = self.kvm
        old_ms = self.host.memslot(slot)
        if npages and old_ms is not None and old_ms.npages and npages != old_ms.npages:
            return False  # "Disallow changing a memory slot's size": -EINVAL, nothing changes
        if npages == 0:
            if self.host.memslot(slot) is None:
                raise InputError("slot", f"slot {slot} does not exist")
            if kvm.notifiers and "memslot-delete-no-flush" not in kvm.bugs:
                kvm_mmu_zap_all(kvm)
            self.host.set_memslot(slot, gfn, 0, backing)
            kvm.slots.pop(slot, None)
        else:
            self.host.set_memslot(slot, gfn, npages, backing)
            old = kvm.slots.get(slot)
            kvm.slots[slot] = kvm_slot_init(kvm, slot, gfn, npages)
            if old is not None:
                kvm.slots[slot].dirty_bitmap = old.dirty_bitmap
        if not kvm.n_requested_mmu_pages:
            kvm_mmu_change_mmu_pages(kvm, kvm_mmu_calculate_mmu_pages(kvm))
        kvm_mmu_slot_remove_write_access(kvm, slot)
        return True

    # -- events ----------------------------------------------------------------------------------------------

    def do_access(self, e: ev.Access) -> dict:
        vcpu = self.kvm.vcpus.get(e.vcpu) or self.vcpu(e.vcpu)
        if e.addr >> 32:
            self._check_addr(vcpu, e.addr, False)
        out = guest_access(vcpu, self.kvm, e.addr, e.write, e.user, e.fetch, e.ac, self.records)
        if not self.records and not out.looped and not out.livelock:
            return RESULT_ONLY[out.result]
        if out.looped:
            self.findings.report(
                "fault-loop",
                f"access to {e.addr:#x} on vcpu {e.vcpu} exits again after every fixed fault",
                ("addr", e.vcpu, e.addr),
                addr=e.addr,
                vcpu=e.vcpu,
            )
        self._report_livelock(out, e.vcpu, e.addr)
        return self._fault_record(out)

    def do_pf(self, e: ev.Pf) -> dict:
        vcpu = self.vcpu(e.vcpu)
        self._check_addr(vcpu, e.addr, self.kvm.tdp_enabled)
        out = recorded_fault(vcpu, self.kvm, e.addr, e.err)
        self._report_livelock(out, e.vcpu, e.addr)
        return self._fault_record(out)

    def _report_livelock(self, out, vcpu: int, addr: int) -> None:
        """A fault whose guest walk restarted without end (``cmpxchg_gpte`` on ``bad_page``): the kernel spins in
        ``FNAME(walk_addr)`` forever; the replay stopped it after ``WALK_RESTART_LIMIT`` restarts. Not when an
        injected failure was consumed: those are finite, and the kernel's next restart would succeed."""
        if out.livelock and not (self.kvm.consumed_failure or self.api.consumed_failure):
            self.findings.report(
                "fault-loop",
                f"fault at {addr:#x} on vcpu {vcpu}: FNAME(walk_addr) restarts forever (cmpxchg_gpte never succeeds)",
                ("addr", vcpu, addr),
                addr=addr,
                vcpu=vcpu,
            )

    def _fault_record(self, out) -> dict:
        rec: dict[str, Any] = {"result": out.result}
        if out.result == "guest_fault":
            rec["err"] = hexs(out.err)
        elif out.result in ("mapped", "hit", "mmio", "emulated") and out.gpa is not None:
            rec["gpa"] = hexs(out.gpa)
            if out.result in ("mapped", "hit") and out.pfn is not None:
                rec["pfn"] = hexs(out.pfn)
                rec["spte"] = hexs(out.spte)
        rec["set_accessed"] = [hexs(g) for g in out.set_accessed or ()]
        if out.set_dirty is not None:
            rec["set_dirty"] = hexs(out.set_dirty)
        return rec

    def do_write(self, e: ev.Write) -> dict:
        vcpu = self.kvm.vcpus.get(e.vcpu) or self.vcpu(e.vcpu)
        changed = None if self.changes is None else self.changes.guest_write
        return RESULT_ONLY[emulator_write_phys(vcpu, self.kvm, e.gpa, e.val, e.len, False, changed)]

    def do_pte_write(self, e: ev.PteWrite) -> dict:
        changed = None if self.changes is None else self.changes.guest_write
        return RESULT_ONLY[emulator_write_phys(self.vcpu(e.vcpu), self.kvm, e.gpa, e.val, e.len, True, changed)]

    def do_cr3(self, e: ev.Cr3) -> dict:
        vcpu = self.vcpu(e.vcpu)
        cpu = vcpu.cpu
        before = (cpu.cr3, cpu.pdptrs)
        if not kvm_set_cr3(vcpu, self.kvm, e.val):
            return {"result": "guest_fault", "vector": "gp"}
        if (cpu.cr3, cpu.pdptrs) != before:
            self.kvm.flush_vcpu_walks(vcpu)  # the memoised walks stay exact across a reload of the same root
        return {"result": "ok"}

    def do_paging(self, e: ev.Paging) -> dict:
        vcpu = self.vcpu(e.vcpu)
        self.kvm.flush_vcpu_walks(vcpu)
        cpu = vcpu.cpu
        if e.paging == "pae" and cpu.paging != "pae":
            pdptrs = load_pdptrs(cpu.cr3, self.host, e.maxphyaddr or cpu.maxphyaddr)
            if pdptrs is None:
                return {"result": "guest_fault", "vector": "gp"}
            cpu.pdptrs = pdptrs
        cpuid = (cpu.maxphyaddr, cpu.gbpages)
        for name in GUEST_STATE:
            value = getattr(e, name)
            if value is not None:
                setattr(cpu, name, value)
        if (cpu.maxphyaddr, cpu.gbpages) != cpuid:
            # CPUID is the VM's (QEMU gives every vcpu the same): the change reaches every vcpu and later ones
            for other in self.kvm.vcpus.values():
                other.cpu.maxphyaddr, other.cpu.gbpages = cpu.maxphyaddr, cpu.gbpages
                self.kvm.flush_vcpu_walks(other)
            self.cpuid = (cpu.maxphyaddr, cpu.gbpages)
            # a CPUID change: what a guest pte may hold changed for every shadow page (later kernels zap the
            # MMU after KVM_SET_CPUID)
            kvm_mmu_zap_all(self.kvm)
        kvm_mmu_reset_context(vcpu, self.kvm)
        return {"result": "ok"}

    def do_invlpg(self, e: ev.Invlpg) -> dict:
        """INVLPG is not intercepted in v2.6.26/27 (docs/kernel.md, INVLPG): no MMU work."""
        self._check_addr(self.vcpu(e.vcpu), e.addr, False)
        return {"result": "ok"}

    def do_memslot(self, e: ev.MemslotEvent) -> dict:
        self._check_slot_id(e.slot)
        self.kvm.flush_walk_caches()
        if not self.kvm_set_memory_region(e.slot, e.gfn, e.npages, e.backing):
            return {"result": "error"}
        return {"result": "ok"}

    def do_dirty_log(self, e: ev.DirtyLog) -> dict:
        """KVM_GET_DIRTY_LOG (``kvm_vm_ioctl_get_dirty_log``, x86.c v2.6.26): the first call switches logging on
        (the KVM_MEM_LOG_DIRTY_PAGES memslot update, whose ``kvm_arch_set_memory_region`` write-protects the
        slot); a later call write-protects the slot and clears the bitmap only ``if (is_dirty)``, when some page
        was logged ("If nothing is dirty, don't bother messing with page tables"); ``stop`` then switches logging
        off (a memslot update again: the slot is write-protected whatever the bitmap held)."""
        slot = self.kvm.slots.get(e.slot)
        if slot is None:
            raise InputError("slot", f"slot {e.slot} does not exist")
        if slot.dirty_bitmap is None:
            slot.dirty_bitmap = set()
            kvm_mmu_slot_remove_write_access(self.kvm, e.slot)
        elif slot.dirty_bitmap:
            kvm_mmu_slot_remove_write_access(self.kvm, e.slot)
            slot.dirty_bitmap.clear()
        if e.stop:
            slot.dirty_bitmap = None
            kvm_mmu_slot_remove_write_access(self.kvm, e.slot)
        return {"result": "ok"}

    def do_host_remap(self, e: ev.HostRemap) -> dict:
        if self.host.gfn_to_memslot(e.gfn) is None:
            raise InputError("gfn", f"gfn {e.gfn:#x} is outside every memslot")
        self.kvm.flush_walk_caches()
        self.host.host_remap(e.gfn)
        return {"result": "ok"}

    def do_inject(self, e: ev.Inject) -> dict:
        if e.fault == "gup_fail":
            self.api.inject_gup_fail(e.count)
        else:
            self.kvm.inject[e.fault] += e.count
        return {"result": "ok"}

    def do_audit(self, e: ev.Audit) -> dict:
        """A full audit; the outcome record counts the findings it added (0: the MMU passed it)."""
        before = len(self.findings.items)
        self.auditor.full_audit("audit" if e.label is None else f"audit {e.label}")
        return {"result": "ok", "findings": len(self.findings.items) - before}

    def do_teardown(self, e: ev.Teardown | None = None) -> dict:
        """``kvm_arch_destroy_vm``: a full audit first, then every reference still held is a leak."""
        self.final_stats = self.stats()
        self.auditor.full_audit("teardown")
        kvm_arch_destroy_vm(self.kvm)
        self.auditor.after_teardown()
        self.torn_down = True
        return {"result": "ok"}

    # -- the loop --------------------------------------------------------------------------------------------

    def apply(self, seq: int, line: int, e) -> dict:
        """Apply one event; returns its outcome record."""
        if self.torn_down:
            raise InputError(None, "event after teardown")
        handler, op = self.dispatch[type(e)]
        f = self.findings
        f.seq, f.line, f.point = seq, line, op
        kvm, api = self.kvm, self.api
        kvm.consumed_failure = api.consumed_failure = False
        if self.changes is not None and op in VM_WIDE:
            self.changes.everything = True  # the next audit point checks everything
        rec = handler(e)
        if (kvm.consumed_failure or api.consumed_failure) and op in STORE_OR_FAULT and rec["result"] != "error":
            rec = {k: v for k, v in rec.items() if k not in ("gpa", "pfn", "spte", "err", "set_dirty")}
            rec["result"] = "error"
        if self.audit_points:
            self._audit_point(seq)
        if e.x is not None:
            self.recorded.observe(e.x)
        if not self.records:
            return rec
        out = {"seq": seq, "line": line, "op": op, **rec}
        if e.t is not None:
            out["t"] = e.t
        if e.x is not None:
            out["x"] = e.x
        return out

    def _audit_point(self, seq: int) -> None:
        """``--paranoid`` (an audit point and the structure checks after every event) or ``--audit-every``."""
        if self.torn_down:
            return
        every = self.options.audit_every
        if self.options.paranoid:
            self.auditor.audit_point("paranoid")
            incremental = self.auditor.incremental
            changed = None if incremental is None else incremental.structure_changes()
            problems = check_mmu_structures(self.kvm, changed)
            if problems:
                raise InternalError("; ".join(problems[:3]))
        elif every and (seq + 1) % every == 0:
            self.auditor.audit_point(f"audit-every {every}")

    def stats(self) -> dict[str, Any]:
        kvm = self.kvm
        leaves = 0
        for sp in kvm.active_mmu_pages.values():
            for ent in sp.spt:
                if is_shadow_present_pte(ent) and is_last_spte(ent, sp.level):
                    leaves += 1
        referenced = sum(1 for f in self.host.frames.values() if f.count)
        return {
            "shadow_pages": len(kvm.active_mmu_pages),
            "sptes": leaves,
            "frames_referenced": referenced,
        }


PROGRESS_EVERY = 1 << 14  # events between two calls of replay_file's progress callback
#: the cyclic garbage collector's thresholds during a replay (``gc.set_threshold``). The VM's objects live until
#: teardown and events make almost no reference cycles (under a thousand in a 1M-event replay), but at Python's
#: default (700, 10, 10) a VM that grows, as under `boot`, is traversed whole again and again: 10-15% of the run.
REPLAY_GC_THRESHOLD = (100_000, 10, 10)


@contextmanager
def _fewer_collections() -> Iterator[None]:
    """Run the body with :data:`REPLAY_GC_THRESHOLD`, then restore the thresholds it found."""
    before = gc.get_threshold()
    gc.set_threshold(*REPLAY_GC_THRESHOLD)
    try:
        yield
    finally:
        gc.set_threshold(*before)


@contextmanager
def _interrupt_between_events() -> Iterator[list[bool]]:
    """Ctrl-C in the event loop: the first SIGINT is noted (``stop[0]``) and the loop stops before the next
    event, so that every event counted has its outcome record and observer call, whole; a second one interrupts
    at once. Only where Python's own handler is installed (the main thread; not a worker that ignores SIGINT)."""
    stop = [False]
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield stop
        return

    def note(signum: int, frame: Any) -> None:
        if stop[0]:
            raise KeyboardInterrupt
        stop[0] = True

    signal.signal(signal.SIGINT, note)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def kernel_bug_finding(findings, bug: KernelBug) -> None:
    """A simulated ``BUG()`` is a finding (``kernel-bug``): the function that hit it and what it saw; the
    replay stops there, as the host kernel would have."""
    function = str(bug).split(":", 1)[0].split()[0] if str(bug) else "BUG"
    findings.report("kernel-bug", f"simulated kernel BUG in {bug}", ("kernel-bug",), function=function, spte=bug.spte)


def replay_file(
    path: str,
    options: ReplayOptions | None = None,
    emit: IO[str] | None = None,
    progress: Callable[[int, str], None] | None = None,
    observer=None,
) -> ReplayResult:
    """Replay the trace at ``path``. An input error, the memory limit or running out of memory stops the replay
    and is returned in ``result.error`` with everything found up to that line; a simulated kernel BUG becomes a
    ``kernel-bug`` finding and stops it; Ctrl-C stops it with ``result.interrupted``. ``progress(events, note)`` is
    called every PROGRESS_EVERY events, and before each ``audit`` event (a full audit).

    ``observer`` (:mod:`kvmpfn.inspect`): ``attach(rp)`` once the Replayer exists (``observer.records``: it
    wants whole outcome records), ``event(seq, line, e, rec)`` after each event (true: stop the replay there,
    with no teardown), ``finish(rp)`` at the end. Without one the loop pays a single test per event.
    While the trace is open the garbage collector runs with :data:`REPLAY_GC_THRESHOLD`."""
    options = options or ReplayOptions()
    result = ReplayResult(trace=path, options=options.document())
    limit = resolve_max_memory(options.max_memory) or 1 << 63  # 0: no limit
    out_of_memory = implicit_teardown = False
    rp = None
    try:
        with open_trace(path) as reader, _fewer_collections():
            try:
                image = open_header_memory(reader.header.memory, path)
                reader.header.guest = guest_from_core(reader.header.guest, image)
                records = emit is not None or (observer is not None and observer.records)
                rp = Replayer(reader.header, options, memory_image=image, records=records)
                result.mmu, result.kernel = rp.mmu, rp.kernel
                if observer is not None:
                    observer.attach(rp)
            except (HostError, InputError) as err:
                raise TraceError(path, reader.header_line, err.message, field=err.field, context="header") from None
            seq = -1
            counts = result.results
            tick = PROGRESS_EVERY
            check_at = 0  # the seq after which the memory is checked next
            ended = False
            with _interrupt_between_events() as stop:
                for line, e in reader:
                    if stop[0]:  # Ctrl-C during the event before: stop here, nothing half done
                        raise KeyboardInterrupt
                    seq += 1
                    if progress is not None:
                        tick -= 1
                        if not tick:
                            tick = PROGRESS_EVERY
                            progress(seq, "")
                        elif type(e) is ev.Audit:  # a full audit can take a second or more on a large VM
                            progress(seq, f"full audit at line {line}")
                    try:
                        rec = rp.apply(seq, line, e)
                    except (HostError, InputError) as err:
                        op = e.__struct_config__.tag
                        raise TraceError(path, line, err.message, field=err.field, context=f'event "{op}"') from None
                    except InternalError as err:
                        raise TraceError(path, line, f"internal consistency: {err}", context="paranoid") from None
                    except KernelBug as bug:
                        kernel_bug_finding(rp.findings, bug)
                        result.events = seq + 1
                        break
                    except (KeyboardInterrupt, MemoryError):
                        raise
                    except Exception as exc:  # a defect in kvmpfn itself: report it on one line, keep the findings
                        result.exception = exc
                        msg = f"internal error: {type(exc).__name__}: {exc} (--debug shows the traceback)"
                        raise TraceError(path, line, msg) from None
                    result.events = seq + 1
                    r = rec["result"]
                    counts[r] = counts.get(r, 0) + 1
                    if emit is not None:
                        emit.write(json.dumps(rec, separators=(", ", ": ")) + "\n")
                    if observer is not None and observer.event(seq, line, e, rec):
                        break
                    if seq == check_at:
                        _check_memory(rp, limit, path, line)
                        check_at += CHECK_EVERY
                else:
                    ended = True
                if stop[0]:
                    raise KeyboardInterrupt
            if ended:
                rp.recorded.finish()
                if reader.header.teardown and not rp.torn_down:
                    _check_memory(rp, limit, path, rp.findings.line or reader.header_line)
                    rp.findings.seq, rp.findings.point = seq + 1, "teardown"
                    implicit_teardown = True
                    try:
                        rp.do_teardown()
                    except KernelBug as bug:
                        kernel_bug_finding(rp.findings, bug)
            result.stats = rp.final_stats if rp.torn_down else rp.stats()
    except TraceError as err:
        result.error = str(err)
    except KeyboardInterrupt:
        result.interrupted = True
        if rp is not None:
            result.stats = rp.stats()
    except MemoryError:
        out_of_memory = True  # leaving this block frees the traceback; dropping rp then frees the VM
    if rp is not None:
        result.findings = rp.findings.items
        if observer is not None and not out_of_memory:
            observer.finish(rp)
    if out_of_memory:
        line = rp.findings.line if rp is not None and rp.findings.line else None
        rp = None
        where = "in the teardown audit after this line" if implicit_teardown else "here"
        result.error = str(TraceError(path, line, f"out of memory {where}; the findings up to here are reported"))
    return result


def _check_memory(rp: Replayer, limit: int, path: str, line: int) -> None:
    """Stop the replay (a :class:`TraceError` at ``line``) once the simulated VM outgrows ``limit`` bytes."""
    reason = over_limit(rp.host, rp.kvm, rp.findings, limit)
    if reason is not None:
        raise TraceError(path, line, reason)
