"""Reading scans for a classifier: each input checked and preprocessed (never raising), in a
background thread a few scans ahead or in DataLoader workers, in batches."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from app.runtime.scanqc import Limits, TrainingContext
from app.runtime.scans import ScanInput, find_inputs
from app.runtime.screen import screen_scan, split_loading


class ScanPreparer:
    """Checks and preprocesses one input; never raises (errors become part of the result:
    :func:`app.runtime.screen.screen_scan`, which an exported bundle runs too).

    Picklable and free of the network, so DataLoader workers can run it.

    Args:
        preprocessing: the evaluation chain of the configs (starting with ``LoadImaged``).
        limits: caps checked before reading voxels.
        image_key: key of the image in the chain's dictionaries.
        training: what the model was trained on, for warnings about scans unlike it.
    """

    def __init__(
        self,
        preprocessing: Any,
        limits: Limits,
        image_key: str = "image",
        training: TrainingContext | None = None,
    ) -> None:
        self.load, self.rest = split_loading(preprocessing)
        self.limits = limits
        self.key = image_key
        self.training = training

    def __call__(self, scan: ScanInput) -> dict[str, Any]:
        result = screen_scan(scan, self.load, self.rest, self.limits, self.training, self.key)
        if result["image"] is not None:
            result["image"] = torch.as_tensor(result["image"])
        return result


class _InputDataset(torch.utils.data.Dataset):
    def __init__(self, inputs: Sequence[ScanInput], preparer: ScanPreparer) -> None:
        self.inputs = list(inputs)
        self.preparer = preparer

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.preparer(self.inputs[index])


def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


def prefetched(
    prepare: Callable[[ScanInput], dict[str, Any]], scans: Sequence[ScanInput], ahead: int
) -> Iterator[dict[str, Any]]:
    """``prepare`` each scan in a background thread, at most ``ahead`` scans ahead, in order.

    Reading, inflating and resizing release the GIL (ISA-L/zlib, NumPy, PyTorch), so the next
    scans are prepared while the network classifies the current ones. The preparer catches every
    error of a scan itself, so one bad file never stops the others.
    """
    if not scans:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctclassify-read") as pool:
        pending: deque[Future[dict[str, Any]]] = deque()
        todo = iter(scans)
        try:
            for scan in itertools.islice(todo, ahead):
                pending.append(pool.submit(prepare, scan))
            while pending:
                result = pending.popleft().result()
                for scan in itertools.islice(todo, 1):
                    pending.append(pool.submit(prepare, scan))
                yield result
        finally:  # a consumer that stops early: drop what was not started
            for future in pending:
                future.cancel()


def batched(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepared_batches(
    scans: Sequence[ScanInput],
    preparer: ScanPreparer,
    batch_size: int,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterable[list[dict[str, Any]]]:
    """``preparer``'s results in batches of ``batch_size``, in order: from ``workers``
    DataLoader processes, or with none from a background thread two batches ahead."""
    size = max(batch_size, 1)
    if workers > 0:
        return torch.utils.data.DataLoader(
            _InputDataset(scans, preparer),
            batch_size=size,
            num_workers=workers,
            collate_fn=_as_list,
            pin_memory=pin_memory,
        )
    return batched(prefetched(preparer, scans, ahead=2 * size), size)


def as_input(path: str | Path) -> ScanInput:
    """The one scan at ``path`` (a NIfTI file or a DICOM series folder), or an unreadable input
    saying why: nothing there, or several scans."""
    found = find_inputs(path)
    if len(found) == 1:
        return found[0]
    if not found:
        return ScanInput(str(path), "unreadable", problem="no NIfTI file or DICOM series here")
    return ScanInput(
        str(path), "unreadable", problem=f"{len(found)} scans here: pass one at a time"
    )
