"""The HTML report (issue #15): self-contained (no script, no network: a Content-Security-Policy forbids
every request), every finding with its provenance and explain history, the plots; loaded in a real headless
browser (Debian's chromium, installed by ``make browser``): no console message, no request leaving the file,
a screenshot that is not blank."""

from __future__ import annotations

import json
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmpfn.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
FINDINGS = ROOT / "traces" / "findings"
LEAK = str(FINDINGS / "refcount-leak.jsonl")

#: chromium's own background services (updates, sign-in, spelling) off, so the net log holds the page's requests
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--enable-logging=stderr",
    "--v=0",
    "--window-size=1200,1400",
]


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium on this machine and `make browser` could not install it (needs root and apt)")


def load(page: Path, tmp: Path) -> tuple[list[str], list[str], bytes]:
    """Open ``page`` in headless chromium: its console messages, the URLs the page itself requested (from
    chromium's net log, by the file:// isolation key of the page's requests), and a screenshot (PNG bytes)."""
    netlog, shot = tmp / f"{page.stem}.netlog.json", tmp / f"{page.stem}.png"
    proc = subprocess.run(
        [browser(), *CHROMIUM_FLAGS, f"--log-net-log={netlog}", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert shot.exists(), proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    requested = set()
    for event in json.loads(netlog.read_text())["events"]:
        params = event.get("params") or {}
        url = params.get("url", "")
        if "file://" in str(params.get("network_isolation_key", "")) and not url.startswith(("file:", "data:")):
            requested.add(url)
    return console, sorted(requested), shot.read_bytes()


def distinct_rows(png: bytes) -> int:
    """How many different (filtered) pixel rows the PNG has: a blank page has one or two."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, bpp = 8, b"", 0, 4
    while pos < len(png):
        length = int.from_bytes(png[pos : pos + 4], "big")
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, colour = int.from_bytes(data[:4], "big"), data[9]
            bpp = {2: 3, 6: 4, 0: 1, 4: 2}[colour]
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + width * bpp
    return len({raw[i : i + stride] for i in range(0, len(raw), stride)})


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("html")
    replay_html, audit_html = tmp / "replay.html", tmp / "audit.html"
    res = CliRunner().invoke(cli_main, ["replay", LEAK, "--bug", "same-pfn-no-release", "--html", str(replay_html)])
    assert res.exit_code == 1, res.output
    res = CliRunner().invoke(cli_main, ["audit", str(ROOT / "traces"), "--format", "html", "-o", str(audit_html), "-q"])
    assert res.exit_code == 0, res.output
    return {"replay": replay_html, "audit": audit_html, "tmp": tmp}


def test_replay_report_content(reports):
    html = reports["replay"].read_text()
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert 'id="trace-f1"' in html and 'href="#trace-f1"' in html  # the finding and its marker on the plot
    assert "reference taken at line 15 (seq 2) by gfn_to_pfn in tdp_page_fault" in html  # provenance
    assert "never given back" in html and 'class="fault"' in html  # its explain history, the fault marked
    assert html.count("<svg") == 3  # gauges over events, faults per gpa, results per kind


def test_audit_report_of_the_corpus(reports):
    """The gate's table (every trace), a section for each trace with findings, all under 5 MB."""
    html = reports["audit"].read_text()
    assert len(html.encode()) < 5_000_000
    from kvmpfn.gate import discover

    assert html.count("<tr><td") == len(discover([str(ROOT / "traces")])) > 50
    assert '<a href="#t' in html and "findings/spte-hpa-mismatch.jsonl" in html
    assert html.count('class="finding"') >= 3 and "<script" not in html and "https://" not in html


@pytest.mark.parametrize("name", ["replay", "audit"])
def test_report_in_headless_chromium(reports, name):
    console, requested, png = load(reports[name], reports["tmp"])
    assert console == [] and requested == []
    assert distinct_rows(png) > 50
    assert len(png) > 20_000


def test_browser_checks_can_fail(tmp_path):
    """Controls: a page that requests a remote image and logs to the console is caught by both checks."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img src="http://example.invalid/x.png">'
        '<script>console.error("boom")</script></body></html>'
    )
    console, requested, png = load(page, tmp_path)
    assert any("boom" in line for line in console)
    assert requested == ["http://example.invalid/x.png"]
    assert distinct_rows(png) < 50
