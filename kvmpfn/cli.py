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
@click.option("--kernel-audit", is_flag=True, help="Also audit at the kernel's kvm_mmu_audit() points (shadow paging).")
@click.option("--bug", "bugs", multiple=True, metavar="NAME", help="Re-create a historical MMU bug (repeatable).")
@click.option(
    "--paranoid", is_flag=True, help="Full audit and a check of kvmpfn's own MMU structures after every event."
)
@click.option(
    "--emit", type=click.Path(dir_okay=False), help="Write one outcome record per event to FILE (- for stdout)."
)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", help="Report format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the report to FILE.")
def replay(
    trace: str, mmu, kernel, audit_every: int, kernel_audit: bool, bugs, paranoid: bool, emit, fmt: str, output
) -> None:
    """Replay TRACE (.jsonl, .jsonl.gz, .jsonl.zst or - for stdin) and report what the MMU did.

    Exit status: 0 clean, 1 findings, 2 input error.
    """
    from kvmpfn.kvm.bugs import BUGS
    from kvmpfn.replay import ReplayOptions, replay_file

    for name in bugs:
        if name not in BUGS:
            _fail(f"--bug: unknown bug {name!r} (kvmpfn bugs lists them)")
    options = ReplayOptions(
        mmu=mmu,
        kernel=kernel,
        audit_every=audit_every,
        bugs=frozenset(bugs),
        kernel_audit=kernel_audit,
        paranoid=paranoid,
    )
    emit_fh = None
    if emit == "-":
        emit_fh = sys.stdout
    elif emit:
        try:
            emit_fh = open(emit, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as err:
            _fail(f"{emit}: {err.strerror}")
    try:
        result = replay_file(trace, options, emit_fh)
    finally:
        if emit_fh is not None and emit_fh is not sys.stdout:
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
@click.option("--audit-every", type=click.IntRange(min=0), default=0, help="Full audit every N events (0: off).")
@click.option("--kernel-audit", is_flag=True, help="Also audit at the kernel's kvm_mmu_audit() points.")
@click.option("--bug", "bugs", multiple=True, metavar="NAME", help="Re-create a historical MMU bug (repeatable).")
@click.option(
    "--baseline",
    type=click.Path(dir_okay=False),
    help="Baseline file instead of each corpus root's kvmpfn-baseline.json.",
)
@click.option("--update-baseline", is_flag=True, help="Rewrite the baseline from this run's findings.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Parallel replay processes [default: CPUs].")
@click.option("--shard", callback=_parse_shard, metavar="I/N", help="Run shard I of N: trace k goes to (k mod N)+1.")
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


# -- historical bugs: kvmpfn bugs / mutants / compare (kvmpfn/mutants.py) ---------------------------------


@main.command()
def bugs() -> None:
    """List the historical MMU bugs that --bug NAME re-creates, with their citation."""
    from kvmpfn.kvm.bugs import BUGS

    width = max(len(name) for name in BUGS)
    for name, citation in BUGS.items():
        click.echo(f"{name:<{width}}  {citation}")


def _corpus(paths: tuple[str, ...]) -> list[str]:
    from kvmpfn import gate

    try:
        return [ref.path for ref in gate.discover(paths or ("traces/",))]
    except gate.GateError as err:
        _fail(str(err))
        raise AssertionError from None


@main.command()
@click.argument("paths", nargs=-1, metavar="[PATH ...]")
@click.option("--bug", "only", multiple=True, metavar="NAME", help="Only these mutants (repeatable).")
@click.option("--base", default="", metavar="OPTIONS", help='Options for every run, e.g. "--kernel pfn-io".')
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Parallel replay processes [default: CPUs].")
@click.option("--require-all", is_flag=True, help="Exit 1 unless every mutant is killed.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", help="Report format.")
def mutants(paths: tuple[str, ...], only, base: str, jobs, require_all: bool, fmt: str) -> None:
    """Replay the corpus under each historical bug: killed (findings change on some trace), blind spot (only
    outcome records change) or survived (nothing changes)."""
    from kvmpfn import gate
    from kvmpfn.kvm.bugs import BUGS
    from kvmpfn.mutants import mutants as run_mutants
    from kvmpfn.mutants import parse_options
    from kvmpfn.report.mutants import mutants_json, mutants_text

    for name in only:
        if name not in BUGS:
            _fail(f"--bug: unknown bug {name!r} (kvmpfn bugs lists them)")
    try:
        base_opts = parse_options(base)
    except ValueError as err:
        _fail(f"--base: {err}")
    corpus = _corpus(paths)
    results = run_mutants(corpus, list(only) or sorted(BUGS), base_opts, jobs or gate.default_jobs())
    click.echo(mutants_json(results, corpus) if fmt == "json" else mutants_text(results), nl=False)
    sys.exit(1 if require_all and any(r.verdict != "killed" for r in results) else 0)


@main.command()
@click.argument("paths", nargs=-1, metavar="[PATH ...]")
@click.option("--a", "a", required=True, metavar="OPTIONS", help='First option set, e.g. "--kernel page".')
@click.option("--b", "b", required=True, metavar="OPTIONS", help='Second option set, e.g. "--kernel pfn".')
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Parallel replay processes [default: CPUs].")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", help="Report format.")
def compare(paths: tuple[str, ...], a: str, b: str, jobs, fmt: str) -> None:
    """Replay each trace under two option sets and report every trace whose outcome records or findings
    differ, with the first diverging event. Exit 1 on a difference."""
    from kvmpfn import gate
    from kvmpfn.mutants import compare as run_compare
    from kvmpfn.mutants import parse_options
    from kvmpfn.report.mutants import compare_json, compare_text

    try:
        opts_a, opts_b = parse_options(a), parse_options(b)
    except ValueError as err:
        _fail(f"--a/--b: {err}")
    corpus = _corpus(paths)
    diffs = run_compare(corpus, opts_a, opts_b, jobs or gate.default_jobs())
    render = compare_json if fmt == "json" else compare_text
    click.echo(render(diffs, corpus, a, b), nl=False)
    sys.exit(1 if diffs else 0)


# -- real inputs (kvmpfn/realinput_cli.py) and workloads (kvmpfn/synth_cli.py) ------------------------------

from kvmpfn.realinput_cli import check, convert  # noqa: E402
from kvmpfn.synth_cli import synth  # noqa: E402

main.add_command(convert)
main.add_command(check)
main.add_command(synth)
