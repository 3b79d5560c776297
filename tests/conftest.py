"""Shared by every test folder: put tests/ on the path for ``engines``.

The repository root must not be on the path: its ``kernels/`` folder (installed as
``kvbridge.kernels``) would shadow Hugging Face's ``kernels`` package, which
transformers >= 5.25 imports at start. ``python -m pytest`` puts the working
directory first, so drop it here (``make test`` runs the ``pytest`` script, which
does not add it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or os.curdir)) != _ROOT]
sys.path.insert(0, str(_HERE))
