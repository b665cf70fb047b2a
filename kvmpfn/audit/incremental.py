"""The incremental audit: at each audit point (``--audit-every``, ``--paranoid``, ``--kernel-audit``) check only
what changed since the previous point, and report exactly what a full audit there would report.

A full audit reports a finding the first time its condition holds (findings are deduplicated by code and
subject). Every check reads a known part of the state, so its verdicts can change only where that part
changed; re-checking more than changed is harmless (the finding is a duplicate or still absent), checking
less is not. :class:`Changes` records what changed, from a few hooks where state changes:

- ``sp.spt`` of every shadow page is a :class:`TrackedSpt` (installed by ``kvm_mmu_alloc_page``'s
  ``on_new_page``): every spte store that changes a value is recorded with the value it replaced;
- ``sp.parent_ptes`` is a :class:`TrackedParents`: parent links added or removed;
- ``kvm_mmu_zap_page`` (``on_zap_page``): pages zapped (freed, or invalid roots);
- the ledger's hooks (the pfn API, ``rmap_add``, ``rmap_remove``): frames whose references changed, rmap
  heads that changed;
- the replayer: guest memory written (``write``/``pte_write``), and events that change the VM as a whole
  (CR3, paging mode, memslots, dirty logging, host remaps), after which the next point is a full audit.

Each check then declares what it depends on (:meth:`IncrementalAudit.audit`): the frames for I1, the sptes
and rmap heads for the rmap check, the shadowed gfns for write protection, the changed entries and the
entries whose guest walk read a guest pte stored to for ``audit_mappings`` (found through the
pointers that reach each shadow page from a root), the pages and parent links for I3, the changed leaves for
I7 and I14; write counts and page accounting are compared with their previous values and re-checked when
they moved. Indexes kept across points: who points at each shadow page, a mirror of the rmaps (which heads
name each spte), which entries' checks read which guest pte, the mapping checks' guest walks (:class:`WalkMemo`,
dropped per guest pte stored) and where the kept roots reach each shadow page (dropped when an entry naming a
shadow page changes or a page comes or goes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import cast

from mypy_extensions import mypyc_attr

from kvmpfn.audit.checks import (
    GuestView,
    MappingEntry,
    RootKey,
    audit_mapping,
    audit_mappings,
    audit_mappings_page,
    canonicalize,
    check_accounting,
    check_leaf_dirty,
    check_leaf_memslot,
    check_parent_entry,
    check_parent_pointer,
    check_refcount,
    check_rmap_count,
    check_rmap_entry,
    check_write_count,
    check_write_protected,
    live_leaf,
    mapping_roots,
)
from kvmpfn.audit.findings import Findings
from kvmpfn.audit.ledger import RefLedger
from kvmpfn.kvm.rmap import rmap_entries
from kvmpfn.kvm.spte import NOTRAP, TRAP, spte_to_pfn
from kvmpfn.kvm.vm import Kvm, KvmMmuPage, Sptep, Vcpu
from kvmpfn.kvm.walker import GuestCpu, GuestWalker
from kvmpfn.x86 import KVM_PAGES_PER_HPAGE, PAGE_SHIFT, PT_ACCESSED_MASK, PT_PAGE_SIZE_MASK

#: an rmap head: (large, key)
RmapKey = tuple[int, int]
#: what identifies a root's mappings audit (:meth:`IncrementalAudit._ident`)
Ident = tuple[int, tuple[int, ...]] | tuple[RootKey, int]
#: where ``audit_mappings`` starts: (vcpu, root page, va, level)
Root = tuple[Vcpu, KvmMmuPage, int, int]
#: the value each changed spte held at the previous audit point
Stores = dict[Sptep, int]
#: shadow page -> (vcpu, va, level) where audit_mappings reaches it from given roots
Positions = dict[KvmMmuPage, list[tuple[Vcpu, int, int]]]

_set = list.__setitem__
_get = list.__getitem__


class Changes:
    """What changed since the last audit point (see the module docstring)."""

    def __init__(self) -> None:
        self.everything = True  # the first point is a full audit
        self.stores: dict[Sptep, int] = {}
        self.pages: set[KvmMmuPage] = set()  # created or zapped
        self.parent_pages: set[KvmMmuPage] = set()  # parent list changed
        self.parent_links: set[Sptep] = set()  # (psp, index) added to or removed from a parent list
        self.pfns: set[int] = set()  # references taken, released, bound or unbound
        self.rmap_keys: set[tuple[int, int]] = set()  # (large, key) heads that may have changed
        self.rmapped: set[Sptep] = set()  # sptes rmap_add or rmap_remove handled
        self.stored: set[tuple[int, int]] = set()  # (gpa, bytes) of each guest store

    def any(self) -> bool:
        return bool(
            self.everything
            or self.stores
            or self.pages
            or self.parent_pages
            or self.pfns
            or self.rmap_keys
            or self.rmapped
        )

    def drain(self) -> Changes:
        """What changed, as a new object; this one starts over empty (the tracked lists keep pointing here)."""
        out = Changes()
        out.everything, out.stores, out.pages, out.parent_pages = (
            self.everything,
            self.stores,
            self.pages,
            self.parent_pages,
        )
        out.parent_links, out.pfns, out.rmap_keys = self.parent_links, self.pfns, self.rmap_keys
        out.rmapped, out.stored = self.rmapped, self.stored
        self.everything = False
        self.stores, self.pages, self.parent_pages, self.parent_links = {}, set(), set(), set()
        self.pfns, self.rmap_keys, self.rmapped, self.stored = set(), set(), set(), set()
        return out

    def guest_write(self, gpa: int, nbytes: int) -> None:
        """The guest stored ``nbytes`` at ``gpa``."""
        self.stored.add((gpa, nbytes))

    def new_page(self, sp: KvmMmuPage) -> None:
        """``kvm_mmu_alloc_page``: track the new page's sptes and parent links."""
        spt = TrackedSpt(sp.spt)
        spt.sp, spt.changes = sp, self
        sp.spt = spt
        parents = TrackedParents(sp.parent_ptes)
        parents.sp, parents.changes = sp, self
        sp.parent_ptes = parents
        self.pages.add(sp)

    def zap_page(self, sp: KvmMmuPage) -> None:
        self.pages.add(sp)

    def rmap_changed(self, sptep: Sptep) -> None:
        self.rmapped.add(sptep)
        gfn = sptep[0].gfns[sptep[1]]
        self.rmap_keys.add((0, gfn))
        self.rmap_keys.add((1, gfn // KVM_PAGES_PER_HPAGE))


@mypyc_attr(native_class=False)  # compiled, a list subclass must stay a Python class
class TrackedSpt(list[int]):
    """``sp.spt`` that records each store changing an entry: ``changes.stores[(sp, index)]`` is the value
    the first store since the last audit point replaced. A store that only sets or clears the A bit of a
    present spte (the CPU's, on every first use of an spte) is not recorded: no check reads that bit, and an
    ``old`` value differing from the true one in A alone is read as the same (frame, flags, present)."""

    __slots__ = ("sp", "changes")
    sp: KvmMmuPage
    changes: Changes

    # the MMU stores one entry at a time, never a slice
    def __setitem__(self, index: int, value: int) -> None:  # type: ignore[override]
        old = _get(self, index)
        if old != value:
            if old ^ value != PT_ACCESSED_MASK or old == TRAP or old == NOTRAP or value == TRAP or value == NOTRAP:
                key = (self.sp, index)
                stores = self.changes.stores
                if key not in stores:
                    stores[key] = old
            _set(self, index, value)


@mypyc_attr(native_class=False)
class TrackedParents(list[Sptep]):
    """``sp.parent_ptes`` that records the parent links added and removed."""

    __slots__ = ("sp", "changes")
    sp: KvmMmuPage
    changes: Changes

    def append(self, parent_pte: Sptep) -> None:
        self.changes.parent_pages.add(self.sp)
        self.changes.parent_links.add(parent_pte)
        list.append(self, parent_pte)

    def remove(self, parent_pte: Sptep) -> None:
        self.changes.parent_pages.add(self.sp)
        self.changes.parent_links.add(parent_pte)
        list.remove(self, parent_pte)


def attach(kvm: Kvm, ledger: RefLedger) -> Changes:
    """Install the change hooks on ``kvm`` (before any shadow page exists) around the ledger's."""
    changes = Changes()
    hook, rmap_add, rmap_remove = ledger.hook, ledger.rmap_add, ledger.rmap_remove

    def api_hook(op: str, pfn: int, function: str, caller: str) -> None:
        if op != "accessed":
            changes.pfns.add(pfn)
        hook(op, pfn, function, caller)

    def on_rmap_add(sptep: Sptep, pfn: int) -> None:
        changes.pfns.add(pfn)
        changes.rmap_changed(sptep)
        rmap_add(sptep, pfn)

    def on_rmap_remove(sptep: Sptep, pfn: int, spte: int) -> None:
        changes.pfns.add(pfn)
        changes.rmap_changed(sptep)
        rmap_remove(sptep, pfn, spte)

    kvm.api.hook = api_hook
    kvm.on_rmap_add = on_rmap_add
    kvm.on_rmap_remove = on_rmap_remove
    kvm.on_new_page = changes.new_page
    kvm.on_zap_page = changes.zap_page
    return changes


NO_FRAMES: frozenset[int] = frozenset()
MAX_ABSENT = 64  # roots remembered while a CR3 switch took them away
MAX_WALKS = 1 << 16  # guest walks kept across audit points (all forgotten beyond)

#: what a guest walk depends on besides guest memory: the vcpu's paging state (GuestCpu's fields)
WalkKey = tuple[object, ...]
#: a guest walk's answer, as GuestView.walk gives it
Walk = tuple[bool, GuestWalker | None]


def walk_key(cpu: GuestCpu) -> WalkKey:
    """The paging state a walk of ``cpu`` reads (:func:`kvmpfn.kvm.walker.walk_addr`: CR3, the PDPTE registers,
    CR0.WP, EFER.NX, CR4.PSE/SMEP/SMAP, MAXPHYADDR, 1 GiB pages)."""
    pdptrs = None if cpu.pdptrs is None else tuple(cpu.pdptrs)
    return (cpu.paging, cpu.cr3, pdptrs, cpu.cr0_wp, cpu.efer_nx, cpu.cr4_pse, cpu.cr4_smep, cpu.cr4_smap) + (
        cpu.maxphyaddr,
        cpu.gbpages,
    )


class WalkMemo:
    """The audit's guest walks, kept across audit points: per paging state (:func:`walk_key`), page -> walk.
    A walk is forgotten when a guest store overlaps a pte it read (:meth:`forget`; A/D bits, which the MMU's
    walks write without a guest store, change no answer the audit uses: the gfn, the rights, where a walk
    faulted), wholly after a VM-wide change (:meth:`clear`: paging mode, memslots, host remaps) and beyond
    ``MAX_WALKS`` walks."""

    def __init__(self) -> None:
        self.walks: dict[WalkKey, dict[int, Walk]] = {}
        self.watch: dict[int, set[tuple[WalkKey, int]]] = {}  # pte gpa -> (key, page) of the walks that read it
        self.size = 0

    def clear(self) -> None:
        self.walks, self.watch, self.size = {}, {}, 0

    def forget(self, gpa: int, nbytes: int) -> None:
        """A guest store of ``nbytes`` at ``gpa``: forget every walk that read a pte it overlapped."""
        watch, walks = self.watch, self.walks
        for pte_gpa in range(gpa & ~7, gpa + nbytes, 4):
            for key, page in watch.pop(pte_gpa, ()):
                if walks[key].pop(page, None) is not None:  # a key is in walks while a watch names it
                    self.size -= 1

    def view(self, kvm: Kvm, vcpu: Vcpu, reads: dict[int, set[MappingEntry]]) -> GuestView:
        """A guest view of ``vcpu`` that reads and fills the memo."""
        if self.size >= MAX_WALKS:
            self.clear()
        key = walk_key(vcpu.cpu)
        walks = self.walks.get(key)
        if walks is None:
            walks = self.walks[key] = {}
        return KeptView(kvm, vcpu, reads, self, key, walks)


class KeptView(GuestView):
    """A :class:`GuestView` whose walks are kept in a :class:`WalkMemo`, each watched through the ptes it read."""

    def __init__(
        self,
        kvm: Kvm,
        vcpu: Vcpu,
        reads: dict[int, set[MappingEntry]],
        memo: WalkMemo,
        key: WalkKey,
        walks: dict[int, Walk],
    ) -> None:
        super().__init__(kvm, vcpu, reads)
        self.cache = walks
        self.memo, self.key = memo, key

    def walk_page(self, va: int) -> Walk:
        hit = super().walk_page(va)
        memo = self.memo
        memo.size += 1
        if hit[1] is not None:
            item = (self.key, va >> PAGE_SHIFT)
            watch = memo.watch
            for pte_gpa in hit[1].pte_gpa:
                names = watch.get(pte_gpa)
                if names is None:
                    watch[pte_gpa] = {item}
                else:
                    names.add(item)
        return hit


def _is_pointer(ent: int, level: int) -> bool:
    """How ``audit_mappings_page`` treats entry ``ent`` reached at ``level``: a pointer to follow."""
    return level > 1 and ent != TRAP and ent != NOTRAP and not (ent & PT_PAGE_SIZE_MASK and level == 2)


class IncrementalAudit:
    """The audit points of one VM: :meth:`audit` checks what :class:`Changes` recorded."""

    def __init__(
        self,
        kvm: Kvm,
        ledger: RefLedger,
        findings: Findings,
        full_audit: Callable[[str, Counter[int] | None, bool, dict[int, set[MappingEntry]] | None], None],
    ) -> None:
        self.kvm = kvm
        self.full_audit = full_audit  # Auditor.full_audit(point, in_flight, mappings, reads)
        self.ledger = ledger
        self.findings = findings
        self.changes = attach(kvm, ledger)
        self.pointed_by: dict[int, set[Sptep]] = {}  # shadow page hpa -> (sp, index) entries whose value names it
        self.rmap_mirror: dict[RmapKey, tuple[Sptep, ...]] = {}  # (large, key) -> the head's entries
        self.rmap_where: dict[Sptep, Counter[RmapKey]] = {}  # sptep -> (large, key) -> times it is listed there
        self.reads: dict[int, set[MappingEntry]] = {}  # guest pte gpa -> mapping checks whose walk read that pte
        self.walks = WalkMemo()  # the mapping checks' guest walks
        # where the roots audited at consecutive points reach each page (kept while no pointer names a page
        # differently and no page comes or goes), and those roots, as (vcpu_id, page id, va, level)
        self.positions: Positions = {}
        self.kept: list[tuple[int, int, int, int]] = []
        self.kept_roots: list[Root] = []
        self.mapped: list[tuple[object, ...]] | None = None  # _mapping_state at the last mappings check
        # _mapping_state when _mappings last found kept_roots (None: since then a full audit, or a page came or went)
        self.kept_state: list[tuple[object, ...]] | None = None
        self.roots: list[tuple[int, ...]] | None = None  # the vcpus' roots and CR3 at the last audit point
        self.idents: set[Ident] | None = None  # the roots the last mappings check audited (None: audit them all)
        # roots audited before and gone since: what changed meanwhile
        self.absent: dict[Ident, tuple[Stores, set[tuple[int, int]]]] = {}
        self.structural = Changes()  # pages and rmap heads changed since the last structure_changes()
        self.deferred: Stores = {}  # stores not yet seen by a mappings check ("pre pte write")
        self.deferred_stored: set[tuple[int, int]] = set()
        self.in_flight: set[int] | frozenset[int] = set()  # frames with an allowance at the previous point
        self.counters: tuple[int, int] | None = None
        self.write_counts: list[tuple[int, dict[int, int]]] | None = None

    # -- indexes -----------------------------------------------------------------------------------------------

    def _index(self, ch: Changes) -> tuple[set[Sptep], set[RmapKey]]:
        """Bring the indexes up to date with ``ch``; returns the sptes whose rmap heads changed, and the heads
        whose entries changed."""
        pointed_by = self.pointed_by
        page_header = self.kvm.page_header
        repointed = bool(ch.pages)  # a page came or went, or an entry that names a page changed
        for (sp, index), old in ch.stores.items():
            sptep = (sp, index)
            if old != TRAP and old != NOTRAP:
                names = pointed_by.get(spte_to_pfn(old))
                if names is not None and sptep in names:
                    names.discard(sptep)
                    repointed = True
            new = sp.spt[index]
            if new != TRAP and new != NOTRAP and spte_to_pfn(new) in page_header:
                pointed_by.setdefault(spte_to_pfn(new), set()).add(sptep)
                repointed = True
        if repointed:
            self.positions = {}
        moved: set[Sptep] = set()
        changed: set[RmapKey] = set()
        mirror, where = self.rmap_mirror, self.rmap_where
        tables = (self.kvm.rmap, self.kvm.rmap_pde)
        for head in ch.rmap_keys:
            large, key = head
            new_entries = tuple(rmap_entries(tables[large], key))
            old_entries = mirror.get(head, ())
            if new_entries == old_entries:
                continue
            changed.add(head)
            for sptep in old_entries:
                c = where[sptep]
                c[head] -= 1
                if not c[head]:
                    del c[head]
                    if not c:
                        del where[sptep]
                moved.add(sptep)
            for sptep in new_entries:
                where.setdefault(sptep, Counter())[head] += 1
                moved.add(sptep)
            if new_entries:
                mirror[head] = new_entries
            else:
                mirror.pop(head, None)
        return moved, changed

    # -- the audit point ---------------------------------------------------------------------------------------

    def audit(self, in_flight: Counter[int], mappings: bool, point: str) -> None:
        """One audit point: a full audit the first time and after a VM-wide change, else what changed."""
        kvm = self.kvm
        roots = [(v.vcpu_id, v.root_hpa, v.cpu.cr3, *v.pae_root) for v in kvm.vcpus.values()]
        flight = set(in_flight) if in_flight else NO_FRAMES
        stale = mappings and self.idents is None
        if not self.changes.any() and roots == self.roots and flight == self.in_flight and not stale:
            return
        ch = self.changes.drain()
        if ch.everything or ch.pages:
            self.kept_state = None
        if ch.everything:
            self.walks.clear()
            self.positions = {}
        else:
            for gpa, nbytes in ch.stored:
                self.walks.forget(gpa, nbytes)
        moved, heads = self._index(ch)
        st = self.structural
        st.everything = st.everything or ch.everything
        st.pages |= ch.pages | ch.parent_pages | {sp for sp, _ in ch.stores} | {sp for sp, _ in ch.parent_links}
        st.rmap_keys |= ch.rmap_keys
        if ch.everything:
            self.reads, self.absent = {}, {}
            self.full_audit(point, in_flight, mappings, self.reads if mappings else None)
            self._after_full(mappings, roots, flight)
            return
        self._incremental(ch, moved, heads, in_flight, flight, mappings, roots)

    def structure_changes(self) -> Changes:
        """The pages and rmap heads changed since the last call (``--paranoid``'s structure check)."""
        out, self.structural = self.structural, Changes()
        self.structural.everything = False
        return out

    def _after_full(self, mappings: bool, roots: list[tuple[int, ...]], flight: set[int] | frozenset[int]) -> None:
        self.roots = roots
        self.in_flight = flight
        self.idents = {self._ident(r[0], r[1]) for r in mapping_roots(self.kvm)} if mappings else None
        if mappings:
            self.deferred, self.deferred_stored = {}, set()
            self.mapped = _mapping_state(self.kvm)
        self.kept_state = None
        kvm = self.kvm
        self.counters = (kvm.n_alloc_mmu_pages, kvm.n_free_mmu_pages)
        self.write_counts = [(s.slot, dict(s.write_count)) for s in kvm.slots.values()]

    def _incremental(
        self,
        ch: Changes,
        moved: set[Sptep],
        heads: set[RmapKey],
        in_flight: Counter[int],
        flight: set[int] | frozenset[int],
        mappings: bool,
        roots: list[tuple[int, ...]],
    ) -> None:
        kvm, f, ledger = self.kvm, self.findings, self.ledger
        active, page_header = kvm.active_mmu_pages, kvm.page_header
        dead = [sp for sp in ch.pages if active.get(sp.id) is not sp]
        # the sptes whose value, rmap heads or page liveness changed
        dirty: set[Sptep] = set(ch.stores) | moved | ch.rmapped
        pfns = set(ch.pfns) | flight | self.in_flight
        children: set[KvmMmuPage | None] = set()  # pages a changed pointer named before or names now
        for (sp, index), old in ch.stores.items():
            pfns.add(spte_to_pfn(old))
            new = sp.spt[index]
            pfns.add(spte_to_pfn(new))
            children.add(page_header.get(spte_to_pfn(old)))
            children.add(page_header.get(spte_to_pfn(new)))
        pointers_into_dead: set[Sptep] = set()
        for sp in dead:
            for index, ent in enumerate(sp.spt):
                if ent != TRAP and ent != NOTRAP:
                    dirty.add((sp, index))
                    pfns.add(spte_to_pfn(ent))
                    children.add(page_header.get(spte_to_pfn(ent)))
            pointers_into_dead |= self.pointed_by.get(sp.hpa, set())
        self.in_flight = flight

        # I1, for the frames whose references, owners or owning sptes changed
        refs = ledger.refs
        for pfn in sorted(pfns):
            if pfn in refs:
                check_refcount(kvm, ledger, f, pfn, in_flight.get(pfn, 0))

        # rmaps: the entries of changed heads and of changed sptes, then the count of each changed leaf
        where = self.rmap_where
        entries: set[tuple[RmapKey, Sptep]] = set()
        for head in ch.rmap_keys:
            for sptep in self.rmap_mirror.get(head, ()):
                entries.add((head, sptep))
        for sptep in dirty:
            for head in where.get(sptep, ()):
                entries.add((head, sptep))
        for (large, key), sptep in sorted(entries, key=_entry_order):
            check_rmap_entry(kvm, f, large, key, sptep)
        leaves = [(sp, index) for sp, index in sorted(dirty, key=_sptep_order) if live_leaf(kvm, sp, index)]
        for sp, index in leaves:
            c = where.get((sp, index))
            check_rmap_count(f, sp, index, sum(c.values()) if c else 0)

        # write protection: the gfns of changed pages, of heads whose entries changed, and of changed sptes' heads
        # (a head named in ch.rmap_keys whose entries and their sptes are the same judges the same)
        for sptep in dirty:
            heads.update(where.get(sptep, ()))
        gfns = {sp.gfn for sp in ch.pages}
        regions: set[int] = set()
        for large, key in heads:
            if large:
                regions.add(key)
            else:
                gfns.add(key)
        if regions:
            gfns.update(g for g in kvm.mmu_page_hash if g // KVM_PAGES_PER_HPAGE in regions)
        for gfn in sorted(gfns):
            for sp in kvm.mmu_page_hash.get(gfn, ()):
                if active.get(sp.id) is sp:
                    check_write_protected(kvm, f, sp)

        # audit_mappings
        for sptep, old in ch.stores.items():
            self.deferred.setdefault(sptep, old)
        for sp, index in ch.rmapped:
            self.deferred.setdefault((sp, index), sp.spt[index])  # sp.gfns[index] may have changed
        self.deferred_stored |= ch.stored
        self.roots = roots
        if mappings:
            mapped = _mapping_state(kvm)
            if self.idents is None:
                self.reads, self.absent, self.kept_state = {}, {}, None
                audit_mappings(kvm, f, self.reads)
                self.idents = {self._ident(r[0], r[1]) for r in mapping_roots(kvm)}
            elif self.deferred or self.deferred_stored or mapped != self.mapped:  # else nothing to check
                self._mappings(self.deferred, self.deferred_stored, mapped)
            self.deferred, self.deferred_stored = {}, set()
            self.mapped = mapped

        # I3: changed pointers, pointers into zapped pages, and the parent lists of pages they name
        pointers = {sptep for sptep in ch.stores if sptep[0].level > 1} | ch.parent_links | pointers_into_dead
        for sp, index in sorted(pointers, key=_sptep_order) if pointers else ():
            if sp.level > 1 and active.get(sp.id) is sp:
                check_parent_pointer(kvm, f, sp, index, sp.spt[index])
        children |= ch.parent_pages
        children |= ch.pages
        children.discard(None)
        for sp in sorted(cast("set[KvmMmuPage]", children), key=_page_order) if children else ():  # None discarded
            if active.get(sp.id) is sp:
                for psp, pindex in sp.parent_ptes:
                    check_parent_entry(kvm, f, sp, psp, pindex)

        # I7 and I14 for the changed leaves (found by the rmap check; no check changes the MMU)
        for sp, index in leaves:
            check_leaf_memslot(kvm, f, sp, index, sp.spt[index])

        # I8 and I13: re-checked when a page came or went, or the counts moved
        write_counts = [(s.slot, s.write_count) for s in kvm.slots.values()]
        if ch.pages or write_counts != self.write_counts:
            check_write_count(kvm, f)
            self.write_counts = [(slot, dict(wc)) for slot, wc in write_counts]
        counters = (kvm.n_alloc_mmu_pages, kvm.n_free_mmu_pages)
        if ch.pages or counters != self.counters:
            check_accounting(kvm, f)
            self.counters = counters

        for sp, index in leaves:
            check_leaf_dirty(kvm, f, sp, index, sp.spt[index])

    def _ident(self, key: RootKey, vcpu: Vcpu) -> Ident:
        """What identifies a root's audit: its key and the vcpu whose view audits it (under TDP, where no guest
        view is used, the root alone)."""
        return key[3:] if self.kvm.tdp_enabled else (key, vcpu.vcpu_id)

    def _mappings(self, stores: Stores, stored: set[tuple[int, int]], mapped: list[tuple[object, ...]]) -> None:
        """``audit_mappings`` for what changed: the roots audited at the previous point (:meth:`_recheck`), a
        root audited before a CR3 switch took it away, with what changed while it was away (up to
        ``MAX_ABSENT`` roots are remembered), and the whole tree of any other root. ``mapped``: the
        :func:`_mapping_state`; the same as when the roots were last found (and no page came or went since),
        the roots are those."""
        absent = self.absent
        if mapped == self.kept_state:
            for a_stores, a_stored in absent.values():
                for sptep, old in stores.items():
                    a_stores.setdefault(sptep, old)
                a_stored |= stored
            self._recheck({}, self.kept_roots, stores, stored, self.positions)
            return
        kvm, f = self.kvm, self.findings
        idents = cast("set[Ident]", self.idents)  # the caller's test
        all_roots = mapping_roots(kvm)
        by_ident: dict[Ident, list[Root]] = {}
        for key, vcpu, sp, va, level in all_roots:
            by_ident.setdefault(self._ident(key, vcpu), []).append((vcpu, sp, va, level))
        for ident in idents - by_ident.keys():
            absent[ident] = ({}, set())
            if len(absent) > MAX_ABSENT:
                del absent[next(iter(absent))]
        for ident, (a_stores, a_stored) in absent.items():
            if ident not in by_ident:
                for sptep, old in stores.items():
                    a_stores.setdefault(sptep, old)
                a_stored |= stored
        views: dict[int, GuestView] = {}
        kept = [root for ident, roots in by_ident.items() if ident in idents for root in roots]
        signature = [(vcpu.vcpu_id, sp.id, va, level) for vcpu, sp, va, level in kept]
        if signature != self.kept:
            self.kept, self.positions = signature, {}
        self._recheck(views, kept, stores, stored, self.positions)
        for ident, roots in by_ident.items():
            if ident in idents:
                continue
            away = absent.pop(ident, None)
            if away is not None:
                a_stores, a_stored = away
                for sptep, old in stores.items():
                    a_stores.setdefault(sptep, old)
                self._recheck(views, roots, a_stores, a_stored | stored)
            else:
                for vcpu, sp, va, level in roots:
                    audit_mappings_page(kvm, f, self._view(views, vcpu), sp, va, level)
        self.idents = set(by_ident)
        # every root found is audited now: the next point's kept roots, unless the mapping state moves
        kept = [root for roots in by_ident.values() for root in roots]
        signature = [(vcpu.vcpu_id, sp.id, va, level) for vcpu, sp, va, level in kept]
        if signature != self.kept:
            self.kept, self.positions = signature, {}
        self.kept_roots, self.kept_state = kept, mapped

    def _positions(self, sp: KvmMmuPage, roots: list[Root], cache: Positions) -> list[tuple[Vcpu, int, int]]:
        """``(vcpu, va, level)`` where ``audit_mappings`` reaches ``sp`` from ``roots`` now, climbing the pointers
        that name it (``pointed_by``); ``cache`` holds the answers found so far."""
        out = cache.get(sp)
        if out is not None:
            return out
        cache[sp] = out = []
        for vcpu, root, va, level in roots:
            if root is sp:
                out.append((vcpu, va, level))
        page_header = self.kvm.page_header
        for psp, pindex in self.pointed_by.get(sp.hpa, ()):
            ent = psp.spt[pindex]
            if ent == TRAP or ent == NOTRAP or page_header.get(spte_to_pfn(ent)) is not sp:
                continue
            for vcpu, va, level in self._positions(psp, roots, cache):
                if _is_pointer(ent, level):
                    shift = PAGE_SHIFT + 9 * (level - 1)
                    out.append((vcpu, canonicalize(va + (pindex << shift)), level - 1))
        return out

    def _recheck(
        self,
        views: dict[int, GuestView],
        roots: list[Root],
        stores: Stores,
        stored: set[tuple[int, int]],
        cache: Positions | None = None,
    ) -> None:
        """``audit_mappings`` from ``roots`` for the changed entries (and the subtrees a changed pointer now
        reaches), the entries shadowing a guest pte stored to, and the entries whose last check walked through
        a guest pte stored to since. ``cache``: positions kept from earlier points for these roots."""
        kvm, f = self.kvm, self.findings
        page_header = kvm.page_header
        reads = self.reads
        found: Positions = {} if cache is None else cache

        def positions(sp: KvmMmuPage) -> list[tuple[Vcpu, int, int]]:
            return self._positions(sp, roots, found)

        # the entries whose last check walked through a pte a store overlapped (a walk reads 4- or 8-byte ptes),
        # taken out first: checking an entry records its reads again
        stale = [(key, reads.pop(key, ())) for key in sorted({k for g, n in stored for k in range(g & ~7, g + n, 4)})]
        done: set[MappingEntry] = set()  # each entry is checked once per point, whichever way it was reached
        for (sp, index), old in sorted(stores.items(), key=_store_order):
            ent = sp.spt[index]
            if ent == TRAP:
                continue
            for vcpu, va, level in positions(sp):
                addr = canonicalize(va + (index << (PAGE_SHIFT + 9 * (level - 1))))
                view = self._view(views, vcpu)
                done.add((sp, index, vcpu.vcpu_id, addr, level))
                child = audit_mapping(kvm, f, view, sp, index, ent, addr, level, None)
                if child is not None:
                    before = page_header.get(spte_to_pfn(old)) if _is_pointer(old, level) else None
                    if before is not child:
                        audit_mappings_page(kvm, f, view, child, addr, level - 1)
        # the entries shadowing a guest pte that was stored to (a notrap entry's check reads that pte)
        shadowed: dict[Sptep, None] = {}
        for gpa, nbytes in sorted(stored):
            for sp in kvm.mmu_page_hash.get(gpa >> PAGE_SHIFT, ()):
                if not sp.metaphysical and kvm.active_mmu_pages.get(sp.id) is sp:
                    for index in shadow_indices(sp, gpa & 0xFFF, nbytes):
                        shadowed[(sp, index)] = None
        for sp, index in shadowed:
            ent = sp.spt[index]
            if ent == TRAP:
                continue
            for vcpu, va, level in positions(sp):
                addr = canonicalize(va + (index << (PAGE_SHIFT + 9 * (level - 1))))
                entry = (sp, index, vcpu.vcpu_id, addr, level)
                if entry not in done:
                    done.add(entry)
                    audit_mapping(kvm, f, self._view(views, vcpu), sp, index, ent, addr, level, None)
        for key, entries in stale:
            unseen: list[MappingEntry] = []  # reached from no root here: kept for a root that may come back
            for entry in sorted(entries, key=_read_order):
                sp, index, vcpu_id, addr, level = entry
                ent = sp.spt[index]
                for vcpu, va, at in positions(sp):
                    if (
                        at == level
                        and vcpu.vcpu_id == vcpu_id
                        and canonicalize(va + (index << (PAGE_SHIFT + 9 * (level - 1)))) == addr
                    ):
                        if ent != TRAP and entry not in done:
                            done.add(entry)
                            audit_mapping(kvm, f, self._view(views, vcpu), sp, index, ent, addr, level, None)
                        break
                else:
                    if kvm.active_mmu_pages.get(sp.id) is sp:
                        unseen.append(entry)
            if unseen:
                reads.setdefault(key, set()).update(unseen)

    def _view(self, views: dict[int, GuestView], vcpu: Vcpu) -> GuestView:
        """The audit point's guest view of ``vcpu`` (one per vcpu, its walks kept in the memo)."""
        view = views.get(vcpu.vcpu_id)
        if view is None:
            view = views[vcpu.vcpu_id] = self.walks.view(self.kvm, vcpu, self.reads)
        return view


def _mapping_state(kvm: Kvm) -> list[tuple[object, ...]]:
    """What :func:`mapping_roots` derives the audited roots from: equal at two points, the same roots are audited."""
    return [(v.vcpu_id, v.cpu.paging, v.cpu.cr3, v.cpu.cr0_wp, v.root_hpa, *v.pae_root) for v in kvm.vcpus.values()]


def shadow_indices(sp: KvmMmuPage, offset: int, nbytes: int) -> range:
    """The entries of ``sp`` that shadow the guest ptes a store of ``nbytes`` at ``offset`` in its guest table
    touched (a 32-bit guest's table in quadrants: see :func:`guest_entry_present`)."""
    if sp.glevels != 2:
        return range(offset // 8, (offset + nbytes - 1) // 8 + 1)
    first, last = offset // 4, (offset + nbytes - 1) // 4
    if sp.level == 1:
        base = sp.quadrant << 9
        return range(max(first - base, 0), min(last - base, 511) + 1)
    base = sp.quadrant << 8
    return range(max(2 * (first - base), 0), min(2 * (last - base) + 1, 511) + 1)


def _sptep_order(sptep: Sptep) -> tuple[int, int]:
    return sptep[0].id, sptep[1]


def _page_order(sp: KvmMmuPage) -> int:
    return sp.id


def _entry_order(entry: tuple[RmapKey, Sptep]) -> tuple[int, int, int, int]:
    (large, key), (sp, index) = entry
    return large, key, sp.id, index


def _store_order(item: tuple[Sptep, int]) -> tuple[int, int]:
    return item[0][0].id, item[0][1]


def _read_order(entry: MappingEntry) -> tuple[int, int, int, int, int]:
    return entry[0].id, entry[1], entry[2], entry[3], entry[4]
