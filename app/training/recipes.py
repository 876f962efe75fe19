"""Named training recipes (``configs/recipes/NAME.yaml``, ``app.train --recipe NAME``) and the
demo: its config and its generated dataset, made once in the user's cache folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from app.config import CONFIG_DIR
from app.errors import ConfigError

#: the demo's config, read after the small-data recipe (``--demo``)
DEMO_CONFIG = "demo.yaml"


#: named training recipes: configs/recipes/NAME.yaml, read after train.yaml (--recipe NAME)
RECIPES_DIR = "recipes"


#: the recipe --demo trains with
DEMO_RECIPE = "small-data"


def demo_dataset(
    config_dir: Path = CONFIG_DIR, progress: bool = True, severity: bool = False
) -> Path:
    """The generated demo dataset, made on first use in the user's cache folder (a progress bar
    with ``progress``). With ``severity`` (``--demo --task severity``), graded scans in CT-0..CT-4
    instead, as many scans in all (the demo's per-class count times 2 / 5 per grade)."""
    from monai.bundle import ConfigParser

    from app.data.synth import write_dataset

    spec = ConfigParser.load_config_files(str(config_dir / DEMO_CONFIG))["demo_data"]
    cache = Path(os.environ.get("CTCLASSIFY_CACHE", Path.home() / ".cache" / "ctclassify"))
    shape = spec.get("shape")
    per_class = int(spec["per_class"]) * 2 // 5 if severity else int(spec["per_class"])
    name = f"demo-{per_class}x{5 if severity else 2}-seed{spec['seed']}-" + (
        "x".join(map(str, shape)) if shape else "mosmed"
    )
    root = cache / name
    marker = root / ".complete"
    if not marker.exists():
        print(f"generating the demo dataset in {root} (once)", flush=True)
        write_dataset(
            root,
            per_class,
            tuple(shape) if shape else None,
            seed=int(spec["seed"]),
            difficulty=spec.get("difficulty"),
            progress=progress,
            workers=os.cpu_count() or 1,
            severity=severity,
        )
        marker.write_text(json.dumps(spec))
    return root


def recipes(config_dir: Path = CONFIG_DIR) -> list[str]:
    """The recipe names: configs/recipes/*.yaml."""
    return sorted(p.stem for p in (Path(config_dir) / RECIPES_DIR).glob("*.yaml"))


def recipe_file(name: str, config_dir: Path = CONFIG_DIR) -> str:
    """``recipes/NAME.yaml`` for a known recipe; a ConfigError naming the known ones else."""
    known = recipes(config_dir)
    if name not in known:
        raise ConfigError(f"no recipe {name!r}: choose one of {', '.join(known) or 'none'}")
    return f"{RECIPES_DIR}/{name}.yaml"
