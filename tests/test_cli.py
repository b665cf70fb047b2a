"""The command line as a person meets it: what `replay` prints, where its output goes, how it fails, stops and
refuses to destroy its inputs. In-process (click's runner) where the words matter, in a subprocess where the
process matters (signals, closed descriptors)."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from cli_helper import REPO, check_input_error, interrupt, run_kvmpfn
from click.testing import CliRunner

from kvmpfn.cli import main

TRACES = REPO / "traces"
LEAK = TRACES / "findings" / "refcount-leak.jsonl"  # clean; a refcount-leak under --bug same-pfn-no-release
KERNEL_BUG = TRACES / "mutants" / "dirty-log-splits-large.jsonl"  # __direct_map BUG under direct-map-into-large


def invoke(*args: str, **kwargs):
    return CliRunner().invoke(main, list(args), **kwargs)


# --- replay shows what it found ------------------------------------------------------------------------------


def test_replay_text_lists_each_finding_with_its_provenance():
    res = invoke("replay", str(LEAK), "--bug", "same-pfn-no-release")
    assert res.exit_code == 1
    lines = res.stdout.splitlines()
    assert lines[0] == f"{LEAK}: 4 events (tdp MMU, kernel pfn)"
    assert "  1 finding: refcount-leak 1" in lines
    (finding,) = [line for line in lines if line.startswith("  [1] ")]
    assert finding == (
        "  [1] refcount-leak at line 16 (seq 3, audit after re-fault): frame 0x100000 holds 1 KVM reference(s) "
        "that no present spte owns [pfn=0x100000]"
    )
    prov = lines[lines.index(finding) + 1]
    assert prov == "      reference taken at line 15 (seq 2) by gfn_to_pfn in tdp_page_fault, owned by no spte"
    assert res.stderr == ""


def test_replay_clean_and_quiet():
    res = invoke("replay", str(LEAK))
    assert res.exit_code == 0 and "  no findings" in res.stdout
    quiet = invoke("replay", str(LEAK), "-q")
    assert quiet.exit_code == 0 and quiet.stdout == ""
    quiet_found = invoke("replay", str(LEAK), "-q", "--bug", "same-pfn-no-release")
    assert quiet_found.exit_code == 1 and quiet_found.stdout.startswith("  [1] refcount-leak")


def test_json_and_html_reports_record_the_options_they_replayed_with(tmp_path: Path):
    from kvmpfn.replay import ReplayOptions

    html = tmp_path / "r.html"
    res = invoke(
        "replay",
        str(LEAK),
        "--bug",
        "same-pfn-no-release",
        "--audit-every",
        "2",
        "--format",
        "json",
        "--html",
        str(html),
    )
    assert res.exit_code == 1
    options = ReplayOptions(bugs=frozenset({"same-pfn-no-release"}), audit_every=2)
    assert json.loads(res.stdout)["options"] == options.document()
    assert options.document()["bugs"] == ["same-pfn-no-release"] and options.document()["mmu"] is None
    command = f"kvmpfn replay {LEAK} --audit-every 2 --bug same-pfn-no-release"
    assert f"<title>{command}</title>" in html.read_text()


def test_replay_caps_the_text_list_and_verbose_shows_all(tmp_path: Path):
    trace = tmp_path / "many.jsonl"
    assert invoke("synth", "--workload", "steady", "--events", "3000", "-o", str(trace)).exit_code == 0
    res = invoke("replay", str(trace), "--bug", "same-pfn-no-release")
    assert res.exit_code == 1
    listed = [line for line in res.stdout.splitlines() if line.startswith("  [")]
    total = json.loads(invoke("replay", str(trace), "--bug", "same-pfn-no-release", "--format", "json").stdout)
    n = len(total["findings"])
    assert n > 20 and len(listed) == 20
    assert f"  ... {n - 20} more: refcount-leak {n - 20} (-v shows all)" in res.stdout
    verbose = invoke("replay", str(trace), "--bug", "same-pfn-no-release", "-v")
    assert len([line for line in verbose.stdout.splitlines() if line.startswith("  [")]) == n


def test_emit_dash_writes_only_json_lines_and_the_report_goes_to_stderr():
    res = invoke("replay", str(LEAK), "--emit", "-", "--bug", "same-pfn-no-release")
    assert res.exit_code == 1
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["seq"] for r in records] == [0, 1, 2, 3]
    assert "[1] refcount-leak" in res.stderr


@pytest.mark.parametrize(
    "suffix, decompress",
    [(".gz", gzip.decompress), (".zst", lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b))],
)
def test_emit_is_compressed_by_suffix(tmp_path: Path, suffix, decompress):
    plain, packed = tmp_path / "out.jsonl", tmp_path / f"out.jsonl{suffix}"
    assert invoke("replay", str(LEAK), "--emit", str(plain)).exit_code == 0
    assert invoke("replay", str(LEAK), "--emit", str(packed)).exit_code == 0
    assert decompress(packed.read_bytes()) == plain.read_bytes()
    assert len(plain.read_bytes().splitlines()) == 4


def test_a_kernel_bug_is_a_finding_with_exit_1():
    res = invoke("replay", str(KERNEL_BUG), "--bug", "direct-map-into-large", "--format", "json")
    assert res.exit_code == 1, res.output
    doc = json.loads(res.stdout)
    (bug,) = [f for f in doc["findings"] if f["code"] == "kernel-bug"]
    assert bug["function"] == "__direct_map" and bug["spte"].startswith("0x")
    assert "error" not in doc


def test_kernel_audit_under_tdp_is_a_stated_warning():
    res = invoke("replay", str(LEAK), "--kernel-audit")
    assert res.exit_code == 0
    assert res.stderr == (
        "kvmpfn: warning: --kernel-audit does nothing under tdp: the kernel's kvm_mmu_audit() points are in "
        "shadow paths\n"
    )


# --- errors: one line, nothing on stdout first ---------------------------------------------------------------


def test_nothing_on_stdout_before_an_input_error(tmp_path: Path):
    missing = invoke("replay", str(tmp_path / "nope.jsonl"))
    assert missing.exit_code == 2 and missing.stdout == ""
    assert missing.stderr == f"kvmpfn: error: {tmp_path / 'nope.jsonl'}: no such file\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kvmpfn": 1, "mmu": "tdpp"}\n')
    res = invoke("replay", str(bad))
    assert res.exit_code == 2 and res.stdout == "" and res.stderr.count("\n") == 1
    assert f'{bad}:1: header: field "mmu"' in res.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["replai", "t"], "no command 'replai' (did you mean replay?)"),
        (["replay", "t", "--bug", "same-pfn-no-relase"], "(did you mean same-pfn-no-release?)"),
        (["replay", "t", "--mmmu", "tdp"], "No such option '--mmmu'. Did you mean '--mmu'?"),
        (["compare", ".", "--a", "--kernel pfn-i0", "--b", ""], "'--a'"),
        (["compare", ".", "--a", "", "--b", "--bug nope"], "'--b'"),
    ],
)
def test_usage_errors_have_the_one_error_style(args, words):
    res = invoke(*args)
    assert res.exit_code == 2
    assert res.stderr.startswith("kvmpfn: error: ") and res.stderr.count("\n") == 1
    assert words in res.stderr


def test_compare_takes_replay_options_with_the_replay_parser():
    res = invoke("compare", str(LEAK), "--a", "--paranoid --audit-every 1", "--b", "--bug same-pfn-no-release")
    assert res.exit_code == 1
    assert "a = '--audit-every 1 --paranoid'" in res.stdout and "b = '--bug same-pfn-no-release'" in res.stdout


# --- outputs never destroy inputs, and appear whole or not at all ---------------------------------------------


@pytest.mark.parametrize("flag", ["--emit", "-o"])
def test_an_output_that_is_the_trace_is_refused(tmp_path: Path, flag):
    trace = tmp_path / "t.jsonl"
    shutil.copy(LEAK, trace)
    alias = tmp_path / "alias.jsonl"
    os.link(trace, alias)  # the same file under another name
    for out in (trace, alias):
        res = invoke("replay", str(trace), flag, str(out))
        assert res.exit_code == 2 and f"is an input ({trace})" in res.stderr
    assert trace.read_bytes() == LEAK.read_bytes()


@pytest.mark.parametrize("header", [b'{"kvmpfn": 2}\n', b"", b"\x00\x01"])
def test_a_trace_that_replays_nothing_leaves_no_output_files(tmp_path: Path, header):
    trace = tmp_path / "bad.jsonl"
    trace.write_bytes(header)
    outputs = {
        flag: tmp_path / name
        for flag, name in [("--emit", "e.jsonl"), ("--timeline", "t.json"), ("--html", "r.html"), ("-o", "r.txt")]
    }
    res = invoke("replay", str(trace), *(word for flag, path in outputs.items() for word in (flag, str(path))))
    assert res.exit_code == 2, res.stderr
    assert res.stderr.startswith(f"kvmpfn: error: {trace}:") and res.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


@pytest.mark.parametrize("flags", [("--emit", "--timeline"), ("--html", "--timeline"), ("--emit", "--html")])
def test_two_outputs_on_stdout_are_refused(flags):
    res = invoke("replay", str(LEAK), flags[0], "-", flags[1], "-")
    assert res.exit_code == 2 and res.stdout == ""
    assert (
        res.stderr
        == f"kvmpfn: error: {flags[0]} and {flags[1]} both write to standard output (-); give one of them a file\n"
    )


def test_a_timeline_on_stdout_sends_the_report_to_stderr():
    res = invoke("replay", str(LEAK), "--timeline", "-", "--format", "json", "--bug", "same-pfn-no-release")
    assert res.exit_code == 1
    assert json.loads(res.stdout)["traceEvents"] and json.loads(res.stderr)["summary"]


def test_audit_convert_and_check_refuse_their_inputs(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(LEAK, corpus / "a.jsonl")
    baseline = corpus / "kvmpfn-baseline.json"
    baseline.write_text('{"version": 1, "traces": {}}\n')
    for out in (corpus / "a.jsonl", baseline):
        before = out.read_bytes()
        res = invoke("audit", str(corpus), "--format", "sarif", "-o", str(out))
        assert res.exit_code == 2 and "is an input" in res.stderr
        assert out.read_bytes() == before
    copy = tmp_path / "rec.txt"
    shutil.copy(TRACES / "recorded" / "tdp-fault-loop.txt", copy)
    before = copy.read_bytes()
    for args in (["convert", str(copy), "-o", str(copy)], ["check", str(copy), "-o", str(copy)]):
        res = invoke(*args)
        assert res.exit_code == 2 and "is an input" in res.stderr, res.output
        assert copy.read_bytes() == before


def test_a_failed_write_leaves_the_target_as_it_was(tmp_path: Path, monkeypatch):
    from kvmpfn import outputs

    target = tmp_path / "report.json"
    target.write_text("old\n")
    target.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target.name)

    def full(self, data):
        raise outputs.OutputError(self.path, "no space left on device")

    monkeypatch.setattr(outputs.AtomicFile, "write", full)
    res = invoke("replay", str(LEAK), "--format", "json", "-o", str(link))
    assert res.exit_code == 2 and res.stderr == f"kvmpfn: error: {link}: no space left on device\n"
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "report.json"]  # no temporary file left
    monkeypatch.undo()
    assert invoke("replay", str(LEAK), "--format", "json", "-o", str(link)).exit_code == 0
    assert link.is_symlink() and json.loads(target.read_text())["events"] == 4
    assert (target.stat().st_mode & 0o777) == 0o640


def test_device_outputs_are_written_not_replaced(tmp_path: Path):
    res = run_kvmpfn(tmp_path, "replay", str(LEAK), "-o", "/dev/full")
    check_input_error(res, "/dev/full: ", None, "no space left on device")
    assert Path("/dev/full").is_char_device()
    assert run_kvmpfn(tmp_path, "replay", str(LEAK), "-o", "/dev/null").returncode == 0
    assert Path("/dev/null").is_char_device()


def test_closed_standard_streams_are_one_line_errors(tmp_path: Path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = [sys.executable, "-m", "kvmpfn"]
    no_stdout = subprocess.run(
        [*base, "replay", str(LEAK)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        timeout=60,
        pass_fds=(),
        close_fds=True,
        preexec_fn=lambda: os.close(1),
    )
    assert no_stdout.returncode == 2
    assert no_stdout.stderr.decode() == "kvmpfn: error: <stdout>: bad file descriptor (closed when kvmpfn started)\n"
    no_stdin = subprocess.run(
        [*base, "replay", "-"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=60,
        preexec_fn=lambda: os.close(0),
    )
    assert no_stdin.returncode == 2 and b"Traceback" not in no_stdin.stderr
    assert no_stdin.stderr.startswith(b"kvmpfn: error: <stdin>") and no_stdin.stderr.count(b"\n") == 1


# --- Ctrl-C ----------------------------------------------------------------------------------------------------


def test_sigint_stops_a_replay_with_its_partial_report(tmp_path: Path):
    trace = tmp_path / "long.jsonl"
    assert invoke("synth", "--workload", "steady", "--events", "2000000", "-o", str(trace)).exit_code == 0
    emit, timeline = tmp_path / "out.jsonl", tmp_path / "timeline.json"
    status, out, err = interrupt(
        "replay", str(trace), "--format", "json", "--emit", str(emit), "--timeline", str(timeline)
    )
    assert status == 130, err
    doc = json.loads(out)
    assert doc["interrupted"] is True and 0 < doc["events"] < 2_000_000
    assert err.decode() == f"kvmpfn: interrupted at event {doc['events']}\n"
    assert len(emit.read_bytes().splitlines()) == doc["events"]  # every event counted has its record
    assert json.loads(timeline.read_text())["traceEvents"]


# --- bugs ------------------------------------------------------------------------------------------------------


def test_bugs_json_and_one_bug():
    from kvmpfn.kvm.bugs import BUGS

    doc = json.loads(invoke("bugs", "--format", "json").stdout)
    assert [b["name"] for b in doc["bugs"]] == list(BUGS)
    one = invoke("bugs", "same-pfn-no-release")
    assert one.exit_code == 0 and one.stdout.startswith("same-pfn-no-release  both MMUs  all kernels")
    wrong = invoke("bugs", "same-pfn-no-relase")
    assert wrong.exit_code == 2 and 'did you mean "same-pfn-no-release"?' in wrong.stderr


# --- check, convert: directories, pipes, nothing readable ----------------------------------------------------


def test_check_takes_a_directory_and_reports_each_file():
    res = invoke("check", str(TRACES / "recorded"))
    files = sorted(p for p in (TRACES / "recorded").iterdir() if p.suffix in (".txt", ".jsonl"))
    assert res.exit_code == 1  # the recorded corpus holds a fault loop and spte mismatches
    heads = [line for line in res.stdout.splitlines() if not line.startswith(" ")]
    assert [h.split(":")[0] for h in heads] == [str(p) for p in files]
    assert all(" records checked, " in h for h in heads)


def test_check_with_nothing_readable_is_an_input_error_and_prints_nothing_else(tmp_path: Path):
    junk = tmp_path / "junk.txt"
    junk.write_text("hello\n" + "       CPU 0/KVM-1 [002] d.... 1.0: kvm_exit: vcpu " + "9" * 5000 + " reason X\n")
    res = invoke("check", str(junk))
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.startswith(f"kvmpfn: error: {junk}: no record of an event kvmpfn reads")


def test_check_and_convert_read_a_pipe_and_leave_no_spool(tmp_path: Path):
    spool_dir = tmp_path / "tmp"
    spool_dir.mkdir()
    text = (TRACES / "recorded" / "tdp-fault-loop.txt").read_bytes()
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(spool_dir))
    read, write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmpfn", "check", f"/dev/fd/{read}"],
        pass_fds=(read,),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(read)
    os.write(write, text)
    os.close(write)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and b"fault-loop" in out, err
    conv = subprocess.run(
        [sys.executable, "-m", "kvmpfn", "convert", "-", "-o", str(tmp_path / "c.jsonl")],
        input=text,
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert conv.returncode == 0 and (tmp_path / "c.jsonl").exists()
    assert list(spool_dir.iterdir()) == []


def test_a_memory_image_that_cannot_be_read_is_an_input_error(tmp_path: Path):
    trace = tmp_path / "m.jsonl"
    trace.write_text('{"kvmpfn": 1, "mmu": "tdp", "guest": {"paging": "none"}, "memory": "/proc/self/mem"}\n')
    res = run_kvmpfn(tmp_path, "replay", str(trace))
    check_input_error(res, f"{trace}:1: header: ", "memory", "/proc/self/mem: input/output error")
    assert res.stdout == b""


def test_input_strings_cannot_forge_report_lines(tmp_path: Path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    body = (
        '{"kvmpfn": 1, "mmu": "tdp", "guest": {"paging": "none"}}\n{"op": "audit", "label": "x\\nPASS \\u001b[31m"}\n'
    )
    (corpus / "b\nPASS evil.jsonl").write_text(body)
    (corpus / "c\x1b[2J.jsonl").write_text(body)
    res = invoke("audit", str(corpus))
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("PASS  ") for line in lines[:2])
    assert "\x1b" not in res.stdout and "b\\x0aPASS evil.jsonl" in lines[0]


def test_options_that_do_nothing_are_stated():
    res = invoke("replay", str(LEAK), "--bug", "prefetch-no-release", "--tdp", "ept", "-q")
    assert res.exit_code == 0
    assert res.stderr.splitlines() == [
        "kvmpfn: warning: --bug prefetch-no-release does nothing under the tdp MMU with kernel pfn (it applies to "
        "shadow MMU, kernel page/pfn/pfn-io/notifier)",
    ]
    shadow = invoke("replay", str(LEAK), "--mmu", "shadow", "--tdp", "ept", "-q")
    assert shadow.stderr == "kvmpfn: warning: --tdp ept does nothing under shadow paging\n"


def test_codes_lists_and_explains():
    from kvmpfn import vocab

    listing = invoke("codes")
    assert [line.split()[0] for line in listing.stdout.splitlines()[:-1]] == list(vocab.CODES)
    one = invoke("codes", "refcount-leak")
    assert one.exit_code == 0
    assert "kvmpfn replay traces/findings/refcount-leak.jsonl --bug same-pfn-no-release" in one.stdout
    doc = json.loads(invoke("codes", "kernel-bug", "--format", "json").stdout)
    assert doc["code"] == "kernel-bug" and doc["subject"] == "function, spte"
    wrong = invoke("codes", "refcount-lek")
    assert wrong.exit_code == 2 and 'did you mean "refcount-leak"?' in wrong.stderr


# --- baselines record the options that change the MMU -------------------------------------------------------


def test_a_baseline_records_its_mmu_options_and_refuses_others(tmp_path: Path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    shutil.copy(LEAK, corpus / "a.jsonl")
    baseline = corpus / "kvmpfn-baseline.json"
    assert invoke("audit", str(corpus), "--bug", "same-pfn-no-release", "--update-baseline", "-q").exit_code == 0
    doc = json.loads(baseline.read_text())
    assert doc == {
        "version": 1,
        "options": {"bugs": ["same-pfn-no-release"]},
        "traces": {"a.jsonl": {"refcount-leak": 1}},
    }
    plain = invoke("audit", str(corpus))  # replays under the recorded --bug
    assert plain.exit_code == 0 and "findings: refcount-leak ×1" in plain.stdout
    assert invoke("audit", str(corpus), "--update-baseline", "-q").exit_code == 0
    assert json.loads(baseline.read_text()) == doc
    other = invoke("audit", str(corpus), "--kernel", "pfn-io", "--update-baseline")
    assert other.exit_code == 2 and "--update-baseline with --kernel pfn-io would mix" in other.stderr
    assert json.loads(baseline.read_text()) == doc


@pytest.mark.parametrize(
    "doc, words",
    [
        (
            {"version": 1, "traces": {"a.jsonl": {"refcount-lek": 1}}},
            'unknown finding code "refcount-lek" (did you mean "refcount-leak"?)',
        ),
        ({"version": 1, "options": {"bugs": ["same-pfn"]}, "traces": {}}, 'unknown bug "same-pfn"'),
        ({"version": 1, "options": {"mmu": "ept"}, "traces": {}}, 'options.mmu: "ept" is not one of "shadow", "tdp"'),
        (
            {"version": 1, "options": {"kernal": "pfn"}, "traces": {}},
            'options: unknown option "kernal" (did you mean "kernel"?) (known: mmu, kernel, tdp, bugs)',
        ),
        ({"version": 1, "options": {"bugs": "x"}, "traces": {}}, 'options.bugs: "x" is not a list of bug names'),
    ],
)
def test_baseline_codes_and_options_are_validated(tmp_path: Path, doc, words):
    corpus = tmp_path / "c"
    corpus.mkdir()
    shutil.copy(LEAK, corpus / "a.jsonl")
    (corpus / "kvmpfn-baseline.json").write_text(json.dumps(doc))
    res = invoke("audit", str(corpus))
    assert res.exit_code == 2 and words in res.stderr and res.stderr.count("\n") == 1


def test_undecodable_file_names_give_valid_documents(tmp_path: Path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    name = os.fsdecode(b"\xff\xfe.jsonl")
    shutil.copy(LEAK, corpus / name)
    for fmt in ("json", "sarif", "junit", "html", "text"):
        out = tmp_path / f"report.{fmt}"
        res = run_kvmpfn(tmp_path, "audit", "c", "--format", fmt, "-o", str(out))
        assert res.returncode == 0 and b"Traceback" not in res.stderr, res.stderr
        data = out.read_bytes()
        if fmt == "text":
            assert b"c/\\udcff\\udcfe.jsonl  4 events" in data  # escaped, as on a terminal
            continue
        text = data.decode("utf-8")  # a document declared UTF-8 is UTF-8
        assert fmt == "sarif" or "udcff" in text  # (SARIF lists findings only, and the trace is clean)
        if fmt in ("json", "sarif"):
            json.loads(text)
        elif fmt == "junit":
            import xml.etree.ElementTree as ET

            assert [c.get("name") for c in ET.fromstring(data).iter("testcase")] == ["\\udcff\\udcfe.jsonl"]


def test_progress_shows_on_a_terminal_after_its_delay_only(monkeypatch):
    import io

    from kvmpfn.report import progress as progress_mod

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    quick = Tty()
    with progress_mod.progress("replaying", unit="events", stream=quick) as update:
        update(100, "")
    assert quick.getvalue() == ""  # under a second: nothing
    monkeypatch.setattr(progress_mod, "DELAY", 0.0)
    slow, piped = Tty(), io.StringIO()
    for stream in (slow, piped):
        with progress_mod.progress("synthesizing", total=1000, unit="events", stream=stream) as update:
            update(500, "half")
    assert "synthesizing" in slow.getvalue() and "500/1000" in slow.getvalue()
    assert piped.getvalue() == ""


def test_replay_reports_progress_and_each_full_audit(tmp_path: Path):
    from kvmpfn.replay import PROGRESS_EVERY, replay_file

    trace = tmp_path / "t.jsonl"
    body = ['{"op": "access", "addr": "0x5000", "write": 0, "user": 0, "fetch": 0}'] * (PROGRESS_EVERY + 5)
    body.insert(3, '{"op": "audit"}')
    trace.write_text('{"kvmpfn": 1, "mmu": "tdp", "guest": {"paging": "none"}}\n' + "\n".join(body) + "\n")
    calls = []
    replay_file(str(trace), progress=lambda seq, note: calls.append((seq, note)))
    assert calls == [(3, "full audit at line 5"), (PROGRESS_EVERY - 1, "")]


class _InterruptedWrites(io.StringIO):
    """An ``--emit`` stream that receives Ctrl-C ``presses`` times while it writes record ``at``."""

    def __init__(self, at: int, presses: int) -> None:
        super().__init__()
        self.at, self.presses, self.calls = at, presses, 0

    def write(self, text: str) -> int:
        self.calls += 1
        if self.calls == self.at:
            for _ in range(self.presses):
                signal.raise_signal(signal.SIGINT)  # the handler runs here, in the middle of the write
        return super().write(text)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_between_events_every_counted_event_has_its_record(tmp_path: Path, presses):
    """The first Ctrl-C stops the replay before the next event, so no record is cut or lost; a second one
    interrupts at once (here: inside the write of record 100, which then never happens)."""
    from kvmpfn.replay import ReplayOptions, replay_file

    trace = tmp_path / "t.jsonl"
    assert invoke("synth", "--workload", "steady", "--events", "500", "-o", str(trace)).exit_code == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    emit = _InterruptedWrites(at=100, presses=presses)
    result = replay_file(str(trace), ReplayOptions(), emit)
    assert result.interrupted and result.error is None and result.events == 100
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    lines = emit.getvalue().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == list(range(100 if presses == 1 else 99))


# --- mutants ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "bug", "words"),
    [
        (
            "--kernel pfn-io",
            "memslot-delete-no-flush",
            "--bug memslot-delete-no-flush does nothing under kernel pfn-io",
        ),
        ("--bug same-pfn-no-release", "same-pfn-no-release", "--bug same-pfn-no-release is also in --base"),
    ],
)
def test_mutants_refuses_a_mutant_that_cannot_differ_from_its_base(base, bug, words):
    res = invoke("mutants", str(LEAK), "--base", base, "--bug", bug)
    assert res.exit_code == 2 and words in res.stderr and res.stdout == ""


def test_mutants_leaves_out_what_its_base_makes_idle():
    from kvmpfn.kvm.bugs import BUGS

    res = invoke(
        "mutants", str(LEAK), "--base", "--kernel pfn-io --bug same-pfn-no-release", "--jobs", "1", "--format", "json"
    )
    assert res.exit_code == 0, res.stderr
    idle = sorted({"same-pfn-no-release"} | {name for name, bug in BUGS.items() if "pfn-io" not in bug.kernels})
    assert len(idle) > 1
    assert f"mutant(s) not run (they do nothing under it, or it turns them on already): {', '.join(idle)}" in res.stderr
    assert sorted(m["bug"] for m in json.loads(res.stdout)["mutants"]) == sorted(set(BUGS) - set(idle))
