"""``python -m app.export``: package a trained model as a MONAI bundle that runs with MONAI alone.

    python -m app.export --checkpoint runs/demo --output bundles/ctclassify [--zip]

The bundle holds configs/ (metadata.json, a self-contained inference.yaml with the run's
settings, logging.conf), models/ (model.pt: a plain state dict; model.ts: TorchScript made by
`monai.bundle ckpt_export`; model.onnx), scripts/ (this project's network, transforms and the
runtime's scan finder, inferer and predictions writer), docs/README.md and LICENSE. Inside it,
with MONAI installed:

    python -m monai.bundle run --config_file configs/inference.yaml \\
        --meta_file configs/metadata.json --bundle_root . --dataset_dir SCANS --output_dir OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.bundle.export import export_bundle
from app.cli import fail
from app.errors import CTClassifyError

__all__ = ["build_parser", "export_bundle", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    p.add_argument("--output", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--zip", action="store_true", help="also write BUNDLE_DIR.zip")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--no-onnx", action="store_true", help="skip models/model.onnx")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        out = export_bundle(
            args.checkpoint,
            args.output,
            overwrite=args.overwrite,
            onnx=not args.no_onnx,
            make_zip=args.zip,
        )
    except CTClassifyError as exc:  # a refused checkpoint or output: 2
        return fail(exc)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"bundle: {out}" + (f" and {out}.zip" if args.zip else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
