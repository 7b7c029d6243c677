"""Fault-injection audit of everything that reads a cache: damaged shards and hostile manifests.

A cache is shared, copied and downloaded, so its bytes may be damaged or crafted. This script
builds a tiny cache, then for each case (a seeded random single-bit flip in its shard, or a
hostile ``manifest.json`` / a symbolic link out of the cache) runs each consumer on a fresh
copy and sorts the outcome:

- ``same``: the result equals the one from the undamaged cache (the flip hit bytes the
  consumer never uses, or bytes whose change cannot matter);
- ``error``: one clear line (a ``LongkdError``; the command exits with status 2);
- ``changed``: a result that differs from the undamaged one, without a word: a silently
  wrong number;
- ``traceback``: another exception escaped; ``multiline``: an error of more than one line;
- ``abort``: the process died (a signal or exit status 134, e.g. an abort inside Arrow).

A hostile manifest may hold a value that is valid for its key (``temperature: 1.5``, a
deleted optional key): it is then accepted (``same`` or ``changed``), as it must be. Not
allowed are tracebacks, errors of several lines and aborts anywhere, and a ``changed``
result from a flipped shard.

Consumers: ``reader`` (``CacheReader.iter_windows`` over every window), ``train``
(``longkd train``, 2 steps of a tiny student, a DataLoader worker decoding), ``eval``
(``longkd eval --task cache-kl``), ``inspect`` (``longkd cache inspect --json``), and for
manifests also ``info`` and ``verify``. The cases run in a worker process, one after
another, so that an abort is seen as the worker's exit status and the audit goes on with the
next case in a fresh worker.

    python -m longkd.tools.audit_cache --flips 150 --seed 0            # flips and manifests
    python -m longkd.tools.audit_cache --flips 50 --no-manifests --consumers reader,inspect
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

CONSUMERS = ("reader", "train", "eval", "inspect")
MANIFEST_CONSUMERS = ("reader", "train", "eval", "inspect", "info", "verify")
CRASHES = ("traceback", "multiline", "abort")
VOCAB, WINDOW, TOP_K, WINDOWS = 64, 32, 4, 8


# ----------------------------------------------------------------------------- the world


def build_world(work: Path) -> dict:
    """A tiny teacher, a one-shard top-k cache of :data:`WINDOWS` windows (the last padded) and
    a train config, under ``work`` (reused when already there).

    Returns:
        ``{"cache": pristine cache dir, "teacher": model dir, "shard": its shard's path}``.
    """
    from longkd.cache.build import build_cache
    from longkd.cache.build_settings import resolve_settings
    from longkd.tools.random_models import ids_to_text, save_tiny_model

    work.mkdir(parents=True, exist_ok=True)
    cache = work / "pristine"
    teacher = work / "teacher"
    if not (cache / "manifest.json").is_file():
        shutil.rmtree(cache, ignore_errors=True)
        save_tiny_model(teacher, arch="llama", vocab_size=VOCAB, hidden_size=32, num_layers=1,
                        max_position_embeddings=4 * WINDOW, initializer_range=0.2)  # fmt: skip
        rng = np.random.default_rng(0)
        with (work / "data.jsonl").open("w") as f:
            for _ in range(14):
                f.write(
                    json.dumps({"text": ids_to_text(rng.integers(4, VOCAB, size=rng.integers(5, 30)))}) + "\n"
                )
        settings = resolve_settings({
            "teacher": str(teacher), "data": str(work / "data.jsonl"), "window": WINDOW, "out": str(cache),
            "top_k": TOP_K, "max_windows": WINDOWS, "tail": "pad", "device": "cpu", "batch_size": 4,
            "encoding": "plain",  # the cases rewrite plain Arrow list columns
        })  # fmt: skip
        build_cache(settings, progress=False, echo=lambda *_: None)
    manifest = json.loads((cache / "manifest.json").read_text())
    (shard,) = [s["path"] for s in manifest["shards"]]
    return {"cache": cache, "teacher": teacher, "shard": shard}


# ----------------------------------------------------------------------------- cases


def flip_cases(shard_bytes: int, flips: int, seed: int) -> list[dict]:
    """``flips`` single-bit flips at offsets drawn uniformly over the shard, from ``seed``."""
    rng = np.random.default_rng(seed)
    return [
        {"kind": "flip", "name": f"flip@{offset}.{bit}", "offset": int(offset), "bit": int(bit)}
        for offset, bit in zip(rng.integers(0, shard_bytes, size=flips), rng.integers(0, 8, size=flips))
    ]


def _set(doc: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(doc)
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


_DELETE = object()
# Every key a reader uses, and values of the wrong type or out of range for it.
_PATHS = (
    ("format_version",), ("producer",), ("created",), ("teacher",), ("teacher", "name_or_path"),
    ("teacher", "max_position_embeddings"), ("tokenizer",), ("tokenizer", "fingerprint"), ("vocab",),
    ("vocab", "tokenizer_size"), ("vocab", "embedding_size"), ("window",), ("packing",),
    ("packing", "position_mode"), ("packing", "stats"), ("selection",), ("selection", "mode"),
    ("selection", "k"), ("temperature",), ("encoding",), ("encoding", "logprobs"), ("dataset",),
    ("shards",), ("shards", 0), ("shards", 0, "path"), ("shards", 0, "rows"), ("shards", 0, "tokens"),
    ("shards", 0, "bytes"), ("shards", 0, "sha256"), ("shards", 0, "first_window"),
    ("shards", 0, "last_window"), ("shards", 0, "stride"), ("totals",), ("totals", "windows"),
    ("totals", "tokens"),
)  # fmt: skip
_WRONG = ([], "x", -1, 10**12, 1.5, True)


def _name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def manifest_cases(cache: Path) -> list[dict]:
    """Hostile manifests (each key a reader uses with wrong types, out-of-range values or
    deleted; the cases of the issue; broken JSON) and symbolic links out of the cache.

    Each case is ``{"kind": "manifest", "name", "text"}`` (the manifest.json to write, as a
    latin-1 string of its bytes) or ``{"kind": "link", "name", "target"}``.
    """
    good = json.loads((cache / "manifest.json").read_text())
    cases = []

    def add(name: str, doc=None, text: str | None = None):
        if text is None:
            text = json.dumps(doc)
        cases.append({"kind": "manifest", "name": name, "text": text})

    for path in _PATHS:
        for value in _WRONG:
            add(f"{_name(path)}={value!r}", _set(good, path, value))
        add(f"{_name(path)} deleted", _set(good, path, _DELETE))
    shard = good["shards"][0]
    huge_rows = _set(good, ("shards", 0), {**shard, "rows": 10**12, "last_window": 10**12 - 1})
    huge_rows["totals"]["windows"] = 10**12
    huge_bytes = _set(good, ("shards", 0, "bytes"), 10**14)
    huge_bytes["totals"]["bytes"] = 10**14
    deep = "[" * 5000 + "]" * 5000
    nested = json.loads("[" * 900 + "]" * 900)
    specials = {
        '"encoding": []': _set(good, ("encoding",), []),
        '"vocab": "x"': _set(good, ("vocab",), "x"),
        '"temperature": "hot"': _set(good, ("temperature",), "hot"),
        '"first_window": "abc"': _set(good, ("shards", 0, "first_window"), "abc"),
        "rows 10**12, consistent": huge_rows,
        "bytes 10**14, consistent": huge_bytes,
        "NUL byte in a shard path": _set(good, ("shards", 0, "path"), "shards/\x00x.arrow"),
        "NUL byte in the teacher name": _set(good, ("teacher", "name_or_path"), "a\x00b"),
        "5,000-character shard path": _set(good, ("shards", 0, "path"), "shards/" + "a" * 5000 + ".arrow"),
        "5,000-character teacher name": _set(good, ("teacher", "name_or_path"), "t" * 5000),
        "300-character file name": _set(good, ("shards", 0, "path"), "shards/" + "a" * 300),
        "path ../": _set(good, ("shards", 0, "path"), "../outside.arrow"),
        "absolute path": _set(good, ("shards", 0, "path"), "/etc/passwd"),
        "URI path": _set(good, ("shards", 0, "path"), "s3://bucket/x.arrow"),
        "backslash path": _set(good, ("shards", 0, "path"), "shards\\x.arrow"),
        "directory as shard": _set(good, ("shards", 0, "path"), "shards"),
        "900-deep nesting in teacher": _set(good, ("teacher", "rope_parameters"), nested),
        "window 2**40": _set(good, ("window",), 2**40),
        "k above the vocabulary": _set(good, ("selection", "k"), 10**6),
        "draws in a top-k cache": _set(good, ("selection",), {"mode": "sampled", "draws": 4}),
        "format_version 99": _set(good, ("format_version",), 99),
        "second shard duplicated": _set(good, ("shards",), [shard, shard]),
        "no shards": _set(good, ("shards",), []),
        "manifest is a list": [good],
    }  # fmt: skip
    for name, doc in specials.items():
        add(name, doc)
    for name, text in {
        "5,000-deep nesting": deep,
        "5,000-deep nesting under a key": json.dumps(good)[:-1] + ', "x": ' + deep + "}",
        "NaN temperature": json.dumps(good).replace('"temperature": 1.0', '"temperature": NaN'),
        "Infinity temperature": json.dumps(good).replace('"temperature": 1.0', '"temperature": Infinity'),
        "1e999 temperature": json.dumps(good).replace('"temperature": 1.0', '"temperature": 1e999'),
        "not JSON": "{not json",
        "empty file": "",
        "truncated": json.dumps(good)[:200],
        "not UTF-8": '{"format_version": 2, "x": "\xff\xfe"}',
    }.items():
        add(name, text=text)
    cases.append({"kind": "link", "name": "shard is a link out of the cache", "target": "shard"})
    cases.append({"kind": "link", "name": "shards/ is a link out of the cache", "target": "shards"})
    cases.append({"kind": "link", "name": "manifest.json is a link out of the cache", "target": "manifest"})
    return cases


def make_case(world: dict, case: dict, dest: Path) -> Path:
    """A fresh copy of the pristine cache at ``dest`` with ``case`` applied (kind ``none``:
    the copy alone)."""
    shutil.rmtree(dest.parent / "outside", ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(world["cache"], dest)
    if case["kind"] == "flip":
        shard = dest / world["shard"]
        data = bytearray(shard.read_bytes())
        data[case["offset"]] ^= 1 << case["bit"]
        shard.write_bytes(bytes(data))
    elif case["kind"] == "manifest":
        text = case["text"]
        (dest / "manifest.json").write_bytes(
            text.encode("latin-1") if _is_bytes_text(text) else text.encode()
        )
    elif case["kind"] == "link":
        outside = dest.parent / "outside"
        outside.mkdir()
        if case["target"] == "shard":
            moved = outside / "shard.arrow"
            shutil.move(dest / world["shard"], moved)
            (dest / world["shard"]).symlink_to(moved)
        elif case["target"] == "shards":
            shutil.move(dest / "shards", outside / "shards")
            (dest / "shards").symlink_to(outside / "shards")
        else:
            shutil.move(dest / "manifest.json", outside / "manifest.json")
            (dest / "manifest.json").symlink_to(outside / "manifest.json")
    return dest


def _is_bytes_text(text: str) -> bool:
    """True for a case written as raw bytes (characters 0x80-0xff standing for single bytes)."""
    return any("\x80" <= c <= "\xff" for c in text)


# ----------------------------------------------------------------------------- consumers


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """Run ``longkd ARGV`` in this process: (exit status, stdout, stderr)."""
    from longkd.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _outcome(code: int, stdout: str, stderr: str, digest) -> tuple[str, str]:
    if code == 0:
        return "ok", digest()
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("longkd: error:")]
    if code == 2 and len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in stderr:
        return "error", errors[0][:300]
    return "multiline", stderr[-600:]


def run_consumer(name: str, cache: Path, world: dict, scratch: Path) -> tuple[str, str]:
    """Run one consumer on ``cache``: ``("ok", digest of its result)`` or ``(status, detail)``."""
    from longkd.errors import LongkdError

    scratch.mkdir(parents=True, exist_ok=True)
    if name == "reader":
        from longkd.cache.reader import CacheReader

        try:
            digest = hashlib.sha256()
            with CacheReader(cache) as reader:
                for w in reader.iter_windows():
                    digest.update(str((w.window_id, w.length)).encode())
                    for a in (
                        w.input_ids,
                        w.segment_starts,
                        w.position_ids,
                        w.target_logprob,
                        w.ids,
                        w.logprobs,
                    ):
                        digest.update(np.ascontiguousarray(a).tobytes())
            return "ok", digest.hexdigest()
        except LongkdError as err:
            text = str(err)
            return ("error", text[:300]) if "\n" not in text else ("multiline", text[:600])
    if name == "train":
        out = scratch / "train"
        shutil.rmtree(out, ignore_errors=True)
        config = {
            "cache": str(cache), "out": str(out), "steps": 2, "batch_size": 4, "device": "cpu", "seed": 0,
            "loader": {"num_workers": 1},
            "students": [{"name": "s", "init": {"arch": "llama", "hidden_size": 16, "num_layers": 1,
                                                "num_heads": 2, "seed": 1},
                          "optimizer": {"lr": 1e-3, "warmup_steps": 0}}],
        }  # fmt: skip
        (scratch / "train.json").write_text(json.dumps(config))

        def weights():
            files = sorted((out / "s" / "checkpoints").rglob("*.safetensors"))
            return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest() if files else "none"

        return _outcome(*_cli(["train", str(scratch / "train.json")]), weights)
    if name == "eval":
        out = scratch / "eval"
        shutil.rmtree(out, ignore_errors=True)
        argv = ["eval", str(world["teacher"]), "--task", "cache-kl", "--cache", str(cache), "--out", str(out),
                "--device", "cpu", "--dtype", "float32", "--windows", str(WINDOWS)]  # fmt: skip

        def numbers():
            result = json.loads((out / "results.json").read_text())
            return _digest({k: result[k] for k in ("windows", "rows", "overall", "by_position")})

        return _outcome(*_cli(argv), numbers)
    if name == "inspect":
        code, stdout, stderr = _cli(["cache", "inspect", str(cache), "--json"])
        return _outcome(code, stdout, stderr, lambda: _digest(json.loads(stdout)))
    if name == "info":
        code, stdout, stderr = _cli(["cache", "info", str(cache), "--json"])
        return _outcome(code, stdout, stderr, lambda: _digest(json.loads(stdout)))
    if name == "verify":
        code, stdout, stderr = _cli(["cache", "verify", str(cache)])
        if code == 1:  # verify's own verdict: one line naming the problem
            lines = [line for line in stderr.splitlines() if line.strip()]
            ok = len(lines) == 1 and lines[0].startswith("longkd: verify failed:")
            return ("error", lines[0][:300]) if ok else ("multiline", stderr[-600:])
        return _outcome(code, stdout, stderr, lambda: stdout.strip())
    raise ValueError(f"unknown consumer {name!r}")


# ----------------------------------------------------------------------------- worker and parent


def _worker(work: Path, cases_file: Path, results_file: Path, start: int) -> None:
    """Run the cases from index ``start`` on, appending one JSON line per (case, consumer)."""
    import torch

    torch.set_num_threads(1)
    world = build_world(work)
    cases = [json.loads(line) for line in cases_file.read_text().splitlines()]
    scratch = work / "scratch"
    consumers = sorted({c for case in cases for c in case["consumers"]}, key=MANIFEST_CONSUMERS.index)
    baseline = {}
    pristine = make_case(world, {"kind": "none"}, scratch / "cache")  # the path every case uses
    for name in consumers:
        status, detail = run_consumer(name, pristine, world, scratch)
        if status != "ok":
            raise RuntimeError(f"{name} fails on the undamaged cache: {detail}")
        baseline[name] = detail
    with results_file.open("a") as log:
        for i in range(start, len(cases)):
            case = cases[i]
            cache = make_case(world, case, scratch / "cache")
            for name in case["consumers"]:
                log.write(json.dumps({"case": i, "consumer": name, "status": "started"}) + "\n")
                log.flush()
                try:
                    status, detail = run_consumer(name, cache, world, scratch)
                except BaseException as err:  # noqa: BLE001 (what the audit is looking for)
                    status, detail = "traceback", f"{type(err).__name__}: {err}"[:600]
                if status == "ok":
                    status, detail = ("same", "") if detail == baseline[name] else ("changed", detail)
                log.write(
                    json.dumps({"case": i, "consumer": name, "status": status, "detail": detail}) + "\n"
                )
                log.flush()


def run_audit(cases: list[dict], work: Path, timeout: float = 3600) -> list[dict]:
    """Run every case through its consumers in worker processes; one record per (case, consumer).

    A worker that dies (abort, signal) leaves its last started (case, consumer) without a
    result: that one is recorded as ``abort`` with the exit status, and a new worker goes on
    with the next case.

    Returns:
        ``{"case", "name", "kind", "consumer", "status", "detail"}`` dicts, in case order.
    """
    import longkd

    work.mkdir(parents=True, exist_ok=True)
    build_world(work)  # once, in this process, so a worker never races to build it
    cases_file, results_file = work / "cases.jsonl", work / "results.jsonl"
    cases_file.write_text("".join(json.dumps(c) + "\n" for c in cases))
    results_file.write_text("")
    root = str(Path(longkd.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    start = 0
    while start < len(cases):
        proc = subprocess.run(
            [sys.executable, "-m", "longkd.tools.audit_cache", "_worker", str(work), str(start)],
            env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        records = [json.loads(line) for line in results_file.read_text().splitlines()]
        if proc.returncode == 0:
            break
        pending = [r for r in records if r["status"] == "started"]
        done = {(r["case"], r["consumer"]) for r in records if r["status"] != "started"}
        open_runs = [r for r in pending if (r["case"], r["consumer"]) not in done]
        if not open_runs:
            raise RuntimeError(
                f"audit worker failed outside a case (exit {proc.returncode}): {proc.stderr[-2000:]}"
            )
        last = open_runs[-1]
        with results_file.open("a") as log:
            detail = f"exit status {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
            log.write(json.dumps({**last, "status": "abort", "detail": detail[:600]}) + "\n")
        start = last["case"] + 1
    out = []
    for r in (json.loads(line) for line in results_file.read_text().splitlines()):
        if r["status"] != "started":
            case = cases[r["case"]]
            out.append({**r, "name": case["name"], "kind": case["kind"]})
    return out


def summarise(records: list[dict]) -> dict:
    """Counts of each outcome by case kind and consumer, and the records that are not allowed
    (a crash of any kind, or a flip read back as a changed result)."""
    table: dict = {}
    for r in records:
        table.setdefault(r["kind"], {}).setdefault(r["consumer"], Counter())[r["status"]] += 1
    bad = [r for r in records if r["status"] in CRASHES or (r["kind"] == "flip" and r["status"] == "changed")]
    return {"counts": {k: {c: dict(v) for c, v in t.items()} for k, t in table.items()}, "bad": bad}


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["_worker"]:
        work = Path(argv[1])
        _worker(work, work / "cases.jsonl", work / "results.jsonl", int(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flips", type=int, default=150, help="random single-bit flips in the shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the flip positions")
    parser.add_argument("--consumers", default=",".join(CONSUMERS), help="consumers of the flipped caches")
    parser.add_argument("--no-manifests", action="store_true", help="leave out the hostile manifests")
    parser.add_argument("--workdir", help="keep the cache and the results here")
    parser.add_argument("--json", metavar="FILE", help="write every record as JSON")
    args = parser.parse_args(argv)
    consumers = args.consumers.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        world = build_world(work)
        cases = [
            {**c, "consumers": consumers}
            for c in flip_cases((world["cache"] / world["shard"]).stat().st_size, args.flips, args.seed)
        ]
        if not args.no_manifests:
            cases += [{**c, "consumers": list(MANIFEST_CONSUMERS)} for c in manifest_cases(world["cache"])]
        records = run_audit(cases, work)
    summary = summarise(records)
    if args.json:
        Path(args.json).write_text(json.dumps({"records": records, **summary}, indent=1) + "\n")
    flips = sum(c["kind"] == "flip" for c in cases)
    print(
        f"# cache read audit: {flips} flips (seed {args.seed}), {len(cases) - flips} hostile manifests/links"
    )
    for kind, by_consumer in summary["counts"].items():
        for consumer, counts in by_consumer.items():
            print(f"{kind:9s} {consumer:8s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    manifests = [r for r in records if r["kind"] != "flip"]
    accepted = sorted({r["name"] for r in manifests if r["status"] in ("same", "changed")})
    if accepted:
        print(f"accepted by some consumer (values valid for their keys): {len(accepted)}: {accepted}")
    for r in summary["bad"]:
        print(f"NOT ALLOWED: {r['kind']} {r['name']!r} {r['consumer']}: {r['status']} {r['detail'][:200]}")
    return 1 if summary["bad"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
