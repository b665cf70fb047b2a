"""Reverse maps and write protection (docs/kernel.md, rmap_remove and rmap_write_protect): the rmap encoding on
``kvm.rmap`` and
``kvm.rmap_pde`` through 0 → 1 → many → 1 → 0, ``rmap_next``, desc compaction, the BUG paths, and
``rmap_write_protect`` on 4 KiB and large sptes (with and without ``--bug rmap-wp-hugepage-iter``).
"""

from __future__ import annotations

import pytest
from conftest import A_BIT, D_BIT, PS, P, U, W, make_vm

from kvmpfn.errors import KernelBug
from kvmpfn.kvm.mmu import kvm_mmu_alloc_page, mmu_set_spte
from kvmpfn.kvm.rmap import (
    RMAP_EXT,
    gfn_to_rmap,
    rmap_add,
    rmap_entries,
    rmap_next,
    rmap_remove,
    rmap_write_protect,
)
from kvmpfn.kvm.spte import TRAP
from kvmpfn.x86 import ACC_ALL

GFN = 0x5
LARGE_GFN = 0x800
REGION = LARGE_GFN >> 9


@pytest.fixture
def rm():
    """A VM, one spare level-1 shadow page, and a frame to point sptes at."""
    vm = make_vm()
    sp = kvm_mmu_alloc_page(vm.kvm, None)
    sp.level = 1
    pfn = vm.api.gfn_to_pfn(GFN, "test")
    vm.api.kvm_release_pfn_clean(pfn, "test")
    vm.log.clear()
    return vm, sp, pfn


def install(vm, sp, index: int, pfn: int, gfn: int = GFN, lpage: int = 0, w: bool = True) -> tuple:
    """A present leaf at ``sp[index]`` owning one (new) reference, linked into the rmap."""
    sp.spt[index] = pfn << 12 | P | U | D_BIT | (W if w else 0) | (PS if lpage else 0)
    vm.api.kvm_get_pfn(pfn, "test")
    rmap_add(vm.vcpu, vm.kvm, (sp, index), gfn, lpage)
    return (sp, index)


# --- encoding -----------------------------------------------------------------------------------------


def test_encoding_0_1_many_1_0(rm):
    vm, sp, pfn = rm
    kvm = vm.kvm
    s = [(sp, i) for i in range(6)]
    assert GFN not in kvm.rmap  # 0
    install(vm, sp, 0, pfn)
    assert kvm.rmap[GFN] == s[0] and type(kvm.rmap[GFN]) is tuple  # 1: the single pointer
    install(vm, sp, 1, pfn)
    assert kvm.rmap[GFN] == [[s[0], s[1]]]  # 1 -> many: one desc
    install(vm, sp, 2, pfn)
    install(vm, sp, 3, pfn)
    assert kvm.rmap[GFN] == [[s[0], s[1], s[2], s[3]]]  # a full desc (RMAP_EXT = 4)
    install(vm, sp, 4, pfn)
    assert kvm.rmap[GFN] == [s[0:4], [s[4]]]  # a second desc
    install(vm, sp, 5, pfn)
    assert kvm.rmap[GFN] == [s[0:4], [s[4], s[5]]]
    assert RMAP_EXT == 4 and vm.count(pfn) == 6
    assert sp.gfns[:6] == [GFN] * 6
    assert rmap_entries(kvm.rmap, GFN) == s

    rmap_remove(kvm, s[1])  # the last entry of its desc fills the hole
    assert kvm.rmap[GFN] == [[s[0], s[3], s[2]], [s[4], s[5]]]
    rmap_remove(kvm, s[4])
    assert kvm.rmap[GFN] == [[s[0], s[3], s[2]], [s[5]]]
    rmap_remove(kvm, s[5])  # the second desc empties: freed and unlinked
    assert kvm.rmap[GFN] == [[s[0], s[3], s[2]]]
    rmap_remove(kvm, s[0])
    assert kvm.rmap[GFN] == [[s[2], s[3]]]
    rmap_remove(kvm, s[3])
    assert kvm.rmap[GFN] == [[s[2]]]  # many -> 1: still a desc list with one entry (v2.6.26)
    assert type(kvm.rmap[GFN]) is list
    rmap_remove(kvm, s[2])
    assert GFN not in kvm.rmap  # the last entry went: 0
    assert vm.count(pfn) == 0
    assert [c[0] for c in vm.ops("put")] == ["put"] * 6


