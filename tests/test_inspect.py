"""``kvmpfn explain``, ``show``, ``stat`` and the timeline (issue #15): explain pinned on every trace of
traces/findings/ (the reference at fault named with its line and kernel function), show's exact shadow tree
in each paging mode, stat's counts against the replay's own, the timeline's validity and determinism."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmpfn.cli import main as cli_main
from kvmpfn.inspect.history import explain, explain_findings
from kvmpfn.inspect.series import Sampler, Tracker
from kvmpfn.inspect.state import StopAt
from kvmpfn.replay import ReplayOptions, replay_file
from kvmpfn.report.timeline import TimelineWriter

sys.path.insert(0, str(Path(__file__).parent))
from cli_helper import interrupt
from test_findings_traces import CASES, FINDINGS

ROOT = Path(__file__).resolve().parent.parent
SHADOW = ROOT / "traces" / "shadow"

# --- explain ---------------------------------------------------------------------------------------------

#: code -> (trace line, pfn API function, MMU caller, words) of the reference at fault of finding [1]
AT_FAULT = {
    "refcount-leak": (15, "gfn_to_pfn", "tdp_page_fault", "taken here, never given back"),
    "refcount-underflow": (12, "kvm_release_pfn_dirty", "rmap_remove", "released here, but KVM held no reference"),
    "pageless-refcount": (14, "gfn_to_pfn", "tdp_page_fault", "taken here"),
    "spte-hpa-mismatch": (12, "gfn_to_pfn", "tdp_page_fault", "taken here"),
    "rmap-mismatch": (22, "gfn_to_pfn", "page_fault", "taken here, never given back"),
    "spte-without-memslot": (12, "gfn_to_pfn", "tdp_page_fault", "taken here"),
    "spte-permission": (19, "gfn_to_pfn", "page_fault", "taken here"),
    "dirty-lost": (11, "kvm_release_pfn_clean", "rmap_remove", "released clean here"),
    "notifier-stale-spte": (14, "gfn_to_pfn", "tdp_page_fault", "taken here"),
}
#: code -> trace line where explain marks an invariant first broken (None: no frame invariant breaks)
FIRST_BROKEN = {
    "refcount-leak": 15,  # the second gfn_to_pfn of the same frame: a reference no spte owns
    "refcount-underflow": 12,
    "spte-hpa-mismatch": 13,  # the host remap
    "spte-pfn-truncated": 16,  # the spte maps frame 0, which gfn 0xfe000 is not backed by
    "rmap-mismatch": 26,
}


def _case_ids(case):
    return case.code


@pytest.mark.parametrize("case", CASES, ids=_case_ids)
def test_explain_every_finding_trace(case):
    """Every finding of every trace in traces/findings/: explain follows its subject, inserts it where it was
    detected, and marks each reference of its provenance as at fault, by line, function and caller."""
    options = case.options()
    findings = replay_file(str(case.trace), options).findings
    if case.hook is not None:  # the finding needs a test-only hook: explain the gva the hook corrupts
        assert findings == []
        doc = explain(str(case.trace), options, gva=0x10000)
        assert doc["frames"] and any(s["kind"] == "rmap_add" for s in doc["steps"])
        assert doc["first_broken"] is None
        return
    assert findings
    for number, finding in enumerate(findings, 1):
        doc = explain(str(case.trace), options, finding=number)
        assert doc["finding"]["code"] == finding["code"] and doc["finding"]["number"] == number
        detected = [s for s in doc["steps"] if s["kind"] == "finding"]
        assert [(s["seq"], s["line"]) for s in detected] == [(finding["seq"], finding["line"])]
        steps_before = doc["steps"][: doc["steps"].index(detected[0])]
        assert all(s["seq"] <= finding["seq"] for s in steps_before)
        for entry in finding["provenance"]:
            if "function" not in entry:
                continue
            marked = [doc["steps"][i] for i in doc["at_fault"]]
            assert any(
                (s["line"], s["function"], s["caller"]) == (entry["line"], entry["function"], entry["caller"])
                for s in marked
            ), (entry, marked)
    doc = explain(str(case.trace), options, finding=1)
    if case.code in AT_FAULT:
        line, function, caller, words = AT_FAULT[case.code]
        marked = [doc["steps"][i] for i in doc["at_fault"]]
        assert [(s["line"], s["function"], s["caller"]) for s in marked] == [(line, function, caller)]
        assert marked[0]["at_fault"].startswith(words)
    else:
        assert doc["at_fault"] == []
    broken = doc["first_broken"]
    assert (broken and broken["line"]) == FIRST_BROKEN.get(case.code)


@pytest.mark.parametrize("case", [c for c in CASES if c.hook is None], ids=_case_ids)
def test_explain_findings_in_one_pass_agrees(case):
    """The HTML report's one-pass histories of all findings mark the same steps as explain --finding N."""
    options = case.options()
    result = replay_file(str(case.trace), options)
    for number, doc in enumerate(explain_findings(str(case.trace), options, result), 1):
        alone = explain(str(case.trace), options, finding=number)
        if doc is None:
            assert "pfn" not in alone["subject"] and "gfn" not in alone["subject"]
            continue
        assert doc["steps"] == alone["steps"] and doc["first_broken"] == alone["first_broken"]


