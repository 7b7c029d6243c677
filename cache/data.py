"""Read a dataset and yield its samples as token ids, for the packer.

The cache producer takes data from wherever users keep it: local files or globs (.jsonl,
.json, .parquet, .txt, .csv, .arrow, optionally compressed), a directory written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a directory of data files, or a
hub dataset name. Everything goes through the ``datasets`` library so that formats,
memory-mapping and streaming (data larger than memory) behave as users expect. Text is
tokenized here, in batches, with the teacher's tokenizer and no special tokens (the packer
adds the EOS separators); a pre-tokenized column is read as is.

Sample order is decided here and nowhere else: ``shuffle`` permutes it with ``seed``
(a full permutation, or a seeded buffer shuffle when streaming), so packing stays a pure
function of the sample sequence.

    source = load_samples("data/*.jsonl", tokenizer=tok, text_field="text", shuffle=True, seed=1)
    for ids in source:       # list[int] per sample; iterating again gives the same order
        ...
    source.describe()        # the manifest's `dataset` block (without the fingerprint)
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from longkd.errors import LongkdError, one_line

# Builder of `datasets.load_dataset` per file extension (compressed variants are read by
# datasets transparently, so the extension below the compression suffix decides).
BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".csv": "csv",
    ".arrow": "arrow",
}
FORMATS = tuple(sorted(set(BUILDERS.values())))
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")
_GLOB_CHARS = "*?["
# Rows tokenized per tokenizer call: large enough for the fast tokenizer's batching to pay.
TOKENIZE_BATCH = 1000
# Rows held by a streaming shuffle buffer (datasets' IterableDataset.shuffle).
SHUFFLE_BUFFER = 10_000


class SampleSource:
    """A re-iterable sequence of samples as token ids.

    Built by :func:`load_samples`. Every iteration starts from the beginning and yields the
    same samples in the same order.

    Attributes:
        dataset: the underlying ``datasets.Dataset`` or ``datasets.IterableDataset``
            (already shuffled when asked).
        num_samples: number of rows when known (not streaming), else None.
    """

    def __init__(
        self,
        dataset,
        *,
        source: str,
        fmt: str,
        split: str | None,
        tokenizer,
        text_field: str | None,
        input_ids_field: str | None,
        streaming: bool,
        shuffle: bool,
        seed: int,
    ):
        self.dataset = dataset
        self.source = source
        self.format = fmt
        self.split = split
        self.tokenizer = tokenizer
        self.text_field = text_field
        self.input_ids_field = input_ids_field
        self.streaming = streaming
        self.shuffle = shuffle
        self.seed = seed
        self.num_samples = None if streaming else len(dataset)

    @property
    def field(self) -> str:
        """The column samples come from."""
        return self.input_ids_field if self.input_ids_field is not None else self.text_field

    def __iter__(self) -> Iterator[list[int]]:
        """Yield each sample's token ids (no BOS/EOS added).

        Raises:
            LongkdError: the field is missing, a text is not a string, an input_ids row is
                not a sequence of non-negative integers, or a streamed dataset is empty.
        """
        rows = 0
        batches = iter(self.dataset.iter(batch_size=TOKENIZE_BATCH))
        while (batch := self._next_batch(batches, rows)) is not None:
            if self.field not in batch:
                raise LongkdError(_missing_field(self.source, self.field, list(batch)))
            values = batch[self.field]
            if self.input_ids_field is not None:
                for offset, row in enumerate(values):
                    yield _check_ids(row, self.source, self.field, rows + offset)
            else:
                yield from self._tokenize(values, rows)
            rows += len(values)
        if rows == 0:
            raise LongkdError(f"dataset {self.source} is empty: it yielded no rows; check the path and split")

    def _next_batch(self, batches: Iterator[dict], first: int) -> dict | None:
        """The next batch of rows (None at the end); a text that is not UTF-8 (found while
        streaming) becomes one line naming the rows."""
        try:
            return next(batches)
        except StopIteration:
            return None
        except UnicodeDecodeError as err:
            raise LongkdError(
                f"{self.source}: a text in rows {first}..{first + TOKENIZE_BATCH - 1} is not valid UTF-8 "
                f"(byte {err.object[err.start : err.start + 1]!r}); re-encode the data as UTF-8 "
                "(e.g. iconv -f latin1 -t utf-8)"
            ) from err

    def _tokenize(self, texts: list, first_row: int) -> list[list[int]]:
        for offset, text in enumerate(texts):
            if text is None:
                texts[offset] = ""  # a missing text is an empty sample (the packer counts it)
            elif not isinstance(text, str):
                raise LongkdError(
                    f"{self.source}: row {first_row + offset} of text field '{self.field}' is "
                    f"{type(text).__name__}, not text; pick a string column with text_field "
                    "or pass input_ids_field for token ids"
                )
        # verbose=False: long documents exceeding model_max_length are expected here (they are
        # packed or split later), so the tokenizer's length warning would only be noise.
        encoded = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
        return encoded["input_ids"]

    def describe(self) -> dict:
        """The manifest's ``dataset`` block, without the fingerprint.

        Returns:
            ``source``, ``format``, ``split``, ``text_field`` or ``input_ids_field``,
            ``streaming``, ``shuffle``, ``seed`` and ``samples`` (None when streaming).
        """
        out = {"source": self.source, "format": self.format, "split": self.split}
        if self.input_ids_field is not None:
            out["input_ids_field"] = self.input_ids_field
        else:
            out["text_field"] = self.text_field
        out.update(streaming=self.streaming, shuffle=self.shuffle, seed=self.seed, samples=self.num_samples)
        return out


def load_samples(
    data: str | os.PathLike,
    *,
    tokenizer=None,
    text_field: str = "text",
    input_ids_field: str | None = None,
    split: str = "train",
    streaming: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    data_files_format: str | None = None,
) -> SampleSource:
    """Open a dataset as a source of token-id samples.

    Args:
        data: a local file, a glob of files, a directory saved with ``save_to_disk``, a
            directory of data files, or a hub dataset name (needs network access).
        tokenizer: a transformers tokenizer; needed for ``text_field``.
        text_field: the text column, tokenized with ``add_special_tokens=False``.
        input_ids_field: a column of token-id lists to read instead of text (no tokenizer).
        split: the split to read; a dataset with a single split uses it whatever its name.
        streaming: read through a ``datasets.IterableDataset`` (memory stays flat).
        shuffle: shuffle the sample order with ``seed`` (a seeded buffer of
            ``SHUFFLE_BUFFER`` rows when streaming).
        seed: the shuffle seed.
        data_files_format: the ``datasets`` builder for local files (json, parquet, text,
            csv, arrow) when the extension does not tell it.

    Returns:
        A :class:`SampleSource`.

    Raises:
        LongkdError: a missing path, an unknown file type, an unreadable dataset, a missing
            split or column, an empty dataset, a text field without a tokenizer.
    """
    import datasets

    source = os.fspath(data)
    if not source:
        raise LongkdError("no dataset given: pass a file, glob, saved dataset directory or hub name")
    if input_ids_field is None and tokenizer is None:
        raise LongkdError(
            f"a tokenizer is needed to tokenize text field '{text_field}' of {source}; "
            "pass tokenizer= or name a pre-tokenized column with input_ids_field"
        )
    if data_files_format is not None and data_files_format not in FORMATS:
        raise LongkdError(f"data_files_format must be one of {', '.join(FORMATS)}; got {data_files_format!r}")
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool):
        raise LongkdError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)

    fmt, loaded = _open(datasets, source, streaming, data_files_format)
    dataset, split_used = _pick_split(datasets, loaded, split, source)
    if streaming and isinstance(dataset, datasets.Dataset):
        dataset = dataset.to_iterable_dataset()

    field = input_ids_field if input_ids_field is not None else text_field
    columns = dataset.column_names  # None for some streamed sources: checked while iterating
    if columns is not None and field not in columns:
        raise LongkdError(_missing_field(source, field, columns))
    if not streaming and len(dataset) == 0:
        raise LongkdError(f"dataset {source} (split {split_used}) is empty; check the path and split")
    if not streaming and input_ids_field is None:
        _check_utf8(dataset, text_field, source)
    if shuffle:
        if streaming:
            dataset = dataset.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
        else:
            # keep_in_memory: the permutation must not be written as a cache file next to the
            # user's data (a save_to_disk directory would gain stray files).
            dataset = dataset.shuffle(seed=seed, keep_in_memory=True)
    return SampleSource(
        dataset,
        source=source,
        fmt=fmt,
        split=split_used,
        tokenizer=tokenizer,
        text_field=None if input_ids_field is not None else text_field,
        input_ids_field=input_ids_field,
        streaming=streaming,
        shuffle=shuffle,
        seed=seed,
    )


def _open(datasets, source: str, streaming: bool, data_files_format: str | None):
    """Load ``source``; returns (format name, Dataset | DatasetDict | Iterable*)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            try:
                return "load_from_disk", datasets.load_from_disk(str(path))
            except Exception as e:  # a damaged save_to_disk directory, or an empty one
                if _saved_without_data(path):
                    raise LongkdError(f"dataset {source} is empty: the saved dataset holds no rows") from e
                raise LongkdError(f"could not load the saved dataset {source}: {one_line(e)}") from e
        # Hidden files (.DS_Store, editor swap files, datasets' own lock files) are never data.
        files = sorted(
            str(p)
            for p in path.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and (data_files_format or _builder_of(str(p)))
        )
        if not files:
            raise LongkdError(
                f"{source} is a directory but neither a saved dataset (save_to_disk) nor holds data files "
                f"({', '.join(BUILDERS)}); point --data at a file, glob or saved dataset"
            )
        return _load_files(datasets, source, files, streaming, data_files_format)
    if "://" in source:  # remote files (s3://, gs://, https://...): datasets opens them via fsspec
        return _load_files(datasets, source, [source], streaming, data_files_format, check=False)
    if any(c in source for c in _GLOB_CHARS):
        files = sorted(f for f in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(f))
        if not files:
            raise LongkdError(f"no file matches the pattern {source}; check the path and the pattern")
        return _load_files(datasets, source, files, streaming, data_files_format)
    if path.is_file():
        return _load_files(datasets, source, [str(path)], streaming, data_files_format)
    if _looks_local(source):
        raise LongkdError(f"dataset path {source} does not exist; check the path")
    try:
        return "hub", datasets.load_dataset(source, streaming=streaming)
    except Exception as e:
        raise LongkdError(
            f"could not load {source} as a hub dataset ({one_line(e)}); if it is a local path, it "
            "does not exist; hub datasets need network access"
        ) from e


