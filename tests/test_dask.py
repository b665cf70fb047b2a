"""The dask.distributed executor through the real command line: one LocalCluster (2 worker processes on the
loopback interface) for the module, reached with ``--scheduler``; ``--executor dask`` alone starts its own.
Output is byte-identical to a local ``--jobs 1`` run, a worker killed mid-run costs a retry, a trace that kills
every worker is that trace's error, Ctrl-C exits 130 and leaves no process behind."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import dask
import distributed
import pytest
from proc_helper import Killer, alive, descendants, holding, slow_trace, start, wait_for
from test_elfcore import _guest_pair
from test_runner import FINDINGS, HEADER, finish, statuses

MEMORY = 4 << 30  # address space for a command that starts dask workers


@pytest.fixture(scope="module")
def scheduler():
    """A LocalCluster of two worker processes; a task whose worker dies twice is given up (KilledWorker)."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cluster = distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            scheduler_kwargs={"dashboard": False},
            silence_logs=logging.CRITICAL,
        )
    yield cluster.scheduler_address
    cluster.close()


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> Path:
    return slow_trace(tmp_path_factory.mktemp("slow") / "slow.jsonl")


def mixed_corpus(root: Path) -> Path:
    """Traces with findings, a broken one, a compressed clean one, one whose memory is an ELF core."""
    root.mkdir(parents=True)
    for path in FINDINGS:
        (root / path.name).write_bytes(path.read_bytes())
    (root / "sub").mkdir()
    (root / "sub" / "broken.jsonl").write_text(HEADER + '{"op": "access", "addr": "zz"}\n')
    import gzip

    (root / "sub" / "clean.jsonl.gz").write_bytes(gzip.compress(HEADER.encode(), mtime=0))
    (root / "core").mkdir()
    _guest_pair(root / "core", "64", 64)  # core/a.jsonl names guest.core; core/b.jsonl has the writes instead
    return root


def test_dask_output_is_byte_identical_to_local_jobs_1(tmp_path, scheduler):
    mixed_corpus(tmp_path / "c")
    runs = {
        "local": ("--jobs", "1"),
        "shipped": ("--scheduler", scheduler),
        "shared-fs": ("--scheduler", scheduler, "--shared-fs"),
    }
    for fmt in ("junit", "json"):  # sarif and text render the same report object as these
        outputs = {}
        for name, how in runs.items():
            status, out, err = finish(start(tmp_path, "audit", "c", *how, "--format", fmt, memory=MEMORY))
            assert status == 1 and not err, (name, err)
            outputs[name] = out
        assert outputs["shipped"] == outputs["local"] == outputs["shared-fs"], fmt
    doc = json.loads(outputs["shipped"])  # the last format run: json
    core = {t["trace"]: t for t in doc["traces"]}["c/core/a.jsonl"]
    assert core["status"] == "pass" and core["events"] == 10  # the image went along with the trace


def test_executor_dask_starts_its_own_local_cluster(tmp_path):
    mixed_corpus(tmp_path / "c")
    local = finish(start(tmp_path, "audit", "c", "--jobs", "1", "--format", "json"))
    own = start(tmp_path, "audit", "c", "--executor", "dask", "--jobs", "2", "--format", "json", memory=MEMORY)
    status, out, err = finish(own)
    assert (status, out) == local[:2] and not err
    mutants_local = finish(
        start(tmp_path, "mutants", "c", "--jobs", "1", "--bug", "double-release", "--format", "json")
    )
    mutants_dask = finish(
        start(
            tmp_path,
            "mutants",
            "c",
            "--executor",
            "dask",
            "--jobs",
            "2",
            "--bug",
            "double-release",
            "--format",
            "json",
            memory=MEMORY,
        )
    )
    assert mutants_dask[:2] == mutants_local[:2] and not mutants_dask[2]


