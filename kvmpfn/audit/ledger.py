"""The reference ledger: every reference KVM holds on a host frame, with where it was taken and which spte
owns it. Fed by the pfn API's hook (``get``/``put``/``dirty``/``accessed``) and by ``rmap_add``/``rmap_remove``,
so a leak or an underflow is known without walking the sptes (docs/kernel.md, Invariants: I1 and I14).
"""

from __future__ import annotations

from typing import Any, Protocol

from kvmpfn.host import Host
from kvmpfn.kvm.vm import Sptep
from kvmpfn.x86 import PT_WRITABLE_MASK


class Reporter(Protocol):
    """What the ledger needs of :class:`kvmpfn.audit.findings.Findings` (which imports this module)."""

    seq: int
    line: int

    def report(
        self,
        code: str,
        message: str,
        subject: tuple[object, ...],
        provenance: list[dict[str, Any]] | None = None,
        **fields: Any,
    ) -> bool: ...


class Ref:
    """One reference: taken at event ``seq``/``line`` by ``function`` (the pfn API call) in ``caller``;
    ``owner`` is the ``sptep`` that owns it once ``rmap_add`` bound it, None while in flight."""

    __slots__ = ("seq", "line", "function", "caller", "owner")

    def __init__(self, seq: int, line: int, function: str, caller: str) -> None:
        self.seq = seq
        self.line = line
        self.function = function
        self.caller = caller
        self.owner: Sptep | None = None

    def provenance(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seq": self.seq, "line": self.line, "function": self.function, "caller": self.caller}
        if self.owner is not None:
            sp, index = self.owner
            out["owner"] = f"spte {index} of shadow page gfn {sp.gfn:#x} level {sp.level}"
        return out


class RefLedger:
    """References per pfn. ``put`` releases the reference of the spte being removed when ``rmap_remove`` said
    which, else the newest reference still in flight, else the newest owned one; past zero it is an
    underflow."""

    def __init__(self, host: Host, findings: Reporter) -> None:
        self.host = host
        self.findings = findings
        self.refs: dict[int, list[Ref]] = {}
        self._removing: dict[int, Sptep] = {}  # pfn -> sptep whose reference the next put releases
        self._removed_writable: dict[int, bool] = {}
        self._dirtied: set[int] = set()  # frames marked dirty since rmap_write_protect began

    # -- the pfn API hook ------------------------------------------------------------------------------------

    def hook(self, op: str, pfn: int, function: str, caller: str) -> None:
        frame = self.host.frames.get(pfn)
        f = self.findings
        if frame is not None and not frame.struct_page:
            f.report(
                "pageless-refcount",
                f"{function} ({op}) from {caller} on frame {pfn:#x}, which has no struct page",
                ("pfn", pfn),
                [{"seq": f.seq, "line": f.line, "function": function, "caller": caller}],
                pfn=pfn,
            )
        if op == "dirty":
            self._dirtied.add(pfn)
        elif op == "get":
            self.refs.setdefault(pfn, []).append(Ref(f.seq, f.line, function, caller))
        elif op == "put":
            self._put(pfn, function, caller)

    def _put(self, pfn: int, function: str, caller: str) -> None:
        f = self.findings
        owner = self._removing.pop(pfn, None)
        writable = self._removed_writable.pop(pfn, False)
        if owner is not None and writable and "dirty" not in function:
            f.report(
                "dirty-lost",
                f"writable spte removed by {caller} but frame {pfn:#x} released clean ({function})",
                ("pfn", pfn),
                [{"seq": f.seq, "line": f.line, "function": function, "caller": caller}],
                pfn=pfn,
            )
        refs = self.refs.get(pfn)
        if not refs:
            f.report(
                "refcount-underflow",
                f"{caller} released frame {pfn:#x} ({function}) but KVM holds no reference on it",
                ("pfn", pfn),
                [{"seq": f.seq, "line": f.line, "function": function, "caller": caller}],
                pfn=pfn,
            )
            return
        victim = None
        if owner is not None:
            victim = next((r for r in reversed(refs) if r.owner == owner), None)
        if victim is None:
            victim = next((r for r in reversed(refs) if r.owner is None), None)
        if victim is None:
            victim = refs[-1]
        refs.remove(victim)
        if not refs:
            del self.refs[pfn]

    # -- rmap hooks: ownership -------------------------------------------------------------------------------

    def rmap_add(self, sptep: Sptep, pfn: int) -> None:
        """The spte now owns the newest in-flight reference on its frame."""
        for ref in reversed(self.refs.get(pfn, ())):
            if ref.owner is None:
                ref.owner = sptep
                return

    def rmap_remove(self, sptep: Sptep, pfn: int, spte: int) -> None:
        """The next put on pfn releases the reference this spte owns (dirty expected if it was writable)."""
        if pfn not in self.refs:
            return  # a frame KVM does not refcount (pfn-io device memory), or an underflow to come
        self._removing[pfn] = sptep
        self._removed_writable[pfn] = bool(spte & PT_WRITABLE_MASK)

    def write_protect(self, cleared: set[int] | None) -> None:
        """``rmap_write_protect`` took W from sptes of these frames: each must have been marked dirty, unless it is
        a frame the helpers never dirty (PageReserved, or no struct page): docs/kernel.md, Invariants: I14."""
        if cleared is None:
            self._dirtied.clear()
            return
        f = self.findings
        for pfn in sorted(cleared - self._dirtied):
            frame = self.host.frames.get(pfn)
            if frame is None or frame.reserved or not frame.struct_page:
                continue
            f.report(
                "dirty-lost",
                f"rmap_write_protect cleared W on frame {pfn:#x} without kvm_set_pfn_dirty",
                ("pfn", pfn),
                [{"seq": f.seq, "line": f.line, "function": "rmap_write_protect", "caller": "kvm_mmu_get_page"}],
                pfn=pfn,
            )

    # -- queries ---------------------------------------------------------------------------------------------

    def total(self, pfn: int) -> int:
        return len(self.refs.get(pfn, ()))