def _load_files(datasets, source, files, streaming, data_files_format, check=True):
    builders = {data_files_format or _builder_of(f) for f in files}
    if None in builders:
        unknown = next(f for f in files if _builder_of(f) is None)
        raise LongkdError(
            f"cannot tell the format of {unknown} from its extension (known: {', '.join(BUILDERS)}); "
            f"pass data_files_format (one of {', '.join(FORMATS)})"
        )
    if len(builders) > 1:
        raise LongkdError(
            f"{source} mixes file formats ({', '.join(sorted(builders))}); point it at files of one format"
        )
    builder = builders.pop()
    # datasets fails on empty files with unhelpful errors (StopIteration, "corresponds to no
    # data"); name the real problem instead.
    empty = f"dataset {source} is empty: its files hold no rows; check the path"
    if check and all(os.path.getsize(f) == 0 for f in files):
        raise LongkdError(empty)
    try:
        return builder, datasets.load_dataset(builder, data_files=files, streaming=streaming)
    except Exception as e:
        if "corresponds to no data" in str(e):
            raise LongkdError(empty) from e
        raise LongkdError(f"could not read {source} as {builder} files: {one_line(e)}") from e


def _pick_split(datasets, loaded, split: str, source: str):
    """The requested split of a dict of splits; a lone split is used whatever its name."""
    if isinstance(loaded, datasets.DatasetDict | datasets.IterableDatasetDict):
        names = list(loaded)
        if split in loaded:
            return loaded[split], split
        if len(names) == 1:
            return loaded[names[0]], names[0]
        raise LongkdError(f"{source} has no split '{split}'; available splits: {', '.join(names)}")
    name = getattr(loaded, "split", None)
    return loaded, (str(name) if name is not None else None)


