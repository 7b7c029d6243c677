"""Students under torchrun: DDP replicas (default) or FSDP2 shards, trained on one global batch.

    torchrun --nproc-per-node 8 -m longkd train run.yaml        # distributed: ddp | fsdp

What makes N ranks train the student one process would (docs/distributed.md):

- the stream: rank r reads only the r-th slice of each global batch of ``batch_size``
  windows (``WindowStream(rank=, world=)``), so every window is seen once per epoch across
  ranks and the global batch is the single-process batch; the resume state counts global
  windows and is the same on every rank.
- the loss: each rank's loss is the mean over its own unmasked rows; :meth:`Parallel.global_mean`
  rescales it by ``world * n_local / n_global`` so that, after DDP / FSDP average the
  gradients over ranks, they are the gradients of the mean over the global batch's rows, as
  in one process (ranks can hold different numbers of trained rows: padded windows,
  ``skip_first_tokens``). Logged values are the global means.
- the forward goes through the wrapper (:class:`_Forward`: decoder body, LM head and losses
  as one module), so DDP's gradient hooks and FSDP's parameter all-gathers run; the fused
  loss reads the head's weight there, gathered whole by FSDP's pre-forward hook.
- only rank 0 writes checkpoints, metrics and TensorBoard. With FSDP every rank takes part
  in gathering the full weights and optimizer state, which rank 0 then writes in the same
  files as a single-process run, so any run resumes with any world size and mode.

Wrapping happens after a resumed checkpoint is loaded into the plain model, so resume needs
no distributed-specific loading: FSDP shards the loaded parameters and optimizer state.
"""

from __future__ import annotations

import torch
from torch import nn

from longkd.devices import resolve_device
from longkd.distributed import Group, env_world
from longkd.errors import LongkdError

MODES = ("ddp", "fsdp")


