"""Tiny random models saved as Hugging Face directories, and the word-level tokenizer they use.

Nothing in longkd's tests, benchmarks or the README's first run downloads a model: they save
real transformers architectures (``longkd.models``: Llama, Qwen2, Gemma2, Phi3) with random
weights, next to a real fast tokenizer whose vocabulary is the words ``t0 t1 ...``. Saved with
``save_pretrained``, they load back through ``AutoModelForCausalLM`` / ``AutoTokenizer``
exactly like a hub checkpoint.

    from longkd.tools.random_models import save_tiny_model
    path = save_tiny_model("/tmp/teacher", arch="llama", vocab_size=128, seed=0)
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from longkd.models import build_tiny_model, tiny_config

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


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
        arch: see :func:`longkd.models.tiny_config`.
        seed: weight initialisation seed.
        tokenizer_size: tokenizer vocabulary, default the model's ``vocab_size``.
        config_kwargs: passed to :func:`longkd.models.tiny_config`.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    config = tiny_config(arch, **config_kwargs)
    model = build_tiny_model(config, seed)
    model.save_pretrained(out)
    build_word_tokenizer(tokenizer_size or config.vocab_size).save_pretrained(out)
    return out
