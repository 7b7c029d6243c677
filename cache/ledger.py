"""The progress ledger: which shards a producer rank has completed.

Each rank appends one JSON line per finished shard to ``progress/rank-RRRRR.jsonl``; the
writer keeps it up to date, and the manifest code reads it back to resume an interrupted
build and to list the shards of a finished one. Its own module, so reading a cache never
imports the writer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from longkd.cache import format as fmt
from longkd.cache.storage import Location
from longkd.fileio import is_temp_of


@dataclass
class ShardInfo:
    """One completed shard, as the progress ledger and the manifest record it."""

    path: str
    rows: int
    tokens: int
    bytes: int
    sha256: str
    first_window: int
    last_window: int
    stride: int = 1  # window ids are first_window + stride * i (a build by N ranks: N)

    def to_dict(self) -> dict:
        return asdict(self)


def write_ledger(location: Location, rank: int, shards: list[ShardInfo]) -> None:
    """Rewrite the rank's progress ledger atomically: one JSON line per completed shard."""
    text = "".join(json.dumps(s.to_dict(), sort_keys=True) + "\n" for s in shards)
    location.write_text_atomic(fmt.ledger_name(rank), text)


def remove_ledger_temporaries(location: Location, rank: int) -> list[str]:
    """Delete the temporary ledger files of ``rank`` that killed runs left; returns their names."""
    own = fmt.ledger_name(rank).rsplit("/", 1)[-1]
    return location.remove_temporaries(fmt.PROGRESS_DIR, lambda name: is_temp_of(name, own.__eq__))


def read_ledger(location: Location, rank: int) -> list[ShardInfo]:
    """The rank's ledger entries in order; an unreadable trailing line ends the list."""
    name = fmt.ledger_name(rank)
    if not location.is_file(name):
        return []
    shards = []
    for line in location.read_text(name).splitlines():
        try:
            shards.append(ShardInfo(**json.loads(line)))
        except (ValueError, TypeError):
            break
    return shards
