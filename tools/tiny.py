"""Tiny, randomly initialised transformers models and a word-level tokenizer, built offline.

Nothing in longkd's tests or demo downloads a model: they build real transformers
architectures (Llama, Qwen2, Gemma2, Phi3) from small configs and a real fast tokenizer
whose vocabulary is the words ``t0 t1 ...``. Saved with ``save_pretrained`` they load back
through ``AutoModelForCausalLM`` / ``AutoTokenizer`` exactly like a hub checkpoint.

    from longkd.tools.tiny import save_tiny_model
    path = save_tiny_model("/tmp/teacher", arch="llama", vocab_size=128, seed=0)
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
ARCHITECTURES = ("llama", "qwen2", "gemma2", "phi3")


def build_word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: ids 0-3 are <pad> <s> </s> <unk>, id i >= 4 is ``t{i}``.

    Args:
        vocab_size: total number of ids, special tokens included (at least 8).

    Returns:
        A fast tokenizer; ``tokenizer("t5 t9").input_ids == [5, 9]`` (no BOS is added).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if vocab_size < 8:
        raise ValueError(f"vocab_size must be at least 8, got {vocab_size}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def ids_to_text(ids) -> str:
    """The text that :func:`build_word_tokenizer` tokenizes back to ``ids``."""
    return " ".join(f"t{int(i)}" for i in ids)


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
        overrides: any other config attribute.

    Raises:
        ValueError: an unknown architecture.
    """
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
    """A randomly initialised causal LM for ``config``, deterministic for ``seed``, in fp32."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float().eval()


def save_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    tokenizer_size: int | None = None,
    **config_kwargs,
) -> Path:
    """Build a tiny model and its tokenizer and save both as a Hugging Face model directory.

    Args:
        out_dir: where to write ``config.json``, the weights and the tokenizer files.
        arch: see :func:`tiny_config`.
        seed: weight initialisation seed.
        tokenizer_size: tokenizer vocabulary, default the model's ``vocab_size``.
        config_kwargs: passed to :func:`tiny_config`.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    config = tiny_config(arch, **config_kwargs)
    model = build_tiny_model(config, seed)
    model.save_pretrained(out)
    build_word_tokenizer(tokenizer_size or config.vocab_size).save_pretrained(out)
    return out