def test_explain_leak_names_the_reference_never_given_back():
    """The leak's text names the second gfn_to_pfn at line 15 as taken and never given back, and the JSON is
    the same on every run."""
    trace = str(FINDINGS / "refcount-leak.jsonl")
    args = ["explain", trace, "--finding", "1", "--bug", "same-pfn-no-release"]
    res = CliRunner().invoke(cli_main, args)
    assert res.exit_code == 1, res.output
    line = next(ln for ln in res.output.splitlines() if "never given back" in ln and "seq 2" in ln)
    assert "line 15" in line and "gfn_to_pfn (+1) in tdp_page_fault" in line and "refcount 2" in line
    assert "FIRST BROKEN" in res.output and "FINDING refcount-leak detected here" in res.output
    one = CliRunner().invoke(cli_main, [*args, "--format", "json"]).output
    two = CliRunner().invoke(cli_main, [*args, "--format", "json"]).output
    assert one == two and json.loads(one)["subject"] == {"pfn": "0x100000"}


def test_explain_clean_twin_breaks_nothing():
    res = CliRunner().invoke(cli_main, ["explain", str(FINDINGS / "refcount-leak-clean.jsonl"), "--pfn", "0x100000"])
    assert res.exit_code == 0, res.output
    assert "never given back" not in res.output and "BROKEN" not in res.output
    assert "gfn_to_pfn (+1)" in res.output and "kvm_release_pfn" in res.output


def test_explain_gfn_follows_a_host_remap():
    """--gfn: the frames behind the gfn, the old one and the one a host remap put there."""
    doc = explain(str(FINDINGS / "spte-hpa-mismatch.jsonl"), ReplayOptions(), gfn=0x5)
    assert doc["frames"] == ["0x100000", "0x100001"]
    assert any(s["kind"] == "host_remap" and (s["pfn"], s["now"]) == ("0x100000", "0x100001") for s in doc["steps"])


@pytest.mark.parametrize(
    "args",
    [[], ["--pfn", "1", "--gfn", "2"], ["--finding", "5"], ["--pfn", "zz"]],
    ids=["none", "two", "no-such-finding", "bad-number"],
)
def test_explain_usage_errors(args):
    res = CliRunner().invoke(cli_main, ["explain", str(FINDINGS / "refcount-leak.jsonl"), *args])
    assert res.exit_code == 2
    assert "Traceback" not in res.output


# --- show ------------------------------------------------------------------------------------------------


def state_of(path: Path, seq: int | None = None, options: ReplayOptions | None = None, **kw) -> dict:
    stop = StopAt(seq, **kw)
    replay_file(str(path), options or ReplayOptions(), observer=stop)
    return stop.state


def tree(state: dict) -> list[str]:
    """The shadow hierarchy from each vcpu's roots, one line per page or leaf, from the JSON alone."""
    pages = {p["id"]: p for p in state["shadow_pages"]}
    out: list[str] = []

    def walk(pid: str, depth: int) -> None:
        p = pages[pid]
        r = p["role"]
        out.append(
            "  " * depth + f"{pid} L{r['level']} q{r['quadrant']} {'direct' if r['direct'] else 'gfn ' + p['gfn']}"
        )
        for e in p["sptes"]:
            if "child" in e:
                walk(e["child"], depth + 1)
            else:
                out.append("  " * (depth + 1) + f"[{e['index']}] {e['bits']} gfn {e['gfn']} frame {e['pfn']}")

    for v in state["vcpus"]:
        for root in dict.fromkeys(v["roots"]):
            walk(root, 0)
    return out


