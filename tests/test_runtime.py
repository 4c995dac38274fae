"""vtw_core.runtime: one rule for a process's threads (--threads, else $VTW_THREADS, else one) and its allocator."""

from __future__ import annotations

import platform
import sys

import pytest
import torch

from vtw_core.errors import InputError
from vtw_core.runtime import (
    CPUS_ENV,
    DEFAULT_THREADS,
    THREADS_ENV,
    configure_process,
    cpu_ranges,
    resolve_cpus,
    resolve_threads,
)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_come_from_the_argument_then_the_environment_then_the_default(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert DEFAULT_THREADS == 1 and resolve_threads() == 1
    monkeypatch.setenv(THREADS_ENV, " 3 ")
    assert resolve_threads() == 3 and resolve_threads(2) == 2
    monkeypatch.setenv(THREADS_ENV, "")
    assert resolve_threads() == 1


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_environment_value_is_refused_with_its_name(monkeypatch, value):
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(InputError, match=r"VTW_THREADS|at least 1"):
        resolve_threads()


@pytest.mark.parametrize("value", [0, -2, True, 1.5])
def test_a_bad_count_is_refused(value):
    with pytest.raises(InputError, match="at least 1"):
        resolve_threads(value)


def test_configure_process_sets_torch_threads(monkeypatch, restore_threads):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    torch.set_num_threads(2)
    settings = configure_process(retain_memory=False)
    assert torch.get_num_threads() == 1 and settings.threads == 1 and settings.describe() == "1 CPU thread"
    assert configure_process(2, retain_memory=False).describe() == "2 CPU threads" and torch.get_num_threads() == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_retained_on_glibc(restore_threads):
    assert configure_process(1).retained_memory is True


POOLS = """
import ctypes, sys, threading
from vtw_core.runtime import configure_process
configure_process(int(sys.argv[1]))
meet = threading.Barrier(2)
def allocate():
    block = bytearray(1 << 20)  # below the kept-buffer threshold: from this thread's pool
    meet.wait()  # both hold their block at once
    meet.wait()
threads = [threading.Thread(target=allocate) for _ in range(2)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
ctypes.CDLL("libc.so.6").malloc_stats()  # one "Arena i:" section per pool, on stderr
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc pools")
@pytest.mark.parametrize("threads, one_pool", [(1, True), (2, False)])
def test_one_malloc_pool_only_for_one_computing_thread(threads, one_pool):
    """One thread: every thread allocates from one pool (the app's sides share freed pages). OpenMP workers keep a
    pool per thread, or they would queue on its lock in every parallel operator."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", POOLS, str(threads)], capture_output=True, text=True, check=True)
    pools = done.stderr.count("Arena ")
    assert pools == 1 if one_pool else pools >= 3, done.stderr  # the main thread's and each allocating thread's


def test_every_command_that_loads_a_model_takes_threads_and_applies_the_rule(monkeypatch, restore_threads):
    from vtw_core import cli

    monkeypatch.setenv(THREADS_ENV, "2")
    seen = {}

    def handler(args):
        seen[args.command] = (args.process.threads, torch.get_num_threads())

    parser = cli.build_parser()
    required = {"generate": ["--prompt", "x"], "attention": ["--prompt", "x"]}
    for command in ("generate", "bench", "search-k", "attention", "schedule-search", "eval", "serve"):
        assert parser.parse_args([command, "--threads", "1", *required.get(command, [])]).threads == 1
    monkeypatch.setattr(cli, "build_parser", lambda: _Parser(parser, handler))
    assert cli.main(["bench"]) == 0 and seen["bench"] == (2, 2)  # $VTW_THREADS
    assert cli.main(["bench", "--threads", "1"]) == 0 and seen["bench"] == (1, 1)


class _Parser:
    """build_parser's parser with every handler replaced (the rule is applied before a handler runs)."""

    def __init__(self, parser, handler):
        self.parser, self.handler = parser, handler

    def parse_args(self, argv):
        args = self.parser.parse_args(argv)
        args.handler = self.handler
        return args


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts the threads in /proc")
def test_idle_openmp_workers_are_handed_back():
    """The loading thread's OpenMP workers go (so the serving thread's workers spin between operators, not sleep);
    the next parallel operator starts a team again. With one thread there is nothing to release."""
    import subprocess

    code = (
        "import os, torch\n"
        "from vtw_core.runtime import release_openmp_threads\n"
        "def threads(): return len(os.listdir('/proc/self/task'))\n"
        "torch.set_num_threads(1)\n"
        "print(release_openmp_threads())\n"
        "torch.set_num_threads(2)\n"
        "torch.ones(1_000_000).mul_(2)\n"  # a parallel operator: this thread's team of workers starts
        "before = threads()\n"
        "print(release_openmp_threads(), before - threads())\n"
        "torch.ones(1_000_000).mul_(2)\n"
        "print(threads() - before)\n"
    )
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert lines == ["False", "True", "1", "0"]


linux_only = pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="thread affinity is Linux's")


@linux_only
def test_cpu_lists_are_read_from_the_argument_then_the_environment(monkeypatch):
    import os

    allowed = sorted(os.sched_getaffinity(0))
    first, last = allowed[0], allowed[-1]
    monkeypatch.delenv(CPUS_ENV, raising=False)
    assert resolve_cpus(None) is None and resolve_cpus("  ") is None  # no pinning unless asked
    assert resolve_cpus(str(first)) == {first}
    assert resolve_cpus(f"{first}-{first}, {last}") == {first, last}
    monkeypatch.setenv(CPUS_ENV, str(last))
    assert resolve_cpus(None) == {last}
    assert cpu_ranges({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"


@linux_only
@pytest.mark.parametrize("text", ["one", "1-", "3-1", "-1", "1,,2", "0x1"])
def test_a_malformed_cpu_list_is_refused(text):
    with pytest.raises(InputError, match="--cpus takes cores as"):
        resolve_cpus(text)


@linux_only
def test_cores_the_process_cannot_use_or_too_few_for_the_threads_are_refused(monkeypatch):
    import os

    first = min(os.sched_getaffinity(0))
    with pytest.raises(InputError, match="cannot use"):
        resolve_cpus("100000")
    with pytest.raises(InputError, match="1 core for 2 threads"):
        resolve_cpus(str(first), threads=2)
    monkeypatch.setenv(CPUS_ENV, "zero")
    with pytest.raises(InputError, match=CPUS_ENV):
        resolve_cpus(None)
