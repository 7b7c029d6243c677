"""The cache's ``manifest.json``: built, written last and atomically, loaded and validated.

A cache is finished exactly when its manifest exists, so the builder writes it only after
every shard is complete, and readers refuse a directory without one. Loading checks it against
the one schema (cache/manifest_schema.py: types, ranges, nesting, string lengths, claimed
sizes) and against the filesystem: every shard path stays inside the cache directory, also
through symbolic links, and every shard has the size the manifest claims, so a manifest can
neither point a reader at arbitrary files nor make it allocate for rows that are not there.

The producer's own bookkeeping lives here too: ``build.json`` (the settings a build started
with, compared on every rerun) and recovery of the shards a progress ledger
(cache/ledger.py) lists, which is what makes an interrupted build resumable.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import posixpath

import pyarrow as pa
import pyarrow.fs as pafs

from longkd import __version__
from longkd.cache import format as fmt
from longkd.cache import manifest_schema as schema
from longkd.cache.ledger import ShardInfo, read_ledger, remove_ledger_temporaries, write_ledger
from longkd.cache.storage import Location, os_reason
from longkd.errors import LongkdError, one_line
from longkd.fileio import is_temp_of, write_point


def build_manifest(
    *,
    teacher: dict,
    tokenizer: dict,
    embedding_size: int,
    window: int,
    packing: dict,
    selection: dict,
    temperature: float,
    encoding: dict,
    dataset: dict,
    shards: list[dict],
) -> dict:
    """The manifest dict of docs/format.md; ``totals`` are summed from ``shards``.

    Args:
        teacher: the teacher identity block (name_or_path, config/weights hashes, dtype...).
        tokenizer: fingerprint, size and special token ids.
        embedding_size: the teacher's logits dimension V.
        window: W.
        packing: packing settings plus ``stats``.
        selection: ``{"mode": "topk", "k": K}`` or ``{"mode": "sampled", "draws": N}``.
        temperature: T.
        encoding: ids / logprobs dtypes, compression and level, and ``columns`` (each list
            column's encoding).
        dataset: source description with ``fingerprint`` and ``samples``.
        shards: per-shard dicts (path, rows, tokens, bytes, sha256, first_window, ...) in order.
    """
    return {
        "format_version": fmt.FORMAT_VERSION,
        "producer": {"name": "longkd", "version": __version__},
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "teacher": teacher,
        "tokenizer": tokenizer,
        "vocab": {"tokenizer_size": tokenizer.get("size"), "embedding_size": int(embedding_size)},
        "window": int(window),
        "packing": packing,
        "selection": selection,
        "temperature": float(temperature),
        "encoding": encoding,
        "dataset": dataset,
        "shards": shards,
        "totals": {
            "windows": sum(int(s["rows"]) for s in shards),
            "tokens": sum(int(s["tokens"]) for s in shards),
            "bytes": sum(int(s["bytes"]) for s in shards),
        },
    }


def write_manifest(location: Location, manifest: dict) -> None:
    """Validate and write ``manifest.json`` atomically (temporary file, fsync, rename).

    Raises:
        LongkdError: the write failed (disk full, permissions); no manifest and no temporary
            file are left, and rerunning the same build finishes the cache from its shards.
    """
    validate_manifest(manifest, location.uri)
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    try:
        location.write_text_atomic(fmt.MANIFEST_NAME, text)
    except (OSError, pa.ArrowException) as err:
        raise LongkdError(
            f"writing {location.uri}/{fmt.MANIFEST_NAME} failed ({os_reason(err)}); the shards are kept: "
            "free space (or fix permissions) and rerun the same command to finish the cache"
        ) from err


def check_shard_path(path, where: str) -> str:
    """Return ``path`` if it is a relative POSIX path resolving inside the cache directory.

    Raises:
        LongkdError: absolute, a URI, a backslash path, escaping with ``..``, or a path or
            component longer than the schema's limits.
    """
    if not isinstance(path, str) or not path:
        raise LongkdError(f"{where}: shard path {path!r} is not a non-empty string; the manifest is corrupt")
    norm = posixpath.normpath(path)
    if (
        path.startswith("/")
        or "://" in path
        or "\\" in path
        or (len(path) > 1 and path[1] == ":")
        or norm == ".."
        or norm.startswith("../")
        or norm == "."
    ):
        raise LongkdError(
            f"{where}: shard path {path!r} is not a relative path inside the cache directory; "
            "the manifest is corrupt or was edited, rebuild the cache"
        )
    if len(path) > schema.MAX_PATH or any(len(part) > schema.MAX_NAME for part in path.split("/")):
        raise LongkdError(
            f"{where}: shard path {path[:40]!r}... is longer than {schema.MAX_PATH} characters or has a "
            f"name over {schema.MAX_NAME}; the manifest is corrupt or was edited, rebuild the cache"
        )
    return path


def validate_manifest(manifest, where: str) -> dict:
    """Check a manifest against the schema (cache/manifest_schema.py); return it unchanged.

    Args:
        manifest: the parsed JSON.
        where: the cache directory, for messages.

    Raises:
        LongkdError: naming the first problem found.
    """
    name = f"{where}/{fmt.MANIFEST_NAME}"
    if not isinstance(manifest, dict):
        raise LongkdError(f"{name} is not a JSON object; the cache is corrupt, rebuild it")
    schema.check_format_version(manifest.get("format_version"), name)
    schema.check_document(manifest, schema.MANIFEST, name)
    for shard in manifest["shards"]:
        check_shard_path(shard["path"], name)
    schema.check_manifest_rules(manifest, name)
    return manifest


def _read_json(location: Location, rel: str, limit: int, where: str):
    """Parse the JSON file ``rel`` of ``location`` after checking that it stays inside the
    directory and is not larger than ``limit`` bytes."""
    check_inside(location, rel, where)
    size = location.size(rel)
    if size > limit:
        raise LongkdError(f"{where} is {size} bytes, over the limit of {limit}; {schema.CORRUPT}")
    try:
        data = location.read_bytes(rel)
    except OSError as err:
        raise LongkdError(f"{where} cannot be read: {one_line(err)}") from err
    return schema.parse_json(data, where)


def check_inside(location: Location, rel: str, where: str) -> None:
    """Refuse a file of a local cache that a symbolic link leads outside the cache directory.

    Links that stay inside the directory are followed; object stores have no links.

    Raises:
        LongkdError: ``rel`` resolves outside the cache directory.
    """
    if not location.is_local:
        return
    root = os.path.realpath(location.root)
    try:
        real = os.path.realpath(location.path(rel))
    except (OSError, ValueError) as err:
        raise LongkdError(f"{where}: {rel!r} cannot be resolved ({one_line(err)})") from err
    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
        raise LongkdError(
            f"{where}: {rel} is a symbolic link leading outside the cache directory (to {real}); "
            "a cache must hold its own files, copy them in"
        )


def check_shard_files(location: Location, manifest: dict) -> None:
    """Check each listed shard against the filesystem: a regular file, inside the cache
    directory (after following links), of exactly the size the manifest claims.

    Raises:
        LongkdError: naming the first shard that is missing, outside, or of another size.
    """
    name = f"{location.uri}/{fmt.MANIFEST_NAME}"
    shards = manifest["shards"]
    for shard in shards:
        check_inside(location, shard["path"], name)
    try:
        infos = location.fs.get_file_info([location.path(shard["path"]) for shard in shards])
    except (OSError, pa.ArrowException) as err:
        raise LongkdError(f"{name}: the shard files cannot be listed ({one_line(err)})") from err
    for shard, info in zip(shards, infos):
        path = shard["path"]
        if info.type == pafs.FileType.NotFound:
            raise LongkdError(f"{name}: shard {path}: missing (listed in manifest.json but not on disk)")
        if info.type != pafs.FileType.File:
            raise LongkdError(f"{name}: shard {path}: not a regular file; {schema.CORRUPT}")
        if info.size != shard["bytes"]:
            raise LongkdError(
                f"{name}: shard {path}: size is {info.size} bytes, manifest says {shard['bytes']} "
                "(file truncated or changed); run `longkd cache verify` and rebuild the cache"
            )


def load_manifest(location: Location) -> dict:
    """Read ``manifest.json`` and validate it against the schema and the shard files' sizes.

    Raises:
        LongkdError: no such directory, no manifest (an unfinished build), bad JSON, an
            invalid manifest, or shards that are missing, linked from outside or of another size.
    """
    if not location.exists():
        raise LongkdError(f"{location.uri} does not exist; pass the --out directory of `longkd cache build`")
    if not location.is_file(fmt.MANIFEST_NAME):
        raise LongkdError(
            f"{location.uri} is not a finished longkd cache (no manifest.json); "
            "rerun `longkd cache build` with the same --out to finish it"
        )
    where = f"{location.uri}/{fmt.MANIFEST_NAME}"
    manifest = validate_manifest(_read_json(location, fmt.MANIFEST_NAME, schema.MAX_MANIFEST_BYTES, where),
                                 location.uri)  # fmt: skip
    check_shard_files(location, manifest)
    return manifest


def load_build_record(location: Location) -> dict:
    """Read ``build.json`` of an existing build and check it against the schema.

    Raises:
        LongkdError: unreadable, not JSON, or not the schema's build record.
    """
    where = f"--out {location.uri}/{fmt.BUILD_NAME}"
    record = _read_json(location, fmt.BUILD_NAME, schema.MAX_BUILD_RECORD_BYTES, where)
    schema.check_document(record, schema.BUILD_RECORD, where)
    return record


# ----------------------------------------------------------------- build.json and resume


def _flatten(record: dict, prefix: str = "") -> dict:
    """Nested dicts as dotted keys (``selection`` stays whole: it is one setting)."""
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "selection":
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _show(value) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def compare_build_record(location: Location, stored: dict, wanted: dict) -> None:
    """Refuse a rerun whose settings differ from those the directory was built with.

    Args:
        location: the --out directory (for the message).
        stored: its build.json.
        wanted: this run's record; only keys present here are compared (nested keys too).

    Raises:
        LongkdError: naming the first differing setting and both values.
    """
    have, want = _flatten(stored), _flatten(wanted)
    for key, value in want.items():
        if have.get(key) != value:
            name = key.removeprefix("settings.")
            raise LongkdError(
                f"--out {location.uri} holds a cache built with {name}={_show(have.get(key))}; "
                f"this run asks for {name}={_show(value)}. Use another --out or the same settings."
            )


def _is_root_temporary(name: str) -> bool:
    """A temporary file of build.json or manifest.json that a killed run left in the cache root."""
    return is_temp_of(name, {fmt.BUILD_NAME, fmt.MANIFEST_NAME}.__contains__)


def out_dir_state(location: Location) -> dict | None:
    """build.json of an existing longkd build at ``location``, None when it is new/empty.

    Temporary build.json / manifest.json files a killed run left are removed first, so a run
    killed before its build.json was in place starts afresh rather than being refused.

    Raises:
        LongkdError: the directory exists, is not empty and is not a longkd build.
    """
    if not location.exists():
        return None
    if not location.is_dir():
        raise LongkdError(f"--out {location.uri} exists and is not a directory; choose another --out")
    location.remove_temporaries("", _is_root_temporary)
    if location.is_file(fmt.BUILD_NAME):
        try:
            return load_build_record(location)
        except LongkdError as err:
            raise LongkdError(f"{err} (or use another --out)") from err
    if location.listdir():
        raise LongkdError(
            f"--out {location.uri} exists, is not empty and is not a longkd cache; "
            "choose a new or empty directory"
        )
    return None


def recover_shards(location: Location, rank: int) -> list[ShardInfo]:
    """Recover a rank's completed shards before resuming.

    Keeps the longest prefix of the progress ledger whose files exist with the recorded size
    and sha256 under the expected names, deletes every other file of that rank in shards/
    (temporary files, shards the ledger does not list; rank 0 also removes foreign files) and
    the rank's temporary ledger files, and rewrites the ledger to the kept prefix.

    Returns:
        The kept shards, in order.
    """
    kept: list[ShardInfo] = []
    for info in read_ledger(location, rank):
        if (
            info.path != fmt.shard_name(rank, len(kept))
            or location.size(info.path) != info.bytes
            or location.sha256(info.path) != info.sha256
        ):
            break
        kept.append(info)
    keep = {info.path.rsplit("/", 1)[-1] for info in kept}
    tag = f"-{rank:05d}-"
    for name in location.listdir(fmt.SHARDS_DIR):
        if name not in keep and (tag in name or rank == 0 and "shard-" not in name):
            location.delete(f"{fmt.SHARDS_DIR}/{name}")
            write_point("removed", location.path(f"{fmt.SHARDS_DIR}/{name}"))
    remove_ledger_temporaries(location, rank)
    write_ledger(location, rank, kept)
    return kept