TREES = {
    # 32-bit guest: four PAE-shaped roots (quadrants 0-3 of the cr3 page); a 4 MiB guest page split into two
    # direct level-1 pages (quadrants 0 and 1); two 2 MiB large sptes over a hugetlb slot
    "32bit-pse.jsonl": [
        "sp0 L2 q0 gfn 0x1",
        "  sp4 L1 q0 gfn 0x2",
        "    [0] P W U A D gfn 0x10 frame 0x100002",
        "    [1] P U A D gfn 0x11 frame 0x100003",
        "  sp6 L1 q0 direct",
        "    [511] P W U A D gfn 0x5ff frame 0x100006",
        "  sp7 L1 q1 direct",
        "    [0] P W U A D gfn 0x600 frame 0x100007",
        "  [4] P U A D PS gfn 0x800 frame 0x100200",
        "  [5] P U A D PS gfn 0xa00 frame 0x100400",
        "sp1 L2 q1 gfn 0x1",
        "sp2 L2 q2 gfn 0x1",
        "sp3 L2 q3 gfn 0x1",
    ],
    # PAE: one root per present PDPTE (two PDPTEs share gfn 0x2); an NX leaf; a 2 MiB guest page as a direct page
    "pae-pdpte.jsonl": [
        "sp0 L2 q0 gfn 0x2",
        "  sp2 L1 q0 gfn 0x4",
        "    [0] P W U A D gfn 0x10 frame 0x100004",
        "    [1] P U A D NX gfn 0x11 frame 0x100005",
        "sp1 L2 q0 gfn 0x3",
        "  sp4 L1 q0 direct",
        "    [511] P W U A D gfn 0x3ff frame 0x100007",
    ],
    # 4-level: one chain cr3 gfn 0x1 -> 0x2 -> 0x3 -> 0x4, four leaves with the guest's rights
    "64bit-build-and-touch.jsonl": [
        "sp0 L4 q0 gfn 0x1",
        "  sp1 L3 q0 gfn 0x2",
        "    sp2 L2 q0 gfn 0x3",
        "      sp3 L1 q0 gfn 0x4",
        "        [0] P W U A D gfn 0x10 frame 0x100004",
        "        [1] P A D gfn 0x11 frame 0x100005",
        "        [2] P U A D NX gfn 0x12 frame 0x100006",
        "        [3] P W U A D gfn 0x13 frame 0x100007",
    ],
}


@pytest.mark.parametrize("name", sorted(TREES))
def test_show_exact_tree(name):
    state = state_of(SHADOW / name)
    assert tree(state) == TREES[name]
    check_consistent(state)


def test_show_real_mode_under_shadow():
    """Paging off under the shadow MMU: four direct roots (nonpaging), the identity-mapped leaf."""
    state = state_of(FINDINGS / "dirty-lost-clean.jsonl", options=ReplayOptions(mmu="shadow"))
    assert tree(state) == [
        "sp0 L2 q0 direct",
        "  sp4 L1 q0 direct",
        "    [5] P U A D gfn 0x5 frame 0x100000",
        "sp1 L2 q1 direct",
        "sp2 L2 q2 direct",
        "sp3 L2 q3 direct",
    ]
    check_consistent(state)


def check_consistent(state: dict) -> None:
    """Parent links, rmaps and frames agree with the sptes (each derived separately by mmu_state)."""
    pages = {p["id"]: p for p in state["shadow_pages"]}
    leaves = []
    for p in state["shadow_pages"]:
        for e in p["sptes"]:
            if "child" in e:
                assert f"{p['id']}[{e['index']}]" in pages[e["child"]]["parents"]
            else:
                leaves.append((f"{p['id']}[{e['index']}]", e["pfn"]))
        if p["write_protected"] is not None:
            assert p["write_protected"] is True
    rmapped = {s for head in state["rmap"] + state["rmap_pde"] for s in head["sptes"]}
    assert rmapped == {name for name, _ in leaves}
    refs = {f["pfn"]: f["kvm_refs"] for f in state["frames"]}
    for _, pfn in leaves:
        assert refs.get(pfn, 0) >= 1


