"""The seed's pfn API: virt/kvm/kvm_main.c ``gfn_to_pfn`` and friends, per kernel variant (docs/kernel.md, The pfn API).

Every reference or flag operation actually applied to a frame calls ``hook(op, pfn, fn, caller)`` once, with
``op`` in ``"get"``, ``"put"``, ``"dirty"``, ``"accessed"``; ``fn`` the API function as the variant names it;
``caller`` the MMU function that called it. The auditor's ledger is built from these calls.

Variants (docs/kernel.md, Kernel variants):

- ``page`` (v2.6.25): the same semantics as ``pfn`` under the ``struct page *`` names (the seed is a pure
  refactoring): ``gfn_to_page``, ``kvm_release_page_clean``/``_dirty``, ``kvm_set_page_dirty``/``_accessed``,
  ``get_page``.
- ``pfn`` (v2.6.26: the seed 35149e21 and its follow-ups): memory without struct page yields ``bad_pfn``, with
  a real reference on ``bad_page``. v2.6.26's ``gfn_to_pfn`` has no VM_PFNMAP path and its helpers no
  ``pfn_valid`` guards: a failed get_user_pages gives ``bad_page`` (+1, released −1) and the access is MMIO.
- ``pfn-io`` (2e2e3738, merged for v2.6.27, without the notifier work) and ``notifier`` (v2.6.27, with
  e930bffe): a VM_PFNMAP vma is mapped by pfn with no reference taken; release/get/set_dirty/set_accessed are
  no-ops on ``!pfn_valid`` pfns; ``gfn_to_page`` WARNs and returns ``bad_page`` (+1) for them.
"""

from __future__ import annotations

from collections.abc import Callable

from kvmpfn.host import Host, HostError, pfn_valid

KERNELS = ("page", "pfn", "pfn-io", "notifier")
PFNMAP_KERNELS = frozenset({"pfn-io", "notifier"})

Hook = Callable[[str, int, str, str], None]

_PFN_NAMES = {
    "gfn_to_pfn": "gfn_to_pfn",
    "gfn_to_page": "gfn_to_page",
    "is_error_pfn": "is_error_pfn",
    "kvm_release_pfn_clean": "kvm_release_pfn_clean",
    "kvm_release_pfn_dirty": "kvm_release_pfn_dirty",
    "kvm_set_pfn_dirty": "kvm_set_pfn_dirty",
    "kvm_set_pfn_accessed": "kvm_set_pfn_accessed",
    "kvm_get_pfn": "kvm_get_pfn",
}
_PAGE_NAMES = {
    "gfn_to_pfn": "gfn_to_page",
    "gfn_to_page": "gfn_to_page",
    "is_error_pfn": "is_error_page",
    "kvm_release_pfn_clean": "kvm_release_page_clean",
    "kvm_release_pfn_dirty": "kvm_release_page_dirty",
    "kvm_set_pfn_dirty": "kvm_set_page_dirty",
    "kvm_set_pfn_accessed": "kvm_set_page_accessed",
    "kvm_get_pfn": "get_page",
}
#: Per variant: the pfn API's function name → the name the variant's kernel calls it (reported to the hook).
API_NAMES: dict[str, dict[str, str]] = {
    "page": _PAGE_NAMES,
    "pfn": _PFN_NAMES,
    "pfn-io": _PFN_NAMES,
    "notifier": _PFN_NAMES,
}


