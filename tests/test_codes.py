"""One vocabulary: the finding codes the auditor reports, the recorded-trace checks, the reports and the trace
types all come from kvmpfn.vocab; ``kvmpfn codes`` and ``kvmpfn bugs`` render it (Python API); each bug's
``mmu``/``kernels`` applicability is true of the MMU code."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import get_args

import pytest

from kvmpfn import vocab
from kvmpfn.audit import CODES as AUDIT_CODES
from kvmpfn.audit.recorded import CODES as RECORDED_CODES
from kvmpfn.errors import InputError
from kvmpfn.kvm.bugs import BUGS
from kvmpfn.mutants import run_trace
from kvmpfn.replay import ReplayOptions
from kvmpfn.report.codes import CODES as REPORT_CODES
from kvmpfn.report.codes import bugs_json, bugs_text, codes_json, codes_text, example_trace
from kvmpfn.trace import events
from kvmpfn.trace.reader import open_trace

ROOT = Path(__file__).resolve().parents[1]


def test_every_finding_code_has_a_rule_and_nothing_else_does():
    assert list(AUDIT_CODES) == list(REPORT_CODES) == list(vocab.CODES)


def test_recorded_codes_are_finding_codes():
    assert set(RECORDED_CODES) <= set(AUDIT_CODES)
    assert RECORDED_CODES == ("fault-loop", "recorded-spte-mismatch", "recorded-spte-pfn-change")


def test_every_invariant_a_code_names_is_defined():
    assert list(vocab.INVARIANTS) == [f"I{n}" for n in range(1, 15)]
    for code in vocab.CODES.values():
        assert code.invariant == "" or code.invariant in vocab.INVARIANTS


def test_trace_types_are_the_vocabulary():
    assert get_args(events.MmuKind) == vocab.MMUS == ("shadow", "tdp")
    assert get_args(events.KernelName) == vocab.KERNELS == tuple(vocab.KERNEL_VARIANTS)
    assert get_args(events.PagingMode) == vocab.PAGING_MODES == ("none", "32", "pae", "64")
    assert get_args(events.Backing) == vocab.BACKINGS
    assert get_args(events.FaultKind) == vocab.FAULT_KINDS


# -- kvmpfn codes ------------------------------------------------------------------------------------------


def test_codes_lists_every_code_with_its_invariant():
    text = codes_text()
    lines = text.splitlines()
    for name, code in vocab.CODES.items():
        line = next(x for x in lines if x.startswith(name + " "))
        assert (code.invariant or "-") in line and code.short in line


def test_codes_explains_one():
    text = codes_text("refcount-leak")
    assert text.startswith("refcount-leak: A reference KVM took on a frame is never released.")
    assert "Invariant: I1, every KVM reference is owned" in text
    assert "docs/kernel.md, Invariants: I1" in text
    assert "  kvmpfn replay traces/findings/refcount-leak.jsonl --bug same-pfn-no-release\n" in text
    assert "--update-baseline" in text
    assert "Invariant: none" in codes_text("recorded-spte-mismatch")
    assert "  kvmpfn replay traces/findings/spte-without-memslot.jsonl\n" in codes_text("spte-without-memslot")


def test_codes_json():
    doc = json.loads(codes_json())
    assert [c["code"] for c in doc["codes"]] == list(vocab.CODES)
    one = json.loads(codes_json("write-count"))
    assert one["invariant"] == "I8" and one["subject"] == "slot, 2 MiB region"
    assert one["example"] == "traces/findings/write-count.jsonl"
    assert json.loads(codes_json("fault-loop"))["invariant"] is None


def test_unknown_code_is_an_input_error_with_a_suggestion():
    with pytest.raises(InputError, match='unknown code "refcount-leek"; did you mean "refcount-leak"'):
        codes_text("refcount-leek")
    with pytest.raises(InputError, match="kvmpfn codes"):
        codes_json("zzz")


@pytest.mark.parametrize("name", list(vocab.CODES))
def test_example_trace_is_a_trace(name):
    path = example_trace(name)
    with open_trace(str(path)) as reader:
        assert reader.header.kvmpfn == 1


# -- kvmpfn bugs -------------------------------------------------------------------------------------------


def test_bugs_text_says_where_each_applies():
    lines = bugs_text().splitlines()
    assert len(lines) == len(BUGS) + 1
    tdp = next(x for x in lines if x.startswith("tdp-gpa-32bit "))
    assert " tdp " in tdp and "all kernels" in tdp and "736c291c" in tdp
    unaligned = next(x for x in lines if x.startswith("handle-hva-unaligned "))
    assert "both MMUs" in unaligned and " notifier " in unaligned
    assert lines[-1] == "Details: docs/kernel.md, Historical bugs."


def test_bugs_json():
    doc = json.loads(bugs_json())
    assert [b["name"] for b in doc["bugs"]] == list(BUGS)
    pageless = next(b for b in doc["bugs"] if b["name"] == "pageless-as-normal")
    assert pageless["mmu"] == ["shadow", "tdp"] and pageless["kernels"] == ["pfn-io", "notifier"]
    for bug in doc["bugs"]:
        assert set(bug["mmu"]) <= set(vocab.MMUS) and bug["mmu"]
        assert set(bug["kernels"]) <= set(vocab.KERNELS) and bug["kernels"]


# -- applicability is true of the code ---------------------------------------------------------------------

#: A trace that each bug changes where it applies (the corpus's killing traces, tests/test_corpus.py).
KILLERS = {
    "role-ignores-pse-nx": "mutants/pse-toggle-stale-split.jsonl",
    "fetch-large-rmap-remove": "mutants/pse-toggle-large-in-the-way.jsonl",
    "walk-read-unchecked": "mutants/walk-table-outside-slots.jsonl",
    "audit-no-release": "mutants/cr0wp-user-page.jsonl",
    "cr0wp-shared-sp": "mutants/cr0wp-toggle.jsonl",
    "cr0wp-user-write": "mutants/cr0wp-user-page.jsonl",
    "direct-map-into-large": "mutants/dirty-log-splits-large.jsonl",
    "dirty-log-pointer-wp": "mutants/dirty-log-split-region.jsonl",
    "double-release": "mutants/cr0wp-toggle.jsonl",
    "error-pfn-no-release": "mutants/mmio-outside-slots.jsonl",
    "fetch-bailout-parent": "findings/parent-link.jsonl",
    "handle-hva-unaligned": "mutants/hva-unaligned-slot.jsonl",
    "large-spte-remove-order": "findings/rmap-mismatch.jsonl",
    "memslot-delete-no-flush": "mutants/memslot-delete-notifier.jsonl",
    "no-rsvd-check": "mutants/nx-reserved.jsonl",
    "no-write-protect": "mutants/self-map-user-write.jsonl",
    "pageless-as-normal": "findings/pageless-refcount.jsonl",
    "pfn-shift-32": "mutants/cr0wp-toggle.jsonl",
    "prefetch-no-release": "mutants/cr0wp-toggle.jsonl",
    "pse32-double-update": "mutants/pse32-pde-rewrite.jsonl",
    "release-clean-writable": "mutants/cr0wp-toggle.jsonl",
    "rmap-wp-hugepage-iter": "mutants/wp-two-large-sptes.jsonl",
    "same-pfn-no-release": "mutants/dirty-log-split-region.jsonl",
    "sp-access-inherit": "mutants/pd-mixed-access.jsonl",
    "tdp-gpa-32bit": "mutants/tdp-gpa-above-4g.jsonl",
    "unaccount-invalid-root": "findings/mmu-page-accounting.jsonl",
    "user-fault-unshadow": "mutants/self-map-user-write.jsonl",
}


def test_every_bug_has_a_killer():
    assert set(KILLERS) == set(BUGS)


@pytest.mark.parametrize("name", sorted(BUGS))
def test_a_bug_changes_nothing_where_it_does_not_apply(name):
    bug, trace = BUGS[name], str(ROOT / "traces" / KILLERS[name])
    with open_trace(trace) as reader:
        own = (reader.header.mmu, reader.header.kernel)
    assert own[0] in bug.mmu and own[1] in bug.kernels, f"{name}: its killing trace runs where it does not apply"
    changed = run_trace(trace, trace, ReplayOptions(bugs=frozenset({name})))
    assert changed != run_trace(trace, trace, ReplayOptions()), f"{name}: the killing trace no longer kills"
    for mmu in vocab.MMUS:
        for kernel in vocab.KERNELS:
            if mmu in bug.mmu and kernel in bug.kernels:
                continue
            plain = run_trace(trace, trace, ReplayOptions(mmu=mmu, kernel=kernel))
            mutant = run_trace(trace, trace, ReplayOptions(mmu=mmu, kernel=kernel, bugs=frozenset({name})))
            assert mutant == plain, f"--bug {name} changes the replay under {mmu}/{kernel}"


def test_every_code_the_sources_report_is_in_the_vocabulary():
    """A new finding code cannot be reported without its entry in kvmpfn.vocab (and so in the docs)."""
    reported = set()
    for path in (ROOT / "kvmpfn").rglob("*.py"):
        reported |= set(re.findall(r'\.report\(\s*"([a-z0-9-]+)"', path.read_text()))
    assert len(reported) >= 12
    assert reported <= set(vocab.CODES), reported - set(vocab.CODES)
