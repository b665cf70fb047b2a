"""``kvmpfn explain``, ``kvmpfn show``, ``kvmpfn stat``: looking inside a replay (work in
:mod:`kvmpfn.inspect`, rendering in :mod:`kvmpfn.report`)."""

from __future__ import annotations

import json
import os
import sys

import click

from kvmpfn.cli.options import fail, replay_options, report_options
from kvmpfn.replay import ReplayOptions
from kvmpfn.x86 import KVM_MAX_VCPUS


def _address(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value, 0)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number (0x... for hex)") from None
    if number < 0:
        raise click.BadParameter("must not be negative")
    return number


def _check_trace(trace: str) -> None:
    if trace != "-" and not os.path.exists(trace):
        fail(f"{trace}: no such file")


def _emit(lines: list[tuple[str, str]], doc, fmt: str, output: str | None, inputs: list[str]) -> None:
    """JSON (``doc``), or the lines: coloured by rich on a terminal, the same words plain otherwise."""
    from kvmpfn.outputs import write_output

    if fmt == "json":
        write_output(output or "-", json.dumps(doc, indent=2) + "\n", inputs)
    elif output is None and sys.stdout.isatty():
        from rich.console import Console
        from rich.text import Text

        console = Console(highlight=False)
        for style, line in lines:
            console.print(Text(line, style=style), soft_wrap=True)
    else:
        write_output(output or "-", "".join(line + "\n" for _, line in lines), inputs)


def _interrupted(events: int) -> None:
    """Ctrl-C stopped the replay: the partial result is out, say where on stderr and exit 130 (as replay)."""
    click.echo(f"kvmpfn: interrupted at event {events}", err=True)
    sys.exit(130)


EXPLAIN_EXAMPLES = """
\b
Examples:
  kvmpfn explain trace.jsonl --finding 1 --bug same-pfn-no-release
  kvmpfn explain trace.jsonl --pfn 0x100000
  kvmpfn explain trace.jsonl --gfn 0x5 --format json
  kvmpfn explain trace.jsonl --spte-of 0x7fff0000
"""


@click.command(epilog=EXPLAIN_EXAMPLES)
@click.argument("trace")
@click.option("--pfn", callback=_address, help="The host frame to follow.")
@click.option("--gfn", callback=_address, help="Follow the frames behind this guest frame number.")
@click.option("--spte-of", "gva", callback=_address, metavar="GVA", help="Follow the frames the sptes of GVA mapped.")
@click.option(
    "--finding", type=click.IntRange(min=1), help="Follow the subject of finding N (as kvmpfn replay numbers them)."
)
@replay_options
@report_options("text", "json")
def explain(trace, pfn, gfn, gva, finding, options: ReplayOptions, fmt, output, quiet, verbose) -> None:
    """The history of one host frame through the replay of TRACE: every pfn API call on it (with the MMU
    function that made it), every spte that mapped it (old -> new, decoded), rmap add/remove, write
    protection and host remaps, with the refcount after each step; the step where an invariant first broke
    and, for a finding, the reference at fault.

    Exit status: 0 nothing broke, 1 an invariant broke or the finding was explained, 2 usage or input error,
    130 interrupted (the history covers the events before it).
    """
    from kvmpfn.inspect.history import explain as run
    from kvmpfn.report.explain import explain_lines

    chosen = [
        name
        for name, v in (("--pfn", pfn), ("--gfn", gfn), ("--spte-of", gva), ("--finding", finding))
        if v is not None
    ]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --pfn, --gfn, --spte-of, --finding")
    _check_trace(trace)
    doc = run(trace, options, pfn=pfn, gfn=gfn, gva=gva, finding=finding)
    _emit(explain_lines(doc), doc, fmt, output, [trace])
    if "interrupted" in doc:
        _interrupted(doc["interrupted"])
    if doc["error"]:
        fail(doc["error"])
    sys.exit(1 if doc["first_broken"] or "finding" in doc else 0)


SHOW_EXAMPLES = """
\b
Examples:
  kvmpfn show trace.jsonl                     the state at the end (before a teardown)
  kvmpfn show trace.jsonl --at 120 -v         right after event 120, in full
  kvmpfn show trace.jsonl --at 120 --gva 0x7fff0000 --vcpu 1
"""


