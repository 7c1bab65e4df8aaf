"""Pool workers end with their parent, even when the parent is killed with SIGKILL; a record
left by a process tells whether that process still runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from microseg.utils import processes

PARENT = textwrap.dedent(
    """
    import os, sys, time
    from microseg.utils.processes import worker_pool

    def pid_then_sleep(_):
        time.sleep(0.5)
        return os.getpid()

    def sleep(_):
        time.sleep(60)

    use_guard = sys.argv[1] == "1"
    if use_guard:
        pool = worker_pool(2)
    else:
        from concurrent.futures import ProcessPoolExecutor
        pool = ProcessPoolExecutor(max_workers=2)
    pids = set(pool.map(pid_then_sleep, range(4)))
    pool.map(sleep, range(2))
    print(" ".join(map(str, sorted(pids))), flush=True)
    time.sleep(120)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie counts as gone
        return f.read().split()[2] != "Z"


def _orphans_after_parent_killed(guard: bool) -> list[int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PARENT, "1" if guard else "0"], stdout=subprocess.PIPE, text=True
    )
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert pids, "the parent printed no worker pids"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    return left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_killed_parent() -> None:
    assert _orphans_after_parent_killed(guard=False), "plain pool workers should outlive it"
    assert _orphans_after_parent_killed(guard=True) == []


def test_die_with_parent_exits_when_the_parent_is_already_gone() -> None:
    code = "import os; from microseg.utils.processes import die_with_parent; die_with_parent({})"
    assert subprocess.run([sys.executable, "-c", code.format(1)]).returncode == 1
    alive = subprocess.run([sys.executable, "-c", code.format("os.getppid()")])
    assert alive.returncode == 0  # its parent (this test) lives: no exit


def test_identity_of_this_process_is_running() -> None:
    me = processes.identity()
    assert me["pid"] == str(os.getpid()) and me["host"]
    assert processes.is_running(me) is True


def test_a_finished_process_is_not_running() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    who = processes.identity(proc.pid)
    assert processes.is_running(who) is True
    proc.kill()
    proc.wait()
    assert processes.is_running(who) is False


def test_a_reused_pid_is_not_the_same_process() -> None:
    me = processes.identity()
    if not me["start"]:  # no /proc: the start time cannot tell
        return
    assert processes.is_running({**me, "start": str(int(me["start"]) + 1)}) is False


def test_another_machine_or_namespace_cannot_be_told() -> None:
    me = processes.identity()
    assert processes.is_running({**me, "host": "elsewhere"}) is None
    assert processes.is_running({**me, "pidns": "pid:[1]"}) is None
    assert processes.is_running({**me, "pid": ""}) is None
