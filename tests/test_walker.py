"""kvmpfn.kvm.walker: FNAME(walk_addr) over 32-bit, PAE and 4-level guest tables, against the architecture.

The expectations are written from the SDM and kvm-unit-tests x86/access.c (its ``ac_emulate_access`` rules),
independently of the walker's own tables.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpfn.kvm.walker import (
    WALK_RESTART_LIMIT,
    GuestCpu,
    gpte_access,
    gpte_to_gfn,
    gpte_to_gfn_pde,
    gva_in_range,
    gva_to_gpa,
    is_canonical,
    is_present_pte,
    load_pdptrs,
    pse36_gfn_delta,
    rsvd_bits,
    walk_addr,
)
from kvmpfn.x86 import (
    ACC_ALL,
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    UNMAPPED_GVA,
)

P, W, U, A, D, PS = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7
G = 1 << 8
NX = 1 << 63
EP, EW, EU, ER, EF = (
    PFERR_PRESENT_MASK,
    PFERR_WRITE_MASK,
    PFERR_USER_MASK,
    PFERR_RSVD_MASK,
    PFERR_FETCH_MASK,
)
X = ACC_EXEC_MASK

MODES = ("32", "pae", "64")
ROOT = {"32": 2, "pae": 3, "64": 4}
SIZE = {"32": 4, "pae": 8, "64": 8}
BITS = {"32": 10, "pae": 9, "64": 9}
# Where each level's table lives (the PAE "table" at level 3 is the 32-byte PDPT that CR3 points to).
TABLE = {
    "64": {4: 0x10000, 3: 0x11000, 2: 0x12000, 1: 0x13000},
    "pae": {3: 0x10020, 2: 0x11000, 1: 0x12000},
    "32": {2: 0x10000, 1: 0x11000},
}
CR3 = {"64": 0x10000 | 0x018, "pae": 0x10020 | 0x018, "32": 0x10000 | 0x018}  # ignored low bits set
# Addresses with a different, non-zero index at every level.
ADDR = {
    "64": (0x12 << 39) | (0x34 << 30) | (0x56 << 21) | (0x78 << 12) | 0xABC,
    "pae": (2 << 30) | (0x56 << 21) | (0x78 << 12) | 0xABC,
    "32": (0x123 << 22) | (0x234 << 12) | 0xABC,
}
LEAF = {1: 0x345_6000, 2: 0x460_0000, 3: 0xC000_0000}  # 4K frame, 2 MiB page, 1 GiB page
LEAF_4M = 0x880_0000


class Mem:
    """Dict-backed guest memory (bytes), logging every compare-and-exchange."""

    def __init__(self) -> None:
        self.data: dict[int, int] = {}
        self.log: list[tuple] = []  # shared with callback recorders, in call order
        self.writes: list[tuple[int, int, int, int]] = []

    def store(self, gpa: int, size: int, val: int) -> None:
        for i in range(size):
            self.data[gpa + i] = (val >> (8 * i)) & 0xFF

    def read_guest(self, gpa: int, size: int) -> int:
        return int.from_bytes(bytes(self.data.get(gpa + i, 0) for i in range(size)), "little")

    def cmpxchg_guest(self, gpa: int, size: int, old: int, new: int) -> bool:
        self.log.append(("cmpxchg", gpa, size, old, new))
        if self.read_guest(gpa, size) != old:
            return False
        self.store(gpa, size, new)
        self.writes.append((gpa, size, old, new))
        return True


def entry_gpa(mode: str, addr: int, level: int) -> int:
    if mode == "pae" and level == 3:
        return TABLE["pae"][3] + 8 * ((addr >> 30) & 3)
    index = (addr >> (12 + BITS[mode] * (level - 1))) & ((1 << BITS[mode]) - 1)
    return TABLE[mode][level] + index * SIZE[mode]


@dataclass
class Guest:
    mode: str
    cpu: GuestCpu
    mem: Mem
    addr: int
    gpa: dict[int, int]  # level -> gpa of the entry the walk reads

    def walk(self, write=False, user=False, fetch=False, **kw):
        return walk_addr(self.cpu, self.mem, self.addr, write, user, fetch, **kw)

    def pte(self, level: int) -> int:
        return self.mem.read_guest(self.gpa[level], SIZE[self.mode])

    def snapshot(self) -> dict[int, int]:
        return dict(self.mem.data)


def build(
    mode: str,
    entries: dict[int, int] | None = None,
    *,
    leaf_level: int = 1,
    leaf_addr=None,
    addr=None,
    **cpu_kw,
):
    """Lay out one translation. ``entries[level]`` gives an entry's flag bits (default: P|W|U|A, leaf also D;
    the PAE PDPTE: P); the address part is filled in (the next table, or ``leaf_addr`` at ``leaf_level``)."""
    entries = entries or {}
    addr = ADDR[mode] if addr is None else addr
    if leaf_addr is None:
        leaf_addr = LEAF_4M if (mode == "32" and leaf_level == 2) else LEAF[leaf_level]
    mem = Mem()
    gpa = {}
    for level in range(ROOT[mode], leaf_level - 1, -1):
        if mode == "pae" and level == 3:
            default = P
        else:
            default = P | W | U | A | (D if level == leaf_level else 0)
        target = leaf_addr if level == leaf_level else TABLE[mode][level - 1]
        gpa[level] = entry_gpa(mode, addr, level)
        mem.store(gpa[level], SIZE[mode], target | entries.get(level, default))
    cpu = GuestCpu(mode, CR3[mode], **cpu_kw)
    if mode == "pae":
        cpu.pdptrs = load_pdptrs(cpu, mem)
        assert cpu.pdptrs is not None
    return Guest(mode, cpu, mem, addr, gpa)


def top_level(mode: str) -> int:
    """The highest level whose entry lives in memory and gets an A bit (not the PAE PDPTE registers)."""
    return 2 if mode == "pae" else ROOT[mode]


# ---------------------------------------------------------------------------------------------------------
# Plain translations


@pytest.mark.parametrize("mode", MODES)
def test_4k_translation_fills_the_walker(mode):
    g = build(mode)
    before = g.snapshot()
    ok, w = g.walk()
    assert ok and w.error_code == 0
    assert (w.level, w.gfn) == (1, LEAF[1] >> 12)
    assert w.pte_gpa == [g.gpa[lvl] for lvl in range(1, ROOT[mode] + 1)]
    assert w.ptes == [g.pte(lvl) for lvl in range(1, ROOT[mode] + 1)]
    tables = [TABLE[mode][lvl] >> 12 for lvl in range(1, ROOT[mode] + 1)]
    assert w.table_gfn == tables
    assert (w.pt_access, w.pte_access) == (ACC_ALL, ACC_ALL)
    assert w.access_at == [ACC_ALL] * ROOT[mode]
    assert w.set_accessed == [] and w.set_dirty is None and g.mem.writes == [] and g.snapshot() == before
    assert gva_to_gpa(g.cpu, g.mem, g.addr) == LEAF[1] | 0xABC


def test_pae_pdpte_is_described_at_level_3():
    g = build("pae")
    ok, w = g.walk()
    assert ok
    assert w.table_gfn[2] == 0x10  # CR3 0x10038: PDPT at 0x10020, bits 4:0 ignored
    assert w.pte_gpa[2] == 0x10020 + 8 * 2
    assert w.ptes[2] == TABLE["pae"][2] | P
    assert w.access_at[2] == ACC_ALL


def test_pae_walk_uses_the_pdpte_registers_not_memory():
    g = build("pae")
    g.mem.store(g.gpa[3], 8, 0)  # the guest rewrites its PDPT without reloading CR3
    ok, w = g.walk()
    assert ok and w.gfn == LEAF[1] >> 12
    g.cpu.pdptrs = [0, 0, 0, 0]
    ok, w = g.walk()
    assert not ok and w.level == 3 and w.error_code == 0


def test_high_half_64bit_address_and_big_ints_do_not_crash():
    addr = 0xFFFF_8000_0000_0000 | (0x34 << 30) | (0x56 << 21) | (0x78 << 12)
    g = build("64", addr=addr)
    assert g.gpa[4] == TABLE["64"][4] + 256 * 8
    ok, w = g.walk()
    assert ok and w.gfn == LEAF[1] >> 12
    # Invalid input (the replay engine rejects it) must not raise.
    for mode in MODES:
        walk_addr(build(mode).cpu, build(mode).mem, (1 << 64) - 1, False, False, False)
        walk_addr(build(mode).cpu, build(mode).mem, 1 << 70, True, True, False)


def test_paging_none_is_not_walked():
    cpu = GuestCpu("none", 0)
    with pytest.raises(ValueError):
        walk_addr(cpu, Mem(), 0x1000, False, False, False)
    assert gva_to_gpa(cpu, Mem(), 0x1234_5678) == 0x1234_5678


def test_pae_without_pdptrs_is_a_caller_error():
    g = build("pae")
    g.cpu.pdptrs = None
    with pytest.raises(ValueError):
        g.walk()


# ---------------------------------------------------------------------------------------------------------
# Not-present entries


@pytest.mark.parametrize(
    ("mode", "level"), [(m, lvl) for m in MODES for lvl in range(1, ROOT[m] + 1)], ids=lambda v: str(v)
)
@pytest.mark.parametrize(("write", "user", "fetch"), [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)])
def test_not_present_at_each_level(mode, level, write, user, fetch):
    entries = {lvl: P | W | U for lvl in range(1, ROOT[mode] + 1)}  # A clear everywhere
    entries[level] = W | U | A | D | (0xFFF << 52 if SIZE[mode] == 8 else 0)  # P clear: other bits don't matter
    if mode == "pae":
        entries[3] = P if level != 3 else 0
    g = build(mode, entries, efer_nx=True)
    before = g.snapshot()
    ok, w = g.walk(write, user, fetch)
    fetch_bit = EF if fetch and mode != "32" else 0
    assert not ok
    assert w.error_code == (EW if write else 0) | (EU if user else 0) | fetch_bit
    assert w.level == level and w.pte_gpa[level - 1] == g.gpa[level]
    assert g.snapshot() == before and g.mem.writes == [] and w.set_accessed == []


@pytest.mark.parametrize(
    ("mode", "efer_nx", "smep", "fetch_bit"),
    [
        ("32", True, False, 0),  # no NX in 32-bit paging: the I/D bit does not exist
        ("32", False, True, EF),  # SMEP makes it exist
        ("pae", False, False, 0),
        ("pae", True, False, EF),
        ("64", False, False, 0),
        ("64", False, True, EF),
        ("64", True, False, EF),
    ],
)
def test_fetch_error_code_bit_exists_only_with_nx_paging_or_smep(mode, efer_nx, smep, fetch_bit):
    g = build(mode, {1: W | U | A}, efer_nx=efer_nx, cr4_smep=smep)
    ok, w = g.walk(fetch=True, user=True)
    assert not ok and w.error_code == EU | fetch_bit


# ---------------------------------------------------------------------------------------------------------
# Access rights: an explicit table, then every combination against the access.c rules


def _case(mode, pde=P | W | U | A, pte=P | W | U | A | D, access="r", user=False, ok=True, err=0, **cpu):
    return pytest.param(mode, pde, pte, access, user, cpu, ok, err)


PERMISSION_CASES = [
    _case("64", pte=P | U | A | D, access="w", user=True, ok=False, err=EP | EW | EU),
    _case("64", pte=P | U | A | D, access="w", ok=False, err=EP | EW),  # CR0.WP=1
    _case("64", pte=P | U | A | D, access="w", cr0_wp=False),  # supervisor write ignores R/O
    _case("64", pte=P | U | A | D, access="w", user=True, ok=False, err=EP | EW | EU, cr0_wp=False),
    _case("64", pde=P | U | A, access="w", ok=False, err=EP | EW),  # R/O at the PDE
    _case("32", pde=P | U | A, access="w", cr0_wp=False),
    _case("64", pte=P | W | A | D, user=True, ok=False, err=EP | EU),  # supervisor page
    _case("pae", pde=P | W | A, user=True, ok=False, err=EP | EU),
    _case("32", pte=P | W | A | D, access="x", user=True, ok=False, err=EP | EU),  # no I/D bit in 32-bit
    _case("64", pte=P | W | U | A | D | NX, access="x", ok=False, err=EP | EF),
    _case("64", pde=P | W | U | A | NX, access="x", user=True, ok=False, err=EP | EU | EF),
    _case("pae", pte=P | W | U | A | D | NX, access="x", ok=False, err=EP | EF),
    _case("64", pte=P | W | U | A | D | NX, access="r"),  # NX does not stop reads
    _case("64", pte=P | W | U | A | D, access="x", ok=False, err=EP | EF, cr4_smep=True),
    _case("32", pte=P | W | U | A | D, access="x", ok=False, err=EP | EF, cr4_smep=True),
    _case("64", pte=P | W | U | A | D, access="x", user=True, cr4_smep=True),  # user fetch: fine
    _case("64", pte=P | W | A | D, access="x", cr4_smep=True),  # supervisor page: fine
    _case("64", pte=P | W | U | A | D, ok=False, err=EP, cr4_smap=True),
    _case("pae", pte=P | W | U | A | D, access="w", ok=False, err=EP | EW, cr4_smap=True),
    _case("64", pte=P | W | U | A | D, access="w", cr4_smap=True, ac=True),  # EFLAGS.AC
    _case("64", pte=P | W | U | A | D, access="x", cr4_smap=True),  # SMAP is data only
    _case("32", pte=P | W | U | A | D, user=True, cr4_smap=True),  # user access: no SMAP
    _case("64", pte=P | U | A | D, access="w", ok=False, err=EP | EW, cr0_wp=False, cr4_smap=True),
]


@pytest.mark.parametrize(("mode", "pde", "pte", "access", "user", "cpu", "ok", "err"), PERMISSION_CASES)
def test_permission_table(mode, pde, pte, access, user, cpu, ok, err):
    ac = cpu.pop("ac", False)
    g = build(mode, {2: pde, 1: pte}, **cpu)
    got, w = g.walk(access == "w", user, access == "x", ac=ac)
    assert got == ok
    assert w.error_code == err
    assert w.level == 1 and (w.gfn == LEAF[1] >> 12) == ok


def arch_expect(mode, chain, write, user, fetch, *, efer_nx, cr0_wp, smep, smap, ac):
    """What the architecture says for a walk over ``chain`` (entry values top-down, all present, no reserved
    bits but possibly NX): (outcome, error_code, rights). Formulated after access.c's ac_emulate_access."""
    nx_paging = mode != "32" and efer_nx
    code = (EW if write else 0) | (EU if user else 0) | (EF if fetch and (nx_paging or smep) else 0)
    if mode != "32" and not efer_nx:
        for i, e in enumerate(chain):
            if e & NX:
                return "rsvd", EP | ER | code, i
    writable = all(e & W for e in chain)
    usr = all(e & U for e in chain)
    exe = not (nx_paging and any(e & NX for e in chain))
    rights = (ACC_WRITE_MASK if writable else 0) | (ACC_USER_MASK if usr else 0) | (X if exe else 0)
    kwritable = not cr0_wp and not user
    deny = (
        (user and not usr)
        or (write and not writable and not kwritable)
        or (fetch and not exe)
        or (fetch and usr and not user and smep)
        or (not fetch and usr and not user and smap and not ac)
    )
    return ("fault" if deny else "ok"), (EP | code if deny else 0), rights


