"""Pretraining with a lesion-segmentation loss beside the classification (a study, not a feature).

    python -m studies.aux_pretrain OUT [--per-class 800] [--epochs 12] [--seg-weight 1]

The same 1,600 generated scans as ``python -m app.pretrain`` (``configs/pretrain.yaml``: each
scan's settings drawn from the same seeds), with the generator's lesion masks. The mask travels
through the model's own preprocessing as a second channel (lung crop, window, resize, turn), so
it stays on the input's grid; a 1x1x1 convolution on the second conv block's output (about
14x14x10 cells) predicts which cells hold a lesion (the mask max-pooled to that grid), and its
binary cross-entropy is added to the classification's, times ``--seg-weight``. The network is the
small-data recipe's (with its density branch); the head is dropped on export, so OUT/aux.pt is a
``CNN3D`` that ``app.train --recipe small-data --init OUT/aux.pt`` starts from. Epochs as the
recipe trains them (Adam 5e-4, batch 8, the reference's axial rotations, image and mask
together), the kept epoch the best validation ROC-AUC (30% of the scans).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: the window's width in HU: the mask channel (0 or 1 "HU") comes out of it at (m + 1000) / WIDTH
WINDOW = (-1000.0, 400.0)


def prepare(job: tuple[int, int, dict[str, Any], dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(image, lesion fraction) of one pretraining scan on the recipe's 64x64x48 input grid."""
    from monai.data import MetaTensor

    from app.data.synth import generate_scan, scan_seed
    from app.pretrain import scan_settings
    from transforms.presets import eval_transforms

    label, index, settings, run_info = job
    scan = generate_scan(
        label, scan_seed(int(settings["seed"]), index), **scan_settings(settings, index)
    )
    lesion = scan.lesion_mask if scan.lesion_mask is not None else np.zeros_like(scan.volume)
    both = np.stack([scan.volume.astype(np.float32), lesion.astype(np.float32)])
    image = MetaTensor(torch.as_tensor(both), affine=torch.as_tensor(scan.affine))
    chain = eval_transforms(
        keys=["image"],
        spatial_size=run_info["spatial_size"],
        hu_window=WINDOW,
        axcodes=run_info["axcodes"],
        load=False,
        lung_crop=True,
    )
    out = np.asarray(chain({"image": image})["image"])
    fraction = np.clip(out[1] * (WINDOW[1] - WINDOW[0]) + WINDOW[0], 0.0, 1.0)
    return out[:1].astype(np.float16), fraction.astype(np.float16)


class WithSegmentation(torch.nn.Module):
    """A ``CNN3D`` and a 1x1x1 convolution on its second block's output: (logit, lesion map)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seg = torch.nn.Conv3d(net.features[1].conv.out_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        early = self.net.features[1](self.net.features[0](x))
        logit = self.net.head(self.net.features[2:](early))
        if self.net.density is not None:
            logit = logit + self.net.density(x)
        return logit, self.seg(early)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--per-class", type=int, default=800)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seg-weight", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    from app.pretrain import pretrain_settings
    from nets.cnn3d import CNN3D
    from transforms.augment import BatchAxialRotation

    repo = Path(__file__).resolve().parent.parent
    shipped = torch.load(repo / "nets/weights/generated.pt", weights_only=True)
    run_info = dict(shipped["run_info"])
    settings = pretrain_settings()
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / f"data-{args.per_class}.npz"
    if cache.exists():
        data = np.load(cache)
        images, masks, labels = data["images"], data["masks"], data["labels"]
    else:
        jobs = [(label, i, settings, run_info) for i in range(args.per_class) for label in (0, 1)]
        start = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            done = pool.map(prepare, jobs, chunksize=8)
        images = np.stack([d[0] for d in done])
        masks = np.stack([d[1] for d in done])
        labels = np.array([j[0] for j in jobs])
        np.savez(cache, images=images, masks=masks, labels=labels)
        print(f"prepared {len(jobs)} scans in {time.perf_counter() - start:.0f} s", flush=True)
    n_train = int(0.7 * args.per_class) * 2  # the jobs alternate classes: a stratified 70 %
    torch.manual_seed(int(settings["seed"]))
    net = CNN3D(
        in_channels=1,
        filters=run_info["filters"],
        dense_units=run_info["dense_units"],
        dropout=run_info["dropout"],
        bn_eps=run_info["bn_eps"],
        bn_momentum=run_info["bn_momentum"],
        norm=run_info["norm"],
        pooling=run_info["pooling"],
        density_bins=run_info["density_bins"],
    )
    model = WithSegmentation(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    rotate = BatchAxialRotation(angles_deg=(-20, -10, -5, 5, 10, 20), seed=int(settings["seed"]))
    rng = np.random.default_rng(int(settings["seed"]))
    best, history = -1.0, []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        model.train()
        order = rng.permutation(n_train)
        losses = []
        for b in range(0, n_train - 1, 8):
            idx = order[b : b + 8]
            x = torch.as_tensor(images[idx].astype(np.float32))
            m = torch.as_tensor(masks[idx].astype(np.float32))[:, None]
            x, m = rotate(torch.cat([x, m], 1)).split(1, dim=1)
            y = torch.as_tensor(labels[idx], dtype=torch.float32)[:, None]
            logit, seg = model(x)
            target = F.adaptive_max_pool3d(m, seg.shape[2:])
            loss = F.binary_cross_entropy_with_logits(logit, y)
            seg_loss = F.binary_cross_entropy_with_logits(seg, (target > 0.5).float())
            (loss + args.seg_weight * seg_loss).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append((loss.item(), seg_loss.item()))
        model.eval()
        with torch.no_grad():
            scores = [
                torch.sigmoid(model(torch.as_tensor(images[i : i + 16].astype(np.float32)))[0])[
                    :, 0
                ]
                for i in range(n_train, len(images), 16)
            ]
        auc = _auc(torch.cat(scores).numpy(), labels[n_train:])
        row = {
            "epoch": epoch,
            "loss": float(np.mean([a for a, _ in losses])),
            "seg_loss": float(np.mean([s for _, s in losses])),
            "val_auc": round(auc, 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        history.append(row)
        print(json.dumps(row), flush=True)
        if auc > best:
            best = auc
            state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
            torch.save({"network": state, "run_info": run_info}, args.out / "aux.pt")
    (args.out / "history.json").write_text(json.dumps(history, indent=1))
    print(f"kept: validation ROC-AUC {best:.4f}; wrote {args.out / 'aux.pt'}")


if __name__ == "__main__":
    main()
