"""Identity fingerprints of a teacher: its config, its weights and its tokenizer.

A cache is only valid for the exact teacher and tokenizer that produced it, so the manifest
and ``build.json`` record these hashes; a resumed build refuses a different teacher, and the
trainer and the tools refuse a tokenizer whose ids differ from the cache's. The hashes live
apart from the teacher run because consumers that never load a teacher (the trainer's stream,
``longkd cache inspect``) check the tokenizer fingerprint too.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

# Config keys that change with the software or the loading call, not with the model.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "use_cache"}
_HASH_CHUNK = 1 << 24  # elements converted to fp32 at a time while hashing weights


def canonical_json(obj: Any) -> bytes:
    """``obj`` as compact JSON with sorted keys (UTF-8 bytes), so equal content hashes equally."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def _stable_config(obj: Any) -> Any:
    """A config dict without keys that change with the software or the loading call."""
    if isinstance(obj, dict):
        return {
            k: _stable_config(v)
            for k, v in obj.items()
            if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS
        }
    if isinstance(obj, (list, tuple)):
        return [_stable_config(v) for v in obj]
    return obj


def config_sha256(config) -> str:
    """sha256 of the config's ``to_dict()`` as canonical JSON, volatile keys removed."""
    return hashlib.sha256(canonical_json(_stable_config(config.to_dict()))).hexdigest()


def weights_sha256(model) -> str:
    """sha256 over the state dict: for each name in sorted order, the name, the shape and the
    tensor's values as little-endian fp32 bytes. One streaming pass over the weights; at most
    ``2**24`` elements are converted at a time, so no second copy of a large tensor is made.
    A tensor-parallel model's shards are gathered one tensor at a time (every rank of its group
    calls this together), so it hashes as the same model loaded whole.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        if hasattr(tensor, "full_tensor"):  # a torch DTensor
            tensor = tensor.full_tensor()
        digest.update(canonical_json([name, list(tensor.shape)]))
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), _HASH_CHUNK):
            part = flat[start : start + _HASH_CHUNK].to(device="cpu", dtype=torch.float32)
            digest.update(part.numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the canonical JSON of the vocabulary, the special tokens map and the added
    tokens (content and special flag per id). Equal fingerprints mean equal token ids."""
    added = {
        str(i): {"content": str(tok), "special": bool(getattr(tok, "special", False))}
        for i, tok in tokenizer.added_tokens_decoder.items()
    }
    payload = {
        "vocab": dict(sorted(tokenizer.get_vocab().items())),
        "special_tokens": tokenizer.special_tokens_map,
        "added_tokens": added,
    }
    return hashlib.sha256(canonical_json(payload)).hexdigest()
