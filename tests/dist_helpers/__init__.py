"""Launch multi-process (torch.distributed, gloo on CPU) runs from tests.

    from dist_helpers import run_torchrun, launch_ranks, free_port, rank_env

``run_torchrun(["experts", ...])`` runs ``python -m torch.distributed.run --standalone
--nproc-per-node 2 -m mim4dd_fast experts ...`` and returns the CompletedProcess (stdout and stderr
of all ranks, interleaved by torchrun). ``launch_ranks([...])`` starts the ranks directly, without
torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set by hand), so a test can
kill one rank and watch what the others do without torchrun's own teardown getting in the way.
Every child gets OMP_NUM_THREADS=1 (what torchrun sets) unless ``env`` says otherwise, and runs in
its own session so a timeout kills the whole process tree.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: `-m mim4dd_fast` resolves from here


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment minus any torchrun variables, one thread, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def rank_env(rank: int, world_size: int, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The variables torchrun would set for ``rank`` (single node, master on 127.0.0.1:port)."""
    return child_env({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                      "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                      **(extra or {})})


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_torchrun(args: Sequence[str], *, nproc: int = 2, timeout: float = 180.0, script: str | Path | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc -m mim4dd_fast *args`` (or ``script *args``).

    Returns the CompletedProcess (text, stdout/stderr captured). On timeout the whole tree is
    killed and an AssertionError carries what the ranks printed so far.
    """
    target = [str(script)] if script is not None else ["-m", "mim4dd_fast"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *target, *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun did not finish within {timeout} s: {cmd}\nstdout:\n{out}\nstderr:\n{err}"
                             ) from None
    finally:
        _kill_tree(proc)  # no orphaned ranks, whatever happened
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch_ranks(args: Sequence[str], *, world_size: int = 2, port: int | None = None,
                 script: str | Path | None = None, env: dict[str, str] | None = None,
                 stdout_dir: Path | None = None) -> list[subprocess.Popen]:
    """Start ``world_size`` ranks of ``python -m mim4dd_fast *args`` (or ``script``) directly, no torchrun.

    Returns the Popen objects in rank order (each in its own session; text pipes for stdout and
    stderr). The caller waits for them (``communicate(timeout=...)``) and must call
    ``kill_ranks`` in a ``finally``.
    """
    port = port or free_port()
    target = [str(script)] if script is not None else ["-m", "mim4dd_fast"]
    procs = []
    for rank in range(world_size):
        procs.append(subprocess.Popen([sys.executable, *target, *map(str, args)], cwd=ROOT,
                                      env=rank_env(rank, world_size, port, env), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))
    return procs


def kill_ranks(procs: Sequence[subprocess.Popen]) -> None:
    """SIGKILL every rank still running (and its children); safe to call twice."""
    for proc in procs:
        if proc.poll() is None:
            _kill_tree(proc)
        try:
            proc.communicate(timeout=10)
        except (subprocess.TimeoutExpired, ValueError):
            pass
