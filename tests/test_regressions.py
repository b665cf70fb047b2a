"""The regression traces of traces/regressions/: defects the fuzzers and the hostile-input table found, each
kept as a small trace whose header comment says what broke and how it was fixed (or, while a defect is open,
why). Each replays, with the full audit after every event, to exactly the results, records and findings
written here; guest-action traces under both MMUs. An open defect's run is ``xfail(strict=True)``: it
expects the architecture's answer, so it fails the suite the day the defect is fixed, until moved here.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kvmpfn.replay import ReplayOptions, replay_file

REGRESSIONS = Path(__file__).resolve().parent.parent / "traces" / "regressions"
SHADOW: tuple = ()
TDP = (("mmu", "tdp"),)

#: trace -> options -> (the result of every event, fields of the records at some seqs, finding codes)
EXPECTED: dict[str, dict[tuple, tuple[list[str], dict[int, dict], list[str]]]] = {
    "pte-write-role-mismatch.jsonl": {
        SHADOW: (
            ["ok", "ok", "ok", "ok", "mapped", "ok", "emulated", "ok", "guest_fault", "ok"],
            {8: {"seq": 8, "line": 25, "op": "access", "result": "guest_fault", "err": "0x9", "set_accessed": []}},
            [],
        ),
        TDP: (
            ["ok", "ok", "ok", "ok", "mapped", "ok", "ok", "ok", "guest_fault", "ok"],
            {8: {"seq": 8, "line": 25, "op": "access", "result": "guest_fault", "err": "0x9", "set_accessed": []}},
            [],
        ),
    },
    "smep-wp0-pte-write-nx-role.jsonl": {
        SHADOW: (
            ["ok", "ok", "ok", "ok", "mapped", "ok", "emulated", "ok", "guest_fault", "ok"],
            {8: {"seq": 8, "line": 25, "op": "access", "result": "guest_fault", "err": "0xd", "set_accessed": []}},
            [],
        ),
        TDP: (
            ["ok", "ok", "ok", "ok", "mapped", "ok", "ok", "ok", "guest_fault", "ok"],
            {8: {"seq": 8, "line": 25, "op": "access", "result": "guest_fault", "err": "0xd", "set_accessed": []}},
            [],
        ),
    },
    "cr0wp0-large-page-clean-pde.jsonl": {
        SHADOW: (
            ["ok", "mapped", "emulated", "mapped", "mapped", "ok"],
            {
                1: {"line": 19, "spte": "0x100001063", "set_dirty": "0x20000"},  # W without U
                3: {"line": 22, "spte": "0x100002065"},  # read-only: a new metaphysical page, not the old one
                4: {"line": 23, "gpa": "0x0", "spte": "0x100001067", "set_dirty": "0x20000"},
            },
            [],
        ),
        TDP: (
            ["ok", "mapped", "ok", "mapped", "hit", "ok"],
            {4: {"line": 23, "gpa": "0x0", "set_dirty": "0x20000"}},
            [],
        ),
    },
}
#: (trace, options) of the defects still open
OPEN: set[tuple[str, tuple]] = set()


def test_every_regression_trace_is_checked():
    assert sorted(p.name for p in REGRESSIONS.glob("*.jsonl")) == sorted(EXPECTED)


RUNS = [
    pytest.param(name, options, marks=[pytest.mark.xfail(strict=True)] if (name, options) in OPEN else [])
    for name, runs in EXPECTED.items()
    for options in runs
]


@pytest.mark.parametrize("name, options", RUNS, ids=str)
def test_regression_trace_replays_exactly(name: str, options: tuple):
    results, records, codes = EXPECTED[name][options]
    emit = io.StringIO()
    result = replay_file(str(REGRESSIONS / name), ReplayOptions(audit_every=1, **dict(options)), emit)
    assert result.error is None, result.error
    out = [json.loads(line) for line in emit.getvalue().splitlines()]
    assert [r["result"] for r in out] == results
    for seq, fields in records.items():
        assert {key: out[seq].get(key) for key in fields} == fields, out[seq]
    assert [f["code"] for f in result.findings] == codes
