"""The distillation loss for loops other than ``longkd train``: a function, a module, a fused variant.

Why it exists: ``longkd train`` computes ``kd_weight * sparse_kl + ce_weight * cross_entropy``
over a batch's loss mask (trainer/losses.py) from a student's logits; a loop of one's own
needs the same number from the tensors :func:`~longkd.trainer.dataset.collate_windows` gives,
without the trainer's ``Student``. These wrappers flatten the batch dimensions and call the
kernels the trainer calls (kernels/sparse_kl.py, kernels/fused_linear.py), in the same order,
so the value equals the trainer's on the same batch and model. The math is in docs/loss.md.

    from longkd import SparseKLLoss
    loss_fn = SparseKLLoss(mode=dataset.loss_mode, temperature=dataset.temperature)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = loss_fn(logits, batch["teacher_ids"], batch["teacher_logprobs"], batch["labels"])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from longkd.errors import LongkdError
from longkd.kernels.fused_linear import fused_linear_sparse_kl
from longkd.kernels.sparse_kl import cross_entropy_chunked, sparse_kl
from longkd.kernels.temperature import Temperatures, retemper_targets

IGNORE_INDEX = -100


def _rows(name: str, teacher_ids, teacher_logprobs, labels, mask, lead: tuple[int, ...]):
    """Flatten the teacher tensors to [N, K] and build the row mask [N] (checked against ``lead``)."""
    n = 1
    for d in lead:
        n *= d
    for what, t in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape[:-1]) != lead:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise LongkdError(f"{name}: {what} must have shape [{', '.join(map(str, lead))}, K], got {got}")
    for what, t in (("labels", labels), ("mask", mask)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != lead):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise LongkdError(f"{name}: {what} must have shape [{', '.join(map(str, lead))}], got {got}")
    if mask is None and labels is not None:
        mask = labels != IGNORE_INDEX
    flat_mask = None if mask is None else mask.reshape(n).bool()
    ids = teacher_ids.reshape(n, -1).long()
    target = teacher_logprobs.reshape(n, -1).float()
    return ids, target, flat_mask, n


def _tempered(target, ids, mode, temperature, cache_temperature, t2_scaling):
    """The teacher's entries at the student's T and the KL's factor, exactly as the trainer's
    loss terms take them (trainer/losses.py): (target_logprobs [N, K], kd_scale float)."""
    temps = Temperatures(
        cache=temperature if cache_temperature is None else cache_temperature,
        student=temperature,
        t2_scaling=t2_scaling,
    )
    target = retemper_targets(
        target, ids, cache_temperature=temps.cache, temperature=temps.student, mode=mode
    )
    return target, temps.kd_scale


def sparse_kl_loss(
    logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    mode: str = "bucket",
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    impl: str = "auto",
    chunk_size: int = 2048,
    cache_temperature: float | None = None,
    t2_scaling: bool = True,
) -> torch.Tensor:
    """``kd_weight * sparse_kl(teacher || student) + ce_weight * cross_entropy``, meaned over trained rows.

    Args:
        logits: [..., V] student logits (e.g. [B, P, V]), float32, bfloat16 or float16.
        teacher_ids: long [..., K] teacher ids, -1 at padding (``batch["teacher_ids"]``).
        teacher_logprobs: float [..., K] teacher log-probs, -inf at padding.
        labels: long [...] next tokens, -100 where not trained (``batch["labels"]``); needed
            for the cross-entropy term, and the default mask.
        mask: bool [...], True = row trained; default ``labels != -100`` (every row when
            ``labels`` is None too).
        mode: "bucket" (top-k caches), "renorm", or "sampled" (sampled caches); see docs/loss.md.
        temperature: T, the student is softmax(logits / T); use the cache's (``dataset.temperature``).
        kd_weight, ce_weight: the terms' weights (>= 0); a term with weight 0 is not computed.
        impl: "auto" (the CUDA kernel for CUDA logits when CuPy is there, else the torch
            reference), "reference" or "cupy".
        chunk_size: rows per chunk of the torch reference and of the cross-entropy.
        cache_temperature: T_c of the stored log-probs (``dataset.temperature``); None = T.
            At T != T_c the teacher's entries are re-tempered within K, as ``longkd train``
            does (bucket mode refuses it; docs/loss.md, "Temperature").
        t2_scaling: multiply the KL by T^2 (``loss.t2_scaling``, on by default as in ``longkd train``).

    Returns:
        float32 scalar with a graph to ``logits``.

    Raises:
        LongkdError: shapes that do not match, a negative weight, ``ce_weight > 0`` without
            labels, or the kernels' own argument errors.
    """
    name = "sparse_kl_loss"
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        raise LongkdError(f"{name}: logits must be a [..., V] tensor, e.g. [B, P, V]")
    if kd_weight < 0 or ce_weight < 0:
        raise LongkdError(f"{name}: kd_weight and ce_weight must be >= 0, got {kd_weight} and {ce_weight}")
    if ce_weight > 0 and labels is None:
        raise LongkdError(f"{name}: ce_weight > 0 needs labels (batch['labels'])")
    lead = tuple(logits.shape[:-1])
    ids, target, mask, n = _rows(name, teacher_ids, teacher_logprobs, labels, mask, lead)
    flat = logits.reshape(n, logits.shape[-1])
    loss = flat.new_zeros((), dtype=torch.float32)
    target, kd_scale = _tempered(target, ids, mode, temperature, cache_temperature, t2_scaling)
    if kd_weight > 0:
        kl = sparse_kl(
            flat, ids, target, mode=mode, temperature=temperature, mask=mask, impl=impl, chunk_size=chunk_size
        )
        loss = loss + kd_weight * kd_scale * kl
    if ce_weight > 0:
        targets = labels.reshape(n).long()
        if mask is not None:
            targets = targets.masked_fill(~mask, IGNORE_INDEX)
        loss = loss + ce_weight * cross_entropy_chunked(flat, targets, chunk_size=chunk_size)
    return loss


class SparseKLLoss(nn.Module):
    """:func:`sparse_kl_loss` with its settings fixed, as a module.

    Args:
        mode, temperature, kd_weight, ce_weight, impl, chunk_size, cache_temperature,
            t2_scaling: as for :func:`sparse_kl_loss`.
    """

    def __init__(
        self,
        mode: str = "bucket",
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        impl: str = "auto",
        chunk_size: int = 2048,
        cache_temperature: float | None = None,
        t2_scaling: bool = True,
    ):
        super().__init__()
        self.mode, self.temperature, self.impl, self.chunk_size = mode, float(temperature), impl, chunk_size
        self.kd_weight, self.ce_weight = float(kd_weight), float(ce_weight)
        self.cache_temperature, self.t2_scaling = cache_temperature, bool(t2_scaling)

    def forward(
        self,
        logits: torch.Tensor,
        teacher_ids: torch.Tensor,
        teacher_logprobs: torch.Tensor,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of ``logits`` [..., V] against teacher entries [..., K]; see :func:`sparse_kl_loss`."""
        return sparse_kl_loss(
            logits,
            teacher_ids,
            teacher_logprobs,
            labels,
            mask=mask,
            mode=self.mode,
            temperature=self.temperature,
            kd_weight=self.kd_weight,
            ce_weight=self.ce_weight,
            impl=self.impl,
            chunk_size=self.chunk_size,
            cache_temperature=self.cache_temperature,
            t2_scaling=self.t2_scaling,
        )

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, temperature={self.temperature}, kd_weight={self.kd_weight}, "
            f"ce_weight={self.ce_weight}, impl={self.impl!r}, cache_temperature={self.cache_temperature}, "
            f"t2_scaling={self.t2_scaling}"
        )


