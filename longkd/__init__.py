"""longkd: an offline teacher-logit cache plus a lightweight student trainer.

A long-context teacher runs once over short samples packed into long windows and its
per-position log-probs are cached (``longkd cache build``); many students are then
distilled from that cache (``longkd train``). See README.md for the commands.

To use a cache from a training loop of your own, the public API is importable from here:

    from longkd import CacheDataset, collate_windows, check_model_fits, SparseKLLoss
    from longkd import sparse_kl_loss, fused_sparse_kl_loss, CacheReadError, LongkdError

Each name is imported on first use, so ``import longkd`` (and ``longkd --help``) stays free
of torch.
"""

__version__ = "0.1.0"

_DATASET = ("CacheDataset", "CacheReadError", "WindowItem", "collate_windows", "check_model_fits")
_LOSS = ("SparseKLLoss", "sparse_kl_loss", "fused_sparse_kl_loss")

__all__ = ["LongkdError", *_DATASET, *_LOSS, "__version__"]


def __getattr__(name: str):
    # The package is also the API's front door: these imports reach into trainer/ on purpose
    # (tests/test_layout.py lists this file with the command-line front door).
    if name in _DATASET:
        from longkd.trainer import dataset as module
    elif name in _LOSS:
        from longkd.trainer import loss_api as module
    elif name == "LongkdError":
        from longkd import errors as module
    else:
        raise AttributeError(f"module 'longkd' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
