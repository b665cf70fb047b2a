"""The seed's pfn API (kvm_main.c): refcount, flag and hook semantics in every kernel variant."""

from __future__ import annotations

import pytest

from kvmpfn.host import BAD_PFN, MMIO_PFN_BASE, Host, HostError
from kvmpfn.kvm.pfn import API_NAMES, KERNELS, PfnApi

RAM, RESERVED, HUGE, MMIO, OUTSIDE = 0x5, 0x103, 0x234, 0xFE003, 0x5000
PFNMAP = {"page": False, "pfn": False, "pfn-io": True, "notifier": True}

all_kernels = pytest.mark.parametrize("kernel", KERNELS)


def setup(kernel: str) -> tuple[Host, PfnApi, list[tuple[str, int, str, str]]]:
    host = Host()
    host.set_memslot(0, 0, 64, "ram")
    host.set_memslot(1, 0x100, 16, "reserved")
    host.set_memslot(2, 0x200, 512, "hugetlb")
    host.set_memslot(3, 0xFE000, 16, "mmio")
    log: list[tuple[str, int, str, str]] = []
    api = PfnApi(host, kernel, lambda op, pfn, fn, caller: log.append((op, pfn, fn, caller)))
    return host, api, log


def name(kernel: str, fn: str) -> str:
    return API_NAMES[kernel][fn]


def count(host: Host, pfn: int) -> int:
    f = host.frames.get(pfn)
    return 0 if f is None else f.count


def test_kernel_variants_and_names():
    assert KERNELS == ("page", "pfn", "pfn-io", "notifier")
    assert API_NAMES["page"] == {
        "gfn_to_pfn": "gfn_to_page",
        "gfn_to_page": "gfn_to_page",
        "is_error_pfn": "is_error_page",
        "kvm_release_pfn_clean": "kvm_release_page_clean",
        "kvm_release_pfn_dirty": "kvm_release_page_dirty",
        "kvm_set_pfn_dirty": "kvm_set_page_dirty",
        "kvm_set_pfn_accessed": "kvm_set_page_accessed",
        "kvm_get_pfn": "get_page",
    }
    for kernel in ("pfn", "pfn-io", "notifier"):
        assert all(k == v for k, v in API_NAMES[kernel].items())
    with pytest.raises(HostError) as err:
        PfnApi(Host(), "pfn-iommu")
    assert err.value.field == "kernel"


@all_kernels
def test_attributes(kernel):
    host, api, _ = setup(kernel)
    assert api.kernel == kernel and api.bad_pfn == host.bad_pfn == BAD_PFN
    assert api.pfnmap is PFNMAP[kernel]
    assert api.is_error_pfn(BAD_PFN) and not api.is_error_pfn(0x100000)
    assert api.gfn_to_hva(RAM) == host.gfn_to_hva(RAM) and api.gfn_to_hva(OUTSIDE) is None


# -- gfn_to_pfn ------------------------------------------------------------------------------------
@all_kernels
@pytest.mark.parametrize("gfn", [RAM, RESERVED, HUGE])
def test_gfn_to_pfn_takes_one_reference_on_the_frame(kernel, gfn):
    host, api, log = setup(kernel)
    pfn = api.gfn_to_pfn(gfn, "nonpaging_map")
    assert pfn == host.peek_pfn(gfn) and not api.is_error_pfn(pfn)
    assert host.frame(pfn).count == 1 and host.frame(pfn).host_mapped
    assert log == [("get", pfn, name(kernel, "gfn_to_pfn"), "nonpaging_map")]
    assert count(host, BAD_PFN) == 0
    assert api.gfn_to_pfn(gfn, "paging64_page_fault") == pfn
    assert host.frame(pfn).count == 2
    assert host.frame(pfn).reserved == (gfn == RESERVED)
    if gfn == HUGE:
        assert pfn % 512 == HUGE % 512 and host.frame(pfn - HUGE % 512).count == 0  # tail counted by pfn
    assert not api.consumed_failure