ACCESSES = [(w_, u_, f_) for u_ in (False, True) for (w_, f_) in ((False, False), (True, False), (False, True))]
CPU_FLAGS = list(itertools.product((False, True), repeat=5))  # efer_nx, cr0_wp, smep, smap, ac


@pytest.mark.parametrize("mode", MODES)
def test_every_permission_combination_matches_the_architecture(mode):
    nx_bits = (0, NX) if mode != "32" else (0,)
    pdpte_ro = (False, True) if mode == "64" else (False,)
    checked = 0
    for pde_w, pde_u, pde_nx, ps, ro in itertools.product((0, W), (0, U), nx_bits, (False, True), pdpte_ro):
        pte_choices = [None] if ps else list(itertools.product((0, W), (0, U), nx_bits))
        for pte_bits in pte_choices:
            pde = P | pde_w | pde_u | pde_nx | (PS if ps else 0)  # A clear: the walk must set it
            entries = {2: pde}
            if mode == "64":
                entries[3] = P | U | A | (0 if ro else W)
            if not ps:
                entries[1] = P | sum(pte_bits)  # A and D clear
            g = build(mode, entries, leaf_level=2 if ps else 1)
            leaf = 2 if ps else 1
            chain = [g.pte(lvl) for lvl in range(top_level(mode), leaf - 1, -1)]
            fresh = g.snapshot()
            for (write, user, fetch), (nx, wp, smep, smap, ac) in itertools.product(ACCESSES, CPU_FLAGS):
                g.mem.data, g.mem.writes = dict(fresh), []
                g.cpu.efer_nx, g.cpu.cr0_wp, g.cpu.cr4_smep, g.cpu.cr4_smap = nx, wp, smep, smap
                flags = dict(efer_nx=nx, cr0_wp=wp, smep=smep, smap=smap, ac=ac)
                outcome, err, rights = arch_expect(mode, chain, write, user, fetch, **flags)
                ok, w = g.walk(write, user, fetch, ac=ac)
                where = (mode, hex(pde), pte_bits, ro, write, user, fetch, flags)
                assert ok == (outcome == "ok"), where
                assert w.error_code == err, where
                if outcome == "rsvd":
                    assert w.level == top_level(mode) - rights, where
                else:
                    assert w.level == leaf and w.pte_access == rights, where
                if ok:
                    assert w.gfn == (LEAF_4M >> 12 if (ps and mode == "32") else LEAF[leaf] >> 12) + (
                        (g.addr >> 12) & ((1 << (BITS[mode] if ps else 0)) - 1)
                    ), where
                    expected_a = [g.gpa[lvl] for lvl in range(2, leaf - 1, -1)]
                    assert w.set_accessed == expected_a, where
                    assert w.set_dirty == (g.gpa[leaf] if write else None), where
                    assert [x[0] for x in g.mem.writes] == expected_a + ([g.gpa[leaf]] if write else []), where
                else:
                    assert g.mem.writes == [] and w.set_accessed == [] and w.set_dirty is None, where
                checked += 1
    assert checked == {"32": 20, "pae": 72, "64": 144}[mode] * len(ACCESSES) * len(CPU_FLAGS)


