"""Output files: never one of the inputs, written whole or not at all.

Every file kvmpfn writes (reports, ``--emit``, converted and synthetic traces, baselines) goes through
:class:`AtomicFile`: the bytes go to a temporary file in the target's directory, which replaces the target
only when complete (``os.replace``). On any failure the temporary file is removed and the target is as it
was. A symlinked target is followed (its target is replaced, the link stays) and an existing target keeps its
mode. Before anything is written, :func:`refuse_inputs` compares the output with every input by file identity
(device and inode), so ``replay t.jsonl --emit t.jsonl`` is refused instead of emptying the trace.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import zstandard

from kvmpfn.errors import InputError


class OutputError(InputError):
    """An output that cannot be written, or that would overwrite an input."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(None, f"{path}: {message}")
        self.path = path


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def refuse_inputs(output: str | None, inputs: Iterable[str | None]) -> None:
    """Raise :class:`OutputError` when ``output`` is the same file as one of ``inputs`` (``-`` never is), or
    when its directory does not exist: both are known before any work is done."""
    if output in (None, "-"):
        return
    if not os.path.isdir(os.path.dirname(os.path.realpath(output)) or "."):
        raise OutputError(output, "no such file or directory")
    out_id = _identity(output)
    if out_id is None:
        return
    for path in inputs:
        if path and path != "-" and _identity(path) == out_id:
            raise OutputError(output, f"is an input ({path}); refusing to overwrite it")


def distinct_outputs(outputs: dict[str, str | None]) -> None:
    """Raise :class:`OutputError` when two outputs (option → path) name the same file: one would overwrite the
    other."""
    seen: dict[str, str] = {}
    for option, path in outputs.items():
        if path in (None, "-"):
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise OutputError(path, f"given to both {seen[key]} and {option}; one would overwrite the other")
        seen[key] = option


def _errno_text(err: OSError) -> str:
    return (err.strerror or str(err)).lower()


class AtomicFile(io.RawIOBase):
    """A binary file object for ``path`` that appears there only on :meth:`commit`; a write error is an
    :class:`OutputError` naming ``path``. Use as a context manager: a normal exit commits, an exception discards.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.target = os.path.realpath(path)
        self.tmp: str | None = None
        directory = os.path.dirname(self.target) or "."
        if not os.path.isdir(directory):
            raise OutputError(path, "no such file or directory")
        try:
            if os.path.exists(self.target) and not os.path.isfile(self.target):
                # a device or a pipe (/dev/null, /dev/stdout, a FIFO) is written as it is, never replaced
                if os.path.isdir(self.target):
                    raise OutputError(path, "is a directory")
                self.fh: IO[bytes] = open(self.target, "wb")  # closed by commit()/discard()
                return
            fd, self.tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.target) + ".", dir=directory)
        except OSError as err:
            raise OutputError(path, _errno_text(err)) from None
        self.fh = os.fdopen(fd, "wb", buffering=1 << 16)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            raise OutputError(self.path, _errno_text(err)) from None

    def flush(self) -> None:
        if not self.fh.closed:
            try:
                self.fh.flush()
            except OSError as err:
                raise OutputError(self.path, _errno_text(err)) from None

    def close(self) -> None:
        """Closing the stream object does not commit: :meth:`commit` or :meth:`discard` does."""

    def commit(self) -> None:
        """Flush, give the file the target's mode (or the umask's default) and rename it into place."""
        if self.fh.closed:
            return
        try:
            if self.tmp is None:
                self.fh.close()
                return
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            try:
                mode = stat.S_IMODE(os.stat(self.target).st_mode)
            except FileNotFoundError:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            os.chmod(self.tmp, mode)
            os.replace(self.tmp, self.target)
        except OSError as err:
            self.discard()
            raise OutputError(self.path, _errno_text(err)) from None

    def discard(self) -> None:
        """Drop what was written; the target is untouched."""
        try:
            self.fh.close()
        except OSError:
            pass
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def encode_text(text: str, document: bool = False) -> bytes:
    """UTF-8. In a text report the bytes of an undecodable file name come out as they were; in a ``document``
    (XML, HTML, SARIF: declared UTF-8) and for any other lone surrogate, as a ``\\udcXX`` escape."""
    try:
        return text.encode("utf-8", "strict" if document else "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def write_output(path: str, text: str, inputs: Iterable[str | None] = (), document: bool = False) -> None:
    """Write ``text`` to ``path`` atomically (``-``: standard output), refusing an input as the output."""
    if path == "-":
        write_stdout(text, document)
        return
    refuse_inputs(path, inputs)
    with AtomicFile(path) as fh:
        fh.write(encode_text(text, document))


def write_stdout(text: str, document: bool = False) -> None:
    """``text`` on standard output; a closed or full standard output is an :class:`OutputError`."""
    try:
        if sys.stdout is None:
            raise OSError(9, "Bad file descriptor")
        sys.stdout.buffer.write(encode_text(text, document))
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as err:
        raise OutputError("<stdout>", _errno_text(err) if isinstance(err, OSError) else str(err)) from None


@contextmanager
def open_output(path: str, inputs: Iterable[str | None] = (), *, text: bool = True) -> Iterator[IO[Any]]:
    """A stream for ``path`` (``-``: standard output), compressed by suffix (``.gz``, ``.zst``) and committed
    atomically when the ``with`` block ends normally; an exception leaves the target as it was."""
    if path == "-":
        out: IO[Any] = sys.stdout if text else sys.stdout.buffer
        yield out
        out.flush()
        return
    refuse_inputs(path, inputs)
    atomic = AtomicFile(path)
    try:
        lower = path.lower()
        raw: Any
        if lower.endswith(".gz"):  # no name, mtime 0: the same content gives the same bytes
            raw = gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=atomic, mtime=0)
        elif lower.endswith(".zst"):
            raw = zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(atomic, closefd=False)
        else:
            raw = io.BufferedWriter(atomic, buffer_size=1 << 16)
        stream = io.TextIOWrapper(raw, encoding="utf-8", newline="\n", write_through=False) if text else raw
        yield stream
        stream.flush()
        if text:
            stream.detach()
        if isinstance(raw, io.BufferedWriter):
            raw.flush()
            raw.detach()
        else:
            raw.close()
    except BaseException:
        atomic.discard()
        raise
    atomic.commit()
