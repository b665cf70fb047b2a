"""The compiled simulator (setup.py, kvmpfn/native.py) is the one an install runs, and it behaves exactly as
the pure-Python sources the other tests run (tests/conftest.py sets KVMPFN_PURE=1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpfn import native

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "kvmpfn" / "_compiled_sources.py"
pytestmark = pytest.mark.skipif(not RECORD.exists(), reason="installed with KVMPFN_PURE_PYTHON=1: nothing was compiled")


def _child(*args: str, pure: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "KVMPFN_PURE"}
    if pure:
        env["KVMPFN_PURE"] = "1"
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_an_install_runs_the_compiled_simulator():
    out = _child("-c", "import kvmpfn.native as n, kvmpfn.kvm.mmu as m; print(n.MODE, n.STALE, m.__file__)", pure=False)
    mode, stale, path = out.split()
    assert (mode, stale) == ("compiled", "None"), "a source changed since the build: run `make install`"
    assert path.endswith(".so")


@pytest.mark.parametrize(("pure", "stale"), [(False, False), (True, False), (False, True)])
def test_the_reader_rewrites_hex_in_c_unless_unhex_c_changed(pure, stale):
    """KVMPFN_PURE runs the simulator's sources, not the Python twin of _unhex.c; an edited source does."""
    code = "import kvmpfn.native as n;" + (" n.STALE = 'trace/_unhex.c changed';" if stale else "")
    code += "import kvmpfn.trace.reader as r, kvmpfn.trace.unhex as u; print(r.unhex is u.unhex_py)"
    assert _child("-c", code, pure=pure).split() == [str(stale)]


def test_the_tests_run_the_sources():
    import kvmpfn.kvm.mmu

    assert native.MODE == "pure" and kvmpfn.kvm.mmu.__file__.endswith("mmu.py")


def test_compiled_and_pure_produce_the_same_records_and_findings():
    args = ("tests/compiled_helper.py", "12", "traces")
    compiled, pure = _child(*args, pure=False), _child(*args, pure=True)
    assert compiled.splitlines()[0] == '{"mode": "compiled"}' and pure.splitlines()[0] == '{"mode": "pure"}'
    a, b = compiled.splitlines()[1:], pure.splitlines()[1:]
    assert len(a) == len(b) > 100
    assert any('"code"' in line for line in a)  # findings were compared, not only clean runs
    for line_a, line_b in zip(a, b, strict=True):
        assert line_a == line_b


@pytest.mark.parametrize("edited", ["kvm/mmu.py", "trace/_unhex.c"])
def test_a_changed_source_sets_the_compiled_modules_aside(monkeypatch, edited):
    monkeypatch.delenv("KVMPFN_PURE")
    digest = native._digest
    monkeypatch.setattr(native, "_digest", lambda rel: "edited" if rel == edited else digest(rel))
    before = list(sys.meta_path)
    try:
        assert native._choose() == ("pure", f"{edited} changed since it was compiled")
        finder = sys.meta_path[0]
        assert finder not in before
        assert finder.find_spec("kvmpfn.kvm.mmu").origin.endswith("kvm/mmu.py")
        assert finder.find_spec("kvmpfn.audit").submodule_search_locations[0].endswith("audit")
        assert finder.find_spec("kvmpfn.replay") is None  # not compiled: found as usual
    finally:
        sys.meta_path[:] = before
    monkeypatch.undo()
    assert native._choose() == ("pure", None) and sys.meta_path[0] is not before[0]  # KVMPFN_PURE: asked for
    sys.meta_path[:] = before


def test_a_new_source_sets_the_compiled_modules_aside(monkeypatch):
    monkeypatch.delenv("KVMPFN_PURE")
    sources = native._sources
    monkeypatch.setattr(native, "_sources", lambda packages: [*sources(packages), "kvm/new.py"])
    before = list(sys.meta_path)
    try:
        assert native._choose() == ("pure", "kvm/new.py is new since the build")
    finally:
        sys.meta_path[:] = before


def test_the_cli_says_when_it_runs_an_edited_source():
    code = (
        "import kvmpfn.native as n; n.STALE = 'kvm/mmu.py changed since it was compiled';"
        "from kvmpfn.cli import main; main(['codes', 'refcount-leak'])"
    )
    env = {**os.environ, "KVMPFN_PURE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith("kvmpfn: warning: kvm/mmu.py changed since it was compiled: running the pure-Python")
