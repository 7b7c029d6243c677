"""Damaged shards and hostile manifests end in one clear line or an unchanged result.

Every consumer of a cache (the reader, `longkd train`, `longkd eval --task cache-kl`,
`longkd cache inspect`, `info`, `verify`) is run on caches damaged on purpose: random
single-bit flips in a shard (a fresh seed every run, printed on failure), the hostile
manifests of tools/audit_cache.py, symbolic links out of the cache, a list offset that makes
Arrow itself abort, a re-signed out-of-vocabulary id, and format-1 caches. The audit runs the
consumers in a worker process, so an abort shows as its exit status, not as a dead test run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import xxhash

from longkd.cache import format as fmt
from longkd.cache.manifest import load_manifest, out_dir_state
from longkd.cache.reader import CacheReader
from longkd.cache.rows import DamagedWindow, UnreadableShard, read_columns, window_checksum
from longkd.cache.storage import Location
from longkd.cache.verify import verify_cache
from longkd.cli import main
from longkd.errors import LongkdError
from longkd.tools import audit_cache
from longkd.trainer.stream import WindowStream

ISSUE_MANIFESTS = (
    '"encoding": []', '"vocab": "x"', '"temperature": "hot"', '"first_window": "abc"', "5,000-deep nesting",
    "NUL byte in a shard path", "5,000-character shard path", "rows 10**12, consistent",
    "shard is a link out of the cache",
)  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The audit's tiny cache: 8 windows of 32 (the last padded), top-k 4, one shard."""
    return audit_cache.build_world(tmp_path_factory.mktemp("audit"))


@pytest.fixture
def cache(world, tmp_path):
    return audit_cache.make_case(world, {"kind": "none"}, tmp_path / "cache")


def windows_of(cache, **kwargs) -> list:
    with CacheReader(cache, **kwargs) as reader:
        return list(reader.iter_windows())


def one_line_error(run: subprocess.CompletedProcess) -> str:
    """The command's error, required to be exit status 2 and the one last line it wrote (lines
    before it, such as a model loader's progress bar, are not longkd's)."""
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("longkd: error:")]
    assert run.returncode == 2 and len(errors) == 1 and lines[-1] == errors[0], run.stderr[-800:]
    assert "Traceback" not in run.stderr
    return errors[0]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """``python -m longkd ARGV`` in a fresh process: an abort is a negative exit status there."""
    return subprocess.run(
        [sys.executable, "-m", "longkd", *argv], capture_output=True, text=True, timeout=300
    )


def rewrite_shard(
    cache: Path, shard: str, edit, *, version: int = 2, compress: bool = True, resign_rows: bool = True
) -> None:
    """Rewrite ``shard`` with ``edit(columns) -> columns`` applied to every row's numpy columns,
    as format ``version``, and re-sign the manifest (size, sha256, format version) so only the
    rows can tell. Format 2: each row's checksum is recomputed after the edit
    (``resign_rows``) or kept as the edit leaves ``columns.checksum``."""
    manifest = json.loads((cache / "manifest.json").read_text())
    mode, dtype = manifest["selection"]["mode"], manifest["encoding"]["logprobs"]
    schema = fmt.shard_schema(mode, dtype, version)
    table = pa.ipc.open_file(str(cache / shard)).read_all()
    batches = []
    for row in range(table.num_rows):
        columns = edit(read_columns(table.slice(row, 1).combine_chunks().to_batches()[0], 0, mode))
        arrays = {
            fmt.WINDOW_ID: pa.array([columns.window_id], pa.int64()),
            fmt.LENGTH: pa.array([columns.length], pa.int32()),
        }
        for name in schema.names[2:]:
            if name == fmt.CHECKSUM:
                checksum = window_checksum(columns, mode) if resign_rows else columns.checksum
                arrays[name] = pa.array([checksum], pa.uint64())
            else:
                values = pa.array(columns.values(name), schema.field(name).type.value_type)
                arrays[name] = pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)
        batches.append(pa.RecordBatch.from_arrays([arrays[n] for n in schema.names], schema=schema))
    options = pa.ipc.IpcWriteOptions(compression="zstd" if compress else None)
    with pa.ipc.new_file(str(cache / shard), schema, options=options) as sink:
        for batch in batches:
            sink.write_batch(batch)
    resign(cache, format_version=version)


def bad_checksum(window: int):
    """An edit for :func:`rewrite_shard` giving ``window`` a wrong checksum."""

    def edit(columns):
        if columns.window_id == window:
            columns.checksum = (columns.checksum + 1) % 2**64
        return columns

    return edit


