"""The host model: frames, the allocator, memslots and vmas, guest memory contents, host_remap."""

from __future__ import annotations

import random

import pytest

from kvmpfn.host import (
    BAD_PFN,
    DEFAULT_FIRST_PFN,
    HVA_BASE,
    MMIO_PFN_BASE,
    Frame,
    Host,
    HostError,
    pfn_valid,
)

HPAGE = 1 << 21


def make_host(*slots: tuple[int, int, int, str], **kw) -> Host:
    host = Host(**kw)
    for slot in slots:
        host.set_memslot(*slot)
    return host


def touch(host: Host, gfn: int) -> int | None:
    hva = host.gfn_to_hva(gfn)
    assert hva is not None
    return host.get_user_pages(hva)


def frames_snapshot(host: Host) -> dict[int, tuple]:
    return {
        pfn: (f.count, f.dirty, f.accessed, f.host_mapped, f.reserved, f.struct_page, bytes(f.data or b""))
        for pfn, f in host.frames.items()
    }


# -- frames and bad_page ---------------------------------------------------------------------------
def test_bad_page_is_a_zeroed_ram_frame_outside_the_allocator():
    host = Host()
    assert host.bad_pfn == BAD_PFN == 0x800
    bad = host.frame(BAD_PFN)
    assert bad.struct_page and not bad.reserved and bad.count == 0 and bad.host_mapped
    assert bad.data is None  # zeroed
    assert BAD_PFN in host.frames


def test_allocator_skips_bad_pfn_when_its_range_reaches_it():
    host = make_host((0, 0, 4, "ram"), first_pfn=0x7FF)
    assert [touch(host, g) for g in range(3)] == [0x7FF, 0x801, 0x802]
    hostl = make_host((0, 0, 512, "hugetlb"), first_pfn=0x700)
    assert touch(hostl, 0) == 0xA00  # 0x800 block holds bad_pfn: next aligned block


def test_frames_never_handed_out_are_free_ram():
    host = Host()
    f = host.frame(0x123456)
    assert isinstance(f, Frame)
    assert f.struct_page and not f.reserved and f.count == 0 and not f.host_mapped
    dev = host.frame(MMIO_PFN_BASE + 5)
    assert not dev.struct_page
    assert pfn_valid(MMIO_PFN_BASE - 1) and not pfn_valid(MMIO_PFN_BASE)
    assert host.pfn_valid(0x100000) and not host.pfn_valid(MMIO_PFN_BASE + 5)


@pytest.mark.parametrize("first_pfn", [-1, MMIO_PFN_BASE, True, "0x100000"])
def test_first_pfn_out_of_range_is_a_host_error(first_pfn):
    with pytest.raises(HostError) as err:
        Host(first_pfn=first_pfn)
    assert err.value.field == "host.first_pfn"
    assert isinstance(err.value, ValueError)


# -- the allocator ---------------------------------------------------------------------------------
def test_allocator_hands_out_frames_in_touch_order_from_first_pfn():
    host = make_host((0, 0, 64, "ram"))
    order = [7, 3, 7, 60, 0]
    pfns = [touch(host, g) for g in order]
    first = DEFAULT_FIRST_PFN
    assert pfns == [first, first + 1, first, first + 2, first + 3]
    for pfn in set(pfns):
        f = host.frames[pfn]
        assert f.struct_page and f.host_mapped and f.count == 0 and not f.reserved


def test_allocator_honours_first_pfn_and_is_deterministic():
    runs = []
    for _ in range(2):
        host = make_host((0, 0, 4096, "ram"), (1, 0x10000, 1024, "hugetlb"), first_pfn=0x345678)
        rng = random.Random(7)
        gfns = [rng.choice([rng.randrange(4096), 0x10000 + rng.randrange(1024)]) for _ in range(200)]
        runs.append([touch(host, g) for g in gfns])
    assert runs[0] == runs[1]
    assert min(runs[0]) >= 0x345678