class PfnApi:
    """The reference-taking half of kvm_main.c over a ``Host``, for one kernel variant.

    :param host: the host whose frames are referenced.
    :param kernel: ``"page"``, ``"pfn"``, ``"pfn-io"`` or ``"notifier"``.
    :param hook: ``hook(op, pfn, fn, caller)``, called once per applied operation (may be set later).
    :raises HostError: unknown ``kernel`` (field ``"kernel"``).
    """

    def __init__(self, host: Host, kernel: str, hook: Hook | None = None, bugs: frozenset[str] = frozenset()) -> None:
        if kernel not in KERNELS:
            raise HostError("kernel", f"unknown kernel {kernel!r} (expected one of {', '.join(KERNELS)})")
        self.host = host
        self.kernel = kernel
        self.hook = hook
        self.names = API_NAMES[kernel]
        #: 2e2e3738: VM_PFNMAP fallback in gfn_to_pfn, and the helpers skip ``!pfn_valid`` pfns.
        self.pfnmap = kernel in PFNMAP_KERNELS
        #: ``--bug pageless-as-normal``: VM_PFNMAP frames get references like any page.
        self.pageless_as_normal = "pageless-as-normal" in bugs
        #: the helpers' ``if (!pfn_valid(pfn)) return`` guard
        self.skip_pageless = self.pfnmap and not self.pageless_as_normal
        #: ``bad_pfn = page_to_pfn(bad_page)``, set at kvm_init.
        self.bad_pfn = host.bad_pfn
        #: injected get_user_pages failures still to come (``inject`` event, fault ``gup_fail``).
        self.gup_fail_pending = 0
        #: set when an injected failure was consumed; the replay engine reads and resets it per event.
        self.consumed_failure = False
        #: how many times ``gfn_to_page`` hit its ``WARN_ON(!pfn_valid(pfn))`` (pfn-io, notifier).
        self.warn_count = 0
        n = self.names
        self._n_gfn_to_pfn = n["gfn_to_pfn"]
        self._n_gfn_to_page = n["gfn_to_page"]
        self._n_release_clean = n["kvm_release_pfn_clean"]
        self._n_release_dirty = n["kvm_release_pfn_dirty"]
        self._n_set_dirty = n["kvm_set_pfn_dirty"]
        self._n_set_accessed = n["kvm_set_pfn_accessed"]
        self._n_get = n["kvm_get_pfn"]

    # -- primitives: get_page / put_page / SetPageDirty / mark_page_accessed -------------------------------
    def _get(self, pfn: int, fn: str, caller: str) -> None:
        self.host.frame(pfn).count += 1
        if self.hook is not None:
            self.hook("get", pfn, fn, caller)

    def _put(self, pfn: int, fn: str, caller: str) -> None:
        frame = self.host.frame(pfn)
        frame.count -= 1  # may go negative: the ledger reports the underflow
        if self.hook is not None:
            self.hook("put", pfn, fn, caller)
        if frame.count == 0 and not frame.host_mapped:
            self.host.free_if_unused(pfn)

    def _set_dirty(self, pfn: int, fn: str, caller: str) -> None:
        frame = self.host.frame(pfn)
        if frame.reserved:
            return
        frame.dirty = True
        if self.hook is not None:
            self.hook("dirty", pfn, fn, caller)

    def _bad(self, fn: str, caller: str) -> int:
        """``get_page(bad_page); return page_to_pfn(bad_page)``."""
        self._get(self.bad_pfn, fn, caller)
        return self.bad_pfn

    # -- the API --------------------------------------------------------------------------------------------
    def inject_gup_fail(self, count: int = 1) -> None:
        """Make the next ``count`` get_user_pages calls behind ``gfn_to_pfn``/``gfn_to_page`` fail."""
        self.gup_fail_pending += count

    def gfn_to_hva(self, gfn: int) -> int | None:
        """``gfn_to_hva``: the slot's userspace address of ``gfn``; None for ``bad_hva()`` (no slot)."""
        return self.host.gfn_to_hva(gfn)

    def _gfn_to_pfn(self, gfn: int, fn: str, caller: str) -> int:
        host = self.host
        hva = host.gfn_to_hva(gfn)
        if hva is None:  # kvm_is_error_hva
            return self._bad(fn, caller)
        if self.gup_fail_pending > 0:
            self.gup_fail_pending -= 1
            self.consumed_failure = True
            pfn = None
        else:
            pfn = host.get_user_pages(hva)
        if pfn is not None:
            self._get(pfn, fn, caller)
            return pfn
        if self.pfnmap:
            pfn = host.follow_pfnmap(hva)
            if pfn is not None:
                if pfn_valid(pfn):
                    raise AssertionError(f"gfn_to_pfn: BUG_ON(pfn_valid({pfn:#x})) for a VM_PFNMAP vma")
                if self.pageless_as_normal:
                    self._get(pfn, fn, caller)
                return pfn
        return self._bad(fn, caller)

    def gfn_to_pfn(self, gfn: int, caller: str) -> int:
        """``gfn_to_pfn`` (``gfn_to_page`` in ``page``): the pfn behind ``gfn``.

        Refcount: +1 on the frame when get_user_pages succeeds. No slot, or get_user_pages failing: +1 on
        ``bad_page`` and ``bad_pfn`` — except, in ``pfn-io``/``notifier``, a VM_PFNMAP vma, whose device pfn
        is returned with no reference.
        """
        return self._gfn_to_pfn(gfn, self._n_gfn_to_pfn, caller)

    def gfn_to_page(self, gfn: int, caller: str) -> int:
        """``gfn_to_page``: like ``gfn_to_pfn`` but always a pfn with a struct page; returns its pfn.

        Refcount: as ``gfn_to_pfn`` (reported as ``gfn_to_page``). In ``pfn-io``/``notifier`` a device pfn
        hits ``WARN_ON(!pfn_valid(pfn))`` and gives ``bad_page`` with +1 instead.
        """
        fn = self._n_gfn_to_page
        pfn = self._gfn_to_pfn(gfn, fn, caller)
        if self.pfnmap and not pfn_valid(pfn):
            self.warn_count += 1
            return self._bad(fn, caller)
        return pfn

    def is_error_pfn(self, pfn: int) -> bool:
        """``is_error_pfn`` (``is_error_page``): ``pfn == bad_pfn``."""
        return pfn == self.bad_pfn

    def kvm_release_pfn_clean(self, pfn: int, caller: str) -> None:
        """``kvm_release_pfn_clean`` (``kvm_release_page_clean``): ``put_page``, −1.

        No-op on a ``!pfn_valid`` pfn in ``pfn-io``/``notifier``.
        """
        if self.skip_pageless and not pfn_valid(pfn):
            return
        self._put(pfn, self._n_release_clean, caller)

    def kvm_release_pfn_dirty(self, pfn: int, caller: str) -> None:
        """``kvm_release_pfn_dirty`` (``kvm_release_page_dirty``): ``kvm_set_pfn_dirty`` then −1.

        Hook: ``"dirty"`` (unless PageReserved) then ``"put"``, both under this function's name. No-op on a
        ``!pfn_valid`` pfn in ``pfn-io``/``notifier``.
        """
        if self.skip_pageless and not pfn_valid(pfn):
            return
        self._set_dirty(pfn, self._n_release_dirty, caller)
        self._put(pfn, self._n_release_dirty, caller)

    def kvm_set_pfn_dirty(self, pfn: int, caller: str) -> None:
        """``kvm_set_pfn_dirty`` (``kvm_set_page_dirty``): ``SetPageDirty`` unless ``PageReserved``.

        No refcount change. No-op on a ``!pfn_valid`` pfn in ``pfn-io``/``notifier``.
        """
        if self.skip_pageless and not pfn_valid(pfn):
            return
        self._set_dirty(pfn, self._n_set_dirty, caller)

    def kvm_set_pfn_accessed(self, pfn: int, caller: str) -> None:
        """``kvm_set_pfn_accessed`` (``kvm_set_page_accessed``): ``mark_page_accessed``; no refcount.

        No-op on a ``!pfn_valid`` pfn in ``pfn-io``/``notifier``.
        """
        if self.skip_pageless and not pfn_valid(pfn):
            return
        self.host.frame(pfn).accessed = True
        if self.hook is not None:
            self.hook("accessed", pfn, self._n_set_accessed, caller)

    def kvm_get_pfn(self, pfn: int, caller: str) -> None:
        """``kvm_get_pfn`` (``get_page``): +1. No-op on a ``!pfn_valid`` pfn in ``pfn-io``/``notifier``."""
        if self.skip_pageless and not pfn_valid(pfn):
            return
        self._get(pfn, self._n_get, caller)