class _Forward(nn.Module):
    """A model's decoder body and a head function as one module.

    ``(input_ids, position_ids, head) -> head(model, hidden)``: the LM head and the losses run
    inside this forward (trainer/losses.py ``head_losses``), so DDP's gradient hooks see every
    parameter the loss used and FSDP has the root's parameters (the head among them) gathered
    while the loss reads them.

    Args:
        model: the transformers causal LM (registered, so the wrapper sees all its parameters).
        body: the callable decoder (the model's, possibly ``torch.compile``-d); not registered
            again, as its parameters are the model's.
    """

    def __init__(self, model: nn.Module, body):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_body", body)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, head):
        """long [B, P] ids and positions, ``head(model, hidden [B, P, d])`` -> what head returns."""
        from longkd.trainer.losses import body_hidden

        return head(self.model, body_hidden(self._body, input_ids, position_ids))


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one (transformers' ``_no_split_modules`` classes)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


class Parallel:
    """Data parallelism over the ranks torchrun started.

    Args:
        mode: ``"ddp"`` (replicated students, gradients all-reduced) or ``"fsdp"`` (FSDP2
            ``fully_shard`` per decoder layer and for the whole model).
        device: the run's device setting (``auto``, ``cpu``, ``cuda``, ...); CUDA ranks use
            ``cuda:LOCAL_RANK`` and nccl, CPU ranks gloo.

    Attributes:
        group: the :class:`~longkd.distributed.Group` (rank, world).
        device: this rank's torch device.

    Raises:
        LongkdError: an unknown mode, or a process group that cannot start.
    """

    def __init__(self, mode: str, device: str = "auto"):
        if mode not in MODES:
            raise LongkdError(f"distributed: {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        _, world, local_rank = env_world()
        self.device = torch.device(resolve_device(device, local_rank=local_rank, world=world))
        self.group = Group(str(self.device))
        self.wrapped: dict[str, nn.Module] = {}

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world(self) -> int:
        return self.group.world

    @property
    def is_main(self) -> bool:
        return self.group.rank == 0

    def close(self) -> None:
        self.group.close()

    def check_batch(self, batch_size: int) -> int:
        """Windows per rank of a global batch.

        Raises:
            LongkdError: ``batch_size`` is not a multiple of the world size.
        """
        if batch_size % self.world:
            raise LongkdError(
                f"batch_size {batch_size} is not a multiple of the {self.world} ranks; "
                "the global batch is split evenly, so use a multiple (or other --nproc-per-node)"
            )
        return batch_size // self.world

    # ---------------------------------------------------------------- wrapping

    def wrap(self, student) -> nn.Module:
        """Wrap ``student`` (a trainer Student, weights already loaded) for this mode.

        DDP broadcasts rank 0's weights at construction. FSDP replaces the model's parameters
        by sharded ones; the optimizer's parameter groups and any loaded state are moved onto
        them (the state sharded like its parameter).

        Returns:
            The module the losses run through (:meth:`forward`).
        """
        module = _Forward(student.model, student.body)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DDP(module, device_ids=ids)
        else:
            wrapped = self._fully_shard(student, module)
        self.wrapped[student.name] = wrapped
        return wrapped

    def _fully_shard(self, student, module: _Forward) -> nn.Module:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import distribute_tensor

        names = {id(p): n for n, p in student.model.named_parameters()}
        state = {names[id(p)]: s for p, s in student.optimizer.state.items()}
        for layer in _decoder_layers(student.model):
            fully_shard(layer)
        fully_shard(module)
        params = dict(student.model.named_parameters())
        opt = student.optimizer
        for group in opt.param_groups:
            group["params"] = [params[names[id(p)]] for p in group["params"]]
        opt.state.clear()
        for name, values in state.items():
            p = params[name]
            opt.state[p] = {
                k: distribute_tensor(v.to(self.device), p.device_mesh, p.placements)
                if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0
                else v
                for k, v in values.items()
            }
        return module

    def forward(self, student, input_ids: torch.Tensor, position_ids: torch.Tensor, head):
        """``head(model, hidden)`` run inside the student's wrapper (trainer/losses.py)."""
        return self.wrapped[student.name](input_ids, position_ids, head)

    # ---------------------------------------------------------------- the global mean

    def global_mean(self, loss: torch.Tensor, kl: torch.Tensor, ce: torch.Tensor, rows: int):
        """Turn this rank's per-row means into the global batch's.

        Args:
            loss: scalar with a graph, the mean over this rank's ``rows`` trained rows.
            kl, ce: detached scalars, means over the same rows.
            rows: this rank's trained rows (the loss mask's count).

        Returns:
            ``(loss_for_backward, loss_value, kl, ce)``: the loss scaled by
            ``world * rows / total_rows`` (so the ranks' averaged gradients are those of the
            global mean), and the global means of loss, KL and CE (float, tensor, tensor).
        """
        values = torch.tensor(
            [float(rows), float(loss.detach()) * rows, float(kl) * rows, float(ce) * rows],
            dtype=torch.float64,
            device=self.device if self.device.type == "cuda" else "cpu",
        )
        self._all_reduce(values)
        total = float(values[0])
        if total == 0:
            return loss * 0.0, 0.0, kl * 0.0, ce * 0.0
        scale = self.world * rows / total
        mean = values[1:] / total
        return loss * scale, float(mean[0]), kl.new_tensor(float(mean[1])), ce.new_tensor(float(mean[2]))

    def sum_int(self, value: int) -> int:
        """``value`` summed over ranks."""
        t = torch.tensor(
            [value], dtype=torch.int64, device=self.device if self.device.type == "cuda" else "cpu"
        )
        self._all_reduce(t)
        return int(t[0])

    def _all_reduce(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        if self.world > 1:
            dist.all_reduce(t)

    # ---------------------------------------------------------------- checkpoints

    def full_states(self, student) -> tuple[dict | None, dict | None]:
        """Full (unsharded) model and optimizer state dicts, for rank 0 to save.

        Every rank must call this (FSDP gathers the shards). DDP replicas hold full states
        already: ``(None, None)`` means "save the model and optimizer as they are".

        Returns:
            ``(model_state, optimizer_state)`` in the plain single-process formats (CPU
            tensors), or ``(None, None)`` under DDP.
        """
        if self.mode != "fsdp":
            return None, None
        from torch.distributed.tensor import DTensor

        def full(v):
            return v.full_tensor().cpu() if isinstance(v, DTensor) else v

        # A tied weight (one parameter under two names) is written once, under its first name,
        # as a single-process save_pretrained writes it.
        model_state, seen = {}, set()
        for k, v in student.model.state_dict(keep_vars=True).items():
            if id(v) not in seen:
                seen.add(id(v))
                model_state[k] = full(v.detach())
        optim = student.optimizer.state_dict()
        optim["state"] = {i: {k: full(v) for k, v in s.items()} for i, s in optim["state"].items()}
        return model_state, optim


def from_config(mode: str | None, device: str) -> Parallel | None:
    """A :class:`Parallel` when torchrun started several ranks, else None (one process).

    Args:
        mode: the config's ``distributed`` (None: ``ddp``).
        device: the config's ``device``.
    """
    if env_world()[1] == 1:
        if mode is not None and mode not in MODES:
            raise LongkdError(f"distributed: {mode!r} is not one of {', '.join(MODES)}")
        return None
    return Parallel(mode or "ddp", device)
