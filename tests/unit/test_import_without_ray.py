"""The layout principle: ``medrag_ray`` is a pure core that never imports ray."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    class BlockRay(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ImportError(f"ray is not importable in this test (tried {name})")
            return None

    sys.meta_path.insert(0, BlockRay())
    import medrag_ray
    names = ["medrag_ray"]
    for info in pkgutil.walk_packages(medrag_ray.__path__, "medrag_ray."):
        importlib.import_module(info.name)
        names.append(info.name)
    assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules), "ray got imported"
    print(len(names))
    print("\\n".join(names))
    """
)


def test_every_core_module_imports_without_ray() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    count, names = int(lines[0]), lines[1:]
    assert count == len(names)
    # The walk must really have reached the sub-packages, not stopped at the top.
    assert "medrag_ray.config" in names
    assert "medrag_ray.data.schema" in names
