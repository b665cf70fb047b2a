"""``kvmpfn audit``: the CI regression gate (work in :mod:`kvmpfn.gate`, rendering in :mod:`kvmpfn.report`)."""

from __future__ import annotations

import os
import sys

import click

from kvmpfn.cli.options import jobs_option, replay_options, report_options, runner_options, warn
from kvmpfn.replay import ReplayOptions

EXAMPLES = """
\b
Examples:
  kvmpfn audit traces/
  kvmpfn audit traces/ --format sarif -o findings.sarif
  kvmpfn audit traces/ --jobs 4 --shard 1/4 --format json -o shard1.json
  kvmpfn merge shard*.json --format sarif -o findings.sarif
  kvmpfn audit traces/ --scheduler tcp://10.0.0.5:8786
  kvmpfn audit traces/ --update-baseline
"""


def _parse_shard(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    from kvmpfn.gate import parse_shard

    if value is None:
        return None
    try:
        return parse_shard(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@click.command(epilog=EXAMPLES)
@click.argument("paths", nargs=-1, metavar="[PATH ...]")
@replay_options
@click.option(
    "--baseline",
    type=click.Path(dir_okay=False),
    help="Baseline file instead of each corpus root's kvmpfn-baseline.json.",
)
@click.option("--update-baseline", is_flag=True, help="Rewrite the baseline from this run's findings.")
@jobs_option
@runner_options
@click.option(
    "--shard",
    callback=_parse_shard,
    metavar="I/N",
    help="Run shard I of N (balanced by trace size; kvmpfn merge joins the JSON reports).",
)
@click.option("--fail-fast", is_flag=True, help="Stop after the first failing trace.")
@report_options("text", "json", "sarif", "junit", "html")
def audit(
    paths: tuple[str, ...],
    options: ReplayOptions,
    baseline,
    update_baseline: bool,
    config,
    shard,
    fail_fast: bool,
    fmt: str,
    output,
    quiet: bool,
    verbose: bool,
) -> None:
    """Replay every trace under each PATH (default traces/) and compare its findings with the baseline.

    A directory is searched for *.jsonl, *.jsonl.gz and *.jsonl.zst; a file is taken as a trace. The report
    is a table on a terminal, plain text otherwise; with --format json|sarif|junit|html the document goes to
    stdout, or to -o FILE while the table goes to stdout.

    Exit status: 0 every trace matches its baseline, 1 a trace has new or missing findings or an input
    error, 2 usage error or the input error of a single trace FILE, 130 interrupted (the report shows the
    traces that finished).
    """
    from kvmpfn import gate
    from kvmpfn.outputs import refuse_inputs
    from kvmpfn.report import console

    paths = paths or ("traces/",)
    refs = gate.discover(paths, baseline)
    inputs = [ref.path for ref in refs] + sorted({ref.baseline for ref in refs})
    refuse_inputs(output, inputs)
    try:
        report = gate.audit(
            paths,
            options,
            baseline=baseline,
            config=config,
            shard=shard,
            fail_fast=fail_fast,
            update=update_baseline,
            progress=console.progress,
            warn=warn,
        )
    except gate.Interrupted as stop:
        show_report(stop.report, options, fmt, output, quiet, inputs)
        ran = len(stop.report.ran)
        click.echo(f"kvmpfn: interrupted: {ran} of {len(stop.report.outcomes)} traces replayed", err=True)
        sys.exit(130)
    show_report(report, options, fmt, output, quiet, inputs)
    single_trace = len(paths) == 1 and not os.path.isdir(paths[0])
    if single_trace:
        for outcome in report.outcomes:
            if outcome.error:
                click.echo(f"kvmpfn: error: {outcome.error}", err=True)
    sys.exit(gate.exit_status(report, single_trace))


def show_report(report, options: ReplayOptions | None, fmt: str, output: str | None, quiet: bool, inputs) -> None:
    """The report as ``--format`` asks, to ``-o`` or standard output (the table too when ``-o`` is a file)."""
    from kvmpfn.outputs import write_output
    from kvmpfn.report import console, json_report, junit, sarif

    renderers = {"json": json_report.render, "sarif": sarif.render, "junit": junit.render}
    if fmt == "text" and output is None:
        if not quiet or any(o.status != "pass" for o in report.outcomes):
            console.show(report, quiet=quiet)
    else:
        if fmt == "html":
            from kvmpfn.report.html import audit_html

            text = audit_html(report, options)
        else:
            text = renderers[fmt](report) if fmt in renderers else console.render_text(report)
        write_output(output or "-", text, inputs, document=fmt != "text")
        if output is not None and output != "-" and not quiet:
            console.show(report)


COMMANDS = (audit,)
