"""Fuzz suite fixtures: the path to the shared fuzz targets.

The properties live in fuzzing/targets.py (shared with the atheris harnesses); this suite feeds
them structured Hypothesis inputs. Every property has a CI form (modest max_examples) and a
long form marked `long`, which runs only with MEDAGENT_LONG_TESTS=1 (tests/conftest.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzzing"))
