"""``kvmpfn audit``, the CI regression gate (kvmpfn/gate.py), through the real CLI: click's CliRunner in
process, and ``python -m kvmpfn`` in a subprocess for the parallel runs.

Real traces replay clean until the auditor reports findings, so tests that need findings replace
``kvmpfn.replay.replay_file`` with a fake (in process, ``--jobs 1``); the multi-process tests use real clean
traces plus broken ones.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import zstandard
from click.testing import CliRunner

from kvmpfn import replay as replay_mod
from kvmpfn.cli import main
from kvmpfn.gate import parse_shard, shard_of
from kvmpfn.replay import ReplayOptions, ReplayResult

REPO = Path(__file__).resolve().parent.parent
HEADER = '{"kvmpfn": 1, "guest": {"paging": "none"}}\n'
ACCESS = '{"op": "access", "addr": "0x1000", "write": 1, "user": 0, "fetch": 0}\n'
BROKEN = '{"op": "access", "addr": "zz", "write": 1, "user": 0, "fetch": 0}\n'


def write_trace(path: Path, body: str = ACCESS) -> Path:
    """A minimal valid trace (``body`` after the header), compressed as its name says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (HEADER + body).encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def write_baseline(root: Path, traces: dict, name: str = "kvmpfn-baseline.json") -> Path:
    path = root / name
    path.write_text(json.dumps({"version": 1, "traces": traces}))
    return path


def fake_replay(monkeypatch, table: dict[str, list[str] | str]) -> list[tuple[str, ReplayOptions]]:
    """Replace replay_file: a trace whose file name is in ``table`` gets those finding codes (or, for a
    string, that input error); every other trace is clean. Returns the calls made."""
    calls: list[tuple[str, ReplayOptions]] = []

    def replay_file(path, options=None, emit=None):
        calls.append((path, options))
        spec = table.get(os.path.basename(path), [])
        result = ReplayResult(trace=path, events=5)
        if isinstance(spec, str):
            result.error = f"{path}:2: {spec}"
            return result
        result.findings = [
            {"code": code, "seq": i, "line": i + 2, "pfn": f"{0x100000 + i:#x}", "message": f"{code} #{i}"}
            for i, code in enumerate(spec)
        ]
        return result

    monkeypatch.setattr(replay_mod, "replay_file", replay_file)
    return calls


