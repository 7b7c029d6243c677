"""The processes of one torchrun job: ranks from the environment, the process group, collectives.

    torchrun --nproc-per-node 8 -m longkd cache build ...     # or: -m longkd train run.yaml

Both the cache build and the trainer run one process per GPU under torchrun and need the
same few things, which live here:

- :func:`env_world` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by torchrun), or
  ``(0, 1, 0)`` without them.
- :class:`Group` starts the process group (gloo on CPU, nccl on CUDA with device
  ``cuda:LOCAL_RANK``) and offers the collectives the parts use. Without torchrun's
  variables it is a one-process group whose collectives are no-ops, so the single-process
  code path is the same code.
- :meth:`Group.agree` all-gathers a hash of each rank's settings before anything is written
  and refuses, on every rank with the same one-line message, if any rank differs.
- :meth:`Group.rank0` runs a step on rank 0 only (creating a file, writing a manifest) and
  hands its result, or its error, to every rank, so no rank is left waiting in a collective
  for a peer that failed.
- :class:`TensorParallel` splits the ranks into groups of N consecutive ranks that hold one
  model between them (a teacher larger than one GPU), with a collective inside the group.

What each part does with the ranks is its own: cache/distributed.py (the ranks' shards of
a build), trainer/distributed.py (DDP / FSDP).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os

from longkd.errors import LongkdError

# Ranks finish their shares at different times (a resumed rank may have little left), and the
# last collective waits for the slowest one; a collective timeout shorter than the build
# would kill a healthy job. torchrun tears the job down when a worker dies, so a long
# timeout costs nothing there. Seconds; override with LONGKD_DIST_TIMEOUT.
DEFAULT_TIMEOUT_S = 48 * 3600
TIMEOUT_ENV = "LONGKD_DIST_TIMEOUT"


def env_world() -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` from torchrun's environment variables; ``(0, 1, 0)`` without.

    Raises:
        LongkdError: the variables are present but not integers, or inconsistent.
    """
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        return 0, 1, 0
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise LongkdError(
            f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({err}); launch with torchrun"
        ) from err
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise LongkdError(
            f"RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local_rank} are inconsistent; launch with torchrun"
        )
    return rank, world, local_rank


def _canonical(record) -> str:
    return json.dumps(record, sort_keys=True, default=str, separators=(",", ":"))


