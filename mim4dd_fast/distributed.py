"""Scale-out on torch.distributed: one ``Dist`` object per process, handed to whoever needs the ranks.

Launch any command under ``torchrun`` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
``init_from_env`` joins the process group: NCCL when the run uses CUDA, gloo on CPU. Outside torchrun
it returns ``SINGLE``, whose collectives are no-ops, so every caller has one code path.

Every collective runs with the process group's timeout and is wrapped so that a rank that died or
stopped answering turns into one ``DistributedError`` sentence on the survivors (naming the step
that failed and the timeout) instead of a hang or a C++ traceback.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from .errors import ConfigError

ENV_TIMEOUT = "MIM4DD_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo; raise it when ranks wait longer (uneven expert splits)

T = TypeVar("T")


class DistributedError(Exception):
    """Another rank failed or timed out; this rank stops (the CLI prints the sentence, exit code 1)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size, and collectives with clear failures."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    backend: str = "none"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owned(self, items: Sequence[T]) -> list[T]:
        """This rank's round-robin share: items r, r + N, r + 2N, ..."""
        return list(items[self.rank :: self.world_size])

    def shard(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous share of n positions (torch.tensor_split sizes)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except DistributedError:
            raise
        except (RuntimeError, ValueError, OSError) as exc:  # DistBackendError / DistNetworkError are RuntimeErrors
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed because another rank stopped or did not "
                f"answer within {self.timeout_s:g} s ({detail}); see the other ranks' output for the cause."
            ) from None

    # -- collectives (no-ops on one process) --------------------------------------------------
    def all_reduce_(self, tensor: Tensor, what: str = "all-reduce") -> Tensor:
        """Sum ``tensor`` over ranks in place (identical result on every rank) and return it."""
        if self.enabled:
            import torch.distributed as dist

            with self._guard(what):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def average_(self, tensors: Sequence[Tensor], what: str = "average") -> None:
        """Replace each tensor by its mean over ranks (one flat all-reduce for all of them)."""
        if not self.enabled or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self.all_reduce_(flat, what).div_(self.world_size)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def any(self, flag: bool, what: str = "stop check") -> bool:
        """True on every rank if it is True on any rank (so all ranks stop at the same iteration)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        return bool(self.all_reduce_(t, what).item() > 0)

    def barrier(self, what: str = "barrier") -> None:
        """Wait for every rank; on gloo a monitored barrier names the ranks that did not arrive."""
        if not self.enabled:
            return
        import torch.distributed as dist

        with self._guard(what):
            if self.backend == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=self.timeout_s), wait_all_ranks=True)
            else:
                dist.barrier()

    def gather_objects(self, obj: Any, what: str = "gather") -> list[Any] | None:
        """Rank 0 gets [obj of rank 0, obj of rank 1, ...]; the others get None."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        with self._guard(what):
            dist.gather_object(obj, out, dst=0)
        return out

    def all_gather_objects(self, obj: Any, what: str = "all-gather") -> list[Any]:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        with self._guard(what):
            dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, what: str = "broadcast") -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        with self._guard(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank; a UserError raised there is
        raised on every rank too, so no rank waits for a partner that has already given up."""
        if not self.enabled:
            return fn()
        from .errors import UserError

        outcome: tuple[bool, Any] = (True, None)
        if self.is_main:
            try:
                outcome = (True, fn())
            except UserError as exc:
                outcome = (False, (type(exc), str(exc)))
        ok, value = self.broadcast_object(outcome, what)
        if not ok:
            kind, message = value
            raise kind(message)
        return value

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def describe(self) -> dict[str, Any]:
        """For manifests and logs."""
        return {"world_size": self.world_size, "backend": self.backend}


SINGLE = Dist()


def launched_distributed() -> bool:
    """True when torchrun (or a launcher setting the same variables) started this process with > 1 rank."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def rank_prefix() -> str:
    """``"[rank r] "`` under torchrun (for lines every rank may print, i.e. errors), else ``""``."""
    return f"[rank {os.environ.get('RANK', '?')}] " if launched_distributed() else ""


def resolve_timeout(timeout_s: float | None) -> float:
    """The flag if given, else $MIM4DD_DIST_TIMEOUT, else 30 minutes; ConfigError when not a positive number."""
    raw: Any = timeout_s if timeout_s is not None else os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"The distributed timeout must be a number of seconds, got {raw!r}.") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"The distributed timeout must be a positive number of seconds, got {raw!r}.")
    return value


def init_from_env(timeout_s: float | None = None, device: str = "cpu") -> Dist:
    """Join the torchrun job (NCCL for CUDA runs, gloo otherwise) or return SINGLE when not launched so."""
    timeout = resolve_timeout(timeout_s)
    if not launched_distributed():
        return Dist(timeout_s=timeout)
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        probe = Dist(rank, world, local_rank, timeout, backend)
        with probe._guard("joining the process group"):
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return Dist(rank, world, local_rank, timeout, backend)


EXIT_WAIT_S = 60.0


def shutdown() -> None:
    """Leave the process group together (safe to call when none was joined).

    Ranks meet in a barrier first: a rank tearing gloo down while a partner still talks to it can die
    with SIGABRT at exit (measured with the experts CLI under torchrun: 2 of 23 two-rank runs without
    it, 0 of 25 with it). A partner that does not arrive within EXIT_WAIT_S (dead, or failing
    elsewhere) is not waited for.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_world_size() > 1:
            if dist.get_backend() == "gloo":  # bounded wait first, so a dead partner costs EXIT_WAIT_S at most
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=EXIT_WAIT_S), wait_all_ranks=True)
            dist.barrier()  # then a plain collective: the measured fix
    except (RuntimeError, ValueError, OSError):
        pass
    dist.destroy_process_group()


def rank_device(device: str, ctx: Dist) -> str:
    """``cuda`` becomes ``cuda:<local rank>`` under torchrun so each rank owns one GPU."""
    if ctx.enabled and device == "cuda":
        return f"cuda:{ctx.local_rank}"
    return device