def invoke(*args: str):
    """``kvmpfn audit ARGS`` in process, one job."""
    return CliRunner().invoke(main, ["audit", "--jobs", "1", *args])


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m kvmpfn audit ARGS`` in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "kvmpfn", "audit", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def traces_of(text: str) -> list[str]:
    return [t["trace"] for t in json.loads(text)["traces"]]


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> Path:
    """tmp_path as the working directory, with an empty directory ``corpus`` in it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    return tmp_path / "corpus"


BROKEN_NAMES = ("t4_bad.jsonl", "u/bad2.jsonl")


def mixed_corpus(root: Path, clean: int = 6) -> list[str]:
    """``clean`` clean traces (some compressed) and two broken ones; their relative paths, sorted."""
    names = [f"t{k}.jsonl" for k in range(clean)]
    names[1] = "sub/t1.jsonl.gz"
    names[2] = "sub/deeper/t2.jsonl.zst"
    for name in names:
        write_trace(root / name)
    for name in BROKEN_NAMES:
        write_trace(root / name, ACCESS + BROKEN)
    return sorted([*names, *BROKEN_NAMES])


# -- discovery and paths -----------------------------------------------------------------------------------


def test_clean_corpus_passes_in_sorted_order(corpus):
    for name in ("b.jsonl", "a/x.jsonl.gz", "a.b/y.jsonl.zst", "d.jsonl/c.jsonl"):
        write_trace(corpus / name)
    (corpus / "notes.txt").write_text("not a trace")
    (corpus / "old.json").write_text("{}")
    result = invoke("corpus", "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [t["trace"] for t in doc["traces"]] == [
        "corpus/a.b/y.jsonl.zst",
        "corpus/a/x.jsonl.gz",
        "corpus/b.jsonl",
        "corpus/d.jsonl/c.jsonl",
    ]
    assert {t["status"] for t in doc["traces"]} == {"pass"}
    assert [t["events"] for t in doc["traces"]] == [1, 1, 1, 1]
    assert doc["summary"]["traces"] == 4 and doc["summary"]["pass"] == 4


def test_paths_are_reported_as_given(corpus):
    write_trace(corpus / "a.jsonl")
    for arg, shown in (
        ("corpus", "corpus/a.jsonl"),
        ("corpus/", "corpus/a.jsonl"),
        ("./corpus", "./corpus/a.jsonl"),
    ):
        result = invoke(arg, "--format", "json")
        assert result.exit_code == 0, result.output
        assert traces_of(result.stdout) == [shown]
    result = invoke(str(corpus), "--format", "json")
    assert traces_of(result.stdout) == [str(corpus / "a.jsonl")]


def test_default_path_is_traces(corpus, tmp_path):
    write_trace(tmp_path / "traces" / "x.jsonl")
    result = invoke("--format", "json")
    assert result.exit_code == 0, result.output
    assert traces_of(result.stdout) == ["traces/x.jsonl"]


def test_plain_text_report_when_piped(corpus, monkeypatch):
    write_trace(corpus / "a.jsonl")
    write_trace(corpus / "b.jsonl")
    fake_replay(monkeypatch, {"b.jsonl": ["refcount-leak"]})
    result = invoke("corpus")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["PASS", "corpus/a.jsonl", "5", "events"]
    assert lines[1].split()[:2] == ["FAIL", "corpus/b.jsonl"]
    assert "+ refcount-leak at line 2" in result.stdout
    assert lines[-1].startswith("2 traces: 1 pass, 1 fail, 0 error; 10 events")
    assert "\x1b[" not in result.stdout  # no terminal escapes when piped


# -- the verdicts ------------------------------------------------------------------------------------------


def test_new_finding_fails(corpus, monkeypatch):
    write_trace(corpus / "a.jsonl")
    write_trace(corpus / "b.jsonl")
    fake_replay(monkeypatch, {"a.jsonl": ["refcount-leak", "dirty-lost"]})
    write_baseline(corpus, {"a.jsonl": {"dirty-lost": 1}})
    result = invoke("corpus", "--format", "json")
    assert result.exit_code == 1
    a, b = json.loads(result.stdout)["traces"]
    assert a["status"] == "fail"
    assert a["new"] == {"refcount-leak": 1} and a["missing"] == {}
    assert a["expected"] == {"dirty-lost": 1}
    assert [f["code"] for f in a["findings"]] == ["refcount-leak", "dirty-lost"]
    assert b["status"] == "pass"


def test_missing_expected_finding_fails(corpus, monkeypatch):
    write_trace(corpus / "a.jsonl")
    fake_replay(monkeypatch, {"a.jsonl": ["dirty-lost"]})
    write_baseline(corpus, {"a.jsonl": {"dirty-lost": 2, "refcount-leak": 1}})
    result = invoke("corpus", "--format", "json")
    assert result.exit_code == 1
    (a,) = json.loads(result.stdout)["traces"]
    assert a["status"] == "fail"
    assert a["new"] == {}
    assert a["missing"] == {"dirty-lost": 1, "refcount-leak": 1}


def test_findings_matching_the_baseline_pass(corpus, monkeypatch):
    write_trace(corpus / "a.jsonl")
    write_trace(corpus / "sub" / "b.jsonl")
    fake_replay(monkeypatch, {"b.jsonl": ["refcount-leak", "refcount-leak"]})
    write_baseline(corpus, {"sub/b.jsonl": {"refcount-leak": 2}})
    result = invoke("corpus", "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [t["status"] for t in doc["traces"]] == ["pass", "pass"]
    assert doc["summary"]["by_code"] == {"refcount-leak": 2}


def test_broken_trace_alone_exits_2(tmp_path):
    write_trace(tmp_path / "bad.jsonl", ACCESS + BROKEN)
    proc = run_cli(tmp_path, "bad.jsonl")
    assert proc.returncode == 2
    assert 'kvmpfn: error: bad.jsonl:3: event "access": field "addr"' in proc.stderr
    assert proc.stdout.startswith("ERROR  bad.jsonl  1 event")


def test_broken_trace_in_a_corpus_fails_and_the_others_are_reported(tmp_path):
    rels = mixed_corpus(tmp_path / "corpus")
    proc = run_cli(tmp_path, "corpus", "--jobs", "2", "--format", "json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    by_trace = {t["trace"]: t for t in doc["traces"]}
    assert list(by_trace) == [f"corpus/{rel}" for rel in rels]
    bad = by_trace["corpus/t4_bad.jsonl"]
    assert bad["status"] == "error"
    assert bad["error"].startswith("corpus/t4_bad.jsonl:3: ")
    assert bad["events"] == 1
    assert by_trace["corpus/u/bad2.jsonl"]["status"] == "error"
    assert [t["status"] for t in doc["traces"]].count("pass") == len(rels) - 2
    assert all("error" not in t for t in doc["traces"] if t["status"] == "pass")
    assert doc["summary"]["error"] == 2


# -- baselines ---------------------------------------------------------------------------------------------


def test_update_baseline_round_trip(corpus, monkeypatch):
    for name in ("a.jsonl", "b.jsonl", "c/d.jsonl.gz"):
        write_trace(corpus / name)
    fake_replay(
        monkeypatch, {"a.jsonl": ["refcount-leak", "dirty-lost", "refcount-leak"], "d.jsonl.gz": ["write-count"]}
    )
    baseline = write_baseline(corpus, {"b.jsonl": {"dirty-lost": 1}, "gone.jsonl": {"refcount-leak": 1}})
    assert invoke("corpus").exit_code == 1
    result = invoke("corpus", "--update-baseline", "--format", "json")
    assert result.exit_code == 0, result.output
    assert [t["status"] for t in json.loads(result.stdout)["traces"]] == ["pass", "pass", "pass"]
    expected = (
        "{\n"
        '  "version": 1,\n'
        '  "traces": {\n'
        '    "a.jsonl": {\n'
        '      "dirty-lost": 1,\n'
        '      "refcount-leak": 2\n'
        "    },\n"
        '    "c/d.jsonl.gz": {\n'
        '      "write-count": 1\n'
        "    }\n"
        "  }\n"
        "}\n"
    )
    assert baseline.read_text() == expected
    result = invoke("corpus")
    assert result.exit_code == 0, result.output
    assert invoke("corpus", "--update-baseline").exit_code == 0
    assert baseline.read_text() == expected


def test_update_baseline_reports_what_changed(corpus, monkeypatch):
    write_trace(corpus / "a.jsonl")
    fake_replay(monkeypatch, {"a.jsonl": ["refcount-leak"]})
    result = invoke("corpus", "--update-baseline")
    assert result.exit_code == 0
    assert "baseline updated: clean -> refcount-leak ×1" in result.stdout
    assert "baseline written: corpus/kvmpfn-baseline.json" in result.stdout


def test_update_baseline_keeps_the_entry_of_a_broken_trace(corpus, monkeypatch):
    write_trace(corpus / "a.jsonl")
    write_trace(corpus / "b.jsonl")
    fake_replay(monkeypatch, {"a.jsonl": "bad field", "b.jsonl": ["dirty-lost"]})
    baseline = write_baseline(corpus, {"a.jsonl": {"refcount-leak": 3}})
    result = invoke("corpus", "--update-baseline")
    assert result.exit_code == 1
    assert json.loads(baseline.read_text())["traces"] == {
        "a.jsonl": {"refcount-leak": 3},
        "b.jsonl": {"dirty-lost": 1},
    }


def test_update_baseline_of_one_shard_keeps_the_other_shards(corpus, monkeypatch):
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        write_trace(corpus / name)
    fake_replay(monkeypatch, {"a.jsonl": ["dirty-lost"]})
    baseline = write_baseline(corpus, {"a.jsonl": {"refcount-leak": 1}, "b.jsonl": {"refcount-leak": 1}})
    assert invoke("corpus", "--shard", "1/2", "--update-baseline").exit_code == 0
    assert json.loads(baseline.read_text())["traces"] == {
        "a.jsonl": {"dirty-lost": 1},
        "b.jsonl": {"refcount-leak": 1},
    }


def test_a_trace_file_uses_the_baseline_of_its_corpus(corpus, monkeypatch):
    write_trace(corpus / "sub" / "x.jsonl")
    fake_replay(monkeypatch, {"x.jsonl": ["refcount-leak"]})
    write_baseline(corpus, {"sub/x.jsonl": {"refcount-leak": 1}})
    result = invoke("corpus/sub/x.jsonl", "--format", "json")
    assert result.exit_code == 0, result.output
    (doc,) = json.loads(result.stdout)["traces"]
    assert doc["trace"] == "corpus/sub/x.jsonl"
    assert doc["expected"] == {"refcount-leak": 1}


def test_a_subdirectory_uses_the_baseline_of_its_corpus(corpus, monkeypatch):
    write_trace(corpus / "sub" / "x.jsonl")
    write_trace(corpus / "sub" / "y.jsonl")
    write_trace(corpus / "z.jsonl")
    fake_replay(monkeypatch, {"x.jsonl": ["refcount-leak"], "y.jsonl": ["dirty-lost"]})
    baseline = write_baseline(corpus, {"sub/x.jsonl": {"refcount-leak": 1}, "z.jsonl": {"dirty-lost": 1}})
    result = invoke("corpus/sub", "--format", "json")
    assert result.exit_code == 1, result.output  # y's finding is new
    docs = json.loads(result.stdout)["traces"]
    assert [(d["trace"], d["status"], d["expected"]) for d in docs] == [
        ("corpus/sub/x.jsonl", "pass", {"refcount-leak": 1}),
        ("corpus/sub/y.jsonl", "fail", {}),
    ]
    assert invoke("corpus/sub", "--update-baseline").exit_code == 0
    assert not (corpus / "sub" / "kvmpfn-baseline.json").exists()
    assert json.loads(baseline.read_text())["traces"] == {
        "sub/x.jsonl": {"refcount-leak": 1},
        "sub/y.jsonl": {"dirty-lost": 1},
        "z.jsonl": {"dirty-lost": 1},
    }


def test_baseline_option(corpus, tmp_path, monkeypatch):
    write_trace(corpus / "a.jsonl")
    fake_replay(monkeypatch, {"a.jsonl": ["refcount-leak"]})
    write_baseline(corpus, {})  # ignored: --baseline replaces it
    (tmp_path / "ci").mkdir()
    write_baseline(tmp_path / "ci", {"a.jsonl": {"refcount-leak": 1}}, "expected.json")
    assert invoke("corpus").exit_code == 1
    assert invoke("corpus", "--baseline", "ci/expected.json").exit_code == 0
    result = invoke("corpus", "--baseline", "ci/missing.json")
    assert result.exit_code == 2
    assert "ci/missing.json: no such baseline file" in result.stderr


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"version": 2, "traces": {}}',
        '{"version": 1}',
        '{"version": 1, "traces": {"a.jsonl": {"refcount-leak": -1}}}',
        '{"version": 1, "traces": {"a.jsonl": ["refcount-leak"]}}',
        '{"version": 1, "traces": {}, "extra": 0}',
    ],
)
def test_malformed_baseline_is_a_usage_error(corpus, content):
    write_trace(corpus / "a.jsonl")
    (corpus / "kvmpfn-baseline.json").write_text(content)
    result = invoke("corpus")
    assert result.exit_code == 2
    assert "corpus/kvmpfn-baseline.json" in result.stderr


def test_stale_baseline_entry_warns(corpus):
    write_trace(corpus / "a.jsonl")
    write_baseline(corpus, {"gone.jsonl": {"refcount-leak": 1}})
    result = invoke("corpus")
    assert result.exit_code == 0
    assert 'warning: corpus/kvmpfn-baseline.json: entry "gone.jsonl" names no trace' in result.stderr


# -- options -----------------------------------------------------------------------------------------------


def test_replay_options_are_passed_through(corpus, monkeypatch):
    write_trace(corpus / "a.jsonl")
    calls = fake_replay(monkeypatch, {})
    args = ["--mmu", "tdp", "--kernel", "notifier", "--audit-every", "3", "--bug", "pfn-shift-32"]
    result = invoke("corpus", *args, "--bug", "double-release")
    assert result.exit_code == 0, result.output
    ((path, options),) = calls
    assert path == "corpus/a.jsonl"
    assert (options.mmu, options.kernel, options.audit_every) == ("tdp", "notifier", 3)
    assert options.bugs == frozenset({"pfn-shift-32", "double-release"})


@pytest.mark.parametrize(
    "args",
    [
        ["--shard", "0/3"],
        ["--shard", "4/3"],
        ["--shard", "1/0"],
        ["--shard", "two"],
        ["--jobs", "0"],
        ["--bug", "no-such-bug"],
        ["--format", "xml"],
    ],
)
def test_usage_errors_exit_2(corpus, args):
    write_trace(corpus / "a.jsonl")
    result = invoke("corpus", *args)
    assert result.exit_code == 2, result.output


def test_missing_path_and_empty_corpus_exit_2(corpus):
    result = invoke("nowhere")
    assert result.exit_code == 2
    assert "nowhere: no such file or directory" in result.stderr
    result = invoke("corpus")
    assert result.exit_code == 2
    assert "no traces" in result.stderr


def test_output_file_gets_the_document_and_stdout_the_table(corpus, monkeypatch):
    write_trace(corpus / "a.jsonl")
    fake_replay(monkeypatch, {"a.jsonl": ["refcount-leak"]})
    result = invoke("corpus", "--format", "json", "-o", "report.json")
    assert result.exit_code == 1
    doc = json.loads(Path("report.json").read_text())
    assert doc["traces"][0]["new"] == {"refcount-leak": 1}
    assert result.stdout.startswith("FAIL  corpus/a.jsonl")


def test_fail_fast_stops_after_the_first_failing_trace(corpus, monkeypatch):
    for name in ("a.jsonl", "b.jsonl", "c.jsonl", "d.jsonl"):
        write_trace(corpus / name)
    calls = fake_replay(monkeypatch, {"b.jsonl": ["refcount-leak"], "d.jsonl": ["dirty-lost"]})
    result = invoke("corpus", "--fail-fast", "--format", "json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert [t["trace"] for t in doc["traces"]] == ["corpus/a.jsonl", "corpus/b.jsonl"]
    assert doc["summary"]["not_run"] == 2
    assert [path for path, _ in calls] == ["corpus/a.jsonl", "corpus/b.jsonl"]
    text = invoke("corpus", "--fail-fast").stdout
    assert "NOT RUN  corpus/c.jsonl" in text and "NOT RUN  corpus/d.jsonl" in text


# -- parallel jobs, shards, determinism (subprocesses) -----------------------------------------------------


def test_parallel_jobs_give_the_same_bytes_as_one_job(tmp_path):
    mixed_corpus(tmp_path / "corpus", clean=9)
    for fmt in ("json", "sarif", "junit", "text"):
        one = run_cli(tmp_path, "corpus", "--jobs", "1", "--format", fmt)
        two = run_cli(tmp_path, "corpus", "--jobs", "2", "--format", fmt)
        assert one.returncode == two.returncode == 1
        assert one.stdout == two.stdout, fmt
    fast_one = run_cli(tmp_path, "corpus", "--jobs", "1", "--fail-fast", "--format", "json")
    fast_two = run_cli(tmp_path, "corpus", "--jobs", "2", "--fail-fast", "--format", "json")
    assert fast_one.stdout == fast_two.stdout
    # stopped at the first broken trace in sorted order; the traces before it ran
    assert traces_of(fast_two.stdout) == [
        "corpus/sub/deeper/t2.jsonl.zst",
        "corpus/sub/t1.jsonl.gz",
        "corpus/t0.jsonl",
        "corpus/t3.jsonl",
        "corpus/t4.jsonl",
        "corpus/t4_bad.jsonl",
    ]


def test_shards_cover_the_corpus_exactly_once(tmp_path):
    rels = mixed_corpus(tmp_path / "corpus", clean=8)
    full = traces_of(run_cli(tmp_path, "corpus", "--format", "json").stdout)
    assert full == [f"corpus/{rel}" for rel in rels]
    shards = []
    for i in (1, 2, 3):
        proc = run_cli(tmp_path, "corpus", "--shard", f"{i}/3", "--jobs", "2", "--format", "json")
        doc = json.loads(proc.stdout)
        assert doc["summary"]["shard"] == f"{i}/3"
        shards.append([t["trace"] for t in doc["traces"]])
    assert sorted(sum(shards, [])) == sorted(full)
    assert len(sum(shards, [])) == len(full)
    sizes = [(path, (tmp_path / path).stat().st_size) for path in full]
    owner = shard_of(sizes, 3)
    for i, shard in enumerate(shards):
        assert shard == [path for path, s in zip(full, owner, strict=True) if s == i + 1]  # in selection order


def test_shard_rule_balances_bytes_largest_first_ties_by_path():
    assert parse_shard("2/4") == (2, 4)
    sizes = [("a", 10), ("b", 70), ("c", 30), ("d", 30), ("e", 20), ("f", 5)]
    # b→1 (70), c→2 (30), d→3 (30), e→2 (50), a→3 (40), f→3 (45)
    assert shard_of(sizes, 3) == [3, 1, 2, 3, 2, 3]
    assert shard_of(sizes, 1) == [1] * 6
    loads = [0, 0, 0]
    for (_path, size), shard in zip(sizes, shard_of(sizes, 3), strict=True):
        loads[shard - 1] += size
    assert max(loads) - min(loads) <= max(size for _p, size in sizes)
    for bad in ("0/4", "5/4", "1/0", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def keys_and_values(node):
    """Every key and scalar value of a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from keys_and_values(value)
    elif isinstance(node, list):
        for value in node:
            yield from keys_and_values(value)
    else:
        yield node