def test_hugetlb_first_touch_allocates_512_aligned_contiguous_frames():
    host = make_host((0, 0, 4, "ram"), (1, 0x200, 1024, "hugetlb"))
    assert touch(host, 0) == 0x100000
    pfn = touch(host, 0x200 + 37)
    head = pfn - 37
    assert head % 512 == 0 and head == 0x100200
    assert [host.peek_pfn(0x200 + i) for i in range(512)] == list(range(head, head + 512))
    assert all(host.frame(head + i).host_mapped for i in range(512))
    # the second 2 MiB region is untouched, and gets its own aligned block
    assert host.peek_pfn(0x400) is None
    assert touch(host, 0x5FF) == 0x100400 + 511
    assert touch(host, 1) == 0x100600  # the ram cursor continues after the hugetlb block
    assert host.is_hugetlb(0x300) and not host.is_hugetlb(1) and not host.is_hugetlb(0x9000)


def test_hugetlb_unaligned_slot_fills_its_2mib_region():
    host = make_host((0, 0x1F0, 32, "hugetlb"))  # covers the tail of region 0 and the head of region 1
    a = touch(host, 0x1F0)
    assert a % 512 == 0x1F0 and host.peek_pfn(0x1FF) == a + 15
    b = touch(host, 0x200)
    assert b % 512 == 0 and b != a - 0x1F0
    assert host.gfn_to_hva(0x200) % HPAGE == 0


def test_reserved_frames_have_a_struct_page_and_page_reserved():
    host = make_host((0, 0, 16, "reserved"))
    f = host.frame(touch(host, 3))
    assert f.struct_page and f.reserved and f.host_mapped


def test_mmio_frames_have_no_struct_page_and_gup_fails():
    host = make_host((0, 0, 16, "ram"), (1, 0xFE000, 16, "mmio"), (2, 0xFF000, 4, "mmio"))
    hva = host.gfn_to_hva(0xFE003)
    assert host.get_user_pages(hva) is None
    pfn = host.follow_pfnmap(hva)
    assert pfn is not None and pfn >= MMIO_PFN_BASE and not pfn_valid(pfn)
    assert host.peek_pfn(0xFE003) == pfn
    assert host.frame(pfn).struct_page is False
    assert [host.peek_pfn(0xFE000 + i) for i in range(16)] == [pfn - 3 + i for i in range(16)]
    other = host.peek_pfn(0xFF000)
    assert other >= MMIO_PFN_BASE and other not in range(pfn - 3, pfn + 13)  # disjoint windows
    assert host.follow_pfnmap(host.gfn_to_hva(0)) is None  # not a PFNMAP vma
    assert host.slot_backing(0xFE003) == "mmio"
    # no RAM frame was allocated for the mmio slot
    assert all(pfn_valid(p) for p in host.frames if host.frames[p].host_mapped)


def test_gup_outside_every_vma_fails():
    host = make_host((0, 0, 16, "ram"))
    assert host.get_user_pages(HVA_BASE - 4096) is None
    assert host.get_user_pages(host.gfn_to_hva(15) + 4 * HPAGE) is None
    assert host.follow_pfnmap(0x1000) is None


# -- memslots --------------------------------------------------------------------------------------
def test_default_layout_hva_congruent_to_gpa_mod_2mib_and_disjoint():
    host = make_host((0, 0, 1000, "ram"), (1, 0x12345, 700, "hugetlb"), (2, 0xFE001, 3, "mmio"))
    ranges = []
    for ms in host.memslots:
        assert ms.userspace_addr % HPAGE == (ms.base_gfn << 12) % HPAGE
        assert ms.userspace_addr >= HVA_BASE
        for gfn in (ms.base_gfn, ms.base_gfn + ms.npages - 1):
            assert host.gfn_to_hva(gfn) % HPAGE == (gfn << 12) % HPAGE
            assert host.hva_to_gfn(host.gfn_to_hva(gfn)) == gfn
        ranges.append((ms.userspace_addr, ms.userspace_addr + ms.npages * 4096))
    ranges.sort()
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert host.gfn_to_hva(1000) is None and host.gfn_to_memslot(1000) is None


def test_memslots_iterate_in_slot_order():
    host = make_host((5, 0, 1, "ram"), (2, 10, 1, "ram"), (9, 5, 1, "mmio"))
    assert [ms.slot for ms in host.memslots] == [2, 5, 9]
    assert host.memslot(9).backing == "mmio" and host.memslot(3) is None


