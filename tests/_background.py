"""Subprocess-only tests, run behind the rest of the suite.

A few tests only start a command (the GPU-suite script on the CPU, the Triton compile check) and
read what it printed: one Python process each, mostly single-threaded, while the in-process tests
keep one core busy too. A test module declares such commands with :func:`declare` at import;
after collection, ``conftest.py`` calls :func:`start` with the selected tests, and one worker thread
runs their commands one at a time while the other tests run. A test asks for its command's result
with :func:`result`: it waits for a running command, or runs a queued one at once itself, so a test
never waits behind another test's command, and a test selected alone behaves as before.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field

_lock = threading.Lock()
_declared: dict[str, "Job"] = {}
_queue: list[str] = []
_worker: threading.Thread | None = None


@dataclass
class Job:
    name: str
    args: list
    env: dict
    cwd: str
    timeout: float
    tests: tuple  # "module::test_function" names whose selection starts this job
    state: str = "declared"  # declared -> queued -> running -> done
    done: threading.Event = field(default_factory=threading.Event)
    completed: subprocess.CompletedProcess | None = None
    error: BaseException | None = None


def declare(name: str, args, *, env=None, cwd=None, timeout: float = 600, tests=()) -> None:
    """Declare the command ``args`` under ``name``, started in the background when one of
    ``tests`` ("module::test_function", e.g. ``f"{__name__}::test_x"``) is selected."""
    with _lock:
        _declared[name] = Job(name, list(map(str, args)), dict(os.environ if env is None else env),
                              str(cwd or os.getcwd()), timeout, tuple(tests))


def _run(job: Job) -> None:
    try:
        job.completed = subprocess.run(job.args, env=job.env, cwd=job.cwd, capture_output=True, text=True,
                                       timeout=job.timeout)
    except BaseException as error:  # reported by result() in the test that asks
        job.error = error
    finally:
        job.state = "done"
        job.done.set()


def _work() -> None:
    while True:
        with _lock:
            if not _queue:
                return
            job = _declared[_queue.pop(0)]
            job.state = "running"
        _run(job)


def start(selected_test_names) -> None:
    """Queue the declared jobs whose tests are among ``selected_test_names`` and start the worker."""
    global _worker
    names = set(selected_test_names)
    with _lock:
        for job in _declared.values():
            if job.state == "declared" and names & set(job.tests):
                job.state = "queued"
                _queue.append(job.name)
        if _queue and (_worker is None or not _worker.is_alive()):
            _worker = threading.Thread(target=_work, name="background-tests", daemon=True)
            _worker.start()


def result(name: str) -> subprocess.CompletedProcess:
    """The finished command ``name``: waited for, or run now when it has not started."""
    with _lock:
        job = _declared[name]
        run_here = job.state in ("declared", "queued")
        if run_here:
            if job.name in _queue:
                _queue.remove(job.name)
            job.state = "running"
    if run_here:
        _run(job)
    job.done.wait()
    if job.error is not None:
        raise job.error
    return job.completed


def scratch_dir(prefix: str) -> str:
    """A fresh directory for a declared command's files (declared before any test runs, so not
    pytest's ``tmp_path``); removed with the system's temporary files."""
    return tempfile.mkdtemp(prefix=f"l2m_{prefix}_")
