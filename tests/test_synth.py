"""kvmpfn synth: every workload replays clean under both MMUs, the bytes are deterministic, generation streams,
compression round trips, and shadow and tdp agree on what the guest sees."""

from __future__ import annotations

import gzip
import io
import json
import os
import tracemalloc

import pytest
import zstandard
from click.testing import CliRunner

from kvmpfn.cli import main
from kvmpfn.replay import ReplayOptions, replay_file
from kvmpfn.synth import PAGINGS, WORKLOADS, SynthError, SynthSpec, synth_events, synth_header, write_synth
from kvmpfn.trace import open_trace

MMUS = ("shadow", "tdp")
PAGED = [
    (workload, paging)
    for workload in WORKLOADS
    for paging in PAGINGS
    if not (workload == "fork-storm" and paging == "none")
]


def _replay(path: str, mmu: str | None = None, audit_every: int = 0, emit=None):
    result = replay_file(str(path), ReplayOptions(mmu=mmu, audit_every=audit_every), emit)
    assert result.error is None, result.error
    return result


def _findings(result) -> list[tuple]:
    return [(f["code"], f["seq"], f.get("message")) for f in result.findings]


@pytest.mark.parametrize("mmu", MMUS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_workload_replays_clean(tmp_path, workload: str, mmu: str) -> None:
    path = tmp_path / "t.jsonl"
    assert write_synth(str(path), SynthSpec(workload, 2000, seed=5, mmu=mmu), validate=True) == 2000
    result = _replay(path, audit_every=200)
    assert result.events == 2000
    assert _findings(result) == []


@pytest.mark.parametrize(("workload", "paging"), PAGED)
def test_every_paging_mode_replays_clean_under_both_mmus(tmp_path, workload: str, paging: str) -> None:
    path = tmp_path / "t.jsonl"
    write_synth(str(path), SynthSpec(workload, 1200, seed=11, paging=paging), validate=True)
    for mmu in MMUS:
        assert _findings(_replay(path, mmu=mmu, audit_every=300)) == [], mmu


@pytest.mark.parametrize(("workload", "paging"), PAGED)
def test_shadow_and_tdp_agree_on_what_the_guest_sees(tmp_path, workload: str, paging: str) -> None:
    """One guest-action trace: the same guest faults (error codes) and the same gpa for every access that
    reached memory, under both MMUs."""
    path = tmp_path / "t.jsonl"
    write_synth(str(path), SynthSpec(workload, 1500, seed=2, paging=paging))
    seen = {}
    for mmu in MMUS:
        out = io.StringIO()
        _replay(path, mmu=mmu, emit=out)
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        seen[mmu] = (
            [(r["seq"], r.get("err"), r.get("vector")) for r in records if r["result"] == "guest_fault"],
            {r["seq"]: r["gpa"] for r in records if r["op"] == "access" and r["result"] in ("mapped", "hit")},
        )
    (faults_s, gpas_s), (faults_t, gpas_t) = seen["shadow"], seen["tdp"]
    assert faults_s == faults_t
    common = gpas_s.keys() & gpas_t.keys()
    assert common
    assert {s: gpas_s[s] for s in common} == {s: gpas_t[s] for s in common}


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, workload: str) -> None:
    paths = [tmp_path / name for name in ("a.jsonl", "b.jsonl", "c.jsonl")]
    write_synth(str(paths[0]), SynthSpec(workload, 3000, seed=1))
    write_synth(str(paths[1]), SynthSpec(workload, 3000, seed=1))
    write_synth(str(paths[2]), SynthSpec(workload, 3000, seed=2))
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b
    assert a != c


def test_mmu_changes_only_the_header(tmp_path) -> None:
    shadow, tdp = tmp_path / "s.jsonl", tmp_path / "t.jsonl"
    write_synth(str(shadow), SynthSpec("fork-storm", 2000, seed=4, mmu="shadow"))
    write_synth(str(tdp), SynthSpec("fork-storm", 2000, seed=4, mmu="tdp"))
    s_lines, t_lines = shadow.read_bytes().splitlines(), tdp.read_bytes().splitlines()
    assert s_lines[0] != t_lines[0]
    assert s_lines[1:] == t_lines[1:]
    assert json.loads(t_lines[0])["mmu"] == "tdp"


def test_exactly_the_requested_number_of_events() -> None:
    """The generators are endless; the count cuts them: exactly N events (0: the header alone)."""
    for workload in WORKLOADS:
        assert sum(1 for _ in synth_events(SynthSpec(workload, 777, seed=9))) == 777
        assert list(synth_events(SynthSpec(workload, 0))) == []


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_compressed_outputs_round_trip(tmp_path, suffix: str) -> None:
    spec = SynthSpec("hugepages", 2500, seed=3, mmu="tdp", paging="64")
    plain, packed = tmp_path / "p.jsonl", tmp_path / f"t{suffix}"
    write_synth(str(plain), spec)
    write_synth(str(packed), spec)
    raw = packed.read_bytes()
    if suffix == ".jsonl.gz":
        raw = gzip.decompress(raw)
    elif suffix == ".jsonl.zst":
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    assert raw == plain.read_bytes()
    with open_trace(str(packed)) as reader:
        assert reader.header == synth_header(spec)
        decoded = [event for _, event in reader]
    assert decoded == list(synth_events(spec))
    again = tmp_path / f"again{suffix}"
    write_synth(str(again), spec)
    assert again.read_bytes() == packed.read_bytes()


