"""The repository's layout holds: imports run in one direction, and editors resolve the parts.

Directions (README.md, "Layout"): tools -> trainer -> cache, trainer -> kernels, and every part
-> the ground layer (``longkd/*.py``: errors, models, fileio, devices, distributed). cache never
imports trainer or tools, kernels import only the ground, the ground imports no part, and
only the front doors may import any part: the command line (``longkd/cli.py``,
``longkd/__main__.py``) and the package itself (``longkd/__init__.py``, whose module
``__getattr__`` hands out the public dataset and loss API from trainer/ on first use). Every
import counts, at module level or inside a function, in any of its spellings.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("cache", "trainer", "kernels", "tools")
# longkd/__init__.py is the API's front door: `from longkd import CacheDataset` imports trainer/ lazily
FRONT_DOOR = ("cli.py", "__main__.py", "__init__.py")
GROUND = "ground"

# what each layer may import besides itself
ALLOWED = {
    "cache": {GROUND},
    "kernels": {GROUND},
    "trainer": {"cache", "kernels", GROUND},
    "tools": {"trainer", "cache", "kernels", GROUND},
    GROUND: set(),
}


def _layer_of_file(path: Path) -> str | None:
    """The layer a source file belongs to; None for the front door (it may import anything)."""
    rel = path.relative_to(ROOT)
    if rel.parts[0] in PARTS:
        return rel.parts[0]
    return None if rel.name in FRONT_DOOR else GROUND


def _layer_of_module(module: str) -> str | None:
    """The layer a dotted module name lives in; None when it is not longkd's."""
    parts = module.split(".")
    if parts[0] != "longkd":
        return None
    if len(parts) > 1 and parts[1] in PARTS:
        return parts[1]
    return GROUND


def _package_of(path: Path, root: Path) -> list[str]:
    rel = path.relative_to(root)
    folder = ["longkd"] if rel.parts[0] == "longkd" else ["longkd", rel.parts[0]]
    return folder + list(rel.parts[1:-1])


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """Every longkd module ``path`` imports, as ``(line, dotted name)``, at any nesting level.

    ``from longkd import trainer`` counts as ``longkd.trainer`` (a part), ``from longkd import
    errors`` as ``longkd.errors`` (the ground); relative imports are resolved against the file's
    package (``path`` lies under ``root``, a checkout's top folder).
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(path, root)
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "longkd" or (node.level and not node.module):
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return [(line, name) for line, name in found if name.split(".")[0] == "longkd"]


def source_files() -> list[Path]:
    """Every .py file of the four parts and of longkd/ itself (longkd/<part> symlinks skipped)."""
    files = [p for part in PARTS for p in sorted((ROOT / part).rglob("*.py"))]
    files += [p for p in sorted((ROOT / "longkd").glob("*.py")) if not p.is_symlink()]
    return files


def test_the_checker_sees_every_spelling(tmp_path):
    """The import finder itself, on a file that holds each form once."""
    cache = tmp_path / "cache"
    cache.mkdir()
    sample = cache / "sample.py"
    sample.write_text(
        "import os\n"
        "import longkd.trainer.loop\n"
        "from longkd.tools.inspect import inspect_cache\n"
        "from longkd import trainer, errors\n"
        "def f():\n"
        "    from longkd.kernels import sparse_kl\n"
        "    from . import writer\n"
        "    from .reader import CacheReader\n"
    )
    found = imported_modules(sample, root=tmp_path)
    assert found == [
        (2, "longkd.trainer.loop"),
        (3, "longkd.tools.inspect"),
        (4, "longkd.trainer"),
        (4, "longkd.errors"),
        (6, "longkd.kernels"),
        (7, "longkd.cache.writer"),
        (8, "longkd.cache.reader"),
    ]
    layers = [_layer_of_module(name) for _, name in found]
    assert layers == ["trainer", "tools", "trainer", GROUND, "kernels", "cache", "cache"]


def test_imports_follow_the_layer_directions():
    files = source_files()
    assert ROOT / "longkd" / "errors.py" in files and ROOT / "tools" / "cli.py" in files
    assert not any(p.parent.is_symlink() for p in files)  # each file once, under its real folder
    broken = []
    for path in files:
        layer = _layer_of_file(path)
        if layer is None:
            continue
        for line, module in imported_modules(path):
            target = _layer_of_module(module)
            if target != layer and target not in ALLOWED[layer]:
                broken.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {module} ({target})")
    assert not broken, "imports against the layer directions:\n" + "\n".join(broken)


def test_no_part_below_tools_mentions_longkd_tools():
    """Not even in a string or a comment: cache/, trainer/ and kernels/ know nothing of tools/."""
    hits = []
    for part in ("cache", "trainer", "kernels"):
        for path in sorted((ROOT / part).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".cu"):
                for number, line in enumerate(path.read_text().splitlines(), 1):
                    if "longkd.tools" in line:
                        hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_editors_resolve_part_imports_to_the_root_folders():
    """jedi, following ``from longkd.cache.reader import CacheReader`` in trainer/stream.py,
    lands on cache/reader.py (through the longkd/cache symlink)."""
    jedi = pytest.importorskip("jedi")
    stream = ROOT / "trainer" / "stream.py"
    source = stream.read_text()
    alias = next(
        alias
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module == "longkd.cache.reader"
        for alias in node.names
        if alias.name == "CacheReader"
    )
    script = jedi.Script(source, path=stream, project=jedi.Project(ROOT))
    names = script.goto(alias.lineno, alias.col_offset, follow_imports=True)
    assert names, "jedi found no definition of CacheReader"
    assert {Path(n.module_path).resolve() for n in names} == {ROOT / "cache" / "reader.py"}
    assert {n.type for n in names} == {"class"}


def test_every_part_folder_is_reached_through_its_symlink():
    """longkd/<part> are relative symlinks to the root folders, tracked by git as links."""
    for part in PARTS:
        link = ROOT / "longkd" / part
        assert link.is_symlink() and link.resolve() == ROOT / part
    tracked = subprocess.run(
        ["git", "ls-files", "-s", *(f"longkd/{p}" for p in PARTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    modes = {line.split()[0] for line in tracked.stdout.splitlines()}
    assert modes == {"120000"}, tracked.stdout
