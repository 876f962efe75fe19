from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CTCLASSIFY_SHARED", REPO.parent / "shared"))
REAL_CT = SHARED / "data" / "real-ct"
REFERENCE = SHARED / "data" / "reference"


def require_shared(path: Path) -> Path:
    """Return ``path``; skip (outside CI) when the team's shared data is absent, fail in CI."""
    if path.exists():
        return path
    message = (
        f"{path} is missing: the large real-CT and reference files live in the team's ../shared "
        "folder, which a plain clone does not have"
    )
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must have it)")
    pytest.skip(message)


@pytest.fixture
def real_ct() -> Path:
    return require_shared(REAL_CT)


@pytest.fixture
def reference_dir() -> Path:
    return require_shared(REFERENCE)
