"""``kvmpfn convert`` and ``kvmpfn check``: real tracepoint text in, a trace or recorded-check findings out.

Two click command objects; ``kvmpfn.cli`` registers them with ``main.add_command``. The work lives in
:mod:`kvmpfn.trace.ftrace`, :mod:`kvmpfn.audit.recorded` and :mod:`kvmpfn.host.elfcore`.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from typing import Any

import click

from kvmpfn.cli.options import fail as _fail
from kvmpfn.cli.options import report_options

TRACE_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PAGING = ("none", "32", "pae", "64")


@click.command("convert")
@click.argument("text", metavar="TEXT")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The trace to write.")
@click.option("--mmu", type=click.Choice(["shadow", "tdp"]), help="Instead of the guess from the text.")
@click.option("--paging", type=click.Choice(PAGING), help="Guest paging mode instead of the guess.")
@click.option(
    "--memory",
    type=click.Path(dir_okay=False),
    help="An ELF core of guest memory (QEMU dump-guest-memory) to name in the header; its CPU state gives "
    "the guest paging state the text does not show.",
)
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
def convert(text: str, output: str, mmu, paging, memory, quiet: bool) -> None:
    """Convert kvm/kvmmmu tracepoint TEXT (tracefs trace or trace_pipe, trace-cmd report; - for stdin) into
    a kvmpfn trace. Unknown events are counted and skipped; a summary of what was used goes to stderr.

    Exit status: 0 converted, 2 input error.
    """
    from kvmpfn.host.elfcore import ElfCoreError, ElfCoreImage
    from kvmpfn.report.progress import progress
    from kvmpfn.trace.ftrace import TextTraceError, convert_text

    guest = None
    header_memory = None
    if memory is not None:
        try:
            with ElfCoreImage(memory) as image:
                state = image.cpu_state()
        except ElfCoreError as err:
            _fail(err.message)
        guest = None if state is None else state["guest"]
        out_dir = os.path.dirname(os.path.abspath(output))
        header_memory = os.path.relpath(os.path.abspath(memory), out_dir)
    from kvmpfn.outputs import refuse_inputs

    refuse_inputs(output, [text, memory])
    try:
        with progress("converting", unit="records") as update:
            summary = convert_text(
                text,
                output,
                mmu=mmu,
                paging=paging,
                memory=header_memory,
                guest=guest,
                progress=lambda done, total: update(done, f"of {total:,}"),
            )
    except TextTraceError as err:
        _fail(str(err))
    except BrokenPipeError:
        raise  # the reader of standard output went away: the boundary exits quietly
    except OSError as err:
        _fail(f"{output}: {(err.strerror or str(err)).lower()}")
    if not quiet:
        click.echo(summary.text(output), err=True, nl=False)


def _check_trace(path: str, limits: dict[str, int]) -> tuple[list[dict], int, str | None]:
    """Run the recorded checks over the ``x`` annotations of a converted trace."""
    from kvmpfn.audit.findings import Findings
    from kvmpfn.audit.recorded import RecordedChecks
    from kvmpfn.trace.reader import TraceError, open_trace

    findings = Findings()
    checks = RecordedChecks(findings, **limits)
    try:
        with open_trace(path) as reader:
            checks.mmu = reader.header.mmu
            for seq, (line, event) in enumerate(reader):
                findings.seq, findings.line = seq, line
                checks.observe(event.x)
    except TraceError as err:
        return findings.items, checks.records, str(err)
    if not checks.records:
        return (
            [],
            0,
            f"{path}: no recorded tracepoint in it (x.recorded): check reads tracepoint text, or a trace "
            "that kvmpfn convert wrote",
        )
    checks.finish()
    return findings.items, checks.records, None


def _check_text(path: str, mmu: str | None, limits: dict[str, int]) -> tuple[list[dict], int, str | None]:
    """Run the recorded checks directly over tracepoint text."""
    from kvmpfn.audit.findings import Findings
    from kvmpfn.audit.recorded import RecordedChecks
    from kvmpfn.trace.ftrace import NO_RECORDS, TextTrace, TextTraceError

    findings = Findings()
    try:
        with TextTrace(path) as text:
            if not text.scan.records:
                raise TextTraceError(text.display, None, NO_RECORDS)
            checks = RecordedChecks(findings, mmu=mmu or text.scan.mmu, **limits)
            for seq, item in enumerate(text.items(mmu)):
                checks.feed(item.record, seq, item.record["line"])
    except TextTraceError as err:
        return findings.items, 0, str(err)
    checks.finish()
    return findings.items, checks.records, None


CHECK_SUFFIXES = (*TRACE_SUFFIXES, ".txt")


def _check_paths(paths: tuple[str, ...]) -> list[str]:
    """The files to check: files as given, and below each directory the converted traces and ``*.txt``."""
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, name)
                for root, _dirs, names in os.walk(path)
                for name in names
                if name.endswith(CHECK_SUFFIXES)
            )
            if not found:
                _fail(f"{path}: no tracepoint text (*.txt) or converted trace ({', '.join(TRACE_SUFFIXES)}) in it")
            files += found
        else:
            files.append(path)
    return files


@click.command("check")
@click.argument("paths", nargs=-1, required=True, metavar="TEXT...")
@click.option("--mmu", type=click.Choice(["shadow", "tdp"]), help="What the recorded addresses are (text only).")
@click.option(
    "--fault-loop-min",
    type=click.IntRange(min=2),
    default=8,
    show_default=True,
    help="Faults at one address with nothing changing its spte that make a fault-loop.",
)
@click.option(
    "--spurious-loop-min",
    type=click.IntRange(min=2),
    default=3,
    show_default=True,
    help="Spurious fast_page_fault records (old == new spte) at one address that make a fault-loop.",
)
@report_options("text", "json")
def check(
    paths: tuple[str, ...],
    mmu,
    fault_loop_min: int,
    spurious_loop_min: int,
    fmt: str,
    output,
    quiet: bool,
    verbose: bool,
) -> None:
    """Check recorded kvm/kvmmmu tracepoints for fault loops and spte inconsistencies. Each TEXT is tracepoint
    text (as convert reads it; - for stdin), a converted trace (.jsonl, .jsonl.gz, .jsonl.zst) whose x
    annotations carry the records, or a directory of them. Nothing is replayed.

    Exit status: 0 clean, 1 findings, 2 input error (the other files are still checked and reported).
    """
    from kvmpfn.outputs import refuse_inputs, write_output
    from kvmpfn.report import finding_text, provenance_text, safe
    from kvmpfn.report.progress import progress

    files = _check_paths(paths)
    limits = {"fault_loop_min": fault_loop_min, "spurious_loop_min": spurious_loop_min}
    refuse_inputs(output, files)
    docs, errors = [], []
    with progress("checking", total=len(files), unit="files") as update:
        results = []
        for done, path in enumerate(files):
            update(done, path)
            checker = _check_trace(path, limits) if path.endswith(TRACE_SUFFIXES) else _check_text(path, mmu, limits)
            results.append((path, checker))
    for path, (items, records, error) in results:
        if error is not None:
            errors.append(error)
            if not records and not items:
                continue  # nothing read: only the error line
        by_code = dict(sorted(Counter(f["code"] for f in items).items()))
        docs.append({"trace": path, "records": records, "findings": items, "summary": {"by_code": by_code}})
    if fmt == "json":
        body: dict[str, Any] = {"version": 1, **docs[0]} if len(files) == 1 and docs else {"version": 1, "traces": docs}
        report = json.dumps(body, indent=2) + "\n" if docs or len(files) > 1 else ""
    else:
        lines = []
        for doc in docs:
            n = len(doc["findings"])
            if not quiet or (n and len(files) > 1):  # -q: which file, only above findings of several files
                lines.append(f"{safe(doc['trace'])}: {doc['records']} records checked, {n} finding{'s' * (n != 1)}")
            for i, f in enumerate(doc["findings"], 1):
                lines.append(f"  [{i}] {finding_text(f)}")
                lines += [f"      {provenance_text(p)}" for p in (f["provenance"] if verbose else [])]
        report = "".join(line + "\n" for line in lines)
    if report:
        write_output(output or "-", report, files)
    for error in errors:
        click.echo(f"kvmpfn: error: {error}", err=True)
    sys.exit(2 if errors else 1 if any(d["findings"] for d in docs) else 0)


COMMANDS = (
    convert,
    check,
)
