"""Compact encodings of a window's cache columns: bit-packed integers and log-probs on a grid.

A plain top-64 cache stores every entry as an int32 id and a float32 log-prob, 8 bytes an
entry before zstd, and zstd gains little on either. The encodings here store the same rows in
far fewer bytes, and each one is a pair of pure-numpy functions working on whole windows at
once (no Python loop over rows), so decoding keeps up with a trainer on one core:

- :func:`encode_ids` / :func:`decode_ids`: each row's ids sorted by id and stored as gaps,
  bit-packed (or byte-shuffled); the permutation it applied is returned so companion columns
  follow the same order. :func:`frequency_remap` builds an optional id -> rank permutation.
- :func:`encode_dictionary_ids` / :func:`decode_dictionary_ids`: the same rows through the
  window's dictionary (its distinct ids, ascending): the dictionary as sorted gaps, then each
  row as sorted gaps of its ids' places in it, which are smaller than the ids' own gaps.
- :func:`encode_logprobs` / :func:`decode_logprobs`: log-probs rounded to a fixed grid of
  ``1 / steps`` nat, stored as integers relative to the row's largest log-prob
  (``grid-max``, any order), relative to its smallest (``grid-min``, any order: most of a
  top-k row's entries lie near its smallest, so the integers are small) or as gaps in rank
  order (``grid-delta``), plus each row's exact tail mass as float32 so the bucket loss keeps
  its tail; or (``grid-shift``) stored as ``grid-min`` with, instead of the tail, the
  constant each row is shifted by on decoding (an integer of ``2 ** -14`` nat), which costs a
  quarter of the tail's bytes and brings the same mass back to within ``2 ** -15``, and with
  a grid ``m`` times coarser beyond a grid integer ``F`` (probabilities below 1e-4), where
  the bound the format keeps (1/128 nat for p >= 1e-4) does not apply.
- :func:`encode_target_logprob`, :func:`encode_uints` (input ids, segment-start gaps,
  sampled counts, per-row entry counts) and their decoders.
- :func:`select_entry_counts`: mass-adaptive selection of how many of a row's sorted entries
  to keep; every entry encoding takes per-row entry counts, so rows may differ in length.

Every encoded column is one ``bytes`` blob made of sections (docs/format.md "Column
encodings" is the byte-level specification, with a worked example; cache/column_codecs.py
wires these functions into the cache format). Decoders check what is cheap to check
(lengths, widths, counts, ranges) and raise :class:`~longkd.errors.LongkdError` naming the
column instead of returning wrong numbers; a flipped bit inside a payload that keeps every
value in range cannot be detected here (the row's checksum over the decoded values is what
catches it).

    from longkd.cache import encodings as enc
    counts = np.full(W, K)                                  # fixed top-K rows
    blob, order = enc.encode_ids(ids.reshape(-1), counts, vocab_size=V)
    lp_blob = enc.encode_logprobs(logprobs.reshape(-1)[order], counts)
    ids2 = enc.decode_ids(blob, counts, vocab_size=V)       # sorted by id within each row
    logprobs2, tail = enc.decode_logprobs(lp_blob, counts)  # same order, |error| <= 1 / (2 * 64)
"""

from __future__ import annotations

import sys

import numpy as np

from longkd.errors import LongkdError

DEFAULT_STEPS = 64  # grid steps per nat: rounding error at most 1/128 nat
MAX_WIDTH = 32
_SPREAD = np.uint64(0x0001_0001_0001_0001)  # _ascending_rows16: running sums of 16-bit lanes
_TOP_LANE = np.uint64(48)
FEW_PACKED_VALUES = 1024  # unpack_bits: up to this many values, a gather beats the loop over 8
KIND_FLOAT32 = 0xF4
KIND_SHUFFLED = {1: 0x81, 2: 0x82, 4: 0x84}  # itemsize -> section kind
SHUFFLED_ITEMSIZE = {kind: size for size, kind in KIND_SHUFFLED.items()}
PACKINGS = ("bits", "bytes")
LOGPROB_LAYOUTS = ("grid-max", "grid-delta", "grid-min", "grid-shift")  # the layout byte is the index
DEFAULT_SHIFT_STEPS = 1 << 14  # grid-shift: a row's shift in steps of 2**-14 nat
# grid-shift's coarse zone may only hold probabilities below COARSE_BELOW_P, at most
# MAX_COARSE_ERROR nat of rounding (factor <= steps / 4): a reader's allowance below that line.
COARSE_BELOW_P = 1e-4
MAX_COARSE_ERROR = 1 / 8
SECTION_HEADER = 5  # kind (uint8) + count (uint32)
DENSE_DICTIONARY_MAX = 1 << 20  # up to this V, a window's dictionary is found with a mask of V
GRID_TABLE_MAX = 1 << 16  # grid codes below this decode through a lookup table (grid_table)
POSITIVE_SLACK = 1e-6  # a stored log-prob may exceed 0 by this much (float rounding)
TAIL_MIN = -2e-3  # the most negative tail rounding can give (float16 log-probs, docs/format.md)


# ----------------------------------------------------------------------------- bit packing


def bits_for(value: int) -> int:
    """The number of bits an unsigned ``value`` needs (0 for 0)."""
    return int(value).bit_length()


def pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """Pack unsigned integers into a little-endian, LSB-first bit stream.

    Value i occupies stream bits ``[i * width, (i + 1) * width)``, its least significant bit
    first; stream bit b is bit ``b % 8`` (LSB = 0) of byte ``b // 8``. The last byte's unused
    high bits are 0.

    Args:
        values: [n] non-negative integers, each below ``2 ** width``.
        width: bits per value, 0 to 32 (0 stores nothing; every value must be 0).

    Returns:
        uint8[ceil(n * width / 8)].

    Raises:
        LongkdError: a width outside 0..32, a negative value or one that does not fit.
    """
    values = np.asarray(values)
    if not 0 <= width <= MAX_WIDTH:
        raise LongkdError(f"bit width {width} is outside 0..{MAX_WIDTH}")
    n = values.size
    if n and (values.min() < 0 or bits_for(values.max()) > width):
        raise LongkdError(f"values in [{values.min()}, {values.max()}] do not fit {width} unsigned bits")
    if width == 0 or n == 0:
        return np.zeros(0, np.uint8)
    groups = -(-n // 8)  # 8 values of w bits fill exactly w bytes: one row of `out` per group
    padded = np.zeros(groups * 8, np.uint64)
    padded[:n] = values.reshape(-1)
    grouped = padded.reshape(groups, 8)
    out = np.zeros((groups, width), np.uint8)
    for j in range(8):
        start, shift = divmod(j * width, 8)
        shifted = grouped[:, j] << np.uint64(shift)
        for k in range((shift + width + 7) // 8):
            out[:, start + k] |= (shifted >> np.uint64(8 * k)).astype(np.uint8)
    return out.reshape(-1)[: -(-n * width // 8)]


def unpack_bits(data: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`.

    Args:
        data: uint8[ceil(count * width / 8)].
        count: number of values.
        width: bits per value, 0 to 32.

    Returns:
        uint32[count].

    Raises:
        LongkdError: a width outside 0..32 or a byte length that does not match.
    """
    if not 0 <= width <= MAX_WIDTH:
        raise LongkdError(f"bit width {width} is outside 0..{MAX_WIDTH}")
    need = -(-count * width // 8)
    if data.size != need:
        raise LongkdError(f"{data.size} bytes hold no {count} values of {width} bits (need {need})")
    if width == 0 or count == 0:
        return np.zeros(count, np.uint32)
    if count <= FEW_PACKED_VALUES:  # few values: one 8-byte read per value, no loop
        padded = np.zeros(need + 8, np.uint8)
        padded[:need] = data
        words = np.ndarray((need + 1,), "<u8", buffer=padded, strides=(1,))  # a read at every byte
        first_bit = np.arange(count, dtype=np.int64) * width
        values = words[first_bit >> 3] >> (first_bit & 7).astype(np.uint64)
        values &= np.uint64((1 << width) - 1)
        return values.astype(np.uint32)
    groups = -(-count // 8)  # 8 values of w bits fill exactly w bytes
    padded = np.zeros(groups * width + 8, np.uint8)  # + 8: room for the last 8-byte read
    padded[:need] = data
    out = np.empty((groups, 8), np.uint32)
    mask = np.uint64((1 << width) - 1)
    for j in range(8):
        # value j of every group starts at the same bit of its group: read 8 bytes from there
        start, shift = divmod(j * width, 8)
        words = np.ndarray((groups,), dtype="<u8", buffer=padded, offset=start, strides=(width,))
        out[:, j] = (words >> np.uint64(shift)) & mask
    return out.reshape(-1)[:count]


def shuffle_bytes(values: np.ndarray, itemsize: int) -> np.ndarray:
    """Unsigned integers as ``itemsize`` byte planes: plane b holds byte b (little-endian) of
    every value, so the mostly-zero high bytes sit together where zstd finds them.

    Returns:
        uint8[n * itemsize].
    """
    as_le = np.ascontiguousarray(values, dtype=f"<u{itemsize}")
    return np.ascontiguousarray(as_le.view(np.uint8).reshape(-1, itemsize).T).reshape(-1)


def unshuffle_bytes(data: np.ndarray, count: int, itemsize: int) -> np.ndarray:
    """Inverse of :func:`shuffle_bytes`: ``uint{8 * itemsize}[count]`` (uint8, uint16 or uint32)."""
    planes = data.reshape(itemsize, count)
    out = planes[itemsize - 1].astype(f"u{itemsize}")
    for b in range(itemsize - 2, -1, -1):  # shift in one plane at a time: no strided transpose
        out <<= 8
        out |= planes[b]
    return out


# ----------------------------------------------------------------------------- sections


def _section_ints(
    values: np.ndarray, packing: str, width: int | None = None, missing: np.ndarray | None = None
) -> bytes:
    """One section of unsigned integers: bit-packed at ``width`` (default: the narrowest that
    holds the largest value) or byte-shuffled at the smallest of 1, 2, 4 bytes that holds it.

    With ``missing`` (bool[n]) the all-ones value of the chosen width (or itemsize) is reserved
    as a sentinel, even when nothing is missing, and stored at the missing entries: the width
    is chosen to hold the largest present value plus one.
    """
    values = np.asarray(values).reshape(-1).astype(np.int64)
    if values.size and values.min() < 0:
        raise LongkdError(f"value {values.min()} is negative; sections hold unsigned integers")
    present = values if missing is None else values[~missing]
    top = (int(present.max()) if present.size else 0) + (missing is not None and values.size > 0)
    if packing == "bits":
        width = bits_for(top) if width is None else width
        if missing is not None:
            values = np.where(missing, (1 << width) - 1, values)
        return _header(width, values.size) + pack_bits(values, width).tobytes()
    if packing == "bytes":
        itemsize = next((s for s in (1, 2, 4) if bits_for(top) <= 8 * s), None)
        if itemsize is None:
            raise LongkdError(f"value {top} does not fit 32 bits")
        if missing is not None:
            values = np.where(missing, (1 << (8 * itemsize)) - 1, values)
        return _header(KIND_SHUFFLED[itemsize], values.size) + shuffle_bytes(values, itemsize).tobytes()
    raise LongkdError(f"unknown packing {packing!r}; use one of {', '.join(PACKINGS)}")


def _section_float32(values: np.ndarray) -> bytes:
    return _header(KIND_FLOAT32, values.size) + np.ascontiguousarray(values, "<f4").tobytes()


def _header(kind: int, count: int) -> bytes:
    if count >= 2**32:
        raise LongkdError(f"a section holds at most 2**32 - 1 values, got {count}")
    return bytes([kind]) + int(count).to_bytes(4, "little")


class _Sections:
    """Reads a blob's sections in order, checking each against what the column expects."""

    def __init__(self, blob: bytes | np.ndarray, column: str):
        self.data = np.frombuffer(blob, np.uint8) if not isinstance(blob, np.ndarray) else blob.view(np.uint8)
        self.pos = 0
        self.column = column

    def fail(self, what: str) -> LongkdError:
        return LongkdError(
            f"corrupt {self.column} encoding: {what}; rebuild the cache or run `longkd cache verify`"
        )

    def uint16(self, name: str) -> int:
        if self.pos + 2 > self.data.size:
            raise self.fail(f"{name} is cut off")
        value = int(self.data[self.pos]) | int(self.data[self.pos + 1]) << 8
        self.pos += 2
        return value

    def uint32(self, name: str) -> int:
        low = self.uint16(name)
        return low | self.uint16(name) << 16

    def _head(self, name: str, count: int | None) -> tuple[int, int]:
        if self.pos + SECTION_HEADER > self.data.size:
            raise self.fail(f"section {name!r} is cut off")
        kind = int(self.data[self.pos])
        n = int.from_bytes(self.data[self.pos + 1 : self.pos + 5].tobytes(), "little")
        if count is not None and n != count:
            raise self.fail(f"section {name!r} holds {n} values, expected {count}")
        self.pos += SECTION_HEADER
        return kind, n

    def _payload(self, name: str, size: int) -> np.ndarray:
        if self.pos + size > self.data.size:
            raise self.fail(f"section {name!r} needs {size} bytes, {self.data.size - self.pos} left")
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def ints(self, name: str, count: int | None = None) -> tuple[np.ndarray, int]:
        """The next section's integers (uint32 when bit-packed; uint8, uint16 or uint32 by
        itemsize when byte-shuffled), and the sentinel its width reserves (``2 ** width - 1``,
        or the itemsize's maximum for byte-shuffled sections)."""
        kind, n = self._head(name, count)
        if kind <= MAX_WIDTH:
            return unpack_bits(self._payload(name, -(-n * kind // 8)), n, kind), (1 << kind) - 1
        if kind in SHUFFLED_ITEMSIZE:
            size = SHUFFLED_ITEMSIZE[kind]
            return unshuffle_bytes(self._payload(name, n * size), n, size), (1 << (8 * size)) - 1
        raise self.fail(f"section {name!r} has unknown kind {kind:#04x}")

    def float32(self, name: str, count: int) -> np.ndarray:
        kind, n = self._head(name, count)
        if kind != KIND_FLOAT32:
            raise self.fail(f"section {name!r} has kind {kind:#04x}, expected float32 ({KIND_FLOAT32:#04x})")
        return self._payload(name, 4 * n).view("<f4").astype(np.float32)

    def done(self) -> None:
        if self.pos != self.data.size:
            raise self.fail(f"{self.data.size - self.pos} bytes left after the last section")


# ----------------------------------------------------------------------------- row helpers


def _check_counts(counts: np.ndarray, total: int | None, column: str) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 1 or (counts.size and counts.min() < 0):
        raise LongkdError(f"{column}: per-row entry counts must be a 1-D array of non-negative integers")
    counts = counts.astype(np.int64)
    if total is not None and int(counts.sum()) != total:
        raise LongkdError(
            f"{column}: the per-row entry counts sum to {int(counts.sum())}, not {total} entries"
        )
    return counts


def _uniform(counts: np.ndarray) -> bool:
    """Whether every row holds the same, non-zero number of entries (a fixed top-K window)."""
    return bool(counts.size and counts[0] > 0 and (counts == counts[0]).all())


def row_starts(counts: np.ndarray) -> np.ndarray:
    """Offsets of each row's first entry in the flat array: int64[R] (``row_splits[:-1]``)."""
    starts = np.zeros(len(counts), np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    return starts


def _segmented_cumsum(increments: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Cumulative sums restarting at every row: int64[n]."""
    total = np.cumsum(increments, dtype=np.int64)
    nonempty = counts > 0
    starts = row_starts(counts)[nonempty]
    before = total[starts] - increments[starts]
    return total - np.repeat(before, counts[nonempty])


def shift_rows(
    values: np.ndarray, row_shift: np.ndarray, counts: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``values`` (float32[n], ``counts[r]`` for row r) plus ``row_shift[r]`` (float32[R]) in
    every entry of row r, in float32: a new array, or ``out`` (float32[n], may be ``values``)."""
    out = np.empty_like(values) if out is None else out
    if _uniform(counts):
        np.add(values.reshape(len(counts), -1), row_shift[:, None], out=out.reshape(len(counts), -1))
    else:
        np.add(values, np.repeat(row_shift, counts), out=out)
    return out


def apply_shifts(
    values: np.ndarray,
    shifts: np.ndarray,
    counts: np.ndarray,
    shift_steps: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``values`` (float32[n]) as ``grid-shift`` reads them: row r plus
    ``float32(shifts[r]) / float32(shift_steps)`` (``shifts`` int[R], signed), in float32 (a
    new array, or ``out``)."""
    row_shift = np.asarray(shifts).astype(np.float32)
    np.divide(row_shift, np.float32(shift_steps), out=row_shift)
    return shift_rows(values, row_shift, np.asarray(counts, np.int64), out)


def row_masses(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """float64[R]: ``sum(exp(row r))`` of ``values`` (float32[n]), float64 sums of float32
    ``exp``; 0 for empty rows."""
    if _uniform(counts):
        return np.exp(values.reshape(len(counts), -1)).sum(axis=1, dtype=np.float64)
    nonempty = counts > 0
    mass = np.zeros(len(counts), np.float64)
    if values.size:
        mass[nonempty] = np.add.reduceat(np.exp(values).astype(np.float64), row_starts(counts)[nonempty])
    return mass


def zigzag(values: np.ndarray) -> np.ndarray:
    """Signed integers as unsigned ones, small magnitudes small: 0, -1, 1, -2 -> 0, 1, 2, 3."""
    values = np.asarray(values, np.int64)
    return (values << 1) ^ (values >> 63)


def unzigzag(values: np.ndarray) -> np.ndarray:
    """The inverse of :func:`zigzag`: int64."""
    values = np.asarray(values, np.int64)
    return (values >> 1) ^ -(values & 1)


def _row_firsts(counts: np.ndarray) -> np.ndarray:
    """bool[n]: True at the first entry of every non-empty row."""
    first = np.zeros(int(counts.sum()), bool)
    first[row_starts(counts)[counts > 0]] = True
    return first


def select_entry_counts(
    logprobs: np.ndarray,
    cap: int | None = None,
    min_mass: float | None = None,
    min_prob: float | None = None,
) -> np.ndarray:
    """How many of each row's entries mass-adaptive selection keeps.

    A row keeps its entries in order (largest first) up to and including the first at which
    the covered mass reaches ``min_mass``; with ``min_prob`` it keeps only entries whose
    probability is at least ``min_prob``; never more than ``cap`` nor the row's finite
    entries, and always at least one entry.

    Args:
        logprobs: float[R, K] log-probs, descending within each row (-inf allowed).
        cap: the most entries a row keeps (default K).
        min_mass: the covered mass to reach, ``1 - eps`` (None: no mass rule).
        min_prob: the smallest probability kept (None: no probability rule).

    Returns:
        int32[R] entry counts in ``1 .. min(cap, K)``.

    Raises:
        LongkdError: a shape other than [R, K], or rules outside their ranges.
    """
    logprobs = np.asarray(logprobs)
    if logprobs.ndim != 2 or logprobs.shape[1] < 1:
        raise LongkdError(f"selection needs log-probs of shape [rows, K >= 1], got {logprobs.shape}")
    k = logprobs.shape[1]
    cap = k if cap is None else min(int(cap), k)
    if cap < 1:
        raise LongkdError(f"the entry cap must be at least 1, got {cap}")
    if min_mass is not None and not 0 < min_mass <= 1:
        raise LongkdError(f"min_mass must lie in (0, 1], got {min_mass}")
    if min_prob is not None and not 0 <= min_prob <= 1:
        raise LongkdError(f"min_prob must lie in [0, 1], got {min_prob}")
    probs = np.exp(logprobs.astype(np.float64))
    keep = np.full(len(logprobs), cap, np.int64)
    if min_mass is not None:
        below = np.cumsum(probs, axis=1) < min_mass  # entries before the one that reaches it
        keep = np.minimum(keep, below.sum(axis=1) + 1)
    if min_prob is not None:
        keep = np.minimum(keep, (probs >= min_prob).sum(axis=1))
    keep = np.minimum(keep, np.isfinite(logprobs).sum(axis=1))
    return np.maximum(keep, 1).astype(np.int32)


def ragged_from_dense(dense: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The first ``counts[r]`` entries of every row of ``dense`` [R, K], concatenated: [sum(counts)]."""
    return dense[np.arange(dense.shape[1]) < np.asarray(counts)[:, None]]


def dense_from_ragged(flat: np.ndarray, counts: np.ndarray, k: int, fill) -> np.ndarray:
    """Rows of ``flat`` (``counts[r]`` entries each) padded with ``fill`` to [R, k]."""
    out = np.full((len(counts), k), fill, dtype=flat.dtype)
    out[np.arange(k) < np.asarray(counts)[:, None]] = flat
    return out


def rank_order(logprobs: np.ndarray, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The permutation that puts every row in rank order: descending log-prob, ties by
    ascending id (what a row sorted by id needs for the inspect views).

    Returns:
        int64[n] indices into the flat arrays.
    """
    counts = np.asarray(counts, np.int64)
    rows = np.repeat(np.arange(len(counts)), counts)
    return np.lexsort((ids, -logprobs.astype(np.float64), rows))


# ----------------------------------------------------------------------------- ids


def frequency_remap(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """An id -> rank permutation: the most frequent id in ``ids`` gets 0, ties and unseen ids
    in ascending id order.

    Returns:
        int32[vocab_size] ``rank_of_id``; ``np.argsort(rank_of_id)`` maps ranks back to ids.
    """
    freq = np.bincount(np.asarray(ids).reshape(-1), minlength=vocab_size)[:vocab_size]
    by_rank = np.lexsort((np.arange(vocab_size), -freq))
    rank_of_id = np.empty(vocab_size, np.int32)
    rank_of_id[by_rank] = np.arange(vocab_size, dtype=np.int32)
    return rank_of_id


def encode_ids(
    ids: np.ndarray,
    counts: np.ndarray,
    vocab_size: int,
    packing: str = "bits",
    width: str = "max",
) -> tuple[bytes, np.ndarray]:
    """Encode ragged rows of distinct ids as sorted gaps (encoding ``ids-delta``).

    Each row is sorted ascending; its first id is stored as is, every later one as the gap
    ``id[i] - id[i - 1] - 1`` (ids are distinct, so gaps are >= 0).

    Args:
        ids: int[n] the rows' ids concatenated (``counts[r]`` for row r), any order in a row.
        counts: int[R] entries per row.
        vocab_size: V; every id must lie in ``[0, V)``.
        packing: ``"bits"`` (bit-packed) or ``"bytes"`` (byte-shuffled, for zstd).
        width: with ``"bits"``, ``"max"`` (the narrowest holding the window's largest value)
            or ``"vocab"`` (``bits_for(V - 1)``).

    Returns:
        ``(blob, order)``: the encoded column, and int64[n] with ``ids[order]`` the stored
        (sorted) order; apply ``order`` to companion columns (log-probs, counts).

    Raises:
        LongkdError: ids out of range, repeated within a row, or counts that do not match.
    """
    ids, counts, order = _id_rows(ids, counts, vocab_size)
    gaps = _sorted_gaps(ids[order], counts)
    fixed = bits_for(vocab_size - 1) if (packing == "bits" and width == "vocab") else None
    if width not in ("max", "vocab"):
        raise LongkdError(f"ids: unknown width rule {width!r}; use 'max' or 'vocab'")
    return _section_ints(gaps, packing, fixed), order


def _id_rows(ids: np.ndarray, counts: np.ndarray, vocab_size: int) -> tuple:
    """Checked rows of ids: ``(ids int64[n], counts int64[R], order)``, ``order`` sorting each
    row by id (:func:`_id_order`)."""
    ids = np.asarray(ids).reshape(-1).astype(np.int64)
    counts = _check_counts(counts, ids.size, "ids")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise LongkdError(f"ids: values in [{ids.min()}, {ids.max()}] leave the vocabulary [0, {vocab_size})")
    return ids, counts, _id_order(ids, counts, vocab_size)


def _id_order(ids: np.ndarray, counts: np.ndarray, vocab_size: int) -> np.ndarray:
    """int64[n]: the permutation sorting each row by id (stable), rows kept in place."""
    if _uniform(counts):  # fixed top-K: sort the rows of an [R, K] array
        k = int(counts[0])
        order = np.argsort(ids.reshape(len(counts), k), axis=1, kind="stable")
        order += np.arange(0, ids.size, k)[:, None]
        return order.reshape(-1)
    rows = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    return np.argsort(rows * vocab_size + ids, kind="stable")


def _sorted_gaps(ordered: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Rows already ascending as stored gaps: each row's first value, then ``x[i] - x[i-1] - 1``."""
    first = _row_firsts(counts)
    gaps = ordered.copy()
    gaps[1:] -= ordered[:-1] + 1
    gaps[first] = ordered[first]
    if gaps.size and gaps.min() < 0:
        raise LongkdError("ids: an id repeats within a row; rows must hold distinct ids")
    return gaps


def decode_ids(blob: bytes, counts: np.ndarray, vocab_size: int) -> np.ndarray:
    """Decode :func:`encode_ids`: int32[sum(counts)], ascending within each row.

    Raises:
        LongkdError: the blob does not hold ``sum(counts)`` values, or decodes to ids outside
            ``[0, V)``.
    """
    counts = _check_counts(counts, None, "ids")
    sections = _Sections(blob, "ids")
    ids = _sorted_gap_rows(sections, "gaps", counts, vocab_size, "an id", "the vocabulary")
    sections.done()
    return ids.astype(np.int32, copy=False)


def _sorted_gap_rows(
    sections: _Sections, name: str, counts: np.ndarray, limit: int, what: str, below: str
) -> np.ndarray:
    """The next section's rows of sorted gaps as int32 (uint16 where :func:`_ascending_rows16`
    applies) [sum(counts)] values, each ``< limit`` (``what`` names a value and ``below`` what
    it indexes, for the error, which names the row)."""
    gaps, _ = sections.ints(name, int(counts.sum()))
    if _uniform(counts):  # fixed top-K: rows are the rows of an [R, K] array
        k = int(counts[0])
        ids = _ascending_rows16(gaps.reshape(len(counts), k), limit)
        if ids is not None:
            return ids.reshape(-1)
        # int32 cannot overflow when every gap fits 16 bits and K < 2**15
        wide = gaps.dtype.itemsize > 2 or k >= 2**15
        ids = np.cumsum(gaps.reshape(len(counts), k), axis=1, dtype=np.int64 if wide else np.int32)
        ids += np.arange(k, dtype=ids.dtype)  # each gap after a row's first is stored minus 1
        largest = ids[:, -1]  # rows ascend: the last value is the row's largest
        if largest.max() >= limit:
            row = int(np.argmax(largest >= limit))
            raise sections.fail(_beyond(row, what, int(largest[row]), below, limit))
        return ids.reshape(-1).astype(np.int32, copy=False)
    increments = gaps.astype(np.int64)
    increments += ~_row_firsts(counts)
    ids = _segmented_cumsum(increments, counts)
    if ids.size and (ids.max() >= limit or ids.min() < 0):
        bad = int(np.argmax((ids >= limit) | (ids < 0)))
        row = int(np.searchsorted(np.cumsum(counts), bad, side="right"))
        raise sections.fail(_beyond(row, what, int(ids[bad]), below, limit))
    return ids.astype(np.int32, copy=False)


def _ascending_rows16(gaps: np.ndarray, limit: int) -> np.ndarray | None:
    """Rows of sorted gaps (uint8 or uint16[R, K]) as the values they store, uint16[R, K]:
    ``cumsum(row) + arange(K)`` (each gap after a row's first is stored minus 1), four 16-bit
    lanes of a uint64 at a time, which is several times faster than ``np.cumsum``.

    A word times ``0x0001000100010001`` holds in lane i the sum of its lanes 0..i, as long as
    no sum reaches 2**16; the same product on the words' sums gives the running sums of words
    within groups of four, and a cumsum over the groups the rest (rows are padded with zeros
    to a multiple of 16). None where this does not apply (the caller then takes
    ``np.cumsum``): wider gaps, a ``limit`` above 2**16, a big-endian machine, or a row whose
    values do not all stay below ``limit`` (the caller's check names it).
    """
    rows, k = gaps.shape
    if rows == 0 or k == 0 or gaps.dtype.itemsize > 2 or limit > 1 << 16 or sys.byteorder != "little":
        return None
    width = -(-k // 16) * 16
    if width == k:  # no padding: the gaps as they are (read only below)
        lanes = np.ascontiguousarray(gaps, np.uint16)
    else:
        lanes = np.zeros((rows, width), np.uint16)
        lanes[:, :k] = gaps
    words = lanes.view(np.uint64) * _SPREAD  # [R, width/4]: running sums within each word
    word_sums = (words >> _TOP_LANE).astype(np.uint16)
    groups = word_sums.view(np.uint64) * _SPREAD  # [R, width/16]: running sums of words within 4
    group_sums = groups >> _TOP_LANE
    groups += (np.cumsum(group_sums, axis=1) - group_sums) * _SPREAD
    running = groups.view(np.uint16)  # [R, width/4]: each row's running sum of its words
    totals = running[:, -1]
    # a row summing to 2**16 or more carried between lanes, and its 16-bit total falls short
    if int(lanes.sum(dtype=np.uint64)) != int(totals.sum(dtype=np.uint64)) or int(totals.max()) + k > limit:
        return None
    words += (running - word_sums).astype(np.uint64) * _SPREAD
    words += np.arange(width, dtype=np.uint16).view(np.uint64)  # a carry only ever reaches padding
    return words.view(np.uint16)[:, :k]


def _beyond(row: int, what: str, value: int, below: str, limit: int) -> str:
    return f"row {row}: {what} decodes to {value}, beyond {below} of {limit}"


def encode_dictionary_ids(ids: np.ndarray, counts: np.ndarray, vocab_size: int) -> tuple[bytes, np.ndarray]:
    """Encode ragged rows of distinct ids through the window's dictionary (encoding
    ``dictionary``).

    The dictionary is every id the rows hold, once, ascending, stored as one row of sorted
    gaps; each row then stores the places of its ids in the dictionary as sorted gaps. A
    window of 512 top-64 rows of a text teacher holds a few thousand distinct ids, so a
    place's gaps are several times smaller than the ids' own and compress better (measured
    in docs/benchmarks.md). Rows come out ascending by id, as with :func:`encode_ids`.

    Args:
        ids: int[n] the rows' ids concatenated (``counts[r]`` for row r), any order in a row.
        counts: int[R] entries per row.
        vocab_size: V; every id must lie in ``[0, V)``.

    Returns:
        ``(blob, order)``: the encoded column (two byte-shuffled integer sections:
        dictionary, places), and int64[n] with ``ids[order]`` the stored order.

    Raises:
        LongkdError: ids out of range, repeated within a row, or counts that do not match.
    """
    ids, counts, order = _id_rows(ids, counts, vocab_size)
    ordered = ids[order]
    if vocab_size <= DENSE_DICTIONARY_MAX:  # a mask of the vocabulary: no sort
        present = np.zeros(vocab_size, bool)
        present[ids] = True
        dictionary = np.flatnonzero(present)
        places = (np.cumsum(present, dtype=np.int32) - 1)[ordered]
    else:
        dictionary = np.unique(ids)
        places = np.searchsorted(dictionary, ordered)
    table = _section_ints(_sorted_gaps(dictionary, np.array([dictionary.size])), "bytes")
    return table + _section_ints(_sorted_gaps(places, counts), "bytes"), order


def decode_dictionary_ids(blob: bytes, counts: np.ndarray, vocab_size: int) -> np.ndarray:
    """Decode :func:`encode_dictionary_ids`: int32[sum(counts)], ascending within each row.

    Raises:
        LongkdError: sections of the wrong size, a dictionary id ``>= V``, or a place beyond
            the dictionary (naming its row).
    """
    counts = _check_counts(counts, None, "ids")
    sections = _Sections(blob, "ids")
    gaps, _ = sections.ints("dictionary")
    dictionary = _ascending_rows16(gaps.reshape(1, -1), vocab_size)
    if dictionary is None:
        dictionary = np.cumsum(gaps, dtype=np.int64)  # < 2**64: at most 2**32 values below 2**32
        dictionary += np.arange(gaps.size)  # each gap after the first is stored minus 1
    dictionary = dictionary.reshape(-1)
    if dictionary.size and dictionary[-1] >= vocab_size:  # ascending: the last is the largest
        raise sections.fail(
            f"a dictionary id decodes to {int(dictionary[-1])}, beyond the vocabulary of {vocab_size}"
        )
    places = _sorted_gap_rows(sections, "places", counts, gaps.size, "a place", "the dictionary")
    dictionary = dictionary.astype(np.int32)
    sections.done()
    return np.take(dictionary, places)  # np.take: faster than fancy indexing on this path


# ----------------------------------------------------------------------------- log-probs


def _grid(values: np.ndarray, steps: int, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs as grid integers ``a = round(-x * steps)`` (>= 0) and the -inf mask."""
    if not 1 <= steps <= 0xFFFF:
        raise LongkdError(f"{column}: grid steps per nat must lie in 1..65535, got {steps}")
    values = np.asarray(values, np.float64).reshape(-1)
    neginf = np.isneginf(values)
    bad = np.isnan(values) | (values > POSITIVE_SLACK)
    if bad.any():
        raise LongkdError(f"{column}: log-prob {values[bad][0]} is not a log-probability (NaN or > 0)")
    grid = np.rint(-np.where(neginf, 0.0, values) * steps)
    np.maximum(grid, 0, out=grid)
    if grid.size and grid.max() >= 2**MAX_WIDTH - 1:
        raise LongkdError(f"{column}: log-prob {values[~neginf].min()} is beyond the grid's range")
    return grid.astype(np.int64), neginf


def encode_logprobs(
    logprobs: np.ndarray,
    counts: np.ndarray,
    layout: str = "grid-max",
    steps: int = DEFAULT_STEPS,
    packing: str = "bits",
    tail: np.ndarray | None = None,
    shifts: np.ndarray | None = None,
    shift_steps: int = DEFAULT_SHIFT_STEPS,
    coarse_from: int = 0,
    coarse_factor: int = 1,
) -> bytes:
    """Encode ragged rows of log-probs on a grid of ``1 / steps`` nat, with each row's tail
    (or, ``grid-shift``, each row's shift).

    Every log-prob x becomes ``a = round(-x * steps)`` (half to even), decoded as
    ``-a / steps``: the error is at most ``1 / (2 * steps)`` nat. -inf is kept exactly.

    Args:
        logprobs: float[n] the rows' log-probs concatenated (``counts[r]`` for row r).
            ``grid-max``, ``grid-min``: any order within a row; ``grid-delta``: descending
            within each row.
        counts: int[R] entries per row.
        layout: ``"grid-max"`` (per row the smallest ``a`` (the row's largest log-prob) and
            every entry's ``a`` minus it), ``"grid-min"`` (per row the largest finite ``a``
            (its smallest log-prob) and that minus every entry's ``a``) or ``"grid-delta"``
            (per row the first ``a`` and the gaps ``a[i] - a[i - 1]`` in rank order), or
            ``"grid-shift"`` (as ``grid-min``, then ``shifts`` in place of the tail).
        steps: grid steps per nat (64: error <= 1/128 nat).
        packing: ``"bits"`` or ``"bytes"`` for the integer sections.
        tail: float[R] the rows' tails to store, when ``logprobs`` are already grid values
            chosen by the caller (default: ``1 - sum(exp(x))`` of ``logprobs``).
        shifts: ``grid-shift`` only: int[R] what the decoder adds to each row, in steps of
            ``1 / shift_steps`` nat (signed; :func:`column_codecs.snap_to_grid` chooses them).
        shift_steps: ``grid-shift`` only: shift steps per nat, 1..65535.
        coarse_from, coarse_factor: ``grid-shift`` only: grid integers ``a`` above
            ``coarse_from`` (F) are rounded again, to the coarse grid ``F + coarse_factor * j``
            (an error of up to ``(coarse_factor + 1) / (2 * steps)``; values already on it,
            as :func:`column_codecs.snap_to_grid` gives them, stay), and stored as ``F + j``
            (:func:`check_coarse_zone` says which zones are allowed); ``coarse_factor`` 1: one
            grid throughout.

    Returns:
        The encoded column; its tail section holds ``1 - sum(exp(x))`` per row, computed in
        float64 from the unrounded log-probs (or ``tail``), as float32 (``grid-shift``: no
        tail section, a section of the zigzagged shifts instead).

    Raises:
        LongkdError: NaN or positive log-probs, counts that do not match, an unknown layout,
            or (``grid-delta``) a row that is not descending.
    """
    counts = _check_counts(counts, np.asarray(logprobs).size, "logprobs")
    grid, neginf = _grid(logprobs, steps, "logprobs")
    starts = row_starts(counts)
    nonempty = counts > 0
    if tail is not None:
        tail = np.asarray(tail, np.float64).reshape(-1)
        if tail.shape != counts.shape:
            raise LongkdError(f"logprobs: {tail.shape[0]} tails for {counts.shape[0]} rows")
    else:
        tail = np.ones(len(counts), np.float64)
        if grid.size:
            mass = np.exp(np.asarray(logprobs, np.float64).reshape(-1))
            tail[nonempty] = 1.0 - np.add.reduceat(mass, starts[nonempty])
    if grid.size:
        if tail.min() < TAIL_MIN:
            raise LongkdError(
                f"logprobs: row {int(np.argmin(tail))}'s probabilities sum to {1 - tail.min():.6f} > 1; "
                "store log-probs normalised over the full vocabulary"
            )
    if layout == "grid-shift":
        if shifts is None or np.asarray(shifts).shape != counts.shape:
            raise LongkdError("logprobs: layout grid-shift needs one shift per row")
        if not 1 <= shift_steps <= 0xFFFF:
            raise LongkdError(f"logprobs: shift steps per nat must lie in 1..65535, got {shift_steps}")
        problem = check_coarse_zone(steps, coarse_from, coarse_factor)
        if problem:
            raise LongkdError(f"logprobs: {problem}")
        grid = coarse_codes(grid, coarse_from, coarse_factor)
    if layout in ("grid-max", "grid-min", "grid-shift"):
        base = np.zeros(len(counts), np.int64)
        if grid.size:
            if layout == "grid-max":
                finite_grid = np.where(neginf, np.iinfo(np.int64).max, grid)
                base[nonempty] = np.minimum.reduceat(finite_grid, starts[nonempty])
            else:
                finite_grid = np.where(neginf, -1, grid)
                base[nonempty] = np.maximum.reduceat(finite_grid, starts[nonempty])
            base[(base == np.iinfo(np.int64).max) | (base < 0)] = 0  # rows of -inf only
        rel = grid - np.repeat(base, counts)
        rel = np.where(neginf, 0, rel if layout == "grid-max" else -rel)
        sections = [_section_ints(base, packing), _section_ints(rel, packing, missing=neginf)]
    elif layout == "grid-delta":
        first = _row_firsts(counts)
        gaps = grid.copy()
        gaps[1:] -= grid[:-1]
        after_neginf = np.zeros_like(neginf)
        after_neginf[1:] = neginf[:-1] & ~first[1:]
        if (gaps[~first & ~neginf] < 0).any() or (after_neginf & ~neginf).any():
            raise LongkdError("logprobs: layout grid-delta needs every row in descending order")
        gaps[neginf] = 0
        sections = [
            _section_ints(grid[first], packing, missing=neginf[first]),
            _section_ints(gaps[~first], packing, missing=neginf[~first]),
        ]
    else:
        raise LongkdError(f"unknown log-prob layout {layout!r}; use one of {', '.join(LOGPROB_LAYOUTS)}")
    head = bytes([LOGPROB_LAYOUTS.index(layout)]) + int(steps).to_bytes(2, "little")
    if layout == "grid-shift":
        head += int(shift_steps).to_bytes(2, "little") + int(coarse_from).to_bytes(4, "little")
        head += int(coarse_factor).to_bytes(2, "little")
        return head + b"".join(sections) + _section_ints(zigzag(shifts), packing)
    return head + b"".join(sections) + _section_float32(tail.astype(np.float32))


def check_coarse_zone(steps: int, coarse_from: int, coarse_factor: int) -> str | None:
    """Why a ``grid-shift`` coarse zone is not allowed (None if it is): a factor of 1 (no
    zone) always is; otherwise the zone must start at or below ``log(COARSE_BELOW_P)``
    (``coarse_from / steps >= -log(1e-4)``) and round by at most ``MAX_COARSE_ERROR`` nat
    (``coarse_factor <= steps / 4``), so a reader knows every value above that line is fine."""
    if not 1 <= coarse_factor <= 0xFFFF or not 0 <= coarse_from < 2**32:
        return f"coarse zone from {coarse_from} by {coarse_factor} is out of range"
    if coarse_factor > 1 and (
        coarse_from < -np.log(COARSE_BELOW_P) * steps or coarse_factor > steps * 2 * MAX_COARSE_ERROR
    ):
        return (
            f"a coarse zone from {coarse_from}/{steps} nat by {coarse_factor} starts above "
            f"p = {COARSE_BELOW_P:g} or rounds by more than {MAX_COARSE_ERROR} nat"
        )
    return None


def coarse_codes(grid: np.ndarray, coarse_from: int, coarse_factor: int) -> np.ndarray:
    """Grid integers (int64[n], >= 0) as ``grid-shift`` stores them: ``a`` up to ``F`` as
    they are, above it ``F + round((a - F) / factor)`` (half to even)."""
    if coarse_factor == 1:
        return grid
    beyond = np.rint((grid - coarse_from) / coarse_factor).astype(np.int64) + coarse_from
    return np.where(grid > coarse_from, beyond, grid)


def fine_grid(codes: np.ndarray, coarse_from: int, coarse_factor: int) -> np.ndarray:
    """The inverse of :func:`coarse_codes` on stored codes (int[n]): the grid integers
    ``c + (factor - 1) * max(c - F, 0)``, int64 (int32 where they fit)."""
    if coarse_factor == 1:
        return codes
    top = int(codes.max()) if codes.size else 0
    wide = top + (coarse_factor - 1) * max(top - coarse_from, 0) >= 2**31 or codes.dtype.itemsize > 4
    out = codes - (coarse_from if wide else np.int32(coarse_from))
    out = out.astype(np.int64 if wide else np.int32, copy=False)
    np.maximum(out, 0, out=out)
    out *= coarse_factor - 1
    out += codes
    return out


def decode_logprobs(
    blob: bytes, counts: np.ndarray, layout: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode :func:`encode_logprobs`.

    Args:
        blob: the encoded column.
        counts: int[R] entries per row.
        layout: the layout the blob must have (default: whichever its layout byte names).

    Returns:
        ``(logprobs, tail)``: float32[sum(counts)] in the encoded order, and float32[R] the
        exact tail mass of each row; for ``grid-shift``, ``(logprobs, None)`` with every row
        already shifted (``-a / steps + shift / shift_steps``, each step in float32).

    Raises:
        LongkdError: a corrupt blob: unknown layout, wrong section sizes, a non-finite tail or
            one outside [-1e-4, 1].
    """
    counts = _check_counts(counts, None, "logprobs")
    sections = _Sections(blob, "logprobs")
    if sections.data.size < 1:
        raise sections.fail("the blob is empty")
    stored = int(sections.data[0])
    sections.pos = 1
    steps = sections.uint16("grid steps")
    if stored >= len(LOGPROB_LAYOUTS) or steps == 0:
        raise sections.fail(f"unknown layout {stored} or zero grid steps")
    if layout is not None and LOGPROB_LAYOUTS[stored] != layout:
        raise sections.fail(f"layout {stored} ({LOGPROB_LAYOUTS[stored]}) where {layout} was expected")
    layout = LOGPROB_LAYOUTS[stored]
    if layout == "grid-shift":
        shift_steps = sections.uint16("shift steps")
        coarse_from = sections.uint32("coarse zone start")
        coarse_factor = sections.uint16("coarse factor")
        problem = check_coarse_zone(steps, coarse_from, coarse_factor)
        if shift_steps == 0 or problem:
            raise sections.fail(problem or "zero shift steps")
    total = int(counts.sum())
    nonempty = counts > 0
    top = None  # the largest grid integer, where known without a pass over the entries
    if layout == "grid-max":
        base, _ = sections.ints("row base", len(counts))
        rel, sentinel = sections.ints("entries", total)
        missing = rel == sentinel
        if _uniform(counts):
            grid = rel.reshape(len(counts), -1).astype(np.uint32)
            grid += base[:, None]
            grid = grid.reshape(-1)
        else:
            grid = rel.astype(np.int64) + np.repeat(base.astype(np.int64), counts)
    elif layout in ("grid-min", "grid-shift"):
        base, _ = sections.ints("row base", len(counts))
        rel, sentinel = sections.ints("entries", total)
        top = int(base.max()) if base.size else 0  # a valid entry is at most its base
        rows = rel.reshape(len(counts), -1) if _uniform(counts) else None
        if rows is not None and top < 1 << 16 and rel.dtype.itemsize <= 2:  # half the memory traffic
            base16 = base.astype(np.uint16)[:, None]
            grid = np.subtract(base16, rows, dtype=np.uint16).reshape(-1)  # wraps where rel > base
            suspect = (rows > base16).reshape(-1)
        else:
            if rows is not None:
                grid = (base.astype(np.int64 if top >= 2**31 else np.int32)[:, None] - rows).reshape(-1)
            else:
                grid = np.repeat(base.astype(np.int64), counts) - rel
            suspect = grid < 0 if grid.size and grid.min() < 0 else None
        # a -inf's sentinel is rare: find the entries holding it only when one does
        missing = rel == sentinel if rel.size and int(rel.max()) == sentinel else None
        if suspect is not None and suspect.any():  # an entry above its base, or a -inf's sentinel
            above = suspect if missing is None else suspect & ~missing
            if above.any():
                bad = int(np.argmax(above))
                row = int(np.searchsorted(np.cumsum(counts), bad, side="right"))
                raise sections.fail(
                    f"row {row}: an entry lies above 0 (more than its row's base below the smallest)"
                )
    else:
        heads, head_sentinel = sections.ints("row heads", int(nonempty.sum()))
        rest, rest_sentinel = sections.ints("gaps", total - int(nonempty.sum()))
        first = _row_firsts(counts)
        increments = np.empty(total, np.int64)
        increments[first] = heads
        increments[~first] = rest
        missing = np.empty(total, bool)
        missing[first] = heads == head_sentinel
        missing[~first] = rest == rest_sentinel
        increments[missing] = 0
        grid = _segmented_cumsum(increments, counts)
    tail = shifts = None
    if layout == "grid-shift":
        shifts, _ = sections.ints("row shifts", len(counts))
    else:
        tail = sections.float32("tail", len(counts))
    sections.done()
    if tail is not None and (
        not np.isfinite(tail).all() or (tail.size and (tail.min() < TAIL_MIN or tail.max() > 1.0))
    ):
        raise sections.fail("a row's tail mass is not a probability")
    coarse = (coarse_from, coarse_factor) if layout == "grid-shift" else (0, 1)
    if top is not None and top < GRID_TABLE_MAX:  # one lookup per entry; clip: -inf's, below
        logprobs = np.take(grid_table(steps, *coarse, top), grid, mode="clip")
    else:
        logprobs = fine_grid(grid, *coarse).astype(np.float32)
        np.divide(logprobs, np.float32(-steps), out=logprobs)
    if shifts is not None:
        apply_shifts(logprobs, unzigzag(shifts), counts, shift_steps, out=logprobs)
    if missing is not None:
        np.copyto(logprobs, np.float32(-np.inf), where=missing)
    return logprobs, tail


_GRID_TABLES: dict[tuple[int, int, int], np.ndarray] = {}


def grid_table(steps: int, coarse_from: int, coarse_factor: int, top: int) -> np.ndarray:
    """float32[>= top + 1]: entry c is the log-prob a stored grid code c decodes to before its
    row's shift, ``float32(fine_grid(c)) / float32(-steps)``, so that decoding is one lookup
    per entry. Tables are kept per grid and grown to the next power of two as codes need."""
    key = (steps, coarse_from, coarse_factor)
    table = _GRID_TABLES.get(key)
    if table is None or table.size <= top:
        size = 1 << max(int(top).bit_length(), 10)
        table = fine_grid(np.arange(size, dtype=np.int64), coarse_from, coarse_factor).astype(np.float32)
        np.divide(table, np.float32(-steps), out=table)
        _GRID_TABLES[key] = table
    return table


def encode_target_logprob(values: np.ndarray, steps: int = DEFAULT_STEPS, packing: str = "bits") -> bytes:
    """Encode ``target_logprob`` (float[W], NaN where there is no next token) on the grid.

    Layout: grid steps (uint16), then one integer section of ``round(-x * steps)`` with NaN
    as the reserved sentinel ``2 ** w - 1``.

    Raises:
        LongkdError: an infinite or positive log-prob.
    """
    values = np.asarray(values, np.float64).reshape(-1)
    nan = np.isnan(values)
    if np.isinf(values).any():
        raise LongkdError("target_logprob: infinite values cannot be stored; expected finite or NaN")
    grid, _ = _grid(np.where(nan, 0.0, values), steps, "target_logprob")
    return int(steps).to_bytes(2, "little") + _section_ints(grid, packing, missing=nan)


def decode_target_logprob(blob: bytes, window: int) -> np.ndarray:
    """Decode :func:`encode_target_logprob`: float32[window] with NaN restored."""
    sections = _Sections(blob, "target_logprob")
    steps = sections.uint16("grid steps")
    if steps == 0:
        raise sections.fail("zero grid steps")
    grid, sentinel = sections.ints("values", window)
    sections.done()
    out = grid.astype(np.float32) / np.float32(-steps)
    out[grid == sentinel] = np.nan
    return out


# ----------------------------------------------------------------------------- plain integers


def encode_uints(
    values: np.ndarray, packing: str = "bits", width: int | None = None, offset: int = 0
) -> bytes:
    """Encode unsigned integers (``input_ids``, entry counts, sampled counts) as one section.

    Args:
        values: int[n].
        packing: ``"bits"`` or ``"bytes"``.
        width: with ``"bits"``, a fixed width (e.g. ``bits_for(V - 1)`` for input ids);
            default the narrowest holding the largest stored value.
        offset: subtracted before storing (1 for counts that are >= 1) and added back by
            :func:`decode_uints`.

    Raises:
        LongkdError: a value below ``offset`` or too wide for ``width``.
    """
    stored = np.asarray(values).reshape(-1).astype(np.int64) - offset
    if stored.size and stored.min() < 0:
        raise LongkdError(f"value {stored.min() + offset} is below the encoding's offset {offset}")
    return _section_ints(stored, packing, width)


def decode_uints(
    blob: bytes, count: int, column: str, offset: int = 0, limit: int | None = None
) -> np.ndarray:
    """Decode :func:`encode_uints`: int64[count].

    Args:
        blob: the encoded column.
        count: values expected.
        column: the column's name, for errors.
        offset: what :func:`encode_uints` subtracted.
        limit: when given, every decoded value must be below it (a vocabulary, a cap).

    Raises:
        LongkdError: a corrupt blob or a value at or above ``limit``.
    """
    sections = _Sections(blob, column)
    stored, _ = sections.ints("values", count)
    sections.done()
    out = stored.astype(np.int64) + offset
    if limit is not None and out.size and out.max() >= limit:
        raise sections.fail(f"a value decodes to {out.max()}, not below {limit}")
    return out


def encode_segment_starts(starts: np.ndarray, length: int, packing: str = "bits") -> bytes:
    """Encode ``segment_starts`` (0 first, strictly increasing, below ``length``) as the gaps
    ``s[i] - s[i - 1] - 1`` after the leading 0 (which is not stored)."""
    starts = np.asarray(starts).reshape(-1).astype(np.int64)
    if starts.size == 0 or starts[0] != 0 or (np.diff(starts) <= 0).any() or starts[-1] >= length:
        raise LongkdError(f"segment_starts must start at 0, increase strictly and stay below {length}")
    return _section_ints(np.diff(starts) - 1, packing)


def decode_segment_starts(blob: bytes, length: int) -> np.ndarray:
    """Decode :func:`encode_segment_starts`: int32[S], checked against ``length``."""
    sections = _Sections(blob, "segment_starts")
    gaps, _ = sections.ints("gaps")
    sections.done()
    starts = np.concatenate([[0], np.cumsum(gaps.astype(np.int64) + 1)])
    if starts[-1] >= length:
        raise sections.fail(f"a segment starts at {starts[-1]}, beyond the window's length {length}")
    return starts.astype(np.int32)
