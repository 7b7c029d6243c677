"""The teacher run: one decoder forward per batch of windows, then the LM head in position chunks.

The cache stores, for every position of a packed window, a sparse view of the teacher's
next-token distribution at temperature T: the top-k log-probs (normalised over the full
vocabulary, so the tail mass stays recoverable), a mass-adaptive prefix of them (each row
cut once it covers enough mass or its next probability is too small) or the counts of N
draws from it, plus the log-prob of the true next token. Full ``[B, W, V]`` logits for long windows and large
vocabularies do not fit in memory (W=32768, V=152064 is 20 GB in fp32 per window), so the
decoder body runs once and the LM head, the model's own logit post-processing, the log-softmax
and the selection run over ``chunk_size`` positions at a time, on the device; only the
selected values cross to the host, once per chunk.

    teacher = Teacher.load("path/or/hub-id", dtype="bfloat16", device="cuda")
    rows = teacher.run(input_ids, position_ids, [0, 1], SelectionConfig("topk", k=64))

:func:`longkd.models.lm_head_logits` is shared with the trainer so that teacher and student
logits go through the same head code. A teacher split over a tensor-parallel group keeps its
head split by vocabulary: each chunk's selection is then merged over the group's shards
(cache/tensor_parallel.py). The teacher's identity hashes live in cache/identity.py and the
checkpoint probes used while loading in cache/teacher_loading.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from longkd.cache.encodings import ragged_from_dense, select_entry_counts
from longkd.cache.identity import canonical_json, config_sha256, tokenizer_fingerprint, weights_sha256
from longkd.cache.teacher_loading import embedding_size, is_causal_lm, looks_local, max_positions
from longkd.cache.tensor_parallel import (
    VocabShardedHead,
    check_shardable,
    require_accelerate,
    shard_seed,
    sharded_loading,
)
from longkd.distributed import TensorParallel
from longkd.errors import LongkdError, one_line
from longkd.models import lm_head_logits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_DRAWS = 65535  # counts are stored as uint16


@dataclass(frozen=True)
class SelectionConfig:
    """What is kept of each row's distribution.

    Args:
        mode: ``topk`` (the k most likely ids and their log-probs), ``adaptive`` (of those,
            each row's first entries until their mass reaches ``min_mass`` or the next
            probability falls below ``min_prob``; at least one, at most k) or ``sampled``
            (``draws`` draws with replacement from p, stored as unique ids and counts).
        k: entries per row in ``topk`` mode, the most per row in ``adaptive`` mode (ignored
            when sampled).
        draws: draws per row in ``sampled`` mode, 1..65535.
        min_mass: ``adaptive``: the covered mass a row stops at, in (0, 1] (None: no mass rule).
        min_prob: ``adaptive``: the smallest probability a row goes on to, in (0, 1) (None: no
            probability rule). Adaptive needs at least one of the two.

    Raises:
        LongkdError: an unknown mode, k < 1, draws missing or out of range, or adaptive rules
            missing, out of range or given to another mode.
    """

    mode: str = "topk"
    k: int = 64
    draws: int | None = None
    min_mass: float | None = None
    min_prob: float | None = None

    def __post_init__(self):
        if self.mode not in ("topk", "adaptive", "sampled"):
            raise LongkdError(f"selection mode {self.mode!r} is unknown; use 'topk', 'adaptive' or 'sampled'")
        if self.mode != "sampled" and (not isinstance(self.k, int) or self.k < 1):
            raise LongkdError(f"--top-k must be a positive integer, got {self.k!r}")
        if self.mode == "sampled" and (not isinstance(self.draws, int) or not 1 <= self.draws <= MAX_DRAWS):
            raise LongkdError(f"--sample-draws must be an integer in [1, {MAX_DRAWS}], got {self.draws!r}")
        rules = (self.min_mass, self.min_prob)
        if self.mode != "adaptive" and rules != (None, None):
            raise LongkdError(f"--min-mass and --min-prob need the adaptive selection, not {self.mode!r}")
        if self.mode == "adaptive" and rules == (None, None):
            raise LongkdError("adaptive selection needs --min-mass or --min-prob (or both)")
        if self.min_mass is not None and not 0 < self.min_mass <= 1:
            raise LongkdError(f"--min-mass must lie in (0, 1], got {self.min_mass!r}")
        if self.min_prob is not None and not 0 < self.min_prob < 1:
            raise LongkdError(f"--min-prob must lie in (0, 1), got {self.min_prob!r}")

    def check_vocab(self, vocab: int) -> None:
        """Raise LongkdError if top-k asks for more entries than the teacher has logits."""
        if self.mode != "sampled" and self.k > vocab:
            raise LongkdError(f"--top-k {self.k} exceeds the teacher vocabulary {vocab}")


@dataclass
class TeacherRows:
    """The selected distribution of every row of one window (numpy, on the host).

    topk: ``ids`` int32[W, K], ``logprobs`` float32[W, K] (descending per row).
    adaptive: ``ids`` int32[M], ``logprobs`` float32[M], ``row_splits`` int32[W+1]; row t owns
    ``[row_splits[t], row_splits[t+1])``, 1 to K entries, the first ones of its top-K row.
    sampled: ``ids`` int32[M], ``counts`` uint16[M], ``row_splits`` int32[W+1]; row t owns
    ``[row_splits[t], row_splits[t+1])``, its ids ascending and its counts summing to draws.
    Both: ``target_logprob`` float32[W], log p(input_ids[t+1]) at row t, NaN at row W-1.
    """

    window_id: int
    mode: str
    ids: np.ndarray
    target_logprob: np.ndarray
    logprobs: np.ndarray | None = None
    counts: np.ndarray | None = None
    row_splits: np.ndarray | None = None


class Teacher:
    """A loaded causal LM and its tokenizer, in eval mode without gradients.

    Attributes:
        model: the transformers causal LM.
        tokenizer: its tokenizer.
        embedding_size: V, the logits dimension (may exceed ``len(tokenizer)``).
        max_positions: ``max_position_embeddings`` of the (text) config.
        head_device: where the LM head computes (the last GPU under ``device_map="auto"``).
        sharded_head: this rank's part of a vocabulary-split head (a tensor-parallel teacher,
            cache/tensor_parallel.py), or None.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name_or_path: str,
        dtype: str,
        revision: str | None = None,
        sharded_head: VocabShardedHead | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path
        self.dtype = dtype
        self.revision = revision
        self.device = next(model.parameters()).device
        self.head_device = _head_device(model)
        self.sharded_head = sharded_head
        self.text_config = model.config.get_text_config()
        self.embedding_size = embedding_size(model)
        self.max_positions = max_positions(self.text_config)
        self._identity: dict | None = None
        self._host: dict = {}  # reusable (pinned, on CUDA) host buffers, keyed by shape

    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        trust_remote_code: bool = False,
        revision: str | None = None,
        device_map: str | None = None,
        tensor_parallel: TensorParallel | None = None,
    ) -> Teacher:
        """Load a teacher from a local directory or a hub id.

        Args:
            name_or_path: a Hugging Face model directory or hub id.
            dtype: forward dtype, ``float32``, ``bfloat16`` or ``float16``.
            device: torch device string (this rank's, under tensor parallelism).
            trust_remote_code: allow the checkpoint's own modelling code.
            revision: hub revision (branch, tag or commit).
            device_map: ``"auto"``: spread the layers over the visible GPUs (accelerate) instead
                of ``device``.
            tensor_parallel: split the teacher over this rank's group (every rank of the job
                calls this together); size 1 or None loads it whole.

        Returns:
            The teacher.

        Raises:
            LongkdError: the path does not exist, there is no config or tokenizer, the model is
                not a causal LM, the dtype is unknown, the model cannot be split as asked,
                accelerate is missing for ``device_map`` or tensor parallelism, or loading fails.
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        name = str(name_or_path)
        if dtype not in DTYPES:
            raise LongkdError(f"--dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)}")
        if looks_local(name):
            path = Path(name).expanduser()
            if not path.exists():
                raise LongkdError(
                    f"teacher path {name} does not exist; pass a local model directory or a hub id"
                )
            if not (path / "config.json").is_file():
                raise LongkdError(
                    f"teacher directory {name} has no config.json; pass a Hugging Face model directory"
                )
            name = str(path)
        hub = {"revision": revision, "trust_remote_code": trust_remote_code}
        try:
            config = AutoConfig.from_pretrained(name, **hub)
        except Exception as exc:  # transformers raises OSError, ValueError, ... for unloadable configs
            raise LongkdError(f"cannot load the teacher config from {name}: {one_line(exc)}") from exc
        if not is_causal_lm(config, trust_remote_code):
            raise LongkdError(
                f"teacher {name} is a {config.model_type!r} model, which has no causal-LM class; "
                "pass a decoder-only language model"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, **hub)
        except Exception as exc:
            raise LongkdError(
                f"cannot load the teacher tokenizer from {name} ({one_line(exc)}); "
                "the model directory needs its tokenizer files"
            ) from exc
        if tokenizer is None or isinstance(tokenizer, bool):
            raise LongkdError(
                f"teacher {name} has no tokenizer; the model directory needs its tokenizer files"
            )
        tp = tensor_parallel if tensor_parallel is not None and tensor_parallel.size > 1 else None
        placing = contextlib.nullcontext({"device_map": device_map} if device_map is not None else {})
        if device_map is not None:
            if tp is not None:
                raise LongkdError("--device-map and --tensor-parallel exclude each other; choose one")
            require_accelerate(f"--device-map {device_map}")
        if tp is not None:
            check_shardable(config, tp.size, name)
            require_accelerate(f"--tensor-parallel {tp.size}")  # transformers places the shards with it
            placing = sharded_loading(tp, device)
        try:
            with placing as placement:
                model = AutoModelForCausalLM.from_pretrained(
                    name, config=config, dtype=DTYPES[dtype], **placement, **hub
                )
            if not placement:
                model = model.to(device)
        except Exception as exc:
            raise LongkdError(f"cannot load the teacher model from {name}: {one_line(exc)}") from exc
        model.eval()
        model.requires_grad_(False)
        teacher = cls(
            model,
            tokenizer,
            name_or_path=str(name_or_path),
            dtype=dtype,
            revision=revision,
            sharded_head=VocabShardedHead.of(model, tp),
        )
        teacher.check_head()
        return teacher

    # ------------------------------------------------------------------ metadata

    def identity(self) -> dict:
        """The manifest ``teacher`` block. The weights hash is one pass over the weights; it is
        computed on the first call and remembered."""
        if self._identity is None:
            rope = getattr(self.text_config, "rope_parameters", None)
            self._identity = {
                "name_or_path": self.name_or_path,
                "model_type": self.model.config.model_type,
                "config_sha256": config_sha256(self.model.config),
                "weights_sha256": weights_sha256(self.model),
                "revision": self.revision,
                "max_position_embeddings": self.max_positions,
                "dtype": self.dtype,
                "rope_parameters": json.loads(canonical_json(rope)) if rope is not None else None,
            }
        return dict(self._identity)

    def tokenizer_info(self) -> dict:
        """The manifest ``tokenizer`` block: fingerprint, size and the bos/eos/pad ids."""
        tok = self.tokenizer
        return {
            "fingerprint": tokenizer_fingerprint(tok),
            "size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }

    def _decoder_hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """[B, W] ids at explicit positions -> [B, W, d] final hidden states (no KV cache)."""
        out = self.model.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    @torch.inference_mode()
    def check_head(self, length: int = 8) -> None:
        """Check on a short probe that decoder body + :func:`lm_head_logits` reproduce the model's
        own forward, so an architecture whose logit post-processing longkd does not know is
        refused instead of silently cached wrong.

        Raises:
            LongkdError: the two logits differ beyond rounding.
        """
        gen = torch.Generator().manual_seed(0)
        vocab = min(self.embedding_size, len(self.tokenizer))
        ids = torch.randint(0, vocab, (1, length), generator=gen).to(self.device)
        pos = torch.arange(length, device=self.device).unsqueeze(0)
        full = self.model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
        hidden = self._decoder_hidden(ids, pos)
        mine = lm_head_logits(self.model, hidden).float().to(full.device)
        scale = max(1.0, full.abs().max().item())
        tol = (1e-4 if self.dtype == "float32" else 2e-2) * scale
        diff = (full - mine).abs().max().item() if full.shape == mine.shape else math.inf
        if self.sharded_head is not None:  # this rank's own columns, as the run computes them
            diff = max(diff, self.sharded_head.check(hidden, full))
        if not diff <= tol:
            raise LongkdError(
                f"teacher {self.name_or_path} ({self.model.config.model_type}) post-processes its logits "
                f"in a way longkd does not reproduce (max difference {diff:.3g}); this architecture is "
                "not supported"
            )

    # ------------------------------------------------------------------ the run

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        window_ids: list[int],
        selection: SelectionConfig,
        temperature: float = 1.0,
        seed: int = 0,
        chunk_size: int = 1024,
    ) -> list[TeacherRows]:
        """Run the teacher on a batch of windows and select each row's distribution.

        Args:
            input_ids: Long[B, W] packed tokens.
            position_ids: Long[B, W] their positions (continuous, or reset per segment).
            window_ids: B global window ids (they seed the sampler).
            selection: top-k, adaptive or sampled.
            temperature: T > 0; the stored distribution is ``log_softmax(logits / T)`` in fp32.
            seed: the sampling seed; window b draws from a generator seeded from
                (seed, window_ids[b]), so its draws do not depend on the batch it is in.
                They do depend on ``chunk_size`` (each chunk is one multinomial call).
            chunk_size: positions per LM-head chunk; peak memory is about
                ``3 * B * chunk_size * V * 4`` bytes.

        Returns:
            One :class:`TeacherRows` per window, in batch order.

        Raises:
            LongkdError: shapes that disagree, k > V, T <= 0, chunk_size < 1.
        """
        input_ids, position_ids = torch.as_tensor(input_ids), torch.as_tensor(position_ids)
        if input_ids.dim() != 2 or input_ids.shape != position_ids.shape:
            raise LongkdError(
                f"input_ids {tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)} "
                "must both be [batch, window]"
            )
        batch, window = input_ids.shape
        if len(window_ids) != batch:
            raise LongkdError(f"got {len(window_ids)} window ids for a batch of {batch} windows")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise LongkdError(f"--temperature must be a positive number, got {temperature!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise LongkdError(f"--chunk-size must be a positive integer, got {chunk_size!r}")
        selection.check_vocab(self.embedding_size)

        ids = input_ids.to(self.device, torch.long)
        pos = position_ids.to(self.device, torch.long)
        hidden = self._decoder_hidden(ids, pos)  # [B, W, d], the one decoder call
        # next[:, t] = input_ids[:, t+1]; the last column is a placeholder, its target set to NaN.
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1).unsqueeze(-1).to(self.head_device)  # [B, W, 1]
        target = torch.empty(batch, window, dtype=torch.float32, device=self.head_device)
        if selection.mode == "topk":
            rows = self._run_topk(hidden, nxt, target, selection.k, temperature, chunk_size)
        elif selection.mode == "adaptive":
            topk = self._run_topk(hidden, nxt, target, selection.k, temperature, chunk_size)
            rows = [adaptive_rows(row, selection) for row in topk]
        else:
            rows = self._run_sampled(hidden, nxt, target, window_ids, selection.draws, temperature,
                                     seed, chunk_size)  # fmt: skip
        target[:, -1] = math.nan
        target_host = target.cpu().numpy()
        for b, row in enumerate(rows):
            row.window_id = int(window_ids[b])
            row.target_logprob = target_host[b].copy()
        return rows

    def _chunk_logprobs(self, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
        """[B, c, d] hidden -> [B, c, V] fp32 log-probs at temperature T."""
        logits = lm_head_logits(self.model, hidden, float32=True)
        if temperature != 1.0:
            logits.div_(temperature)
        return torch.log_softmax(logits, dim=-1)

    def _host_buffer(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A reusable host buffer, pinned on CUDA so device-to-host copies can be asynchronous."""
        key = (shape, dtype)
        if key not in self._host:
            self._host[key] = torch.empty(shape, dtype=dtype, pin_memory=self.head_device.type == "cuda")
        return self._host[key]

    def _run_topk(self, hidden, nxt, target, k, temperature, chunk_size) -> list[TeacherRows]:
        batch, window, _ = hidden.shape
        # Position-major layout so that each chunk's slice is contiguous. The log-probs' fp32 bits
        # and the ids share one int32 buffer, so a chunk is one copy (an integer copy is exact,
        # whereas ids reinterpreted as floats would be denormals that flush-to-zero could eat).
        host = self._host_buffer((window, batch, 2, k), torch.int32)
        cuda = self.head_device.type == "cuda"
        for start in range(0, window, chunk_size):
            end = min(start + chunk_size, window)
            if self.sharded_head is None:
                logp = self._chunk_logprobs(hidden[:, start:end], temperature)  # [B, c, V]
                target[:, start:end] = logp.gather(-1, nxt[:, start:end]).squeeze(-1)
                values, top = torch.topk(logp, k, dim=-1, sorted=True)  # [B, c, k], descending
                del logp
            else:  # the group's merge of its vocabulary shards, the same on each of its ranks
                values, top, target[:, start:end] = self.sharded_head.topk(
                    hidden[:, start:end], nxt[:, start:end], k, temperature
                )
            packed = torch.stack([values.view(torch.int32), top.to(torch.int32)], dim=2)  # [B, c, 2, k]
            host[start:end].copy_(packed.transpose(0, 1), non_blocking=cuda)
        if cuda:
            torch.cuda.current_stream(self.head_device).synchronize()
        out = host.numpy()
        return [
            TeacherRows(
                window_id=-1,
                mode="topk",
                ids=np.ascontiguousarray(out[:, b, 1]),
                logprobs=np.ascontiguousarray(out[:, b, 0]).view(np.float32),
                target_logprob=np.empty(0, np.float32),
            )
            for b in range(batch)
        ]

    def _run_sampled(self, hidden, nxt, target, window_ids, draws, temperature, seed, chunk_size):
        batch, window, _ = hidden.shape
        vocab = self.embedding_size
        device = self.head_device
        gens = [torch.Generator(device=device).manual_seed(_window_seed(seed, w)) for w in window_ids]
        if self.sharded_head is not None:
            tp = self.sharded_head.tp
            shard_gens = [
                torch.Generator(device=device).manual_seed(shard_seed(seed, w, tp.rank, tp.size))
                for w in window_ids
            ]
        keys_parts, count_parts = [], []
        for start in range(0, window, chunk_size):
            end = min(start + chunk_size, window)
            c = end - start
            if self.sharded_head is None:
                logp = self._chunk_logprobs(hidden[:, start:end], temperature)
                target[:, start:end] = logp.gather(-1, nxt[:, start:end]).squeeze(-1)
                probs = logp.exp_()  # in place: the log-probs are no longer needed
                # Each window draws from its own generator, rows in order, so batching cannot change it.
                draw = torch.stack(
                    [
                        torch.multinomial(probs[b], draws, replacement=True, generator=gens[b])
                        for b in range(batch)
                    ]
                )  # [B, c, draws]
                del probs
            else:  # the same distribution, drawn shard by shard (cache/vocab_shards.py)
                draw, target[:, start:end] = self.sharded_head.draw(
                    hidden[:, start:end], nxt[:, start:end], draws, temperature, gens, shard_gens
                )
            draw, _ = torch.sort(draw, dim=-1)
            # One global key per (window, row, id): sorted within a row and rows in order, so the
            # flattened keys are ascending and unique_consecutive yields the per-row counts.
            row = torch.arange(batch, device=device).view(batch, 1, 1) * window
            row = row + start + torch.arange(c, device=device).view(1, c, 1)  # [B, c, 1]: b*W + t
            keys = (row * vocab + draw).reshape(-1)
            uniq, counts = torch.unique_consecutive(keys, return_counts=True)
            both = torch.stack([uniq, counts]).cpu()  # one copy; its size is only known here
            keys_parts.append(both[0].numpy())
            count_parts.append(both[1].numpy())
        keys = np.concatenate(keys_parts)
        counts = np.concatenate(count_parts)
        flat_row, ids = np.divmod(keys, vocab)  # flat_row = b * W + t
        win, row = np.divmod(flat_row, window)
        order = np.argsort(win, kind="stable")  # chunks interleave windows; rows stay ascending
        win, row, ids, counts = win[order], row[order], ids[order], counts[order]
        bounds = np.searchsorted(win, np.arange(batch + 1))
        result = []
        for b in range(batch):
            lo, hi = bounds[b], bounds[b + 1]
            splits = np.zeros(window + 1, dtype=np.int32)
            np.cumsum(np.bincount(row[lo:hi], minlength=window), out=splits[1:])
            result.append(
                TeacherRows(
                    window_id=-1,
                    mode="sampled",
                    ids=ids[lo:hi].astype(np.int32),
                    counts=counts[lo:hi].astype(np.uint16),
                    row_splits=splits,
                    target_logprob=np.empty(0, np.float32),
                )
            )
        return result