def test_show_at_and_gva_walk():
    """--at: the state right after an event (fewer pages before the faults); --gva: each level's gpte next to
    its spte, the leaf mapping the frame the guest walk reaches."""
    trace = SHADOW / "64bit-build-and-touch.jsonl"
    early = state_of(trace, 0)
    assert early["seq"] == 0 and early["shadow_pages"] == []
    state = state_of(trace, gva=0x1000)
    walk = state["walk"]
    assert [lv["level"] for lv in walk["levels"]] == [4, 3, 2, 1]
    assert all("gpte" in lv and "spte" in lv for lv in walk["levels"])
    assert walk["gpa"] == "0x11000" and walk["levels"][-1]["spte"]["pfn"] == "0x100005"
    res = CliRunner().invoke(cli_main, ["show", str(trace), "--gva", "0x1000"])
    assert res.exit_code == 0 and "walk of gva 0x1000" in res.output


def test_show_summarises_unless_verbose():
    """The root of 32bit-pse has five present entries: four shown and "1 more" unless -v; JSON is complete."""
    trace = SHADOW / "32bit-pse.jsonl"
    short = CliRunner().invoke(cli_main, ["show", str(trace)]).output
    full = CliRunner().invoke(cli_main, ["show", str(trace), "-v"]).output
    assert "... 1 more present entry (-v shows all)" in short and "more present entr" not in full
    assert "[5] 0x1004000e5" in full and "[5] 0x1004000e5" not in short
    doc = json.loads(CliRunner().invoke(cli_main, ["show", str(trace), "--format", "json"]).output)
    assert tree(doc) == TREES["32bit-pse.jsonl"]


# --- stat ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trace", sorted(SHADOW.glob("*.jsonl"))[:6] + [FINDINGS / "spte-hpa-mismatch.jsonl"], ids=str)
def test_stat_counts_agree_with_the_replay(trace):
    """Events by kind sum to the replay's results; the gauges counted from the hooks equal the state walked
    at the end (Replayer.stats)."""
    tracker = Tracker()
    result = replay_file(str(trace), ReplayOptions(), observer=tracker)
    doc = tracker.doc(result)
    per_result: dict[str, int] = {}
    for results in doc["by_kind"].values():
        for res, n in results.items():
            per_result[res] = per_result.get(res, 0) + n
    assert per_result == dict(result.results) and sum(per_result.values()) == result.events
    stats = tracker.rp.stats()
    assert tracker.gauges() == (stats["frames_referenced"], stats["sptes"], stats["shadow_pages"])
    assert doc["peak"]["live sptes"] >= stats["sptes"]
    exits = sum(n for op in ("access", "pf") for res, n in doc["by_kind"].get(op, {}).items() if res != "hit")
    assert sum(doc["faults_per_vcpu"].values()) == exits


def test_stat_cli_json_is_deterministic():
    trace = str(SHADOW / "cr3-switch.jsonl")
    one = CliRunner().invoke(cli_main, ["stat", trace, "--format", "json"])
    two = CliRunner().invoke(cli_main, ["stat", trace, "--format", "json"])
    assert one.exit_code == 0 and one.output == two.output
    assert "seconds_by_op" not in one.output
    text = CliRunner().invoke(cli_main, ["stat", trace]).output
    assert "shadow pages: 11 created" in text and "pte writes:" in text


def test_sampler_keeps_peaks_and_stays_small():
    s = Sampler(limit=50)
    for i in range(100_000):
        s.add(i, (i % 1000, 7 if i == 54_321 else 0))
    points = s.finish(99_999)
    assert len(points) < 100
    assert max(p[1] for p in points) == 999 and max(p[2] for p in points) == 7
    assert [p[0] for p in points] == sorted(p[0] for p in points)


# --- timeline --------------------------------------------------------------------------------------------


def timeline_of(trace: Path, options: ReplayOptions) -> tuple[str, object]:
    buf = io.StringIO()
    result = replay_file(str(trace), options, observer=Tracker(TimelineWriter(buf, str(trace))))
    return buf.getvalue(), result


