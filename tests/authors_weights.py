"""Where the tests find the authors' tiny fixture checkpoints (2–3 MB each).

They are not kept in git: the tests read them where the authors' code wrote them,
``../shared/fixtures/`` beside the checkout (``TOKENSEG_SHARED_FIXTURES`` points elsewhere). Their
small outputs (maps, losses, gradients, images) are copied under ``tests/fixtures/``; each folder's
README names its source. Without the weights the tests that need them are skipped, naming the path —
unless ``TOKENSEG_REQUIRE_FIXTURES=1`` (CI sets it): then a missing file fails the test, so an exactness
check can never turn green by not running.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_FIXTURES = Path(os.environ.get("TOKENSEG_SHARED_FIXTURES")
                       or Path(__file__).resolve().parents[2] / "shared" / "fixtures")


def authors_weights(relative: str) -> Path:
    """``SHARED_FIXTURES / relative``, e.g. ``authors-cti/checkpoint.pth``; skips the test if absent."""
    path = SHARED_FIXTURES / relative
    if not path.is_file() and os.environ.get("TOKENSEG_REQUIRE_FIXTURES") == "1":
        pytest.fail(f"{path}: the authors' fixture weights are missing and TOKENSEG_REQUIRE_FIXTURES=1")
    if not path.is_file():
        pytest.skip(f"{path}: the authors' fixture weights are not beside this checkout "
                    f"(set TOKENSEG_SHARED_FIXTURES to their folder)")
    return path
