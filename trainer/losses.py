"""The loss of one student on one batch: sparse KL to the cached teacher plus cross-entropy.

    loss = kd_weight * s * sparse_kl(student || teacher top-k) + ce_weight * cross_entropy

over the batch's loss mask (docs/loss.md), with s = T^2 under ``loss.t2_scaling`` (else 1).
At a student temperature T other than the cache's T_c the teacher's stored entries are
re-tempered first (kernels/temperature.py). Both happen here, in :meth:`LossTerms.of`, once
for every path below, so the fused, materialised and CUDA-kernel losses get them identically.
A term whose weight is 0 is still computed, without a gradient, so that every student logs
its distance to the teacher and its next-token loss.

By default (``loss.fused: true``) both terms are computed through the LM head in token chunks
(kernels/fused_linear.py): the student's [N, V] logits never exist, and one matmul per chunk
feeds both losses. ``loss.fused: false``, or a student whose head cannot be fused (one log
line says why), materialises the logits and runs ``sparse_kl`` and ``cross_entropy_chunked``
on them. Either way the head and the losses run inside the forward of the student's DDP /
FSDP wrapper under torchrun (trainer/distributed.py), so gradients synchronise and FSDP has
the head's weight gathered while the loss uses it.

    from longkd.trainer.losses import batch_losses
    loss, kl, ce, rows = batch_losses(student, batch, mode="bucket", temperature=1.0, amp=None)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from longkd.errors import LongkdError
from longkd.kernels.fused_linear import fused_linear_losses
from longkd.kernels.sparse_kl import cross_entropy_chunked, sparse_kl
from longkd.kernels.temperature import Temperatures, check_retemperable, retemper_targets
from longkd.models import lm_head_logits, logit_postprocess

if TYPE_CHECKING:
    from longkd.trainer.students import Student


@dataclass
class LossTerms:
    """One batch's loss inputs, flattened to N = B * P rows, and the student's loss settings.

    Attributes:
        ids: int64 [N, K] teacher ids (< 0 = padding).
        target_logprobs: float32 [N, K] teacher log-probs at the student's temperature
            (re-tempered from the cache's when they differ).
        mask: bool [N], rows trained on.
        targets: int64 [N] next-token ids, -100 where the mask is False.
        mode, temperature: the sparse-KL settings (temperature: the student's T).
        kd_weight, ce_weight: the terms' weights (0: computed for the log only); kd_weight
            includes the T^2 factor when ``loss.t2_scaling`` is on.
        chunk_size: rows per chunk (None: automatic, kernels/reference.py ``chunk_rows``).
        impl: "auto" | "reference" | "cupy", the sparse-KL implementation.
        amp: the autocast dtype or None.
        fused: compute through the LM head in chunks (else materialise the logits).
    """

    ids: torch.Tensor
    target_logprobs: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    mode: str
    temperature: float
    kd_weight: float
    ce_weight: float
    chunk_size: int | None
    impl: str
    amp: torch.dtype | None
    fused: bool

    @classmethod
    def of(cls, batch, loss_cfg, *, mode, temperature, amp, fused, cache_temperature=None) -> LossTerms:
        """From a (prefix-cut) ``WindowBatch`` of B windows of P tokens and a ``LossConfig``.

        ``temperature`` is the student's T, ``cache_temperature`` the cache's T_c (None: the
        same as T, nothing re-tempered). The teacher's entries are re-tempered to T and the
        KL's weight takes the T^2 factor of ``loss_cfg.t2_scaling``: the one place either
        happens, whichever path computes the loss afterwards.
        """
        b, p = batch.input_ids.shape
        mask = batch.loss_mask(skip_first_tokens=loss_cfg.skip_first_tokens).reshape(b * p)
        temps = Temperatures(
            cache=temperature if cache_temperature is None else cache_temperature,
            student=temperature,
            t2_scaling=loss_cfg.t2_scaling,
        )
        ids = batch.ids.reshape(b * p, -1).long()
        tlp = batch.teacher_logprobs.reshape(b * p, -1).float()
        return cls(
            ids=ids,
            target_logprobs=retemper_targets(
                tlp, ids, cache_temperature=temps.cache, temperature=temps.student, mode=mode
            ),
            mask=mask,
            targets=batch.next_tokens().reshape(b * p).long().masked_fill(~mask, -100),
            mode=mode,
            temperature=temperature,
            kd_weight=loss_cfg.kd_weight * temps.kd_scale,
            ce_weight=loss_cfg.ce_weight,
            chunk_size=loss_cfg.chunk_size,
            impl=loss_cfg.impl,
            amp=amp,
            fused=fused,
        )


def fused_head_problem(model: nn.Module) -> str | None:
    """Why the student's LM head cannot be computed in chunks, or None when it can.

    The fused path needs a plain linear head (weight [V, d], optional bias): it computes
    ``hidden @ W^T + b`` itself, then the model's own logit post-processing
    (``longkd.models.logit_postprocess``: softcapping, logit scales).
    """
    head = model.get_output_embeddings()
    if head is None:
        return "the model has no output embeddings"
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return f"its LM head is a {type(head).__name__}, not a plain torch.nn.Linear"
    return None


def head_losses(model: nn.Module, hidden: torch.Tensor, terms: LossTerms):
    """The loss terms from the final hidden states: the part run inside the wrapper's forward.

    Args:
        model: the student's causal LM (under FSDP, its root parameters are gathered here).
        hidden: [B, P, d] final hidden states (after the last norm), as the body produced
            them (under autocast when ``terms.amp``).
        terms: the batch's :class:`LossTerms`.

    Returns:
        ``(loss, kl, ce)``: loss a scalar with a graph (kd_weight * kl + ce_weight * ce), kl
        and ce detached float32 scalars (means over the mask's rows).
    """
    if terms.fused:
        return _fused_losses(model, hidden.reshape(-1, hidden.shape[-1]), terms)
    logits = lm_head_logits(model, hidden)  # [B, P, V], under the body's autocast
    with torch.autocast(hidden.device.type, enabled=False):
        return _materialised_losses(logits.reshape(terms.mask.shape[0], -1), terms)


def _materialised_losses(logits: torch.Tensor, terms: LossTerms):
    loss = logits.new_zeros((), dtype=torch.float32)
    kl_args = dict(
        mode=terms.mode,
        temperature=terms.temperature,
        mask=terms.mask,
        impl=terms.impl,
        chunk_size=terms.chunk_size,
    )
    if terms.kd_weight > 0:
        kl = sparse_kl(logits, terms.ids, terms.target_logprobs, **kl_args)
        loss = loss + terms.kd_weight * kl
    else:
        with torch.no_grad():  # logged only, so a CE-only student's distance to the teacher shows
            kl = sparse_kl(logits.detach(), terms.ids, terms.target_logprobs, **kl_args)
    if terms.ce_weight > 0:
        ce = cross_entropy_chunked(logits, terms.targets, chunk_size=terms.chunk_size)
        loss = loss + terms.ce_weight * ce
    else:
        with torch.no_grad():  # logged only: no graph, no effect on the weights
            ce = cross_entropy_chunked(logits.detach(), terms.targets, chunk_size=terms.chunk_size)
    return loss, kl.detach(), ce.detach()


def _whole(tensor: torch.Tensor | None, what: str) -> torch.Tensor | None:
    """``tensor`` as a plain tensor; a DTensor (a head sharded outside its own forward) is refused."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        raise LongkdError(
            f"loss.fused: the LM head's {what} is a DTensor sharded as {tuple(tensor.placements)} when "
            "the loss runs, and the fused loss needs it whole; shard the head with the model's root "
            "module (as `distributed: fsdp` does) or set loss.fused: false"
        )
    return tensor


def _fused_losses(model: nn.Module, hidden: torch.Tensor, terms: LossTerms):
    head = model.get_output_embeddings()
    weight, bias = _whole(head.weight, "weight"), _whole(head.bias, "bias")
    if terms.amp is not None:  # what autocast does to the head's matmul, done by hand
        hidden, weight = hidden.to(terms.amp), weight.to(terms.amp)
        bias = None if bias is None else bias.to(terms.amp)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        out = fused_linear_losses(
            hidden,
            weight,
            bias=bias,
            ids=terms.ids,
            target_logprobs=terms.target_logprobs,
            targets=terms.targets,
            mode=terms.mode,
            temperature=terms.temperature,
            mask=terms.mask,
            kd_weight=terms.kd_weight,
            ce_weight=terms.ce_weight,
            chunk_size=terms.chunk_size,
            loss_impl=terms.impl,
            logit_postprocess=logit_postprocess(model),
        )
    return out.loss, out.kl.float(), out.ce.float()


def body_hidden(body, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The decoder body's final hidden states [B, P, d]."""
    out = body(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def temperatures_in_force(loss_cfg, *, mode: str, cache_temperature: float, where: str) -> Temperatures:
    """The temperatures a student trains at, checked against its loss mode before any step.

    Args:
        loss_cfg: the student's ``LossConfig`` (``temperature`` None: the cache's).
        mode: the resolved loss mode.
        cache_temperature: T_c, the cache's manifest temperature.
        where: the student's config path, prefixing the error.

    Returns:
        The :class:`~longkd.kernels.temperature.Temperatures` in force.

    Raises:
        LongkdError: bucket mode at a temperature other than the cache's, naming the options.
    """
    student_t = cache_temperature if loss_cfg.temperature is None else loss_cfg.temperature
    check_retemperable(mode, cache_temperature=cache_temperature, temperature=student_t, name=f"{where}.loss")
    return Temperatures(cache=cache_temperature, student=student_t, t2_scaling=loss_cfg.t2_scaling)


def batch_losses(
    student: Student,
    batch,
    *,
    mode: str,
    temperature: float,
    amp: torch.dtype | None,
    cache_temperature: float | None = None,
):
    """Forward one (already prefix-cut) batch and compute the loss terms.

    Args:
        student: the student.
        batch: a ``WindowBatch`` of B windows of P tokens on the student's device.
        mode, temperature: sparse-KL settings (temperature: the student's T).
        amp: autocast dtype or None.
        cache_temperature: the cache's T_c (None: equal to ``temperature``); the teacher's
            entries are re-tempered to T when they differ.

    Returns:
        ``(loss, kl, ce, tokens)``: loss a scalar with a graph (kd_weight * s * kl + ce_weight * ce,
        s = T^2 under ``loss.t2_scaling``),
        kl and ce detached scalars (each computed without a gradient when its weight is 0),
        tokens the number of rows trained on.
    """
    terms = LossTerms.of(
        batch, student.cfg.loss, mode=mode, temperature=temperature, amp=amp, fused=student.fused,
        cache_temperature=cache_temperature,
    )  # fmt: skip

    def head(model, hidden):
        return head_losses(model, hidden, terms)

    device_type = batch.input_ids.device.type
    with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
        if student.parallel is not None:  # through DDP / FSDP, so gradients sync (trainer/distributed.py)
            loss, kl, ce = student.parallel.forward(student, batch.input_ids, batch.position_ids, head)
        else:
            loss, kl, ce = head(student.model, body_hidden(student.body, batch.input_ids, batch.position_ids))
    return loss, kl, ce, int(terms.mask.sum())
