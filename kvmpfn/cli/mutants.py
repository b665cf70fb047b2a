"""``kvmpfn mutants`` and ``kvmpfn compare``: how a corpus, or two option sets, tell the historical bugs apart
(work in :mod:`kvmpfn.mutants`, rendering in :mod:`kvmpfn.report.mutants`)."""

from __future__ import annotations

import shlex
import sys

import click

from kvmpfn.cli.options import (
    check_bug_applies,
    jobs_option,
    options_text,
    parse_replay_options,
    report_options,
    runner_options,
    suggest,
    warn,
)
from kvmpfn.report.progress import progress


def _corpus(paths: tuple[str, ...]) -> list[str]:
    from kvmpfn import gate

    return [ref.path for ref in gate.discover(paths or ("traces/",))]


def _applies(name: str, base) -> bool:
    """Whether bug ``name`` can change anything under the MMU and kernel ``base`` forces (if it forces any)."""
    try:
        check_bug_applies(name, base.mmu, base.kernel)
    except click.UsageError:
        return False
    return True


@click.command()
@click.argument("paths", nargs=-1, metavar="[PATH ...]")
@click.option("--bug", "only", multiple=True, metavar="NAME", help="Only these mutants (repeatable).")
@click.option("--base", default="", metavar="OPTIONS", help='Replay options for every run, e.g. "--kernel pfn-io".')
@jobs_option
@runner_options
@click.option("--require-all", is_flag=True, help="Exit 1 unless every mutant is killed.")
@report_options("text", "json")
def mutants(
    paths: tuple[str, ...], only, base: str, config, require_all: bool, fmt: str, output, quiet, verbose
) -> None:
    """Replay the corpus under each historical bug: killed (findings change on some trace), blind spot (only
    outcome records change) or survived (nothing changes)."""
    from kvmpfn.kvm.bugs import BUGS
    from kvmpfn.mutants import mutants as run_mutants
    from kvmpfn.outputs import write_output
    from kvmpfn.report.mutants import mutants_json, mutants_text

    for name in only:
        if name not in BUGS:
            raise click.BadParameter(f"unknown bug {name!r}{suggest(name, BUGS)}", param_hint="'--bug'")
    base_opts = parse_replay_options(base, "--base")
    for name in only:
        if name in base_opts.bugs:
            raise click.UsageError(f"--bug {name} is also in --base: its mutant would be the base itself")
        check_bug_applies(name, base_opts.mmu, base_opts.kernel)
    bugs = list(only) or [name for name in sorted(BUGS) if name not in base_opts.bugs and _applies(name, base_opts)]
    if not only and len(bugs) < len(BUGS):
        idle = sorted(set(BUGS) - set(bugs))
        why = "they do nothing under it, or it turns them on already"
        warn(f"--base {shlex.quote(base)}: {len(idle)} mutant(s) not run ({why}): {', '.join(idle)}")
    corpus = _corpus(paths)
    with progress("mutants", total=len(corpus) * (1 + len(bugs)), unit="replays") as update:
        results = run_mutants(corpus, bugs, base_opts, config, warn, lambda done, total: update(done, ""))
    text = mutants_json(results, corpus) if fmt == "json" else mutants_text(results)
    write_output(output or "-", text, corpus)
    sys.exit(1 if require_all and any(r.verdict != "killed" for r in results) else 0)


@click.command()
@click.argument("paths", nargs=-1, metavar="[PATH ...]")
@click.option("--a", "a", required=True, metavar="OPTIONS", help='First replay options, e.g. "--kernel page".')
@click.option("--b", "b", required=True, metavar="OPTIONS", help='Second replay options, e.g. "--kernel pfn".')
@jobs_option
@runner_options
@report_options("text", "json")
def compare(paths: tuple[str, ...], a: str, b: str, config, fmt: str, output, quiet, verbose) -> None:
    """Replay each trace under two sets of replay options and report every trace whose outcome records or
    findings differ, with the first diverging event. Exit 1 on a difference."""
    from kvmpfn.mutants import compare as run_compare
    from kvmpfn.outputs import write_output
    from kvmpfn.report.mutants import compare_json, compare_text

    opts_a, opts_b = parse_replay_options(a, "--a"), parse_replay_options(b, "--b")
    corpus = _corpus(paths)
    with progress("comparing", total=2 * len(corpus), unit="replays") as update:
        diffs = run_compare(corpus, opts_a, opts_b, config, warn, lambda done, total: update(done, ""))
    render = compare_json if fmt == "json" else compare_text
    write_output(output or "-", render(diffs, corpus, options_text(opts_a), options_text(opts_b)), corpus)
    sys.exit(1 if diffs else 0)


COMMANDS = (mutants, compare)