def test_memslot_move_keeps_memory_of_the_hvas_it_still_covers():
    host = make_host((0, 0x1000, 64, "ram"))
    pfn = touch(host, 0x1005)
    host.write_guest(0x1005 << 12, 0xDEADBEEF, 4)
    host.set_memslot(0, 0x3000, 64, "ram")  # same 2 MiB phase: the same hvas
    assert host.gfn_to_memslot(0x1005) is None and host.peek_pfn(0x1005) is None
    assert host.peek_pfn(0x3005) == pfn
    assert host.read_guest(0x3005 << 12, 4) == 0xDEADBEEF
    assert host.frames[pfn].host_mapped


def test_memslot_move_to_another_2mib_phase_shifts_hvas():
    host = make_host((0, 0x1000, 64, "ram"))
    first = touch(host, 0x1000)
    pfn = touch(host, 0x1005)
    hva = host.gfn_to_hva(0x1005)
    host.set_memslot(0, 0x3002, 64, "ram")  # the window's page offsets stay; the slot now starts at offset 2
    assert host.gfn_to_hva(0x3002) % HPAGE == (0x3002 << 12) % HPAGE
    assert host.gfn_to_hva(0x3005) == hva and host.peek_pfn(0x3005) == pfn
    assert host.gfn_to_memslot(0x3000) is None  # offset 0's page is no longer in the slot
    assert host.frames[first].host_mapped  # but the host still maps it
    host.set_memslot(0, 0x1000, 64, "ram")
    assert host.peek_pfn(0x1000) == first


def test_memslot_resize_keeps_covered_memory_and_grows():
    host = make_host((0, 0, 16, "ram"), (1, 0x100000, 1, "ram"))
    pfn = touch(host, 3)
    host.write_guest(3 << 12, 0x1234, 2)
    host.set_memslot(0, 0, 4096, "ram")  # outgrows its window: mremap'ed
    assert host.peek_pfn(3) == pfn and host.read_guest(3 << 12, 2) == 0x1234
    new = touch(host, 4000)
    assert new != pfn and host.peek_pfn(4000) == new
    host.set_memslot(0, 0, 2, "ram")  # shrink: gfn 3 leaves the slot
    assert host.peek_pfn(3) is None and host.gfn_to_hva(3) is None
    host.set_memslot(0, 0, 8, "ram")  # and comes back with its memory
    assert host.peek_pfn(3) == pfn and host.read_guest(3 << 12, 2) == 0x1234
    # hva ranges stay disjoint after the remap
    a, b = host.memslot(0), host.memslot(1)
    assert a.userspace_addr + a.npages * 4096 <= b.userspace_addr or b.userspace_addr + 4096 <= a.userspace_addr


def test_memslot_delete_unmaps_its_memory():
    host = make_host((0, 0, 16, "ram"), (1, 16, 16, "ram"))
    pfn = touch(host, 17)
    host.frames[pfn].count = 1  # as if KVM held a reference
    other = touch(host, 18)
    host.set_memslot(1, 0, 0, "ram")
    assert host.gfn_to_memslot(17) is None and host.peek_pfn(17) is None
    assert pfn in host.frames and not host.frames[pfn].host_mapped  # alive while referenced
    assert other not in host.frames  # freed
    host.set_memslot(1, 16, 16, "ram")  # a new creation: fresh memory
    assert host.peek_pfn(17) is None
    assert host.read_guest(17 << 12, 8) == 0


def test_memslot_backing_change_is_a_new_mapping():
    host = make_host((0, 0, 512, "ram"))
    pfn = touch(host, 1)
    host.set_memslot(0, 0, 512, "hugetlb")
    assert pfn not in host.frames
    assert host.peek_pfn(1) is None and host.is_hugetlb(1)


