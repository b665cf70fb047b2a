"""Replay speed and memory: synth traces replayed in fresh processes, next to a bare typed decode of the same
file (the floor: what reading the trace costs before the MMU does anything).

Run one measurement by hand::

    python -m bench.bench_replay --replay TRACE      # JSON: events, seconds, events/s, peak RSS, results
    python -m bench.bench_replay --profile TRACE     # JSON: cProfile's top 20 functions by own time

Each replay runs in its own process, so its peak RSS (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import resource
import subprocess
import sys
import time

import kvmpfn.replay
from bench.bench_decode import decode_in_subprocess
from kvmpfn.replay import ReplayOptions, replay_file
from kvmpfn.synth import SynthSpec, write_synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Replayer(kvmpfn.replay.Replayer):
    """The replay engine, remembered so that the VM's size can be reported after ``replay_file``."""

    last: kvmpfn.replay.Replayer | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _Replayer.last = self


def replay(path: str, mode: str = "plain") -> dict:
    """Replay ``path`` in this process with the header's options and the audit ``mode`` (bench_modes.MODES):
    events, seconds, CPU seconds, events/s, peak RSS (KiB), and ``host_frames``: the guest frames the host
    backs at the end (guest memory touched so far)."""
    from bench.bench_modes import MODES

    kvmpfn.replay.Replayer = _Replayer
    start, cpu = time.perf_counter(), time.process_time()
    result = replay_file(path, ReplayOptions(**MODES[mode]))
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    rp = _Replayer.last
    return {
        "host_frames": None if rp is None else len(rp.host.frames),
        "events": result.events,
        "seconds": round(seconds, 3),
        "cpu_s": round(cpu, 3),
        "events_per_s": round(result.events / seconds) if seconds else 0,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "findings": len(result.findings),
        "error": result.error,
        "results": dict(sorted(result.results.items())),
        "stats": result.stats,
    }


def profile(path: str, top: int = 20) -> dict:
    """cProfile one replay of ``path``: the ``top`` functions by own time, each with its share of the total."""
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    result = replay_file(path, ReplayOptions())
    prof.disable()
    seconds = time.perf_counter() - start
    stats = pstats.Stats(prof)
    total = stats.total_tt
    rows = []
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in sorted(
        stats.stats.items(), key=lambda item: item[1][2], reverse=True
    )[:top]:
        where = os.path.relpath(filename, ROOT) if filename.startswith(ROOT) else filename
        rows.append(
            {
                "function": name if where == "~" else f"{where}:{line}({name})",
                "calls": ncalls,
                "own_s": round(tottime, 3),
                "share": round(tottime / total, 4) if total else 0.0,
                "cumulative_s": round(cumtime, 3),
            }
        )
    return {"events": result.events, "seconds": round(seconds, 3), "profiled_s": round(total, 3), "top": rows}


def _child(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_replay", *args],
        capture_output=True,
        check=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    return json.loads(out.stdout)


def replay_in_subprocess(path: str, mode: str = "plain") -> dict:
    return _child("--replay", path, mode)


def profile_in_subprocess(path: str, top: int = 20) -> dict:
    return _child("--profile", path, str(top))


def generate(directory: str, workload: str, mmu: str, events: int, suffix: str = ".jsonl", seed: int = 1) -> str:
    """Write a synth trace into ``directory``; returns its path."""
    path = os.path.join(directory, f"{workload}-{mmu}-{events}{suffix}")
    write_synth(path, SynthSpec(workload, events, seed=seed, mmu=mmu))
    return path


def measure(path: str) -> dict:
    """Decode floor and replay of one trace, each in a fresh process, and their ratio."""
    decoded = decode_in_subprocess(path)
    replayed = replay_in_subprocess(path)
    return {
        "trace_bytes": os.path.getsize(path),
        "decode_s": decoded["seconds"],
        "decode_events_per_s": decoded["events_per_s"],
        "decode_peak_rss_kib": decoded["peak_rss_kib"],
        "replay_s": replayed["seconds"],
        "replay_events_per_s": replayed["events_per_s"],
        "replay_over_decode": round(replayed["seconds"] / decoded["seconds"], 1) if decoded["seconds"] else None,
        "replay_peak_rss_kib": replayed["peak_rss_kib"],
        "findings": replayed["findings"],
        "error": replayed["error"],
        "results": replayed["results"],
        "stats": replayed["stats"],
    }


def main(argv: list[str]) -> None:
    if argv[:1] == ["--replay"]:
        print(json.dumps(replay(argv[1], *argv[2:3])))
    elif argv[:1] == ["--profile"]:
        print(json.dumps(profile(argv[1], int(argv[2]) if len(argv) > 2 else 20)))
    else:
        sys.exit("usage: python -m bench.bench_replay --replay TRACE [MODE] | --profile TRACE [TOP]")


if __name__ == "__main__":
    main(sys.argv[1:])
