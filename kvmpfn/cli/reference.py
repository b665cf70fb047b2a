"""``kvmpfn codes`` and ``kvmpfn bugs``: what a finding code means, and the historical bugs ``--bug``
re-creates (content in :mod:`kvmpfn.report.codes`, from :mod:`kvmpfn.vocab` and :mod:`kvmpfn.kvm.bugs`)."""

from __future__ import annotations

import click

from kvmpfn.cli.options import report_options
from kvmpfn.outputs import write_output
from kvmpfn.report import codes as reference


@click.command()
@click.argument("name", required=False)
@report_options("text", "json")
def codes(name: str | None, fmt: str, output, quiet: bool, verbose: bool) -> None:
    """List the finding codes, or explain one: what it means, the invariant it checks, a trace that shows it
    and how to baseline it."""
    write_output(output or "-", reference.codes_json(name) if fmt == "json" else reference.codes_text(name))


@click.command()
@click.argument("name", required=False)
@report_options("text", "json")
def bugs(name: str | None, fmt: str, output, quiet: bool, verbose: bool) -> None:
    """List the historical MMU bugs that --bug NAME re-creates: the MMUs and kernel variants each applies to,
    and the kernel function and commit behind it; NAME shows one."""
    write_output(output or "-", reference.bugs_json(name) if fmt == "json" else reference.bugs_text(name))


COMMANDS = (codes, bugs)