def test_memslot_errors():
    host = make_host((0, 0x100, 0x100, "ram"), (1, 0x300, 0x10, "mmio"))
    cases = [
        ((2, 0x1FF, 2, "ram"), "gfn"),  # overlaps slot 0's tail
        ((2, 0xF0, 0x11, "ram"), "gfn"),  # overlaps slot 0's head
        ((2, 0x0, 0x1000, "ram"), "gfn"),  # covers both
        ((0, 0x200, 0x101, "ram"), "gfn"),  # slot 0 grown into slot 1
        ((3, 0, 0, "ram"), "slot"),  # deleting a slot that does not exist
        ((2, 0, -1, "ram"), "npages"),
        ((-1, 0, 1, "ram"), "slot"),
        ((2, 0, 1, "rom"), "backing"),
        ((2, -1, 1, "ram"), "gfn"),
        ((2, (1 << 40) - 1, 2, "ram"), "gfn"),
        ((2, "0", 1, "ram"), "gfn"),
        ((2, 0, True, "ram"), "npages"),
    ]
    for args, field in cases:
        with pytest.raises(HostError) as err:
            host.set_memslot(*args)
        assert err.value.field == field, args
        assert str(err.value).startswith(f"{field}: ")
    # nothing changed
    assert [(m.slot, m.base_gfn, m.npages) for m in host.memslots] == [(0, 0x100, 0x100), (1, 0x300, 0x10)]
    host.set_memslot(2, 0x200, 0x100, "ram")  # exactly adjacent on both sides is fine
    host.set_memslot(0, 0x0, 0x200, "ram")  # slot 0 may overlap its own old range
    assert host.gfn_to_memslot(0x1FF).slot == 0 and host.gfn_to_memslot(0x200).slot == 2


def test_ten_thousand_slots_lookup():
    host = Host()
    rng = random.Random(1)
    slots = []
    gfn = 0
    for i in range(10_000):
        gfn += rng.randrange(0, 5)  # gaps, sometimes none
        npages = rng.randrange(1, 9)
        slots.append((i, gfn, npages))
        gfn += npages
    order = list(slots)
    rng.shuffle(order)
    for slot, base, npages in order:
        host.set_memslot(slot, base, npages, "ram")
    assert len(host.memslots) == 10_000
    for slot, base, npages in slots:
        for g in (base, base + npages - 1):
            ms = host.gfn_to_memslot(g)
            assert ms is not None and ms.slot == slot
            assert host.hva_to_gfn(host.gfn_to_hva(g)) == g
    covered = {g for _, base, npages in slots for g in range(base, base + npages)}
    for g in range(gfn + 10):
        assert (host.gfn_to_memslot(g) is not None) == (g in covered)
    # delete every other slot, then look up again
    for slot, base, _ in slots[::2]:
        host.set_memslot(slot, base, 0, "ram")
    for i, (slot, base, _) in enumerate(slots):
        ms = host.gfn_to_memslot(base)
        assert (ms is None) if i % 2 == 0 else (ms.slot == slot)


# -- guest memory ----------------------------------------------------------------------------------
class Image:
    def __init__(self, pages: dict[int, bytes]):
        self.pages = pages
        self.reads: list[int] = []

    def read_page(self, gfn: int) -> bytes | None:
        self.reads.append(gfn)
        return self.pages.get(gfn)


def test_read_never_allocates():
    host = make_host((0, 0, 16, "ram"), (1, 0x200, 512, "hugetlb"))
    before = frames_snapshot(host)
    assert host.read_guest(0x3008, 8) == 0
    assert host.read_guest(0x200 << 12, 4) == 0
    assert host.read_bytes(0xFF8, 16) == bytes(16)
    assert host.read_guest(0x10_0000_0000, 8) == 0  # outside every slot
    assert frames_snapshot(host) == before
    assert host.peek_pfn(3) is None


def test_write_read_little_endian_and_page_crossing():
    host = make_host((0, 0, 16, "ram"))
    assert host.write_guest(0x1000, 0x1122334455667788, 8)
    assert host.peek_pfn(1) is not None
    assert host.read_guest(0x1000, 8) == 0x1122334455667788
    assert host.read_guest(0x1000, 1) == 0x88 and host.read_guest(0x1006, 2) == 0x1122
    assert host.read_bytes(0x1000, 2) == b"\x88\x77"
    assert host.write_guest(0x2000, 0x1FF, 1)  # truncated to the size
    assert host.read_guest(0x2000, 2) == 0xFF
    assert host.write_guest(0x2FFC, 0xAABBCCDDEEFF0011, 8)  # crosses into gfn 3
    assert host.read_guest(0x2FFC, 8) == 0xAABBCCDDEEFF0011
    assert host.read_guest(0x3000, 4) == 0xAABBCCDD