def test_a_killed_dask_worker_is_retried_and_the_run_completes(tmp_path, scheduler, slow):
    (tmp_path / "c").mkdir()
    for name in ("a.jsonl", "z.jsonl"):
        (tmp_path / "c" / name).write_text(HEADER)
    os.link(slow, tmp_path / "c" / "m-dslow.jsonl")
    proc = start(tmp_path, "audit", "c", "--scheduler", scheduler, "--format", "json", memory=MEMORY)
    killer = Killer("m-dslow.jsonl", times=1, root=os.getpid(), spare=proc.pid)  # a worker of the cluster
    killer.start()
    status, out, err = finish(proc)
    killer.stop.set()
    assert len(killer.killed) == 1
    assert status == 0, err
    assert statuses(out) == dict.fromkeys(["c/a.jsonl", "c/m-dslow.jsonl", "c/z.jsonl"], "pass")


def test_a_trace_that_kills_every_dask_worker_is_its_error(tmp_path, scheduler, slow):
    (tmp_path / "c").mkdir()
    for name in ("a.jsonl", "z.jsonl"):
        (tmp_path / "c" / name).write_text(HEADER)
    os.link(slow, tmp_path / "c" / "m-dpoison.jsonl")
    proc = start(tmp_path, "audit", "c", "--scheduler", scheduler, "--format", "json", memory=MEMORY)
    killer = Killer("m-dpoison.jsonl", times=10, root=os.getpid(), spare=proc.pid)
    killer.start()
    status, out, err = finish(proc)
    killer.stop.set()
    # the scheduler's one retry, then KilledWorker; again when the runner runs it alone
    assert len(killer.killed) == 4
    assert status == 1, err
    assert statuses(out) == {"c/a.jsonl": "pass", "c/m-dpoison.jsonl": "error", "c/z.jsonl": "pass"}
    (poison,) = [t for t in json.loads(out)["traces"] if t["status"] == "error"]
    assert poison["error"].startswith("c/m-dpoison.jsonl: the worker replaying it died")


def test_ctrl_c_with_a_local_cluster_exits_130_and_leaves_no_process(tmp_path, slow):
    (tmp_path / "c").mkdir()
    for k in range(4):
        os.link(slow, tmp_path / "c" / f"d{k}.jsonl")
    proc = start(tmp_path, "audit", "c", "--executor", "dask", "--jobs", "2", memory=MEMORY)
    below = wait_for(lambda: holding("d0.jsonl", descendants(proc.pid)) and descendants(proc.pid))
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    status, out, err = finish(proc, timeout=20)
    assert status == 130, err
    assert time.monotonic() - sent < 10
    assert "NOT RUN  c/d0.jsonl" in out and "kvmpfn: interrupted: 0 of 4 traces replayed" in err
    wait_for(lambda: not alive(below), timeout=5)


def test_local_cluster_workers_die_with_the_command(tmp_path, slow):
    (tmp_path / "c").mkdir()
    for k in range(4):
        os.link(slow, tmp_path / "c" / f"e{k}.jsonl")
    proc = start(tmp_path, "audit", "c", "--executor", "dask", "--jobs", "2", memory=MEMORY)
    below = wait_for(lambda: holding("e0.jsonl", descendants(proc.pid)) and descendants(proc.pid))
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)  # EOF on both pipes: no worker holds them
    assert below and wait_for(lambda: not alive(below), timeout=5)


def test_missing_dask_is_one_line_exit_2(tmp_path):
    fake = tmp_path / "fake"
    (fake / "distributed").mkdir(parents=True)
    (fake / "distributed" / "__init__.py").write_text("raise ImportError('no distributed here')\n")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text(HEADER)
    status, out, err = finish(start(tmp_path, "audit", "c", "--executor", "dask", pythonpath=f"{fake}{os.pathsep}"))
    assert status == 2 and out == ""
    assert err == "kvmpfn: error: --executor dask needs dask.distributed: pip install 'kvmpfn[dask]'\n"


def test_a_malformed_scheduler_address_is_one_line_exit_2(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text(HEADER)
    status, out, err = finish(start(tmp_path, "audit", "c", "--scheduler", "bogus"))
    assert (status, out) == (2, "")
    assert err == "kvmpfn: error: --scheduler 'bogus': expected an address like tcp://HOST:PORT\n"
