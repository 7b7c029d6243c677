"""A teacher larger than one GPU: loaded across a tensor-parallel group, its LM head split by vocabulary.

    torchrun --nproc-per-node 8 -m longkd cache build --tensor-parallel 4 --teacher T ...

transformers shards a model whose config declares a tensor-parallel plan (torch DTensor; the
decoder's matmuls are split and all-reduced inside the group). Its LM head is split by
vocabulary too, and transformers gathers the full ``[positions, V]`` logits onto every rank
after it; the teacher run never calls it that way. :class:`VocabShardedHead` takes this
rank's rows of the head's weight, computes only its shard's logits (with the model's own
elementwise logit post-processing, as :func:`longkd.models.lm_head_logits` applies it) and
exchanges ``O(N x k)`` summaries per position with the other ranks of its group
(cache/vocab_shards.py has the math): the group's ranks then hold the same top-k, target
log-probs and draws, and only the group's first rank writes them.

Several groups side by side (world = groups x N): transformers builds its device mesh over
the whole job, so :func:`sharded_loading` hands it a mesh whose ``tp`` axis is this rank's
group of N consecutive ranks.

``--device-map auto`` (one process, the layers spread over the visible GPUs by accelerate) is
the alternative for a teacher whose architecture has no tensor-parallel plan.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
from collections.abc import Iterator

import torch

from longkd.cache import vocab_shards as vs
from longkd.distributed import TensorParallel
from longkd.errors import LongkdError


def require_accelerate(flag: str) -> None:
    """Refuse, on one line, a path that needs the ``accelerate`` package when it is missing.

    Raises:
        LongkdError: accelerate is not installed.
    """
    if importlib.util.find_spec("accelerate") is None:
        raise LongkdError(
            f"{flag} needs the accelerate package, which is not installed: pip install accelerate "
            "(or pip install 'longkd[multi-gpu]')"
        )


def check_shardable(config, size: int, name: str) -> None:
    """Refuse a teacher that transformers cannot split over ``size`` ranks, before any weight loads.

    Args:
        config: the teacher's transformers config.
        size: N, ranks per group (nothing is checked for 1).
        name: the teacher, for messages.

    Raises:
        LongkdError: the architecture has no tensor-parallel plan, or N does not divide its
            attention or key-value heads.
    """
    if size == 1:
        return
    text = config.get_text_config()
    if not getattr(text, "base_model_tp_plan", None):
        raise LongkdError(
            f"teacher {name} ({config.model_type}) has no tensor-parallel plan in transformers, so "
            f"--tensor-parallel {size} cannot split it; use --device-map auto (one process over the "
            "visible GPUs) or a teacher whose architecture transformers can shard"
        )
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(text, key, None)
        if isinstance(heads, int) and heads % size:
            raise LongkdError(
                f"--tensor-parallel {size} does not divide the teacher's {key} ({heads}); "
                "choose N among the divisors of both head counts"
            )


def check_teacher_shardable(name_or_path: str, size: int, trust_remote_code: bool = False) -> None:
    """:func:`check_shardable` on a teacher's config, read before any process group starts.

    A config that does not load is left for ``Teacher.load`` to report.

    Raises:
        LongkdError: as :func:`check_shardable`.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 (Teacher.load reports it, with the other loading errors)
        return
    check_shardable(config, size, str(name_or_path))