@pytest.mark.parametrize("mode", ("pae", "64"))
def test_access_at_is_the_and_down_to_each_level(mode):
    # PDPTE (64) read-only; PDE supervisor and NX; PTE writable user.
    entries = {2: P | W | A | NX, 1: P | W | U | A | D}
    if mode == "64":
        entries[3] = P | U | A
    g = build(mode, entries)
    ok, w = g.walk()
    assert ok
    if mode == "64":
        assert w.access_at == [0, 0, ACC_USER_MASK | X, ACC_ALL]
        assert (w.pt_access, w.pte_access) == (0, 0)
    else:
        assert w.access_at == [ACC_WRITE_MASK, ACC_WRITE_MASK, ACC_ALL]
        assert (w.pt_access, w.pte_access) == (ACC_WRITE_MASK, ACC_WRITE_MASK)


def test_nx_ignored_for_rights_when_efer_nx_is_off_is_reserved_instead():
    g = build("64", {1: P | W | U | A | D | NX}, efer_nx=False)
    ok, w = g.walk()
    assert not ok and w.error_code == EP | ER and w.level == 1


# ---------------------------------------------------------------------------------------------------------
# Reserved bits


def _rsvd(mode, level, bits, rsvd, leaf_level=1, **cpu):
    return pytest.param(mode, level, bits, leaf_level, cpu, rsvd, id=f"{mode}-L{level}-{bits:#x}-{cpu}")