def test_first_desc_emptying_relinks_the_head_to_the_next(rm):
    vm, sp, pfn = rm
    kvm = vm.kvm
    s = [install(vm, sp, i, pfn) for i in range(5)]
    for i in (0, 1, 2, 3):
        rmap_remove(kvm, s[i])
    assert kvm.rmap[GFN] == [[s[4]]]
    assert rmap_next(kvm.rmap, GFN, None) == s[4]


def test_rmap_add_fills_the_first_desc_with_a_free_slot(rm):
    """v2.6.26 ``rmap_add`` (many → many): ``while (desc->shadow_ptes[RMAP_EXT-1] && desc->more) desc =
    desc->more;`` stops at the first desc with a free last slot (docs/kernel.md, rmap_remove and rmap_write_protect), so
    a hole left by
    ``rmap_desc_remove_entry`` in an earlier desc is reused before the last desc grows."""
    vm, sp, pfn = rm
    kvm = vm.kvm
    s = [install(vm, sp, i, pfn) for i in range(5)]
    rmap_remove(vm.kvm, s[1])
    assert kvm.rmap[GFN] == [[s[0], s[3], s[2]], [s[4]]]
    s6 = install(vm, sp, 6, pfn)
    assert kvm.rmap[GFN] == [[s[0], s[3], s[2], s6], [s[4]]]


def test_large_rmap_is_per_2mib_region(rm):
    vm, sp, pfn = rm
    kvm = vm.kvm
    sp.level = 2
    a = install(vm, sp, 0, pfn, gfn=LARGE_GFN, lpage=1)
    b = install(vm, sp, 1, pfn, gfn=LARGE_GFN + 0x1FF, lpage=1)
    assert gfn_to_rmap(kvm, LARGE_GFN + 0x123, 1) == (kvm.rmap_pde, REGION)
    assert gfn_to_rmap(kvm, LARGE_GFN + 0x123, 0) == (kvm.rmap, LARGE_GFN + 0x123)
    assert kvm.rmap_pde[REGION] == [[a, b]]
    assert LARGE_GFN not in kvm.rmap
    rmap_remove(kvm, a)  # found through is_large_pte(spte) and sp.gfns
    rmap_remove(kvm, b)
    assert REGION not in kvm.rmap_pde and vm.count(pfn) == 0


def test_rmap_add_and_remove_ignore_non_present_sptes(rm):
    vm, sp, pfn = rm
    assert sp.spt[7] == TRAP
    rmap_add(vm.vcpu, vm.kvm, (sp, 7), GFN, 0)
    assert GFN not in vm.kvm.rmap
    rmap_remove(vm.kvm, (sp, 7))
    assert vm.log == []


# --- rmap_next ----------------------------------------------------------------------------------------


def test_rmap_next_single_form(rm):
    vm, sp, pfn = rm
    s0 = install(vm, sp, 0, pfn)
    assert rmap_next(vm.kvm.rmap, GFN, None) == s0
    assert rmap_next(vm.kvm.rmap, GFN, s0) is None
    assert rmap_next(vm.kvm.rmap, GFN + 1, None) is None  # empty head


def test_rmap_next_walks_every_desc_in_order(rm):
    vm, sp, pfn = rm
    s = [install(vm, sp, i, pfn) for i in range(9)]
    seen, cur = [], rmap_next(vm.kvm.rmap, GFN, None)
    while cur is not None:
        seen.append(cur)
        cur = rmap_next(vm.kvm.rmap, GFN, cur)
    assert seen == s == rmap_entries(vm.kvm.rmap, GFN)


