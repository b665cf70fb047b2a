"""The real command line as a user's job: ``python -m kvmpfn ARGS`` started in its own process group (as a shell
starts a foreground job, so Ctrl-C is ``killpg(SIGINT)``), bounded in memory; and what the tests look at from
outside: the processes below it (by ``/proc`` scan, no psutil) and which of them hold a given file open (how an
"OOM killer" here picks the worker replaying a given trace).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvmpfn.synth import SynthSpec, write_synth

REPO = Path(__file__).resolve().parents[1]


def start(
    cwd: Path, *args: str, memory: int = 1 << 30, nofile: int | None = None, pythonpath: str = ""
) -> subprocess.Popen:
    """``python -m kvmpfn ARGS`` in ``cwd``, its own process group, address space at most ``memory`` bytes."""

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.Popen(
        [sys.executable, "-m", "kvmpfn", *args],
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=pythonpath + str(REPO)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=limits,
    )


def _stat(pid: int) -> tuple[int, str] | None:
    """(ppid, state) of ``pid``, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid``."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _stat(int(name))
            if info is not None and info[1] != "Z":
                children.setdefault(info[0], []).append(int(name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if (info := _stat(pid)) is not None and info[1] != "Z"}


def holding(name: str, among: set[int] | None = None) -> set[int]:
    """Processes (of ``among``, or all) with a file named ``name`` open."""
    pids = among if among is not None else {int(p) for p in os.listdir("/proc") if p.isdigit()}
    out = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.path.basename(os.readlink(f"/proc/{pid}/fd/{fd}")) == name:
                    out.add(pid)
                    break
            except OSError:
                continue
    return out


def wait_for(predicate, timeout: float = 30.0, period: float = 0.01):
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    raise AssertionError("timed out waiting")


class Killer(threading.Thread):
    """An out-of-memory killer for tests: SIGKILLs, up to ``times`` times, a process (below ``root``, or any;
    never ``spare`` or its children) that has the trace ``name`` open."""

    def __init__(self, name: str, times: int, root: int | None = None, spare: int | None = None) -> None:
        super().__init__(daemon=True)
        self.name_, self.times, self.root, self.spare = name, times, root, spare
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and len(self.killed) < self.times:
            among = descendants(self.root) if self.root is not None else None
            if among is not None and self.spare is not None:
                among -= {self.spare} | descendants(self.spare)
            for pid in sorted(holding(self.name_, among) - {os.getpid()}):
                if pid not in self.killed:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
            time.sleep(0.005)


#: events of :func:`slow_trace`: most of a second of replay at the fastest rate kvmpfn has (steady, ~100k/s)
SLOW_EVENTS = 80_000


def slow_trace(path: Path, events: int = SLOW_EVENTS, seed: int = 1) -> Path:
    """A clean synth trace that takes a worker most of a second, or more, to replay."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_synth(str(path), SynthSpec("steady", events, seed=seed, mmu="shadow"))
    return path