def _peak(spec: SynthSpec) -> int:
    tracemalloc.start()
    try:
        write_synth(os.devnull, spec)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_generation_streams_in_bounded_memory() -> None:
    """200k steady events (the workload with the largest state: a 4,096-page resident set) to /dev/null: the
    traced peak stays under 1 MiB, less than one pointer per event, so nothing is kept per event."""
    peak = _peak(SynthSpec("steady", 200_000, seed=1))
    assert peak < 2**20, peak


@pytest.mark.parametrize("workload", [w for w in WORKLOADS if w != "steady"])
def test_other_workloads_stream_too(workload: str) -> None:
    assert _peak(SynthSpec(workload, 40_000, seed=1)) < 2**20


def test_bad_combinations_are_refused() -> None:
    with pytest.raises(SynthError, match="fork-storm needs guest page tables"):
        synth_header(SynthSpec("fork-storm", 10, paging="none"))
    with pytest.raises(SynthError, match="unknown workload"):
        synth_header(SynthSpec("nope", 10))
    with pytest.raises(SynthError, match="unknown paging"):
        list(synth_events(SynthSpec("steady", 10, paging="48")))


def test_remap_churn_runs_under_notifier_and_hugepages_declares_a_hugetlb_slot() -> None:
    assert synth_header(SynthSpec("remap-churn", 10)).kernel == "notifier"
    slots = synth_header(SynthSpec("hugepages", 10)).memslots
    assert [s.backing for s in slots] == ["ram", "hugetlb"]
    assert synth_header(SynthSpec("boot", 10, paging="pae")).guest.paging == "none"  # boot starts in real mode


def test_cli_writes_the_same_bytes_as_the_library(tmp_path) -> None:
    out = tmp_path / "c.jsonl.zst"
    runner = CliRunner()
    result = runner.invoke(
        main, ["synth", "--workload", "steady", "--events", "500", "--seed", "3", "--mmu", "tdp", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    ref = tmp_path / "r.jsonl.zst"
    write_synth(str(ref), SynthSpec("steady", 500, seed=3, mmu="tdp"))
    assert out.read_bytes() == ref.read_bytes()
    stdout = runner.invoke(main, ["synth", "--workload", "boot", "--events", "5", "--paging", "32", "-o", "-"])
    assert stdout.exit_code == 0
    lines = stdout.output.splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["kvmpfn"] == 1


def test_cli_errors_exit_2(tmp_path) -> None:
    runner = CliRunner()
    bad = runner.invoke(
        main, ["synth", "--workload", "fork-storm", "--paging", "none", "-o", str(tmp_path / "x.jsonl")]
    )
    assert bad.exit_code == 2
    assert "fork-storm needs guest page tables" in bad.output
    assert not (tmp_path / "x.jsonl").exists()
    missing = runner.invoke(main, ["synth", "--workload", "boot", "-o", str(tmp_path / "no" / "x.jsonl")])
    assert missing.exit_code == 2
    assert "no such file or directory" in missing.output


# A 2008 livelock that the hugepages workload steers around (see kvmpfn.synth._hugepages): the era's
# kvm_mmu_slot_remove_write_access clears W in table pointers too (docs/kernel.md, Dirty logging), and neither
# __direct_map nor FNAME(fetch) restores W on a present pointer, so after a dirty-log harvest every store through a 4K
# table under a level-2 page that holds a large leaf of the slot exits forever.
LIVELOCK = """\
{"kvmpfn":1,"mmu":"tdp","guest":{"paging":"none"},"memslots":[{"slot":1,"gfn":"0x40000","npages":"0x8000","backing":"hugetlb"}]}
{"op":"access","addr":"0x40200000","write":false,"user":true,"fetch":false}
{"op":"dirty_log","slot":1}
{"op":"access","addr":"0x40000000","write":true,"user":true,"fetch":false}
{"op":"dirty_log","slot":1}
{"op":"access","addr":"0x40000000","write":true,"user":true,"fetch":false}
"""


@pytest.mark.parametrize("mmu", MMUS)
def test_dirty_log_harvest_after_a_4k_split_does_not_livelock(tmp_path, mmu: str) -> None:
    path = tmp_path / "livelock.jsonl"
    path.write_text(LIVELOCK)
    assert _findings(_replay(path, mmu=mmu)) == []
