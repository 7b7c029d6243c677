"""Long-context retrieval evals (``longkd eval``): model loading, the length x depth grid, outputs.

A student distilled on packed short data is only worth something if it can find a fact
far back in its context, so ``longkd eval`` measures exactly that, over a grid of context
lengths x needle depths:

    longkd eval MODEL --task passkey --lengths 1024,2048,4096 --depths 0,25,50,75,100 --out DIR
    longkd eval MODEL --task needle --needle-variant multivalue --value-type uuid --out DIR
    longkd eval MODEL --task toy            # token-level probe for toy-world models
    longkd eval MODEL --task cache-kl --cache DIR

- ``passkey`` and ``needle`` (the Mohtashami & Jaggi pass key; RULER's NIAH variants): their
  prompts and scores live in :mod:`longkd.tools.eval_prompts`; this module decodes a few
  tokens greedily per prompt and fills the grid.
- ``toy`` and ``cache-kl`` live in :mod:`longkd.tools.eval_toy` (the toy world's token-level
  probe) and :mod:`longkd.tools.eval_cache` (KL to the cached teacher by position);
  :func:`position_limit` here is the one definition of a model's position limit for all four.

Each prompt is fitted to its length with the model's own tokenizer. Lengths beyond the
model's position limit (``max_position_embeddings``, or ``original_max_position_embeddings x
factor`` for scaled RoPE when larger) are warned about, run anyway, and marked
``extrapolation`` in every output. Outputs: ``results.json``, ``results.md`` (a table) and
``heatmap.png`` (length x depth).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from longkd.errors import LongkdError, one_line
from longkd.tools.eval_prompts import NeedleConfig, fit_prompt, needle_probe, passkey_probe

log = logging.getLogger(__name__)

TASKS = ("passkey", "needle", "toy", "cache-kl")
# Rope types whose factor stretches the original context (dynamic NTK rescales at run time).
_SCALED_ROPE_TYPES = ("linear", "yarn", "llama3", "longrope")


@dataclass
class RetrievalResult:
    """Scores on a length x depth grid (``score[i][j]`` for ``lengths[i]``, ``depths[j]``)."""

    task: str
    lengths: list[int]
    depths: list[float]
    score: list[list[float]]
    prompt_tokens: list[list[float]]
    max_positions: int | None
    samples: int
    settings: dict = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    @property
    def extrapolation(self) -> list[bool]:
        """Per length: whether it exceeds the model's position limit."""
        return [self.max_positions is not None and n > self.max_positions for n in self.lengths]

    @property
    def mean(self) -> float:
        flat = [s for row in self.score for s in row]
        return sum(flat) / len(flat)

    def to_dict(self) -> dict:
        cells = [
            {
                "length": n,
                "depth": d,
                "score": self.score[i][j],
                "prompt_tokens": self.prompt_tokens[i][j],
                "extrapolation": self.extrapolation[i],
            }
            for i, n in enumerate(self.lengths)
            for j, d in enumerate(self.depths)
        ]
        by_length = {
            str(n): {"score": sum(self.score[i]) / len(self.depths), "extrapolation": self.extrapolation[i]}
            for i, n in enumerate(self.lengths)
        }
        return {
            "task": self.task,
            "settings": self.settings,
            "samples": self.samples,
            "max_positions": self.max_positions,
            "lengths": self.lengths,
            "depths": self.depths,
            "mean_score": self.mean,
            "by_length": by_length,
            "cells": cells,
            "examples": self.examples,
        }


# --------------------------------------------------------------------------- models


def position_limit(config) -> int | None:
    """The longest context a checkpoint is configured for, rope scaling included.

    ``max_position_embeddings``, or ``round(original_max_position_embeddings x factor)`` when
    the rope parameters scale the positions (linear, yarn, llama3, longrope) and that is
    larger: some checkpoints keep the pre-scaling value in ``max_position_embeddings``. The
    original length is read from the rope parameters, else from the config. ``default`` and
    ``dynamic`` rope do not count their factor (dynamic NTK rescales only at run time), the
    same rule as the trainer's rope schedules.

    Args:
        config: a transformers config (its text config is used for multimodal ones) or any
            object with ``max_position_embeddings`` / ``rope_parameters`` attributes.

    Returns:
        The limit in tokens, or None when the config has none.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", "default") in _SCALED_ROPE_TYPES:
        factor = rope.get("factor")
        original = rope.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None
        )
        if factor and original:
            scaled = int(round(original * factor))
            limit = scaled if limit is None else max(limit, scaled)
    return int(limit) if limit is not None else None


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; other names are checked and returned."""
    if dtype == "auto":
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise LongkdError(f"--dtype {dtype!r} is unknown; use auto, float32, bfloat16 or float16")
    return dtype


