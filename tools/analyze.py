"""Where does position live in a model? Two probes of how RoPE is used.

    longkd analyze perturb MODEL [--length 256 --repeats 2 --deltas 0,1,16,256 --windows 4]
    longkd analyze qdrift BEFORE AFTER [--train-length L]

``perturb``: windows of random tokens in which a span repeats (a copy task every causal LM
solves with induction heads). The rotary positions of the queries only, the keys only, or
both are shifted by ``delta``; the effect is traced layer by layer (relative change of the
residual stream after each decoder layer) and to the output (KL of the perturbed to the
unperturbed next-token distribution, and copy accuracy). Shifting both is a no-op for
relative RoPE, so it is the control; a query-only shift moves every query ``delta`` tokens
away from its keys, which shows how sharply the model reads relative distance.

The shift is applied where attention rotates q and k: the modelling module's
``apply_rotary_pos_emb(q, k, cos, sin)`` is wrapped for the duration of the forward so that
q and/or k are rotated with the cos/sin of the shifted position ids (computed by the
model's own rotary embedding, so scaled RoPE is honoured). Supported: architectures whose
attention calls that function with one rotary embedding shared by all layers, i.e. the
Llama family (llama, mistral, qwen2, qwen3, phi3 incl. partial rotary, gemma2, ...); others
raise :class:`~longkd.errors.LongkdError`.

``qdrift``: which RoPE frequencies did training touch? For each layer and frequency pair i
(dims i and i + r/2 of each head in the HF rotate_half convention, r the rotary dim), the
relative change ||W_after - W_before|| / ||W_before|| of the q_proj and k_proj rows (bias
included) feeding that pair, averaged over heads. Distillation at a long window is expected
to move the low-frequency pairs whose wavelength 2*pi/inv_freq is near the training length.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from longkd.errors import LongkdError

log = logging.getLogger(__name__)

MODES = ("q", "k", "both")


# --------------------------------------------------------------------------- model anatomy


def _decoder(model):
    """The decoder body (``model.model`` for HF causal LMs) with ``layers`` and ``rotary_emb``."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    if not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
        raise LongkdError(
            f"{type(model).__name__} has no decoder layers with a shared rotary embedding; "
            "use a Llama-family model (llama, mistral, qwen2, qwen3, phi3, gemma2)"
        )
    return body


def _rope_function_module(attn):
    """The module whose global ``apply_rotary_pos_emb`` this attention class calls."""
    module = sys.modules[type(attn).__module__]
    try:
        source = inspect.getsource(type(attn).forward)
    except (OSError, TypeError):
        source = ""
    if "apply_rotary_pos_emb(" not in source or not callable(getattr(module, "apply_rotary_pos_emb", None)):
        raise LongkdError(
            f"{type(attn).__name__} does not rotate q and k through apply_rotary_pos_emb; "
            "perturb supports Llama-family attention (llama, mistral, qwen2, qwen3, phi3, gemma2)"
        )
    return module


@contextmanager
def shifted_rope(model, position_ids: torch.Tensor, delta: int, mode: str):
    """Inside this context, the model rotates q and/or k as if their positions were ``+ delta``.

    Args:
        model: a Llama-family causal LM.
        position_ids: Long[B, T], the positions the forward will be called with.
        delta: the shift in positions.
        mode: ``q`` (queries only), ``k`` (keys only) or ``both``.

    Yields:
        A dict whose ``calls`` counts the rotations replaced (one per layer per forward).

    Raises:
        LongkdError: an unknown mode or an unsupported architecture.
    """
    if mode not in MODES:
        raise LongkdError(f"perturbation mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    body = _decoder(model)
    modules = {id(m): m for m in (_rope_function_module(layer.self_attn) for layer in body.layers)}
    param = next(model.parameters())
    with torch.no_grad():
        # The model's own rotary embedding: rope scaling and attention scaling come with it.
        cos_s, sin_s = body.rotary_emb(torch.empty(0, dtype=param.dtype, device=param.device),
                                       position_ids + delta)  # fmt: skip
    state = {"calls": 0}
    originals = {key: m.apply_rotary_pos_emb for key, m in modules.items()}

    def wrap(original):
        def apply(q, k, cos, sin, *args, **kwargs):
            q_out, k_out = original(q, k, cos, sin, *args, **kwargs)
            if cos.shape != cos_s.shape:  # another model, or a call we did not set up for
                return q_out, k_out
            q_shift, k_shift = original(q, k, cos_s.to(cos.dtype), sin_s.to(sin.dtype), *args, **kwargs)
            state["calls"] += 1
            return (q_shift if mode in ("q", "both") else q_out), (
                k_shift if mode in ("k", "both") else k_out
            )

        return apply

    try:
        for key, m in modules.items():
            m.apply_rotary_pos_emb = wrap(originals[key])
        yield state
    finally:
        for key, m in modules.items():
            m.apply_rotary_pos_emb = originals[key]


def _forward_trace(model, input_ids, position_ids):
    """Logits [B, T, V] (fp32) and the residual stream after each layer, a list of [B, T, d]."""
    outs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(
            lambda _m, _i, o: outs.append((o[0] if isinstance(o, tuple) else o).float())
        )
        for layer in _decoder(model).layers
    ]
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.float()
    finally:
        for h in hooks:
            h.remove()
    return logits, outs