def test_rmap_next_ends_the_walk_after_a_removed_entry(rm):
    """The successor is found by searching for the current entry: removing it ends the walk (--bug
    rmap-wp-hugepage-iter)."""
    vm, sp, pfn = rm
    s = [install(vm, sp, i, pfn) for i in range(3)]
    assert rmap_next(vm.kvm.rmap, GFN, s[0]) == s[1]
    rmap_remove(vm.kvm, s[0])
    assert rmap_next(vm.kvm.rmap, GFN, s[0]) is None
    assert rmap_next(vm.kvm.rmap, GFN, None) == s[2]  # restarting from the head still sees the rest


# --- rmap_remove: reference and BUG paths -------------------------------------------------------------


@pytest.mark.parametrize("writable", [True, False])
@pytest.mark.parametrize("accessed", [True, False])
def test_rmap_remove_releases_the_reference_first(rm, writable, accessed):
    vm, sp, pfn = rm
    s0 = install(vm, sp, 0, pfn, w=writable)
    if accessed:
        sp.spt[0] |= A_BIT
    value = sp.spt[0]
    vm.log.clear()
    rmap_remove(vm.kvm, s0)
    ops = [c[0] for c in vm.log]
    assert ops == (["accessed"] if accessed else []) + (["dirty", "put"] if writable else ["put"])
    assert all(c[3] == "rmap_remove" and c[1] == pfn for c in vm.log)
    assert vm.count(pfn) == 0
    assert sp.spt[0] == value  # the caller overwrites the spte, not rmap_remove


def test_rmap_remove_bug_paths(rm):
    vm, sp, pfn = rm
    kvm = vm.kvm
    sp.spt[0] = pfn << 12 | P  # present, never rmapped
    sp.gfns[0] = GFN
    vm.api.kvm_get_pfn(pfn, "test")
    with pytest.raises(KernelBug, match="0->BUG"):
        rmap_remove(kvm, (sp, 0))
    s1 = install(vm, sp, 1, pfn)
    vm.api.kvm_get_pfn(pfn, "test")
    with pytest.raises(KernelBug, match="1->BUG"):
        rmap_remove(kvm, (sp, 0))
    install(vm, sp, 2, pfn)
    vm.api.kvm_get_pfn(pfn, "test")
    with pytest.raises(KernelBug, match="many->BUG"):
        rmap_remove(kvm, (sp, 0))
    assert rmap_entries(kvm.rmap, GFN) == [s1, (sp, 2)]


# --- rmap_write_protect: 4 KiB sptes ------------------------------------------------------------------


def two_mappings(vm) -> tuple[int, tuple, tuple]:
    """GFN mapped twice: by its own tdp leaf and by an alias leaf in another level-1 slot."""
    vm.fault(GFN << 12, write=True)
    pfn = vm.pfn(GFN)
    a = vm.leaf(GFN << 12)
    b = (a[0], 0x40)
    assert vm.api.gfn_to_pfn(GFN, "test") == pfn
    mmu_set_spte(vm.vcpu, vm.kvm, b, ACC_ALL, ACC_ALL, 0, 1, 1, 0, GFN, pfn, False)
    assert vm.kvm.rmap[GFN] == [[a, b]] and vm.count(pfn) == 2
    return pfn, a, b


def test_write_protect_clears_w_on_4k_sptes_and_dirties_the_frame(vm):
    kvm = vm.kvm
    pfn, a, b = two_mappings(vm)
    assert a[0].spt[a[1]] & W and b[0].spt[b[1]] & W
    before = {k: a[0].spt[k] for k in (a[1], b[1])}
    flushes = kvm.stat["remote_tlb_flush"]
    vm.log.clear()
    rmap_write_protect(kvm, GFN)
    assert {k: a[0].spt[k] for k in (a[1], b[1])} == {k: v & ~W for k, v in before.items()}
    assert vm.log == [("dirty", pfn, "kvm_set_pfn_dirty", "rmap_write_protect")]  # once, no refcount change
    assert vm.count(pfn) == 2 and vm.host.frames[pfn].dirty
    assert kvm.rmap[GFN] == [[a, b]]
    assert kvm.slots[0].write_count[0] == 1  # account_shadowed
    assert kvm.stat["remote_tlb_flush"] == flushes + 1