def fused_sparse_kl_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    mode: str = "bucket",
    temperature: float = 1.0,
    chunk_size: int = 4096,
    logit_postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    cache_temperature: float | None = None,
    t2_scaling: bool = True,
) -> torch.Tensor:
    """The sparse KL from the final hidden states and the LM head, never building [N, V] logits.

    The same value as :func:`sparse_kl_loss` with ``kd_weight=1, ce_weight=0`` on
    ``logits = hidden @ head_weight.T (+ head_bias)``, computed in chunks of tokens
    (kernels/fused_linear.py); it has no cross-entropy term.

        hidden = model.get_decoder()(input_ids=..., position_ids=...).last_hidden_state
        loss = fused_sparse_kl_loss(hidden, model.get_output_embeddings().weight,
                                    batch["teacher_ids"], batch["teacher_logprobs"], batch["labels"])

    Args:
        hidden: [..., d] final hidden states (after the final norm), e.g. [B, P, d].
        head_weight: [V, d] LM head weight (same dtype and device as ``hidden``).
        teacher_ids, teacher_logprobs, labels, mask: as for :func:`sparse_kl_loss` ([..., K],
            [..., K], [...], [...]); ``labels`` only give the default mask here.
        head_bias: optional [V] LM head bias.
        mode, temperature: as for :func:`sparse_kl_loss`.
        chunk_size: tokens per chunk; peak extra memory is about ``chunk_size * V`` logits.
        logit_postprocess: the model's own map from head output to logits, if it has one
            (Gemma 2's softcap: ``lambda z: cap * torch.tanh(z / cap)``).
        cache_temperature, t2_scaling: as for :func:`sparse_kl_loss`.

    Returns:
        float32 scalar with a graph to ``hidden``, ``head_weight`` and ``head_bias``.

    Raises:
        LongkdError: shapes, dtypes or devices that do not match, or bad options.
    """
    name = "fused_sparse_kl_loss"
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        raise LongkdError(f"{name}: hidden must be a [..., d] tensor, e.g. [B, P, d]")
    lead = tuple(hidden.shape[:-1])
    ids, target, mask, n = _rows(name, teacher_ids, teacher_logprobs, labels, mask, lead)
    target, kd_scale = _tempered(target, ids, mode, temperature, cache_temperature, t2_scaling)
    return kd_scale * fused_linear_sparse_kl(
        hidden.reshape(n, hidden.shape[-1]),
        head_weight,
        ids,
        target,
        bias=head_bias,
        mode=mode,
        temperature=temperature,
        mask=mask,
        chunk_size=chunk_size,
        logit_postprocess=logit_postprocess,
    )