# --------------------------------------------------------------------------- perturb


def repeated_windows(
    windows: int, length: int, repeats: int, vocab: Sequence[int] | int, seed: int = 0
) -> torch.Tensor:
    """Windows of a random span repeated ``repeats`` times: Long[windows, length].

    Args:
        windows: number of windows.
        length: tokens per window; the span is ``length // repeats`` tokens (a remainder is
            filled by the start of one more copy).
        repeats: copies of the span per window (2: a span then the same span again).
        vocab: the token ids to draw from, or a vocabulary size.
        seed: the draw.
    """
    if repeats < 2:
        raise LongkdError(f"--repeats must be at least 2 (a span and its copy), got {repeats}")
    span = length // repeats
    if span < 1:
        raise LongkdError(f"--length {length} is too short for {repeats} repeats")
    pool = torch.arange(vocab) if isinstance(vocab, int) else torch.as_tensor(list(vocab))
    gen = torch.Generator().manual_seed(seed)
    draw = pool[torch.randint(len(pool), (windows, span), generator=gen)]
    return draw.repeat(1, repeats + 1)[:, :length].contiguous()


def perturb(
    model,
    *,
    length: int = 256,
    repeats: int = 2,
    deltas: Sequence[int] = (0, 1, 16, 256),
    windows: int = 4,
    modes: Sequence[str] = MODES,
    vocab: Sequence[int] | int | None = None,
    seed: int = 0,
) -> dict:
    """Shift the rotary positions of q, k or both and trace the effect through the layers.

    Measured over the copy region (every position after the first copy of the span):
    ``rel_change[l]`` is the mean over windows and positions of ||h' - h|| / ||h|| for the
    residual stream h after layer l; ``kl`` the mean KL(p' || p) of the perturbed to the
    unperturbed next-token distribution; ``accuracy`` the fraction of copy-region next tokens
    predicted by argmax (the last position, which has no next token, is left out).

    Args:
        model: a Llama-family causal LM (eval mode).
        length: tokens per window.
        repeats: copies of the random span per window.
        deltas: position shifts.
        windows: windows in the batch.
        modes: which of ``q``, ``k``, ``both`` to shift.
        vocab: ids to draw tokens from (default all ids of the embedding).
        seed: window draw.

    Returns:
        A JSON-ready dict with the settings, ``baseline_accuracy`` and ``results``: one entry
        per (mode, delta) with ``rel_change`` (a list over layers), ``kl`` and ``accuracy``.
    """
    if length < 4:
        raise LongkdError(f"--length must be at least 4, got {length}")
    if windows < 1:
        raise LongkdError(f"--windows must be at least 1, got {windows}")
    if not deltas or any(int(d) < 0 for d in deltas):
        raise LongkdError(f"--deltas must be non-negative integers, got {list(deltas)}")
    body = _decoder(model)
    config = model.config.get_text_config()
    ids = repeated_windows(windows, length, repeats, vocab if vocab is not None else config.vocab_size, seed)
    param = next(model.parameters())
    ids = ids.to(param.device)
    pos = torch.arange(length, device=param.device).expand(windows, length)
    span = length // repeats
    base_logits, base_hidden = _forward_trace(model, ids, pos)
    base_logp = torch.log_softmax(base_logits[:, span:], dim=-1)  # [B, T - span, V]

    def accuracy(logits):
        pred = logits[:, span:-1].argmax(-1)
        return float((pred == ids[:, span + 1 :]).float().mean())

    results = []
    for mode in modes:
        for delta in deltas:
            with shifted_rope(model, pos, int(delta), mode) as state:
                logits, hidden = _forward_trace(model, ids, pos)
            if state["calls"] != len(body.layers):
                raise RuntimeError(
                    f"expected {len(body.layers)} rotations to be shifted, saw {state['calls']}"
                )
            rel = []
            for h0, h1 in zip(base_hidden, hidden):
                num = (h1[:, span:] - h0[:, span:]).norm(dim=-1)
                rel.append(float((num / h0[:, span:].norm(dim=-1).clamp_min(1e-30)).mean()))
            logp = torch.log_softmax(logits[:, span:], dim=-1)
            kl = float((logp.exp() * (logp - base_logp)).sum(-1).clamp_min(0).mean())
            results.append({"mode": mode, "delta": int(delta), "rel_change": rel, "kl": kl,
                            "accuracy": accuracy(logits)})  # fmt: skip
    return {
        "model_type": config.model_type,
        "length": length,
        "span": span,
        "repeats": repeats,
        "windows": windows,
        "deltas": [int(d) for d in deltas],
        "layers": len(body.layers),
        "baseline_accuracy": accuracy(base_logits),
        "results": results,
    }


