"""Process helpers shared by the tests that start and signal child processes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import psutil

# Sets SIGINT back to its default, then becomes the real command (same pid: exec).
_SIGINT_DEFAULT_SHIM = (
    "import os,signal,sys\n"
    "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def gone(pids: list[int], timeout: float = 2.0) -> bool:
    """True when none of ``pids`` is alive (zombies of other parents count as gone)."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return all(p.status() == psutil.STATUS_ZOMBIE for p in alive if p.is_running())


def with_default_sigint(argv: Sequence[str]) -> list[str]:
    """``argv`` started with SIGINT at its default disposition, for tests that send Ctrl-C.

    A pytest started as a background job (``nohup``, ``cmd &`` in a script) inherits SIGINT
    *ignored*, exec keeps it ignored, and Python then installs no KeyboardInterrupt handler:
    the child would never see the test's SIGINT. ``subprocess`` does not reset it
    (``restore_signals`` covers only SIGPIPE, SIGXFZ and SIGXFSZ), and a ``preexec_fn`` is
    unsafe in a process with threads, so a tiny exec shim does it.
    """
    return [sys.executable, "-I", "-S", "-c", _SIGINT_DEFAULT_SHIM, *argv]
