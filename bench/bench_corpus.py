"""``kvmpfn audit`` over a synth corpus: ``--jobs 1``, ``--jobs 2``, and dask with two worker processes.

40 traces (the five workloads × both MMUs × four seeds) of ~20k events each are written to a temporary
directory, then ``python -m kvmpfn audit DIR ...`` runs as a subprocess and its wall time is taken. Every
trace is clean, so with no baseline file the gate passes (exit 0). Two jobs can only help when a second CPU
is idle: the 1-minute load average before the runs is recorded with the figures.

dask is timed twice: ``--executor dask --jobs 2`` (the command starts and stops its own LocalCluster) and
``--scheduler`` to a cluster already running (``dask scheduler`` + ``dask worker --nworkers 2``, as
docs/scale.md starts one). The per-task overhead is the wall time of 200 one-event traces less that of one,
divided by 199, for local ``--jobs 2`` and for the running dask cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

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


def run_audit(directory: str, jobs: int, *more: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "kvmpfn", "audit", directory, "--jobs", str(jobs), *more],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    return {"jobs": jobs, "seconds": round(seconds, 2), "exit_status": proc.returncode}


@contextlib.contextmanager
def dask_cluster(directory: str, workers: int = 2) -> Iterator[str | None]:
    """``dask scheduler`` and ``dask worker --nworkers N`` on the loopback interface; yields the scheduler's
    address (None if dask is not installed)."""
    try:
        from distributed import Client
    except ImportError:
        yield None
        return
    info = os.path.join(directory, "scheduler.json")
    dask = [sys.executable, "-m", "dask"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = subprocess.Popen(
        [*dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", info],
        **quiet,
    )
    worker = None
    try:
        while not os.path.exists(info):
            time.sleep(0.1)
        time.sleep(0.2)
        worker = subprocess.Popen(
            [*dask, "worker", "--scheduler-file", info, "--nworkers", str(workers), "--nthreads", "1"]
            + ["--host", "127.0.0.1", "--no-dashboard"],
            **quiet,
        )
        with open(info, encoding="utf-8") as fh:
            address = json.load(fh)["address"]
        with Client(address, timeout=30) as client:
            client.wait_for_workers(workers, timeout=60)
        yield address
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                proc.terminate()
                proc.wait(30)


def per_task_overhead(directory: str, *how: str, tasks: int = 200) -> float:
    """Seconds per task beyond the replay itself: ``tasks`` one-event traces against one."""
    many, one = os.path.join(directory, "many"), os.path.join(directory, "one")
    for path, count in ((many, tasks), (one, 1)):
        os.makedirs(path, exist_ok=True)
        for k in range(count):
            with open(os.path.join(path, f"t{k:04d}.jsonl"), "w", encoding="utf-8") as fh:
                fh.write('{"kvmpfn": 1, "guest": {"paging": "none"}}\n')
                fh.write('{"op": "access", "addr": "0x1000", "write": 1, "user": 0, "fetch": 0}\n')
    t_many = run_audit(many, 2, *how)["seconds"]
    t_one = run_audit(one, 2, *how)["seconds"]
    return round((t_many - t_one) / (tasks - 1), 4)


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
        own = run_audit(tmp, 2, "--executor", "dask")
        with tempfile.TemporaryDirectory(prefix="kvmpfn-dask-") as work, dask_cluster(work) as address:
            running = run_audit(tmp, 2, "--scheduler", address) if address else None
            overhead_local = per_task_overhead(work)
            overhead_dask = per_task_overhead(work, "--scheduler", address) if address else None
    dask = {}
    if running is not None:
        dask = {
            "dask_local_cluster_s": own["seconds"],
            "dask_running_cluster_s": running["seconds"],
            "dask_vs_jobs_2": round(running["seconds"] / two["seconds"], 3),
            "dask_local_cluster_vs_jobs_2": round(own["seconds"] / two["seconds"], 3),
            "per_task_overhead_local_s": overhead_local,
            "per_task_overhead_dask_s": overhead_dask,
        }
    return {
        "traces": traces,
        "events_per_trace": events,
        "events": total,
        "jobs_1_s": one["seconds"],
        "jobs_2_s": two["seconds"],
        "speedup": round(one["seconds"] / two["seconds"], 2) if two["seconds"] else None,
        "exit_status": [one["exit_status"], two["exit_status"], own["exit_status"]],
        **dask,
        "cpus": os.cpu_count(),
        "loadavg_1min_before": round(load, 2),
    }


if __name__ == "__main__":
    print(run(*(int(a) for a in sys.argv[1:3])))
