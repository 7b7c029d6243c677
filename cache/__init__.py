"""longkd.cache: pack short samples into long windows, run the teacher once, store its log-probs.

Modules: ``packing`` (windows from samples), ``data`` (datasets loading and tokenizing),
``teacher`` (chunked LM head and selection), ``writer`` (background Arrow/zstd shard writer),
``manifest`` (the cache ledger), ``reader`` (read windows back), ``verify`` (integrity checks),
``build`` (the ``longkd cache build`` pipeline). The on-disk format is docs/format.md.
"""
