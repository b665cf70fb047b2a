"""Synthetic workloads (``kvmpfn synth``): valid traces of any length, generated event by event.

>>> spec = SynthSpec("steady", events=100_000, seed=1, mmu="tdp")
>>> write_synth("steady.jsonl.zst", spec)                # doctest: +SKIP
100000

A workload is an endless generator of guest actions; :func:`synth_events` takes the first ``events`` of them,
so the trace streams straight into :class:`~kvmpfn.trace.TraceWriter` and the generator's state is bounded by
the guest's size (a few fixed-size tables and bitmaps), never by the trace's length.

Determinism: the random stream is seeded from ``(workload, paging, seed)`` only, so one seed gives the same
bytes every time, and the same guest actions under both MMUs (only the header's ``mmu`` differs): a shadow
and a tdp trace of one seed are a differential pair.

Validity (docs/trace-format.md): the guest builds real page tables in guest memory with ``write`` events before it
touches an address through them; every address lies in a memslot of the header; ``host_remap`` only appears
under ``kernel: notifier`` (before it KVM is not told, which the auditor rightly reports). A correct MMU
replays every synth trace without findings.

Guest layout (4 KiB frames; everything inside the default 256 MiB slot, except ``hugepages``):

=============== =================================================================================
gfn 0x0-0xff    low memory, touched in real mode by ``boot``
gfn 0x100-0x10f root tables: address space 0 at 0x100 (PML4 / PAE PDPT / 32-bit PD), its PDPT at
                0x101 and PD at 0x102 (0x103: the PD of ``hugepages``' small-page window); address
                space 1 (``fork-storm``'s child) at 0x108
gfn 0x200-0x7ff page-table pages (PTs): pools A (0x200), B (0x400) and C (0x600), PT ``i`` at pool + i
gfn 0x1000-     data: 61,440 frames in the default slot (``fork-storm``'s copy-on-write frames: the top
                16,384 of them)
=============== =================================================================================

Guest-virtual pages: ``vpn`` maps at gva ``0x40000000 + vpn * 4096`` (PML4 index 0, PDPT index 1, so one PD
covers the whole 1 GiB window; in 32-bit paging PD entries 256 and up). ``hugepages`` declares two slots: 16 MiB
of RAM at gfn 0 (tables, and 4K data at gfn 0x800-0xfff, mapped at gva 2 GiB) and 128 MiB of hugetlb at gpa
1 GiB (mapped by guest large pages at gva 1 GiB).
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kvmpfn.errors import InputError
from kvmpfn.trace import events as ev
from kvmpfn.trace.writer import TraceWriter

__all__ = [
    "DEFAULT_PAGING",
    "PAGINGS",
    "WORKLOADS",
    "SynthError",
    "SynthSpec",
    "synth_events",
    "synth_header",
    "write_synth",
]

PAGINGS = ("none", "32", "pae", "64")

P, W, U, A, D, PS = 0x1, 0x2, 0x4, 0x20, 0x40, 0x80
PWU = P | W | U
# Linux's x86 protections carry _PAGE_ACCESSED, so a pte is born accessed (and dirty after a write fault); an
# accessed pte is what lets kvm_mmu_pte_write prefetch the new mapping (FNAME(update_pte)).
USER_PTE = PWU | A  # PAGE_SHARED
KERNEL_PTE = P | W | A | D  # PAGE_KERNEL
PAGE = 4096

LOW_PAGES = 0x100
ROOTS = (0x100, 0x108)  # address spaces 0 and 1
POOL_A, POOL_B, POOL_C = 0x200, 0x400, 0x600
DATA_GFN = 0x1000
DATA_PAGES = 0x10000 - DATA_GFN  # the rest of the default 256 MiB slot
GVA_BASE = 0x4000_0000

# fork-storm: copy-on-write copies come from the top 16,384 data frames, cyclically.
COW_GFN = 0xC000
COW_PAGES = 0x10000 - COW_GFN
# hugepages: 16 MiB of small-page RAM (low memory, tables, and 0x800-0xfff as 4K data) and a hugetlb slot in
# the next 1 GiB; guest large pages at gva 1 GiB, the small pages at gva 2 GiB (its PD at ROOTS[0] + 3).
SMALL_SLOT_PAGES = 0x1000
HUGE_GFN = 0x40000
HUGE_PAGES = 0x8000  # 128 MiB: 64 host 2 MiB pages
SMALL_GFN = 0x800
SMALL_PAGES = 0x800
SMALL_BASE = 0x8000_0000
# boot: every pass maps vpn to a gfn shifted by this many frames, so that each pass moves every mapping.
BOOT_STRIDE = 4099


class SynthError(InputError):
    """A workload that cannot be generated with the options given (e.g. fork-storm without paging)."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


