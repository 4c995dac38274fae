"""How a vtw_core process uses the CPU: one rule for its thread count and its memory allocator, whatever started it
(the command line, `serve`, the app, a Ray replica).

Threads: one torch thread per process, unless asked for more (`--threads N`, or the environment variable
VTW_THREADS; a Ray replica takes its `num_cpus`). More cores serve more requests through more processes (Ray
replicas) and through batching, not through more threads per process. Why: torch's CPU threads meet at a barrier
after every operator, and when other work takes a core, the whole process waits for the descheduled thread. On
the 2-core development machine with other jobs running (load 3.2-4.0), the embedded default model's baseline
took 975-1301 ms to its first token with 2 threads against 259-422 ms with one (docs/engines.md, "Threads"). On
an idle machine of your own, `--threads` up to its cores is faster for one request at a time.

Memory: glibc hands a request's large buffers back to the system when they are freed, so the next request takes
tens of megabytes of fresh pages from the kernel (page faults, zero-filling) that a warm process would not pay.
Large buffers are kept and never trimmed. With one computing thread, every thread shares one pool too, so the app's
second side reuses the pages its first side freed (glibc otherwise gives each thread a pool of its own). With
OpenMP workers each thread keeps its own pool: the workers allocate in every parallel operator at the same moment,
and on one pool they queue for its lock (two threads, the tuned VTW prefill of the default model: 66 ms against 20
after half a second idle, 20.8 against 17.6 back to back; the compiled one 24.6 against 21.4).

Cores (`--cpus`, or VTW_CPUS; Linux): the threads that compute can be pinned to chosen cores while the server's
own threads (HTTP, JSON, image decoding, streaming) stay free to run on any, as vLLM's CPU backend pins its model
workers (VLLM_CPU_OMP_THREADS_BIND) and leaves its API server and scheduler free. Pinning the whole process
(`taskset`) puts the event loop on the computing core too; on the 2-core development machine the two gave the same
time to the first token (docs/peer-benchmark.md), so pin the computing thread when comparing with vLLM or when
giving each of several servers its own core.

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
CPUS_ENV = "VTW_CPUS"
DEFAULT_THREADS = 1


@dataclass(frozen=True)
class ProcessSettings:
    threads: int
    retained_memory: bool  # glibc's pools set to keep freed memory (False: not glibc, or not asked)

    def describe(self) -> str:
        return cpu_threads(self.threads)


def cpu_threads(count: int) -> str:
    """ "1 CPU thread", "2 CPU threads": how the CLI and the server name a thread count."""
    return f"{count} CPU thread{'s' * (count != 1)}"


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


def retain_freed_memory(threads: int = 1) -> bool:
    """Keep freed memory in malloc's pools, large buffers included, and with one computing thread (`threads`) use a
    single pool for every thread (glibc only; elsewhere nothing changes). See the module's docstring for why."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    settings = [(m_mmap_threshold, 256 << 20), (m_trim_threshold, 1 << 30)]
    if threads == 1:
        settings.append((m_arena_max, 1))
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


def resolve_cpus(text: str | None = None, threads: int = DEFAULT_THREADS) -> frozenset[int] | None:
    """The cores to pin the computing threads to: `text` ("1", "0-3", "0,2-3"), else $VTW_CPUS, else None (no
    pinning). InputError for a malformed list, cores this process may not use, or fewer cores than `threads`."""
    source = "--cpus" if text is not None else CPUS_ENV
    text = os.environ.get(CPUS_ENV, "") if text is None else text
    text = text.strip()
    if not text:
        return None
    if not hasattr(os, "sched_setaffinity"):
        raise InputError(f"{source} needs Linux (thread affinity); leave it unset here")
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or (dash and int(last) < int(first)):
            raise InputError(f"{source} takes cores as 1, 0-3 or 0,2-3; got {text[:40]!r}")
        cpus.update(range(int(first), int(last or first) + 1))
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise InputError(f"{source} names cores {sorted(cpus - allowed)[:8]} that this process cannot use "
                         f"(it may use {cpu_ranges(allowed)})")  # fmt: skip
    if len(cpus) < threads:
        raise InputError(f"{source} names {len(cpus)} core{'s' * (len(cpus) != 1)} for {threads} threads")
    return frozenset(cpus)


def cpu_ranges(cpus: set[int] | frozenset[int]) -> str:
    """Cores as a short list: {0, 1, 2, 5} -> '0-2,5'."""
    ordered, parts = sorted(cpus), []
    for cpu in ordered:
        if parts and cpu == parts[-1][1] + 1:
            parts[-1][1] = cpu
        else:
            parts.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def pin_this_thread(cpus: frozenset[int] | None) -> None:
    """Run the calling thread (and the OpenMP workers it starts from now on) on `cpus` only; None: nothing."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)  # 0: on Linux, the calling thread, not the whole process


def configure_process(threads: int | None = None, *, retain_memory: bool = True) -> ProcessSettings:
    """Apply the rule above to this process (call it before the model's first buffers) and say what it set."""
    import torch

    count = resolve_threads(threads)
    torch.set_num_threads(count)
    return ProcessSettings(count, retain_freed_memory(count) if retain_memory else False)