def test_write_outside_every_slot_is_dropped():
    host = make_host((0, 0, 16, "ram"))
    before = frames_snapshot(host)
    assert host.write_guest(16 << 12, 5, 4) is False
    assert host.read_guest(16 << 12, 4) == 0
    assert frames_snapshot(host) == before
    assert host.write_bytes(0xFFFE, b"\x01\x02\x03\x04") is False  # half inside
    assert host.read_bytes(0xFFFE, 2) == b"\x01\x02"


def test_cmpxchg_guest():
    host = make_host((0, 0, 16, "ram"))
    host.write_guest(0x1008, 0x1000_0001, 8)
    assert host.cmpxchg_guest(0x1008, 8, 0x1000_0000, 0x21) is False
    assert host.read_guest(0x1008, 8) == 0x1000_0001
    assert host.cmpxchg_guest(0x1008, 8, 0x1000_0001, 0x1000_0021) is True
    assert host.read_guest(0x1008, 8) == 0x1000_0021
    assert host.cmpxchg_guest(0x2000, 4, 0, 7) is True  # untouched page reads 0: faulted in
    assert host.read_guest(0x2000, 4) == 7
    assert host.cmpxchg_guest(99 << 12, 4, 0, 7) is False  # outside every slot


def test_memory_image_backs_untouched_pages():
    image = Image({2: b"\x11" * 4096, 0x201: bytes(range(256)) * 16})
    host = make_host((0, 0, 16, "ram"), (1, 0x200, 512, "hugetlb"), memory_image=image)
    before = frames_snapshot(host)
    assert host.read_guest(0x2010, 4) == 0x11111111
    assert host.read_guest(0x201 << 12, 2) == 0x0100
    assert host.read_guest(0x3000, 4) == 0  # image has no page there
    assert frames_snapshot(host) == before
    # first touch copies the image into the frame; the frame then owns the contents
    host.write_guest(0x2000, 0, 1)
    assert host.read_guest(0x2000, 4) == 0x11111100
    touch(host, 0x200)  # hugetlb block: page 0x201 initialised from the image too
    assert bytes(host.frame(host.peek_pfn(0x201)).data[:4]) == b"\x00\x01\x02\x03"


def test_mmio_window_holds_device_contents():
    host = make_host((1, 0xFE000, 16, "mmio"))
    assert host.write_guest(0xFE000008, 0xCAFE, 2)
    assert host.read_guest(0xFE000008, 2) == 0xCAFE
    assert not host.frame(host.peek_pfn(0xFE000)).struct_page


# -- host_remap ------------------------------------------------------------------------------------
def test_host_remap_moves_contents_and_calls_invalidate_hooks_first():
    host = make_host((0, 0x10, 16, "ram"))
    calls = []

    def hook(start, end):
        # invalidate_range_start: the old frame is still mapped
        calls.append((start, end, host.peek_pfn(0x13)))

    host.add_invalidate_hook(hook)
    old = touch(host, 0x13)
    host.write_guest(0x13008, 0x55AA, 2)
    host.frame(old).count = 1  # a KVM reference
    old_pfn, new_pfn = host.host_remap(0x13)
    assert old_pfn == old and new_pfn != old and new_pfn == old + 1
    hva = host.gfn_to_hva(0x13)
    assert calls == [(hva, hva + 4096, old)]
    assert host.peek_pfn(0x13) == new_pfn
    assert host.read_guest(0x13008, 2) == 0x55AA
    assert host.frame(new_pfn).host_mapped and host.frame(new_pfn).count == 0
    f = host.frames[old]
    assert not f.host_mapped and f.count == 1  # alive while KVM holds it
    host.write_guest(0x13008, 0x1111, 2)  # the copy is independent
    assert bytes(f.data[8:10]) == b"\xaa\x55"
    # without KVM references the old frame is freed
    old2, new2 = host.host_remap(0x13)
    assert old2 == new_pfn and new_pfn not in host.frames and new2 in host.frames
    assert len(calls) == 2


