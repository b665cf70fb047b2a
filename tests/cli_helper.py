"""The real command line in a subprocess, bounded in time and memory: ``python -m kvmpfn ARGS`` with this
checkout first on ``PYTHONPATH`` (the venv's editable install may point at another checkout), at most
``TIMEOUT`` seconds and ``MEMORY_LIMIT`` bytes of address space. A run that takes longer or needs more fails
the test (``TimeoutExpired``; a MemoryError shows as an internal error or a traceback).
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 60
MEMORY_LIMIT = 1 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_kvmpfn(cwd: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """``python -m kvmpfn ARGS`` in ``cwd``; stdout and stderr as bytes."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "kvmpfn", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=TIMEOUT,
        preexec_fn=_limit_memory,
    )


def check_input_error(proc: subprocess.CompletedProcess, where: str, field: str | None, words: str = "") -> str:
    """An input error as the format wants it: exit status 2, exactly one line on stderr, holding ``where``
    (``PATH:LINE: `` or ``PATH: ``; a regex when it starts with ``^``), ``field "FIELD"`` and ``words``; no
    traceback and no internal error anywhere. Returns the line."""
    stdout = proc.stdout.decode("utf-8", "replace")
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    (message,) = lines
    assert message.startswith("kvmpfn: error: "), message
    assert "internal error" not in message and "internal consistency" not in message, message
    if where.startswith("^"):
        assert re.search(where, message.removeprefix("kvmpfn: error: ")), message
    else:
        assert where in message, message
    if field is not None:
        assert f'field "{field}"' in message, message
    assert words in message, message
    return message


def interrupt(*args: str, after: float = 2.5) -> tuple[int, bytes, bytes]:
    """``python -m kvmpfn ARGS``, sent SIGINT (a user's Ctrl-C) after ``after`` seconds: status, stdout, stderr.
    SIGINT is restored to its default in the child (a background job may have inherited it ignored)."""
    import signal
    import time

    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmpfn", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out, err
