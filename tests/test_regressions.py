"""The regression traces of traces/regressions/: defects the fuzzers and the hostile-input table found, each
kept as a small trace whose header comment says what broke and how it was fixed. Each replays to exactly the
outcome records and findings written here, under both MMUs where the trace is a guest-action trace.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kvmpfn.replay import ReplayOptions, replay_file

REGRESSIONS = Path(__file__).resolve().parent.parent / "traces" / "regressions"

#: trace -> options -> (the result of every event, the records to compare whole by seq, finding codes)
EXPECTED: dict[str, dict[tuple, tuple[list[str], dict[int, dict], list[str]]]] = {
    "pte-write-role-mismatch.jsonl": {
        (): (
            ["ok", "ok", "ok", "ok", "mapped", "ok", "emulated", "ok", "guest_fault", "ok"],
            {8: {"seq": 8, "line": 25, "op": "access", "result": "guest_fault", "err": "0x9", "set_accessed": []}},
            [],
        ),
        (("mmu", "tdp"),): (
            ["ok", "ok", "ok", "ok", "mapped", "ok", "ok", "ok", "guest_fault", "ok"],
            {8: {"seq": 8, "line": 25, "op": "access", "result": "guest_fault", "err": "0x9", "set_accessed": []}},
            [],
        ),
    },
}


def test_every_regression_trace_is_checked():
    assert sorted(p.name for p in REGRESSIONS.glob("*.jsonl")) == sorted(EXPECTED)


@pytest.mark.parametrize("name, options", [(name, opts) for name, runs in EXPECTED.items() for opts in runs], ids=str)
def test_regression_trace_replays_exactly(name: str, options: tuple):
    results, records, codes = EXPECTED[name][options]
    emit = io.StringIO()
    result = replay_file(str(REGRESSIONS / name), ReplayOptions(audit_every=1, **dict(options)), emit)
    assert result.error is None, result.error
    out = [json.loads(line) for line in emit.getvalue().splitlines()]
    assert [r["result"] for r in out] == results
    for seq, record in records.items():
        assert out[seq] == record
    assert [f["code"] for f in result.findings] == codes