RSVD_CASES = [
    # 4-level: bits 51:MAXPHYADDR at every level, 62:52 ignored.
    *[_rsvd("64", lvl, 1 << 51, True) for lvl in (4, 3, 2, 1)],
    *[_rsvd("64", lvl, 1 << 40, True) for lvl in (4, 3, 2, 1)],
    _rsvd("64", 1, 1 << 39, False),
    _rsvd("64", 1, 1 << 51, False, maxphyaddr=52),
    _rsvd("64", 1, 1 << 46, True, maxphyaddr=46),
    _rsvd("64", 1, 1 << 36, True, maxphyaddr=36),
    *[_rsvd("64", lvl, 1 << 52 | 1 << 62, False) for lvl in (4, 3, 2, 1)],
    *[_rsvd("64", lvl, NX, True, efer_nx=False) for lvl in (4, 3, 2, 1)],
    *[_rsvd("64", lvl, NX, False) for lvl in (4, 3, 2)],
    _rsvd("64", 4, PS, True),
    _rsvd("64", 4, PS, True, gbpages=True),
    _rsvd("64", 3, PS, True),
    _rsvd("64", 1, PS | G | D, False),  # PAT, G in a 4K pte
    _rsvd("64", 2, D | G, False),  # ignored in a non-leaf PDE
    # 2 MiB leaves: bits 20:13; bit 12 is PAT.
    *[_rsvd("64", 2, 1 << b, True, leaf_level=2) for b in (13, 16, 20)],
    _rsvd("64", 2, 1 << 12, False, leaf_level=2),
    _rsvd("64", 2, 1 << 40, True, leaf_level=2),
    # 1 GiB leaves: bits 29:13.
    *[_rsvd("64", 3, 1 << b, True, leaf_level=3, gbpages=True) for b in (13, 21, 29)],
    _rsvd("64", 3, 1 << 12, False, leaf_level=3, gbpages=True),
    # PAE: bits 62:MAXPHYADDR.
    *[_rsvd("pae", lvl, 1 << b, True) for lvl in (2, 1) for b in (40, 51, 52, 62)],
    _rsvd("pae", 1, 1 << 39, False),
    _rsvd("pae", 1, 1 << 51, False, maxphyaddr=52),
    _rsvd("pae", 1, 1 << 52, True, maxphyaddr=52),
    *[_rsvd("pae", lvl, NX, True, efer_nx=False) for lvl in (2, 1)],
    *[_rsvd("pae", 2, 1 << b, True, leaf_level=2) for b in (13, 20)],
    _rsvd("pae", 2, 1 << 12, False, leaf_level=2),
    _rsvd("pae", 1, PS, False),
    # 32-bit: 4 MiB pages reserve bit 21 and the PSE-36 bits at or above MAXPHYADDR.
    _rsvd("32", 2, 1 << 21, True, leaf_level=2),
    *[_rsvd("32", 2, 1 << b, False, leaf_level=2) for b in (12, 13, 16, 17, 20)],
    *[_rsvd("32", 2, 1 << b, False, leaf_level=2, maxphyaddr=36) for b in (13, 16)],
    *[_rsvd("32", 2, 1 << b, True, leaf_level=2, maxphyaddr=36) for b in (17, 20)],
    *[_rsvd("32", 2, 1 << b, True, leaf_level=2, maxphyaddr=32) for b in (13, 20)],
    _rsvd("32", 2, 1 << 13, False, leaf_level=2, maxphyaddr=52),
    _rsvd("32", 2, 1 << 20, False, leaf_level=2, maxphyaddr=52),
    _rsvd("32", 1, 0xFFF & ~P, False),  # nothing is reserved in a 32-bit 4K pte
    _rsvd("32", 2, 0xFFF & ~(P | PS), False),
]


