"""Top-k, logsumexp and sampling over a vocabulary split into contiguous shards.

A tensor-parallel teacher holds its LM head split by vocabulary: shard i owns the logits of
ids ``offsets[i] .. offsets[i+1] - 1``. Gathering the full ``[positions, V]`` logits onto one
process would cost O(V) communication per position (and the memory a big vocabulary needs),
so each shard reduces its own logits first and only these small summaries are exchanged:

- logsumexp: the logsumexp of the shards' logsumexps is the full logsumexp;
- top-k: the full top-k is inside the union of the shards' top-k (an id beaten by k ids of its
  own shard cannot be in the full top-k), so merging ``N x k`` candidates gives it exactly;
  a shard narrower than k contributes all it has, padded with id -1 and value -inf, and a
  padding entry never wins over a real entry of equal value (a real -inf logit);
- the target token's logit: only its owner shard has it; the others send -inf;
- sampling, exactly in distribution: how many of the ``D`` draws land in each shard is
  multinomial over the shards' masses ``exp(lse_i - lse)``; shard i then draws that many ids
  from its own distribution ``exp(z - lse_i)``. The joint counts are ``Multinomial(D, p)``,
  as ``D`` draws from the full distribution would give, though not the same random stream.

These are pure torch functions over tensors that hold every shard's part (shape ``[..., N, ...]``)
or one shard's logits, so they are tested against the unsharded torch ops in one process;
cache/tensor_parallel.py runs them inside a tensor-parallel group. Shapes: ``N`` shards,
``k`` entries, ``D`` draws, ``w`` a shard's width, ``...`` any leading (batch, position) dims.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PAD_ID = -1


def shard_offsets(widths: Sequence[int]) -> list[int]:
    """``[0, w0, w0 + w1, ..., V]``: where each shard's ids start, plus the vocabulary size.

    Args:
        widths: the shards' widths in shard order (0 is allowed: an empty shard).

    Returns:
        ``N + 1`` offsets.

    Raises:
        ValueError: a negative width.
    """
    offsets = [0]
    for width in widths:
        if width < 0:
            raise ValueError(f"shard widths must be >= 0, got {list(widths)}")
        offsets.append(offsets[-1] + int(width))
    return offsets


def local_topk(logits: torch.Tensor, k: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One shard's top-k, in global ids, padded to k entries when the shard is narrower.

    Args:
        logits: [..., w] the shard's logits.
        k: entries wanted (may exceed w).
        offset: the shard's first global id.

    Returns:
        ``(values [..., k], ids [..., k] int64)``, descending; entries past ``w`` have value
        -inf and id :data:`PAD_ID`.
    """
    take = min(k, logits.shape[-1])
    values, ids = torch.topk(logits, take, dim=-1, sorted=True)
    ids = ids + offset
    if take < k:
        shape = (*logits.shape[:-1], k - take)
        values = torch.cat([values, values.new_full(shape, -torch.inf)], dim=-1)
        ids = torch.cat([ids, ids.new_full(shape, PAD_ID)], dim=-1)
    return values, ids