def _head_device(model) -> torch.device:
    """Where the LM head computes: its weight's device, or accelerate's execution device when
    ``device_map`` offloaded the weight."""
    head = model.get_output_embeddings()
    device = getattr(getattr(head, "_hf_hook", None), "execution_device", None)
    return torch.device(head.weight.device if device is None else device)


def adaptive_rows(rows: TeacherRows, selection: SelectionConfig) -> TeacherRows:
    """The adaptive rows of one window from its top-K rows: each row's first
    ``select_entry_counts`` entries (cache/encodings.py), decided on the float32 log-probs
    that are stored.

    Args:
        rows: top-k rows, ``ids`` int32[W, K] and ``logprobs`` float32[W, K] (descending).
        selection: an ``adaptive`` selection (its ``k`` is K).

    Returns:
        Adaptive rows: ``ids`` int32[M], ``logprobs`` float32[M], ``row_splits`` int32[W+1].
    """
    counts = select_entry_counts(
        rows.logprobs, cap=selection.k, min_mass=selection.min_mass, min_prob=selection.min_prob
    )
    splits = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=splits[1:])
    return TeacherRows(
        window_id=rows.window_id,
        mode="adaptive",
        ids=ragged_from_dense(rows.ids, counts),
        logprobs=ragged_from_dense(rows.logprobs, counts),
        row_splits=splits,
        target_logprob=rows.target_logprob,
    )


def _window_seed(seed: int, window_id: int) -> int:
    """A 63-bit generator seed from (seed, window_id), independent of batching and rank."""
    digest = hashlib.sha256(f"longkd-sample:{int(seed)}:{int(window_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