@click.command(epilog=SHOW_EXAMPLES)
@click.argument("trace")
@click.option("--at", "seq", type=click.IntRange(min=0), help="Right after event SEQ (default: the last event).")
@click.option("--gva", callback=_address, help="Also the guest and shadow walks of this address.")
@click.option(
    "--vcpu",
    type=click.IntRange(0, KVM_MAX_VCPUS - 1),
    default=0,
    show_default=True,
    help="The vcpu of --gva.",
)
@replay_options
@report_options("text", "json")
def show(trace, seq, gva, vcpu, options: ReplayOptions, fmt, output, quiet, verbose) -> None:
    """The MMU state of TRACE right after one event: shadow pages from each root as a tree (role, gfn,
    parents, write protection), their sptes and the frames they map, rmaps, frames with their reference
    counts, memslots with their write counts. Summarised unless -v; -q: only the counts; --format json is
    always complete.

    Exit status: 0 shown, 2 usage or input error (--at past the last event, --gva no address of the vcpu's
    paging mode), 130 interrupted (the state where the replay stopped, marked as such).
    """
    from kvmpfn.inspect.state import StopAt
    from kvmpfn.replay import replay_file
    from kvmpfn.report.show import show_lines

    _check_trace(trace)
    stop = StopAt(seq, gva, vcpu)
    result = replay_file(trace, options, observer=stop)
    if stop.state is None:
        fail(result.error or f"{trace}: nothing replayed")
    if seq is not None and seq >= result.events and not result.error and not result.interrupted:
        n = result.events
        fail(f"--at {seq}: the trace has {n} event{'s' * (n != 1)}" + (f" (seq 0 to {n - 1})" if n else ""))
    if result.error:
        stop.state["error"] = result.error
    if result.interrupted:
        stop.state["interrupted"] = result.events
    _emit(show_lines(stop.state, verbose, quiet), stop.state, fmt, output, [trace])
    if result.interrupted:
        _interrupted(result.events)
    if result.error:
        fail(result.error)


STAT_EXAMPLES = """
\b
Examples:
  kvmpfn stat trace.jsonl
  kvmpfn stat traces/shadow/*.jsonl --format json --top 5
"""


@click.command(epilog=STAT_EXAMPLES)
@click.argument("traces", nargs=-1, required=True)
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="How many hottest pages.")
@click.option("--timing", is_flag=True, help="Also wall seconds per op in --format json (they differ between runs).")
@replay_options
@report_options("text", "json")
def stat(traces, top, timing, options: ReplayOptions, fmt, output, quiet, verbose) -> None:
    """What the MMU spent its events on, per TRACE (like perf kvm stat): events by op and result, faults per
    vcpu, the hottest guest pages, emulated pte writes and flooding zaps, shadow pages created, zapped and
    recycled, peak live sptes and referenced frames, and (text) time per op. -q: per trace only its first
    line and its findings.

    Exit status (as replay): 0 clean, 1 findings, 2 usage or input error, 130 interrupted (the counts cover
    the events before it; later TRACES are not replayed).
    """
    from kvmpfn.inspect.series import Tracker
    from kvmpfn.replay import replay_file
    from kvmpfn.report.stat import stat_lines

    for trace in traces:
        _check_trace(trace)  # every one before any replay
    docs, lines = [], []
    for trace in traces:
        tracker = Tracker()
        result = replay_file(trace, options, observer=tracker)
        if result.mmu is None:
            fail(result.error or f"{trace}: nothing replayed")
        doc = tracker.doc(result, top=top, timing=timing or fmt == "text")
        docs.append(doc)
        lines += stat_lines(doc, quiet)
        if result.interrupted:
            break
    _emit(lines, {"version": 1, "traces": docs}, fmt, output, list(traces))
    if "interrupted" in docs[-1]:
        _interrupted(docs[-1]["events"])
    for doc in docs:
        if "error" in doc:
            fail(doc["error"])
    sys.exit(1 if any(doc["findings"] for doc in docs) else 0)


COMMANDS = (explain, show, stat)
