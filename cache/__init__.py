"""longkd.cache: pack short samples into long windows, run the teacher once, store its log-probs.

Modules: ``packing`` (windows from samples), ``data`` (datasets loading and tokenizing),
``teacher`` (chunked LM head and selection), ``format`` (names, schema, selection modes and
log-prob encodings), ``rows`` (a window as a shard row: encoded, checked, read back),
``writer`` (background Arrow/zstd shard writer), ``ledger`` (each rank's completed shards),
``manifest`` (manifest.json, build.json, resume), ``manifest_schema`` (the one schema both
are checked against), ``reader`` (read windows back), ``verify``
(integrity checks), ``build`` (the ``longkd cache build`` pipeline). The on-disk format is
docs/format.md.
"""
