"""``python -m bench`` (``make bench``): replay and decode speed, memory, audit cost, corpus gate; writes
bench/results.json.

    python -m bench            # 1M-event figures, the 10M-vs-1M RSS check, audit modes, the targets
    python -m bench --quick    # smaller sizes, about a minute: a smoke run
    python -m bench --profile  # cProfile 1M tdp and shadow steady replays: top-20 tables (bench/profile.json)

Timings depend on the machine and its load; results.json records the CPU model and the Python version.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

from bench import bench_audit, bench_corpus, bench_decode, bench_hunt, bench_modes, bench_replay

HERE = os.path.dirname(os.path.abspath(__file__))

SIZES = {
    # replay (and decode) events, RSS check (small, large), audit: tdp VM sizes and the synth steady shadow
    # trace length, corpus (traces, events each)
    "quick": {
        "replay": 50_000,
        "rss": (50_000, 100_000),
        "audit": (10_000,),
        "audit_synth": 20_000,
        "corpus": (40, 2_000),
        "hunt": (2_000, 20.0),
        "modes": (50_000, 10_000),
    },
    "default": {
        "replay": 1_000_000,
        "rss": (1_000_000, 10_000_000),
        "audit": (10_000, 100_000),
        "audit_synth": 100_000,
        "corpus": (40, 20_000),
        "hunt": (20_000, 120.0),
        "modes": (1_000_000, 1_000_000),  # the issue states its audit targets at 1M events
    },
}

#: issue #16's targets (replay events/s of hex traces, audit modes over plain, hex over int) and issue #8's
#: still checked (RSS growth, full audit seconds, corpus speedup)
TARGETS = {
    "steady/tdp": 250_000,
    "steady/shadow": 200_000,
    "boot/tdp": 150_000,
    "boot/shadow": 120_000,
    "audit-every 1": 3.0,
    "kernel-audit": 3.0,
    "paranoid": 5.0,
    "hex_over_int": 1.10,
    "rss_growth": 0.10,
    "audit_100k_s": 1.0,
    "jobs": 1.6,
}


def check_targets(results: dict) -> list[dict]:
    """Each target of issue #8 with the figure measured and whether it is met."""
    rows = []
    replay = {f"{r['workload']}/{r['mmu']}": r["replay_events_per_s"] for r in results["replay"]}
    for name, goal in TARGETS.items():
        if name in replay:
            rows.append({"target": f"{name} (hex) >= {goal:,} events/s", "measured": replay[name]})
            rows[-1]["met"] = replay[name] >= goal
    modes = results["modes"]
    for row in modes["modes"]:
        if row["mode"] != "plain":
            goal = TARGETS[row["mode"]]
            rows.append(
                {
                    "target": f"{row['mode']} <= {goal:g}x plain, steady/{row['mmu']} ({row['events']:,} events)",
                    "measured": f"{row['over_plain']}x",
                    "met": row["over_plain"] <= goal and row["error"] is None,
                }
            )
    for row in modes["hex_vs_int"]:
        rows.append(
            {
                "target": f"hex within 10% of int, steady/{row['mmu']} ({modes['events']:,} events)",
                "measured": f"{row['hex_over_int']}x",
                "met": row["hex_over_int"] <= TARGETS["hex_over_int"],
            }
        )
    for row in results["rss"]:
        growth = row["growth_kib"] / row["small_peak_rss_kib"]
        rows.append(
            {
                "target": f"steady/{row['mmu']} RSS at {row['large_events']:,} within 10% of {row['small_events']:,}",
                "measured": f"{growth * 100:+.1f}%",
                "met": growth <= TARGETS["rss_growth"],
            }
        )
    for row in results["audit"]:
        if row["sptes"] == 100_000:
            rows.append({"target": "full audit of 100,000 live sptes < 1 s", "measured": f"{row['audit_min_s']:.2f} s"})
            rows[-1]["met"] = row["audit_min_s"] < TARGETS["audit_100k_s"]
    if "speedup" in results["corpus"]:
        speedup = results["corpus"]["speedup"]
        rows.append({"target": "--jobs 2 >= 1.6x --jobs 1", "measured": f"{speedup}x", "met": speedup >= 1.6})
    return rows


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
    }


def say(text: str) -> None:
    print(text, flush=True)