@pytest.mark.parametrize(("mode", "level", "bits", "leaf_level", "cpu", "rsvd"), RSVD_CASES)
@pytest.mark.parametrize(("write", "user"), [(False, False), (True, True)])
def test_reserved_bits(mode, level, bits, leaf_level, cpu, rsvd, write, user):
    base = P | W | U | (PS if level == leaf_level and leaf_level > 1 else 0)  # A, D clear: a write sets them
    g = build(mode, {level: base | bits}, leaf_level=leaf_level, **cpu)
    before = g.snapshot()
    ok, w = g.walk(write, user)
    code = (EW if write else 0) | (EU if user else 0)
    if rsvd:
        assert not ok and w.error_code == EP | ER | code and w.level == level
        assert g.snapshot() == before and w.set_accessed == [] and w.set_dirty is None
    else:
        assert ok and w.error_code == 0 and w.level == leaf_level
        assert g.pte(level) & A and (not write or g.pte(leaf_level) & D)


@pytest.mark.parametrize("level", (4, 3, 2))
def test_reserved_bits_stop_the_walk_before_a_lower_not_present_entry(level):
    entries = {lvl: P | W | U | A for lvl in (4, 3, 2)}
    entries[level] |= 1 << 51
    entries[1] = 0
    g = build("64", entries)
    ok, w = g.walk(write=True)
    assert not ok and w.error_code == EP | ER | EW and w.level == level


# ---------------------------------------------------------------------------------------------------------
# Large pages


def test_32bit_pse_off_ignores_ps_and_walks_the_page_table():
    # With CR4.PSE=0 the PDE's PS bit means nothing: the PDE still points at the page table.
    g = build("32", {2: P | W | U | A | PS}, cr4_pse=False)
    ok, w = g.walk()
    assert ok and w.level == 1 and w.gfn == LEAF[1] >> 12
    assert w.table_gfn[0] == TABLE["32"][1] >> 12


def test_32bit_4m_page_with_pse36():
    pse36 = 0xA5  # physical address bits 39:32
    g = build("32", {2: P | W | U | A | PS | (pse36 << 13)}, leaf_level=2, maxphyaddr=40)
    ok, w = g.walk(write=True)
    index = (ADDR["32"] >> 12) & 0x3FF
    assert ok and w.level == 2
    assert w.gfn == (pse36 << 20) + (LEAF_4M >> 12) + index
    assert gva_to_gpa(g.cpu, g.mem, g.addr, set_ad=False) == (pse36 << 32) | LEAF_4M | (ADDR["32"] & 0x3FFFFF)
    assert w.set_accessed == [] and w.set_dirty == g.gpa[2] and g.pte(2) & D
    assert w.pt_access == ACC_ALL and w.access_at == [0, ACC_ALL]


@pytest.mark.parametrize("mode", ("pae", "64"))
def test_2m_page(mode):
    g = build(mode, {2: P | U | A | PS}, leaf_level=2)  # D clear, read-only
    ok, w = g.walk(write=True, user=True)
    assert not ok and w.error_code == EP | EW | EU and g.mem.writes == []
    ok, w = g.walk(write=True)  # supervisor, CR0.WP=1
    assert not ok
    g.cpu.cr0_wp = False
    ok, w = g.walk(write=True)
    assert ok and w.level == 2 and w.gfn == (LEAF[2] >> 12) + ((g.addr >> 12) & 0x1FF)
    assert w.set_dirty == g.gpa[2] and w.ptes[1] == g.pte(2) and g.pte(2) & D
    assert w.pte_access == ACC_USER_MASK | X


def test_1g_page_with_gbpages():
    g = build("64", {4: P | W | U, 3: P | W | U | PS}, leaf_level=3, gbpages=True)
    ok, w = g.walk(write=True)
    assert ok and w.level == 3
    assert w.gfn == (LEAF[3] >> 12) + ((g.addr >> 12) & 0x3FFFF)
    assert w.set_accessed == [g.gpa[4], g.gpa[3]] and w.set_dirty == g.gpa[3]
    assert w.access_at == [0, 0, ACC_ALL, ACC_ALL] and w.table_gfn[0] == w.table_gfn[1] == 0
    g.cpu.gbpages = False
    ok, w = g.walk()
    assert not ok and w.error_code == EP | ER and w.level == 3


def test_large_page_helpers():
    cpu64, cpu32 = GuestCpu("64", 0), GuestCpu("32", 0)
    assert gpte_to_gfn_pde(cpu64, 0x4060_0000 | PS | (1 << 12) | P) == 0x40600
    assert gpte_to_gfn_pde(cpu64, 0xC000_0000 | (1 << 21) | PS | P, 3) == 0xC0000
    assert gpte_to_gfn_pde(cpu32, 0x8840_0000 | (0xF << 13) | PS | P) == 0x88400
    assert pse36_gfn_delta(0x8840_0000 | (0x3 << 13)) == 0x3 << 20
    assert pse36_gfn_delta(0xFF << 13) == 0xFF << 20
    assert gpte_to_gfn(cpu64, (0xF << 60) | (1 << 51) | 0x1234_5000 | 0xFFF) == (1 << 39) | 0x12345
    assert gpte_to_gfn(cpu32, 0x1234_5FFF) == 0x12345


def test_gpte_access():
    assert gpte_access(GuestCpu("64", 0), P | W | U) == ACC_ALL
    assert gpte_access(GuestCpu("64", 0), P | NX) == 0
    assert gpte_access(GuestCpu("64", 0, efer_nx=False), P | U | NX) == ACC_USER_MASK | X
    assert gpte_access(GuestCpu("32", 0), P | W | NX) == ACC_WRITE_MASK | X
    assert gpte_access(GuestCpu("pae", 0), P | W | NX) == ACC_WRITE_MASK
    assert is_present_pte(P) and not is_present_pte(0xFFE)


