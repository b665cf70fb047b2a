"""kvmpfn/runner.py through the real command line (subprocesses, signals sent as a user or the OOM killer
would): a worker killed mid-run is retried, a trace that kills every worker is that trace's error, Ctrl-C
cancels with exit 130 and a partial report, workers die with their parent and never hold its stdout, FIFOs and
descriptor limits do not hang; plus the gate's shards, ``kvmpfn merge`` and locked baseline updates."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_helper import check_input_error, run_kvmpfn
from proc_helper import REPO, SLOW_EVENTS, Killer, alive, descendants, holding, slow_trace, start, wait_for

from kvmpfn.mutants import compare
from kvmpfn.replay import ReplayOptions, replay_file
from kvmpfn.runner import RunnerConfig

HEADER = '{"kvmpfn": 1, "guest": {"paging": "none"}}\n'
ACCESS = '{"op": "access", "addr": "0x1000", "write": 1, "user": 0, "fetch": 0}\n'
LIMIT = 60  # seconds any one command may take


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> Path:
    """One slow trace, hard-linked into each test's corpus under the names the test needs."""
    return slow_trace(tmp_path_factory.mktemp("slow") / "slow.jsonl")


def corpus(root: Path, slow: Path, small: list[str], slows: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in small:
        (root / name).write_text(HEADER + ACCESS)
    for name in slows:
        os.link(slow, root / name)
    return root


def finish(proc: subprocess.Popen, timeout: float = LIMIT) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(), err.decode()


def statuses(text: str) -> dict[str, str]:
    return {t["trace"]: t["status"] for t in json.loads(text)["traces"]}


def test_a_worker_killed_mid_run_is_retried_and_the_run_completes(tmp_path, slow):
    corpus(tmp_path / "c", slow, ["a.jsonl", "b.jsonl", "z.jsonl"], ["m-slow.jsonl"])
    proc = start(tmp_path, "audit", "c", "--jobs", "2", "--format", "json")
    killer = Killer("m-slow.jsonl", times=1, root=proc.pid)
    killer.start()
    status, out, err = finish(proc)
    killer.stop.set()
    assert len(killer.killed) == 1
    assert status == 0, err
    doc = json.loads(out)
    assert statuses(out) == dict.fromkeys(["c/a.jsonl", "c/b.jsonl", "c/m-slow.jsonl", "c/z.jsonl"], "pass")
    assert doc["traces"][2]["events"] == SLOW_EVENTS
    assert "Traceback" not in err


def test_a_trace_that_kills_every_worker_is_its_error_and_the_others_run(tmp_path, slow):
    corpus(tmp_path / "c", slow, ["a.jsonl", "b.jsonl", "z.jsonl"], ["m-poison.jsonl"])
    proc = start(tmp_path, "audit", "c", "--jobs", "2", "--format", "json")
    killer = Killer("m-poison.jsonl", times=10, root=proc.pid)
    killer.start()
    status, out, err = finish(proc)
    killer.stop.set()
    assert len(killer.killed) == 2  # once among others, once alone: then it is an error
    assert status == 1, err
    assert statuses(out) == {"c/a.jsonl": "pass", "c/b.jsonl": "pass", "c/m-poison.jsonl": "error", "c/z.jsonl": "pass"}
    (poison,) = [t for t in json.loads(out)["traces"] if t["status"] == "error"]
    assert poison["error"].startswith("c/m-poison.jsonl: the worker replaying it died, and again on the retry")
    assert "Traceback" not in err and "BrokenProcessPool" not in out + err


def test_ctrl_c_cancels_within_a_second_exits_130_with_the_partial_report(tmp_path, slow):
    corpus(tmp_path / "c", slow, ["a0.jsonl", "a1.jsonl"], [f"s{k}.jsonl" for k in range(4)])
    proc = start(tmp_path, "audit", "c", "--jobs", "2")
    # s1 starts only once a0 and a1 are done (two workers, one task each)
    workers = wait_for(lambda: holding("s1.jsonl", descendants(proc.pid)) and descendants(proc.pid))
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    sent = time.monotonic()
    status, out, err = finish(proc, timeout=10)
    assert time.monotonic() - sent < 3
    assert status == 130, err
    assert "PASS     c/a0.jsonl  1 event\nPASS     c/a1.jsonl  1 event\nNOT RUN  c/s0.jsonl" in out
    assert "kvmpfn: interrupted: 2 of 6 traces replayed" in err and "Traceback" not in err
    wait_for(lambda: not alive(workers), timeout=3)


def test_a_second_ctrl_c_exits_at_once(tmp_path, slow):
    corpus(tmp_path / "c", slow, [], [f"s{k}.jsonl" for k in range(4)])
    proc = start(tmp_path, "audit", "c", "--jobs", "2")
    workers = wait_for(lambda: holding("s0.jsonl", descendants(proc.pid)) and descendants(proc.pid))
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    status, _out, err = finish(proc, timeout=10)
    assert status == 130, err
    wait_for(lambda: not alive(workers), timeout=3)


def test_workers_die_with_their_parent_and_do_not_hold_its_stdout(tmp_path, slow):
    corpus(tmp_path / "c", slow, [], [f"s{k}.jsonl" for k in range(4)])
    proc = start(tmp_path, "audit", "c", "--jobs", "2")
    workers = wait_for(lambda: holding("s0.jsonl", descendants(proc.pid)) and descendants(proc.pid))
    # their standard streams are /dev/null, not our pipes (a worker forked a moment ago may still be in its
    # initializer: wait for it)
    wait_for(lambda: all(os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null" for pid in workers for fd in (1, 2)))
    os.kill(proc.pid, signal.SIGKILL)  # what subprocess.run(timeout=...) does: the main process only
    start_ = time.monotonic()
    proc.communicate(timeout=5)  # EOF on both pipes: nobody holds them any more
    assert time.monotonic() - start_ < 5
    wait_for(lambda: not alive(workers), timeout=3)


def test_timeout_is_that_traces_error(tmp_path, slow):
    corpus(tmp_path / "c", slow, ["a.jsonl"], ["s.jsonl"])
    for jobs in ("1", "2"):
        status, out, err = finish(start(tmp_path, "audit", "c", "--jobs", jobs, "--timeout", "0.3", "--format", "json"))
        assert status == 1, err
        doc = json.loads(out)
        assert statuses(out) == {"c/a.jsonl": "pass", "c/s.jsonl": "error"}
        assert doc["traces"][1]["error"] == "c/s.jsonl: timed out after 0.3 s (--timeout)"


def test_a_fifo_in_the_corpus_is_its_error_and_never_blocks(tmp_path, slow):
    root = corpus(tmp_path / "c", slow, ["a.jsonl", "z.jsonl"], [])
    os.mkfifo(root / "m-fifo.jsonl")
    for jobs in ("1", "2"):
        status, out, err = finish(start(tmp_path, "audit", "c", "--jobs", jobs, "--format", "json"))
        assert status == 1, err
        assert statuses(out) == {"c/a.jsonl": "pass", "c/m-fifo.jsonl": "error", "c/z.jsonl": "pass"}
        (fifo,) = [t for t in json.loads(out)["traces"] if t["status"] == "error"]
        assert fifo["error"] == "c/m-fifo.jsonl: not a regular file (a FIFO); refusing to read it"
    alone = run_kvmpfn(tmp_path, "audit", "c/m-fifo.jsonl")
    check_input_error(alone, "c/m-fifo.jsonl: ", None, "not a regular file (a FIFO)")


@pytest.mark.parametrize("kind", ["fifo", "zero", "nested", "surrogate", "huge"])
def test_a_bad_baseline_is_one_line_exit_2(tmp_path, kind):
    root = corpus(tmp_path / "c", Path(), ["a.jsonl"], [])
    base = tmp_path / "b.json"
    if kind == "fifo":
        os.mkfifo(base)
    elif kind == "zero":
        base = Path("/dev/zero")
    elif kind == "nested":
        base.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "surrogate":
        base.write_text('{"version": 1, "traces": {"a.jsonl": {"\\udc80": 1}}}')
    else:
        with open(base, "wb") as fh:
            fh.truncate(65 << 20)
    proc = run_kvmpfn(tmp_path, "audit", str(root), "--baseline", str(base))
    words = {
        "fifo": "not a regular file",
        "zero": "not a regular file",
        "nested": "nested too deeply",
        "surrogate": "lone surrogate",
        "huge": "more than 64 MiB",
    }[kind]
    check_input_error(proc, f"{base}: ", None, words)


def test_jobs_are_clamped_to_the_descriptor_limit_with_a_warning(tmp_path):
    corpus(tmp_path / "c", Path(), [f"t{k:02d}.jsonl" for k in range(16)], [])
    status, out, err = finish(start(tmp_path, "audit", "c", "--jobs", "100", "--format", "json", nofile=64))
    assert status == 0, err
    assert len(statuses(out)) == 16
    assert "kvmpfn: warning: --jobs 16 clamped to" in err and "ulimit -n" in err
    assert "Traceback" not in err


# -- shards, merge, locked baselines ------------------------------------------------------------------------

#: the bundled traces that have findings (the bundled baseline's entries)
FINDINGS = sorted(
    REPO / "traces" / key for key in json.loads((REPO / "traces" / "kvmpfn-baseline.json").read_text())["traces"]
)


def findings_corpus(root: Path) -> Path:
    """Real traces with findings (no baseline: they fail), a broken one, a clean one."""
    root.mkdir(parents=True)
    for path in FINDINGS:
        shutil.copy(path, root / path.name)
    (root / "sub").mkdir()
    (root / "sub" / "broken.jsonl").write_text(HEADER + '{"op": "access", "addr": "zz"}\n')
    (root / "sub" / "clean.jsonl").write_text(HEADER + ACCESS)
    return root


def shard_report(cwd: Path, shard: str, output: str, *more: str) -> subprocess.CompletedProcess:
    return run_kvmpfn(cwd, "audit", "c", "--shard", shard, "--jobs", "1", "--format", "json", "-o", output, *more)


def test_three_shards_merged_are_the_unsharded_report_byte_for_byte(tmp_path):
    findings_corpus(tmp_path / "c")
    for i in (1, 2, 3):
        proc = run_kvmpfn(
            tmp_path, "audit", "c", "--shard", f"{i}/3", "--jobs", "1", "--format", "json", "-o", f"{i}.json"
        )
        assert proc.returncode == 1, proc.stderr
    sizes = [len(json.loads((tmp_path / f"{i}.json").read_text())["traces"]) for i in (1, 2, 3)]
    assert sum(sizes) == len(FINDINGS) + 2 and min(sizes) >= 1
    for fmt in ("json", "sarif", "junit", "text"):
        whole = run_kvmpfn(tmp_path, "audit", "c", "--jobs", "1", "--format", fmt, "-q", "-o", f"whole.{fmt}")
        merged = run_kvmpfn(tmp_path, "merge", "3.json", "1.json", "2.json", "--format", fmt, "-o", f"merged.{fmt}")
        assert whole.returncode == merged.returncode == 1, merged.stderr
        assert (tmp_path / f"merged.{fmt}").read_bytes() == (tmp_path / f"whole.{fmt}").read_bytes(), fmt


def test_merge_refuses_reports_that_do_not_add_up(tmp_path):
    findings_corpus(tmp_path / "c")
    for i in (1, 2, 3):
        shard_report(tmp_path, f"{i}/3", f"{i}.json")
    run_kvmpfn(
        tmp_path, "audit", "c", "--shard", "2/3", "--mmu", "tdp", "--jobs", "1", "--format", "json", "-o", "t.json"
    )
    run_kvmpfn(tmp_path, "audit", "c", "--shard", "1/2", "--jobs", "1", "--format", "json", "-o", "h.json")
    run_kvmpfn(tmp_path, "audit", "c", "--jobs", "1", "--format", "json", "-o", "whole.json")
    doc = json.loads((tmp_path / "3.json").read_text())
    doc["kvmpfn"] = "0.0.1"
    (tmp_path / "old.json").write_text(json.dumps(doc))
    cases = {
        ("1.json", "t.json", "3.json"): '"options" differs from that of 1.json',
        ("1.json", "2.json", "old.json"): '"kvmpfn" differs from that of 1.json',
        ("1.json", "2.json"): "shard 3/3 missing",
        ("1.json", "h.json", "3.json"): "h.json: shard 1/2, but 1.json is one of 3 shards",
        ("1.json", "2.json", "whole.json"): "whole.json: not the report of a shard",
        ("1.json", "1.json", "2.json", "2.json", "3.json"): None,  # the same file twice is one report
    }
    for reports, words in cases.items():
        proc = run_kvmpfn(tmp_path, "merge", *reports, "--format", "json")
        if words is None:
            assert proc.returncode == 1 and len(json.loads(proc.stdout)["traces"]) == len(FINDINGS) + 2
        else:
            check_input_error(proc, "", None, words)


def test_merge_update_baseline_writes_the_unsharded_baseline(tmp_path):
    findings_corpus(tmp_path / "whole")
    assert run_kvmpfn(tmp_path, "audit", "whole", "--update-baseline", "-q").returncode == 1  # the broken trace
    findings_corpus(tmp_path / "c")
    for i in (1, 2, 3):
        shard_report(tmp_path, f"{i}/3", f"{i}.json")
    proc = run_kvmpfn(tmp_path, "merge", "1.json", "2.json", "3.json", "--update-baseline", "-q")
    assert proc.returncode == 1, proc.stderr
    expected = (tmp_path / "whole" / "kvmpfn-baseline.json").read_text()
    assert len(json.loads(expected)["traces"]) == len(FINDINGS)
    assert (tmp_path / "c" / "kvmpfn-baseline.json").read_text() == expected


def test_concurrent_update_baseline_of_two_shards_loses_nothing(tmp_path):
    findings_corpus(tmp_path / "whole")
    run_kvmpfn(tmp_path, "audit", "whole", "--update-baseline", "-q")
    expected = (tmp_path / "whole" / "kvmpfn-baseline.json").read_text()
    for attempt in range(3):
        root = findings_corpus(tmp_path / f"c{attempt}")
        procs = [
            start(tmp_path, "audit", root.name, "--shard", f"{i}/2", "--jobs", "1", "--update-baseline", "-q")
            for i in (1, 2)
        ]
        for proc in procs:
            finish(proc)
        assert (root / "kvmpfn-baseline.json").read_text() == expected, attempt


# -- compare streams -------------------------------------------------------------------------------------


def test_compare_finds_a_divergence_beyond_the_first_chunk_of_records(tmp_path):
    """The runs keep digests only; the first diverging event is found again by re-running the chunk."""
    head = (REPO / "traces" / "variants" / "mmio-pfn.jsonl").read_text().splitlines()
    header = next(line for line in head if line.startswith("{"))
    events = [line for line in head if line.startswith('{"op"')]
    ram = '{"op": "access", "addr": "0x3000", "write": 1, "user": 0, "fetch": 0}'
    trace = tmp_path / "late.jsonl"
    trace.write_text("\n".join([header, *[ram] * 2500, *events]) + "\n")
    a, b = ReplayOptions(kernel="pfn"), ReplayOptions(kernel="pfn-io")
    (diff,) = compare([str(trace)], a, b, RunnerConfig(jobs=1))
    first = diff["first_divergence"]
    assert first["seq"] == 2500 and first["line"] == 2502
    assert (first["a"]["result"], first["b"]["result"]) == ("mmio", "mapped")

    class Lines(list):
        def write(self, text):
            self.append(text)

    full_a, full_b = Lines(), Lines()
    replay_file(str(trace), a, full_a)
    replay_file(str(trace), b, full_b)
    k = next(i for i, (x, y) in enumerate(zip(full_a, full_b, strict=False)) if x != y)
    assert json.loads(full_a[k]) == first["a"] and json.loads(full_b[k]) == first["b"]