def perturb_table(report: dict) -> str:
    """A markdown table: one row per (mode, delta), KL, accuracy and the per-layer changes."""
    n = report["layers"]
    head = "| shift | delta | KL (nats) | copy acc. | " + " | ".join(f"L{i}" for i in range(n)) + " |"
    rows = [head, "|---|---:|---:|---:|" + "---:|" * n]
    for r in report["results"]:
        layers = " | ".join(f"{x:.3g}" for x in r["rel_change"])
        rows.append(f"| {r['mode']} | {r['delta']} | {r['kl']:.4g} | {r['accuracy']:.3f} | {layers} |")
    return "\n".join(rows)


def plot_perturb(report: dict, path: str | Path, title: str) -> Path:
    """Per-layer relative change for each shift (one panel per mode) and KL against delta.

    Log axes; exact zeros (delta 0) are drawn at the floor values so they stay visible.
    """
    from matplotlib.ticker import MaxNLocator

    from longkd.tools.report import pyplot, save_figure

    plt = pyplot()
    floor_h, floor_kl = 1e-9, 1e-12
    modes = list(dict.fromkeys(r["mode"] for r in report["results"]))
    fig, axes = plt.subplots(1, len(modes) + 1, figsize=(4.2 * (len(modes) + 1), 4))
    layers = list(range(report["layers"]))
    for ax, mode in zip(axes, modes):
        for r in (r for r in report["results"] if r["mode"] == mode):
            ax.plot(
                layers, [max(x, floor_h) for x in r["rel_change"]], marker="o", label=f"delta {r['delta']}"
            )
        ax.set_yscale("log")
        ax.set_title(f"shift {'q and k (control)' if mode == 'both' else mode + ' only'}")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("||h' - h|| / ||h||, copy region")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    top = max(max(max(r["rel_change"]) for r in report["results"]), floor_h) * 3
    for ax in axes[: len(modes)]:
        ax.set_ylim(floor_h / 3, top)
    ax = axes[-1]
    for mode in modes:
        rs = [r for r in report["results"] if r["mode"] == mode]
        ax.plot(
            [r["delta"] for r in rs], [max(r["kl"], floor_kl) for r in rs], marker="o", label=f"shift {mode}"
        )
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("log")
    ax.set_xlabel("delta (positions)")
    ax.set_ylabel("KL(perturbed || original), nats/token")
    ax.set_title("effect on the output (copy region)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\n(values below {floor_h:g} / {floor_kl:g} drawn at that floor)")
    return save_figure(fig, path)


# --------------------------------------------------------------------------- qdrift


