"""``kvmpfn audit`` over a synth corpus with ``--jobs 1`` and ``--jobs 2``.

40 traces (the five workloads × both MMUs × four seeds) of ~20k events each are written to a temporary
directory, then ``python -m kvmpfn audit DIR --jobs J`` runs as a subprocess and its wall time is taken.
Every trace is clean, so with no baseline file the gate passes (exit 0). Two jobs can only help when a
second CPU is idle: the 1-minute load average before the runs is recorded with the figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from kvmpfn.synth import WORKLOADS, SynthSpec, write_synth

MMUS = ("shadow", "tdp")


def write_corpus(directory: str, traces: int = 40, events: int = 20_000) -> int:
    """``traces`` synth traces, cycling through workload × MMU, a new seed each round; returns total events."""
    combos = [(w, m) for w in WORKLOADS for m in MMUS]
    total = 0
    for i in range(traces):
        workload, mmu = combos[i % len(combos)]
        seed = i // len(combos)
        path = os.path.join(directory, f"{i:02d}-{workload}-{mmu}-s{seed}.jsonl")
        total += write_synth(path, SynthSpec(workload, events, seed=seed, mmu=mmu))
    return total


def audit_available() -> str | None:
    """None if ``kvmpfn audit`` exists, else why not."""
    probe = subprocess.run(
        [sys.executable, "-m", "kvmpfn", "audit", "--help"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        return (probe.stderr.strip().splitlines() or ["kvmpfn audit --help failed"])[-1]
    return None


def run_audit(directory: str, jobs: int) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "kvmpfn", "audit", directory, "--jobs", str(jobs)],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    return {"jobs": jobs, "seconds": round(seconds, 2), "exit_status": proc.returncode}


def run(traces: int = 40, events: int = 20_000) -> dict:
    """Write the corpus and time the gate with one and two jobs."""
    why = audit_available()
    if why is not None:
        return {"skipped": f"kvmpfn audit is not available: {why}"}
    with tempfile.TemporaryDirectory(prefix="kvmpfn-corpus-") as tmp:
        total = write_corpus(tmp, traces, events)
        load = os.getloadavg()[0]
        one = run_audit(tmp, 1)
        two = run_audit(tmp, 2)
    return {
        "traces": traces,
        "events_per_trace": events,
        "events": total,
        "jobs_1_s": one["seconds"],
        "jobs_2_s": two["seconds"],
        "speedup": round(one["seconds"] / two["seconds"], 2) if two["seconds"] else None,
        "exit_status": [one["exit_status"], two["exit_status"]],
        "cpus": os.cpu_count(),
        "loadavg_1min_before": round(load, 2),
    }


if __name__ == "__main__":
    print(run(*(int(a) for a in sys.argv[1:3])))