def _flatten(record, prefix: str = "") -> dict:
    """Nested dicts as dotted keys, in the record's own key order."""
    if not isinstance(record, dict):
        return {prefix.rstrip(".") or "value": record}
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Group:
    """The processes of one job, as torchrun started them (a single process: world 1).

    Args:
        device: this rank's torch device (``cuda:N`` picks nccl, anything else gloo).
        timeout_s: collective timeout in seconds (default: ``LONGKD_DIST_TIMEOUT`` or 48 h).

    Attributes:
        rank, world, local_rank: from the environment (or an already initialised group).
        owns: True when this object started the process group (and :meth:`close` ends it).

    Raises:
        LongkdError: inconsistent environment variables, or a process group that cannot start.
    """

    def __init__(self, device: str | None = None, timeout_s: float | None = None):
        import torch.distributed as dist

        self.owns = False
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.local_rank = env_world()[2]
            return
        self.rank, self.world, self.local_rank = env_world()
        if self.world == 1:
            return
        if not dist.is_available():
            raise LongkdError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if timeout_s is None:
            timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        backend = "nccl" if str(device or "").startswith("cuda") else "gloo"
        if backend == "nccl":
            import torch

            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as err:
            raise LongkdError(
                f"cannot start the {backend} process group (rank {self.rank} of {self.world}): {err}"
            ) from err
        self.owns = True

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """End the process group if this object started it."""
        if self.owns:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns = False

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj, src: int = 0):
        """Rank ``src``'s ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, record: dict, what: str = "settings") -> None:
        """Refuse to go on unless every rank holds the same ``record`` (JSON-able).

        Ranks exchange only a sha256 of the canonical JSON; on a mismatch they exchange the
        records to name the first differing key.

        Raises:
            LongkdError: on every rank, naming the setting, rank 0's value and the first
                differing rank's value.
        """
        if self.world == 1:
            return
        digests = self.all_gather(hashlib.sha256(_canonical(record).encode()).hexdigest())
        if len(set(digests)) == 1:
            return
        records = [_flatten(r) for r in self.all_gather(record)]
        other = next(r for r, d in enumerate(digests) if d != digests[0])
        base, theirs = records[0], records[other]
        keys = list(base) + [k for k in theirs if k not in base]
        key = next((k for k in keys if _canonical(base.get(k)) != _canonical(theirs.get(k))), "?")
        name = key.removeprefix("settings.")
        raise LongkdError(
            f"ranks disagree on {what} {name}: rank 0 has {base.get(key)!r}, rank {other} has "
            f"{theirs.get(key)!r}; start every rank with the same command (nothing was written)"
        )

    def rank0(self, fn):
        """Run ``fn()`` on rank 0 only; every rank returns its result or raises its error.

        Raises:
            LongkdError: ``fn`` raised on rank 0 (rank 0 re-raises the original exception; the
                others raise a LongkdError with its message).
        """
        if self.world == 1:
            return fn()
        result, error, original = None, None, None
        if self.rank == 0:
            try:
                result = fn()
            except BaseException as err:  # noqa: BLE001 (handed to every rank below)
                original = err
                error = str(err)
                if not isinstance(err, LongkdError):
                    error = f"rank 0 failed: {type(err).__name__}: {err}"
        result, error = self.broadcast((result, error))
        if original is not None:
            raise original
        if error is not None:
            raise LongkdError(error)
        return result


class TensorParallel:
    """The ranks of a job in groups of ``size`` consecutive ranks, each group holding one model.

    Ranks ``g * size .. g * size + size - 1`` form group g; the groups work side by side as
    the ranks of a job without tensor parallelism do. Every rank must construct this (it
    creates the groups' process groups, a collective step). ``size`` 1 is the plain job: each
    rank is its own group and no process group is created.

    Args:
        group: the job's processes.
        size: N, ranks per group.

    Attributes:
        size: N.
        groups: the number of groups (world / N).
        index: this rank's group.
        rank: this rank's place in its group, 0 .. N - 1.
        leader: the job rank of the group's first rank.
        process_group: the group's torch process group (None when N is 1).

    Raises:
        LongkdError: N < 1, or N does not divide the number of processes.
    """

    def __init__(self, group: Group, size: int):
        if not isinstance(size, int) or size < 1:
            raise LongkdError(f"--tensor-parallel must be a positive integer, got {size!r}")
        if group.world % size:
            raise LongkdError(
                f"--tensor-parallel {size} does not divide the {group.world} processes of this job "
                f"(WORLD_SIZE); start a multiple of {size} processes with torchrun --nproc-per-node"
            )
        self.size = size
        self.groups = group.world // size
        self.index, self.rank = divmod(group.rank, size)
        self.leader = self.index * size
        self.process_group = None
        if size > 1:
            import torch.distributed as dist

            for g in range(self.groups):  # every rank creates every group, in the same order
                made = dist.new_group(list(range(g * size, (g + 1) * size)))
                if g == self.index:
                    self.process_group = made

    @property
    def is_leader(self) -> bool:
        """Whether this rank is its group's first (the one that writes the group's output)."""
        return self.rank == 0

    def all_gather(self, tensor):
        """Every group member's ``tensor`` (same shape and dtype on each), stacked in group order.

        Args:
            tensor: [...] this rank's part.

        Returns:
            [N, ...] on the tensor's device.
        """
        if self.size == 1:
            return tensor.unsqueeze(0)
        import torch
        import torch.distributed as dist

        out = torch.empty((self.size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        dist.all_gather(list(out.unbind(0)), tensor.contiguous(), group=self.process_group)
        return out