@contextlib.contextmanager
def sharded_loading(tp: TensorParallel, device: str) -> Iterator[dict]:
    """``from_pretrained`` keyword arguments that load the model split over this rank's group.

    transformers' own mesh spans every process of the job; here the job holds ``tp.groups``
    groups, so the mesh is built with a ``dp_replicate`` axis of that size (never used: no
    FSDP is applied) and a ``tp`` axis over each group's N consecutive ranks, and handed to
    transformers in place of its own for the duration of the block.

    Args:
        tp: the groups (every rank of the job enters this block together).
        device: this rank's device (``cpu`` or ``cuda:LOCAL_RANK``).

    Yields:
        ``{"distributed_config": DistributedConfig(tp_size=N)}``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import PreTrainedModel
    from transformers.distributed import DistributedConfig
    from transformers.distributed.utils import TransformersDeviceMesh

    kind = torch.device(device).type
    dense = init_device_mesh(
        kind, (1, tp.groups, 1, tp.size), mesh_dim_names=("pp", "dp_replicate", "fsdp", "tp")
    )
    expert = init_device_mesh(
        kind, (1, tp.groups, tp.size, 1), mesh_dim_names=("pp", "dp_replicate", "efsdp", "ep")
    )
    meshes = TransformersDeviceMesh(dense, expert)

    def prepare(cls, distributed_config, device_map=None):
        return distributed_config, torch.device(device), meshes

    own = PreTrainedModel.__dict__.get("prepare_distribute_model")  # usually inherited from a mixin
    PreTrainedModel.prepare_distribute_model = classmethod(prepare)
    try:
        yield {"distributed_config": DistributedConfig(tp_size=tp.size)}
    finally:
        if own is None:
            del PreTrainedModel.prepare_distribute_model
        else:
            PreTrainedModel.prepare_distribute_model = own


def shard_seed(seed: int, window_id: int, shard: int, shards: int) -> int:
    """A 63-bit generator seed for shard ``shard`` of ``shards`` drawing in window ``window_id``."""
    key = f"longkd-sample-shard:{int(seed)}:{int(window_id)}:{int(shard)}:{int(shards)}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class VocabShardedHead:
    """This rank's rows of a vocabulary-split LM head and the group's merge of the shards.

    Args:
        weight: [w, d] this rank's rows of the head (ids ``offset .. offset + w - 1``).
        bias: [w] or None.
        widths: every group member's w, in group order.
        tp: the group.
        post: the model's elementwise logit post-processing (None: none).
        vocab: V, the head's full number of rows.

    Raises:
        LongkdError: the widths do not add up to the head's vocabulary.
    """

    def __init__(self, weight, bias, widths: list[int], tp: TensorParallel, post, vocab: int):
        self.weight, self.bias, self.tp, self.post = weight, bias, tp, post
        self.widths = list(widths)
        self.offsets = vs.shard_offsets(self.widths)
        self.offset = self.offsets[tp.rank]
        if self.offsets[-1] != vocab or self.widths[tp.rank] != weight.shape[0]:
            raise LongkdError(
                f"the LM head's shards hold {self.widths} rows, not the vocabulary of {vocab}; "
                "this sharding of the head is not supported"
            )

    @classmethod
    def of(cls, model, tp: TensorParallel | None) -> VocabShardedHead | None:
        """The sharded head of a model loaded by :func:`sharded_loading`; None when its head is whole.

        Raises:
            LongkdError: the head is split some other way than by vocabulary rows.
        """
        from torch.distributed.tensor import DTensor, Replicate, Shard

        from longkd.models import logit_postprocess

        head = model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if tp is None or tp.size == 1 or not isinstance(weight, DTensor):
            return None
        if all(isinstance(p, Replicate) for p in weight.placements):
            return None  # every rank holds the whole head: the plain path works as is
        if tuple(weight.placements) != (Shard(0),) or not isinstance(head, torch.nn.Linear):
            raise LongkdError(
                f"the teacher's LM head is split as {weight.placements} across the group; only a "
                "linear head split by vocabulary rows is supported"
            )
        if weight.device_mesh.get_local_rank() != tp.rank:
            raise LongkdError("the LM head's device mesh does not follow the tensor-parallel group's ranks")
        local = weight.to_local()
        bias = head.bias.to_local() if isinstance(head.bias, DTensor) else head.bias
        widths = tp.all_gather(torch.tensor([local.shape[0]], device=local.device)).view(-1).tolist()
        return cls(local, bias, widths, tp, logit_postprocess(model), int(weight.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def logits(self, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """[B, c, d] hidden -> [B, c, w] this shard's fp32 logits, post-processed, divided by T."""
        z = torch.nn.functional.linear(hidden.to(self.device), self.weight, self.bias).float()
        if self.post is not None:
            z = self.post(z)
        if temperature != 1.0:
            z = z / temperature
        return z

    def check(self, hidden: torch.Tensor, full: torch.Tensor) -> float:
        """The largest difference between this shard's logits and its columns of the model's own.

        Args:
            hidden: [B, c, d] the decoder's output on a probe.
            full: [B, c, V] the model's own (gathered) logits there.

        Returns:
            The max absolute difference (0 for an empty shard).
        """
        mine = self.logits(hidden)
        theirs = full[..., self.offset : self.offset + mine.shape[-1]].float().to(mine.device)
        return (mine - theirs).abs().max().item() if mine.numel() else 0.0

    def topk(self, hidden: torch.Tensor, nxt: torch.Tensor, k: int, temperature: float):
        """The group's top-k and target log-probs of one chunk (the same on every group rank).

        Args:
            hidden: [B, c, d].
            nxt: [B, c, 1] the next token at each position.
            k: entries per row.
            temperature: T.

        Returns:
            ``(logprobs [B, c, k] fp32 descending, ids [B, c, k] int64, target [B, c] fp32)``.
        """
        z = self.logits(hidden, temperature)  # [B, c, w]
        values, ids = vs.local_topk(z, k, self.offset)
        summary = torch.cat(
            [
                values.view(torch.int32),
                ids.to(torch.int32),
                torch.logsumexp(z, -1, keepdim=True).view(torch.int32),
                vs.owned_value(z, nxt.to(z.device).squeeze(-1), self.offset).unsqueeze(-1).view(torch.int32),
            ],
            dim=-1,
        )  # [B, c, 2k + 2]: what this rank sends
        every = self.tp.all_gather(summary).movedim(0, -2)  # [B, c, N, 2k + 2]
        lse = vs.merge_logsumexp(every[..., 2 * k].view(torch.float32))  # [B, c]
        target = vs.merge_owned(every[..., 2 * k + 1].view(torch.float32)) - lse
        top, top_ids = vs.merge_topk(
            every[..., :k].contiguous().view(torch.float32), every[..., k : 2 * k].long(), k
        )
        return top - lse.unsqueeze(-1), top_ids, target

    def draw(self, hidden, nxt, draws: int, temperature: float, window_gens: list, shard_gens: list):
        """``draws`` draws per row from the group's full distribution, and the target log-probs.

        Args:
            hidden: [B, c, d].
            nxt: [B, c, 1].
            draws: D.
            temperature: T.
            window_gens: B generators seeded per window, the same on every group rank (they
                pick how many draws each shard makes).
            shard_gens: B generators seeded per (window, shard) (this shard's own draws).

        Returns:
            ``(ids [B, c, D] int64 ascending per row, target [B, c] fp32)``.
        """
        z = self.logits(hidden, temperature)  # [B, c, w]
        lse_mine = torch.logsumexp(z, -1)
        mine = torch.stack([lse_mine, vs.owned_value(z, nxt.to(z.device).squeeze(-1), self.offset)], -1)
        every = self.tp.all_gather(mine).movedim(0, -2)  # [B, c, N, 2]
        lse = every[..., 0]  # [B, c, N]: each shard's logsumexp, identical on every rank
        target = vs.merge_owned(every[..., 1]) - vs.merge_logsumexp(lse)
        local = []
        for b in range(z.shape[0]):  # window by window, each from its own generators
            counts = vs.shard_draw_counts(lse[b], draws, window_gens[b])  # [c, N]
            local.append(
                vs.draws_within_shard(
                    z[b], lse_mine[b], counts[:, self.tp.rank], draws, self.offset, shard_gens[b]
                )
            )
        picked = self.tp.all_gather(torch.stack(local).to(torch.int32))  # [N, B, c, D]
        return vs.merge_draws(picked.movedim(0, -2)).long(), target
