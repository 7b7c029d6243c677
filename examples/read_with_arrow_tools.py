"""Read a longkd cache with the usual Arrow tools: Hugging Face `datasets`, polars and DuckDB.

    python examples/read_with_arrow_tools.py --cache cache --window 3 --at 10

A cache is a folder of Arrow IPC files (one row per window) and a `manifest.json`
(docs/format.md). Generic Arrow tools read the plain column encoding (`longkd cache build
--encoding plain`); the default compact columns are byte strings that need the decoders
specified in docs/format.md. Each tool below finds window `--window` and prints the teacher's top
candidates for the token after position `--at` of a top-k cache: row t of a window stores
its K candidates at `ids[t*K:(t+1)*K]`, log-probs at the same places, most likely first.

DuckDB cannot scan float16 Arrow columns (`--logprob-dtype float16` caches): cast `logprobs`
to float32 in pyarrow before handing the table to DuckDB, as `with_duckdb` does.
"""

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc


def shard_files(cache):
    """The shard files of a cache, in the manifest's order, and K (top-k caches only)."""
    manifest = json.loads((Path(cache) / "manifest.json").read_text())
    if manifest["selection"]["mode"] != "topk":
        raise SystemExit("this example reads top-k caches; sampled ones store ids, counts and row_splits")
    return [str(Path(cache) / s["path"]) for s in manifest["shards"]], manifest["selection"]["k"]


def with_datasets(cache, window, at, cache_dir=None):
    from datasets import load_dataset

    files, k = shard_files(cache)
    table = load_dataset("arrow", data_files=files, split="train", cache_dir=cache_dir)
    row = table.filter(lambda w: w == window, input_columns="window_id")[0]
    return list(zip(row["ids"][at * k : (at + 1) * k], row["logprobs"][at * k : (at + 1) * k]))


def with_polars(cache, window, at):
    import polars as pl

    files, k = shard_files(cache)
    frame = pl.concat([pl.read_ipc(f) for f in files]).filter(pl.col("window_id") == window)
    top = frame.select(
        pl.col("ids").list.slice(at * k, k),
        pl.col("logprobs").list.slice(at * k, k).cast(pl.List(pl.Float32)),
    ).explode("ids", "logprobs")
    return list(zip(top["ids"].to_list(), top["logprobs"].to_list()))


def with_duckdb(cache, window, at):
    import duckdb

    files, k = shard_files(cache)
    shards = pa.concat_tables([pa.ipc.open_file(f).read_all() for f in files])
    column = shards.schema.get_field_index("logprobs")
    shards = shards.set_column(column, "logprobs", pc.cast(shards["logprobs"], pa.list_(pa.float32())))
    rows = duckdb.sql(  # DuckDB finds the Arrow table `shards` by its Python name
        # DuckDB lists are 1-based and slices include both ends
        f"SELECT unnest(ids[{at * k + 1}:{(at + 1) * k}]) AS id, "
        f"unnest(logprobs[{at * k + 1}:{(at + 1) * k}]) AS logprob FROM shards WHERE window_id = {window}"
    ).fetchall()
    return [(int(i), float(p)) for i, p in rows]


def main(cache, window=0, at=0, cache_dir=None):
    return {
        "datasets": with_datasets(cache, window, at, cache_dir),
        "polars": with_polars(cache, window, at),
        "duckdb": with_duckdb(cache, window, at),
    }


if __name__ == "__main__":
    import math

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--window", type=int, default=0)
    parser.add_argument("--at", type=int, default=0, help="position in the window")
    args = parser.parse_args()
    for tool, top in main(args.cache, args.window, args.at).items():
        print(f"{tool:>8}: " + ", ".join(f"{i} ({math.exp(lp):.3f})" for i, lp in top[:5]))
