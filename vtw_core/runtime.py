"""How a vtw_core process uses the CPU: one rule for its thread count and its memory allocator, whatever started it
(the command line, `serve`, the app, a Ray replica).

Threads: one torch thread per process, unless asked for more (`--threads N`, or the environment variable
VTW_THREADS; a Ray replica takes its `num_cpus`). More cores serve more requests through more processes (Ray
replicas) and through batching, not through more threads per process. Why: torch's CPU threads meet at a barrier
after every operator, and when other work takes a core, the whole process waits for the descheduled thread. On
the 2-core development machine with other jobs running (load 3.2-4.0), the embedded default model's baseline
took 975-1301 ms to its first token with 2 threads against 259-422 ms with one (docs/engines.md, "Threads"). On
an idle machine of your own, `--threads` up to its cores is faster for one request at a time.

Memory: glibc hands a request's large buffers back to the system when they are freed and gives each thread its
own pool, so the next request takes tens of megabytes of fresh pages from the kernel (page faults, zero-filling)
that a warm process would not pay, and the first of two compared runs pays them where the second does not. One
pool, never trimmed, keeps those pages for the next request.

OpenMP workers (with more than one thread): libgomp keeps a team of worker threads for every thread that ever ran
a parallel operator. Once it manages more threads than the process has CPUs, every team's workers go to sleep
right after each operator instead of spinning, and waking them costs 0.1-0.2 ms per operator: small operators run
4-7 times slower. A server loads and warms its model on one thread and answers on another, so it hands the
loading thread's team back (`release_openmp_threads`) before it serves.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from vtw_core.errors import InputError

THREADS_ENV = "VTW_THREADS"
DEFAULT_THREADS = 1


@dataclass(frozen=True)
class ProcessSettings:
    threads: int
    retained_memory: bool  # glibc's pools set to keep freed memory (False: not glibc, or not asked)

    def describe(self) -> str:
        return f"{self.threads} CPU thread{'s' * (self.threads != 1)}"


def resolve_threads(requested: int | None = None) -> int:
    """The thread count: `requested`, else $VTW_THREADS, else one. InputError for anything but a positive integer."""
    if requested is None:
        text = os.environ.get(THREADS_ENV, "").strip()
        if not text:
            return DEFAULT_THREADS
        if not text.isdigit():
            raise InputError(f"{THREADS_ENV} must be a whole number of threads, got {text!r}")
        requested = int(text)
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise InputError(f"the thread count must be at least 1, got {requested!r}")
    return requested


def retain_freed_memory() -> bool:
    """One malloc pool that keeps what it frees, large buffers included (glibc only; elsewhere nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    settings = ((m_arena_max, 1), (m_mmap_threshold, 256 << 20), (m_trim_threshold, 1 << 30))
    return all(mallopt(option, value) == 1 for option, value in settings)


def release_openmp_threads() -> bool:
    """Hand back every idle OpenMP worker team (OpenMP 5's omp_pause_resource_all, "hard"); the thread that computes
    next builds its own. Call it only while no thread runs a parallel operator: after loading and warming the model,
    before serving. True when released; False with one thread (there are no workers) or without libgomp."""
    import ctypes

    import torch

    if torch.get_num_threads() == 1:
        return False
    try:
        pause_all = ctypes.CDLL(None).omp_pause_resource_all
    except (OSError, AttributeError):  # no OpenMP 5 runtime loaded
        return False
    omp_pause_hard = 2
    return pause_all(omp_pause_hard) == 0


def configure_process(threads: int | None = None, *, retain_memory: bool = True) -> ProcessSettings:
    """Apply the rule above to this process (call it before the model's first buffers) and say what it set."""
    import torch

    count = resolve_threads(threads)
    torch.set_num_threads(count)
    return ProcessSettings(count, retain_freed_memory() if retain_memory else False)
