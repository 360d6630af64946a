"""CPU time of processes over a wall-clock window, from Linux's /proc (the bench machine's OS).

A background thread samples the CPU seconds (user + system, every thread) of named process trees
every `interval` seconds; `used(name, t0, t1)` interpolates the samples to the window [t0, t1]
(time.time() seconds). So a run's CPU is its own even when the window is known only afterwards
(AIPerf reports when its first request started, after a start-up of its own), and a process tree
counts the children it has while sampled (AIPerf's workers and record processors).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["proc_cpu_seconds", "tree_pids", "CpuSampler"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int, tid: int | None = None) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:  # gone, or not Linux
        return None
    # "pid (comm) state ppid ..." where comm may hold spaces and parentheses: split after the last ')'
    return text[text.rindex(")") + 2:].split()


def proc_cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of one process (all its threads), or of its thread `tid`; 0 when
    it is gone."""
    fields = _stat_fields(pid, tid)
    return (int(fields[11]) + int(fields[12])) / _TICK if fields else 0.0  # utime, stime: fields 14, 15


def tree_pids(root: int) -> list[int]:
    """`root` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


class CpuSampler:
    """Samples named CPU counters (callables returning CPU seconds) every `interval` s in a thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.counters: dict[str, Callable[[], float]] = {}
        self.samples: dict[str, list[tuple[float, float]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def watch(self, name: str, counter: Callable[[], float]) -> None:
        with self._lock:
            self.counters[name] = counter
            self.samples[name] = []
        self.sample()

    def watch_tree(self, name: str, root: int) -> None:
        """CPU of `root` and its descendants, as found at each sample (a child that exits between
        two samples takes its last interval's CPU with it: negligible for long-lived workers)."""
        self.watch(name, lambda: sum(proc_cpu_seconds(p) for p in tree_pids(root)))

    def unwatch(self, name: str) -> None:
        self.sample()
        with self._lock:
            self.counters.pop(name, None)

    def sample(self) -> None:
        now = time.time()
        with self._lock:
            for name, counter in self.counters.items():
                self.samples[name].append((now, counter()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> CpuSampler:
        self._thread.start()
        return self

    def own_cpu(self) -> float:
        """CPU seconds of the sampling thread itself (a process watching itself subtracts it)."""
        tid = self._thread.native_id
        return proc_cpu_seconds(os.getpid(), tid) if tid is not None else 0.0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def used(self, name: str, t0: float, t1: float) -> float:
        """CPU seconds `name` used between t0 and t1, interpolated between samples; NaN when the
        samples do not cover the window."""
        with self._lock:
            points = list(self.samples.get(name, []))
        if len(points) < 2 or not points[0][0] <= t0 <= t1 <= points[-1][0]:
            return float("nan")
        # A cumulative counter is monotonic: take the running max, so a child's exit cannot make it dip.
        times = np.array([p[0] for p in points])
        cpu = np.maximum.accumulate(np.array([p[1] for p in points]))
        return float(np.interp(t1, times, cpu) - np.interp(t0, times, cpu))
