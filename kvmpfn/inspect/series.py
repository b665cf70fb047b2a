"""Counts and series of one replay (``kvmpfn stat``, the HTML report's plots, the timeline).

:class:`Tracker` is a replay observer. Per event it counts the op and its result, the faults (``access``
and ``pf`` events that exited to KVM: every result but ``hit``) per vcpu and per guest page, and samples
three gauges: frames KVM holds references on (the ledger's), live leaf sptes (``rmap_add`` minus
``rmap_remove``, chained on those hooks) and shadow pages (``active_mmu_pages``). Series are sampled
(:class:`Sampler`) so memory stays flat on long traces.
"""

from __future__ import annotations

import time
from collections import Counter

from kvmpfn.inspect import FAULT_OPS, chain
from kvmpfn.x86 import PAGE_SHIFT

GAUGES = ("frames referenced", "live sptes", "shadow pages")


class Sampler:
    """At most ``2 * limit`` points ``(seq, *values)`` over any number of events: each point is the maximum of
    a bucket of ``stride`` events; when the buffer fills, neighbouring points merge and the stride doubles
    (so a peak is never sampled away)."""

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self.stride = 1
        self.points: list[tuple] = []
        self.count = 0
        self.acc: tuple | None = None

    def add(self, seq: int, values: tuple) -> None:
        acc = self.acc
        self.acc = values if acc is None else tuple(map(max, acc, values))
        self.count += 1
        if self.count >= self.stride:
            self._close(seq)

    def _close(self, seq: int) -> None:
        self.points.append((seq, *self.acc))
        self.acc = None
        self.count = 0
        if len(self.points) >= 2 * self.limit:
            pts = self.points
            self.points = [(b[0], *map(max, a[1:], b[1:])) for a, b in zip(pts[::2], pts[1::2], strict=False)]
            self.stride *= 2

    def finish(self, seq: int) -> list[tuple]:
        if self.acc is not None:
            self._close(seq)
        return self.points


class Tracker:
    """Replay observer for ``stat``, the HTML plots and the timeline (``timeline``: a
    :class:`~kvmpfn.report.timeline.TimelineWriter`)."""

    records = True

    def __init__(self, timeline=None, limit: int = 1000) -> None:
        self.timeline = timeline
        self.kinds: Counter = Counter()  # (op, result) -> events
        self.vcpu_faults: Counter = Counter()
        self.gfn_faults: Counter = Counter()
        self.gva_faults: Counter = Counter()
        self.seconds: Counter = Counter()  # op -> wall seconds (including reading the line)
        self.live_sptes = 0
        self.peak = {name: 0 for name in GAUGES}
        self.sampler = Sampler(limit)
        self.markers: list[tuple[int, str]] = []  # (seq, code) of each finding
        self.seen = 0
        self.last = (-1, -1, -1)
        self.seq = -1

    def attach(self, rp) -> None:
        self.rp = rp
        kvm = rp.kvm
        kvm.on_rmap_add = chain(kvm.on_rmap_add, self._add)
        kvm.on_rmap_remove = chain(kvm.on_rmap_remove, self._remove)
        self.clock = time.perf_counter()

    def _add(self, sptep, pfn) -> None:
        self.live_sptes += 1

    def _remove(self, sptep, pfn, spte) -> None:
        self.live_sptes -= 1

    def gauges(self) -> tuple[int, int, int]:
        rp = self.rp
        return len(rp.auditor.ledger.refs), self.live_sptes, len(rp.kvm.active_mmu_pages)

    def event(self, seq: int, line: int, e, rec: dict) -> bool:
        now = time.perf_counter()
        op, result = rec["op"], rec["result"]
        self.seconds[op] += now - self.clock
        self.clock = now
        self.seq = seq
        self.kinds[op, result] += 1
        if op in FAULT_OPS and result != "hit":  # a hit is the simulated CPU's, with no exit to KVM
            self.vcpu_faults[e.vcpu] += 1
            self.gva_faults[e.addr >> PAGE_SHIFT] += 1
            if "gpa" in rec:
                self.gfn_faults[int(rec["gpa"], 16) >> PAGE_SHIFT] += 1
        values = self.gauges()
        self.sampler.add(seq, values)
        if values != self.last:
            for i, name in enumerate(GAUGES):
                if values[i] > self.peak[name]:
                    self.peak[name] = values[i]
                if self.timeline is not None and values[i] != self.last[i]:
                    self.timeline.counter(seq, name, values[i])
            self.last = values
        if self.timeline is not None:
            self.timeline.event(seq, line, op, e.vcpu, rec)
        if len(self.rp.findings.items) != self.seen:
            self._new_findings()
        return False

    def _new_findings(self) -> None:
        items = self.rp.findings.items
        for finding in items[self.seen :]:
            self.markers.append((finding["seq"], finding["code"]))
            if self.timeline is not None:
                self.timeline.instant(finding["seq"], finding)
        self.seen = len(items)

    def finish(self, rp) -> None:
        self._new_findings()
        self.points = self.sampler.finish(self.seq)
        if self.timeline is not None:
            self.timeline.close()

    # -- the stat document -------------------------------------------------------------------------------------

    def doc(self, result, top: int = 10, timing: bool = False) -> dict:
        """``kvmpfn stat``'s document for one replay (``timing``: add wall seconds per op, which differ between
        runs)."""
        stat = self.rp.kvm.stat
        by_kind: dict[str, dict[str, int]] = {}
        for (op, res), n in sorted(self.kinds.items()):
            by_kind.setdefault(op, {})[res] = n

        def hottest(counter: Counter) -> list[list]:
            return [
                [f"{k << PAGE_SHIFT:#x}", n] for k, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
            ]

        doc = {
            "trace": result.trace,
            "mmu": result.mmu,
            "kernel": result.kernel,
            "events": result.events,
            "by_kind": by_kind,
            "faults_per_vcpu": {str(v): n for v, n in sorted(self.vcpu_faults.items())},
            "hottest_gpas": hottest(self.gfn_faults),
            "hottest_gvas": hottest(self.gva_faults),
            "pte_writes": {
                "emulated": sum(n for (op, res), n in self.kinds.items() if res == "emulated"),
                "kvm_mmu_pte_write": stat["mmu_pte_write"],
                "pte_updated": stat["mmu_pte_updated"],
                "flooded": stat["mmu_flooded"],
                "pde_zapped": stat["mmu_pde_zapped"],
            },
            "shadow_pages": {
                "created": self.rp.kvm.next_sp_id,
                "zapped": stat["mmu_shadow_zapped"],
                "recycled": stat["mmu_recycled"],
            },
            "peak": dict(self.peak),
            "findings": len(result.findings),
        }
        if result.error:
            doc["error"] = result.error
        if result.interrupted:
            doc["interrupted"] = True  # Ctrl-C: the counts cover the first ``events`` events
        if timing:
            doc["seconds_by_op"] = {op: round(s, 6) for op, s in sorted(self.seconds.items())}
        return doc
