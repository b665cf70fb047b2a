"""What looking inside costs (issue #15): ``replay`` plain, then ``stat``, ``replay --timeline``, ``replay
--html``, ``explain --pfn``, ``explain --spte-of``, ``show`` (the end, in full) on the same synth steady trace,
each in a fresh process: seconds, the ratio to the plain replay, peak RSS. Two sizes show whether memory
stays flat.

    python -m bench.bench_inspect                  # 100,000 and 1,000,000 events (a few minutes)
    python -m bench.bench_inspect --events 50000   # one size

Prints a table and writes bench/inspect.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

RUN = """
import json, resource, sys, time
from kvmpfn.replay import ReplayOptions, replay_file
what, trace, out = sys.argv[1], sys.argv[2], sys.argv[3]
opts = ReplayOptions()
start = time.perf_counter()
if what == "replay":
    replay_file(trace, opts)
elif what == "stat":
    from kvmpfn.inspect.series import Tracker
    t = Tracker(); r = replay_file(trace, opts, observer=t); json.dumps(t.doc(r))
elif what == "timeline":
    from kvmpfn.inspect.series import Tracker
    from kvmpfn.report.timeline import TimelineWriter
    with open(out, "w") as fh:
        replay_file(trace, opts, observer=Tracker(TimelineWriter(fh, trace)))
elif what == "html":
    from kvmpfn.inspect.series import Tracker
    from kvmpfn.report.html import histories_of, replay_report
    t = Tracker(); r = replay_file(trace, opts, observer=t)
    open(out, "w").write(replay_report(r, t, histories_of(trace, opts, r)))
elif what == "explain-pfn":
    from kvmpfn.inspect.history import explain
    json.dumps(explain(trace, opts, pfn=0x100010))
elif what == "explain-gva":
    from kvmpfn.inspect.history import explain
    from kvmpfn.trace import open_trace
    with open_trace(trace) as reader:
        gva = next(e.addr for _, e in reader if type(e).__name__ == "Access")
    json.dumps(explain(trace, opts, gva=gva))
elif what == "show":
    from kvmpfn.inspect.state import StopAt
    s = StopAt(None); replay_file(trace, opts, observer=s); json.dumps(s.state)
secs = time.perf_counter() - start
print(json.dumps({"seconds": secs, "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

KINDS = ("replay", "stat", "timeline", "html", "explain-pfn", "explain-gva", "show")


def measure(kind: str, trace: str, tmp: str) -> dict:
    out = os.path.join(tmp, f"{kind}.out")
    proc = subprocess.run([sys.executable, "-c", RUN, kind, trace, out], capture_output=True, text=True, check=True)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["output_bytes"] = os.path.getsize(out) if os.path.exists(out) else None
    return row


def run(sizes: list[int]) -> list[dict]:
    from kvmpfn.synth import SynthSpec, write_synth

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for events in sizes:
            trace = os.path.join(tmp, f"steady-{events}.jsonl.zst")
            write_synth(trace, SynthSpec(workload="steady", events=events, mmu="shadow"))
            base = None
            for kind in KINDS:
                row = {"events": events, "what": kind, **measure(kind, trace, tmp)}
                base = base or row["seconds"]
                row["x_replay"] = round(row["seconds"] / base, 2)
                rows.append(row)
                print(
                    f"{events:>9} {kind:<12} {row['seconds']:8.2f}s  x{row['x_replay']:<5} "
                    f"rss {row['rss_kib'] / 1024:7.1f} MiB  output {row['output_bytes'] or 0:>11,} B",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, action="append", help="trace length (repeatable)")
    args = parser.parse_args()
    sizes = args.events or [100_000, 1_000_000]
    rows = run(sizes)
    with open(os.path.join(HERE, "inspect.json"), "w") as fh:
        json.dump({"python": sys.version.split()[0], "rows": rows}, fh, indent=2)
        fh.write("\n")


if __name__ == "__main__":
    main()
