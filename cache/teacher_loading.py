"""Facts read off a Hugging Face checkpoint around loading it as a teacher.

``Teacher.load`` must tell a local directory from a hub id (to give a clear error for a
mistyped path instead of a network lookup), refuse models without a causal-LM class before
downloading weights, and afterwards read the position limit and the logits width, whose
config keys differ between architecture families. These small probes live here so that the
teacher module holds the run itself.
"""

from __future__ import annotations

from pathlib import Path


def looks_local(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a filesystem path."""
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).expanduser().exists()
    )


def is_causal_lm(config, trust_remote_code: bool) -> bool:
    """Whether transformers (or, when trusted, the checkpoint's own code) has a causal-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    auto_map = getattr(config, "auto_map", None) or {}
    return trust_remote_code and "AutoModelForCausalLM" in auto_map


def max_positions(config) -> int | None:
    """The longest sequence the (text) config declares, under whichever key its family uses."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def embedding_size(model) -> int:
    """V, the width of the model's logits (may exceed ``len(tokenizer)`` in padded vocabularies)."""
    head = model.get_output_embeddings()
    if isinstance(getattr(head, "out_features", None), int):
        return int(head.out_features)
    if getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)
