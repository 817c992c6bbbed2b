"""A watchdog that takes the local Ray cluster down with the driver, even after a SIGKILL.

``ray.init()`` starts gcs_server, raylet, agents and workers as descendants of the driver. When
the driver dies without ``ray.shutdown()`` (SIGKILL, the OOM killer), some of them outlive it:
measured with Ray 2.60, ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` were still running
a minute later, orphaned (docs/reliability.md).

:func:`start_reaper` starts this module as a small process in its own session (a Ctrl-C or a
kill of the driver's process group does not reach it) that holds the read end of a pipe whose
write end only the driver has. Every ``SCAN_S`` seconds it records the driver's descendants
(pid and start time, from ``/proc``; those that existed when it started are left alone); when the pipe reports EOF (the driver exited, however),
it SIGKILLs every recorded process that is still the same process, and their descendants, then
exits. Linux only (elsewhere :func:`start_reaper` returns None).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

SCAN_S = 0.5


def start_reaper() -> subprocess.Popen | None:
    """Start the watchdog for this process; close its ``stdin`` to make it clean up now."""
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc"):
        return None
    return subprocess.Popen([sys.executable, "-m", "bevctl.pseudolabel.reaper", str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop_reaper(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """The driver is done with Ray: the watchdog kills what is left and exits."""
    if proc is None:
        return
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        out[int(name)] = (int(fields[1]), int(fields[19]))
    return out


def _descendants(roots: set[int], procs: dict[int, tuple[int, int]]) -> set[int]:
    found = set()
    frontier = set(roots)
    while frontier:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in frontier and pid not in found}
        found |= children
        frontier = children
    return found


def main(driver: int) -> None:
    me = os.getpid()
    procs = _processes()
    before = {(pid, procs[pid][1]) for pid in _descendants({driver}, procs)}  # not ours to kill
    seen: dict[int, int] = {}  # pid -> start time of a descendant the driver started since
    while True:
        ready, _, _ = select.select([sys.stdin.buffer], [], [], SCAN_S)
        procs = _processes()
        for pid in _descendants({driver}, procs) - {me}:
            if (pid, procs[pid][1]) not in before:
                seen.setdefault(pid, procs[pid][1])
        if ready and not sys.stdin.buffer.read(4096):  # EOF: the driver exited (or closed the pipe)
            break
    for _round in range(3):  # a process may still be forking its children
        procs = _processes()
        alive = {pid for pid, start in seen.items() if pid in procs and procs[pid][1] == start}
        targets = (alive | _descendants(alive, procs)) - {me}
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if not targets:
            break
        time.sleep(0.2)


if __name__ == "__main__":
    main(int(sys.argv[1]))
