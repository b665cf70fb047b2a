"""kvmpfn command line (click): commands only; the work lives in replay, gate and report."""

from __future__ import annotations

import json
import sys

import click

from kvmpfn import __version__

EXAMPLES = """
\b
Examples:
  kvmpfn replay trace.jsonl
  kvmpfn replay trace.jsonl --mmu tdp --kernel notifier --emit out.jsonl --format json
  kvmpfn replay trace.jsonl.zst --audit-every 1
  kvmpfn audit traces/
"""

KERNELS = ("page", "pfn", "pfn-io", "notifier")


def _fail(message: str) -> None:
    click.echo(f"kvmpfn: error: {message}", err=True)
    sys.exit(2)


@click.group(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvmpfn")
def main() -> None:
    """Replay guest page-fault traces through a simulated 2008 x86 KVM MMU and audit every pfn reference."""


@main.command()
@click.argument("trace")
@click.option("--mmu", type=click.Choice(["shadow", "tdp"]), help="Override the header's MMU.")
@click.option("--kernel", type=click.Choice(KERNELS), help="Override the header's kernel variant.")
@click.option("--audit-every", type=click.IntRange(min=0), default=0, help="Full audit every N events (0: off).")
@click.option(
    "--kernel-audit", is_flag=True, help="Also audit at the kernel's kvm_mmu_audit() points (shadow paging)."
)
@click.option("--bug", "bugs", multiple=True, metavar="NAME", help="Re-create a historical MMU bug (repeatable).")
@click.option("--emit", type=click.Path(dir_okay=False), help="Write one outcome record per event to FILE.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", help="Report format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the report to FILE.")
def replay(trace: str, mmu, kernel, audit_every: int, kernel_audit: bool, bugs, emit, fmt: str, output) -> None:
    """Replay TRACE (.jsonl, .jsonl.gz, .jsonl.zst or - for stdin) and report what the MMU did.

    Exit status: 0 clean, 1 findings, 2 input error.
    """
    from kvmpfn.replay import ReplayOptions, replay_file

    from kvmpfn.kvm.bugs import BUGS

    for name in bugs:
        if name not in BUGS:
            _fail(f"--bug: unknown bug {name!r} (kvmpfn bugs lists them)")
    options = ReplayOptions(
        mmu=mmu, kernel=kernel, audit_every=audit_every, bugs=frozenset(bugs), kernel_audit=kernel_audit
    )
    emit_fh = None
    if emit:
        try:
            emit_fh = open(emit, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as err:
            _fail(f"{emit}: {err.strerror}")
    try:
        result = replay_file(trace, options, emit_fh)
    finally:
        if emit_fh is not None:
            emit_fh.close()
    if fmt == "json":
        doc = {
            "version": 1,
            "trace": trace,
            "events": result.events,
            "findings": result.findings,
            "summary": result.summary(),
        }
        text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
    else:
        lines = [f"{trace}: {result.events} events"]
        summary = result.summary()
        for name, count in summary["results"].items():
            lines.append(f"  {name:12} {count}")
        for key in ("shadow_pages", "sptes", "frames_referenced"):
            if key in summary:
                lines.append(f"  {key.replace('_', ' ')}: {summary[key]}")
        lines.append(f"  findings: {len(result.findings)}")
        text = "\n".join(lines) + "\n"
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        click.echo(text, nl=False)
    if result.error:
        click.echo(f"kvmpfn: error: {result.error}", err=True)
        sys.exit(2)
    sys.exit(1 if result.findings else 0)


# -- kvmpfn audit: the CI regression gate (kvmpfn/gate.py, kvmpfn/report/) ----------------------------------

AUDIT_FORMATS = ("text", "json", "sarif", "junit")


def _parse_shard(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    from kvmpfn.gate import parse_shard

    if value is None:
        return None
    try:
        return parse_shard(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@main.command()
@click.argument("paths", nargs=-1, metavar="[PATH ...]")
@click.option("--mmu", type=click.Choice(["shadow", "tdp"]), help="Override every header's MMU.")
@click.option("--kernel", type=click.Choice(KERNELS), help="Override every header's kernel variant.")
@click.option(
    "--audit-every", type=click.IntRange(min=0), default=0, help="Full audit every N events (0: off)."
)
@click.option("--kernel-audit", is_flag=True, help="Also audit at the kernel's kvm_mmu_audit() points.")
@click.option(
    "--bug", "bugs", multiple=True, metavar="NAME", help="Re-create a historical MMU bug (repeatable)."
)
@click.option(
    "--baseline",
    type=click.Path(dir_okay=False),
    help="Baseline file instead of each corpus root's kvmpfn-baseline.json.",
)
@click.option("--update-baseline", is_flag=True, help="Rewrite the baseline from this run's findings.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Parallel replay processes [default: CPUs].")
@click.option(
    "--shard", callback=_parse_shard, metavar="I/N", help="Run shard I of N: trace k goes to (k mod N)+1."
)
@click.option("--fail-fast", is_flag=True, help="Stop after the first failing trace.")
@click.option("--format", "fmt", type=click.Choice(AUDIT_FORMATS), default="text", help="Report format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the report to FILE.")
def audit(
    paths: tuple[str, ...],
    mmu,
    kernel,
    audit_every: int,
    kernel_audit: bool,
    bugs: tuple[str, ...],
    baseline,
    update_baseline: bool,
    jobs,
    shard,
    fail_fast: bool,
    fmt: str,
    output,
) -> None:
    """Replay every trace under each PATH (default traces/) and compare its findings with the baseline.

    A directory is searched for *.jsonl, *.jsonl.gz and *.jsonl.zst; a file is taken as a trace. The report
    is a table on a terminal, plain text otherwise; with --format json|sarif|junit the document goes to
    stdout, or to -o FILE while the table goes to stdout.

    Exit status: 0 every trace matches its baseline, 1 a trace has new or missing findings or an input
    error, 2 usage error or the input error of a single trace FILE.
    """
    import os

    from kvmpfn import gate
    from kvmpfn.kvm.bugs import BUGS
    from kvmpfn.replay import ReplayOptions
    from kvmpfn.report import console, json_report, junit, sarif

    for name in bugs:
        if name not in BUGS:
            _fail(f"--bug: unknown bug {name!r} (kvmpfn bugs lists them)")
    paths = paths or ("traces/",)
    options = ReplayOptions(
        mmu=mmu, kernel=kernel, audit_every=audit_every, bugs=frozenset(bugs), kernel_audit=kernel_audit
    )
    try:
        report = gate.audit(
            paths,
            options,
            baseline=baseline,
            jobs=jobs,
            shard=shard,
            fail_fast=fail_fast,
            update=update_baseline,
            progress=console.progress,
            warn=lambda message: click.echo(f"kvmpfn: warning: {message}", err=True),
        )
    except gate.GateError as err:
        _fail(str(err))
    renderers = {"json": json_report.render, "sarif": sarif.render, "junit": junit.render}
    if fmt == "text" and output is None:
        console.show(report)
    else:
        text = renderers[fmt](report) if fmt in renderers else console.render_text(report)
        if output is None:
            click.echo(text, nl=False)
        else:
            try:
                with open(output, "w", encoding="utf-8", newline="\n") as fh:
                    fh.write(text)
            except OSError as err:
                _fail(f"{output}: {err.strerror}")
            if fmt != "text":
                console.show(report)
    single_trace = len(paths) == 1 and not os.path.isdir(paths[0])
    if single_trace:
        for outcome in report.outcomes:
            if outcome.error:
                click.echo(f"kvmpfn: error: {outcome.error}", err=True)
    sys.exit(gate.exit_status(report, single_trace))
