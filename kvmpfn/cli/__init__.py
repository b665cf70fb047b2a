"""The kvmpfn command line (click): one module per command group; shared options in :mod:`.options`.

This module is the boundary: every error surfaces here as one ``kvmpfn: error: ...`` line with exit status 2
(usage and input errors alike), Ctrl-C as exit status 130, and a defect in kvmpfn as one line (``--debug``
shows its traceback).
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
import traceback
from typing import Any

import click

from kvmpfn import __version__, native
from kvmpfn.cli.options import suggest, warn
from kvmpfn.errors import KvmpfnError

EXAMPLES = """
\b
Examples:
  kvmpfn replay trace.jsonl                      what the MMU did, every finding with its provenance
  kvmpfn replay trace.jsonl --bug same-pfn-no-release
  kvmpfn audit traces/                           the CI gate: every trace against its baseline
  kvmpfn codes refcount-leak                     what a finding code means
  kvmpfn bugs                                    the historical bugs --bug re-creates
"""

#: ``--debug`` was given: show tracebacks of defects instead of one line
DEBUG = False


class KvmpfnGroup(click.Group):
    """The top-level group: "did you mean" for a mistyped command, one error style, exit 130 on Ctrl-C."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name = args[0] if args else ""
        if name and self.get_command(ctx, name) is None and not name.startswith("-"):
            raise click.UsageError(f"no command {name!r}{suggest(name, self.list_commands(ctx))}", ctx)
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # before click turns it into exit status 1
            raise _ReaderGone from None

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:  # type: ignore[override]
        extra.pop("standalone_mode", None)  # errors are always reported here, in one style
        if not (sys.argv[1:] if args is None else args):
            args = ["--help"]  # `kvmpfn` alone: the help, not an error
        for name in ("stdin", "stdout", "stderr"):
            if getattr(sys, name) is None:  # started with the descriptor closed (`kvmpfn audit >&-`)
                setattr(sys, name, _Closed(f"<{name}>"))
        try:
            status = super().main(args, prog_name="kvmpfn", standalone_mode=False, **extra)
        except click.exceptions.Exit as exit_:
            status = exit_.exit_code
        except SystemExit as exit_:  # a command's sys.exit(status)
            status = exit_.code
        except click.ClickException as err:
            _error(_usage_message(err))
            status = err.exit_code if isinstance(err, click.UsageError) else 2
        except (click.Abort, KeyboardInterrupt):
            click.echo("kvmpfn: interrupted", err=True)
            status = 130
        except KvmpfnError as err:
            _error(str(err))
            status = 2
        except (BrokenPipeError, _ReaderGone):  # the reader of our output went away (`kvmpfn audit | head`)
            _stdout_gone()
            status = 141  # as a shell reports a process that SIGPIPE ended
        except OSError as err:  # a standard stream that fails (closed, full disk)
            _error(f"{err.filename or 'output'}: {(err.strerror or str(err)).lower()}")
            status = 2
        except Exception as exc:  # a defect in kvmpfn: one line, or the traceback with --debug
            if DEBUG:
                traceback.print_exception(exc)
            _error(f"internal error: {type(exc).__name__}: {exc} (--debug shows the traceback)")
            status = 2
        if status == 130:  # exiting anyway: a late Ctrl-C during shutdown must not turn 130 into a signal death
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.exit(status if isinstance(status, int) else 0)


class _ReaderGone(Exception):
    """Standard output's reader closed the pipe: nothing more to say, and nowhere to say it."""


class _Closed(io.RawIOBase):
    """A standard stream the process was started without: every read or write fails with EBADF."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.buffer = self

    def isatty(self) -> bool:
        return False

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        raise OSError(errno.EBADF, "bad file descriptor (closed when kvmpfn started)")

    def write(self, b: Any) -> int:
        raise OSError(errno.EBADF, "bad file descriptor (closed when kvmpfn started)")


def _stdout_gone() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not complain about the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _usage_message(err: click.ClickException) -> str:
    message = err.format_message()
    ctx = getattr(err, "ctx", None)
    if isinstance(err, click.UsageError) and ctx is not None:
        return f"{ctx.command_path}: {message} (see {ctx.command_path} --help)"
    return message


def _error(message: str) -> None:
    try:
        click.echo(f"kvmpfn: error: {message}", err=True)
    except (OSError, ValueError):  # stderr closed
        pass


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    global DEBUG
    DEBUG = DEBUG or value
    return value


@click.group(cls=KvmpfnGroup, epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvmpfn")
@click.option(
    "--debug", is_flag=True, expose_value=False, callback=_set_debug, help="Show tracebacks of internal errors."
)
def main() -> None:
    """Replay guest page-fault traces through a simulated 2008 x86 KVM MMU and audit every pfn reference."""
    if native.STALE:
        warn(f"{native.STALE}: running the pure-Python simulator (slower); `make install` compiles it again")


def _register() -> None:
    from kvmpfn.cli import audit, inspect, merge, mutants, realinput, reduce, reference, replay, synth

    for module in (replay, audit, merge, inspect, mutants, reduce, reference, realinput, synth):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
