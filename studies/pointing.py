"""Does the model look where the findings are? The pointing game on generated abnormal scans.

    python -m app.data synth T --per-class 60 --shape 96 96 32 --seed 100 --difficulty 0.7 --masks
    python -m studies.pointing --checkpoint RUN/fold-0 --data T [--method gradient|gradcam]

For each abnormal scan of ``T/CT-23`` with its lesion mask in ``T/masks``: the saliency map of one
network (``app.inference.saliency.saliency_map``: the smoothed input gradient, or with
``--method gradcam`` Grad-CAM of a conv block) carried back to the scan's own grid
(``app.inference.saliency.to_input_grid``), then ``pointing_game``: is the map's maximum inside a
lesion dilated by 2 voxels (hit), the share of the map inside the lungs (our lung mask united with
the lesions), and chance (a random lung voxel inside the dilated lesions). Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="one model (a run or fold folder)")
    p.add_argument("--data", type=Path, required=True, help="generated data written with --masks")
    p.add_argument("--out", type=Path, help="JSON of the per-scan results and the summary")
    p.add_argument("--method", default="gradient", help="gradient (the app's) | gradcam")
    p.add_argument("--block", type=int, default=-1, help="gradcam: this conv block (-1: last)")
    p.add_argument("--limit", type=int, default=0, help="at most this many scans (0: all)")
    args = p.parse_args()

    from app.inference.classifier import Classifier
    from app.inference.saliency import pointing_game, summarise_pointing, to_input_grid
    from transforms.lung import lung_mask
    from transforms.presets import eval_transforms

    clf = Classifier.load(args.checkpoint, device="cpu", precision="fp32")
    s = clf.settings
    chain = eval_transforms(
        keys=["image"], spatial_size=s["spatial_size"], hu_window=s["hu_window"],
        axcodes=s["axcodes"], lung_crop=bool(s.get("lung_crop")),
        lung_only=bool(s.get("lung_only")), lung_flatten_mm=float(s.get("lung_flatten_mm", 0)),
    )  # fmt: skip
    scans = sorted((args.data / "CT-23").glob("*.nii.gz"))
    if args.limit:
        scans = scans[: args.limit]
    results = []
    for path in scans:
        lesions = np.asarray(nib.load(str(args.data / "masks" / path.name)).dataobj) > 0
        image = chain({"image": str(path)})["image"]
        heat = clf.saliency(image, method=args.method, block=args.block)
        back, _ = to_input_grid(heat, path, str(s["axcodes"]), bool(s.get("lung_crop")))
        volume = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
        row = pointing_game(back, lesions, lung_mask(volume) | lesions)
        results.append({"scan": path.name, **row})
    summary = summarise_pointing(results)
    print(json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "scans": results}, indent=1))


if __name__ == "__main__":
    main()
