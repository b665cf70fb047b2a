"""Trace decode speed and memory: write an n-event trace, time a bare decode through the reader (µs of CPU per
line, hex strings and the same trace with JSON integers), compare peak RSS at n/10 and n.

Run: ``python -m bench.bench_decode [N]``. Each decode runs in its own process so that the two peak-RSS
figures are independent; if memory is flat, the decode of n events peaks no higher than that of n/10. The
µs/line figures are the best CPU time of three passes over the file in that process.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from kvmpfn.trace import Access, Header, Pf, TraceWriter, Write, open_trace


def write_trace(path: str, n: int) -> None:
    """An n-event mix of ``access``, ``pf`` and ``write`` events, as synth would write it."""
    with TraceWriter(path, validate=False) as w:
        w.write_header(Header(kvmpfn=1))
        for i in range(n):
            gva = 0x7F0000000000 + (i * 4096) % (1 << 32)
            k = i % 3
            if k == 0:
                w.write_event(Access(addr=gva, write=bool(i & 4), user=True, fetch=False))
            elif k == 1:
                w.write_event(Pf(addr=gva, err=0x6))
            else:
                w.write_event(Write(gpa=(i * 8) % (1 << 30), val=i, len=8))


def decode(path: str, passes: int = 1) -> dict:
    """Iterate the reader over ``path`` ``passes`` times: events, seconds and CPU seconds of the fastest pass,
    events/s, CPU µs per line, and this process's peak RSS (KiB)."""
    best = None
    for _ in range(passes):
        start, cpu = time.perf_counter(), time.process_time()
        events = 0
        with open_trace(path) as reader:
            for _ in reader:
                events += 1
        cpu = time.process_time() - cpu
        seconds = time.perf_counter() - start
        if best is None or cpu < best[1]:
            best = seconds, cpu
    seconds, cpu = best
    return {
        "events": events,
        "seconds": round(seconds, 3),
        "cpu_s": round(cpu, 3),
        "events_per_s": round(events / seconds),
        "us_per_line": round(cpu / max(events, 1) * 1e6, 3),
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def decode_in_subprocess(path: str, passes: int = 1) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--decode", path, str(passes)], capture_output=True, check=True, text=True
    )
    return json.loads(out.stdout)


def run(n: int = 1_000_000) -> dict:
    """Write traces of n/10 and n events (hex strings, as TraceWriter writes them) and the n-event one with
    JSON integers, decode each in a fresh process, and report the figures."""
    from bench.bench_modes import int_copy  # bench_modes imports this module (through bench_replay)

    small_n = max(n // 10, 1)
    with tempfile.TemporaryDirectory(prefix="kvmpfn-bench-") as tmp:
        small, large = os.path.join(tmp, "small.jsonl"), os.path.join(tmp, "large.jsonl")
        write_trace(small, small_n)
        write_trace(large, n)
        trace_bytes = os.path.getsize(large)
        small_result = decode_in_subprocess(small)
        large_result = decode_in_subprocess(large, passes=3)
        int_result = decode_in_subprocess(int_copy(large), passes=3)
    return {
        "hex_us_per_line": large_result["us_per_line"],
        "int_us_per_line": int_result["us_per_line"],
        "hex_over_int": round(large_result["us_per_line"] / int_result["us_per_line"], 2),
        "events": large_result["events"],
        "trace_bytes": trace_bytes,
        "seconds": large_result["seconds"],
        "events_per_s": large_result["events_per_s"],
        "peak_rss_kib": large_result["peak_rss_kib"],
        "small_events": small_result["events"],
        "small_events_per_s": small_result["events_per_s"],
        "small_peak_rss_kib": small_result["peak_rss_kib"],
        "rss_growth_kib": large_result["peak_rss_kib"] - small_result["peak_rss_kib"],
    }


def main(argv: list[str]) -> None:
    if argv[:1] == ["--decode"]:
        print(json.dumps(decode(argv[1], int(argv[2]) if len(argv) > 2 else 1)))
        return
    n = int(argv[0]) if argv else 1_000_000
    r = run(n)
    print(f"decode: {r['events']:,} events ({r['trace_bytes'] / 2**20:.1f} MiB) in {r['seconds']:.2f} s")
    print(f"  {r['events_per_s']:,} events/s")
    print(
        f"  reader CPU per line: hex {r['hex_us_per_line']:.3f} µs, int {r['int_us_per_line']:.3f} µs "
        f"(hex/int {r['hex_over_int']}x)"
    )
    print(
        f"  peak RSS {r['small_peak_rss_kib'] / 1024:.1f} MiB at {r['small_events']:,} events, "
        f"{r['peak_rss_kib'] / 1024:.1f} MiB at {r['events']:,} events "
        f"(growth {r['rss_growth_kib'] / 1024:+.1f} MiB)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
