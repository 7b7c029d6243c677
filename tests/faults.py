"""Kill a command at one of its write points, for the kill-point suites of the cache build and
the trainer.

Every instant between two writes calls ``longkd.fileio.write_point(label, path)``.
:func:`write_points` runs a command in this process with a hook that records those calls;
:func:`kill_at` forks, runs the same command in the child with a hook that SIGKILLs the child
at the chosen point, and waits. The kill is real (no ``finally`` block, no cleanup runs), it
lands at exactly the chosen point rather than after a timed sleep, and the fork costs no
interpreter start or import, so a suite can kill at every point of a run in seconds. The
child computes with one torch thread (as the test suite does), so results compare bitwise.
"""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from longkd import fileio


@dataclass(frozen=True)
class Point:
    """One write point as a run passed it: its position in the run's sequence of points, and
    the path it wrote relative to the run's output directory (the same in every repeat)."""

    index: int
    label: str
    path: str

    def __str__(self) -> str:
        return f"#{self.index} {self.label} {self.path}"


def _relative(path: str, root) -> str:
    return os.path.relpath(path, os.fspath(root))


def write_points(command: Callable[[], object], root) -> list[Point]:
    """Run ``command`` (which writes under ``root``) here; return the write points it passed."""
    seen: list[Point] = []

    def record(label: str, path: str) -> None:
        seen.append(Point(len(seen), label, _relative(path, root)))

    fileio.fault_hook = record
    try:
        command()
    finally:
        fileio.fault_hook = None
    return seen


def kill_at(command: Callable[[], object], point: Point, root) -> None:
    """Run ``command`` (which writes under ``root``) in a forked child that is SIGKILLed at
    ``point``; wait for it.

    Raises:
        AssertionError: the child was not killed there (it finished, failed, or passed a
            different point at that index: the run is not deterministic).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the child only writes files
        pid = os.fork()
    if pid == 0:  # the child: never returns into the test runner
        code = 3
        try:
            import torch

            # OpenMP's worker threads are not copied by fork: a child asking for a team of
            # threads would wait for them forever. One thread needs no team.
            torch.set_num_threads(1)
            count = {"n": 0}

            def kill(label: str, path: str) -> None:
                index = count["n"]
                count["n"] += 1
                if index == point.index:
                    if (label, _relative(path, root)) != (point.label, point.path):
                        os._exit(4)
                    os.kill(os.getpid(), signal.SIGKILL)

            fileio.fault_hook = kill
            command()
            code = 5  # finished without reaching the point
        except BaseException:  # noqa: BLE001 (reported through the exit status)
            code = 6
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    what = {3: "?", 4: "passed another point there", 5: "finished", 6: "raised"}
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"not killed at {point}: {what.get(os.WEXITSTATUS(status), status)}"
    )


def leftovers(root) -> list[str]:
    """Temporary files and directories (``.tmp-`` names) anywhere under ``root``."""
    found = []
    for folder, dirs, files in os.walk(root):
        found += [os.path.join(folder, n) for n in dirs + files if n.startswith(fileio.TEMP_PREFIX)]
    return sorted(found)