@all_kernels
def test_gfn_to_pfn_outside_every_slot_is_bad_pfn_with_a_real_reference(kernel):
    host, api, log = setup(kernel)
    pfn = api.gfn_to_pfn(OUTSIDE, "tdp_page_fault")
    assert pfn == BAD_PFN and api.is_error_pfn(pfn)
    assert host.frame(BAD_PFN).count == 1
    api.kvm_release_pfn_clean(pfn, "tdp_page_fault")  # the is_error_pfn branch of every fault path
    assert host.frame(BAD_PFN).count == 0
    assert BAD_PFN in host.frames  # bad_page is never freed
    assert log == [
        ("get", BAD_PFN, name(kernel, "gfn_to_pfn"), "tdp_page_fault"),
        ("put", BAD_PFN, name(kernel, "kvm_release_pfn_clean"), "tdp_page_fault"),
    ]


@all_kernels
def test_gfn_to_pfn_on_mmio(kernel):
    host, api, log = setup(kernel)
    dev = host.peek_pfn(MMIO)
    assert dev >= MMIO_PFN_BASE
    pfn = api.gfn_to_pfn(MMIO, "nonpaging_map")
    if PFNMAP[kernel]:  # 2e2e3738: VM_PFNMAP → the device pfn, no reference
        assert pfn == dev and not api.is_error_pfn(pfn)
        assert log == [] and count(host, BAD_PFN) == 0 and count(host, dev) == 0
    else:  # get_user_pages fails: bad_pfn with +1 on bad_page
        assert pfn == BAD_PFN
        assert log == [("get", BAD_PFN, name(kernel, "gfn_to_pfn"), "nonpaging_map")]
        assert host.frame(BAD_PFN).count == 1
    assert not api.consumed_failure


# -- gfn_to_page -----------------------------------------------------------------------------------
@all_kernels
def test_gfn_to_page_on_ram_and_outside(kernel):
    host, api, log = setup(kernel)
    pfn = api.gfn_to_page(RAM, "kvm_mmu_pte_write")
    assert pfn == host.peek_pfn(RAM) and host.frame(pfn).count == 1
    assert api.gfn_to_page(OUTSIDE, "kvm_mmu_pte_write") == BAD_PFN
    assert log == [
        ("get", pfn, "gfn_to_page", "kvm_mmu_pte_write"),
        ("get", BAD_PFN, "gfn_to_page", "kvm_mmu_pte_write"),
    ]


@all_kernels
def test_gfn_to_page_on_mmio_gives_bad_page(kernel):
    host, api, log = setup(kernel)
    assert api.gfn_to_page(MMIO, "cmpxchg_gpte") == BAD_PFN
    assert host.frame(BAD_PFN).count == 1
    assert count(host, host.peek_pfn(MMIO)) == 0
    assert log == [("get", BAD_PFN, "gfn_to_page", "cmpxchg_gpte")]
    assert api.warn_count == (1 if PFNMAP[kernel] else 0)  # pfn-io: the WARN_ON(!pfn_valid) path


# -- release, dirty, accessed, get -----------------------------------------------------------------
@all_kernels
@pytest.mark.parametrize("gfn", [RAM, HUGE])
def test_release_clean(kernel, gfn):
    host, api, log = setup(kernel)
    pfn = api.gfn_to_pfn(gfn, "f")
    api.kvm_release_pfn_clean(pfn, "rmap_remove")
    f = host.frame(pfn)
    assert f.count == 0 and not f.dirty and f.host_mapped
    assert log[1:] == [("put", pfn, name(kernel, "kvm_release_pfn_clean"), "rmap_remove")]


@all_kernels
@pytest.mark.parametrize("gfn", [RAM, RESERVED, HUGE])
def test_release_dirty_sets_dirty_except_on_reserved(kernel, gfn):
    host, api, log = setup(kernel)
    pfn = api.gfn_to_pfn(gfn, "f")
    api.kvm_release_pfn_dirty(pfn, "rmap_remove")
    f = host.frame(pfn)
    fn = name(kernel, "kvm_release_pfn_dirty")
    assert f.count == 0
    if gfn == RESERVED:
        assert not f.dirty
        assert log[1:] == [("put", pfn, fn, "rmap_remove")]
    else:
        assert f.dirty
        assert log[1:] == [("dirty", pfn, fn, "rmap_remove"), ("put", pfn, fn, "rmap_remove")]


