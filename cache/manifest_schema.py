"""The one schema of ``manifest.json`` and ``build.json``, written as data, and its checker.

A cache arrives from elsewhere (copied, shared, downloaded), so its JSON files are read as
untrusted input: every value a reader uses is checked for type and range before use, and
every value at all (also keys longkd does not know, kept for forward compatibility) for
nesting depth, string length and NUL bytes. A wrong value is one :class:`LongkdError` naming
the file, the key path and what was expected, never a traceback or a huge allocation later.

The schema is the module-level data :data:`MANIFEST` and :data:`BUILD_RECORD` (built from
the small spec types below) plus :func:`check_manifest_rules`, the rules that relate several
fields (a selection's size key, claimed sizes, totals); docs/format.md lists the limits.
What needs the filesystem (the shards' real sizes, symbolic links) is cache/manifest.py's.

    from longkd.cache.manifest_schema import MANIFEST, check_document, parse_json
    manifest = parse_json(text, "runs/cache/manifest.json")
    check_document(manifest, MANIFEST, "runs/cache/manifest.json")
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from longkd.cache import format as fmt
from longkd.errors import LongkdError

MAX_DEPTH = 32  # nesting of objects and lists, the document itself being depth 1
MAX_STRING = 4096  # characters of any string (key or value)
MAX_PATH = 1024  # characters of a shard path; each path component at most MAX_NAME
MAX_NAME = 255
MAX_ITEMS = 2**20  # entries of any list or object
MAX_MANIFEST_BYTES = 256 * 2**20
MAX_BUILD_RECORD_BYTES = 2**20
# A shard claims at most one row per MIN_ROW_BYTES of its real size: longkd's shards take
# about 2 kB per row at the smallest window, so a claimed row count beyond that is a lie that
# would only make a reader allocate for rows that are not there.
MIN_ROW_BYTES = 64
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
UINT16_MAX = 2**16 - 1
CORRUPT = "the file is corrupt or was edited; rebuild the cache"
_HEX = "0123456789abcdef"


# ----------------------------------------------------------------------------- spec types


@dataclass(frozen=True)
class Int:
    """An integer (never a bool) in ``[low, high]``; None allowed when ``null``."""

    low: int = 0
    high: int = INT64_MAX
    null: bool = False

    def expected(self) -> str:
        high = "2^63-1" if self.high == INT64_MAX else "2^31-1" if self.high == INT32_MAX else self.high
        return f"an integer in [{self.low}, {high}]" + (" or null" if self.null else "")


@dataclass(frozen=True)
class Number:
    """A finite number (int or float, never a bool) above ``above`` (exclusive) and at most
    ``high`` (below it when ``high_open``); None when ``null``."""

    above: float = -math.inf
    high: float = math.inf
    high_open: bool = False
    null: bool = False

    def expected(self) -> str:
        bound = "" if self.above == -math.inf else f" above {self.above:g}"
        if self.high != math.inf:
            bound += f"{' and' if bound else ''} {'below' if self.high_open else 'at most'} {self.high:g}"
        return f"a finite number{bound}" + (" or null" if self.null else "")

    def accepts(self, value: float) -> bool:
        return value > self.above and (value < self.high if self.high_open else value <= self.high)


@dataclass(frozen=True)
class Str:
    """A string of at most ``max_len`` characters; one of ``choices``, or exactly ``hex_digits``
    lowercase hex digits, when given."""

    max_len: int = MAX_STRING
    choices: tuple[str, ...] | None = None
    hex_digits: int | None = None
    null: bool = False

    def expected(self) -> str:
        if self.choices:
            what = f"one of {', '.join(map(repr, self.choices))}"
        elif self.hex_digits:
            what = f"{self.hex_digits} lowercase hex digits"
        else:
            what = "a string"
        return what + (" or null" if self.null else "")

    def accepts(self, text: str) -> bool:
        if self.choices is not None and text not in self.choices:
            return False
        return self.hex_digits is None or (len(text) == self.hex_digits and not text.strip(_HEX))


@dataclass(frozen=True)
class Bool:
    """true or false (None when ``null``)."""

    null: bool = False

    def expected(self) -> str:
        return "true or false" + (" or null" if self.null else "")


@dataclass(frozen=True)
class Obj:
    """An object whose known ``keys`` have their specs; ``required`` keys must be present.

    Keys not listed are allowed (a newer producer may add some) and get the generic limits.
    """

    keys: dict = field(default_factory=dict)
    required: tuple[str, ...] = ()
    null: bool = False

    def expected(self) -> str:
        return "an object" + (" or null" if self.null else "")


@dataclass(frozen=True)
class List:
    """A list whose entries all match ``item``."""

    item: object

    def expected(self) -> str:
        return "a list"


@dataclass(frozen=True)
class Anything:
    """Any JSON value within the generic limits (depth, string length, NUL bytes, items)."""

    def expected(self) -> str:
        return "any JSON value"


# ----------------------------------------------------------------------------- the schema

COUNT = Int()
OPTIONAL_COUNT = Int(null=True)
HASH = Str(max_len=128)

SHARD = Obj(
    keys={
        "path": Str(max_len=MAX_PATH),
        "rows": Int(low=1),
        "tokens": COUNT,
        "bytes": Int(low=1),
        "sha256": Str(hex_digits=64),
        "first_window": COUNT,
        "last_window": COUNT,
        "stride": Int(low=1, high=INT32_MAX),
    },
    required=("path", "rows", "tokens", "bytes", "sha256", "first_window"),
)

MANIFEST = Obj(
    keys={
        "format_version": Int(low=0),
        "producer": Obj({"name": Str(), "version": Str()}),
        "created": Str(max_len=64),
        "teacher": Obj(
            {
                "name_or_path": Str(null=True),
                "model_type": Str(null=True),
                "config_sha256": Str(max_len=128, null=True),
                "weights_sha256": Str(max_len=128, null=True),
                "revision": Str(null=True),
                "max_position_embeddings": Int(null=True),
                "dtype": Str(null=True),
                "rope_parameters": Anything(),
            }
        ),
        "tokenizer": Obj(
            {
                "fingerprint": HASH,
                "size": Int(low=1, high=INT32_MAX, null=True),
                "bos_token_id": Int(high=INT32_MAX, null=True),
                "eos_token_id": Int(high=INT32_MAX, null=True),
                "pad_token_id": Int(high=INT32_MAX, null=True),
            },
            required=("fingerprint",),
        ),
        "vocab": Obj(
            {"tokenizer_size": Int(low=1, high=INT32_MAX), "embedding_size": Int(low=1, high=INT32_MAX)},
            required=("tokenizer_size", "embedding_size"),
        ),
        "window": Int(low=1, high=INT32_MAX - 1),
        "packing": Obj(
            {
                "policy": Str(max_len=64),
                "max_sample_tokens": Int(low=1, null=True),
                "overflow": Str(choices=("split", "truncate")),
                "position_mode": Str(choices=("continuous", "reset")),
                "add_eos": Bool(),
                "shuffle": Bool(),
                "seed": Int(low=-INT64_MAX),
                "tail": Str(choices=("drop", "pad")),
                "pad_id": Int(high=INT32_MAX, null=True),
                "stats": Obj(),
            }
        ),
        "selection": Obj(
            {
                "mode": Str(choices=fmt.SELECTION_MODES),
                "k": Int(low=1, high=INT32_MAX),
                "draws": Int(low=1, high=UINT16_MAX),
                "min_mass": Number(above=0.0, high=1.0, null=True),
                "min_prob": Number(above=0.0, high=1.0, high_open=True, null=True),
            },
            required=("mode",),
        ),
        "temperature": Number(above=0.0),
        "encoding": Obj(
            {
                "ids": Str(choices=("int32",)),
                "logprobs": Str(choices=fmt.LOGPROB_DTYPES),
                "compression": Str(choices=(fmt.COMPRESSION,)),
                "compression_level": Int(low=-(2**31), high=INT32_MAX, null=True),
                # format 3: list column -> encoding (checked in check_manifest_rules)
                "columns": Obj(
                    {
                        name: Str(choices=tuple(fmt.COLUMN_ENCODINGS))
                        for name in fmt.COLUMN_ENCODINGS[fmt.PLAIN]
                    }
                ),
            }
        ),
        "dataset": Obj({"source": Anything(), "fingerprint": HASH, "samples": OPTIONAL_COUNT}),
        "shards": List(SHARD),
        "totals": Obj(
            {"windows": COUNT, "tokens": COUNT, "bytes": COUNT}, required=("windows", "tokens", "bytes")
        ),
    },
    required=(
        "format_version",
        "producer",
        "created",
        "teacher",
        "tokenizer",
        "vocab",
        "window",
        "packing",
        "selection",
        "temperature",
        "encoding",
        "dataset",
        "shards",
        "totals",
    ),  # fmt: skip
)

BUILD_RECORD = Obj(
    keys={
        "format_version": Int(low=0),
        "settings": Obj(),
        "teacher": Obj(),
        "tokenizer_fingerprint": Str(max_len=128, null=True),
    },
    required=("format_version", "settings"),
)


# ----------------------------------------------------------------------------- checking


def parse_json(text: str | bytes, where: str):
    """Parse a JSON document, refusing what Python's parser would let through or choke on.

    Args:
        text: the file's content (bytes are decoded as UTF-8).
        where: the file, for messages.

    Returns:
        The parsed value.

    Raises:
        LongkdError: not UTF-8, not JSON, ``NaN`` / ``Infinity`` literals, or nesting so deep
            that the parser runs out of stack.
    """

    def refuse(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, parse_constant=refuse)
    except RecursionError:
        raise LongkdError(f"{where} nests deeper than {MAX_DEPTH} levels; {CORRUPT}") from None
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError included
        message = " ".join(str(err).split())[:200]
        raise LongkdError(f"{where} is not valid JSON ({message}); {CORRUPT}") from None


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(where: str, path: str, value, expected: str) -> LongkdError:
    return LongkdError(f"{where}: {path or 'the document'} is {_show(value)}, expected {expected}; {CORRUPT}")


def _check_string(text: str, where: str, path: str, max_len: int) -> None:
    if len(text) > max_len:
        raise LongkdError(f"{where}: {path or 'a key'} is a string of {len(text)} characters, over the "
                          f"limit of {max_len}; {CORRUPT}")  # fmt: skip
    if "\x00" in text:
        raise LongkdError(f"{where}: {path or 'a key'} holds a NUL character; {CORRUPT}")


def _generic(value, where: str, path: str, depth: int) -> None:
    """The limits every value obeys, whatever its spec (iterative over nesting)."""
    stack = [(value, path, depth)]
    while stack:
        item, at, level = stack.pop()
        if isinstance(item, str):
            _check_string(item, where, at, MAX_STRING)
        elif isinstance(item, float) and not math.isfinite(item):
            raise _fail(where, at, item, "a finite number")
        elif isinstance(item, (dict, list)):
            if level > MAX_DEPTH:
                raise LongkdError(f"{where}: {at} nests deeper than {MAX_DEPTH} levels; {CORRUPT}")
            if len(item) > MAX_ITEMS:
                raise LongkdError(f"{where}: {at} has {len(item)} entries, over {MAX_ITEMS}; {CORRUPT}")
            if isinstance(item, dict):
                for key, sub in item.items():
                    _check_string(key, where, at, MAX_STRING)
                    stack.append((sub, f"{at}.{key}" if at else key, level + 1))
            else:
                stack.extend((sub, f"{at}[{i}]", level + 1) for i, sub in enumerate(item))


def check_document(value, spec, where: str) -> None:
    """Check a parsed document against ``spec`` and the generic limits.

    Args:
        value: parsed JSON.
        spec: one of the spec types of this module (e.g. :data:`MANIFEST`).
        where: the file, for messages.

    Raises:
        LongkdError: naming the file, the key path, the value and what was expected.
    """
    _generic(value, where, "", 1)
    _check(value, spec, where, "")


def _check(value, spec, where: str, path: str) -> None:
    """``value`` at key path ``path`` against ``spec`` (the generic limits already held)."""
    if value is None and getattr(spec, "null", False):
        return
    if isinstance(spec, Anything):
        return
    if isinstance(spec, Int):
        if isinstance(value, bool) or not isinstance(value, int) or not spec.low <= value <= spec.high:
            raise _fail(where, path, value, spec.expected())
    elif isinstance(spec, Number):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not spec.accepts(value):
            raise _fail(where, path, value, spec.expected())
    elif isinstance(spec, Str):
        if not isinstance(value, str):
            raise _fail(where, path, value, spec.expected())
        _check_string(value, where, path, spec.max_len)
        if not spec.accepts(value):
            raise _fail(where, path, value, spec.expected())
    elif isinstance(spec, Bool):
        if not isinstance(value, bool):
            raise _fail(where, path, value, spec.expected())
    elif isinstance(spec, List):
        if not isinstance(value, list):
            raise _fail(where, path, value, spec.expected())
        for i, item in enumerate(value):
            _check(item, spec.item, where, f"{path}[{i}]")
    elif isinstance(spec, Obj):
        if not isinstance(value, dict):
            raise _fail(where, path, value, spec.expected())
        missing = [key for key in spec.required if key not in value]
        if missing:
            raise LongkdError(f"{where}: {path or 'the document'} lacks {', '.join(missing)}; {CORRUPT}")
        for key, sub in spec.keys.items():
            if key in value:
                _check(value[key], sub, where, f"{path}.{key}" if path else key)
    else:  # pragma: no cover - a spec type this checker does not know is a bug here
        raise TypeError(f"unknown spec {spec!r}")


def check_format_version(version, where: str) -> None:
    """Refuse a format version this longkd cannot read, saying what to do.

    Raises:
        LongkdError: not an integer, from a newer longkd, or unknown.
    """
    if version in fmt.READABLE_VERSIONS and not isinstance(version, bool):
        return
    newest = max(fmt.READABLE_VERSIONS)
    if isinstance(version, int) and not isinstance(version, bool) and version > newest:
        hint = "written by a newer longkd; upgrade longkd"
    else:
        hint = "not a longkd cache manifest"
    readable = " and ".join(map(str, fmt.READABLE_VERSIONS))
    raise LongkdError(f"{where} has format_version {_show(version)} (this longkd reads {readable}): {hint}")


def check_manifest_rules(manifest: dict, where: str) -> None:
    """The rules between fields of a manifest that already passed :data:`MANIFEST`.

    The selection carries its mode's size key (k at most the vocabulary, draws within the
    uint16 counts), an adaptive one at least one of ``min_mass`` and ``min_prob``;
    ``encoding.columns`` names columns of the mode and encodings that apply to them, plain
    only before format 3; a window's W*K entries fit Arrow's 32-bit list offsets; every
    shard's claims are consistent (``last_window``, at most one row per :data:`MIN_ROW_BYTES` bytes,
    at most W tokens per row) and share one stride; ``totals`` are the sums over the shards.

    Raises:
        LongkdError: naming the first broken rule.
    """
    selection, window = manifest["selection"], manifest["window"]
    size_key = fmt.SELECTIONS[selection["mode"]].size_key
    size = selection.get(size_key)
    if size is None:
        raise LongkdError(f"{where}: selection lacks {size_key} for mode {selection['mode']!r}; {CORRUPT}")
    rules = (selection.get("min_mass"), selection.get("min_prob"))
    if selection["mode"] == "adaptive" and rules == (None, None):
        raise LongkdError(f"{where}: adaptive selection has neither min_mass nor min_prob; {CORRUPT}")
    vocab = manifest["vocab"]["embedding_size"]
    if size_key == "k" and (size > vocab or window * size > INT32_MAX):
        raise LongkdError(
            f"{where}: selection.k {size} with window {window} and vocabulary {vocab} is impossible "
            f"(k at most the vocabulary, window x k below 2^31); {CORRUPT}"
        )
    columns = manifest["encoding"].get("columns")
    if columns is not None:
        named = fmt.column_encodings(selection["mode"], columns, where=f"{where}: encoding.columns")
        if manifest["format_version"] < 3 and set(named.values()) != {fmt.PLAIN}:
            found = manifest["format_version"]
            raise LongkdError(
                f"{where}: encodings other than plain need format_version 3, found {found}; {CORRUPT}"
            )
        if (
            named.get(fmt.LOGPROBS) in fmt.GRID_ENCODINGS
            and manifest["encoding"].get("logprobs", "float32") != "float32"
        ):
            raise LongkdError(
                f"{where}: encoding.logprobs must be float32 with {named[fmt.LOGPROBS]} log-probs; {CORRUPT}"
            )
    strides = set()
    for i, shard in enumerate(manifest["shards"]):
        at = f"shards[{i}]"
        stride = shard.get("stride", 1)
        strides.add(stride)
        rows = shard["rows"]
        last = shard["first_window"] + stride * (rows - 1)
        if shard.get("last_window", last) != last:
            raise LongkdError(
                f"{where}: {at}.last_window is {shard['last_window']}, but first_window "
                f"{shard['first_window']} + stride {stride} x (rows {rows} - 1) is {last}; {CORRUPT}"
            )
        if rows > shard["bytes"] // MIN_ROW_BYTES:
            raise LongkdError(
                f"{where}: {at} claims {rows} rows in {shard['bytes']} bytes (at most one row per "
                f"{MIN_ROW_BYTES} bytes is possible); {CORRUPT}"
            )
        if shard["tokens"] > rows * window:
            raise LongkdError(
                f"{where}: {at} claims {shard['tokens']} tokens in {rows} windows of {window}; {CORRUPT}"
            )
    if len(strides) > 1:
        raise LongkdError(f"{where}: shards mix strides {sorted(strides)}; {CORRUPT}")
    totals = manifest["totals"]
    for key, name in (("windows", "rows"), ("tokens", "tokens"), ("bytes", "bytes")):
        total = sum(shard[name] for shard in manifest["shards"])
        if totals[key] != total:
            raise LongkdError(f"{where}: totals.{key} is {totals[key]}, the shards sum to {total}; {CORRUPT}")
