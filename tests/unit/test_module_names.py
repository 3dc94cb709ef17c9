"""No module or package of ours is named like a standard-library or third-party one.

Running a script puts its folder first on ``sys.path`` (``python serve/app.py`` -> ``serve/``), so a sibling
``http.py`` once replaced the standard library's ``http`` and the server died at import. Every ``.py`` file and
every folder holding Python files anywhere in the tree is checked against the standard library's module names
and the top-level names of every installed distribution (except this project's own).
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

SKIP_DIRS = {".git", ".venv", "venv", "artifacts", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}
OWN_DISTRIBUTION = "medrag-ray"


def our_module_names(root: Path) -> dict[str, list[Path]]:
    """Importable names the tree defines: each ``.py`` file's stem and each folder that holds ``.py`` files."""
    names: dict[str, list[Path]] = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts) or any(p.endswith(".egg-info") for p in rel.parts):
            continue
        names.setdefault(path.stem, []).append(rel)
        for parent in rel.parents[:-1]:
            names.setdefault(parent.name, []).append(parent)
    return names


def foreign_top_level_names() -> set[str]:
    """The standard library's modules and the top-level import names of every other installed distribution."""
    names = set(sys.stdlib_module_names)
    for top, dists in importlib.metadata.packages_distributions().items():
        if any(d.lower().replace("_", "-") != OWN_DISTRIBUTION for d in dists):
            names.add(top)
    return names


def test_no_module_of_ours_shadows_another() -> None:
    foreign = foreign_top_level_names()
    assert {"http", "json", "torch", "ray", "yaml"} <= foreign  # the check sees both kinds
    clashes = {name: sorted(map(str, paths)) for name, paths in our_module_names(REPO_ROOT).items()
               if name in foreign and name != "__init__"}
    assert not clashes, f"rename these: they shadow a standard-library or installed module: {clashes}"


def test_the_check_finds_a_clash(tmp_path: Path) -> None:
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "http.py").write_text("")
    assert our_module_names(tmp_path)["http"] == [Path("serve/http.py")]
    assert "http" in foreign_top_level_names()
