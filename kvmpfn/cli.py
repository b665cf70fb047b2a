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
