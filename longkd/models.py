"""Model construction and the LM head, shared by the teacher run, the trainer and the tools.

Two things every part needs and no part owns:

- fresh, randomly initialised models of real transformers architectures from a small config
  (the trainer's ``init: {arch: llama, hidden_size: ..., seed: 0}``, the tests, the toy world):
  :data:`ARCHITECTURES`, :func:`tiny_config`, :func:`build_tiny_model`;
- :func:`lm_head_logits`, the model's LM head plus its own logit post-processing, so that the
  teacher's cached logits and the student's trained ones go through the same head code.

transformers is imported inside the functions: importing this module costs only torch.

    from longkd.models import build_tiny_model, tiny_config
    model = build_tiny_model(tiny_config("llama", vocab_size=128, hidden_size=32), seed=0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

ARCHITECTURES = ("llama", "qwen2", "gemma2", "phi3")


def tiny_config(
    arch: str = "llama",
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    rope_theta: float = 10000.0,
    **overrides,
) -> PretrainedConfig:
    """A small config of a real architecture.

    Args:
        arch: one of ``llama``, ``qwen2``, ``gemma2`` (final-logit softcapping, sliding window
            layers) or ``phi3`` (fused qkv; ``partial_rotary_factor`` may be passed).
        vocab_size: the embedding size (may exceed the tokenizer's, like a padded embedding).
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: the sizes
            (``num_kv_heads`` defaults to ``num_heads``, ``intermediate_size`` to twice the
            hidden size).
        max_position_embeddings: the position limit.
        rope_theta: the RoPE base (``rope_type`` default).
        overrides: any other config attribute.

    Returns:
        The transformers config (pad, BOS and EOS ids 0, 1, 2; untied embeddings).

    Raises:
        ValueError: an unknown architecture.
    """
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    if arch == "gemma2":
        kwargs.update(
            head_dim=hidden_size // num_heads,
            final_logit_softcapping=5.0,
            attn_logit_softcapping=50.0,
            sliding_window=max_position_embeddings,
            query_pre_attn_scalar=hidden_size // num_heads,
        )
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def build_tiny_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM for ``config``, deterministic for ``seed``.

    Args:
        config: e.g. from :func:`tiny_config`.
        seed: passed to ``torch.manual_seed`` before the weights are drawn (the global RNG
            is left advanced).

    Returns:
        The model in fp32, eval mode, eager attention.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float().eval()


def lm_head_logits(model, hidden: torch.Tensor, *, float32: bool = False) -> torch.Tensor:
    """The model's LM head followed by its own logit post-processing.

    Reproduces what ``model.forward`` does after the decoder body (:func:`logit_postprocess`
    lists the families).

    Args:
        model: a transformers causal LM.
        hidden: [..., d] final hidden states (after the decoder's last norm).
        float32: cast the head's output to fp32 before post-processing (the teacher does, so
            softcapping and scaling are computed in fp32; the model itself uses its dtype).

    Returns:
        [..., V] logits.
    """
    logits = model.get_output_embeddings()(hidden)
    if float32:
        logits = logits.float()
    post = logit_postprocess(model)
    return logits if post is None else post(logits)


def logit_postprocess(model) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the model does to its LM head's output, as a function of the raw logits (None: nothing).

    Per architecture family: Cohere ``logits * logit_scale``; Granite ``logits / logits_scaling``
    (HyperCLOVA X multiplies instead, MiniCPM3 divides the hidden states, the same for a
    bias-free head); Gemma 2/3 and others ``tanh(logits / cap) * cap`` with
    ``final_logit_softcapping``. The trainer's fused LM-head loss applies it chunk by chunk.

    Args:
        model: a transformers causal LM.

    Returns:
        An elementwise, differentiable map of [..., V] logits, or None.
    """
    config = model.config.get_text_config()
    steps = []
    scale = getattr(model, "logit_scale", None)  # Cohere keeps a plain number on the model
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:
        steps.append(lambda z: z * scale)
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling != 1:
        if config.model_type == "hyperclovax":
            steps.append(lambda z: z * scaling)
        else:
            steps.append(lambda z: z / scaling)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        steps.append(lambda z: torch.tanh(z / cap) * cap)
    if not steps:
        return None

    def post(logits: torch.Tensor) -> torch.Tensor:
        for step in steps:
            logits = step(logits)
        return logits

    return post
