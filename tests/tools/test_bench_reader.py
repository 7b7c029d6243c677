"""tools/bench_reader.py end to end on a tiny cache of each encoding: it builds the cache,
reads it back through every path it times, and prints its tables."""

from __future__ import annotations

import pytest

from longkd.tools import bench_reader


@pytest.mark.parametrize("encoding", ["compact", "plain"])
def test_bench_reader_runs_on_each_encoding(encoding, tmp_path, capsys):
    argv = ["--windows", "3", "--window", "32", "--top-k", "8", "--vocab", "300", "--batch-size", "2"]
    argv += ["--repeats", "1", "--rounds", "2", "--encoding", encoding, "--workdir", str(tmp_path)]
    assert bench_reader.main(argv) == 0
    out = capsys.readouterr().out
    assert f"W=32, top-k 8, vocab 300, {encoding} columns" in out
    rows = [line for line in out.splitlines() if line.startswith(("| CacheReader", "| checksum"))]
    assert len(rows) == 3