def test_host_remap_hugetlb_moves_the_whole_2mib_page():
    host = make_host((0, 0x200, 512, "hugetlb"))
    calls = []
    host.add_invalidate_hook(lambda s, e: calls.append((s, e)))
    pfn = touch(host, 0x234)
    head = pfn - 0x34
    host.write_guest((0x3FF << 12) + 4, 0x77, 1)
    old, new = host.host_remap(0x234)
    assert old == pfn and new % 512 == 0x34 and new - 0x34 != head
    assert [host.peek_pfn(0x200 + i) for i in range(512)] == list(range(new - 0x34, new - 0x34 + 512))
    assert calls == [(host.gfn_to_hva(0x200), host.gfn_to_hva(0x200) + HPAGE)]
    assert host.read_guest((0x3FF << 12) + 4, 1) == 0x77
    assert all(head + i not in host.frames for i in range(512))


def test_host_remap_untouched_mmio_and_outside():
    host = make_host((0, 0, 16, "ram"), (1, 0xFE000, 16, "mmio"))
    calls = []
    host.add_invalidate_hook(lambda s, e: calls.append((s, e)))
    before = frames_snapshot(host)
    assert host.host_remap(5) == (None, None)
    dev = host.peek_pfn(0xFE001)
    assert host.host_remap(0xFE001) == (dev, dev)
    assert frames_snapshot(host) == before and calls == []
    with pytest.raises(HostError) as err:
        host.host_remap(16)
    assert err.value.field == "gfn"


def test_host_remap_reserved_frame_stays_reserved():
    host = make_host((0, 0, 4, "reserved"))
    touch(host, 1)
    _, new = host.host_remap(1)
    assert host.frame(new).reserved


def test_peek_pfn_has_no_side_effects():
    host = make_host((0, 0, 16, "ram"), (1, 0x200, 512, "hugetlb"), (2, 0xFE000, 4, "mmio"))
    touch(host, 2)
    before = frames_snapshot(host)
    cursor = host.allocator.next_pfn
    assert host.peek_pfn(2) == DEFAULT_FIRST_PFN
    assert host.peek_pfn(3) is None and host.peek_pfn(0x250) is None
    assert host.peek_pfn(0xFE002) == host.follow_pfnmap(host.gfn_to_hva(0xFE002))
    assert host.peek_pfn(0x1000) is None
    assert frames_snapshot(host) == before and host.allocator.next_pfn == cursor


# -- what a trace can make the host hold ------------------------------------------------------------
def state_of(host: Host, pfn: int) -> tuple:
    f = host.frame(pfn)
    return f.count, f.dirty, f.accessed, f.host_mapped, f.reserved, f.struct_page, bytes(f.data or bytes(4096))


def test_hugetlb_blocks_take_no_frame_until_one_is_used():
    host = make_host((0, 0, 1 << 20, "hugetlb"))
    heads = [touch(host, block << 9) for block in range(1000)]
    assert len(host.frames) == 1  # bad_page: 512,000 frames mapped, none holding state
    assert len(host.huge_blocks) == 1000 and host.data_pages == 0
    head = heads[7]
    assert [state_of(host, head + i)[3] for i in (0, 1, 511)] == [True] * 3
    assert len(host.frames) == 4  # frame() made the three asked about
    assert host.write_guest((7 << 21) + 8, 0xAB, 1)
    assert host.data_pages == 1 and host.read_guest((7 << 21) + 8, 1) == 0xAB
    assert host.read_guest((7 << 21) + 4096, 8) == 0 and host.data_pages == 1  # a neighbour still reads zero


@pytest.mark.parametrize("referenced", [1, 600])
def test_hugetlb_unmap_frees_the_unused_frames_and_keeps_the_referenced(referenced):
    # the unmap looks at the window's frames or at the frames with state, whichever are fewer
    host = make_host((0, 0, 4096, "hugetlb"), (1, 0x10000, 1024, "ram"))
    for gfn in range(0x10000, 0x10000 + referenced):
        touch(host, gfn)  # ram frames with state: many of them select the other strategy
    heads = [touch(host, block << 9) for block in range(8)]
    held = heads[3] + 5
    host.frame(held).count = 1  # a KVM reference
    host.write_guest((2 << 21) + 4096, 0x55, 1)
    written = heads[2] + 1
    host.set_memslot(0, 0, 0, "ram")
    assert not host.huge_blocks
    assert written not in host.frames and host.data_pages == 0
    f = host.frames[held]
    assert f.count == 1 and not f.host_mapped
    assert not host.frame(heads[5] + 9).host_mapped  # free RAM now
    assert all(host.frames[host.peek_pfn(gfn)].host_mapped for gfn in range(0x10000, 0x10000 + referenced))