def test_write_protect_of_read_only_sptes_only_accounts(vm):
    kvm = vm.kvm
    pfn, a, b = two_mappings(vm)
    for sp, i in (a, b):
        sp.spt[i] &= ~W
    flushes = kvm.stat["remote_tlb_flush"]
    vm.log.clear()
    rmap_write_protect(kvm, GFN)
    assert vm.log == [] and not vm.host.frames[pfn].dirty
    assert kvm.stat["remote_tlb_flush"] == flushes
    assert kvm.slots[0].write_count[0] == 1
    rmap_write_protect(kvm, GFN + 1)  # no mapping at all: still accounted
    assert kvm.slots[0].write_count[0] == 2


# --- rmap_write_protect: large sptes ------------------------------------------------------------------


def large_mappings(vm, writable=(True, True, True, False)) -> tuple[int, list]:
    """Region REGION mapped by four large sptes (entries 4..7 of one level-2 page), each owning R(base)."""
    vm.fault(LARGE_GFN << 12, write=True)
    base = vm.pfn(LARGE_GFN)
    s = [vm.leaf(LARGE_GFN << 12)]
    sp = s[0][0]
    assert sp.level == 2 and s[0][1] == 4
    for i in (5, 6, 7):
        assert vm.api.gfn_to_pfn(LARGE_GFN, "test") == base
        mmu_set_spte(vm.vcpu, vm.kvm, (sp, i), ACC_ALL, ACC_ALL, 0, 1, 1, 1, LARGE_GFN, base, False)
        s.append((sp, i))
    for (p, i), w in zip(s, writable, strict=True):
        if not w:
            p.spt[i] &= ~W
    assert vm.kvm.rmap_pde[REGION] == [s] and vm.count(base) == 4
    assert vm.kvm.stat["lpages"] == 4
    return base, s


def test_write_protect_removes_writable_large_sptes_and_restarts(vm):
    kvm = vm.kvm
    base, s = large_mappings(vm)
    vm.log.clear()
    rmap_write_protect(kvm, LARGE_GFN + 5)
    sp = s[0][0]
    assert [sp.spt[i] == TRAP for _, i in s] == [True, True, True, False]
    assert kvm.rmap_pde[REGION] == [[s[3]]]  # the read-only large spte stays
    assert vm.count(base) == 1 and vm.host.frames[base].dirty
    assert [c[0] for c in vm.log] == ["dirty", "put"] * 3
    assert all(c[2] == "kvm_release_pfn_dirty" and c[3] == "rmap_remove" for c in vm.log)
    assert kvm.stat["lpages"] == 1
    assert kvm.slots[1].write_count[0] == 1
    assert LARGE_GFN + 5 not in kvm.rmap


def test_write_protect_hugepage_iter_bug_stops_after_the_first_removal():
    """``--bug rmap-wp-hugepage-iter`` (before 6597ca09): the walk continues from the removed entry,
    which ``rmap_next`` no longer finds, so the other writable large sptes survive (--bug rmap-wp-hugepage-iter)."""
    vm = make_vm(bugs={"rmap-wp-hugepage-iter"})
    kvm = vm.kvm
    base, s = large_mappings(vm)
    rmap_write_protect(kvm, LARGE_GFN + 5)
    sp = s[0][0]
    assert [sp.spt[i] == TRAP for _, i in s] == [True, False, False, False]
    assert sp.spt[5] & W and sp.spt[6] & W  # writable large sptes over a shadowed gfn
    assert vm.count(base) == 3
    assert kvm.rmap_pde[REGION] == [[s[3], s[1], s[2]]]
    assert kvm.stat["lpages"] == 3
    assert kvm.slots[1].write_count[0] == 1


def test_write_protect_leaves_a_single_read_only_large_spte(vm):
    kvm = vm.kvm
    vm.fault(LARGE_GFN << 12)
    base = vm.pfn(LARGE_GFN)
    sptep = vm.leaf(LARGE_GFN << 12)
    sptep[0].spt[sptep[1]] &= ~W
    vm.log.clear()
    rmap_write_protect(kvm, LARGE_GFN)
    assert sptep[0].spt[sptep[1]] & P and kvm.rmap_pde[REGION] == sptep
    assert vm.count(base) == 1 and vm.log == []