def load_model(name_or_path: str, *, device: str = "cpu", dtype: str = "auto", tokenizer: bool = True):
    """Load a causal LM (and its tokenizer) for evaluation.

    Local directories load with ``local_files_only``; a hub id (``org/name``) is fetched only
    when the hub is reachable (``HF_HUB_OFFLINE`` unset).

    Args:
        name_or_path: a Hugging Face model directory (trainer checkpoints included) or hub id.
        device: torch device string.
        dtype: ``auto`` (bfloat16 on CUDA, float32 otherwise), ``float32``, ``bfloat16``, ``float16``.
        tokenizer: also load the tokenizer.

    Returns:
        ``(model, tokenizer or None)``; the model in eval mode without gradients.

    Raises:
        LongkdError: not a model directory, not a causal LM, or loading fails.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = str(name_or_path)
    path = Path(name).expanduser()
    local = path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1
    if local:
        if not path.is_dir() or not (path / "config.json").is_file():
            raise LongkdError(
                f"{name} is not a model directory (no config.json); pass a Hugging Face model directory"
            )
        name = str(path)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = resolve_dtype(dtype, device)
    kw = {"local_files_only": True} if local else {}
    try:
        config = AutoConfig.from_pretrained(name, **kw)
    except Exception as exc:  # transformers raises OSError, ValueError, ... for unloadable configs
        raise LongkdError(f"cannot load the model config from {name}: {one_line(exc)}") from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LongkdError(
            f"{name} is a {config.model_type!r} model, not a causal LM; pass a decoder-only model"
        )
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(name, **kw)
        except Exception as exc:
            raise LongkdError(f"cannot load the tokenizer from {name}: {one_line(exc)}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtypes[dtype], **kw).to(
            device
        )
    except Exception as exc:
        raise LongkdError(f"cannot load the model from {name}: {one_line(exc)}") from exc
    model.eval().requires_grad_(False)
    return model, tok


def _greedy(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """Greedy continuation of ``ids`` through the model's ``generate``, decoded to text."""
    import torch

    device = getattr(model, "device", "cpu")
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)


# --------------------------------------------------------------------------- runner


def parse_depths(depths: Sequence[float]) -> list[float]:
    """Validate depths given in percent (0-100)."""
    out = [float(d) for d in depths]
    if not out or any(not 0.0 <= d <= 100.0 for d in out):
        raise LongkdError(f"--depths must be percentages in [0, 100], got {list(depths)}")
    return out


def run_retrieval(
    model,
    tokenizer,
    task: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    samples: int = 1,
    seed: int = 0,
    max_new_tokens: int | None = None,
    needle: NeedleConfig | None = None,
    max_positions: int | None = None,
    keep_examples: int = 3,
    progress: bool = False,
) -> RetrievalResult:
    """Score ``task`` on every (length, depth) cell.

    Args:
        model: anything with ``generate(input_ids=Long[1, T], attention_mask, max_new_tokens,
            do_sample=False, pad_token_id) -> Long[1, T + n]`` (a transformers causal LM).
        tokenizer: the model's tokenizer (fits prompts, decodes answers).
        task: ``passkey`` or ``needle``.
        lengths: context lengths in tokens (prompt fitted to at most each).
        depths: needle depths in percent, 0 = right after the instructions, 100 = right
            before the question.
        samples: prompts per cell (different keys and values); the cell score is their mean.
        seed: makes the keys, values and distractor depths reproducible.
        max_new_tokens: greedy tokens per answer; default 12 for passkey, 32 per expected
            value for needle.
        needle: the needle settings (``task="needle"``).
        max_positions: the model's position limit; longer lengths are warned about and marked.
        keep_examples: how many (prompt end, answer, expected) examples to keep in the result.
        progress: show a progress bar.

    Returns:
        The scores, percent per cell.

    Raises:
        LongkdError: unknown task, bad lengths/depths/samples, or a length too short for the prompt.
    """
    if task not in ("passkey", "needle"):
        raise LongkdError(f"--task {task!r} is not a text retrieval task; use passkey or needle")
    lengths = [int(n) for n in lengths]
    if not lengths or any(n < 1 for n in lengths):
        raise LongkdError(f"--lengths must be positive token counts, got {lengths}")
    depths = parse_depths(depths)
    if samples < 1:
        raise LongkdError(f"--samples must be at least 1, got {samples}")
    needle = needle or NeedleConfig()
    if max_new_tokens is None:
        n_values = needle.num_values if needle.variant == "multivalue" else 1
        max_new_tokens = 12 if task == "passkey" else min(32 * n_values, 128)
    for n in lengths:
        if max_positions is not None and n > max_positions:
            log.warning(
                "length %d exceeds the model's position limit %d: running it, marked as extrapolation",
                n, max_positions,
            )  # fmt: skip
    score = [[0.0] * len(depths) for _ in lengths]
    tokens = [[0.0] * len(depths) for _ in lengths]
    examples: list[dict] = []
    cells = [(i, j) for i in range(len(lengths)) for j in range(len(depths))]
    if progress:
        from tqdm import tqdm

        cells = tqdm(cells, desc=f"eval {task}", unit="cell")
    for i, j in cells:
        for s in range(samples):
            # One generator per (cell, sample): a cell's prompts do not depend on the grid.
            rng = random.Random(f"{seed}-{task}-{lengths[i]}-{depths[j]}-{s}")
            depth = depths[j] / 100.0
            probe = passkey_probe(depth, rng) if task == "passkey" else needle_probe(depth, rng, needle)
            ids, _ = fit_prompt(tokenizer, probe.build, lengths[i])
            answer = _greedy(model, tokenizer, ids, max_new_tokens)
            value = probe.score(answer)
            score[i][j] += value / samples
            tokens[i][j] += len(ids) / samples
            if len(examples) < keep_examples:
                tail = tokenizer.decode(ids[-24:], skip_special_tokens=True)
                examples.append(
                    {"length": lengths[i], "depth": depths[j], "prompt_end": tail, "answer": answer,
                     "expected": probe.answers, "score": value}
                )  # fmt: skip
    settings = {"max_new_tokens": max_new_tokens, "seed": seed}
    if task == "needle":
        settings.update(vars(needle))
    return RetrievalResult(
        task=task, lengths=lengths, depths=depths, score=score, prompt_tokens=tokens,
        max_positions=max_positions, samples=samples, settings=settings, examples=examples,
    )  # fmt: skip


