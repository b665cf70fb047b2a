"""Shared helpers for the MMU tests: a VM built directly through the Python API (no trace file).

``make_vm`` builds the same objects a replay does (``Replayer`` over a ``Header``: Host + PfnApi + Kvm, the
memslots set up by ``kvm_set_memory_region``), with vcpu 0 created and a hook on the PfnApi that logs every
reference/flag operation as ``(op, pfn, fn, caller)``. Events are applied with ``Vm.apply`` (the replay
engine's dispatch, returning the outcome record), or the MMU functions are called directly.
"""

from __future__ import annotations

import os

os.environ["KVMPFN_PURE"] = "1"  # the tests run the sources; tests/test_compiled.py checks the compiled build

from dataclasses import dataclass, field

import pytest
from fuzz_count import GENERATED

from kvmpfn.kvm.context import kvm_mmu_reload, shadow_walk
from kvmpfn.kvm.pfn import API_NAMES
from kvmpfn.kvm.spte import NOTRAP, TRAP, is_last_spte, is_shadow_present_pte
from kvmpfn.replay import Replayer, ReplayOptions
from kvmpfn.trace import events as ev
from kvmpfn.x86 import (
    PAGE_SHIFT,
    PT64_BASE_ADDR_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
)

KERNELS = ("page", "pfn", "pfn-io", "notifier")
V2626 = ("page", "pfn", "pfn-io")  # the variants without MMU notifiers
MMUS = ("tdp", "shadow")

#: The default layout: 8 MiB of anonymous RAM, 4 MiB of hugetlbfs (2 MiB aligned: two large regions),
#: 16 reserved frames, 16 device (mmio) frames.
RAM_SLOT = (0, 0x0, 0x800, "ram")
HUGE_SLOT = (1, 0x800, 0x400, "hugetlb")
RESERVED_SLOT = (2, 0x1000, 0x10, "reserved")
MMIO_SLOT = (3, 0xFE000, 0x10, "mmio")
DEFAULT_SLOTS = (RAM_SLOT, HUGE_SLOT, RESERVED_SLOT, MMIO_SLOT)

P, W, U = PT_PRESENT_MASK, PT_WRITABLE_MASK, PT_USER_MASK
PS = PT_PAGE_SIZE_MASK
A_BIT, D_BIT = 1 << 5, 1 << 6


def names(kernel: str) -> dict[str, str]:
    """The pfn API's function names as ``kernel`` reports them to the hook."""
    return API_NAMES[kernel]


