"""Issue #16: what auditing at every point costs (incremental ``--audit-every 1``, ``--kernel-audit``,
``--paranoid``) against a plain replay of the same trace, and what hex-string integers cost against JSON
numbers. Every replay runs in a fresh process (bench_replay); times are CPU seconds of that process, so the
ratios hold on a loaded machine too.

    python -m bench.bench_modes [EVENTS [AUDIT_EVENTS]]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from bench import bench_replay

#: the options of each mode (ReplayOptions fields)
MODES = {
    "plain": {},
    "audit-every 1": {"audit_every": 1},
    "kernel-audit": {"kernel_audit": True},
    "paranoid": {"paranoid": True},
}
HEX_KEYS = ("addr", "gpa", "val", "err", "gfn", "cr3", "first_pfn")


def _ints(obj: dict) -> dict:
    out = {k: int(v, 16) if k in HEX_KEYS and isinstance(v, str) else v for k, v in obj.items()}
    for key in ("guest", "host"):
        if isinstance(out.get(key), dict):
            out[key] = _ints(out[key])
    if "memslots" in out:
        out["memslots"] = [_ints(m) for m in out["memslots"]]
    return out


def int_copy(path: str) -> str:
    """The same trace with its hex strings written as JSON numbers (same field order)."""
    out = path.replace(".jsonl", "-int.jsonl")
    with open(path, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for line in src:
            if line.startswith("{"):
                line = json.dumps(_ints(json.loads(line)), separators=(",", ":")) + "\n"
            dst.write(line)
    return out


def run(events: int, audit_events: int, directory: str | None = None) -> dict:
    """Hex vs int at ``events``; the audit modes against plain at ``audit_events``; both MMUs."""
    with tempfile.TemporaryDirectory(prefix="kvmpfn-bench-", dir=directory) as tmp:
        rows: dict = {"events": events, "audit_events": audit_events, "hex_vs_int": [], "modes": []}
        for mmu in ("tdp", "shadow"):
            path = bench_replay.generate(tmp, "steady", mmu, events)
            ints = int_copy(path)
            hexed = bench_replay.replay_in_subprocess(path)
            plain = bench_replay.replay_in_subprocess(ints)
            rows["hex_vs_int"].append(
                {
                    "mmu": mmu,
                    "hex_cpu_s": hexed["cpu_s"],
                    "int_cpu_s": plain["cpu_s"],
                    "hex_events_per_s": hexed["events_per_s"],
                    "int_events_per_s": plain["events_per_s"],
                    "hex_over_int": round(hexed["cpu_s"] / plain["cpu_s"], 3),
                }
            )
            os.unlink(ints)
            if audit_events != events:
                os.unlink(path)
                path = bench_replay.generate(tmp, "steady", mmu, audit_events)
            base = None
            for mode in MODES:
                r = bench_replay.replay_in_subprocess(path, mode)
                base = base or r["cpu_s"]
                rows["modes"].append(
                    {
                        "mmu": mmu,
                        "mode": mode,
                        "events": r["events"],
                        "cpu_s": r["cpu_s"],
                        "events_per_s": r["events_per_s"],
                        "over_plain": round(r["cpu_s"] / base, 2),
                        "findings": r["findings"],
                        "error": r["error"],
                    }
                )
            os.unlink(path)
        return rows


def main(argv: list[str]) -> None:
    events = int(argv[0]) if argv else 200_000
    audit_events = int(argv[1]) if len(argv) > 1 else events
    print(json.dumps(run(events, audit_events), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