def test_hugetlb_remap_carries_contents_only():
    host = make_host((0, 0x200, 512, "hugetlb"))
    head = touch(host, 0x200)
    host.write_guest((0x203 << 12) + 16, 0xBEEF, 2)
    host.write_guest(0x204 << 12, 0, 8)  # written, but still zeros
    host.frame(head + 9).count = 1
    old, new = host.host_remap(0x203)
    assert old == head + 3 and new % 512 == 3
    new_head = new - 3
    assert host.read_guest((0x203 << 12) + 16, 2) == 0xBEEF
    assert set(host.frames) == {BAD_PFN, head + 9, new}  # one frame with contents moved, one held
    assert host.data_pages == 1
    assert state_of(host, new_head + 4) == (0, False, False, True, False, True, bytes(4096))
    assert not host.frame(head + 4).host_mapped


def test_image_zero_pages_take_no_memory():
    zero = bytes(4096)
    image = Image({gfn: zero for gfn in range(0x200, 0x400)} | {0x2FF: b"\x01" * 4096, 5: zero})
    host = make_host((0, 0, 16, "ram"), (1, 0x200, 512, "hugetlb"), memory_image=image)
    head = touch(host, 0x200)
    assert set(host.frames) == {BAD_PFN, head + 0xFF} and host.data_pages == 1
    assert host.read_guest(0x2FF << 12, 1) == 1 and host.read_guest(0x2FE << 12, 8) == 0
    pfn = touch(host, 5)
    assert host.frames[pfn].data is None and host.data_pages == 1


def test_read_cache_is_bounded():
    from kvmpfn.host.memory import PAGE_CACHE

    image = Image({gfn: b"\x02" * 4096 for gfn in range(4 * PAGE_CACHE)})
    host = make_host((0, 0, 4 * PAGE_CACHE, "ram"), memory_image=image)
    assert sum(host.read_guest(gfn << 12, 1) for gfn in range(4 * PAGE_CACHE)) == 8 * PAGE_CACHE
    assert len(host._page_data) <= PAGE_CACHE
    assert len(host.frames) == 1  # reads never allocate


def test_random_operations_keep_frames_and_counts_consistent():
    """Frames with state, 2 MiB blocks and the count of pages with contents agree after any sequence of
    touches, writes, references, remaps and memslot changes."""
    rng = random.Random(21)
    host = make_host((0, 0, 2048, "hugetlb"), (1, 0x1000, 256, "ram"), (2, 0x2000, 64, "reserved"))
    gfns = [*range(0, 2048, 97), *range(0x1000, 0x1100, 13), *range(0x2000, 0x2040, 7)]
    for _ in range(3000):
        gfn = rng.choice(gfns)
        op = rng.randrange(8)
        if host.gfn_to_memslot(gfn) is None:
            if op == 0 and host.memslot(0) is None:
                host.set_memslot(0, 0, 2048, rng.choice(["hugetlb", "ram"]))
            continue
        if op <= 1:
            touch(host, gfn)
        elif op == 2:
            host.write_guest(gfn << 12 | rng.randrange(0, 4096, 8), rng.randrange(3), 8)
        elif op == 3:
            pfn = touch(host, gfn)
            host.frame(pfn).count += 1
        elif op == 4:
            pfn = host.peek_pfn(gfn)
            if pfn is not None and host.frame(pfn).count > 0:
                host.frame(pfn).count -= 1
        elif op == 5:
            host.host_remap(gfn)
        elif op == 6 and host.memslot(0) is not None and rng.random() < 0.05:
            host.set_memslot(0, 0, 0, "ram")
        elif op == 7 and host.memslot(0) is not None and rng.random() < 0.05:  # move, or change the backing
            host.set_memslot(0, rng.choice([0, 0x100]), 2048, rng.choice(["hugetlb", "ram"]))
        for g in (gfn, rng.choice(gfns)):
            pfn = host.peek_pfn(g)
            if pfn is not None:
                assert host.frame(pfn).host_mapped
        assert host.data_pages == sum(f.data is not None for f in host.frames.values())
        mapped = {first >> 9 for ms in host.memslots if ms.backing == "hugetlb" for first in ms.window.pages.values()}
        assert host.huge_blocks == mapped