@pytest.mark.parametrize(
    ("trace", "bugs"),
    [(FINDINGS / "refcount-leak.jsonl", ("same-pfn-no-release",)), (SHADOW / "cr3-switch.jsonl", ())],
    ids=["leak", "cr3-switch"],
)
def test_timeline_is_valid_trace_event_json(trace, bugs):
    text, result = timeline_of(trace, ReplayOptions(bugs=frozenset(bugs)))
    assert text == timeline_of(trace, ReplayOptions(bugs=frozenset(bugs)))[0]  # deterministic
    doc = json.loads(text)
    events = doc["traceEvents"]
    for e in events:
        assert {"ph", "ts", "pid", "tid", "name"} <= set(e), e
        assert e["ph"] in ("X", "C", "i", "M") and isinstance(e["ts"], int)
        if e["ph"] == "X":
            assert e["dur"] == 1
        if e["ph"] == "C":
            assert isinstance(e["args"]["value"], int)
    slices = [e for e in events if e["ph"] == "X"]
    assert [e["args"]["seq"] for e in slices] == list(range(result.events))
    assert [e["name"] for e in events if e["ph"] == "i"] == [f["code"] for f in result.findings]
    assert {e["name"] for e in events if e["ph"] == "C"} == {"frames referenced", "live sptes", "shadow pages"}
    lines = text.splitlines()
    assert lines[0] == '{"displayTimeUnit":"ns","traceEvents":[' and lines[-1] == "]}"
    for line in lines[1:-1]:  # one event per line, each exactly as json.dumps(sort_keys) writes it
        obj = line.removesuffix(",")
        assert json.dumps(json.loads(obj), sort_keys=True, separators=(",", ":")) == obj
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names[0] == "VM" and {e["tid"] for e in slices} <= set(names)


def test_replay_timeline_option(tmp_path):
    out = tmp_path / "t.json"
    trace = str(FINDINGS / "refcount-leak.jsonl")
    res = CliRunner().invoke(cli_main, ["replay", trace, "--timeline", str(out), "--bug", "same-pfn-no-release"])
    assert res.exit_code == 1, res.output
    assert [e["name"] for e in json.loads(out.read_text())["traceEvents"] if e["ph"] == "i"] == ["refcount-leak"]


@pytest.mark.parametrize("command", [["explain", "--pfn", "0x100000"], ["show"], ["stat"]], ids=lambda c: c[0])
def test_bad_input_one_line_exit_2(tmp_path, command):
    """A trace that breaks at line 3: what came before is shown, then one error line naming file and line."""
    trace = tmp_path / "bad.jsonl"
    lines = (FINDINGS / "refcount-leak-clean.jsonl").read_text().splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("{"))
    trace.write_text("\n".join([lines[header], lines[header + 1], '{"op": "access", "addr": "zz"}']) + "\n")
    res = CliRunner().invoke(cli_main, [command[0], str(trace), *command[1:]])
    assert res.exit_code == 2
    errors = [ln for ln in res.output.splitlines() if ln.startswith("kvmpfn: error:")]
    assert len(errors) == 1 and f"{trace}:3" in errors[0] and "Traceback" not in res.output


@pytest.mark.parametrize(
    "command",
    [["explain", "--pfn", "0x100000"], ["explain", "--finding", "1"], ["show"], ["stat"], ["replay"]],
    ids=lambda c: " ".join(c[:2]),
)
def test_a_header_error_is_the_only_output(tmp_path, command):
    trace = tmp_path / "v2.jsonl"
    trace.write_text('{"kvmpfn": 2}\n')
    res = CliRunner().invoke(cli_main, [command[0], str(trace), *command[1:]])
    assert res.exit_code == 2 and res.stdout == ""
    why = 'field "kvmpfn": unsupported trace format version 2 (this kvmpfn reads version 1)'
    assert res.stderr == f"kvmpfn: error: {trace}:1: header: {why}\n"


# --- what a newcomer met: limits, teardown, exit statuses, words, Ctrl-C ------------------------------------


def test_show_at_past_the_last_event_is_an_input_error():
    trace = str(FINDINGS / "refcount-underflow.jsonl")  # 2 events
    res = CliRunner().invoke(cli_main, ["show", trace, "--at", "99"])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr == "kvmpfn: error: --at 99: the trace has 2 events (seq 0 to 1)\n"
    assert CliRunner().invoke(cli_main, ["show", trace, "--at", "1"]).exit_code == 0


