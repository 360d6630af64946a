"""Make the repository's top-level packages (export, graphs, plugins, runtime, tests.fixtures)
importable without installing the project."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