@dataclass
class Vm:
    """One VM: the replay engine's objects plus the hook log. ``vcpu`` is vcpu 0."""

    rp: Replayer
    log: list = field(default_factory=list)
    seq: int = 0
    tables: PageTables64 | None = None

    @property
    def host(self):
        return self.rp.host

    @property
    def api(self):
        return self.rp.api

    @property
    def kvm(self):
        return self.rp.kvm

    @property
    def vcpu(self):
        return self.rp.vcpu(0)

    # -- events -----------------------------------------------------------------------------------------
    def apply(self, e) -> dict:
        """Apply one event through the replay engine; the outcome record without seq/line/op."""
        rec = self.rp.apply(self.seq, self.seq + 1, e)
        self.seq += 1
        return {k: v for k, v in rec.items() if k not in ("seq", "line", "op")}

    def access(self, addr: int, write: bool = False, user: bool = False, fetch: bool = False) -> dict:
        return self.apply(ev.Access(addr=addr, write=write, user=user, fetch=fetch))

    def pf(self, addr: int, err: int) -> dict:
        return self.apply(ev.Pf(addr=addr, err=err))

    def memslot(self, slot: int, gfn: int, npages: int, backing: str = "ram") -> dict:
        return self.apply(ev.MemslotEvent(slot=slot, gfn=gfn, npages=npages, backing=backing))

    def dirty_log(self, slot: int, stop: bool = False) -> dict:
        return self.apply(ev.DirtyLog(slot=slot, stop=stop))

    def host_remap(self, gfn: int) -> dict:
        return self.apply(ev.HostRemap(gfn=gfn))

    def inject(self, fault: str, count: int = 1) -> dict:
        return self.apply(ev.Inject(fault=fault, count=count))

    def teardown(self) -> dict:
        return self.apply(ev.Teardown())

    def fault(self, addr: int, write: bool = False) -> int:
        """A direct ``mmu.page_fault`` (tdp_page_fault / nonpaging_page_fault) after loading the roots."""
        vcpu = self.vcpu
        assert kvm_mmu_reload(vcpu, self.kvm) == 0
        return vcpu.page_fault(vcpu, self.kvm, addr, 2 if write else 0)

    # -- inspection -------------------------------------------------------------------------------------
    def count(self, pfn: int) -> int:
        """KVM's references on ``pfn`` (0 for a frame the host forgot)."""
        f = self.host.frames.get(pfn)
        return 0 if f is None else f.count

    def pfn(self, gfn: int) -> int:
        pfn = self.host.peek_pfn(gfn)
        assert pfn is not None, f"gfn {gfn:#x} was never touched"
        return pfn

    def walk(self, addr: int) -> tuple[list, int]:
        """The hardware walk of the shadow/TDP tables (addr: gpa under tdp or paging none)."""
        return shadow_walk(self.vcpu, self.kvm, addr)

    def leaf(self, addr: int) -> tuple:
        """The present leaf ``(sp, index)`` that maps ``addr``; fails if there is none."""
        path, end = self.walk(addr)
        assert path and end not in (TRAP, NOTRAP), f"{addr:#x} has no present leaf"
        sp, index = path[-1]
        assert is_last_spte(sp.spt[index], sp.level)
        return sp, index

    def ops(self, op: str | None = None, pfn: int | None = None) -> list:
        return [c for c in self.log if (op is None or c[0] == op) and (pfn is None or c[1] == pfn)]

    def referenced(self) -> dict[int, int]:
        """Every frame KVM holds a reference on (or owes one to: negative)."""
        return {pfn: f.count for pfn, f in self.host.frames.items() if f.count}

    def leaves(self) -> list[tuple]:
        """Every present leaf spte of every live shadow page."""
        out = []
        for sp in self.kvm.active_mmu_pages.values():
            for i, ent in enumerate(sp.spt):
                if is_shadow_present_pte(ent) and is_last_spte(ent, sp.level):
                    out.append((sp, i))
        return out

    def leaf_pfns(self) -> dict[int, int]:
        """pfn → number of present leaf sptes that map it (each owns one reference)."""
        out: dict[int, int] = {}
        for sp, i in self.leaves():
            pfn = (sp.spt[i] & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
            out[pfn] = out.get(pfn, 0) + 1
        return out

    def accounting_ok(self) -> bool:
        kvm = self.kvm
        return kvm.n_alloc_mmu_pages - kvm.n_free_mmu_pages == len(kvm.active_mmu_pages)


def make_vm(
    kernel: str = "pfn",
    mmu: str = "tdp",
    paging: str = "none",
    memslots=DEFAULT_SLOTS,
    bugs=(),
    cr3: int = 0,
    hook: bool = True,
) -> Vm:
    """A VM for ``kernel`` and ``mmu``; ``memslots`` as ``(slot, gfn, npages, backing)``; vcpu 0 exists."""
    header = ev.Header(
        kvmpfn=1,
        mmu=mmu,
        kernel=kernel,
        guest=ev.Guest(paging=paging, cr3=cr3),
        memslots=[ev.Memslot(slot=s, gfn=g, npages=n, backing=b) for s, g, n, b in memslots],
    )
    vm = Vm(Replayer(header, ReplayOptions(bugs=frozenset(bugs))))
    if hook:
        log_hook(vm.api, vm.log)
    vm.rp.vcpu(0)
    return vm


def log_hook(api, log: list) -> None:
    """Log every pfn-API operation as ``(op, pfn, fn, caller)``, then pass it on to the hook already set
    (the auditor's ledger), so that the replay's own bookkeeping is unchanged."""
    prev = api.hook

    def hook(op: str, pfn: int, fn: str, caller: str) -> None:
        log.append((op, pfn, fn, caller))
        if prev is not None:
            prev(op, pfn, fn, caller)

    api.hook = hook


@pytest.fixture
def vm() -> Vm:
    """The default VM: kernel ``pfn``, TDP, paging off, the default memslots."""
    return make_vm()


# --- guest page tables ----------------------------------------------------------------------------------


class PageTables64:
    """4-level guest page tables written straight into guest memory (no KVM involvement, no references).

    Tables are allocated from ``first_gfn`` upward; ``cr3`` is the PML4's gpa.
    """

    def __init__(self, host, first_gfn: int = 0x100) -> None:
        self.host = host
        self.next_gfn = first_gfn
        self.cr3 = self._alloc() << PAGE_SHIFT
        self.tables: list[int] = [self.cr3 >> PAGE_SHIFT]

    def _alloc(self) -> int:
        gfn = self.next_gfn
        self.next_gfn += 1
        return gfn

    def map(self, gva: int, gpa: int, flags: int = P | W | U, large: bool = False) -> int:
        """Map ``gva`` to ``gpa`` (4 KiB, or 2 MiB with ``large``); returns the gpa of the leaf entry."""
        table = self.cr3 >> PAGE_SHIFT
        for level in (4, 3, 2):
            idx = (gva >> (PAGE_SHIFT + 9 * (level - 1))) & 511
            entry_gpa = (table << PAGE_SHIFT) + idx * 8
            if level == 2 and large:
                self.host.write_guest(entry_gpa, gpa | flags | PS, 8)
                return entry_gpa
            entry = self.host.read_guest(entry_gpa, 8)
            if not entry & P:
                new = self._alloc()
                self.tables.append(new)
                self.host.write_guest(entry_gpa, (new << PAGE_SHIFT) | P | W | U, 8)
                table = new
            else:
                table = (entry & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
        entry_gpa = (table << PAGE_SHIFT) + ((gva >> PAGE_SHIFT) & 511) * 8
        self.host.write_guest(entry_gpa, gpa | flags, 8)
        return entry_gpa


def make_paged_vm(kernel: str = "pfn", mmu: str = "shadow", memslots=DEFAULT_SLOTS, bugs=(), maps=()) -> Vm:
    """A 64-bit-paging VM whose guest tables identity-map ``maps``: ``(gva, npages_or_None_for_2MiB)``.

    The tables are written before vcpu 0 exists, so its CR3 is the PML4 built here. Identity mappings make
    one guest-action workload mean the same thing under shadow paging and TDP.
    """
    header = ev.Header(
        kvmpfn=1,
        mmu=mmu,
        kernel=kernel,
        guest=ev.Guest(paging="64", cr3=0),
        memslots=[ev.Memslot(slot=s, gfn=g, npages=n, backing=b) for s, g, n, b in memslots],
    )
    rp = Replayer(header, ReplayOptions(bugs=frozenset(bugs)))
    pt = PageTables64(rp.host)
    for gva, npages in maps:
        if npages is None:
            pt.map(gva, gva, large=True)
        else:
            for i in range(npages):
                pt.map(gva + (i << PAGE_SHIFT), gva + (i << PAGE_SHIFT))
    header.guest.cr3 = pt.cr3
    vm = Vm(rp)
    log_hook(vm.api, vm.log)
    vm.rp.vcpu(0)
    vm.tables = pt
    return vm


# --- the count of generated traces (fuzz_count.py) -------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On an xdist worker: hand this process's count to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["kvmpfn_generated"] = dict(GENERATED)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """On the xdist controller: add up a finished worker's count."""
    GENERATED.update(getattr(node, "workeroutput", {}).get("kvmpfn_generated", {}))


def pytest_terminal_summary(terminalreporter) -> None:
    if GENERATED:
        families = ", ".join(f"{name} {n:,}" for name, n in sorted(GENERATED.items()))
        terminalreporter.write_line(f"generated traces run: {sum(GENERATED.values()):,} ({families})")
