"""Where the test suite's own files are (``tests/data``, shipped with the repository).

The default suite needs nothing outside the repository. ``SHARED_DATA`` (``../shared/data`` beside
the checkout) feeds only the opt-in ``realdata`` suite (``python -m pytest -m realdata``).
"""

from __future__ import annotations

from pathlib import Path

TEST_DATA = Path(__file__).resolve().parent / "data"
SLIDES = TEST_DATA / "slides"
CMU = SLIDES / "CMU-1-Small-Region.svs"
TCGA = SLIDES / "TCGA-CR-7395-01A-01-TS1.svs"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