def bench_replays(tmp: str, n: int) -> list[dict]:
    say(f"\n== replay vs decode floor: {n:,}-event synth traces (.jsonl), one process each ==")
    columns = ("replay ev/s", 12), ("decode ev/s", 12), ("replay s", 9), ("decode s", 9), ("ratio", 6), ("RSS MiB", 8)
    say(f"{'trace':<16} " + " ".join(f"{name:>{width}}" for name, width in columns))
    rows = []
    for workload in ("steady", "boot"):
        for mmu in ("tdp", "shadow"):
            path = bench_replay.generate(tmp, workload, mmu, n)
            row = {"workload": workload, "mmu": mmu, "events": n, **bench_replay.measure(path)}
            os.unlink(path)
            rows.append(row)
            say(
                f"{workload + '/' + mmu:<16} {row['replay_events_per_s']:>12,} {row['decode_events_per_s']:>12,} "
                f"{row['replay_s']:>9.1f} {row['decode_s']:>9.2f} {row['replay_over_decode']:>6.1f} "
                f"{row['replay_peak_rss_kib'] / 1024:>8.1f}"
                + (f"  findings {row['findings']}" if row["findings"] else "")
                + (f"  ERROR {row['error']}" if row["error"] else "")
            )
    return rows


def bench_rss(tmp: str, small: int, large: int) -> list[dict]:
    say(f"\n== replay peak RSS: {large:,} vs {small:,} events (steady, .zst) ==")
    rows = []
    for mmu in ("tdp", "shadow"):
        figures = {}
        for n in (small, large):
            path = bench_replay.generate(tmp, "steady", mmu, n, suffix=".jsonl.zst")
            figures[n] = bench_replay.replay_in_subprocess(path)
            os.unlink(path)
        a, b = figures[small], figures[large]
        row = {
            "workload": "steady",
            "mmu": mmu,
            "small_events": small,
            "large_events": large,
            "small_peak_rss_kib": a["peak_rss_kib"],
            "large_peak_rss_kib": b["peak_rss_kib"],
            "growth_kib": b["peak_rss_kib"] - a["peak_rss_kib"],
            "small_events_per_s": a["events_per_s"],
            "large_events_per_s": b["events_per_s"],
            "findings": a["findings"] + b["findings"],
            "small_stats": {**a["stats"], "host_frames": a["host_frames"]},
            "large_stats": {**b["stats"], "host_frames": b["host_frames"]},
        }
        rows.append(row)
        say(
            f"steady/{mmu:<7} {a['peak_rss_kib'] / 1024:7.1f} MiB at {small:,}, {b['peak_rss_kib'] / 1024:7.1f} MiB "
            f"at {large:,} (growth {row['growth_kib'] / 1024:+.1f} MiB); live sptes {a['stats'].get('sptes')} -> "
            f"{b['stats'].get('sptes')}, frames referenced {a['stats'].get('frames_referenced')} -> "
            f"{b['stats'].get('frames_referenced')}, host frames {a['host_frames']} -> {b['host_frames']}"
        )
    return rows


def bench_audits(sizes: tuple[int, ...], synth_events: int) -> list[dict]:
    say("\n== one full audit against live sptes ==")
    rows = [bench_audit.measure_in_subprocess(pages) for pages in sizes]
    rows.append(bench_audit.measure_in_subprocess("steady", "shadow", synth_events))
    for row in rows:
        say(
            f"{row['vm']:<26} {row['sptes']:>8,} sptes, {row['shadow_pages']:>4} shadow pages: "
            f"{row['audit_min_s'] * 1000:8.1f} ms (median {row['audit_median_s'] * 1000:.1f} ms, "
            f"{row['audit_us_per_spte']:.2f} us/spte; peak RSS {row['peak_rss_kib'] / 1024:.0f} MiB)"
        )
    return rows


def bench_gate(traces: int, events: int) -> dict:
    say(f"\n== kvmpfn audit over {traces} synth traces of {events:,} events: --jobs 1 vs --jobs 2 ==")
    row = bench_corpus.run(traces, events)
    if "skipped" in row:
        say(f"skipped: {row['skipped']}")
    else:
        say(
            f"--jobs 1: {row['jobs_1_s']:.1f} s, --jobs 2: {row['jobs_2_s']:.1f} s (speedup {row['speedup']}x on "
            f"{row['cpus']} CPUs, load average {row['loadavg_1min_before']} before; exit {row['exit_status']})"
        )
        if "dask_vs_jobs_2" in row:
            say(
                f"dask, 2 workers: {row['dask_running_cluster_s']:.1f} s on a running cluster "
                f"({row['dask_vs_jobs_2']}x --jobs 2), {row['dask_local_cluster_s']:.1f} s with its own LocalCluster; "
                f"per-task overhead {row['per_task_overhead_local_s'] * 1000:.1f} ms local, "
                f"{row['per_task_overhead_dask_s'] * 1000:.1f} ms dask"
            )
    return row


