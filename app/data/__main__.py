"""``python -m app.data``."""

from app.data.cli import main

raise SystemExit(main())