# --------------------------------------------------------------------------- outputs


def markdown_table(result: RetrievalResult) -> str:
    """The length x depth scores as a markdown table (one row per length, plus a mean column)."""
    head = "| length | " + " | ".join(f"{d:g}%" for d in result.depths) + " | mean |"
    rule = "|---:|" + "---:|" * (len(result.depths) + 1)
    rows = [head, rule]
    for i, n in enumerate(result.lengths):
        mark = " (extrapolation)" if result.extrapolation[i] else ""
        cells = " | ".join(f"{s:.1f}" for s in result.score[i])
        rows.append(f"| {n}{mark} | {cells} | {sum(result.score[i]) / len(result.depths):.1f} |")
    return "\n".join(rows)


def plot_heatmap(result: RetrievalResult, path: str | Path, title: str) -> Path:
    """Write the depth (rows) x length (columns) score heatmap; extrapolated lengths are hatched."""
    from longkd.tools.report import pyplot, save_figure

    plt = pyplot()
    import numpy as np

    grid = np.array(result.score, dtype=float).T  # [depths, lengths]
    fig, ax = plt.subplots(figsize=(1.2 * len(result.lengths) + 3, 0.5 * len(result.depths) + 2.5))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="upper")
    ax.set_xticks(range(len(result.lengths)))
    ax.set_xticklabels(
        [f"{n}\n(extrap.)" if e else str(n) for n, e in zip(result.lengths, result.extrapolation)]
    )
    ax.set_yticks(range(len(result.depths)))
    ax.set_yticklabels([f"{d:g}" for d in result.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (% of the context)")
    for (r, c), value in np.ndenumerate(grid):
        ax.text(c, r, f"{value:.0f}", ha="center", va="center", fontsize=8)
    for c, extrap in enumerate(result.extrapolation):
        if extrap:
            ax.add_patch(plt.Rectangle((c - 0.5, -0.5), 1, len(result.depths), fill=False, hatch="//",
                                       edgecolor="0.3", linewidth=0))  # fmt: skip
    limit = f", position limit {result.max_positions}" if result.max_positions else ""
    ax.set_title(f"{title}\nmean score {result.mean:.1f}%{limit}")
    fig.colorbar(im, ax=ax, label="score (%)")
    return save_figure(fig, path)


def write_outputs(result: RetrievalResult, out_dir: str | Path, *, model_name: str) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``heatmap.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"model": model_name, **result.to_dict()}
    (out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    title = f"{result.task} retrieval: {Path(model_name).name or model_name}"
    (out / "results.md").write_text(f"# {title}\n\nScore (%) by context length and needle depth.\n\n"
                                    f"{markdown_table(result)}\n")  # fmt: skip
    png = plot_heatmap(result, out / "heatmap.png", title)
    return {"json": out / "results.json", "markdown": out / "results.md", "heatmap": png}
