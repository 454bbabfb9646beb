"""Data-parallel fine-tuning over several processes (``torchrun``), with ``torch.distributed``.

Every process (rank) holds the whole base model and the whole delta method; each builds only
its shard of every mini-batch. The loss of a shard is normalised by the *global* numbers of
structures, force components and stress components of the batch, so the sum of the shard
losses is the single-process loss and the all-reduced (summed) gradient is the single-process
gradient. After the all-reduce every rank takes the same optimizer step and the ranks stay
identical without ever broadcasting weights.

Launch::

    torchrun --nproc_per_node 4 -m ase_sparsecalc finetune train.xyz -o delta.safetensors --device cuda

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`distributed_session`
reads them, joins the process group (NCCL on CUDA, gloo on CPU) and gives rank ``r`` the GPU
``cuda:LOCAL_RANK``. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError, PeerStoppedError
from ..torch_setup import resolve_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process sits in a data-parallel run.

    Attributes
    ----------
    rank : int
        0 .. world_size - 1; rank 0 writes files.
    world_size : int
        Number of processes (1: an ordinary single-process run).
    local_rank : int
        Index of the process on its machine (selects its GPU).
    device : str
        The device this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """True for the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when gradients must be all-reduced across processes."""
        return self.world_size > 1


def environment_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the variables ``torchrun`` sets (0, 1, 0 without).

    Raises
    ------
    ValueError
        When the variables are not integers or the rank is out of range.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(
            "WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them); got "
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}, RANK={os.environ.get('RANK')!r}, "
            f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r}"
        ) from exc
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} must lie in [0, WORLD_SIZE={world})")
    return rank, world, local


def current() -> ProcessInfo:
    """This process's place in the initialised process group (rank 0 of 1 when there is none)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return ProcessInfo(rank, world, environment_world()[2] if world > 1 else 0)
    return ProcessInfo()


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a data-parallel run (by process group or env)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return environment_world()[0] == 0


def _process_device(device: str, local_rank: int, world_size: int) -> str:
    """``cuda``/``auto`` on a multi-process run -> ``cuda:LOCAL_RANK``; anything else unchanged."""
    if world_size > 1 and device in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@contextlib.contextmanager
def distributed_session(device: str = "cpu") -> Iterator[ProcessInfo]:
    """Join the process group ``torchrun`` describes for the duration of a fine-tune.

    Without ``WORLD_SIZE > 1`` (an ordinary run) nothing is initialised and the context yields
    rank 0 of 1. A process group initialised by the caller is used as it is and left open; one
    initialised here is destroyed on exit.

    Parameters
    ----------
    device : str
        The requested training device; ``"cuda"`` becomes ``"cuda:LOCAL_RANK"``.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        info = current()
        yield ProcessInfo(
            info.rank,
            info.world_size,
            info.local_rank,
            _process_device(device, info.local_rank, info.world_size),
        )
        return
    rank, world, local = environment_world()
    if world == 1:
        yield ProcessInfo(0, 1, 0, _process_device(device, 0, 1))
        return
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run a single process")
    proc_device = _process_device(device, local, world)
    resolve_device(proc_device)  # "cuda" without a GPU: the usual ConfigError, not torch's
    on_gpu = proc_device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(torch.device(proc_device))
    try:
        dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"WORLD_SIZE={world} asks for a data-parallel run, but torch.distributed could not start "
            f"({exc}); launch with torchrun, which sets MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE"
        ) from exc
    logger.info("data-parallel fine-tuning: rank %d of %d on %s", rank, world, proc_device)
    try:
        yield ProcessInfo(rank, world, local, proc_device)
    except RuntimeError as exc:
        if not _is_peer_gone(exc):
            raise
        raise PeerStoppedError(
            "another process of this data-parallel run stopped (its own error says why) and closed "
            f"the connection ({' '.join(str(exc).split())[:160]})"
        ) from exc
    finally:
        dist.destroy_process_group()


def _is_peer_gone(exc: RuntimeError) -> bool:
    """Whether a collective failed because another process left (gloo and NCCL's words for it)."""
    text = str(exc).lower()
    return any(
        words in text for words in ("connection closed by peer", "connection reset by peer", "broken pipe")
    )


def shard(ids: Sequence[int], info: ProcessInfo) -> list[int]:
    """This rank's part of one batch: every ``world_size``-th entry, starting at ``rank``."""
    return [int(i) for i in ids[info.rank :: info.world_size]]


def all_reduce_gradients(parameters: Sequence[torch.Tensor], loss: torch.Tensor | float) -> float:
    """Sum the gradients (and the loss) of all ranks in one collective call; in place.

    A parameter without a gradient on every rank keeps ``grad = None`` (so the optimizer skips
    it exactly as a single process would); one with a gradient on any rank gets the sum, with
    zeros from ranks where it had none (a rank with an empty shard).

    Parameters
    ----------
    parameters : sequence of Tensor
        The optimizer's parameters, in the same order on every rank.
    loss : Tensor or float
        This rank's share of the loss.

    Returns
    -------
    float
        The summed loss (the loss of the whole batch).
    """
    ref = parameters[0]
    flags = [p.grad is not None for p in parameters]
    flat = torch.cat(
        [
            p.grad.reshape(-1).to(ref.dtype) if p.grad is not None else ref.new_zeros(p.numel())
            for p in parameters
        ]
    )
    head = torch.tensor([float(loss), *map(float, flags)], dtype=torch.float64, device=ref.device)
    torch.distributed.all_reduce(head)
    torch.distributed.all_reduce(flat)
    offset = 0
    for k, p in enumerate(parameters):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype) if head[1 + k] > 0 else None
        offset += n
    return float(head[0])


def all_reduce_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few numbers over all ranks (float64); unchanged without a process group."""
    if not current().distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on any (a collective decision, e.g. to stop)."""
    return all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0


def gather_dicts(local: dict, info: ProcessInfo | None = None) -> dict:
    """Union of one dict per rank (keys are disjoint, e.g. frame ids); unchanged when alone."""
    info = info or current()
    if not info.distributed:
        return local
    parts: list = [None] * info.world_size
    torch.distributed.all_gather_object(parts, local)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged
