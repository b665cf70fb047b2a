"""The finding corpus: traces/findings/ holds, for every finding code, a small trace that produces exactly that
finding and a clean twin (``<code>-clean.jsonl``) that differs only in the defect.

One table (``CASES``) says how each trace is replayed (the ``--bug`` switches, or a test-only hook that
corrupts the MMU state where no trace can) and what it must produce, in which MMU and kernel variants.
The defects come from three places:

- kernel behaviour, active with no option (v2.6.26 memslot deletion, host remap without notifiers, the
  budget shrink of ``kvm_mmu_change_mmu_pages``): these traces have findings when replayed plainly and are
  listed in ``traces/kvmpfn-baseline.json`` (``NO_OPTION_FINDINGS`` below);
- a ``--bug`` switch: the trace is clean without it (the corpus gate replays it with no options);
- a hook (``notrap_leaf``, ``notrap_pde`` below) for the notrap invariant, which no event or switch breaks:
  the trace is the setup, clean on its own; the hook corrupts the state after its last event and the full
  audit runs (``replay_with_hook``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmpfn.audit import CODES
from kvmpfn.cli import main as cli_main
from kvmpfn.kvm.mmu import mmu_page_remove_parent_pte, page_header, pt64_index, root_table
from kvmpfn.kvm.rmap import rmap_remove
from kvmpfn.kvm.spte import NOTRAP, is_last_spte, is_shadow_present_pte
from kvmpfn.replay import Replayer, ReplayOptions, replay_file
from kvmpfn.trace import open_trace

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "traces"
FINDINGS = CORPUS / "findings"
KERNELS = ("page", "pfn", "pfn-io", "notifier")
V2626 = ("page", "pfn", "pfn-io")  # no MMU notifiers
MMUS = ("shadow", "tdp")


# --- test-only hooks: corrupt the MMU state where no event and no --bug switch can ------------------------


def shadow_entry(kvm, vcpu, addr: int, level: int) -> tuple:
    """``(sp, index)`` of the shadow entry for ``addr`` at ``level``, following present table pointers."""
    sp, lvl = root_table(vcpu, kvm, addr)
    assert sp is not None, f"no root for {addr:#x}"
    while True:
        index = pt64_index(addr, lvl)
        if lvl == level:
            return sp, index
        ent = sp.spt[index]
        assert is_shadow_present_pte(ent) and not is_last_spte(ent, lvl), f"{addr:#x}: no table at level {lvl}"
        sp = page_header(kvm, ent)
        lvl -= 1


def notrap_leaf(rp: Replayer) -> None:
    """HOOK (notrap-valid-gva): the leaf spte of gva 0x10000 becomes notrap, its reference dropped the way KVM
    drops it (``rmap_remove``), as if ``update_pte`` had seen a non-present gpte."""
    kvm = rp.kvm
    sp, index = shadow_entry(kvm, kvm.vcpus[0], 0x10000, 1)
    if is_shadow_present_pte(sp.spt[index]):
        rmap_remove(kvm, (sp, index))
    sp.spt[index] = NOTRAP


def notrap_pde(rp: Replayer) -> None:
    """HOOK (notrap-nonleaf): the level-2 shadow entry over gva 0x0-0x1fffff becomes notrap, its child page
    unlinked the way KVM unlinks it (``mmu_pte_write_zap_pte``), as if ``prefetch_page`` had seen a
    non-present guest pde."""
    kvm = rp.kvm
    sp, index = shadow_entry(kvm, kvm.vcpus[0], 0x10000, 2)
    ent = sp.spt[index]
    if is_shadow_present_pte(ent):
        mmu_page_remove_parent_pte(page_header(kvm, ent), (sp, index))
    sp.spt[index] = NOTRAP


def replay_with_hook(path: Path, options: ReplayOptions, hook: Callable[[Replayer], None]) -> list[dict]:
    """Replay every event of ``path`` through a ``Replayer``, apply ``hook``, run the full audit (point
    ``audit``), then tear the VM down as the replay engine would. Returns the findings."""
    with open_trace(str(path)) as reader:
        rp = Replayer(reader.header, options)
        seq = -1
        for line, e in reader:
            seq += 1
            rp.apply(seq, line, e)
        teardown = reader.header.teardown
    hook(rp)
    f = rp.findings
    f.seq, f.line = seq + 1, 0
    rp.auditor.full_audit("audit")
    if teardown:
        f.point = "teardown"
        rp.do_teardown()
    return f.items


# --- the table ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """How ``traces/findings/<code>.jsonl`` is replayed and what it produces.

    ``expected`` holds in ``mmus`` x ``kernels`` (the trace's header names one of them); in the other
    variants the trace produces ``elsewhere`` (by default nothing). The clean twin is clean in ``twin_mmus`` x
    ``twin_kernels``, with and without the switches (and with the hook, where there is one).
    """

    code: str
    expected: dict[str, int]
    bugs: tuple[str, ...] = ()
    hook: Callable[[Replayer], None] | None = None
    mmus: tuple[str, ...] = MMUS
    kernels: tuple[str, ...] = KERNELS
    twin_mmus: tuple[str, ...] = MMUS
    twin_kernels: tuple[str, ...] = KERNELS
    elsewhere: dict[str, int] = field(default_factory=dict)
    notes: str = field(default="", compare=False)

    @property
    def trace(self) -> Path:
        return FINDINGS / f"{self.code}.jsonl"

    @property
    def twin(self) -> Path:
        return FINDINGS / f"{self.code}-clean.jsonl"

    def options(self, **kw) -> ReplayOptions:
        return ReplayOptions(bugs=frozenset(self.bugs), **kw)


CASES = [
    Case("refcount-leak", {"refcount-leak": 1}, bugs=("same-pfn-no-release",)),
    Case("refcount-underflow", {"refcount-underflow": 1}, bugs=("double-release",)),
    Case(
        "pageless-refcount",
        {"pageless-refcount": 1},
        bugs=("pageless-as-normal",),
        kernels=("pfn-io", "notifier"),
        notes="before pfn-io, device memory is MMIO: nothing is mapped",
    ),
    Case("spte-hpa-mismatch", {"spte-hpa-mismatch": 1}, kernels=V2626, notes="kernel behaviour: no notifiers"),
    Case(
        "spte-pfn-truncated",
        {"spte-pfn-truncated": 1},
        bugs=("pfn-shift-32",),
        kernels=("pfn-io", "notifier"),
        notes="device frames are mapped by pfn from pfn-io on",
    ),
    Case("notrap-valid-gva", {"notrap-valid-gva": 1}, hook=notrap_leaf, mmus=("shadow",)),
    Case("notrap-nonleaf", {"notrap-nonleaf": 1}, hook=notrap_pde, mmus=("shadow",)),
    Case(
        "rmap-mismatch",
        {"rmap-mismatch": 1, "refcount-leak": 1},
        bugs=("large-spte-remove-order",),
        mmus=("shadow",),
        notes="the skipped rmap_remove also strands the large spte's reference",
    ),
    Case("parent-link", {"parent-link": 1}, bugs=("fetch-bailout-parent",), mmus=("shadow",)),
    Case("writable-shadowed-gfn", {"writable-shadowed-gfn": 1}, bugs=("no-write-protect",), mmus=("shadow",)),
    Case(
        "spte-without-memslot",
        {"spte-without-memslot": 1},
        kernels=V2626,
        twin_kernels=("notifier",),
        notes="kernel behaviour: v2.6.26; the twin is the same trace under v2.6.27",
    ),
    Case(
        "write-count",
        {"write-count": 1},
        bugs=("unaccount-invalid-root",),
        mmus=("shadow",),
        kernels=V2626,
        notes="under notifier the mutant's second unaccount is the kernel's only one",
    ),
    Case("spte-permission", {"spte-permission": 1}, bugs=("cr0wp-user-write",), mmus=("shadow",)),
    Case(
        "mmu-page-accounting",
        {"mmu-page-accounting": 1},
        mmus=("shadow",),
        kernels=V2626,
        notes="kernel behaviour: kvm_mmu_change_mmu_pages; v2.6.27 zaps all before the shrink",
    ),
    Case("dirty-lost", {"dirty-lost": 1}, bugs=("release-clean-writable",)),
    Case(
        "notifier-stale-spte",
        {"notifier-stale-spte": 1},
        bugs=("handle-hva-unaligned",),
        kernels=("notifier",),
        twin_kernels=("notifier",),
        elsewhere={"spte-hpa-mismatch": 1},
        notes="without notifiers the host remap leaves the spte stale: kernel behaviour (spte-hpa-mismatch)",
    ),
    Case("kernel-bug", {"kernel-bug": 1}, bugs=("direct-map-into-large",)),
]
BY_CODE = {case.code: case for case in CASES}

#: Traces of traces/findings/ that have findings when replayed with no options (the corpus gate, `kvmpfn
#: audit traces/`): what traces/kvmpfn-baseline.json must list for them. Every other trace here is clean.
NO_OPTION_FINDINGS = {
    "findings/spte-hpa-mismatch.jsonl": {"spte-hpa-mismatch": 1},
    "findings/spte-without-memslot.jsonl": {"spte-without-memslot": 1},
    "findings/mmu-page-accounting.jsonl": {"mmu-page-accounting": 1},
}


def run(path: Path, options: ReplayOptions, hook=None) -> list[dict]:
    if hook is not None:
        return replay_with_hook(path, options, hook)
    result = replay_file(str(path), options)
    assert result.error is None, result.error
    return result.findings


def codes(findings: list[dict]) -> dict[str, int]:
    return dict(Counter(f["code"] for f in findings))


def header_of(path: Path) -> dict:
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return json.loads(line)
    raise AssertionError(f"{path}: no header")


# --- the corpus is complete -----------------------------------------------------------------------------


#: The audit's codes: docs/trace-format.md, Findings in its order, then the auditor's own extension (the per-call
#: I10 check after kvm_unmap_hva) and the simulated kernel's BUG(). Codes of other checkers (the simulated
#: CPU's, the recorded-trace checks') are not the auditor's and have no trace here.
AUDIT_CODES = (
    "refcount-leak",
    "refcount-underflow",
    "pageless-refcount",
    "spte-hpa-mismatch",
    "spte-pfn-truncated",
    "notrap-valid-gva",
    "notrap-nonleaf",
    "rmap-mismatch",
    "parent-link",
    "writable-shadowed-gfn",
    "spte-without-memslot",
    "write-count",
    "spte-permission",
    "mmu-page-accounting",
    "dirty-lost",
    "notifier-stale-spte",
    "kernel-bug",
)


def test_table_covers_every_code_once():
    assert set(AUDIT_CODES) <= set(CODES)
    assert [case.code for case in CASES] == list(AUDIT_CODES)


def test_every_trace_and_twin_exists_and_nothing_else():
    want = {case.trace.name for case in CASES} | {case.twin.name for case in CASES}
    assert {p.name for p in FINDINGS.iterdir()} == want


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.code)
def test_traces_are_documented(case):
    """Each file opens with `#` comments that name its code and explain the defect (or its absence)."""
    for path, first in ((case.trace, f"# {case.code}:"), (case.twin, f"# {case.code}, clean twin:")):
        lines = path.read_text().splitlines()
        assert lines[0].startswith(first), path
        comments = [ln for ln in lines if ln.startswith("#")]
        assert len(comments) >= 3, path
    text = case.trace.read_text()
    for name in case.bugs:
        assert f"--bug {name}" in text
    if case.hook is not None:
        assert case.hook.__name__ in text and "tests/test_findings_traces.py" in text


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.code)
def test_twin_has_the_same_shape(case):
    """The twin replays in the same MMU (its header names the same one) and the same guest mode."""
    a, b = header_of(case.trace), header_of(case.twin)
    assert a.get("mmu") == b.get("mmu")
    assert a.get("guest", {}).get("paging") == b.get("guest", {}).get("paging")
    assert a.get("memslots") == b.get("memslots")


# --- each trace produces exactly its finding --------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.code)
def test_trace_produces_exactly_its_finding(case):
    findings = run(case.trace, case.options(), case.hook)
    assert codes(findings) == case.expected
    assert case.code in codes(findings)
    for f in findings:
        assert {"code", "seq", "line", "point", "message", "provenance"} <= set(f)
        assert isinstance(f["seq"], int) and isinstance(f["line"], int)
        assert isinstance(f["provenance"], list)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.code)
def test_trace_counts_are_stable_under_audit_every_1(case):
    """Auditing after every event finds the same defects, each once (dedupe by code and subject)."""
    findings = run(case.trace, case.options(audit_every=1), case.hook)
    assert codes(findings) == case.expected


@pytest.mark.parametrize("mmu", MMUS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.code)
def test_trace_in_every_variant(case, kernel, mmu):
    """The finding appears exactly in the variants the table names; elsewhere the trace is clean."""
    applies = mmu in case.mmus and kernel in case.kernels
    hook = case.hook if (case.hook is not None and mmu == "shadow") else None
    findings = run(case.trace, case.options(mmu=mmu, kernel=kernel, audit_every=1), hook)
    assert codes(findings) == (case.expected if applies else case.elsewhere)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.code)
def test_trace_with_no_options(case):
    """What the corpus gate sees: switch and hook traces are clean; kernel-behaviour ones are baselined."""
    findings = run(case.trace, ReplayOptions())
    assert codes(findings) == NO_OPTION_FINDINGS.get(f"findings/{case.trace.name}", {})
    if case.bugs or case.hook:
        assert findings == []
    else:
        assert codes(findings) == case.expected


def test_baseline_lists_the_kernel_behaviour_traces():
    """traces/kvmpfn-baseline.json agrees with NO_OPTION_FINDINGS for traces/findings/."""
    path = CORPUS / "kvmpfn-baseline.json"
    entries = json.loads(path.read_text())["traces"]
    ours = {k: v for k, v in entries.items() if k.startswith("findings/")}
    assert ours == NO_OPTION_FINDINGS


# --- the clean twins --------------------------------------------------------------------------------------


def twin_variants():
    for case in CASES:
        for mmu in case.twin_mmus:
            for kernel in case.twin_kernels:
                yield pytest.param(case, mmu, kernel, id=f"{case.code}-{mmu}-{kernel}")


@pytest.mark.parametrize(("case", "mmu", "kernel"), list(twin_variants()))
def test_clean_twin_has_no_findings(case, mmu, kernel):
    """At every audit point (audit_every=1 and the kernel's own points), with and without the switches."""
    for bugs in {case.bugs, ()}:
        options = ReplayOptions(mmu=mmu, kernel=kernel, audit_every=1, kernel_audit=True, bugs=frozenset(bugs))
        hook = case.hook if (case.hook is not None and mmu == "shadow") else None
        assert run(case.twin, options, hook) == [], (case.twin.name, bugs)


# --- the same through the command line ----------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c.hook is None], ids=lambda c: c.code)
def test_cli_json_report(case):
    """`kvmpfn replay T --format json --bug NAME`: exit 1, the findings and by_code as the table says, and no
    object but a finding has a `code` member."""
    args = ["replay", str(case.trace), "--format", "json"]
    for name in case.bugs:
        args += ["--bug", name]
    res = CliRunner().invoke(cli_main, args)
    assert res.exit_code == 1, res.output
    doc = json.loads(res.output)
    assert doc["summary"]["by_code"] == case.expected
    assert codes(doc["findings"]) == case.expected

    def objects_with_code(node):
        if isinstance(node, dict):
            yield from (["code"] if "code" in node else [])
            for value in node.values():
                yield from objects_with_code(value)
        elif isinstance(node, list):
            for value in node:
                yield from objects_with_code(value)

    assert len(list(objects_with_code(doc))) == len(doc["findings"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.code)
def test_cli_clean_twin_exit_0(case):
    args = ["replay", str(case.twin), "--format", "json", "--audit-every", "1"]
    for name in case.bugs:
        args += ["--bug", name]
    res = CliRunner().invoke(cli_main, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["findings"] == []
