"""Benchmark scripts: run them as `python -m llmc.benchmarks.NAME` (from any folder).

The repository root is the package `llmc`; where it sits on sys.path (as `python -m` puts the
working directory there), its `kernels/` shadows Hugging Face's `kernels` package, which
transformers imports. Nothing here needs the root on sys.path, so it is taken off, and the
benchmarks' child processes (servers, reference runs) start with PYTHONSAFEPATH=1 for the same reason.
"""

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]
os.environ["PYTHONSAFEPATH"] = "1"