def _saved_without_data(path: Path) -> bool:
    """True when a save_to_disk directory (or a split of it) lists no data files.

    datasets writes zero shards for an empty dataset and then fails to load it with an
    IndexError; this tells that case apart from a damaged directory.
    """
    states = [path / "state.json", *path.glob("*/state.json")]
    try:
        return any(not json.loads(p.read_text()).get("_data_files") for p in states if p.is_file())
    except (OSError, ValueError):
        return False


def _builder_of(name: str) -> str | None:
    lower = name.lower()
    for suffix in _COMPRESSION:
        if lower.endswith(suffix):
            lower = lower[: -len(suffix)]
            break
    return BUILDERS.get(os.path.splitext(lower)[1])


def _looks_local(source: str) -> bool:
    """A string that can only mean a local path (a hub name is 'name' or 'owner/name')."""
    return (
        source.startswith(("/", ".", "~"))
        or source.strip("/").count("/") > 1
        or "\\" in source
        or _builder_of(source) is not None
    )


def _check_utf8(dataset, field: str, source: str) -> None:
    """Refuse a text column holding bytes that are not UTF-8, before anything is built from it.

    The json and csv readers keep such bytes as they are; they would fail only when a row is
    turned into Python text, after the build had started. One pass of Arrow's own validation.

    Raises:
        LongkdError: naming the first bad row and the fix.
    """
    import pyarrow as pa

    table = getattr(getattr(dataset, "data", None), "table", None)
    if table is None or field not in table.column_names:
        return
    column = table.column(field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return
    offset = 0
    for chunk in column.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid as err:
            found = re.search(r"string index (\d+)", str(err))
            last = offset + len(chunk) - 1
            where = f"row {offset + int(found.group(1))}" if found else f"a row in {offset}..{last}"
            raise LongkdError(
                f"{source}: {where} of text field '{field}' is not valid UTF-8; re-encode the data as UTF-8 "
                "(e.g. iconv -f latin1 -t utf-8)"
            ) from err
        offset += len(chunk)


def _check_ids(row, source: str, field: str, index: int) -> list[int]:
    """A row of token ids as list[int]; LongkdError for anything else."""
    arr = np.asarray(row) if row is not None else np.empty(0, dtype=np.int64)
    if arr.size and (arr.ndim != 1 or arr.dtype.kind not in "iu"):
        raise LongkdError(
            f"{source}: row {index} of input_ids field '{field}' is not a list of integer token ids "
            f"(dtype {arr.dtype}, shape {arr.shape}); point input_ids_field at a column of int lists"
        )
    if arr.size and arr.min() < 0:
        raise LongkdError(f"{source}: row {index} of input_ids field '{field}' holds a negative token id")
    return row if isinstance(row, list) else arr.tolist()


def _missing_field(source: str, field: str, columns) -> str:
    return (
        f"{source} has no column '{field}'; available columns: {', '.join(map(str, columns)) or '(none)'}; "
        "pick one with text_field / input_ids_field"
    )
