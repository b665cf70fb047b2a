"""The bundled corpus gates the project itself: it passes its baseline, it kills the historical bugs, and
`compare` sees exactly the documented differences between kernel variants. Also: the README's example runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpfn.kvm.bugs import BUGS
from kvmpfn.mutants import compare, run_trace
from kvmpfn.replay import ReplayOptions
from kvmpfn.runner import RunnerConfig

TWO = RunnerConfig(jobs=2)

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "traces"


def kvmpfn(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvmpfn", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def corpus() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in TRACES.rglob("*.jsonl"))


def written() -> list[str]:
    """The corpus without traces/hunted/: the kernel-variant comparisons below are facts about the traces
    written by hand; a hunted trace is only meant to kill its bug."""
    return [p for p in corpus() if not p.startswith("traces/hunted/")]


def test_the_corpus_passes_its_baseline():
    proc = kvmpfn("audit", "traces/", "--jobs", "2", "--format", "json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["summary"]["fail"] == 0 and doc["summary"]["error"] == 0
    assert doc["summary"]["traces"] == len(corpus())


# bug -> (its killing trace, the exact finding delta that trace shows under the bug)
KILLS = {
    "audit-no-release": ("mutants/cr0wp-user-page.jsonl", {"refcount-leak": 1}),
    "cr0wp-shared-sp": ("mutants/cr0wp-toggle.jsonl", {"spte-permission": 1}),
    "cr0wp-user-write": ("mutants/cr0wp-user-page.jsonl", {"spte-permission": 1}),
    "direct-map-into-large": ("mutants/dirty-log-splits-large.jsonl", {"kernel-bug": 1}),
    "dirty-log-pointer-wp": ("mutants/dirty-log-split-region.jsonl", {"fault-loop": 1}),
    "double-release": ("mutants/cr0wp-toggle.jsonl", {"refcount-underflow": 1}),
    "error-pfn-no-release": ("mutants/mmio-outside-slots.jsonl", {"refcount-leak": 1}),
    "fetch-bailout-parent": ("findings/parent-link.jsonl", {"parent-link": 1}),
    "fetch-large-rmap-remove": (
        "mutants/pse-toggle-large-in-the-way.jsonl",
        {"refcount-underflow": 1, "kernel-bug": 1},
    ),
    "handle-hva-unaligned": ("mutants/hva-unaligned-slot.jsonl", {"notifier-stale-spte": 1}),
    "large-spte-remove-order": ("findings/rmap-mismatch.jsonl", {"refcount-leak": 1, "rmap-mismatch": 1}),
    "memslot-delete-no-flush": ("mutants/memslot-delete-notifier.jsonl", {"spte-without-memslot": 1}),
    "no-rsvd-check": ("mutants/nx-reserved.jsonl", {"spte-hpa-mismatch": 1}),
    "no-write-protect": ("mutants/self-map-user-write.jsonl", {"writable-shadowed-gfn": 1}),
    "pageless-as-normal": ("findings/pageless-refcount.jsonl", {"pageless-refcount": 1}),
    "pfn-shift-32": ("mutants/cr0wp-toggle.jsonl", {"refcount-leak": 1, "refcount-underflow": 1}),
    "prefetch-no-release": ("mutants/cr0wp-toggle.jsonl", {"refcount-leak": 1}),
    "pse32-double-update": ("mutants/pse32-pde-rewrite.jsonl", {"spte-hpa-mismatch": 1}),
    "release-clean-writable": ("mutants/cr0wp-toggle.jsonl", {"dirty-lost": 1}),
    "rmap-wp-hugepage-iter": ("mutants/wp-two-large-sptes.jsonl", {"writable-shadowed-gfn": 1}),
    "role-ignores-pse-nx": ("mutants/pse-toggle-stale-split.jsonl", {"spte-hpa-mismatch": 1}),
    "same-pfn-no-release": ("mutants/dirty-log-split-region.jsonl", {"refcount-leak": 1}),
    "sp-access-inherit": ("mutants/pd-mixed-access.jsonl", {"spte-permission": 1}),
    "tdp-gpa-32bit": ("mutants/tdp-gpa-above-4g.jsonl", {"fault-loop": 1}),
    "unaccount-invalid-root": ("findings/mmu-page-accounting.jsonl", {"write-count": 1}),
    "user-fault-unshadow": (
        "mutants/self-map-user-write.jsonl",
        {"fault-loop": 1, "refcount-leak": 1, "rmap-mismatch": 3},
    ),
    "walk-read-unchecked": ("mutants/walk-table-outside-slots.jsonl", {"fault-loop": 1}),
}


def test_every_bug_has_its_killing_trace():
    assert set(KILLS) == set(BUGS)


@pytest.mark.parametrize("bug", sorted(KILLS))
def test_mutant_produces_its_exact_finding_on_its_trace(bug: str):
    rel, delta = KILLS[bug]
    path = str(TRACES / rel)
    clean = run_trace(path, path, ReplayOptions())
    assert clean.by_code == {} or rel.startswith("findings/") and clean.error is None
    mutant = run_trace(path, path, ReplayOptions(bugs=frozenset({bug})))
    got = {c: mutant.by_code.get(c, 0) - clean.by_code.get(c, 0) for c in set(mutant.by_code) | set(clean.by_code)}
    got = {c: d for c, d in got.items() if d}
    if mutant.error and not clean.error:
        got["error"] = 1
        assert "simulated kernel BUG" in mutant.error
    assert got == delta


def test_the_corpus_kills_every_bug():
    """Issue #7's gate: `kvmpfn mutants traces/ --require-all` exits 0, every mutant killed by its trace."""
    proc = kvmpfn("mutants", "traces/", "--require-all", "--jobs", "2", "--format", "json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["summary"] == {"mutants": len(BUGS), "killed": len(BUGS), "score": f"{len(BUGS)}/{len(BUGS)}"}
    for result in doc["mutants"]:
        rel, delta = KILLS[result["bug"]]
        assert {"trace": f"traces/{rel}", "codes": delta} in result["killed_by"], result["bug"]


HUNTED = TRACES / "hunted"


def hunted() -> list[Path]:
    return sorted(HUNTED.glob("*.jsonl"))


def test_hunted_traces_are_named_after_bugs_and_cover_18():
    """Issue #20: `kvmpfn hunt` + `reduce` found a killing trace for at least 18 of the 24 original bugs."""
    names = {p.stem for p in hunted()}
    assert names <= set(BUGS)
    assert len(names) >= 18


@pytest.mark.parametrize("path", hunted(), ids=lambda p: p.stem)
def test_hunted_trace_is_clean_and_kills_its_bug(path: Path):
    """Clean without --bug (so the baseline needs no entry), a finding under its bug, at most 30 events."""
    clean = run_trace(str(path), str(path), ReplayOptions())
    assert clean.error is None and clean.by_code == {}
    mutant = run_trace(str(path), str(path), ReplayOptions(bugs=frozenset({path.stem})))
    assert mutant.error is None and mutant.by_code
    assert clean.records <= 30
    assert re.match(rf"# reduced by `kvmpfn hunt --bug {path.stem} --seed \d+`", path.read_text())


def test_page_and_pfn_behave_identically():
    """The seed changed no behaviour: every outcome record and finding agrees."""
    assert compare(written(), ReplayOptions(kernel="page"), ReplayOptions(kernel="pfn"), TWO) == []


def test_pfn_io_maps_pageless_memory_that_pfn_cannot():
    diffs = compare(written(), ReplayOptions(kernel="pfn"), ReplayOptions(kernel="pfn-io"), TWO)
    by_trace = {d["trace"]: d for d in diffs}
    assert set(by_trace) == {
        "traces/findings/pageless-refcount.jsonl",
        "traces/findings/spte-pfn-truncated.jsonl",
        "traces/kernel/ept-spte-format.jsonl",  # v2.6.27 drops the fake EPT dirty bit 63
        "traces/variants/mmio-pfn-io.jsonl",
        "traces/variants/mmio-pfn.jsonl",
    }
    first = by_trace["traces/variants/mmio-pfn.jsonl"]["first_divergence"]
    assert (first["a"]["result"], first["b"]["result"]) == ("mmio", "mapped")
    first = by_trace["traces/kernel/ept-spte-format.jsonl"]["first_divergence"]
    assert int(first["a"]["spte"], 16) ^ int(first["b"]["spte"], 16) == 1 << 63


def test_notifier_zaps_on_host_remap_and_slot_deletion():
    diffs = compare(written(), ReplayOptions(kernel="pfn-io"), ReplayOptions(kernel="notifier"), TWO)
    by_trace = {d["trace"]: d for d in diffs}
    for rel in ("variants/host-remap-pfn.jsonl", "variants/memslot-delete-pfn-io.jsonl"):
        d = by_trace[f"traces/{rel}"]
        assert d["findings_a"] and not d["findings_b"]  # the stale sptes are gone under notifier
    assert set(by_trace) == {
        f"traces/{rel}"
        for rel in (
            "findings/mmu-page-accounting.jsonl",  # notifier's slot deletion zaps all before the budget shrinks
            "findings/notifier-stale-spte-clean.jsonl",
            "findings/notifier-stale-spte.jsonl",
            "findings/spte-hpa-mismatch.jsonl",
            "findings/spte-without-memslot-clean.jsonl",
            "findings/spte-without-memslot.jsonl",
            "mutants/hva-unaligned-slot.jsonl",
            "mutants/memslot-delete-notifier.jsonl",
            "variants/host-remap-notifier.jsonl",
            "variants/host-remap-pfn.jsonl",
            "variants/memslot-delete-notifier.jsonl",
            "variants/memslot-delete-pfn-io.jsonl",
        )
    }


def test_compare_cli_exit_status():
    same = kvmpfn("compare", "traces/variants", "--a", "--kernel page", "--b", "--kernel pfn")
    assert same.returncode == 0 and "0 of" in same.stdout
    differ = kvmpfn("compare", "traces/variants", "--a", "--kernel pfn", "--b", "--kernel pfn-io")
    assert differ.returncode == 1 and "first divergence at line" in differ.stdout


def test_readme_trace_example_replays_clean(tmp_path: Path):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```\n(\{\"kvmpfn\": 1.*?)```", readme, re.S).group(1)
    trace = tmp_path / "readme.jsonl"
    trace.write_text(block)
    proc = kvmpfn("replay", str(trace), "--emit", str(tmp_path / "out.jsonl"))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["result"] for r in records] == ["ok"] * 4 + ["mapped", "ok"]
    assert records[4]["gpa"] == "0x5000" and records[4]["set_dirty"] == "0x4000"


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```\n(.*?)```", readme, re.S))
    commands = sorted(set(re.findall(r"^(?:\$ )?kvmpfn (\w+)", blocks, re.M)))
    assert {"replay", "audit"} <= set(commands)
    for command in commands:
        assert kvmpfn(command, "--help").returncode == 0, command
