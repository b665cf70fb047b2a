"""The cost of one full audit against live sptes.

A VM is built by replaying a tdp, paging-``none`` trace that touches ``k`` distinct 4 KiB pages (``k`` TDP
faults, ``k`` live leaf sptes, ``k`` referenced frames); then ``Replayer.auditor.full_audit("bench")`` is timed
a few times. Each size runs in its own process::

    python -m bench.bench_audit 100000     # JSON: build time, sptes, audit seconds (min, median)
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


def measure(pages: int, repeat: int = 5) -> dict:
    """Build the VM from a touch trace of ``pages`` pages, then time ``repeat`` full audits."""
    with tempfile.TemporaryDirectory(prefix="kvmpfn-bench-") as tmp:
        path = os.path.join(tmp, "touch.jsonl")
        write_touch_trace(path, pages)
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
        "pages": pages,
        "sptes": stats["sptes"],
        "shadow_pages": stats["shadow_pages"],
        "build_s": round(build, 3),
        "audit_min_s": round(min(times), 4),
        "audit_median_s": round(statistics.median(times), 4),
        "audit_us_per_spte": round(min(times) / max(stats["sptes"], 1) * 1e6, 2),
        "findings": len(rp.findings.items),
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def measure_in_subprocess(pages: int, repeat: int = 5) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_audit", str(pages), str(repeat)],
        capture_output=True,
        check=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    return json.loads(out.stdout)


def main(argv: list[str]) -> None:
    pages = int(argv[0]) if argv else 10_000
    repeat = int(argv[1]) if len(argv) > 1 else 5
    print(json.dumps(measure(pages, repeat)))


if __name__ == "__main__":
    main(sys.argv[1:])
