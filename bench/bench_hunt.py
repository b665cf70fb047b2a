"""Issue #20's figures: ``reduce`` on three 20k-event traces, and ``hunt`` from an empty corpus for every bug.

    python -m bench.bench_hunt [EVENTS [BUDGET]]     # JSON on stdout

Each reduction runs in this process on a ``kvmpfn synth`` trace (seed 0, shadow, 64-bit guest); each hunt is
``kvmpfn.hunt.hunt(bug, seed=0, budget=BUDGET)`` with no corpus, the time to the killing trace reported (the
reduction of that trace included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from kvmpfn.hunt import hunt
from kvmpfn.kvm.bugs import BUGS
from kvmpfn.reduce import choose_goal, load_trace, reduce_trace, replay_events
from kvmpfn.replay import ReplayOptions
from kvmpfn.synth import SynthSpec, write_synth

#: the issue's three reductions: workload and the bug whose finding is kept
REDUCTIONS = (
    ("fork-storm", "same-pfn-no-release"),
    ("steady", "prefetch-no-release"),
    ("boot", "release-clean-writable"),
)
MAX_EVENTS, MAX_SECONDS = 30, 120.0


def measure_reduce(directory: str, workload: str, bug: str, events: int) -> dict:
    path = os.path.join(directory, f"{workload}.jsonl")
    write_synth(path, SynthSpec(workload, events, mmu="shadow"))
    options = ReplayOptions(bugs=frozenset({bug}))
    start = time.monotonic()
    header, trace = load_trace(path)
    goal = choose_goal(header, trace, options)
    red = reduce_trace(header, trace, goal.test, goal.finding)
    seconds = time.monotonic() - start
    kept = goal.test(red.header, red.events)
    return {
        "workload": workload,
        "bug": bug,
        "events": events,
        "kept": goal.what,
        "reduced_events": len(red.events),
        "replays": red.replays,
        "seconds": round(seconds, 2),
        "met": kept and len(red.events) <= MAX_EVENTS and seconds <= MAX_SECONDS,
    }


def measure_hunt(bug: str, budget: float) -> dict:
    result = hunt(bug, seed=0, budget=budget)
    row = {
        "bug": bug,
        "verdict": result.verdict,
        "seconds": round(result.seconds, 2),
        "traces": result.candidates,
        "reduced_events": len(result.reduced.events) if result.reduced else None,
        "sites": sorted(result.sites),
    }
    if result.reduced is not None and result.verdict == "killed":
        run = replay_events(result.reduced.header, result.reduced.events, ReplayOptions(bugs=frozenset({bug})))
        row["finding"] = sorted({f["code"] for f in run.findings})
    return row


def run(events: int = 20_000, budget: float = 120.0, say=print) -> dict:
    out: dict = {"reduce": [], "hunt": []}
    with tempfile.TemporaryDirectory(prefix="kvmpfn-bench-reduce-") as tmp:
        for workload, bug in REDUCTIONS:
            row = measure_reduce(tmp, workload, bug, events)
            out["reduce"].append(row)
            say(
                f"reduce {workload:<10} --bug {bug:<24} {events:,} -> {row['reduced_events']} events "
                f"in {row['seconds']:.1f} s ({row['replays']} replays; keeps {row['kept']}) "
                f"{'met' if row['met'] else 'NOT met'}"
            )
    for bug in sorted(BUGS):
        row = measure_hunt(bug, budget)
        out["hunt"].append(row)
        say(
            f"hunt {bug:<26} {row['verdict']:<10} {row['seconds']:6.1f} s  {row['traces']:>6} traces"
            + (f"  -> {row['reduced_events']} events {row.get('finding', '')}" if row["reduced_events"] else "")
        )
    killed = sum(r["verdict"] == "killed" for r in out["hunt"])
    out["killed"] = f"{killed}/{len(BUGS)}"
    say(f"hunt killed {killed}/{len(BUGS)} bugs within {budget:.0f} s each")
    return out


def run_pure(events: int, budget: float, say=print) -> dict:
    """:func:`run` in a child process on the pure-Python simulator (hunt's probe reads source lines), its
    lines printed as they come."""
    env = {**os.environ, "KVMPFN_PURE": "1"}
    cmd = [sys.executable, "-m", "bench.bench_hunt", str(events), str(budget)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as child:
        assert child.stdout is not None
        lines = [line.rstrip("\n") for line in child.stdout]
    if child.returncode:
        raise RuntimeError(f"bench.bench_hunt exited with {child.returncode}")
    for line in lines[:-1]:
        say(line)
    return json.loads(lines[-1])


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(run(int(args[0]) if args else 20_000, float(args[1]) if len(args) > 1 else 120.0, say=print)))
