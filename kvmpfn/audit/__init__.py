"""The auditor: the reference ledger plus the ported audit checks, run at audit points (docs/kernel.md, The audit;
docs/kernel.md, Invariants), and the notifier check (docs/kernel.md, Invariants: I10) after each ``kvm_unmap_hva``."""

from __future__ import annotations

from collections import Counter

from kvmpfn.audit.checks import (
    MappingEntry,
    audit_mappings,
    audit_rmap,
    audit_write_protection,
    check_accounting,
    check_dirty_log,
    check_memslots,
    check_parent_links,
    check_refcounts,
    check_unmapped_hva,
    check_write_count,
)
from kvmpfn.audit.findings import CODES, Findings
from kvmpfn.audit.incremental import IncrementalAudit
from kvmpfn.audit.ledger import RefLedger
from kvmpfn.kvm.vm import Kvm, Vcpu

__all__ = ["CODES", "Auditor", "Findings", "RefLedger"]

NO_FLIGHT: Counter[int] = Counter()  # no reference in flight (shared, never changed)


class Auditor:
    """Attaches a ledger to the pfn API and the rmap, checks each ``kvm_unmap_hva``, and runs ``kvm_mmu_audit``
    at the points asked for: :meth:`audit_point` checks what changed since the previous point when
    ``incremental`` (see :mod:`kvmpfn.audit.incremental`), else everything."""

    def __init__(self, kvm: Kvm, *, kernel_points: bool = False, incremental: bool = False) -> None:
        self.kvm = kvm
        self.findings = Findings()
        self.ledger = RefLedger(kvm.host, self.findings)
        self.findings.ledger = self.ledger
        kvm.api.hook = self.ledger.hook
        kvm.on_rmap_add = self.ledger.rmap_add
        kvm.on_rmap_remove = self.ledger.rmap_remove
        kvm.on_write_protect = self.ledger.write_protect
        kvm.on_unmap_hva = self.unmapped_hva
        if kernel_points:
            kvm.audit_point = self.kvm_mmu_audit
        self.incremental = IncrementalAudit(kvm, self.ledger, self.findings, self.full_audit) if incremental else None
        #: what changed since the last audit point (the replayer reports guest stores and VM-wide changes here)
        self.changes = self.incremental.changes if self.incremental is not None else None

    def unmapped_hva(self, hva: int, gfn: int) -> None:
        """After each ``kvm_unmap_hva``: no present leaf maps the gfn behind hva any more (docs/kernel.md, Invariants:
        I10)."""
        check_unmapped_hva(self.kvm, self.ledger, self.findings, hva, gfn)

    def kvm_mmu_audit(self, vcpu: Vcpu, msg: str) -> None:
        """``kvm_mmu_audit(vcpu, msg)`` at the kernel's own points. ``pre pte write`` skips the mapping check
        (guest memory already holds the new pte; v2.6.32 does the same); the ``update_pte`` reference parked
        by ``mmu_guess_page_from_pte_write`` is in flight there."""
        in_flight = NO_FLIGHT
        if msg in ("pre pte write", "post pte write") and not self.kvm.api.is_error_pfn(vcpu.update_pte_pfn):
            in_flight = Counter({vcpu.update_pte_pfn: 1})
        self.audit_point(msg, in_flight, mappings=msg != "pre pte write")

    def audit_point(self, point: str, in_flight: Counter[int] | None = None, mappings: bool = True) -> None:
        """An audit point: what changed since the previous one, or everything when not incremental."""
        if self.incremental is None:
            self.full_audit(point, in_flight, mappings)
            return
        f = self.findings
        saved = f.point
        f.point = point
        self.incremental.audit(in_flight or NO_FLIGHT, mappings, point)
        f.point = saved

    def full_audit(
        self,
        point: str,
        in_flight: Counter[int] | None = None,
        mappings: bool = True,
        reads: dict[int, set[MappingEntry]] | None = None,
    ) -> None:
        """Every check of docs/kernel.md, Invariants over the current state (``reads``: see :func:`audit_mappings`)."""
        kvm, f = self.kvm, self.findings
        saved = f.point
        f.point = point
        check_refcounts(kvm, self.ledger, f, in_flight or Counter())
        audit_rmap(kvm, f)
        audit_write_protection(kvm, f)
        if mappings:
            audit_mappings(kvm, f, reads)
        check_parent_links(kvm, f)
        check_memslots(kvm, f)
        check_write_count(kvm, f)
        check_accounting(kvm, f)
        check_dirty_log(kvm, f)
        f.point = saved

    def after_teardown(self) -> None:
        """Every reference still held after the VM is destroyed is a leak, listed with where it was taken."""
        f = self.findings
        f.point = "teardown"
        for pfn in sorted(self.ledger.refs):
            refs = self.ledger.refs[pfn]
            f.report(
                "refcount-leak",
                f"frame {pfn:#x} still holds {len(refs)} KVM reference(s) after teardown",
                ("pfn", pfn),
                [ref.provenance() for ref in refs],
                pfn=pfn,
            )
