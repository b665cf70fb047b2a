"""`kvmpfn reduce` and `kvmpfn hunt` (issue #20): reductions of synth traces keep their finding in at most 30
events, deterministically; a divergence under --compare is kept; hunts kill easy bugs and are deterministic
for a seed. The full-size figures (20k-event traces, 2-minute hunts of every bug) are in `make bench`."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import pytest
from cli_helper import run_kvmpfn

from kvmpfn.hunt import ProbedBugs, hunt
from kvmpfn.reduce import ddmin, load_trace, replay_events
from kvmpfn.replay import ReplayOptions, replay_file
from kvmpfn.synth import SynthSpec, write_synth

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str):
    proc = run_kvmpfn(ROOT, *args)
    proc.stderr = proc.stderr.decode()
    return proc


@pytest.mark.parametrize(
    ("workload", "bug", "code"),
    [
        ("fork-storm", "same-pfn-no-release", "refcount-leak"),
        ("steady", "prefetch-no-release", "refcount-leak"),
        ("boot", "release-clean-writable", "dirty-lost"),
    ],
)
def test_reduce_keeps_the_finding_in_30_events(tmp_path, workload, bug, code):
    trace = tmp_path / "big.jsonl"
    write_synth(str(trace), SynthSpec(workload, 2000, mmu="shadow"))
    outs = []
    for name in ("a.jsonl", "b.jsonl"):
        proc = run_cli("reduce", str(trace), "--bug", bug, "-o", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]  # deterministic
    text = outs[0].decode()
    assert text.startswith("# reduced by `kvmpfn reduce ") and "from 2000 to " in text
    header, events = load_trace(str(tmp_path / "a.jsonl"))
    assert 1 <= len(events) <= 30
    result = replay_file(str(tmp_path / "a.jsonl"), ReplayOptions(bugs=frozenset({bug})))
    assert result.error is None and code in {f["code"] for f in result.findings}


def test_reduce_keeps_a_chosen_code_and_subject(tmp_path):
    trace = str(ROOT / "traces/mutants/self-map-user-write.jsonl")
    out = tmp_path / "small.jsonl"
    proc = run_cli("reduce", trace, "--bug", "user-fault-unshadow", "--keep", "rmap-mismatch", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    result = replay_file(str(out), ReplayOptions(bugs=frozenset({"user-fault-unshadow"})))
    assert "rmap-mismatch" in {f["code"] for f in result.findings}


def test_reduce_keeps_a_divergence_under_compare(tmp_path):
    trace = str(ROOT / "traces/variants/mmio-pfn.jsonl")
    out = tmp_path / "small.jsonl"
    proc = run_cli("reduce", trace, "--compare", "--kernel pfn", "--kernel pfn-io", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    header, events = load_trace(str(out))
    a = replay_events(header, events, ReplayOptions(kernel="pfn"), records=True)
    b = replay_events(header, events, ReplayOptions(kernel="pfn-io"), records=True)
    assert a.records != b.records or a.by_code() != b.by_code()
    assert len(events) <= len(load_trace(trace)[1])


def test_reduce_refuses_nothing_to_keep_and_its_input(tmp_path):
    trace = tmp_path / "t.jsonl"
    write_synth(str(trace), SynthSpec("steady", 200, mmu="shadow"))
    proc = run_cli("reduce", str(trace), "-o", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 2 and proc.stderr.strip() == "kvmpfn: error: no finding to keep (findings: none)"
    before = trace.read_bytes()
    proc = run_cli("reduce", str(trace), "--bug", "prefetch-no-release", "-o", str(trace))
    assert proc.returncode == 2 and "refusing to overwrite" in proc.stderr
    assert trace.read_bytes() == before


def test_ddmin_finds_a_one_minimal_subset():
    needed = {3, 17, 42}
    calls = itertools.count()

    def keeps(items):
        next(calls)
        return needed <= set(items)

    assert ddmin(list(range(100)), keeps) == [3, 17, 42]
    assert next(calls) < 200


def test_probe_records_where_the_bug_switch_is_tested():
    probe = ProbedBugs(frozenset({"same-pfn-no-release"}), "same-pfn-no-release")
    assert "same-pfn-no-release" in probe and "double-release" not in probe
    assert sum(probe.hits.values()) == 1 and next(iter(probe.hits)).startswith("tests/test_reduce.py:")
    source = (ROOT / "kvmpfn/kvm/mmu.py").read_text().splitlines()
    line = next(i for i, text in enumerate(source, 1) if '"same-pfn-no-release" not in kvm.bugs' in text)
    header, events = load_trace(str(ROOT / "traces/mutants/dirty-log-split-region.jsonl"))
    probe = ProbedBugs(frozenset({"same-pfn-no-release"}), "same-pfn-no-release")
    replay_events(header, events, ReplayOptions(bugs=probe))
    assert set(probe.hits) == {f"kvm/mmu.py:{line}"}


def _counting_clock(step: float = 0.01):
    ticks = itertools.count()
    return lambda: next(ticks) * step


@pytest.mark.parametrize("bug", ["prefetch-no-release", "same-pfn-no-release", "error-pfn-no-release"])
def test_hunt_kills_and_is_deterministic_for_a_seed(bug):
    results = [hunt(bug, seed=1, budget=60.0, clock=_counting_clock()) for _ in range(2)]
    assert results[0].verdict == "killed", results[0].sites
    red = results[0].reduced
    assert (red.header, red.events) == (results[1].reduced.header, results[1].reduced.events)
    clean = replay_events(red.header, red.events, ReplayOptions())
    mutant = replay_events(red.header, red.events, ReplayOptions(bugs=frozenset({bug})))
    assert clean.error is None and clean.findings == [] and mutant.findings


def test_hunt_cli_writes_a_killing_trace(tmp_path):
    out = tmp_path / "found.jsonl"
    proc = run_cli("hunt", "--bug", "double-release", "--budget", "60", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().startswith("# reduced by `kvmpfn hunt --bug double-release --seed 0`")
    assert replay_file(str(out)).findings == []
    assert replay_file(str(out), ReplayOptions(bugs=frozenset({"double-release"}))).findings


def test_hunt_of_a_one_mmu_bug_tries_only_that_mmu():
    """tdp-gpa-32bit applies to tdp alone: without --mmu the hunt generates tdp traces only (it spent two
    thirds of its budget on shadow ones, and 90 s instead of 1 to kill)."""
    result = hunt("tdp-gpa-32bit", seed=0, budget=60)
    assert result.verdict == "killed" and result.reduced.header.mmu == "tdp"
    assert result.candidates < 2000


def test_reduce_cuts_after_the_detecting_event_first():
    """A finding detected by an audit in the middle: everything after it goes in the first replay."""
    from kvmpfn.reduce import choose_goal, reduce_trace
    from kvmpfn.trace import events as ev

    header, events = load_trace(str(ROOT / "traces/mutants/cr0wp-toggle.jsonl"))
    tail = [ev.Invlpg(addr=0x1000 * i) for i in range(500)]
    options = ReplayOptions(bugs=frozenset({"cr0wp-shared-sp"}))
    goal = choose_goal(header, events + tail, options)
    assert (goal.finding["code"], goal.finding["point"]) == ("spte-permission", "audit")
    red = reduce_trace(header, events + tail, goal.test, goal.finding)
    assert red.steps[0] == f"cut after seq {goal.finding['seq']}"
    assert len(red.events) <= len(events) and red.replays < 100
    assert goal.test(red.header, red.events)


def test_hunt_from_a_corpus_starts_with_its_traces(tmp_path):
    """--corpus: the corpus traces are tried first; the hand-written killing trace kills at once."""
    out = tmp_path / "found.jsonl"
    proc = run_cli(
        "hunt", "--bug", "rmap-wp-hugepage-iter", "--corpus", "traces/mutants", "--budget", "60", "-o", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    tried = int(re.search(r"killed by trace (\d+) in ", proc.stderr).group(1))
    assert tried <= len(list((ROOT / "traces/mutants").glob("*.jsonl")))  # one of the corpus traces
    assert replay_file(str(out)).findings == []
    assert replay_file(str(out), ReplayOptions(bugs=frozenset({"rmap-wp-hugepage-iter"}))).findings


# --- refusals before any work -----------------------------------------------------------------------------------


def invoke(*args: str):
    from click.testing import CliRunner

    from kvmpfn.cli import main

    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--bug", "tdp-gpa-32bit", "--mmu", "shadow"], "does nothing under the shadow MMU (it applies to the tdp MMU"),
        (["--bug", "tdp-gpa-32bit", "--base", "--mmu shadow"], "does nothing under the shadow MMU"),
        (["--bug", "pageless-as-normal", "--base", "--kernel page"], "under kernel page (it applies to either MMU"),
        (["--bug", "double-release", "--budget", "0"], "'--budget': 0.0 is not in the range x>0"),
    ],
    ids=["mmu", "base-mmu", "base-kernel", "budget-0"],
)
def test_hunt_refuses_at_once_what_could_only_survive(monkeypatch, tmp_path, args, words):
    """A bug the chosen MMU or kernel never compiles in, or no time at all: a usage error before any search."""
    monkeypatch.setattr("kvmpfn.hunt.hunt", lambda *a, **k: pytest.fail("hunted"))
    res = invoke("hunt", *args, "-o", str(tmp_path / "found.jsonl"))
    assert res.exit_code == 2 and words in res.stderr, res.stderr
    assert len(res.stderr.splitlines()) == 1


def test_hunt_says_where_its_bug_check_was_reached(tmp_path):
    out = tmp_path / "found.jsonl"
    res = invoke("hunt", "--bug", "double-release", "--budget", "60", "-o", str(out))
    assert res.exit_code == 0, res.stderr
    assert re.search(r"the --bug check was reached at kvm/mmu\.py:\d+, \d+ times?\)", res.stderr), res.stderr


def test_reduce_and_hunt_check_the_output_before_any_work(monkeypatch, tmp_path):
    """An output in a directory that does not exist fails first, naming the output (not a temporary file)."""
    monkeypatch.setattr("kvmpfn.reduce.load_trace", lambda *a: pytest.fail("reduced"))
    monkeypatch.setattr("kvmpfn.hunt.hunt", lambda *a, **k: pytest.fail("hunted"))
    out = str(tmp_path / "no-such-dir" / "x.jsonl")
    trace = str(ROOT / "traces/findings/refcount-leak.jsonl")
    for args in (["reduce", trace, "--bug", "same-pfn-no-release"], ["hunt", "--bug", "double-release"]):
        res = invoke(*args, "-o", out)
        assert res.exit_code == 2 and res.stderr == f"kvmpfn: error: {out}: no such file or directory\n", res.stderr


def test_write_reduced_names_the_output_when_its_directory_is_gone(tmp_path):
    from kvmpfn.errors import KvmpfnError
    from kvmpfn.reduce import Reduction, write_reduced

    header, events = load_trace(str(ROOT / "traces/findings/refcount-leak.jsonl"))
    out = str(tmp_path / "gone" / "x.jsonl")
    with pytest.raises(KvmpfnError, match=re.escape(f"{out}: no such file or directory")):
        write_reduced(out, Reduction(header, events, len(events), 1), [], "comment")


def test_write_reduced_gives_a_new_file_the_umasks_mode_and_keeps_an_old_ones(tmp_path):
    from kvmpfn.reduce import Reduction, write_reduced

    header, events = load_trace(str(ROOT / "traces/findings/refcount-leak.jsonl"))
    red = Reduction(header, events, len(events), 1)
    old = os.umask(0o022)
    try:
        write_reduced(str(tmp_path / "new.jsonl"), red, [], "comment")
        kept = tmp_path / "kept.jsonl"
        kept.write_text("")
        kept.chmod(0o640)
        write_reduced(str(kept), red, [], "comment")
    finally:
        os.umask(old)
    assert (tmp_path / "new.jsonl").stat().st_mode & 0o777 == 0o644
    assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_text().startswith("# comment")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.jsonl", "new.jsonl"]  # no temporary file left


def test_hunt_mutations_never_remap_a_gfn_beyond_every_gfn():
    """A paging-none guest may hold an access spliced in from a paging trace (a gva above 2**52): the host-remap
    mutation must not turn it into an invalid event (it crashed hunt once)."""
    import random

    from kvmpfn.hunt import Candidate, GuestGen, _mutate
    from kvmpfn.trace import events as ev

    header = ev.Header(kvmpfn=1, guest=ev.Guest(paging="none", cr3=0))
    high = ev.Access(addr=0xFFFF800000000000, write=False, user=False, fetch=False)
    cand = Candidate(header, [high, high])
    for seed in range(400):  # raised FieldError (gfn out of range) before
        rng = random.Random(seed)
        out = _mutate(rng, GuestGen(rng), cand, [])
        assert all(e.gfn < ev.GFN_LIMIT for e in out.events if isinstance(e, ev.HostRemap))
    low = ev.Access(addr=0x5000, write=False, user=False, fetch=False)
    assert any(
        isinstance(e, ev.HostRemap) and e.gfn == 5
        for seed in range(400)
        for e in _mutate(random.Random(seed), GuestGen(random.Random(seed)), Candidate(header, [low]), []).events
    )
