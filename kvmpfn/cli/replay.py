"""``kvmpfn replay``: one trace through the simulated MMU; every finding with its provenance."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys

import click

from kvmpfn.cli.options import fail, options_text, replay_options, report_options, warn
from kvmpfn.outputs import distinct_outputs, open_output, refuse_inputs, write_output
from kvmpfn.replay import ReplayOptions, replay_file
from kvmpfn.report import replay as render

EXAMPLES = """
\b
Examples:
  kvmpfn replay trace.jsonl
  kvmpfn replay trace.jsonl --bug same-pfn-no-release
  kvmpfn replay trace.jsonl --mmu tdp --kernel notifier --emit out.jsonl.zst --format json -o report.json
  kvmpfn replay trace.jsonl --emit - | jq .result
"""


def trace_inputs(path: str) -> list[str]:
    """The files a replay of ``path`` reads: the trace and the memory image its header names."""
    if path == "-":
        return []
    inputs = [path]
    try:
        from kvmpfn.trace.reader import open_trace

        with open_trace(path) as reader:
            if reader.header.memory:
                inputs.append(os.path.join(os.path.dirname(path), reader.header.memory))
    except Exception:  # the replay itself reports what is wrong with the trace
        pass
    return inputs


@click.command(epilog=EXAMPLES)
@click.argument("trace")
@replay_options
@click.option(
    "--emit",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Write one outcome record per event to FILE (.gz/.zst compressed; - for stdout, the report then goes "
    "to stderr).",
)
@click.option(
    "--html",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Also write a self-contained HTML report to FILE (- for stdout, the report then goes to stderr).",
)
@click.option(
    "--timeline",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Also write a Chrome trace-event timeline (Perfetto) to FILE (- for stdout, as --html).",
)
@report_options("text", "json")
def replay(
    trace: str, options: ReplayOptions, emit: str | None, html, timeline, fmt: str, output, quiet: bool, verbose: bool
) -> None:
    """Replay TRACE (.jsonl, .jsonl.gz, .jsonl.zst or - for stdin) and report what the MMU did: results by
    kind, the state at the end, and every finding with where it was detected and where its references came
    from.

    Exit status: 0 clean, 1 findings, 2 input error, 130 interrupted.
    """
    from kvmpfn.cli import DEBUG
    from kvmpfn.report.progress import progress

    if trace != "-" and not os.path.exists(trace):
        fail(f"{trace}: no such file")
    inputs = trace_inputs(trace)
    distinct_outputs({"--emit": emit, "-o": output, "--html": html, "--timeline": timeline})
    for out in (emit, output, html, timeline):
        refuse_inputs(out, inputs)
    extra = {"--emit": emit, "--html": html, "--timeline": timeline}
    to_stdout = [option for option, path in extra.items() if path == "-"]
    if len(to_stdout) > 1:
        fail(f"{' and '.join(to_stdout)} both write to standard output (-); give one of them a file")
    if to_stdout and output in (None, "-"):  # the report steps aside to stderr
        output = None
        report_stream = "stderr"
    else:
        report_stream = "stdout"
    with progress("replaying", unit="events") as update, contextlib.ExitStack() as stack:
        tick = update if sys.stderr.isatty() else None
        tracker = None
        if html or timeline:
            from kvmpfn.inspect.series import Tracker
            from kvmpfn.report.timeline import TimelineWriter

            writer = TimelineWriter(stack.enter_context(open_output(timeline, inputs)), trace) if timeline else None
            tracker = Tracker(writer)
        emit_fh = stack.enter_context(open_output(emit, inputs)) if emit else None
        result = replay_file(trace, options, emit_fh, progress=tick, observer=tracker)
        if result.mmu is None and result.error:  # nothing replayed: only the error, and no output files
            fail(result.error)
    if html:
        from kvmpfn.report.html import histories_of, replay_report

        command = " ".join(w for w in ("kvmpfn replay", shlex.quote(trace), options_text(options)) if w)
        write_output(html, replay_report(result, tracker, histories_of(trace, options, result), command), inputs)
    if result.exception is not None and DEBUG:
        import traceback

        traceback.print_exception(result.exception)
    _warn_idle_options(options, result)
    _show(result, options, fmt, output, quiet, verbose, report_stream, inputs)
    if result.interrupted:
        click.echo(f"kvmpfn: interrupted at event {result.events}", err=True)
        sys.exit(130)
    if result.error:
        fail(result.error)
    sys.exit(1 if result.findings else 0)


def _warn_idle_options(options: ReplayOptions, result) -> None:
    """Say which options did nothing under the MMU and kernel variant the trace replayed with."""
    from kvmpfn.kvm.bugs import BUGS

    if result.mmu is None:
        return
    if options.kernel_audit and result.mmu == "tdp":
        warn("--kernel-audit does nothing under tdp: the kernel's kvm_mmu_audit() points are in shadow paths")
    if options.tdp and result.mmu != "tdp":
        warn(f"--tdp {options.tdp} does nothing under shadow paging")
    for name in sorted(options.bugs):
        bug = BUGS[name]
        if result.mmu not in bug.mmu or result.kernel not in bug.kernels:
            where = f"{'/'.join(bug.mmu)} MMU, kernel {'/'.join(bug.kernels)}"
            now = f"the {result.mmu} MMU with kernel {result.kernel}"
            warn(f"--bug {name} does nothing under {now} (it applies to {where})")


def _show(result, options, fmt: str, output, quiet: bool, verbose: bool, stream: str, inputs: list[str]) -> None:
    hint = " ".join(w for w in ("kvmpfn explain", shlex.quote(result.trace), "--finding N", options_text(options)) if w)
    if fmt == "json":
        text = render.replay_json(result)
    elif output is None and getattr(sys, stream).isatty():
        from rich.console import Console
        from rich.text import Text

        console = Console(file=getattr(sys, stream), highlight=False)
        for style, line in render.replay_lines(result, quiet=quiet, verbose=verbose, hint=hint):
            console.print(Text(line, style=style), soft_wrap=True)
        return
    else:
        text = render.replay_text(result, quiet=quiet, verbose=verbose, hint=hint)
    if output is not None:
        write_output(output, text, inputs)
    elif stream == "stderr":
        click.echo(text, nl=False, err=True)
    else:
        write_output("-", text)


COMMANDS = (replay,)
