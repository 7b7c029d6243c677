"""Data-parallel cache builds under torchrun: which rank builds which windows, one manifest from many ledgers.

    torchrun --nproc-per-node 8 -m longkd cache build --teacher T --data D --window 4096 --out DIR

Every rank packs the whole dataset (packing is deterministic, so window ids agree) and runs
the teacher on the windows with ``window_id % world == rank``, writing its own shards
``shard-RRRRR-*`` and progress ledger. The ranks, the process group and the settings
agreement are :class:`longkd.distributed.Group`; what is the cache's own is
:func:`merge_shards`, which joins the per-rank ledgers into the manifest's shard list:
rank-major (rank 0's shards, then rank 1's, ...), and refuses a set that does not hold every
window id exactly once.
"""

from __future__ import annotations


def merge_shards(per_rank: list[list[dict]], where: str = "cache") -> list[dict]:
    """The manifest's shard list from every rank's completed shards.

    Args:
        per_rank: rank r's ledger entries (dicts with path, rows, first_window, stride, ...),
            in that rank's shard order, for r = 0 .. world - 1.
        where: the cache, for messages.

    Returns:
        The entries rank-major (all of rank 0's shards, then rank 1's, ...): the same order
        for the same shards, however the ranks' work was timed or resumed.

    Raises:
        LongkdError: the shards do not hold window ids ``0 .. total - 1`` exactly once.
    """
    from longkd.cache.reader import WindowIndex

    merged = [dict(entry) for shards in per_rank for entry in shards]
    WindowIndex(merged, f"{where}: merging the ranks' shards")
    return merged
