"""A ``statelens`` run in a subprocess that stops at a chosen write and says so, so that a test signals or
kills it at that moment: no sleeps, no polling against a deadline that a busy machine misses.

Every output is written under a temporary name and renamed (``statelens.outputs.atomic_write``), so
``os.replace`` is the moment a file appears. The child wraps it: at the first rename onto a path matching
``at`` (an ``fnmatch`` pattern, ``*`` crosses folders) it reports the path on a pipe, just ``before`` or
``after`` the rename, and blocks until a signal arrives (``signal.set_wakeup_fd``: the byte the signal
writes wakes it, whichever Python handler statelens has installed). A signal sent before the child
blocks is not lost: its byte is already in the pipe.

    run = PausedRun(["perplexity", ...], at="*/.partial/group-*.npz")
    assert run.paused() is not None          # waits on the pipe (generous timeout), not on the clock
    done = run.finish(signal.SIGINT)         # subprocess.CompletedProcess
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import fnmatch, os, signal, sys

at, when, report = sys.argv[1], sys.argv[2], int(sys.argv[3])
# SIGINT as a terminal gives it (KeyboardInterrupt), also when this test run was started in the background
# by a shell, whose children inherit SIGINT ignored (and Python then leaves it ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
woken, wake = os.pipe()
os.set_blocking(wake, False)
signal.set_wakeup_fd(wake)
replace, paused = os.replace, []


def pause(path):
    paused.append(path)
    os.write(report, (os.fspath(path) + "\n").encode())
    os.read(woken, 1)        # returns once a signal has arrived (after its handler ran)


def replace_then_pause(src, dst, *args, **kwargs):
    hit = not paused and fnmatch.fnmatch(os.fspath(dst), at)
    if hit and when == "before":
        pause(dst)
    replace(src, dst, *args, **kwargs)
    if hit and when == "after":
        pause(dst)


os.replace = replace_then_pause
from statelens.cli.main import main

sys.argv = ["statelens", *sys.argv[4:]]
main()
"""


class PausedRun:
    """``statelens ARGS`` in a subprocess that pauses at its first write onto ``at`` (see the module
    docstring). ``env`` replaces the environment (torchrun ranks); stdout and stderr go to files, so a
    chatty child never blocks on a full pipe."""

    def __init__(self, args: list, at: str, *, when: str = "after", env: dict | None = None):
        if when not in ("before", "after"):
            raise ValueError(f"when={when!r}: 'before' or 'after' the rename")
        read, write = os.pipe()
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen([sys.executable, "-c", CHILD, at, when, str(write), *map(str, args)],
                                        pass_fds=(write,), env=env, stdout=self._out, stderr=self._err, text=True)
        os.close(write)
        self._report = os.fdopen(read)

    def paused(self, timeout: float = 300) -> Path | None:
        """Waits until the child has paused; the path it wrote, or None when it ended (or hung) first."""
        ready, _, _ = select.select([self._report], [], [], timeout)
        line = self._report.readline() if ready else ""
        return Path(line.strip()) if line else None

    def finish(self, signum: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """Sends ``signum`` (if any), waits for the child to exit, and returns what it printed."""
        try:
            if signum is not None and self.process.poll() is None:
                self.process.send_signal(signum)
            self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._report.close()
        printed = []
        for f in (self._out, self._err):
            f.seek(0)
            printed.append(f.read())
            f.close()
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, *printed)


def interrupt(args: list, at: str, signum: int = signal.SIGINT, *, when: str = "after",
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``statelens ARGS``, sends ``signum`` once it has written the first file matching ``at`` (no
    signal when it ended without writing one), and returns the finished process."""
    run = PausedRun(args, at, when=when, env=env)
    return run.finish(signum if run.paused() is not None else None)
