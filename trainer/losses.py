"""The loss of one student on one batch: sparse KL to the cached teacher plus cross-entropy.

    loss = kd_weight * sparse_kl(student || teacher top-k) + ce_weight * cross_entropy

over the batch's loss mask (docs/loss.md). A term whose weight is 0 is still computed, without
a graph, so that every student logs its distance to the teacher and its next-token loss.
Under torchrun the forward goes through the student's DDP / FSDP wrapper
(trainer/distributed.py) so that gradients synchronise.

    from longkd.trainer.losses import batch_losses
    loss, kl, ce, rows = batch_losses(student, batch, mode="bucket", temperature=1.0, amp=None)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from longkd.kernels.sparse_kl import cross_entropy_chunked, sparse_kl
from longkd.models import lm_head_logits

if TYPE_CHECKING:
    from longkd.trainer.students import Student


def batch_losses(student: Student, batch, *, mode: str, temperature: float, amp: torch.dtype | None):
    """Forward one (already prefix-cut) batch and compute the loss terms.

    Args:
        student: the student.
        batch: a ``WindowBatch`` of B windows of P tokens on the student's device.
        mode, temperature: sparse-KL settings.
        amp: autocast dtype or None.

    Returns:
        ``(loss, kl, ce, tokens)``: loss a scalar with a graph (kd_weight * kl + ce_weight * ce),
        kl and ce detached scalars (each computed without a graph when its weight is 0), tokens
        the number of rows trained on.
    """
    lc = student.cfg.loss
    b, p = batch.input_ids.shape
    mask = batch.loss_mask(skip_first_tokens=lc.skip_first_tokens).reshape(b * p)
    device_type = batch.input_ids.device.type
    with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
        if student.parallel is not None:  # through DDP / FSDP, so gradients sync (trainer/distributed.py)
            logits = student.parallel.logits(student, batch.input_ids, batch.position_ids)
        else:
            out = student.body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            logits = lm_head_logits(student.model, hidden)  # [B, P, V]
    logits = logits.reshape(b * p, -1)
    ids = batch.ids.reshape(b * p, -1).long()
    target = batch.target_logprobs.reshape(b * p, -1).float()
    loss = logits.new_zeros((), dtype=torch.float32)
    kl_args = dict(mode=mode, temperature=temperature, mask=mask, impl=lc.impl, chunk_size=lc.chunk_size)
    if lc.kd_weight > 0:
        kl = sparse_kl(logits, ids, target, **kl_args)
        loss = loss + lc.kd_weight * kl
    else:
        with torch.no_grad():  # logged only, so a CE-only student's distance to the teacher shows
            kl = sparse_kl(logits.detach(), ids, target, **kl_args)
    targets = batch.next_tokens().reshape(b * p).long().masked_fill(~mask, -100)
    if lc.ce_weight > 0:
        ce = cross_entropy_chunked(logits, targets, chunk_size=lc.chunk_size)
        loss = loss + lc.ce_weight * ce
    else:
        with torch.no_grad():  # logged only: no graph, no effect on the weights
            ce = cross_entropy_chunked(logits.detach(), targets, chunk_size=lc.chunk_size)
    return loss, kl.detach(), ce.detach(), int(mask.sum())