@all_kernels
def test_set_dirty_accessed_and_get(kernel):
    host, api, log = setup(kernel)
    pfn = api.gfn_to_pfn(RAM, "f")
    rpfn = api.gfn_to_pfn(RESERVED, "f")
    del log[:]
    api.kvm_set_pfn_dirty(pfn, "rmap_write_protect")
    api.kvm_set_pfn_dirty(rpfn, "rmap_write_protect")  # PageReserved: not applied, not reported
    api.kvm_set_pfn_accessed(pfn, "rmap_remove")
    api.kvm_set_pfn_accessed(rpfn, "rmap_remove")
    api.kvm_get_pfn(pfn, "paging64_update_pte")
    f, r = host.frame(pfn), host.frame(rpfn)
    assert f.dirty and f.accessed and f.count == 2
    assert not r.dirty and r.accessed and r.count == 1
    assert log == [
        ("dirty", pfn, name(kernel, "kvm_set_pfn_dirty"), "rmap_write_protect"),
        ("accessed", pfn, name(kernel, "kvm_set_pfn_accessed"), "rmap_remove"),
        ("accessed", rpfn, name(kernel, "kvm_set_pfn_accessed"), "rmap_remove"),
        ("get", pfn, name(kernel, "kvm_get_pfn"), "paging64_update_pte"),
    ]


@all_kernels
def test_put_on_zero_count_underflows_and_is_reported(kernel):
    host, api, log = setup(kernel)
    pfn = api.gfn_to_pfn(RAM, "f")
    api.kvm_release_pfn_clean(pfn, "a")
    api.kvm_release_pfn_dirty(pfn, "b")
    assert host.frame(pfn).count == -1
    assert log[-1] == ("put", pfn, name(kernel, "kvm_release_pfn_dirty"), "b")
    api.kvm_release_pfn_clean(BAD_PFN, "c")
    assert host.frame(BAD_PFN).count == -1
    assert log[-1] == ("put", BAD_PFN, name(kernel, "kvm_release_pfn_clean"), "c")


@all_kernels
def test_ops_on_frames_without_struct_page(kernel):
    host, api, log = setup(kernel)
    dev = host.peek_pfn(MMIO)
    api.kvm_get_pfn(dev, "a")
    api.kvm_set_pfn_accessed(dev, "b")
    api.kvm_set_pfn_dirty(dev, "c")
    api.kvm_release_pfn_dirty(dev, "d")
    api.kvm_release_pfn_clean(dev, "e")
    f = host.frames.get(dev)
    if PFNMAP[kernel]:  # !pfn_valid: every helper is a no-op
        assert log == [] and (f is None or (f.count, f.dirty, f.accessed) == (0, False, False))
    else:  # the op is applied and reported: the ledger flags pageless-refcount
        n = API_NAMES[kernel]
        assert log == [
            ("get", dev, n["kvm_get_pfn"], "a"),
            ("accessed", dev, n["kvm_set_pfn_accessed"], "b"),
            ("dirty", dev, n["kvm_set_pfn_dirty"], "c"),
            ("dirty", dev, n["kvm_release_pfn_dirty"], "d"),
            ("put", dev, n["kvm_release_pfn_dirty"], "d"),
            ("put", dev, n["kvm_release_pfn_clean"], "e"),
        ]
        assert (f.count, f.dirty, f.accessed, f.struct_page) == (-1, True, True, False)


