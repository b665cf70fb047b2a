"""``--paranoid``: consistency of the simulator's own MMU data structures (hash, active list, page headers,
roles, parent chains, rmap encodings, root counts). A problem here is a defect in kvmpfn, not in the
simulated kernel, so it stops the replay as an internal error instead of becoming a finding."""

from __future__ import annotations

from collections import Counter

from kvmpfn.audit.incremental import Changes
from kvmpfn.kvm.mmu import PAE_ROOT_HPA
from kvmpfn.kvm.rmap import RMAP_EXT
from kvmpfn.kvm.vm import Kvm, KvmMmuPage, role_word
from kvmpfn.x86 import INVALID_PAGE, PAGE_SHIFT, PT64_BASE_ADDR_MASK, PT_PRESENT_MASK


def check_mmu_structures(kvm: Kvm, changed: Changes | None = None) -> list[str]:
    """Every inconsistency found, as one-line descriptions (empty when the structures agree). ``changed``
    (an incremental audit's :class:`~kvmpfn.audit.incremental.Changes`) limits the per-page and per-rmap checks
    to the pages and rmap heads that changed since the previous check."""
    if changed is not None and not changed.everything:
        return _check_changed(kvm, changed)
    problems: list[str] = []
    active = kvm.active_mmu_pages
    hashed: Counter[int] = Counter()
    for gfn, bucket in kvm.mmu_page_hash.items():
        if not bucket:
            problems.append(f"empty hash bucket for gfn {gfn:#x}")
        for sp in bucket:
            hashed[sp.id] += 1
            if sp.gfn != gfn:
                problems.append(f"{sp!r} hashed under gfn {gfn:#x}")
            if active.get(sp.id) is not sp:
                problems.append(f"{sp!r} hashed but not on the active list")
    for sp_id, sp in active.items():
        if hashed[sp_id] != 1:
            problems.append(f"{sp!r} is in the hash {hashed[sp_id]} times")
        _check_page(kvm, sp, problems)
    if len(kvm.page_header) != len(active):
        problems.append(f"{len(kvm.page_header)} page headers for {len(active)} live pages")
    for name, table in (("rmap", kvm.rmap), ("rmap_pde", kvm.rmap_pde)):
        for key, head in table.items():
            _check_head(name, key, head, problems)
    _check_roots(kvm, problems)
    return problems


def _check_changed(kvm: Kvm, changed: Changes) -> list[str]:
    """The checks of :func:`check_mmu_structures` for the pages and rmap heads in ``changed`` (a page's hash
    bucket is the one of its gfn), and the VM-wide ones that cost O(1) or O(vcpus)."""
    problems: list[str] = []
    active = kvm.active_mmu_pages
    for sp in sorted(changed.pages, key=lambda sp: sp.id):
        bucket = kvm.mmu_page_hash.get(sp.gfn)
        if bucket is not None and not bucket:
            problems.append(f"empty hash bucket for gfn {sp.gfn:#x}")
        if active.get(sp.id) is not sp:
            if bucket is not None and sp in bucket:
                problems.append(f"{sp!r} hashed but not on the active list")
            continue
        n = 0 if bucket is None else sum(1 for other in bucket if other is sp)
        if n != 1:
            problems.append(f"{sp!r} is in the hash {n} times")
        _check_page(kvm, sp, problems)
    if len(kvm.page_header) != len(active):
        problems.append(f"{len(kvm.page_header)} page headers for {len(active)} live pages")
    for large, key in sorted(changed.rmap_keys):
        table = kvm.rmap_pde if large else kvm.rmap
        if key in table:
            _check_head("rmap_pde" if large else "rmap", key, table[key], problems)
    _check_roots(kvm, problems)
    return problems


def _check_page(kvm: Kvm, sp: KvmMmuPage, problems: list[str]) -> None:
    active = kvm.active_mmu_pages
    if kvm.page_header.get(sp.hpa) is not sp:
        problems.append(f"{sp!r} has no page header")
    want = role_word(sp.glevels, sp.level, sp.quadrant, sp.metaphysical, sp.access, sp.invalid, sp.cr0_wp, sp.ext)
    if sp.role != want:
        problems.append(f"{sp!r} role word {sp.role:#x} disagrees with its fields ({want:#x})")
    if sp.root_count < 0:
        problems.append(f"{sp!r} root_count {sp.root_count}")
    if len(set(sp.parent_ptes)) != len(sp.parent_ptes):
        problems.append(f"{sp!r} lists a parent twice")
    for psp, _index in sp.parent_ptes:
        if active.get(psp.id) is not psp:
            problems.append(f"{sp!r} has a parent in freed page {psp!r}")


def _check_head(name: str, key: int, head: object, problems: list[str]) -> None:
    if type(head) is tuple:
        return
    if type(head) is not list or not head:
        problems.append(f"{name}[{key:#x}] has a malformed head {head!r}")
        return
    entries = [e for desc in head for e in desc]
    if any(not desc or len(desc) > RMAP_EXT for desc in head):
        problems.append(f"{name}[{key:#x}] has an empty or overfull kvm_rmap_desc")
    if len(set(entries)) != len(entries):
        problems.append(f"{name}[{key:#x}] lists an spte twice")


def _check_roots(kvm: Kvm, problems: list[str]) -> None:
    """Each vcpu's roots are live pages whose root_count covers the vcpus using them."""
    active = kvm.active_mmu_pages
    roots: Counter[int] = Counter()
    for vcpu in kvm.vcpus.values():
        if vcpu.root_hpa == INVALID_PAGE:
            continue
        if vcpu.root_hpa == PAE_ROOT_HPA:
            hpas = [r for r in vcpu.pae_root if r not in (0, INVALID_PAGE) and r & PT_PRESENT_MASK]
        else:
            hpas = [vcpu.root_hpa]
        for hpa in hpas:
            sp = kvm.page_header.get((hpa & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT)
            if sp is None:
                problems.append(f"vcpu {vcpu.vcpu_id} root {hpa:#x} is not a live shadow page")
            else:
                roots[sp.id] += 1
    for sp_id, n in roots.items():
        if active[sp_id].root_count < n:
            problems.append(f"{active[sp_id]!r} is the root of {n} vcpus but root_count {active[sp_id].root_count}")