def resign(cache: Path, **top) -> None:
    """Put the shards' real sizes and sha256 (and ``top`` keys) into the manifest."""
    manifest = json.loads((cache / "manifest.json").read_text())
    location = Location(cache)
    for entry in manifest["shards"]:
        entry["bytes"] = (cache / entry["path"]).stat().st_size
        entry["sha256"] = location.sha256(entry["path"])
    manifest["totals"]["bytes"] = sum(entry["bytes"] for entry in manifest["shards"])
    manifest.update(top)
    (cache / "manifest.json").write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- the audit


def test_random_flips_and_hostile_manifests_through_every_consumer(world, tmp_path):
    seed = int(np.random.default_rng().integers(2**31))
    size = (world["cache"] / world["shard"]).stat().st_size
    cases = [{**c, "consumers": list(audit_cache.CONSUMERS)} for c in audit_cache.flip_cases(size, 50, seed)]
    hostile = {c["name"]: c for c in audit_cache.manifest_cases(world["cache"])}
    chosen = [
        *ISSUE_MANIFESTS, "NaN temperature", "not UTF-8", "bytes 10**14, consistent", "window=1.5",
        "shards.0.rows=-1", "selection.k deleted", "manifest.json is a link out of the cache",
    ]  # fmt: skip
    cases += [{**hostile[name], "consumers": list(audit_cache.MANIFEST_CONSUMERS)} for name in chosen]
    records = audit_cache.run_audit(cases, Path(world["cache"]).parent)
    summary = audit_cache.summarise(records)
    assert len(records) == 50 * 4 + len(chosen) * 6
    assert not summary["bad"], f"seed {seed}: {summary['bad'][:5]}"
    assert {r["status"] for r in records} <= {"same", "error"}, f"seed {seed}"
    flips = [r for r in records if r["kind"] == "flip"]
    assert sum(r["status"] == "error" for r in flips) >= 50, f"seed {seed}: most flips must be caught"
    for r in records:
        if r["kind"] != "flip":
            assert r["status"] == "error", r  # none of these manifests may be accepted
        if r["status"] == "error" and r["kind"] == "flip":
            assert "is damaged" in r["detail"] or "is unreadable" in r["detail"], r


# ----------------------------------------------------------------------------- one window


def test_checksum_follows_the_spec(world):
    """docs/format.md "Checksum", computed here with pyarrow and xxhash alone."""
    manifest = json.loads((world["cache"] / "manifest.json").read_text())
    table = pa.ipc.open_file(str(world["cache"] / world["shard"])).read_all()
    lists = ["input_ids", "segment_starts", "ids", "logprobs", "target_logprob"]
    assert (
        table.schema.names == ["window_id", "length", *lists, "checksum"] and manifest["format_version"] == 3
    )
    for row in table.to_pylist():
        digest = xxhash.xxh3_64()
        digest.update(np.int64(row["window_id"]).tobytes() + np.int32(row["length"]).tobytes())
        for name, dtype in zip(lists, ("<i4", "<i4", "<i4", "<f4", "<f4")):
            values = np.array(row[name], dtype=dtype)
            digest.update(np.uint64(len(values)).astype("<u8").tobytes() + values.tobytes())
        assert digest.intdigest() == row["checksum"]


def test_damaged_window_is_named_or_skipped_and_counted(cache, world):
    shard = world["shard"]
    good = windows_of(cache)

    def damage(columns):  # a value changed after its checksum was computed
        if columns.window_id == 5:
            columns.target_logprob = columns.target_logprob.copy()
            columns.target_logprob[3] -= 0.25
        return columns

    manifest = json.loads((cache / "manifest.json").read_text())
    rewrite_shard(cache, shard, damage, resign_rows=False)
    with CacheReader(cache) as reader:
        for i in (0, 4, 6, 7):
            np.testing.assert_array_equal(reader.read_window(i).logprobs, good[i].logprobs)
        with pytest.raises(DamagedWindow) as info:
            reader.read_window(5)
    message = str(info.value)
    assert (
        f"window 5 in shard {shard} of {cache} is damaged: checksum mismatch" in message
        and "\n" not in message
    )
    with CacheReader(cache, skip_damaged=True) as reader:
        assert [w.window_id for w in reader.iter_windows()] == [0, 1, 2, 3, 4, 6, 7]
        assert reader.damaged == [5]
    result = verify_cache(cache)
    assert not result.ok and result.problem.startswith(f"shard {shard}: window 5: checksum mismatch")
    assert (
        manifest["shards"][0]["sha256"]
        != json.loads((cache / "manifest.json").read_text())["shards"][0]["sha256"]
    )