def test_documents_are_deterministic_and_hold_no_timings_or_hidden_paths(tmp_path):
    mixed_corpus(tmp_path / "corpus")
    for fmt in ("json", "sarif", "junit"):
        first = run_cli(tmp_path, "corpus", "--format", fmt, "-o", f"out.{fmt}")
        first_bytes = (tmp_path / f"out.{fmt}").read_bytes()
        second = run_cli(tmp_path, "corpus", "--format", fmt, "-o", f"out.{fmt}")
        assert first.returncode == second.returncode == 1
        assert (tmp_path / f"out.{fmt}").read_bytes() == first_bytes, fmt
        text = first_bytes.decode()
        assert str(tmp_path) not in text
        if fmt == "junit":
            for element in ET.fromstring(text).iter():
                assert not {"time", "timestamp", "hostname"} & set(element.attrib), element.tag
        else:
            for item in keys_and_values(json.loads(text)):
                assert not isinstance(item, float), (fmt, item)
                assert not (isinstance(item, str) and re.search("time|seconds|duration", item, re.I)), item
        # the table that goes to stdout with -o is plain text (piped): no timings either
        assert first.stdout.startswith("PASS   corpus/sub/deeper/t2.jsonl.zst")
        assert not re.search(r"\d\.\d\ds", first.stdout)
