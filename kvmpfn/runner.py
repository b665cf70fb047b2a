"""One runner for "replay this trace with these options" tasks (``audit``, ``mutants``, ``compare``), on a local
process pool or a dask.distributed cluster, results in submission order.

A task is ``fn(open_path, shown_path, options)``: a module-level function (so that it pickles by name) that
replays the trace at ``open_path``, names it ``shown_path`` in what it returns, and returns something small and
picklable. :func:`run` yields ``(k, result)`` for task k in order k = 0, 1, ... whatever order the workers
finish in; a task the runner could not get a result for yields a :class:`Failure` instead. Guarantees:

- A worker that dies (killed, out of memory) loses only its task. Local pool: the tasks that were running in
  the broken pool are run again, one at a time; a task that kills its worker alone is a :class:`Failure`.
  dask: the scheduler retries a task whose worker died (``distributed.scheduler.allowed-failures``, 1 on the
  ``LocalCluster`` this module starts); a task it gives up on is run again alone (it may only have been queued
  on the worker that another task killed), and if that fails too it is a :class:`Failure`. The other tasks
  still run.
- ``timeout`` seconds per task: a :class:`Failure` naming the limit (local workers stop by an alarm; a worker
  that ignores it is killed ``GRACE`` seconds later; on dask the task is given up ``GRACE`` seconds later and
  its worker finishes the replay unobserved).
- Ctrl-C: running tasks are cancelled (local workers killed) and ``KeyboardInterrupt`` propagates after the
  results already yielded; from then on a second Ctrl-C exits the process at once (status 130).
- Closing the generator early (``--fail-fast``) cancels what is still running.
- A path that is not a regular file (a FIFO, a device) is a :class:`Failure` before anything opens it.
- Local workers die with their parent (``PR_SET_PDEATHSIG`` on Linux and a parent-pid watchdog), ignore
  Ctrl-C (the parent decides), and write to ``/dev/null``: results come back pickled, never on the caller's
  stdout or stderr. ``jobs`` is clamped to what the file-descriptor limit allows, with a warning.

With ``executor="dask"`` the workers get each trace's bytes (and the ELF memory image its header names) with
the task, unless ``shared_fs`` says every worker sees the same paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import re
import resource
import signal
import stat
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from kvmpfn.errors import InputError
from kvmpfn.replay import ReplayOptions

EXECUTORS = ("local", "dask")
GRACE = 5.0  # seconds past the timeout before a silent local worker is killed
WATCHDOG_PERIOD = 0.5  # seconds between two checks of a local worker that its parent is alive
FDS_PER_WORKER = 4  # descriptors the parent holds per local worker (pipes, sentinel), with margin
FDS_RESERVED = 24  # descriptors kept for the parent's own files (traces it stats, reports, baselines)


@dataclass(frozen=True)
class Task:
    """Replay ``path`` with ``options`` by calling ``fn`` in a worker."""

    fn: Callable[[str, str, ReplayOptions], Any]
    path: str
    options: ReplayOptions


@dataclass(frozen=True)
class RunnerConfig:
    """Where tasks run: ``jobs`` local processes, or a dask cluster (``scheduler`` address, or a LocalCluster of
    ``jobs`` workers on the loopback interface when ``None``)."""

    jobs: int = 1
    executor: str = "local"
    scheduler: str | None = None
    shared_fs: bool = False
    timeout: float | None = None


@dataclass(frozen=True)
class Failure:
    """No result for a task: ``message`` is one line naming the trace."""

    message: str


class TaskTimeout(BaseException):
    """Raised in a worker by the timeout alarm (a BaseException: the replay's own handlers let it through)."""


def default_jobs() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


# -- the worker side ---------------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), and watch the parent's pid."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCHDOG_PERIOD)
        os._exit(1)

    threading.Thread(target=watch, name="kvmpfn-parent-watchdog", daemon=True).start()


def _quiet_stdio() -> None:
    """Standard input, output and error on /dev/null: the caller's pipes are not held open by workers."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _init_local_worker(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    _quiet_stdio()


def _watch_pid(pid: int) -> None:
    """In a dask worker of a LocalCluster we started: exit when our process ``pid`` is gone; stdio on
    /dev/null."""

    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except OSError:
                pass
            time.sleep(WATCHDOG_PERIOD)

    if not any(t.name == "kvmpfn-parent-watchdog" for t in threading.enumerate()):
        _quiet_stdio()
        threading.Thread(target=watch, name="kvmpfn-parent-watchdog", daemon=True).start()


def _guard_plugin(base: type, pid: int) -> Any:
    """A dask WorkerPlugin that runs :func:`_watch_pid` in every worker, restarted ones included (the nannies
    of a LocalCluster live in this process; the workers are its children)."""

    class Guard(base):  # type: ignore[misc, valid-type]
        name = "kvmpfn-guard"

        def setup(self, worker: Any) -> None:
            _watch_pid(pid)

    return Guard()


def _alarm(seconds: float | None) -> None:
    if seconds and threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, seconds if seconds > 0 else 0)


def _on_alarm(signum: int, frame: Any) -> None:
    raise TaskTimeout


def _execute(task: Task, payload: dict | None, timeout: float | None) -> Any:
    """Run one task in a worker: materialise shipped bytes (``payload["trace"]``) or open the absolute path
    (``payload["path"]``, a shared file system), arm the alarm, turn a defect into a Failure."""
    shipped = payload is not None and "trace" in payload
    with tempfile.TemporaryDirectory(prefix="kvmpfn-task-") if shipped else contextlib.nullcontext() as tmp:
        open_path = _materialise(tmp, task.path, payload) if shipped else (payload or {}).get("path", task.path)
        previous = None
        if timeout and threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGALRM, _on_alarm)
        try:
            _alarm(timeout)
            return task.fn(open_path, task.path, task.options)
        except TaskTimeout:
            return Failure(f"{task.path}: timed out after {timeout:g} s (--timeout)")
        except Exception as exc:  # a defect in kvmpfn: this trace's error, not a dead run
            return Failure(f"{task.path}: internal error: {type(exc).__name__}: {exc}")
        finally:
            _alarm(-1)
            if previous is not None:
                signal.signal(signal.SIGALRM, previous)


def _materialise(tmp: str, path: str, payload: dict) -> str:
    """Write the shipped trace (same file name, so its compression is known) and its memory image, at the
    image's path relative to the trace; returns the trace's path."""
    memory = payload.get("memory")
    depth = 0
    if memory is not None:
        depth = max(0, os.path.normpath(memory[0]).split(os.sep).count(".."))
    directory = os.path.join(tmp, *(["d"] * (depth + 1)))
    os.makedirs(directory)
    trace = os.path.join(directory, os.path.basename(path))
    with open(trace, "wb") as fh:
        fh.write(payload["trace"])
    if memory is not None:
        image = os.path.normpath(os.path.join(directory, memory[0]))
        os.makedirs(os.path.dirname(image), exist_ok=True)
        with open(image, "wb") as fh:
            fh.write(memory[1])
    return trace


# -- the caller side ---------------------------------------------------------------------------------------


def not_regular(path: str) -> str | None:
    """Why ``path`` cannot be replayed without risk of blocking (a FIFO, a device, a directory), else None.
    A missing file is left to the replay, which names it."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return None
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "a device or socket"
    return f"{path}: not a regular file ({kind}); refusing to read it"


def _payload(path: str) -> dict:
    """The bytes a remote worker needs: the trace, and the memory image its header names (if readable)."""
    from kvmpfn.trace.reader import open_trace

    with open(path, "rb") as fh:
        payload: dict[str, Any] = {"trace": fh.read(), "memory": None}
    try:
        with open_trace(path) as reader:
            memory = reader.header.memory
    except InputError:
        return payload  # the worker reports the header's error
    if memory is not None and not os.path.isabs(memory):
        image = os.path.join(os.path.dirname(path), memory)
        if not_regular(image) is None and os.path.isfile(image):
            with open(image, "rb") as fh:
                payload["memory"] = (memory, fh.read())
    return payload


def per_worker(options: ReplayOptions, workers: int) -> ReplayOptions:
    """``options`` for one of ``workers`` local processes: without ``--max-memory`` each gets an equal share of
    the default (half the machine), so that together they stay within it."""
    if options.max_memory is not None or workers <= 1:
        return options
    from kvmpfn.limits import default_max_memory

    return dataclasses.replace(options, max_memory=default_max_memory() // workers)


def clamp_jobs(jobs: int, warn: Callable[[str], None] | None = None) -> int:
    """``jobs``, or fewer when the file-descriptor limit cannot hold that many workers (raising the soft limit
    first when the hard one allows)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = FDS_RESERVED + _open_fds() + FDS_PER_WORKER * jobs
    if soft != resource.RLIM_INFINITY and need > soft:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft == resource.RLIM_INFINITY:
        return jobs
    fit = max(1, (soft - FDS_RESERVED - _open_fds()) // FDS_PER_WORKER)
    if fit < jobs:
        if warn is not None:
            warn(f"--jobs {jobs} clamped to {fit}: only {soft} open files are allowed (ulimit -n)")
        return fit
    return jobs


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 16


class _InProcess:
    """``--jobs 1`` locally: tasks run here, one by one (no worker to lose)."""

    window = 1

    def submit(self, task: Task, timeout: float | None) -> Future:
        future: Future = Future()
        try:
            future.set_result(_execute(task, None, timeout))
        except BaseException as exc:  # KeyboardInterrupt: to the caller
            future.cancel()
            raise exc from None
        return future

    def reset(self) -> None:
        pass

    def close(self, cancel: bool) -> None:
        pass


class _LocalPool:
    """A ProcessPoolExecutor of ``jobs`` workers that die with this process; rebuilt after a worker dies."""

    def __init__(self, jobs: int) -> None:
        self.jobs = self.window = jobs
        self.pool: ProcessPoolExecutor | None = None

    def submit(self, task: Task, timeout: float | None) -> Future:
        if self.pool is None:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            self.pool = ProcessPoolExecutor(self.jobs, context, initializer=_init_local_worker, initargs=(os.getpid(),))
        return self.pool.submit(_execute, task, None, timeout)

    def reset(self) -> None:
        """Kill every worker and forget the pool (a new one starts with the next task)."""
        self.close(cancel=True)

    def close(self, cancel: bool) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return
        if cancel:
            processes = list((getattr(pool, "_processes", None) or {}).values())
            for process in processes:
                with contextlib.suppress(Exception):
                    process.kill()
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.join(2)
        else:
            pool.shutdown(wait=True)


class _DaskPool:
    """A dask.distributed client, through its ``concurrent.futures`` executor."""

    def __init__(self, config: RunnerConfig) -> None:
        try:
            import dask
            from distributed import Client, LocalCluster, WorkerPlugin
        except ImportError:
            raise InputError(None, "--executor dask needs dask.distributed: pip install 'kvmpfn[dask]'") from None
        import logging

        self.cluster = None
        self.shared_fs = config.shared_fs
        # dask's advice ("large graph", "port in use") is not for kvmpfn's users
        warnings.filterwarnings("ignore", category=UserWarning, module=r"distributed(\..*)?$")
        if config.scheduler and not re.fullmatch(r"[a-z]+://[^\s/]+:\d+", config.scheduler):
            raise InputError(None, f"--scheduler {config.scheduler!r}: expected an address like tcp://HOST:PORT")
        try:
            if config.scheduler:
                self.client = Client(config.scheduler, timeout=15, set_as_default=False)
            else:
                with dask.config.set({"distributed.scheduler.allowed-failures": 1, "logging.distributed": "error"}):
                    self.cluster = LocalCluster(
                        n_workers=config.jobs,
                        threads_per_worker=1,
                        processes=True,
                        host="127.0.0.1",
                        dashboard_address="127.0.0.1:0",
                        worker_dashboard_address="127.0.0.1:0",
                        scheduler_kwargs={"dashboard": False},
                        silence_logs=logging.CRITICAL,
                    )
                self.client = Client(self.cluster, set_as_default=False)
                self.client.register_plugin(_guard_plugin(WorkerPlugin, os.getpid()))
        except OSError as err:
            where = config.scheduler or "a LocalCluster"
            raise InputError(None, f"cannot connect to the dask scheduler {where}: {err}") from None
        self.executor = self.client.get_executor(pure=False)
        self.window = 2 * max(1, len(self.client.scheduler_info().get("workers", {})) or config.jobs)

    def submit(self, task: Task, timeout: float | None) -> Future:
        payload = {"path": os.path.abspath(task.path)} if self.shared_fs else _payload(task.path)
        return self.executor.submit(_execute, task, payload, timeout)

    def reset(self) -> None:
        pass

    def close(self, cancel: bool) -> None:
        with contextlib.suppress(Exception):
            self.executor.shutdown(wait=not cancel)
        with contextlib.suppress(Exception):
            self.client.close(timeout=5)
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close(timeout=5)


def _died(path: str) -> str:
    return f"{path}: the worker replaying it died, and again on the retry (killed, out of memory?)"


def _killed_worker(exc: BaseException) -> bool:
    return type(exc).__name__ == "KilledWorker"


def run(
    tasks: Sequence[Task],
    config: RunnerConfig,
    *,
    on_done: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Iterator[tuple[int, Any]]:
    """Run ``tasks``; yields ``(k, result or Failure)`` in order of k. ``on_done(k)`` as each task finishes."""
    if config.executor not in EXECUTORS:
        raise InputError(None, f"--executor {config.executor!r}: one of {', '.join(EXECUTORS)}")
    n = len(tasks)
    if config.executor == "dask":
        pool: Any = _DaskPool(config)
    else:
        jobs = min(config.jobs, n)
        if jobs > 1:
            jobs = clamp_jobs(jobs, warn)
            tasks = [dataclasses.replace(t, options=per_worker(t.options, jobs)) for t in tasks]
        pool = _InProcess() if jobs <= 1 else _LocalPool(jobs)
    pending = deque(range(n))
    suspects: deque[int] = deque()  # were running when a local worker died: re-run alone
    running: dict[Future, tuple[int, float, bool]] = {}  # future → (task, start, alone)
    results: dict[int, Any] = {}
    next_out = 0
    cancel = True
    done_cb = on_done or (lambda k: None)

    def finish(k: int, result: Any) -> None:
        results[k] = result
        done_cb(k)

    try:
        while next_out < n:
            while (suspects and not running) or (not suspects and pending and len(running) < pool.window):
                alone = bool(suspects)
                k = suspects.popleft() if alone else pending.popleft()
                why = not_regular(tasks[k].path)
                if why is not None:
                    finish(k, Failure(why))
                    continue
                running[pool.submit(tasks[k], config.timeout)] = (k, time.monotonic(), alone)
            if running:
                finished, _ = wait(list(running), timeout=0.25, return_when=FIRST_COMPLETED)
            else:
                finished = set()
            broken = False
            for future in finished:
                k, _start, alone = running.pop(future)
                try:
                    finish(k, future.result())
                except BrokenProcessPool:
                    broken = True
                    if alone:
                        finish(k, Failure(_died(tasks[k].path)))
                    else:
                        suspects.append(k)
                except Exception as exc:
                    if _killed_worker(exc) and alone:
                        finish(k, Failure(_died(tasks[k].path)))
                    elif _killed_worker(exc):  # maybe it only ran beside the task that kills workers
                        suspects.append(k)
                    else:
                        finish(k, Failure(f"{tasks[k].path}: internal error: {type(exc).__name__}: {exc}"))
            if broken:  # every task of the broken pool is a suspect; the pool starts afresh
                suspects = deque(sorted([*suspects, *(k for k, _s, _a in running.values())]))
                running.clear()
                pool.reset()
            if config.timeout:
                now = time.monotonic()
                late = [f for f, (_k, start, _a) in running.items() if now - start > config.timeout + GRACE]
                for future in late:
                    k = running.pop(future)[0]
                    future.cancel()
                    finish(k, Failure(f"{tasks[k].path}: timed out after {config.timeout:g} s (--timeout)"))
                if late and isinstance(pool, _LocalPool):
                    pending.extendleft(sorted((k for k, _s, _a in running.values()), reverse=True))
                    running.clear()
                    pool.reset()
            while next_out in results:
                yield next_out, results.pop(next_out)
                next_out += 1
        cancel = False
    except KeyboardInterrupt:
        with contextlib.suppress(ValueError):  # from now on a second Ctrl-C exits at once
            signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
        raise
    finally:
        for future in running:
            future.cancel()
        pool.close(cancel=cancel)
