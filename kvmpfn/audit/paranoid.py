"""``--paranoid``: consistency of the simulator's own MMU data structures (hash, active list, page headers,
roles, parent chains, rmap encodings, root counts). A problem here is a defect in kvmpfn, not in the
simulated kernel, so it stops the replay as an internal error instead of becoming a finding."""

from __future__ import annotations

from collections import Counter

from kvmpfn.kvm.mmu import PAE_ROOT_HPA
from kvmpfn.kvm.rmap import RMAP_EXT
from kvmpfn.kvm.vm import role_word
from kvmpfn.x86 import INVALID_PAGE, PAGE_SHIFT, PT64_BASE_ADDR_MASK, PT_PRESENT_MASK


def check_mmu_structures(kvm) -> list[str]:
    """Every inconsistency found, as one-line descriptions (empty when the structures agree)."""
    problems: list[str] = []
    active = kvm.active_mmu_pages
    hashed = Counter()
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
    if len(kvm.page_header) != len(active):
        problems.append(f"{len(kvm.page_header)} page headers for {len(active)} live pages")
    for name, table in (("rmap", kvm.rmap), ("rmap_pde", kvm.rmap_pde)):
        for key, head in table.items():
            if type(head) is tuple:
                continue
            if type(head) is not list or not head:
                problems.append(f"{name}[{key:#x}] has a malformed head {head!r}")
                continue
            entries = [e for desc in head for e in desc]
            if any(not desc or len(desc) > RMAP_EXT for desc in head):
                problems.append(f"{name}[{key:#x}] has an empty or overfull kvm_rmap_desc")
            if len(set(entries)) != len(entries):
                problems.append(f"{name}[{key:#x}] lists an spte twice")
    roots = Counter()
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
    return problems