def bench_audit_modes(events: int, audit_events: int) -> dict:
    say(
        f"\n== audit modes vs plain replay (steady, {audit_events:,} events) and hex vs int ({events:,} events);"
        " CPU seconds of one process each =="
    )
    if audit_events != events:
        say(f"(the audit modes run at {audit_events:,} events, not {events:,}: --paranoid takes minutes at 1M)")
    row = bench_modes.run(events, audit_events)
    for r in row["modes"]:
        say(
            f"steady/{r['mmu']:<7} {r['mode']:<14} {r['cpu_s']:8.2f} s  {r['events_per_s']:>9,} ev/s  "
            f"{r['over_plain']:6.2f}x plain" + (f"  ERROR {r['error']}" if r["error"] else "")
        )
    for r in row["hex_vs_int"]:
        say(
            f"steady/{r['mmu']:<7} hex {r['hex_cpu_s']:.2f} s ({r['hex_events_per_s']:,} ev/s), "
            f"int {r['int_cpu_s']:.2f} s "
            f"({r['int_events_per_s']:,} ev/s): hex/int {r['hex_over_int']}x"
        )
    return row


def bench_decode_flat(n: int) -> dict:
    say(f"\n== bare decode (bench_decode): {n:,} events ==")
    row = bench_decode.run(n)
    say(
        f"{row['events_per_s']:,} events/s; reader CPU per line: hex {row['hex_us_per_line']:.3f} µs, "
        f"int {row['int_us_per_line']:.3f} µs; peak RSS {row['small_peak_rss_kib'] / 1024:.1f} MiB at "
        f"{row['small_events']:,}, {row['peak_rss_kib'] / 1024:.1f} MiB at {row['events']:,}"
    )
    return row


def bench_reduce_hunt(events: int, budget: float) -> dict:
    say(f"\n== reduce {events:,}-event traces; hunt every bug from an empty corpus, {budget:.0f} s budget each ==")
    return bench_hunt.run_pure(events, budget, say=say)


def profile_markdown(prof: dict, title: str) -> str:
    lines = [
        f"**{title}** — {prof['events']:,} events, {prof['seconds']:.1f} s under cProfile",
        "",
        "| # | function | calls | own s | share |",
        "|---:|---|---:|---:|---:|",
    ]
    for i, row in enumerate(prof["top"], 1):
        lines.append(
            f"| {i} | `{row['function']}` | {row['calls']:,} | {row['own_s']:.2f} | {row['share'] * 100:.1f}% |"
        )
    return "\n".join(lines)


def bench_profiles(tmp: str, n: int) -> dict:
    out = {}
    for mmu in ("tdp", "shadow"):
        path = bench_replay.generate(tmp, "steady", mmu, n)
        prof = bench_replay.profile_in_subprocess(path)
        os.unlink(path)
        out[f"steady/{mmu}"] = prof
        say("\n" + profile_markdown(prof, f"steady/{mmu}"))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    parser.add_argument("--profile", action="store_true", help="only cProfile the steady replays")
    parser.add_argument("--hunt", action="store_true", help="only reduce and hunt (issue #20)")
    parser.add_argument(
        "-o", "--output", help="results file [default: bench/results.json; bench/profile.json with --profile]"
    )
    args = parser.parse_args(argv)
    output = args.output or os.path.join(HERE, "profile.json" if args.profile else "results.json")
    mode = "quick" if args.quick else "default"
    sizes = SIZES[mode]
    results: dict = {"mode": mode, "machine": machine()}
    say(
        f"kvmpfn bench ({mode}): {results['machine']['cpu']}, {results['machine']['cpus']} CPUs, "
        f"Python {results['machine']['python']}"
    )
    with tempfile.TemporaryDirectory(prefix="kvmpfn-bench-") as tmp:
        if args.profile:
            results["profile"] = bench_profiles(tmp, sizes["replay"])
        elif args.hunt:
            results["hunt"] = bench_reduce_hunt(*sizes["hunt"])
        else:
            results["replay"] = bench_replays(tmp, sizes["replay"])
            results["decode"] = bench_decode_flat(sizes["replay"])
            results["rss"] = bench_rss(tmp, *sizes["rss"])
            results["audit"] = bench_audits(sizes["audit"], sizes["audit_synth"])
            results["corpus"] = bench_gate(*sizes["corpus"])
            results["hunt"] = bench_reduce_hunt(*sizes["hunt"])
            results["modes"] = bench_audit_modes(*sizes["modes"])
            if mode == "default":
                results["targets"] = check_targets(results)
                say("\n== targets (issue #16; RSS, audit and --jobs from issue #8) ==")
                for row in results["targets"]:
                    say(f"{'met ' if row['met'] else 'NOT '} {row['target']:<56} measured {row['measured']}")
    with open(output, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    say(f"\nwrote {output}")


if __name__ == "__main__":
    main(sys.argv[1:])