# ---------------------------------------------------------------------------------------------------------
# Accessed and dirty bits


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("write", (False, True))
def test_a_bits_set_top_down_only_where_missing(mode, write):
    levels = list(range(top_level(mode), 0, -1))
    for have_a in itertools.product((False, True), repeat=len(levels)):
        entries = {lvl: P | W | U | (A if a else 0) for lvl, a in zip(levels, have_a, strict=True)}
        g = build(mode, entries)
        ok, w = g.walk(write)
        missing = [g.gpa[lvl] for lvl, a in zip(levels, have_a, strict=True) if not a]
        assert ok and w.set_accessed == missing
        assert w.set_dirty == (g.gpa[1] if write else None)
        assert all(g.pte(lvl) & A for lvl in levels)
        assert bool(g.pte(1) & D) == write
        assert w.ptes[: len(levels)] == [g.pte(lvl) for lvl in range(1, len(levels) + 1)]
        assert all(size == SIZE[mode] for _, size, _, _ in g.mem.writes)
        if mode == "pae":
            assert g.gpa[3] not in w.set_accessed and g.pte(3) == TABLE["pae"][2] | P


@pytest.mark.parametrize("mode", MODES)
def test_no_ad_bits_on_any_kind_of_fault(mode):
    # The 2008 kernel would have set A on the upper levels before finding these faults.
    ptes = {"not present": 0, "user on supervisor": P | W, "write to r/o": P | U}
    if mode != "32":
        ptes["rsvd"] = P | W | U | (1 << 45)
    for why, pte in ptes.items():
        entries = {lvl: P | W | U for lvl in range(top_level(mode), 1, -1)} | {1: pte}
        g = build(mode, entries)
        before = g.snapshot()
        ok, w = g.walk(write=True, user=True)
        assert not ok and g.snapshot() == before and g.mem.log == [], why
        assert w.set_accessed == [] and w.set_dirty is None, why


@pytest.mark.parametrize("mode", MODES)
def test_callbacks_order_and_arguments(mode):
    entries = {lvl: P | W | U for lvl in range(top_level(mode), 0, -1)}  # no A, no D
    g = build(mode, entries)
    log = g.mem.log
    ok, w = g.walk(
        write=True,
        mark_page_dirty=lambda gfn: log.append(("mark", gfn)),
        pte_write=lambda gpa, new, size: log.append(("pte_write", gpa, new, size)),
    )
    assert ok
    expected = []
    for lvl in range(top_level(mode), 0, -1):
        old = TABLE[mode][lvl - 1] | P | W | U if lvl > 1 else LEAF[1] | P | W | U
        expected += [("mark", TABLE[mode][lvl] >> 12), ("cmpxchg", g.gpa[lvl], SIZE[mode], old, old | A)]
    leaf = LEAF[1] | P | W | U | A
    expected += [("mark", TABLE[mode][1] >> 12), ("cmpxchg", g.gpa[1], SIZE[mode], leaf, leaf | D)]
    expected += [("pte_write", g.gpa[1], leaf | D, SIZE[mode])]
    assert log == expected
    # A read of the same address now finds everything set: no callback at all.
    log.clear()
    ok, w = g.walk(mark_page_dirty=lambda gfn: log.append(gfn), pte_write=lambda *a: log.append(a))
    assert ok and log == [] and w.set_accessed == []


@pytest.mark.parametrize("mode", MODES)
def test_set_ad_false_is_side_effect_free(mode):
    entries = {lvl: P | W | U for lvl in range(top_level(mode), 0, -1)}
    g = build(mode, entries)
    before = g.snapshot()
    calls = []
    ok0, w0 = g.walk(write=True, set_ad=False, mark_page_dirty=calls.append, pte_write=lambda *a: calls.append(a))
    assert ok0 and calls == [] and g.mem.log == [] and g.snapshot() == before
    assert w0.set_accessed == [] and w0.set_dirty is None
    assert gva_to_gpa(g.cpu, g.mem, g.addr, True, set_ad=False) == LEAF[1] | 0xABC and g.snapshot() == before
    ok1, w1 = g.walk(write=True)
    assert (ok1, w1.gfn, w1.level, w1.pte_access, w1.access_at) == (
        ok0,
        w0.gfn,
        w0.level,
        w0.pte_access,
        w0.access_at,
    )
    assert [p & ~(A | D) for p in w1.ptes] == [p & ~(A | D) for p in w0.ptes]
    assert g.snapshot() != before


# ---------------------------------------------------------------------------------------------------------
# Restarts after a lost compare-and-exchange


def test_recursive_self_map_restarts_once():
    # PML4[0x1ff] points at the PML4 itself; following it four times reaches the PML4 page as a 4K frame.
    pml4 = 0x10000
    mem = Mem()
    slot = pml4 + 0x1FF * 8
    mem.store(slot, 8, pml4 | P | W)
    addr = 0xFFFF_FFFF_FFFF_F000 | 0x123
    cpu = GuestCpu("64", pml4)
    ok, w = walk_addr(cpu, mem, addr, True, False, False)
    assert ok and w.gfn == pml4 >> 12 and w.level == 1
    assert w.set_accessed == [slot] and w.set_dirty == slot
    assert mem.read_guest(slot, 8) == pml4 | P | W | A | D
    cmpxchgs = [(gpa, old, new) for _, gpa, _, old, new in mem.log]
    base = pml4 | P | W
    assert cmpxchgs == [(slot, base, base | A), (slot, base, base | A), (slot, base | A, base | A | D)]


class FlakyMem(Mem):
    """Loses the first ``fails`` compare-and-exchanges without changing memory."""

    def __init__(self, fails: int) -> None:
        super().__init__()
        self.fails = fails

    def cmpxchg_guest(self, gpa, size, old, new):
        if self.fails:
            self.fails -= 1
            self.log.append(("lost", gpa))
            return False
        return super().cmpxchg_guest(gpa, size, old, new)


@pytest.mark.parametrize("fails", range(WALK_RESTART_LIMIT + 1))
def test_bounded_restarts_succeed(fails):
    g = build("64", {4: P | W | U, 1: P | W | U | A})
    mem = FlakyMem(fails)
    mem.data = g.mem.data
    ok, w = walk_addr(g.cpu, mem, g.addr, True, False, False)
    assert ok and w.set_accessed == [g.gpa[4]] and w.set_dirty == g.gpa[1]
    assert [e[0] for e in mem.log] == ["lost"] * fails + ["cmpxchg", "cmpxchg"]


