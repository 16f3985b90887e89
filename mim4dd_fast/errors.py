"""User-facing errors: one clear sentence, exit code 2 from the CLI, never a traceback.

``run_command`` is the one place every entry point (the CLI, the bench scripts) turns them into exit codes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user (path, file, config, flag, hyperparameter).

    The message is a single sentence that says what is wrong and how to fix it. The CLI prints it
    and exits with code 2.
    """


class DataError(UserError):
    """A dataset could not be read: missing directory, truncated or malformed file, empty class."""


class ConfigError(UserError):
    """A setting is invalid: unknown key, wrong type, out-of-range or non-finite value."""


class NonFiniteError(UserError):
    """Distillation produced NaN/Inf; the message names the setting to lower."""


class FlagError(UserError):
    """A bad command-line flag (argparse's complaint, as one sentence)."""


class OneSentenceParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a FlagError (one sentence, exit code 2) instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise FlagError(message[0].upper() + message[1:] + ("" if message.endswith(".") else "."))


def _one_line(message: str, limit: int = 2000) -> str:
    """The message on one line, with any over-long value cut (a 50 MB setting must not print 50 MB)."""
    import re

    message = " ".join(str(message).split())
    message = re.sub(r"\S{201,}", lambda m: f"{m.group(0)[:60]}...({len(m.group(0))} characters)", message)
    return message if len(message) <= limit else message[:limit] + "..."


def _rank_prefix() -> str:
    # never import torch here: this runs when an import was interrupted (Ctrl-C in the first second)
    dist = sys.modules.get("mim4dd_fast.distributed")
    return dist.rank_prefix() if dist is not None and hasattr(dist, "rank_prefix") else ""


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc)))


def _importing() -> bool:
    """True while some module is being imported (its spec is marked ``_initializing`` by importlib)."""
    return any(getattr(getattr(m, "__spec__", None), "_initializing", False) for m in list(sys.modules.values()))


class _CtrlC:
    """SIGINT handler: KeyboardInterrupt as usual, except in the middle of an import.

    A KeyboardInterrupt inside a C extension's import (numpy under torch) can be swallowed by a bare
    ``except`` and leave a half-imported module behind, which then fails with an unrelated traceback.
    So while an import runs, the interrupt waits (a 50 ms timer looks again) and is raised after it.
    """

    def __init__(self) -> None:
        import signal

        self.signal = signal
        self.previous_alarm = None

    def __call__(self, signum, frame) -> None:
        if not _importing():
            raise KeyboardInterrupt
        if self.previous_alarm is None:
            self.previous_alarm = self.signal.signal(self.signal.SIGALRM, self)
        self.signal.setitimer(self.signal.ITIMER_REAL, 0.05)

    def install(self):
        try:
            return self.signal.signal(self.signal.SIGINT, self)
        except (ValueError, OSError):  # not the main thread: leave Python's own handler
            return None

    def restore(self, previous) -> None:
        if previous is None:
            return
        try:
            self.signal.setitimer(self.signal.ITIMER_REAL, 0)
            if self.previous_alarm is not None:
                self.signal.signal(self.signal.SIGALRM, self.previous_alarm)
            self.signal.signal(self.signal.SIGINT, previous)
        except (ValueError, OSError):
            pass


def run_command(body: Callable[[], int | None], *, interrupted: str = "interrupted.") -> int:
    """Run a command-line entry point and turn its failures into one line and an exit code.

    UserError (bad path, file, setting, flag): "error: <sentence>", exit 2; a full disk or exhausted
    memory: one sentence, exit 2. DistributedError (another rank failed): exit 1. Ctrl-C (also during the
    imports of the first second): ``interrupted``, exit 130. ``--help`` exits 0. Under torchrun every line
    starts with the rank, and the process group is shut down on the way out.
    """
    import errno

    ctrl_c = _CtrlC()
    previous = ctrl_c.install()
    try:
        return int(body() or 0)
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 2
    except UserError as exc:
        print(f"{_rank_prefix()}error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_rank_prefix()}{interrupted}", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" while writing {exc.filename}" if exc.filename else ""
        print(f"{_rank_prefix()}error: {_one_line(exc.strerror or str(exc))}{where}; free some space and run the "
              "command again (a run directory continues with --resume; nothing written before is lost).",
              file=sys.stderr)
        return 2
    except Exception as exc:
        if _out_of_memory(exc):
            print(f"{_rank_prefix()}error: out of memory ({_one_line(str(exc), 300)}); lower the sizes of the run "
                  "(image size, widths, batch sizes, syn_steps).", file=sys.stderr)
            return 2
        dist = sys.modules.get("mim4dd_fast.distributed")
        if dist is not None and isinstance(exc, getattr(dist, "DistributedError", ())):
            print(f"{_rank_prefix()}error: {_one_line(str(exc))}", file=sys.stderr)
            return 1
        raise
    finally:
        ctrl_c.restore(previous)
        dist = sys.modules.get("mim4dd_fast.distributed")
        if dist is not None and hasattr(dist, "shutdown"):
            dist.shutdown()
