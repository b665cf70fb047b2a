"""``kvmpfn merge``: join the JSON reports of ``audit --shard i/n`` runs into the report of the unsharded run
(work in :func:`kvmpfn.report.json_report.merge`)."""

from __future__ import annotations

import sys

import click

from kvmpfn.cli.options import report_options

EXAMPLES = """
\b
Examples:
  kvmpfn audit traces/ --shard 1/3 --format json -o shard1.json     (one per CI machine)
  kvmpfn merge shard1.json shard2.json shard3.json --format sarif -o findings.sarif
  kvmpfn merge shard*.json --update-baseline
"""


@click.command(epilog=EXAMPLES)
@click.argument("reports", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="REPORT.json...")
@click.option(
    "--update-baseline", is_flag=True, help="Rewrite the baselines from the merged findings (run where audit ran)."
)
@report_options("text", "json", "sarif", "junit")
def merge(reports: tuple[str, ...], update_baseline: bool, fmt: str, output, quiet: bool, verbose: bool) -> None:
    """Join the JSON reports of all shards of one `audit --shard i/n` run into the report the unsharded run
    gives (the same bytes). Reports of other kvmpfn versions, other options or another corpus are refused.

    Exit status: as audit's: 0 every trace matches its baseline, 1 a failing trace or an input error, 2 usage
    error or reports that do not add up.
    """
    from kvmpfn import gate
    from kvmpfn.cli.audit import show_report
    from kvmpfn.report import json_report

    docs = {path: json_report.load(path) for path in dict.fromkeys(reports)}
    report = json_report.merge(docs)
    if update_baseline:
        selection = next(iter(docs.values()))["selection"]
        gate.update_from_merge(report, selection)
    show_report(report, None, fmt, output, quiet, list(docs))
    sys.exit(gate.exit_status(report, single_trace=False))


COMMANDS = (merge,)