@pytest.mark.parametrize("write", (False, True))
def test_cmpxchg_that_never_succeeds_ends_as_a_success_without_ad(write):
    # docs/kernel.md, FNAME(walk_addr): a page table without struct page; the kernel livelocked, the walker stops
    # restarting.
    g = build("64", {4: P | W | U, 1: P | W | U})
    before = g.snapshot()
    mem = FlakyMem(1000)
    mem.data = g.mem.data
    calls = []
    ok, w = walk_addr(g.cpu, mem, g.addr, write, False, False, pte_write=lambda *a: calls.append(a))
    assert ok and w.gfn == LEAF[1] >> 12 and w.error_code == 0
    assert w.set_accessed == [] and w.set_dirty is None and calls == []
    assert g.snapshot() == before and not w.ptes[3] & A and not w.ptes[0] & D
    assert mem.log == [("lost", g.gpa[4])] * (WALK_RESTART_LIMIT + 1)


class RacingMem(Mem):
    """Before the cmpxchg at ``gpa``, another vcpu stores ``val`` there (once)."""

    def __init__(self, gpa: int, val: int) -> None:
        super().__init__()
        self.race = (gpa, val)

    def cmpxchg_guest(self, gpa, size, old, new):
        if self.race and self.race[0] == gpa:
            self.store(gpa, size, self.race[1])
            self.race = None
        return super().cmpxchg_guest(gpa, size, old, new)


def test_restarted_walk_sees_the_racing_store():
    g = build("64", {4: P | W | U, 1: P | W | U})
    leaf_gpa = g.gpa[1]
    mem = RacingMem(leaf_gpa, 0)  # the leaf is zapped just before the walk sets its A bit
    mem.data = g.mem.data
    calls = []
    ok, w = walk_addr(g.cpu, mem, g.addr, True, False, False, pte_write=lambda *a: calls.append(a))
    assert not ok and w.error_code == EW and w.level == 1
    # The PML4E's A bit was set before the race was seen, and stays set (as on hardware).
    assert w.set_accessed == [g.gpa[4]] and mem.read_guest(g.gpa[4], 8) & A
    assert w.set_dirty is None and calls == []


def test_race_on_the_dirty_bit_restarts_and_rereads():
    g = build("64", {1: P | W | U | A})
    mem = RacingMem(g.gpa[1], g.pte(1) | G)  # another vcpu sets G before our D cmpxchg
    mem.data = g.mem.data
    ok, w = walk_addr(g.cpu, mem, g.addr, True, False, False)
    assert ok and w.set_dirty == g.gpa[1] and mem.read_guest(g.gpa[1], 8) == g.pte(1) == LEAF[1] | P | W | U | A | D | G


# ---------------------------------------------------------------------------------------------------------
# PAE PDPTEs


def _pdpt(mem: Mem, values, base=0x10020):
    for i, v in enumerate(values):
        mem.store(base + 8 * i, 8, v)


def test_load_pdptrs_reads_the_four_entries():
    mem = Mem()
    values = [0x1000 | P, 0, 0x3000 | P | (1 << 3) | (1 << 4) | (0x7 << 9), 0xFF_FFFF_F000 | P]
    _pdpt(mem, values)
    assert load_pdptrs(0x10020 | 0x1F, mem, 40) == values
    assert load_pdptrs(GuestCpu("pae", 0x10038), mem) == values


@pytest.mark.parametrize("bit", (1, 2, 5, 6, 7, 8, 40, 51, 52, 62, 63))
def test_load_pdptrs_gp_on_reserved_bits(bit):
    mem = Mem()
    _pdpt(mem, [0x1000 | P, 0x2000 | P | (1 << bit), 0, 0])
    assert load_pdptrs(0x10020, mem, 40) is None
    _pdpt(mem, [0x1000 | P, 0x2000 | (1 << bit), 0, 0])  # not present: not checked
    assert load_pdptrs(0x10020, mem, 40) is not None


def test_load_pdptrs_uses_maxphyaddr():
    mem = Mem()
    _pdpt(mem, [(1 << 45) | P, 0, 0, 0])
    assert load_pdptrs(0x10020, mem, 46) is not None
    assert load_pdptrs(0x10020, mem, 45) is None
    assert load_pdptrs(GuestCpu("pae", 0x10020, maxphyaddr=46), mem) is not None
    assert load_pdptrs(GuestCpu("pae", 0x10020), mem) is None
    assert rsvd_bits(45, 63) == ((1 << 19) - 1) << 45 and rsvd_bits(5, 4) == 0


@pytest.mark.parametrize("index", range(4))
def test_pae_pdpte_not_present(index):
    g = build("pae", addr=(index << 30) | 0x1234)
    g.cpu.pdptrs = [TABLE["pae"][2] | P if i != index else 0 for i in range(4)]
    ok, w = g.walk(user=True, fetch=True)
    assert not ok and w.error_code == EU | EF and w.level == 3
    assert w.table_gfn[2] == 0x10 and w.pte_gpa[2] == 0x10020 + 8 * index and w.ptes[2] == 0
    assert g.mem.log == []


# ---------------------------------------------------------------------------------------------------------
# Address-range helpers and gva_to_gpa


def test_canonical_and_ranges():
    assert is_canonical(0x7FFF_FFFF_FFFF) and is_canonical(0xFFFF_8000_0000_0000) and is_canonical(0)
    assert not is_canonical(0x8000_0000_0000) and not is_canonical(0xFFFF_7FFF_FFFF_FFFF)
    assert not is_canonical(1 << 64) and not is_canonical(-1)
    assert gva_in_range("32", 0xFFFF_FFFF) and not gva_in_range("pae", 1 << 32)
    assert gva_in_range("64", 0xFFFF_FFFF_FFFF_F000) and not gva_in_range("64", 1 << 47)
    assert gva_in_range("none", (1 << 52) - 1) and not gva_in_range("none", 1 << 52)