def _inv_freq(model) -> torch.Tensor:
    rotary = _decoder(model).rotary_emb
    inv = getattr(rotary, "inv_freq", None)
    if inv is None:
        raise LongkdError(f"{type(model).__name__}'s rotary embedding has no inv_freq; qdrift needs RoPE")
    return inv.detach().float().cpu()


def _qk_rows(attn, config) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k projection rows with the bias as an extra column: [H*hd, d(+1)], [KV*hd, d(+1)]."""

    def rows(linear, lo=None, hi=None):
        w = linear.weight.detach().float()
        b = linear.bias.detach().float() if linear.bias is not None else None
        w = w[lo:hi]
        return torch.cat([w, b[lo:hi, None]], dim=1) if b is not None else w

    if hasattr(attn, "q_proj") and hasattr(attn, "k_proj"):
        return rows(attn.q_proj), rows(attn.k_proj)
    if hasattr(attn, "qkv_proj"):  # phi3: fused [q; k; v] rows
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        nq = config.num_attention_heads * head_dim
        nk = config.num_key_value_heads * head_dim
        return rows(attn.qkv_proj, 0, nq), rows(attn.qkv_proj, nq, nq + nk)
    raise LongkdError(
        f"{type(attn).__name__} has no q_proj/k_proj (or qkv_proj); qdrift cannot find the rows"
    )


def pair_drift(before: torch.Tensor, after: torch.Tensor, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Relative change per RoPE frequency pair, averaged over heads.

    Args:
        before, after: projection rows [heads * head_dim, d_in].
        head_dim: rows per head.
        rotary_dim: r, the rotated dims at the start of each head (pairs are (i, i + r/2)).

    Returns:
        Float[r/2]: mean over heads of ||after_i - before_i|| / ||before_i||, where ``_i`` is
        the two rows of pair i in that head.
    """
    half = rotary_dim // 2
    b = before.reshape(-1, head_dim, before.shape[-1])
    a = after.reshape(-1, head_dim, after.shape[-1])
    b = torch.stack([b[:, :half], b[:, half:rotary_dim]], dim=2)  # [H, r/2, 2, d_in]
    a = torch.stack([a[:, :half], a[:, half:rotary_dim]], dim=2)
    num = (a - b).flatten(2).norm(dim=-1)
    den = b.flatten(2).norm(dim=-1).clamp_min(1e-30)
    return (num / den).mean(dim=0)


def qdrift(before_model, after_model, *, train_length: int | None = None) -> dict:
    """Per layer and RoPE frequency pair, how far q_proj and k_proj rows moved.

    Args:
        before_model, after_model: two causal LMs of the same shape (e.g. a student before and
            after distillation).
        train_length: the length whose pair is marked (the pair with 2*pi/inv_freq closest to
            it on a log scale); default the AFTER model's ``max_position_embeddings``.

    Returns:
        A JSON-ready dict: ``q`` and ``k`` as [layers][pairs] lists, ``inv_freq`` and
        ``wavelength`` per pair (of the AFTER model, its rope scaling included), the marked
        pair, and per-layer means.

    Raises:
        LongkdError: the models differ in shape or have no RoPE.
    """
    cfg_b = before_model.config.get_text_config()
    cfg_a = after_model.config.get_text_config()
    layers_b, layers_a = _decoder(before_model).layers, _decoder(after_model).layers
    if len(layers_b) != len(layers_a):
        raise LongkdError(
            f"BEFORE has {len(layers_b)} layers and AFTER {len(layers_a)}; compare the same model"
        )
    inv = _inv_freq(after_model)
    rotary_dim = 2 * inv.numel()
    head_dim = getattr(cfg_a, "head_dim", None) or cfg_a.hidden_size // cfg_a.num_attention_heads
    q_rows, k_rows = [], []
    for lb, la in zip(layers_b, layers_a):
        qb, kb = _qk_rows(lb.self_attn, cfg_b)
        qa, ka = _qk_rows(la.self_attn, cfg_a)
        if qb.shape != qa.shape or kb.shape != ka.shape:
            raise LongkdError(f"q/k projection shapes differ ({tuple(qb.shape)} vs {tuple(qa.shape)}); "
                              "compare two checkpoints of the same model")  # fmt: skip
        q_rows.append(pair_drift(qb, qa, head_dim, rotary_dim).tolist())
        k_rows.append(pair_drift(kb, ka, head_dim, rotary_dim).tolist())
    wavelength = (2 * math.pi / inv).tolist()
    if train_length is None:
        train_length = getattr(cfg_a, "max_position_embeddings", None)
    marked = None
    if train_length:
        logs = [abs(math.log(w) - math.log(train_length)) for w in wavelength]
        marked = min(range(len(logs)), key=logs.__getitem__)
    return {
        "layers": len(q_rows),
        "pairs": rotary_dim // 2,
        "head_dim": head_dim,
        "rotary_dim": rotary_dim,
        "inv_freq": inv.tolist(),
        "wavelength": wavelength,
        "train_length": train_length,
        "marked_pair": marked,
        "q": q_rows,
        "k": k_rows,
        "q_layer_mean": [sum(r) / len(r) for r in q_rows],
        "k_layer_mean": [sum(r) / len(r) for r in k_rows],
    }


