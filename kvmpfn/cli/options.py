"""Options shared by several commands, declared once, and the helpers every command uses to fail or write.

``@replay_options`` adds the options that change how a trace replays and hands the command one
:class:`~kvmpfn.replay.ReplayOptions` as ``options``; :func:`parse_replay_options` reads the same options from
a string (``compare --a "--kernel pfn-io"``, ``mutants --base ...``) with the same parser.
``@report_options(...)`` adds ``--format``, ``-o``, ``-q`` and ``-v``.
"""

from __future__ import annotations

import difflib
import functools
import shlex
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import click

from kvmpfn.replay import ReplayOptions
from kvmpfn.vocab import KERNELS, MMUS, TDPS

REPLAY_FIELDS = ("mmu", "kernel", "tdp", "audit_every", "kernel_audit", "full_audit", "bugs", "paranoid", "max_memory")


def fail(message: str, status: int = 2) -> NoReturn:
    """``kvmpfn: error: MESSAGE`` on stderr, then exit with ``status``."""
    click.echo(f"kvmpfn: error: {message}", err=True)
    sys.exit(status)


def warn(message: str) -> None:
    click.echo(f"kvmpfn: warning: {message}", err=True)


def suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, or an empty string."""
    choices = list(choices)
    close = [c for c in choices if c.startswith(word)] or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _check_bugs(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    from kvmpfn.kvm.bugs import BUGS

    for name in value:
        if name not in BUGS:
            raise click.BadParameter(f"unknown bug {name!r}{suggest(name, BUGS)}; kvmpfn bugs lists them")
    return value


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from kvmpfn.errors import InputError
    from kvmpfn.limits import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except InputError as err:
        raise click.BadParameter(err.message) from None


_REPLAY_OPTIONS = (
    click.option("--mmu", type=click.Choice(MMUS), help="Override the header's MMU."),
    click.option("--kernel", type=click.Choice(KERNELS), help="Override the header's kernel variant."),
    click.option(
        "--tdp",
        type=click.Choice(TDPS),
        help="TDP hardware under --mmu tdp: npt (SVM, x86 spte format) or ept (VMX spte format); overrides the "
        "header's tdp.",
    ),
    click.option("--audit-every", type=click.IntRange(min=0), default=0, help="Full audit every N events (0: off)."),
    click.option(
        "--kernel-audit", is_flag=True, help="Also audit at the kernel's kvm_mmu_audit() points (shadow paging)."
    ),
    click.option(
        "--full-audit",
        is_flag=True,
        help="Check everything at every audit point instead of only what changed since the previous one "
        "(slower; the same findings).",
    ),
    click.option(
        "--bug",
        "bugs",
        multiple=True,
        metavar="NAME",
        callback=_check_bugs,
        help="Re-create a historical MMU bug (repeatable; kvmpfn bugs lists them).",
    ),
    click.option(
        "--paranoid", is_flag=True, help="Full audit and a check of kvmpfn's own MMU structures after every event."
    ),
    click.option(
        "--max-memory",
        metavar="SIZE",
        callback=_size,
        help="Stop a replay whose simulated VM outgrows SIZE (512M, 2G; 0: no limit) with a one-line error, "
        "keeping its findings [default: half of the memory available: RAM, cgroup limit, ulimit -v].",
    ),
)


def replay_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the replay options; the command receives them as one ``options: ReplayOptions``."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in REPLAY_FIELDS}
        values["bugs"] = frozenset(values["bugs"])
        return func(*args, options=ReplayOptions(**values), **kwargs)

    for option in reversed(_REPLAY_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


@click.command(context_settings={"help_option_names": []})
@replay_options
def _option_parser(options: ReplayOptions) -> ReplayOptions:
    return options


def parse_replay_options(text: str, where: str) -> ReplayOptions:
    """Replay options written as on the command line (``"--kernel pfn-io --bug NAME"``); a bad one is a usage
    error naming ``where`` (``--a``, ``--base``)."""
    try:
        words = shlex.split(text)
        ctx = _option_parser.make_context(where, words, resilient_parsing=False)
        with ctx:
            return _option_parser.invoke(ctx)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint=f"'{where}'") from None
    except click.UsageError as err:
        raise click.BadParameter(err.format_message(), param_hint=f"'{where}'") from None


def options_text(options: ReplayOptions) -> str:
    """``options`` as command-line words (``--kernel pfn-io --bug NAME``), the inverse of the parser."""
    words = []
    for name in ("mmu", "kernel", "tdp"):
        if getattr(options, name):
            words += [f"--{name}", getattr(options, name)]
    if options.audit_every:
        words += ["--audit-every", str(options.audit_every)]
    words += ["--kernel-audit"] * options.kernel_audit + ["--paranoid"] * options.paranoid
    words += ["--full-audit"] * options.full_audit
    for bug in sorted(options.bugs):
        words += ["--bug", bug]
    if options.max_memory is not None:
        words += ["--max-memory", str(options.max_memory)]
    return shlex.join(words)


def report_options(*formats: str, default: str = "text") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--format`` (one of ``formats``), ``-o/--output``, ``-q/--quiet``, ``-v/--verbose``."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(
            (
                click.option(
                    "--format",
                    "fmt",
                    type=click.Choice(formats),
                    default=default,
                    show_default=True,
                    help="Report format.",
                ),
                click.option(
                    "-o",
                    "--output",
                    type=click.Path(dir_okay=False, allow_dash=True),
                    help="Write the report to FILE (written whole or not at all) instead of standard output.",
                ),
                click.option("-q", "--quiet", is_flag=True, help="Print only what was found (nothing when clean)."),
                click.option("-v", "--verbose", is_flag=True, help="Print everything: full provenance, all counts."),
            )
        ):
            func = option(func)
        return func

    return decorate


jobs_option = click.option(
    "-j", "--jobs", type=click.IntRange(min=1), help="Parallel replay processes [default: the CPUs]."
)


_RUNNER_OPTIONS = (
    click.option(
        "--executor",
        type=click.Choice(("local", "dask")),
        help="Where traces replay: local processes, or dask.distributed (pip install 'kvmpfn[dask]') "
        "[default: local; dask with --scheduler].",
    ),
    click.option(
        "--scheduler",
        metavar="tcp://HOST:PORT",
        help="A running dask scheduler; without it, --executor dask starts a local cluster of --jobs workers.",
    ),
    click.option(
        "--shared-fs", is_flag=True, help="dask workers read the traces at the same paths (else bytes are sent)."
    ),
    click.option(
        "--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS", help="Limit for one replay."
    ),
)


def runner_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--executor``, ``--scheduler``, ``--shared-fs``, ``--timeout``; with ``jobs_option`` the command receives
    them as one ``config: RunnerConfig`` (``jobs`` included)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from kvmpfn.runner import RunnerConfig, default_jobs

        jobs, executor, scheduler = kwargs.pop("jobs"), kwargs.pop("executor"), kwargs.pop("scheduler")
        shared_fs, timeout = kwargs.pop("shared_fs"), kwargs.pop("timeout")
        if scheduler and executor == "local":
            raise click.UsageError("--scheduler needs --executor dask")
        if shared_fs and not (scheduler or executor == "dask"):
            raise click.UsageError("--shared-fs needs --executor dask")
        executor = "dask" if scheduler else executor or "local"
        config = RunnerConfig(jobs or default_jobs(), executor, scheduler, shared_fs, timeout)
        return func(*args, config=config, **kwargs)

    for option in reversed(_RUNNER_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def check_bug_applies(bug: str, mmu: str | None, kernel: str | None) -> None:
    """Refuse ``--bug`` under an MMU or kernel where the bug's code is never compiled in: it could only survive."""
    from kvmpfn.kvm.bugs import BUGS, KERNELS, MMUS

    where = BUGS[bug]
    mmus = "either MMU" if where.mmu == MMUS else f"the {'/'.join(where.mmu)} MMU"
    kernels = "any kernel" if where.kernels == KERNELS else f"kernel {'/'.join(where.kernels)}"
    applies = f"it applies to {mmus} with {kernels}"
    if mmu is not None and mmu not in where.mmu:
        raise click.UsageError(f"--bug {bug} does nothing under the {mmu} MMU ({applies})")
    if kernel is not None and kernel not in where.kernels:
        raise click.UsageError(f"--bug {bug} does nothing under kernel {kernel} ({applies})")