def test_skip_damaged_in_inspect_and_eval(cache, world, tmp_path, capsys):
    from longkd.tools.eval_cache import kl_by_position
    from longkd.tools.inspect_cache import inspect_cache

    rewrite_shard(cache, world["shard"], bad_checksum(2), resign_rows=False)
    with pytest.raises(DamagedWindow, match="window 2 in shard"):
        inspect_cache(cache)
    result = inspect_cache(cache, skip_damaged=True)
    assert result["sample"]["damaged"] == [2] and 2 not in result["sample"]["windows"]
    kl = kl_by_position(str(world["teacher"]), cache, windows=8, skip_damaged=True)
    assert kl["damaged"] == [2] and kl["windows"] == [0, 1, 3, 4, 5, 6, 7]
    argv = ["eval", str(world["teacher"]), "--task", "cache-kl", "--cache", str(cache), "--device", "cpu",
            "--out", str(tmp_path / "eval")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("longkd: error:") == 1 and "window 2 in shard" in err and "Traceback" not in err
    assert main([*argv, "--skip-damaged", "--json"]) == 0
    captured = capsys.readouterr()
    assert "longkd: skipped 1 damaged windows: [2]" in captured.err
    assert json.loads(captured.out)["windows"] == [0, 1, 3, 4, 5, 6, 7]


def test_offsets_past_the_values_are_an_error_not_an_abort(cache, world):
    """List offsets beyond the values make pyarrow abort the process when a row is sliced
    (`Check failed: (off) <= (length)`); every batch is validated before it is touched."""
    shard = cache / world["shard"]
    rewrite_shard(cache, world["shard"], lambda c: c, compress=False)  # offsets stored as plain int32
    data = shard.read_bytes()
    pattern = np.array([0, audit_cache.WINDOW * audit_cache.TOP_K], "<i4").tobytes()  # ids' offsets
    hits = [i for i in range(len(data)) if data.startswith(pattern, i)]
    assert len(hits) >= audit_cache.WINDOWS
    # every position in one fresh process: an abort there is its exit status
    script = f"""
import sys, numpy as np
from pathlib import Path
from longkd.cache.reader import CacheReader
from longkd.errors import LongkdError
shard, data = Path({str(shard)!r}), Path({str(shard)!r}).read_bytes()
for at in {hits!r}:
    damaged = bytearray(data)
    damaged[at : at + 4] = np.array([10**6], "<i4").tobytes()
    shard.write_bytes(bytes(damaged))
    try:
        n = len(list(CacheReader({str(cache)!r}).iter_windows()))
        print("read", n)
    except LongkdError as err:
        print("error", str(err).replace(chr(10), " NEWLINE "))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-800:]
    outcomes = run.stdout.splitlines()
    assert len(outcomes) == len(hits) and all(o.startswith(("read 8", "error ")) for o in outcomes)
    errors = [o for o in outcomes if o.startswith("error")]
    assert len(errors) >= audit_cache.WINDOWS and all("NEWLINE" not in o for o in errors)
    assert sum("record batch" in o and "unreadable" in o for o in errors) >= audit_cache.WINDOWS
    # and through the command line: exit status 2, one line
    assert "is damaged: record batch" in one_line_error(run_cli("cache", "inspect", str(cache)))


def test_resigned_out_of_vocabulary_id_fails_verify_read_and_train(cache, world, tmp_path):
    """An input id beyond the vocabulary with its checksum and the manifest re-signed: only
    the row rules can tell, and every reader applies them."""

    def bad_id(columns):
        if columns.window_id == 3:
            columns.input_ids = columns.input_ids.copy()
            columns.input_ids[7] = audit_cache.VOCAB + 5
        return columns

    rewrite_shard(cache, world["shard"], bad_id)
    result = verify_cache(cache)
    assert not result.ok
    assert (
        result.problem
        == f"shard {world['shard']}: window 3: input_ids outside [0, {audit_cache.VOCAB}) (embedding size)"
    )
    with pytest.raises(DamagedWindow, match=r"window 3 in shard .* input_ids outside \[0, 64\)"):
        CacheReader(cache).read_window(3)
    status, detail = audit_cache.run_consumer("train", cache, world, tmp_path / "scratch")
    assert status == "error" and "window 3 in shard" in detail and "input_ids outside" in detail


def test_worker_errors_reach_the_trainer_as_one_line(cache, world):
    rewrite_shard(cache, world["shard"], bad_checksum(6), resign_rows=False)
    stream = WindowStream(str(cache), batch_size=4, shuffle=False, num_workers=1)
    with pytest.raises(LongkdError) as info:
        for _ in range(3):
            next(iter(stream))
    text = str(info.value)
    assert "window 6 in shard" in text and "\n" not in text and "Traceback" not in text


# ----------------------------------------------------------------------------- format 1


def test_format_1_cache_still_reads_and_a_full_pass_checks_its_hashes(cache, world):
    good = windows_of(cache)
    rewrite_shard(cache, world["shard"], lambda c: c, version=1, compress=False)
    assert pa.ipc.open_file(str(cache / world["shard"])).schema.names[-1] == "target_logprob"
    old = windows_of(cache)
    for a, b in zip(good, old):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert verify_cache(cache).ok and windows_of(cache, full_pass=True)
    # change one stored log-prob in place (same size): only the shard's sha256 can tell
    shard = cache / world["shard"]
    data = bytearray(shard.read_bytes())
    value = np.float32(good[2].target_logprob[0]).tobytes()
    at = bytes(data).find(value)
    data[at : at + 4] = np.float32(-0.125).tobytes()
    shard.write_bytes(bytes(data))
    with pytest.raises(UnreadableShard, match="sha256 differs from the manifest's"):
        windows_of(cache, full_pass=True)
    with pytest.raises(LongkdError, match="sha256 differs") as info:
        next(iter(WindowStream(str(cache), batch_size=2, num_workers=0)))
    assert "\n" not in str(info.value)
    assert not verify_cache(cache).ok


def test_format_1_shard_in_a_format_2_cache_is_refused(cache, world):
    rewrite_shard(cache, world["shard"], lambda c: c, version=1)
    resign(cache, format_version=2)
    with pytest.raises(UnreadableShard, match="schema differs from the cache's"):
        CacheReader(cache).read_window(0)


# ----------------------------------------------------------------------------- manifests


@pytest.mark.parametrize(
    "name",
    ISSUE_MANIFESTS[:-1] + (
        "Infinity temperature", "1e999 temperature", "900-deep nesting in teacher",
        "5,000-character teacher name", "draws in a top-k cache", "window 2**40",
    ),
)  # fmt: skip
def test_hostile_manifest_is_one_line(name, world, tmp_path):
    case = {c["name"]: c for c in audit_cache.manifest_cases(world["cache"])}[name]
    cache = audit_cache.make_case(world, case, tmp_path / "cache")
    with pytest.raises(LongkdError) as info:
        with CacheReader(cache) as reader:
            list(reader.iter_windows())
    assert "\n" not in str(info.value) and len(str(info.value)) < 600


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda m: m.update(encoding=[]), "encoding is [], expected an object"),
        (lambda m: m.update(vocab="x"), "vocab is 'x', expected an object"),
        (lambda m: m.update(temperature="hot"), "temperature is 'hot', expected a finite number above 0"),
        (
            lambda m: m["shards"][0].update(first_window="abc"),
            "shards[0].first_window is 'abc', expected an integer",
        ),
        (lambda m: m["shards"][0].update(path="shards/\x00.arrow"), "shards[0].path holds a NUL character"),
        (lambda m: m["shards"][0].update(rows=True), "shards[0].rows is True, expected an integer"),
        (lambda m: m["selection"].pop("k"), "selection lacks k for mode 'topk'"),
        (
            lambda m: m["shards"][0].update(stride=0),
            "shards[0].stride is 0, expected an integer in [1, 2^31-1]",
        ),
    ],
)
def test_manifest_messages_name_the_key(edit, needle, cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    edit(manifest)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LongkdError) as info:
        load_manifest(Location(cache))
    assert needle in str(info.value) and "rebuild the cache" in str(info.value)


def test_claimed_rows_are_bounded_by_the_file(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    rows = manifest["shards"][0]["bytes"] // 64 + 1
    manifest["shards"][0].update(rows=rows, last_window=rows - 1)
    manifest["totals"]["windows"] = rows
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LongkdError, match=f"claims {rows} rows in .* bytes"):
        CacheReader(cache)


def test_links_inside_the_cache_are_followed_outside_refused(cache, world, tmp_path):
    shard = cache / world["shard"]
    inside = cache / "shards" / "moved.arrow"
    shutil.move(shard, inside)
    shard.symlink_to(inside)
    assert len(windows_of(cache)) == audit_cache.WINDOWS
    outside = tmp_path / "elsewhere.arrow"
    shutil.move(inside, outside)
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(LongkdError, match="symbolic link leading outside the cache directory"):
        CacheReader(cache)
    (cache / "manifest.json").rename(tmp_path / "m.json")
    (cache / "manifest.json").symlink_to(tmp_path / "m.json")
    with pytest.raises(LongkdError, match="manifest.json is a symbolic link leading outside"):
        CacheReader(cache)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[" * 5000 + "]" * 5000, "nests deeper than 32 levels"),
        ('{"format_version": 2, "settings": []}', "settings is [], expected an object"),
        ('{"format_version": 2, "settings": {"a": ' + "[" * 40 + "]" * 40 + "}}", "nests deeper than 32"),
        ('{"settings": {}}', "lacks format_version"),
        ("\xff", "is not valid JSON"),
    ],
)
def test_hostile_build_record_is_one_line(text, needle, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "build.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(LongkdError) as info:
        out_dir_state(Location(out))
    assert needle in str(info.value) and "--out" in str(info.value) and "\n" not in str(info.value)