def merge_topk(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full top-k from every shard's :func:`local_topk`.

    Args:
        values: [..., N, k] each shard's top values.
        ids: [..., N, k] their global ids (:data:`PAD_ID` for padding).
        k: entries wanted; at most the number of real (non-padding) candidates.

    Returns:
        ``(values [..., k], ids [..., k])`` descending. Among equal values real entries come
        before padding, then shard order, then each shard's own order.
    """
    flat_values, flat_ids = values.flatten(-2), ids.flatten(-2)  # [..., N*k]
    # Two stable sorts: padding to the back first, so that it loses every tie on the value.
    real_first = torch.argsort((flat_ids < 0).to(torch.uint8), dim=-1, stable=True)
    flat_values, flat_ids = flat_values.gather(-1, real_first), flat_ids.gather(-1, real_first)
    best = torch.argsort(flat_values, dim=-1, descending=True, stable=True)[..., :k]
    return flat_values.gather(-1, best), flat_ids.gather(-1, best)


def merge_logsumexp(lse: torch.Tensor) -> torch.Tensor:
    """The full logsumexp from the shards' logsumexps.

    Args:
        lse: [..., N]; -inf for an empty shard or one whose logits are all -inf.

    Returns:
        [...] (-inf when every shard is -inf).
    """
    return torch.logsumexp(lse, dim=-1)


def owned_value(logits: torch.Tensor, ids: torch.Tensor, offset: int) -> torch.Tensor:
    """Each position's logit of ``ids`` on the shard that owns it, -inf on the other shards.

    Args:
        logits: [..., w] this shard's logits.
        ids: [...] global ids (e.g. the next token at each position).
        offset: this shard's first global id.

    Returns:
        [...]; the owner's value survives a max over the shards (:func:`merge_owned`).
    """
    width = logits.shape[-1]
    local = ids - offset
    owned = (local >= 0) & (local < width)
    if width == 0:
        return logits.new_full(ids.shape, -torch.inf)
    picked = logits.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(owned, picked, torch.full_like(picked, -torch.inf))


def merge_owned(values: torch.Tensor) -> torch.Tensor:
    """The owner's value from every shard's :func:`owned_value`: [..., N] -> [...]."""
    return values.amax(dim=-1)


def shard_draw_counts(
    lse: torch.Tensor, draws: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """How many of ``draws`` draws from the full distribution land in each shard.

    Args:
        lse: [rows, N] the shards' logsumexps (identical on every shard, so every shard
            computes the same counts from the same generator state).
        draws: D.
        generator: the window's generator.

    Returns:
        [rows, N] int64 counts summing to D per row, ``Multinomial(D, exp(lse_i - lse))``.
    """
    probs = torch.exp(lse - merge_logsumexp(lse).unsqueeze(-1))
    picks = torch.multinomial(probs, draws, replacement=True, generator=generator)  # [rows, D]
    counts = torch.zeros(lse.shape, dtype=torch.int64, device=lse.device)
    return counts.scatter_add_(-1, picks, torch.ones_like(picks))


def draws_within_shard(
    logits: torch.Tensor,
    lse: torch.Tensor,
    counts: torch.Tensor,
    draws: int,
    offset: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One shard's share of the draws: ``counts[r]`` ids from ``softmax(logits[r])``.

    Every row draws ``draws`` ids i.i.d. and keeps the first ``counts[r]`` of them (a prefix
    of i.i.d. draws is i.i.d.), so the generator advances the same way whatever the counts.

    Args:
        logits: [rows, w] this shard's logits.
        lse: [rows] their logsumexp.
        counts: [rows] draws this shard makes per row (0 where its mass is 0).
        draws: D, the most any row can get.
        offset: this shard's first global id.
        generator: this shard's generator for the window.

    Returns:
        [rows, D] int64 global ids, the first ``counts[r]`` of row r valid, the rest :data:`PAD_ID`.
    """
    rows, width = logits.shape
    if width == 0:
        return torch.full((rows, draws), PAD_ID, dtype=torch.int64, device=logits.device)
    probs = torch.nan_to_num(torch.exp(logits - lse.unsqueeze(-1)), nan=0.0)
    # A row without mass here (all -inf) draws nothing, but multinomial needs a valid row.
    empty = probs.sum(-1) <= 0
    probs[empty, 0] = 1.0
    picks = torch.multinomial(probs, draws, replacement=True, generator=generator) + offset
    keep = torch.arange(draws, device=logits.device).unsqueeze(0) < counts.unsqueeze(-1)
    return torch.where(keep, picks, torch.full_like(picks, PAD_ID))


def merge_draws(draws: torch.Tensor) -> torch.Tensor:
    """Every shard's :func:`draws_within_shard` as D draws per row, sorted ascending.

    Args:
        draws: [..., N, D] global ids or :data:`PAD_ID`; each row holds exactly D real ids
            over its N shards.

    Returns:
        [..., D] int64, ascending.
    """
    flat = torch.sort(draws.flatten(-2), dim=-1).values  # padding (-1) first
    return flat[..., -draws.shape[-1] :]
