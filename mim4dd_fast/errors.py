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


def run_command(body: Callable[[], int | None], *, interrupted: str = "interrupted.") -> int:
    """Run a command-line entry point and turn its failures into one line and an exit code.

    UserError (bad path, file, setting, flag): "error: <sentence>", exit 2. DistributedError (another rank
    failed): exit 1. Ctrl-C: ``interrupted``, exit 130. ``--help`` exits 0. Under torchrun every line
    starts with the rank, and the process group is shut down on the way out.
    """
    from .distributed import DistributedError, rank_prefix, shutdown

    try:
        return int(body() or 0)
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 2
    except UserError as exc:
        print(f"{rank_prefix()}error: {exc}", file=sys.stderr)
        return 2
    except DistributedError as exc:
        print(f"{rank_prefix()}error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{rank_prefix()}{interrupted}", file=sys.stderr)
        return 130
    finally:
        shutdown()