@pytest.mark.parametrize("mode", MODES)
def test_gva_to_gpa(mode):
    g = build(mode, {1: P | U | A | D})
    assert gva_to_gpa(g.cpu, g.mem, g.addr) == LEAF[1] | 0xABC
    assert gva_to_gpa(g.cpu, g.mem, g.addr, True, True) == UNMAPPED_GVA
    assert gva_to_gpa(g.cpu, g.mem, g.addr ^ (1 << 12)) == UNMAPPED_GVA  # neighbouring pte is empty


# ---------------------------------------------------------------------------------------------------------
# Property: random tables


# (bit, probability that an entry has it): mostly valid entries, so that many walks reach a leaf.
ENTRY_BITS = ((P, 0.97), (W, 0.9), (U, 0.9), (A, 0.5), (D, 0.5), (G, 0.2), (PS, 0.1), (NX, 0.1))
RSVD_BITS = (1 << 45, 1 << 51, 1 << 62)  # reserved for some MAXPHYADDR / modes; added with probability 0.03
TABLE_GFNS = (1, 2, 3, 4, 5, 6)  # page tables live here (aliasing allowed)
LARGE_GFNS = (0x200, 0x40000, 0x123)  # 2 MiB-, 1 GiB-aligned and unaligned frames


def random_entry(rnd, mode: str) -> int:
    value = rnd.choice(TABLE_GFNS if rnd.random() < 0.85 else LARGE_GFNS) << 12
    for bit, p in ENTRY_BITS:
        if rnd.random() < p:
            value |= bit
    if rnd.random() < 0.03:
        value |= rnd.choice(RSVD_BITS)
    return value & 0xFFFF_FFFF if mode == "32" else value


@st.composite
def random_walks(draw):
    mode = draw(st.sampled_from(MODES))
    rnd = random.Random(draw(st.integers(0, 2**64 - 1)))  # uniform draws (hypothesis' own are edge-biased)
    mem = Mem()
    for gfn in TABLE_GFNS:
        for index in range(4):
            mem.store((gfn << 12) + index * SIZE[mode], SIZE[mode], random_entry(rnd, mode))
    if mode == "pae":  # the PDPT at CR3 (gfn 1, entries 0..3): mostly loadable PDPTEs
        for index in range(4):
            pdpte = rnd.choice(TABLE_GFNS) << 12 | P
            if rnd.random() < 0.05:
                pdpte |= rnd.choice((1 << 3, W, NX))  # PWT is fine; W and bit 63 make the load #GP
            mem.store(0x1000 + 8 * index, 8, pdpte if rnd.random() < 0.9 else 0)
    idx = [rnd.randrange(4) for _ in range(4)]
    if mode == "64":
        addr = (idx[3] << 39) | (idx[2] << 30) | (idx[1] << 21) | (idx[0] << 12)
    elif mode == "pae":
        addr = (idx[2] << 30) | (idx[1] << 21) | (idx[0] << 12)
    else:
        addr = (idx[1] << 22) | (idx[0] << 12)
    cpu = GuestCpu(
        mode,
        0x1000,
        cr0_wp=rnd.random() < 0.5,
        efer_nx=rnd.random() < 0.8,
        cr4_pse=rnd.random() < 0.7,
        cr4_smep=rnd.random() < 0.2,
        cr4_smap=rnd.random() < 0.2,
        maxphyaddr=rnd.choice((36, 40, 46, 52)),
        gbpages=rnd.random() < 0.5,
    )
    if mode == "pae":
        cpu.pdptrs = load_pdptrs(cpu, mem)
    write, fetch = rnd.choice(((False, False), (True, False), (False, True)))
    user, ac = rnd.random() < 0.5, rnd.random() < 0.3
    return cpu, mem, addr | rnd.randrange(0x1000), write, user, fetch, ac


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_walks())
def test_random_tables_side_effect_free_walk_agrees_and_second_walk_sets_nothing(case):
    cpu, mem, addr, write, user, fetch, ac = case
    if cpu.paging == "pae" and cpu.pdptrs is None:
        return  # the CR3 load would #GP: nothing to walk
    args = (cpu, mem, addr, write, user, fetch)
    before = dict(mem.data)
    ok0, w0 = walk_addr(*args, ac=ac, set_ad=False)
    assert mem.data == before and mem.log == [] and w0.set_accessed == [] and w0.set_dirty is None
    ok1, w1 = walk_addr(*args, ac=ac)
    assert (ok1, w1.gfn, w1.level, w1.error_code, w1.pte_access) == (
        ok0,
        w0.gfn,
        w0.level,
        w0.error_code,
        w0.pte_access,
    )
    assert gva_to_gpa(*args, ac=ac, set_ad=False) == (UNMAPPED_GVA if not ok0 else (w0.gfn << 12) | addr & 0xFFF)
    if not ok1:
        assert mem.data == before and w1.set_accessed == [] and w1.set_dirty is None
        return
    size = SIZE[cpu.paging]
    changed = {gpa - gpa % size for gpa in set(mem.data) | set(before) if mem.data.get(gpa) != before.get(gpa)}
    for gpa in changed:  # only A/D bits of the entries the walk reports
        old = int.from_bytes(bytes(before.get(gpa + i, 0) for i in range(size)), "little")
        assert (mem.read_guest(gpa, size) ^ old) & ~(A | D) == 0
        assert gpa in w1.set_accessed or gpa == w1.set_dirty
    assert set(w1.set_accessed) | ({w1.set_dirty} - {None}) == changed
    assert all(mem.read_guest(gpa, size) & A for gpa in w1.set_accessed)
    assert w1.set_dirty is None or mem.read_guest(w1.set_dirty, size) & D
    assert (w1.set_dirty is not None) <= write
    mem.log.clear()
    ok2, w2 = walk_addr(*args, ac=ac)
    assert ok2 and w2.gfn == w1.gfn and w2.set_accessed == [] and w2.set_dirty is None and mem.log == []
