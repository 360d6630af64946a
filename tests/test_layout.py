"""The package layout: one import namespace, `llamaforge.*`, over the top-level stage folders."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_namespace_outside_the_repository(tmp_path: Path) -> None:
    """From a folder outside the checkout, the stages import as `llamaforge.<stage>` and the generic
    top-level names (`runtime`, `export`, ...) are not importable at all."""
    code = """
import importlib, json
found = {}
for name in ("llamaforge.runtime", "llamaforge.runtime.core.engine_core", "llamaforge.export.checkpoint",
             "llamaforge.graphs.pipeline", "llamaforge.plugins.attention.schema", "llamaforge.triton_repo.repository",
             "runtime", "export", "graphs", "plugins", "triton_repo"):
    try:
        importlib.import_module(name)
        found[name] = True
    except ModuleNotFoundError:
        found[name] = False
print(json.dumps(found))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import json

    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert {k: v for k, v in found.items() if k.startswith("llamaforge")} == {
        k: True for k in found if k.startswith("llamaforge")}
    assert {k: v for k, v in found.items() if not k.startswith("llamaforge")} == {
        k: False for k in found if not k.startswith("llamaforge")}


def test_every_package_folder_is_declared() -> None:
    """pyproject.toml lists the packages explicitly (package-dir maps them onto the stage folders):
    a new subpackage that is not listed would be missing from a normal install."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(tool["packages"])
    roots = tool["package-dir"]
    on_disk = set()
    for package, folder in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([package, *rel.parts]))
    assert on_disk == declared


def test_no_sys_path_edits_in_sources() -> None:
    """Nothing makes the package importable by editing sys.path: it is installed (make venv)."""
    offenders = []
    for folder in ("llamaforge", "export", "graphs", "plugins", "runtime", "triton_repo", "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                if ("sys.path." + "insert") in line or ("sys.path." + "append") in line:
                    offenders.append(str(path.relative_to(ROOT)))
    # The Triton stand-in test appends a model's version folder, as Triton's Python backend does.
    assert offenders == ["tests/triton_repo/test_triton_repo.py"], offenders
