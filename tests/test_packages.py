from __future__ import annotations

from pathlib import Path

import app
import nets
import transforms

REPO = Path(__file__).resolve().parent.parent


def test_imported_packages_are_this_projects():
    # `app`, `nets` and `transforms` are generic names that other installs could shadow
    for package in (app, nets, transforms):
        assert Path(package.__file__).resolve().parent.parent == REPO, package.__file__