# -- failure injection -----------------------------------------------------------------------------
@all_kernels
def test_injected_gup_failure_on_ram(kernel):
    host, api, log = setup(kernel)
    api.inject_gup_fail(2)
    assert api.gfn_to_pfn(OUTSIDE, "f") == BAD_PFN  # no hva: get_user_pages is never called
    assert not api.consumed_failure and api.gup_fail_pending == 2
    assert api.gfn_to_pfn(RAM, "f") == BAD_PFN
    assert api.consumed_failure and api.gup_fail_pending == 1
    assert host.peek_pfn(RAM) is None  # nothing was faulted in
    api.consumed_failure = False
    assert api.gfn_to_page(HUGE, "g") == BAD_PFN
    assert api.consumed_failure and api.gup_fail_pending == 0
    assert host.frame(BAD_PFN).count == 3
    api.consumed_failure = False
    pfn = api.gfn_to_pfn(RAM, "h")  # injections used up
    assert pfn == host.peek_pfn(RAM) and host.frame(pfn).count == 1 and not api.consumed_failure
    assert [(op, p, fn) for op, p, fn, _ in log] == [
        ("get", BAD_PFN, name(kernel, "gfn_to_pfn")),
        ("get", BAD_PFN, name(kernel, "gfn_to_pfn")),
        ("get", BAD_PFN, "gfn_to_page"),
        ("get", pfn, name(kernel, "gfn_to_pfn")),
    ]


@all_kernels
def test_injected_gup_failure_on_mmio(kernel):
    host, api, log = setup(kernel)
    api.inject_gup_fail(1)
    pfn = api.gfn_to_pfn(MMIO, "f")
    assert api.consumed_failure
    if PFNMAP[kernel]:
        assert pfn == host.peek_pfn(MMIO) and log == []
    else:
        assert pfn == BAD_PFN and log == [("get", BAD_PFN, name(kernel, "gfn_to_pfn"), "f")]


# -- a fault's whole life, and host remaps ---------------------------------------------------------
@all_kernels
def test_hook_sequence_of_a_mapping_life(kernel):
    host, api, log = setup(kernel)
    pfn = api.gfn_to_pfn(RAM, "paging64_page_fault")  # the spte's reference
    api.kvm_get_pfn(pfn, "paging64_update_pte")  # prefetch of a second spte
    api.kvm_set_pfn_dirty(pfn, "rmap_write_protect")
    api.kvm_set_pfn_accessed(pfn, "rmap_remove")
    api.kvm_release_pfn_dirty(pfn, "rmap_remove")
    api.kvm_release_pfn_clean(pfn, "rmap_remove")
    n = API_NAMES[kernel]
    assert log == [
        ("get", pfn, n["gfn_to_pfn"], "paging64_page_fault"),
        ("get", pfn, n["kvm_get_pfn"], "paging64_update_pte"),
        ("dirty", pfn, n["kvm_set_pfn_dirty"], "rmap_write_protect"),
        ("accessed", pfn, n["kvm_set_pfn_accessed"], "rmap_remove"),
        ("dirty", pfn, n["kvm_release_pfn_dirty"], "rmap_remove"),
        ("put", pfn, n["kvm_release_pfn_dirty"], "rmap_remove"),
        ("put", pfn, n["kvm_release_pfn_clean"], "rmap_remove"),
    ]
    assert host.frame(pfn).count == 0


@all_kernels
def test_remapped_frame_lives_until_kvm_releases_it(kernel):
    host, api, log = setup(kernel)
    pfn = api.gfn_to_pfn(RAM, "f")
    old, new = host.host_remap(RAM)
    assert old == pfn and new != pfn
    assert pfn in host.frames and host.frames[pfn].count == 1 and not host.frames[pfn].host_mapped
    assert api.gfn_to_pfn(RAM, "f") == new  # a new fault sees the new frame
    api.kvm_release_pfn_clean(pfn, "rmap_remove")  # the stale spte's reference
    assert pfn not in host.frames  # the last put freed it
    assert host.frames[new].count == 1


def test_hook_may_be_absent_or_set_later():
    host = Host()
    host.set_memslot(0, 0, 4, "ram")
    api = PfnApi(host, "pfn")
    pfn = api.gfn_to_pfn(1, "f")
    api.kvm_release_pfn_dirty(pfn, "g")
    assert host.frame(pfn).count == 0 and host.frame(pfn).dirty
    seen = []
    api.hook = lambda *a: seen.append(a)
    api.kvm_get_pfn(pfn, "h")
    assert seen == [("get", pfn, "kvm_get_pfn", "h")]