def test_show_gva_outside_the_paging_mode_is_an_input_error():
    """4 GiB on a 32-bit guest is refused as the same address in a trace is, not walked truncated."""
    trace = str(SHADOW / "32bit-pse.jsonl")
    res = CliRunner().invoke(cli_main, ["show", trace, "--gva", "0x100000000"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.stderr == ("kvmpfn: error: --gva: gva 0x100000000 is beyond 4 GiB in 32-bit paging (vcpu 0)\n"), (
        res.stderr
    )
    assert CliRunner().invoke(cli_main, ["show", trace, "--gva", "0xfffff000"]).exit_code == 0


def test_show_vcpu_beyond_kvm_max_vcpus_is_a_usage_error_and_an_idle_one_has_no_walk_table():
    trace = str(FINDINGS / "refcount-leak.jsonl")
    res = CliRunner().invoke(cli_main, ["show", trace, "--gva", "0", "--vcpu", "16"])
    assert res.exit_code == 2 and "'--vcpu': 16 is not in the range 0<=x<=15" in res.stderr
    idle = CliRunner().invoke(cli_main, ["show", trace, "--gva", "0", "--vcpu", "15"])
    assert idle.exit_code == 0
    walk = idle.stdout.split("  walk of gva 0x0 on vcpu 15: ")[1].splitlines()
    assert walk == ["guest vcpu 15 has not run"]


def test_explain_labels_the_teardown_after_the_last_event():
    """The implicit teardown has no line of its own: its steps say "teardown", never a seq past the last event."""
    trace = str(FINDINGS / "refcount-leak.jsonl")  # 4 events: seq 0 to 3, then the teardown
    doc = explain(trace, ReplayOptions(), gfn=0x5)
    down = [s for s in doc["steps"] if s.get("teardown")]
    assert down and all(s["seq"] == doc["events"] and s["event"] == "teardown" for s in down)
    assert not any(s.get("teardown") for s in doc["steps"] if s["seq"] < doc["events"])
    res = CliRunner().invoke(cli_main, ["explain", trace, "--gfn", "0x5"])
    assert res.exit_code == 0
    assert "\n  teardown  rmap_remove  spte 5 of shadow page gfn 0x0 level 1: " in res.output
    assert f"seq {doc['events']} " not in res.output


def test_stat_exit_status_quiet_and_plurals():
    """0 clean, 1 findings (as replay); -q: the first line and the findings; one of a kind is singular."""
    trace = str(FINDINGS / "refcount-leak.jsonl")
    clean = CliRunner().invoke(cli_main, ["stat", trace])
    assert clean.exit_code == 0 and "  findings: 0" in clean.stdout
    found = CliRunner().invoke(cli_main, ["stat", trace, "--bug", "same-pfn-no-release", "-q"])
    assert found.exit_code == 1
    assert found.stdout == f"{trace}: 4 events (tdp MMU, kernel pfn)\n  findings: 1\n"
    assert "peak: 1 frame referenced, 1 live spte, 4 shadow pages" in clean.stdout
    show = CliRunner().invoke(cli_main, ["show", trace, "--at", "0"]).stdout
    assert "4 shadow pages (level 4: 1, level 3: 1, level 2: 1, level 1: 1); 1 leaf spte\n" in show
    assert "  rmap: 1 head\n" in show and "rmap_pde: 0 heads" in show and "+1024 pages" in show
    quiet = CliRunner().invoke(cli_main, ["show", trace, "--at", "0", "-q"]).stdout
    assert quiet.splitlines() == [ln for ln in show.splitlines() if not ln.startswith("    ")]
    assert "sp0 level 4" in show and "sp0 level 4" not in quiet


@pytest.fixture(scope="module")
def long_trace(tmp_path_factory) -> Path:
    trace = tmp_path_factory.mktemp("long") / "long.jsonl"
    assert CliRunner().invoke(cli_main, ["synth", "--workload", "steady", "--events", "2000000", "-o", str(trace)])
    return trace


@pytest.mark.parametrize(
    ("command", "marked"),
    [
        (["show", "--at", "1500000"], "interrupted at event {n}: MMU state after seq"),
        (["stat"], "interrupted at event {n}: {trace}: {n} events"),
        (["explain", "--gfn", "0x5"], "interrupted at event {n}: the history covers the events before it"),
    ],
    ids=lambda c: c[0] if isinstance(c, list) else "",
)
def test_sigint_marks_the_partial_result_and_exits_130(long_trace, command, marked):
    """Ctrl-C: what was replayed is shown, marked as interrupted, with one line on stderr and exit 130."""
    status, out, err = interrupt(command[0], str(long_trace), *command[1:])
    assert status == 130, err
    (line,) = err.decode().splitlines()
    n = int(line.removeprefix("kvmpfn: interrupted at event "))
    assert 0 < n < 1_500_000
    assert out.decode().splitlines()[0].startswith(marked.format(n=n, trace=long_trace))
    assert "no step touched these frames" not in out.decode()  # what a finished history would say