def qdrift_table(report: dict) -> str:
    """A markdown table per layer: mean drift, the most-moved pair and the drift at the marked pair."""
    m = report["marked_pair"]
    head = "| layer | q mean | k mean | q top pair (wavelength) | k top pair (wavelength) |"
    if m is not None:
        head += f" q at pair {m} | k at pair {m} |"
    rows = [head, "|---:|---:|---:|---|---|" + ("---:|---:|" if m is not None else "")]
    wl = report["wavelength"]
    for i, (q, k) in enumerate(zip(report["q"], report["k"])):
        qi = max(range(len(q)), key=q.__getitem__)
        ki = max(range(len(k)), key=k.__getitem__)
        row = (f"| {i} | {report['q_layer_mean'][i]:.4g} | {report['k_layer_mean'][i]:.4g} | "
               f"{qi} ({wl[qi]:.4g}) | {ki} ({wl[ki]:.4g}) |")  # fmt: skip
        if m is not None:
            row += f" {q[m]:.4g} | {k[m]:.4g} |"
        rows.append(row)
    return "\n".join(rows)


def plot_qdrift(report: dict, path: str | Path, title: str) -> Path:
    """Layers x pairs heatmaps for q and k; the pair matching the training length is marked.

    The top axis labels a few pairs with their wavelength 2*pi/inv_freq in tokens.
    """
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    from longkd.tools.report import pyplot, save_figure

    plt = pyplot()
    pairs, wl = report["pairs"], report["wavelength"]
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 0.25 * pairs + 7), 0.35 * report["layers"] + 3.4))
    vmax = max(max(max(r) for r in report["q"]), max(max(r) for r in report["k"])) or 1.0
    ticks = sorted({int(round(x)) for x in np.linspace(0, pairs - 1, min(pairs, 6))})
    for ax, key in zip(axes, ("q", "k")):
        im = ax.imshow(np.array(report[key]), aspect="auto", cmap="magma", vmin=0, vmax=vmax, origin="lower")
        ax.set_title(f"{key}_proj")
        ax.set_xlabel("RoPE frequency pair i (high -> low frequency)")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        top = ax.secondary_xaxis("top")
        top.set_xticks(ticks)
        top.set_xticklabels([f"{wl[i]:.3g}" for i in ticks], fontsize=7)
        top.set_xlabel("wavelength 2*pi/inv_freq (tokens)", fontsize=8)
        if report["marked_pair"] is not None:
            m = report["marked_pair"]
            ax.axvline(
                m, color="cyan", linestyle="--", label=f"pair {m}: wavelength ~ {report['train_length']}"
            )
            ax.legend(fontsize=7, loc="lower left")
        fig.colorbar(im, ax=ax, label="||W_after - W_before|| / ||W_before||")
    fig.suptitle(title)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- shared


def write_report(report: dict, out_dir: str | Path, name: str, table: str, plot) -> dict[str, Path]:
    """Write ``{name}.json``, ``{name}.md`` and ``{name}.png`` (drawn by ``plot(report, path)``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(table + "\n")
    png = plot(report, out / f"{name}.png")
    return {"json": out / f"{name}.json", "markdown": out / f"{name}.md", "plot": png}
