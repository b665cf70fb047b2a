"""How much memory a replay may take: ``max_memory`` (``ReplayOptions.max_memory``, ``--max-memory SIZE``).

Every event costs a bounded amount. What a trace can make the simulator keep, per event at most:

========================== ============================================================ ====================
what                       which events make it                                          bytes each
========================== ============================================================ ====================
host frames with state     a fault on an untouched ``ram``/``reserved`` page, a KVM      ``FRAME``
                           reference, a store (hugetlb frames exist without an object)
guest pages with contents  a store to a page whose contents were zero                    ``PAGE_DATA``
hugetlb 2 MiB blocks       a fault or a store in an untouched 2 MiB region               ``HUGE_BLOCK``
shadow pages               a fault: up to one per paging level (``struct kvm_mmu_page``   ``SHADOW_PAGE``
                           with its 512 sptes and gfns), bounded by the kernel's budget
                           (``kvm_mmu_calculate_mmu_pages``: 2% of the memslot pages)
mapped gfns                a fault: an rmap head, the spte that owns the reference, the   ``MAPPED_GFN``
                           reference in the ledger
memoised guest walks       an access (at most ``WALK_MEMO_LIMIT`` per vcpu; the upper     ``WALK``
                           guest ptes they read, until a flush)
findings                   at most a few per event, one per code and subject             ``FINDING``
========================== ============================================================ ====================

Every ``CHECK_EVERY`` events, and before the teardown, the replay adds these up (a few ``len`` calls) and
stops with a one-line input error naming the line and the largest part once the sum passes ``max_memory``.
The sum is an estimate of the simulator's own structures (the figures are measured with tracemalloc on
CPython 3.11, within 20% on every ``kvmpfn synth`` workload), so a trace stops at the same line on every
machine for the same ``max_memory`` (the default depends on the machine); the process needs about 30 MB more
for the interpreter. Between two checks the VM can grow
by at most ``CHECK_EVERY`` events' worth (a fault: about 40 KB). Transient memory (a full audit's working
set) and a memory image's read cache (``PAGE_CACHE`` pages) are not counted, nor what grows by a few dozen
bytes per event at most alongside a counted structure: dirty bitmaps (a gfn per store, which also makes a page
with contents), the ledger's dirtied frames, the recorded checks' pending requests (one per ``pid``).
"""

from __future__ import annotations

import os
import re
import resource

from kvmpfn.errors import InputError

FRAME = 220
PAGE_DATA = 4150
HUGE_BLOCK = 150
SHADOW_PAGE = 8700
MAPPED_GFN = 520
WALK = 800
FINDING = 1024
#: events between two checks
CHECK_EVERY = 1024
#: when the machine's memory cannot be read
FALLBACK_MAX_MEMORY = 4 << 30

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def parse_size(text: str) -> int:
    """A size in bytes from ``512M``, ``2G``, ``1.5G``, ``64k``, ``4096``: binary units (K = 1024), any case,
    optionally followed by ``B`` or ``iB`` (``2GiB``, ``512MB``). ``0`` means no limit.

    :raises InputError: anything else, negative sizes and sizes beyond 2**63.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if match is None or len(match.group(1)) > 30:
        raise InputError(None, f"{text!r} is not a size (for example 512M or 2G)")
    number, unit = match.group(1), _UNITS[match.group(2).upper()]
    whole, _, frac = number.partition(".")
    size = int(whole) * unit + int(frac or "0") * unit // 10 ** len(frac)
    if size >= 1 << 63:
        raise InputError(None, f"{text!r} is too large")
    return size


def format_size(size: int) -> str:
    """``536870912`` → ``512 MiB``; ``1610612736`` → ``1.5 GiB``."""
    for unit, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if size >= unit:
            return f"{size / unit:.1f}".removesuffix(".0") + f" {name}"
    return f"{size} B"


def machine_memory() -> int | None:
    """The memory this process may use: physical RAM, lowered by a cgroup memory limit and by RLIMIT_AS;
    None when none of them can be read."""
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        pass
    for path in _CGROUP_LIMITS:
        try:
            with open(path, encoding="ascii") as fh:
                text = fh.read().strip()
        except (OSError, ValueError):
            continue
        if text.isdigit():
            sizes.append(int(text))
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        sizes.append(soft)
    sizes = [size for size in sizes if size > 0]
    return min(sizes) if sizes else None


def default_max_memory() -> int:
    """Half of :func:`machine_memory` (``FALLBACK_MAX_MEMORY`` when it is unknown)."""
    size = machine_memory()
    return FALLBACK_MAX_MEMORY if size is None else size // 2


def resolve_max_memory(max_memory: int | None) -> int:
    """``ReplayOptions.max_memory`` in bytes: None is :func:`default_max_memory`, 0 is no limit (returned as 0)."""
    if max_memory is None:
        return default_max_memory()
    if type(max_memory) is not int or max_memory < 0:
        raise InputError("max_memory", f"must be a size in bytes, 0 for no limit, not {max_memory!r}")
    return max_memory


def memory_use(host, kvm, findings) -> list[tuple[int, int, str]]:
    """``(count, bytes each, what)`` of each structure the trace makes grow."""
    return [
        (len(host.frames), FRAME, "host frames with state"),
        (host.data_pages, PAGE_DATA, "guest pages with contents"),
        (len(host.huge_blocks), HUGE_BLOCK, "hugetlb 2 MiB blocks"),
        (len(kvm.active_mmu_pages), SHADOW_PAGE, "shadow pages"),
        (len(kvm.rmap) + len(kvm.rmap_pde), MAPPED_GFN, "mapped gfns (rmaps, sptes, references)"),
        (len(host.watched) + len(host.watched_upper), WALK, "memoised guest walks"),
        (len(findings.items), FINDING, "findings"),
    ]


def over_limit(host, kvm, findings, limit: int) -> str | None:
    """The one-line reason the replay must stop, when the estimate of :func:`memory_use` passes ``limit``."""
    parts = memory_use(host, kvm, findings)
    total = sum(count * cost for count, cost, _ in parts)
    if total <= limit:
        return None
    count, cost, what = max(parts, key=lambda part: part[0] * part[1])
    if what == "shadow pages":
        what += f" (the kernel's budget: {kvm.n_alloc_mmu_pages:,})"
    return (
        f"over the memory limit: the simulated VM holds about {format_size(total)} "
        f"(max_memory {format_size(limit)}), most of it {what}: {count:,} ({format_size(count * cost)})"
    )