@dataclass(frozen=True)
class SynthSpec:
    """What to generate: ``events`` events of ``workload`` for ``mmu``; ``paging`` None is the default."""

    workload: str
    events: int
    seed: int = 0
    mmu: str = "shadow"
    paging: str | None = None

    @property
    def guest_paging(self) -> str:
        return self.paging or DEFAULT_PAGING[self.workload]


def _ws(events: int, cap: int) -> int:
    """A working-set size that suits the trace's length: short traces still spend most events in the loop."""
    return max(64, min(cap, events // 16))


def _access(addr: int, write: bool = False, user: bool = True, fetch: bool = False, vcpu: int = 0) -> ev.Access:
    return ev.Access(addr=addr, write=write, user=user, fetch=fetch, vcpu=vcpu)


class _Space:
    """One guest address space with its page tables at fixed gfns: the top levels at ``root`` (and its PDPT
    at ``root + 1``), the PD of the 1 GiB window at ``base`` at ``pd``, PT ``i`` (mapping vpns
    ``i * per_pt ...`` of the window) at ``pool + i``. ``linked`` maps PD index to the PT gfn it points to."""

    __slots__ = ("paging", "root", "pool", "base", "size", "per_pt", "pd", "pd_first", "large", "cr3", "linked")

    def __init__(self, paging: str, root: int, pool: int, base: int = GVA_BASE, pd: int | None = None) -> None:
        self.paging = paging
        self.root = root
        self.pool = pool
        self.base = base
        if paging == "32":
            self.size, self.per_pt, self.pd, self.pd_first, self.large = 4, 1024, root, base >> 22, 1024
        else:
            self.size, self.per_pt, self.pd = 8, 512, root + 2 if pd is None else pd
            self.pd_first, self.large = (base >> 21) & 511, 512
        self.cr3 = root << 12
        self.linked: dict[int, int] = {}

    def top(self) -> list[ev.Event]:
        """The entries above the PD: PML4E and PDPTE (64-bit), the PDPTE (PAE), none (32-bit)."""
        root, base = self.root, self.base
        if self.paging == "64":
            return [
                ev.Write(gpa=(root << 12) + ((base >> 39) & 511) * 8, val=((root + 1) << 12) | PWU, len=8),
                ev.Write(gpa=((root + 1) << 12) + ((base >> 30) & 511) * 8, val=(self.pd << 12) | PWU, len=8),
            ]
        if self.paging == "pae":  # PDPTE bits 2:1 are reserved: P only
            return [ev.Write(gpa=(root << 12) + (base >> 30) * 8, val=(self.pd << 12) | P, len=8)]
        return []

    def gva(self, vpn: int) -> int:
        return self.base + vpn * PAGE

    def pde(self, index: int, val: int) -> ev.Write:
        """Store PD entry ``index`` (counted from the window's first one)."""
        return ev.Write(gpa=(self.pd << 12) + (self.pd_first + index) * self.size, val=val, len=self.size)

    def pte(self, vpn: int, val: int, op: type = ev.Write) -> list[ev.Event]:
        """Store ``val`` in the pte of ``vpn``, linking its PT into the PD first if it is not yet."""
        index, slot = divmod(vpn, self.per_pt)
        out: list[ev.Event] = []
        pt = self.linked.get(index)
        if pt is None:
            pt = self.linked[index] = self.pool + index
            out.append(self.pde(index, (pt << 12) | PWU))
        out.append(op(gpa=(pt << 12) + slot * self.size, val=val, len=self.size))
        return out

    def map(self, vpn: int, gfn: int, flags: int = USER_PTE, op: type = ev.Write) -> list[ev.Event]:
        return self.pte(vpn, (gfn << 12) | flags, op)


def _clustered(rng: random.Random, count: int, limit: int) -> list[int]:
    """``count`` distinct page numbers below ``limit`` in runs of 8-64 (code, heap and stack regions)."""
    taken = bytearray(limit)
    out: list[int] = []
    while len(out) < count:
        start = rng.randrange(limit)
        for vpn in range(start, min(limit, start + rng.randint(8, 64))):
            if len(out) == count:
                break
            if not taken[vpn]:
                taken[vpn] = 1
                out.append(vpn)
    return out


class _Resident:
    """A bounded resident set over the data window: ``pages[i]`` is a vpn, ``gfns[vpn]`` its frame (at first
    ``DATA_GFN + vpn``); a fifth of the slots are hot and take four accesses in five; every eighth slot is code
    (fetched, never written). Evicted frames go to a free list that new pages take from, oldest first, once
    ``reserve`` frames wait there (the guest's page allocator recycling memory): the frames a trace touches stay
    bounded however long it runs."""

    def __init__(self, rng: random.Random, size: int) -> None:
        self.rng = rng
        self.pages = _clustered(rng, size, DATA_PAGES)
        self.mapped = bytearray(DATA_PAGES)
        self.used = bytearray(DATA_PAGES)  # gfn - DATA_GFN: mapped or waiting in the free list
        self.gfns = {vpn: DATA_GFN + vpn for vpn in self.pages}
        for vpn in self.pages:
            self.mapped[vpn] = self.used[vpn] = 1
        self.hot = max(1, size // 5)
        self.free: deque[int] = deque()
        self.reserve = max(1, size // 8)

    def pick(self) -> int:
        rng = self.rng
        return rng.randrange(self.hot) if rng.random() < 0.8 else rng.randrange(len(self.pages))

    def unmapped(self) -> int:
        return self._unset(self.mapped)

    def unused_gfn(self) -> int:
        """A data gfn no page maps and the free list does not hold."""
        return DATA_GFN + self._unset(self.used)

    def _unset(self, bits: bytearray) -> int:
        vpn = self.rng.randrange(DATA_PAGES)
        while bits[vpn]:
            vpn = (vpn + 1) % DATA_PAGES
        return vpn

    def replace(self, i: int) -> tuple[int, int]:
        """Evict ``pages[i]`` and fault in a new vpn in its place: (old vpn, new vpn); ``gfns`` has the new
        page's frame."""
        old, new = self.pages[i], self.unmapped()
        self.mapped[old] = 0
        self.free.append(self.gfns.pop(old))
        if len(self.free) > self.reserve:
            gfn = self.free.popleft()
        else:
            gfn = self.unused_gfn()
            self.used[gfn - DATA_GFN] = 1
        self.mapped[new] = 1
        self.gfns[new] = gfn
        self.pages[i] = new
        return old, new


def _touch(rng: random.Random, addr: int, slot: int, vcpu: int = 0) -> ev.Access:
    """A user access inside the page at ``addr``: code slots are fetched, data written three times in ten;
    one access in ten is the kernel's (supervisor)."""
    off = rng.randrange(0, PAGE, 8)
    if slot % 8 == 0:
        return _access(addr + off, fetch=True, vcpu=vcpu)
    return _access(addr + off, write=rng.random() < 0.3, user=rng.random() >= 0.1, vcpu=vcpu)


def _resident_setup(space: _Space | None, res: _Resident) -> Iterator[ev.Event]:
    """Map the resident set (PT links and ptes), load CR3, and touch every page once."""
    if space is not None:
        yield from space.top()
        for vpn in res.pages:
            yield from space.map(vpn, res.gfns[vpn])
        yield ev.Cr3(val=space.cr3)
    for vpn in res.pages:
        yield _access(_addr(space, res, vpn), write=True, user=False)


def _addr(space: _Space | None, res: _Resident, vpn: int) -> int:
    """Where the guest reaches data page ``vpn``: its gva, or its frame's gpa with paging off."""
    return GVA_BASE + vpn * PAGE if space is not None else res.gfns[vpn] * PAGE


def _demand_fault(space: _Space | None, res: _Resident, vcpu: int) -> Iterator[ev.Event]:
    """The guest evicts a resident page and faults in a new one: munmap's pte clear, the access that
    takes a guest #PF on the new page, the pte the guest's fault handler writes, and the access again."""
    rng = res.rng
    old, new = res.replace(rng.randrange(len(res.pages)))
    write = rng.random() < 0.5
    if space is not None:
        yield from space.pte(old, 0)
        yield _access(space.gva(new), write=write, vcpu=vcpu)
        yield from space.map(new, res.gfns[new], USER_PTE | (D if write else 0))
    yield _access(_addr(space, res, new), write=write, vcpu=vcpu)


def _protect_fault(space: _Space, res: _Resident, vcpu: int) -> Iterator[ev.Event]:
    """mprotect(PROT_READ) of a resident page, a write that takes a guest #PF, PROT_WRITE back, the write."""
    vpn = res.pages[res.rng.randrange(len(res.pages))]
    yield from space.map(vpn, res.gfns[vpn], P | U | A)
    yield _access(space.gva(vpn), write=True, vcpu=vcpu)
    yield from space.map(vpn, res.gfns[vpn], USER_PTE | D)
    yield _access(space.gva(vpn), write=True, vcpu=vcpu)


# --- the workloads -----------------------------------------------------------------------------------------


def _steady(spec: SynthSpec, rng: random.Random) -> Iterator[ev.Event]:
    """A resident set mostly hitting existing mappings; 3% demand faults (evict one page, fault in another),
    2% protection faults, and now and then a vcpu switch, a CR3 reload or an INVLPG."""
    paging = spec.guest_paging
    space = None if paging == "none" else _Space(paging, ROOTS[0], POOL_A)
    res = _Resident(rng, _ws(spec.events, 4096))
    yield from _resident_setup(space, res)
    vcpu = 0
    pages = res.pages
    while True:
        r = rng.random()
        if r < 0.93:
            slot = res.pick()
            yield _touch(rng, _addr(space, res, pages[slot]), slot, vcpu)
        elif r < 0.96:
            yield from _demand_fault(space, res, vcpu)
        elif r < 0.98:
            if space is not None:
                yield from _protect_fault(space, res, vcpu)
        elif r < 0.99:
            vcpu ^= 1
        elif space is not None:
            if r < 0.995:
                yield ev.Cr3(val=space.cr3, vcpu=vcpu)
            else:
                yield ev.Invlpg(addr=space.gva(pages[res.pick()]), vcpu=vcpu)


def _boot(spec: SynthSpec, rng: random.Random) -> Iterator[ev.Event]:
    """Real mode touches low memory; the guest writes its top-level tables and turns paging on; then it
    maps and first-touches all of its data memory, page by page (PD entry, pte, store). Each later pass (a
    reboot) uses the other PT pool and shifts every vpn to another frame, so the tables are rebuilt and
    under shadow paging every pte write hits a shadowed table."""
    paging = spec.guest_paging
    for gfn in range(LOW_PAGES):
        yield _access(gfn * PAGE, write=gfn >= 16, user=False, fetch=gfn < 16)
    space = None
    if paging != "none":
        space = _Space(paging, ROOTS[0], POOL_A)
        yield from space.top()
        yield ev.Paging(paging=paging)
    for npass in itertools.count():
        shift = npass * BOOT_STRIDE % DATA_PAGES
        if space is not None:
            space.pool = (POOL_A, POOL_B)[npass % 2]
            space.linked = {}
        for vpn in range(DATA_PAGES):
            gfn = DATA_GFN + (vpn + shift) % DATA_PAGES
            if space is not None:
                yield from space.map(vpn, gfn, KERNEL_PTE)
                addr = space.gva(vpn)
            else:
                addr = gfn * PAGE
            yield _access(addr, write=True, user=False)
            if rng.random() < 0.2:
                yield _access(addr + rng.randrange(0, PAGE, 8), user=False)
        if space is not None:
            yield ev.Cr3(val=space.cr3)


def _fork_storm(spec: SynthSpec, rng: random.Random) -> Iterator[ev.Event]:
    """A parent (vcpu 0) forks children (vcpu 1) over and over. Each fork write-protects a window of the
    parent's ptes and copies them into the child's tables in one burst (emulated writes to shadowed tables,
    every eighth a recorded ``pte_write``); the child reads, and copy-on-write faults on its stores (guest
    #PF, a new frame in its pte, the store again); it exits, clearing its ptes in another burst; then the
    parent re-faults: a store takes a guest #PF and the pte gets W back."""
    paging = spec.guest_paging
    parent = _Space(paging, ROOTS[0], POOL_A)
    child = _Space(paging, ROOTS[1], POOL_C)
    ws = _ws(spec.events, 2048)
    read_only = bytearray(ws)
    yield from parent.top()
    for vpn in range(ws):
        yield from parent.map(vpn, DATA_GFN + vpn)
    yield ev.Cr3(val=parent.cr3)
    for vpn in range(ws):
        yield _access(parent.gva(vpn), write=True)
    yield from child.top()
    cow = 0
    while True:
        k = rng.randint(min(ws, 16), min(ws, 512))
        start = rng.randrange(ws - k + 1)
        window = range(start, start + k)
        for vpn in window:  # copy_page_range
            op = ev.PteWrite if rng.random() < 0.125 else ev.Write
            yield from parent.map(vpn, DATA_GFN + vpn, P | U | A | D, op)  # ptep_set_wrprotect
            read_only[vpn] = 1
            yield from child.map(vpn, DATA_GFN + vpn, P | U | D)  # pte_wrprotect, pte_mkold
        yield ev.Cr3(val=child.cr3, vcpu=1)
        copied = bytearray(k)
        for _ in range(k):
            vpn = start + rng.randrange(k)
            gva = child.gva(vpn)
            if rng.random() < 0.4:
                if not copied[vpn - start]:
                    yield _access(gva, write=True, vcpu=1)  # guest #PF: read-only
                    yield from child.map(vpn, COW_GFN + cow, USER_PTE | D)
                    cow = (cow + 1) % COW_PAGES
                    copied[vpn - start] = 1
                yield _access(gva, write=True, vcpu=1)
            else:
                yield _access(gva, vcpu=1)
        for vpn in window:  # exit: zap_page_range
            yield from child.pte(vpn, 0)
        for vpn in window:
            gva = parent.gva(vpn)
            if rng.random() < 0.5:
                if read_only[vpn]:
                    yield _access(gva, write=True)  # guest #PF: COW fault on a page no one shares now
                    yield from parent.map(vpn, DATA_GFN + vpn, USER_PTE | D)
                    read_only[vpn] = 0
                yield _access(gva, write=True)
            else:
                yield _access(gva)


def _remap_churn(spec: SynthSpec, rng: random.Random) -> Iterator[ev.Event]:
    """A resident set under host memory churn (``kernel: notifier``): host remaps of resident frames (swap,
    migration, KSM), alone or in runs of 8-32, some right before the guest touches the page again; remaps
    of page-table frames and of never-touched frames; guest pte rewrites in between."""
    paging = spec.guest_paging
    space = None if paging == "none" else _Space(paging, ROOTS[0], POOL_A)
    res = _Resident(rng, _ws(spec.events, 4096))
    yield from _resident_setup(space, res)
    pages = res.pages
    while True:
        r = rng.random()
        if r < 0.78:
            slot = res.pick()
            yield _touch(rng, _addr(space, res, pages[slot]), slot)
        elif r < 0.90:
            slot = res.pick()
            yield ev.HostRemap(gfn=res.gfns[pages[slot]])
            if rng.random() < 0.5:
                yield _touch(rng, _addr(space, res, pages[slot]), slot)
        elif r < 0.92:
            first = rng.randrange(len(pages))
            for slot in range(first, min(len(pages), first + rng.randint(8, 32))):
                yield ev.HostRemap(gfn=res.gfns[pages[slot]])
        elif r < 0.94:
            if space is not None and space.linked:
                tables = [space.root, space.pd, *sorted(space.linked.values())]
                yield ev.HostRemap(gfn=tables[rng.randrange(len(tables))])
        elif r < 0.95:
            yield ev.HostRemap(gfn=res.unused_gfn())
        elif r < 0.98:
            yield from _demand_fault(space, res, 0)
        elif space is not None:
            yield from _protect_fault(space, res, 0)


def _hugepages(spec: SynthSpec, rng: random.Random) -> Iterator[ev.Event]:
    """2 MiB memory: a hugetlb slot of 64 host huge pages at 1 GiB (reached by gpa with paging off, or through
    guest large pages: 2 MiB PDEs, 4 MiB with 32-bit PSE) and a small-page RAM slot below 16 MiB. Plain
    phases of random accesses alternate with migration phases: dirty logging on for the hugetlb slot, rounds
    of accesses each followed by a log harvest, logging off, and a store to every region that went 4K so
    that it is mapped large again. Now and then the small-page slot is logged the same way, or the guest
    points a large PDE at another huge page.

    The era clears W in every entry of a logged slot's shadow pages, table pointers included (reference
    docs/kernel.md, Dirty logging): a store through a 4K table that existed before the last harvest exits forever
    (``fault-loop``). So during logging a store only goes to a 2 MiB region that has not gone 4K before the last
    ``dirty_log``; reads go anywhere. The hugetlb slot has its own 1 GiB (its own level-2 shadow pages) for
    the same reason.
    """
    paging = spec.guest_paging
    space = small_space = None
    if paging != "none":
        space = _Space(paging, ROOTS[0], POOL_A)
        small_space = _Space(paging, ROOTS[0], POOL_A, base=SMALL_BASE, pd=ROOTS[0] + 3)
        yield from space.top()
        yield from small_space.top()
    lpage = space.large if space is not None else 512
    sub = lpage // 512  # 2 MiB regions per guest large page
    nlarge = HUGE_PAGES // lpage
    if space is not None:
        for j in range(nlarge):
            yield space.pde(j, ((HUGE_GFN + j * lpage) << 12) | USER_PTE | PS)
        yield ev.Cr3(val=space.cr3)
    target = list(range(nlarge))  # guest large page j -> huge page target[j]
    never = -1
    # The dirty_log epoch since which a 2 MiB region may hold a 4K table, by gva region (shadow sptes) and by
    # gpa region (tdp sptes); never: mapped large or not at all.
    split_gva = [never] * (nlarge * sub)
    split_gpa = [never] * (nlarge * sub)
    small = bytearray(SMALL_PAGES)
    epoch = 0
    logging = False

    def huge_access(write: bool, j: int | None = None, off: int | None = None) -> ev.Access:
        if j is None:
            j = rng.randrange(nlarge)
        if off is None:
            off = rng.randrange(lpage * PAGE) & ~7
        rv = j * sub + (off >> 21)
        rp = target[j] * sub + (off >> 21)
        if logging:
            if write and not (split_gva[rv] in (never, epoch) and split_gpa[rp] in (never, epoch)):
                write = False
            if split_gva[rv] == never:
                split_gva[rv] = epoch
            if split_gpa[rp] == never:
                split_gpa[rp] = epoch
        elif write:  # a store outside logging maps the region large again
            split_gva[rv] = split_gpa[rp] = never
        if space is None:
            return _access((HUGE_GFN + j * lpage) * PAGE + off, write=write)
        return _access(space.base + j * lpage * PAGE + off, write=write)

    def small_access(write: bool) -> Iterator[ev.Event]:
        s = rng.randrange(SMALL_PAGES)
        if small_space is None:
            yield _access((SMALL_GFN + s) * PAGE + (rng.randrange(PAGE) & ~7), write=write)
            return
        gva = small_space.gva(s)
        if not small[s]:
            yield _access(gva, write=write)  # guest #PF, then the guest maps the page
            yield from small_space.map(s, SMALL_GFN + s)
            small[s] = 1
        yield _access(gva + (rng.randrange(PAGE) & ~7), write=write)

    def accesses(n: int, p_write: float, p_small: float = 0.1) -> Iterator[ev.Event]:
        for _ in range(n):
            if rng.random() < p_small:
                yield from small_access(rng.random() < p_write)
            else:
                yield huge_access(rng.random() < p_write)

    while True:
        yield from accesses(rng.randint(50, 400), 0.4)
        # migration of the hugetlb slot
        yield ev.DirtyLog(slot=1)
        logging, epoch = True, epoch + 1
        for _ in range(rng.randint(2, 6)):
            yield from accesses(rng.randint(20, 200), 0.6)
            yield ev.DirtyLog(slot=1)
            epoch += 1
        yield ev.DirtyLog(slot=1, stop=True)
        logging, epoch = False, epoch + 1
        for rv, since in enumerate(split_gva):
            if since != never:
                j, half = divmod(rv, sub)
                yield huge_access(True, j, half << 21)
        r = rng.random()
        if r < 0.3:  # log the small-page slot: only table pointers above its leaves, so any store is fine
            yield ev.DirtyLog(slot=0)
            for _ in range(rng.randint(1, 4)):
                yield from accesses(rng.randint(20, 100), 0.5, 0.8)
                yield ev.DirtyLog(slot=0)
            yield ev.DirtyLog(slot=0, stop=True)
        elif r < 0.5 and space is not None:
            j = rng.randrange(nlarge)
            target[j] = rng.randrange(nlarge)
            yield space.pde(j, ((HUGE_GFN + target[j] * lpage) << 12) | USER_PTE | PS)


WORKLOADS: dict[str, Callable[[SynthSpec, random.Random], Iterator[ev.Event]]] = {
    "boot": _boot,
    "steady": _steady,
    "fork-storm": _fork_storm,
    "remap-churn": _remap_churn,
    "hugepages": _hugepages,
}

#: The guest paging mode of each workload when ``paging`` is not given.
DEFAULT_PAGING = {"boot": "64", "steady": "64", "fork-storm": "64", "remap-churn": "64", "hugepages": "none"}

_KERNEL = {"remap-churn": "notifier"}


def check_spec(spec: SynthSpec) -> None:
    """:raises SynthError: unknown workload, MMU or paging mode, a negative count, or fork-storm without
    guest page tables."""
    if spec.workload not in WORKLOADS:
        raise SynthError(f"unknown workload {spec.workload!r} (one of {', '.join(WORKLOADS)})")
    if spec.mmu not in ("shadow", "tdp"):
        raise SynthError(f"unknown mmu {spec.mmu!r} (shadow or tdp)")
    if spec.guest_paging not in PAGINGS:
        raise SynthError(f"unknown paging {spec.guest_paging!r} (one of {', '.join(PAGINGS)})")
    if spec.events < 0:
        raise SynthError(f"events must be >= 0, got {spec.events}")
    if spec.workload == "fork-storm" and spec.guest_paging == "none":
        raise SynthError("fork-storm needs guest page tables: --paging 32, pae or 64")


def synth_header(spec: SynthSpec) -> ev.Header:
    """The header of ``spec``'s trace. ``boot`` starts in real mode with CR3 already at its future PML4."""
    check_spec(spec)
    paging = spec.guest_paging
    cr3 = 0 if paging == "none" else _Space(paging, ROOTS[0], POOL_A).cr3
    guest = ev.Guest(paging="none" if spec.workload == "boot" else paging, cr3=cr3)
    kwargs = {}
    if spec.workload == "hugepages":
        kwargs["memslots"] = [
            ev.Memslot(slot=0, gfn=0, npages=SMALL_SLOT_PAGES, backing="ram"),
            ev.Memslot(slot=1, gfn=HUGE_GFN, npages=HUGE_PAGES, backing="hugetlb"),
        ]
    return ev.Header(
        kvmpfn=1,
        mmu=spec.mmu,
        guest=guest,
        kernel=_KERNEL.get(spec.workload, "pfn"),
        x={"synth": {"workload": spec.workload, "seed": spec.seed, "events": spec.events, "paging": paging}},
        **kwargs,
    )


def synth_events(spec: SynthSpec) -> Iterator[ev.Event]:
    """The ``spec.events`` events of ``spec``'s trace, one at a time."""
    check_spec(spec)
    # A str seed is hashed with SHA-512 by random.seed: stable across runs and Python versions.
    rng = random.Random(f"kvmpfn-synth/{spec.workload}/{spec.guest_paging}/{spec.seed}")
    return itertools.islice(WORKLOADS[spec.workload](spec, rng), spec.events)


def write_synth(
    path: str, spec: SynthSpec, *, validate: bool = False, progress: Callable[[int], None] | None = None
) -> int:
    """Write ``spec``'s trace to ``path`` (``.jsonl``, ``.gz``, ``.zst`` or ``-``); returns the event count.

    :param validate: have the writer decode every line back as the reader would (about twice as slow)
    :param progress: called with the events written so far, every 16,384 events
    """
    header = synth_header(spec)
    n = 0
    with TraceWriter(path, validate=validate) as writer:
        writer.write_header(header)
        write = writer.write_event
        for event in synth_events(spec):
            write(event)
            n += 1
            if progress is not None and not n & 0x3FFF:
                progress(n)
    return n
