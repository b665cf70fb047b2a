"""The cost of one full audit against live sptes.

A VM is built by replaying a tdp, paging-``none`` trace that touches ``k`` distinct 4 KiB pages (``k`` TDP
faults, ``k`` live leaf sptes, ``k`` referenced frames); then ``Replayer.auditor.full_audit("bench")`` is timed
a few times. For comparison, the same for the VM a synth ``steady`` shadow trace leaves behind (64-bit guest
tables, with bypass_guest_pf's notrap entries in its shadow page tables). Each VM is built in its own
process::

    python -m bench.bench_audit 100000             # JSON: build time, sptes, audit seconds (min, median)
    python -m bench.bench_audit steady shadow 100000
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from kvmpfn.replay import Replayer, ReplayOptions
from kvmpfn.synth import SynthSpec, write_synth
from kvmpfn.trace import Access, Guest, Header, Memslot, TraceWriter, open_trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_touch_trace(path: str, pages: int) -> None:
    """A tdp, paging-off trace whose ``pages`` accesses each fault in one new 4 KiB page of one RAM slot."""
    npages = max(65536, pages)
    header = Header(
        kvmpfn=1,
        mmu="tdp",
        guest=Guest(paging="none"),
        memslots=[Memslot(slot=0, gfn=0, npages=npages, backing="ram")],
        teardown=False,
    )
    with TraceWriter(path) as w:
        w.write_header(header)
        for gfn in range(pages):
            w.write_event(Access(addr=gfn << 12, write=bool(gfn & 1), user=True, fetch=False))


def measure_trace(path: str, repeat: int = 5) -> dict:
    """Replay ``path`` (no teardown), then time ``repeat`` full audits of the VM it leaves."""
    start = time.perf_counter()
    with open_trace(path) as reader:
        rp = Replayer(reader.header, ReplayOptions())
        for seq, (line, event) in enumerate(reader):
            rp.apply(seq, line, event)
    build = time.perf_counter() - start
    stats = rp.stats()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        rp.auditor.full_audit("bench")
        times.append(time.perf_counter() - t)
    return {
        "sptes": stats["sptes"],
        "shadow_pages": stats["shadow_pages"],
        "build_s": round(build, 3),
        "audit_min_s": round(min(times), 4),
        "audit_median_s": round(statistics.median(times), 4),
        "audit_us_per_spte": round(min(times) / max(stats["sptes"], 1) * 1e6, 2),
        "findings": len(rp.findings.items),
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def measure(pages: int, repeat: int = 5) -> dict:
    """Full-audit cost for a tdp VM with ``pages`` live 4K sptes."""
    with tempfile.TemporaryDirectory(prefix="kvmpfn-bench-") as tmp:
        path = os.path.join(tmp, "touch.jsonl")
        write_touch_trace(path, pages)
        return {"vm": "tdp, paging none, touch", "pages": pages, **measure_trace(path, repeat)}


def measure_synth(workload: str, mmu: str, events: int, repeat: int = 3) -> dict:
    """Full-audit cost for the VM a synth trace leaves (its own teardown skipped)."""
    with tempfile.TemporaryDirectory(prefix="kvmpfn-bench-") as tmp:
        path = os.path.join(tmp, "synth.jsonl")
        write_synth(path, SynthSpec(workload, events, seed=1, mmu=mmu))
        return {"vm": f"{mmu}, synth {workload}", "events": events, **measure_trace(path, repeat)}


def measure_in_subprocess(*args: object) -> dict:
    """``measure(pages)`` or ``measure_synth(workload, mmu, events)`` in a fresh process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_audit", *map(str, args)],
        capture_output=True,
        check=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    return json.loads(out.stdout)


def main(argv: list[str]) -> None:
    if len(argv) == 3:
        print(json.dumps(measure_synth(argv[0], argv[1], int(argv[2]))))
    else:
        print(json.dumps(measure(int(argv[0]) if argv else 10_000)))


if __name__ == "__main__":
    main(sys.argv[1:])
