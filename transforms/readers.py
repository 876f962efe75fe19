"""A NIfTI reader that inflates ``.nii.gz`` files in one zlib pass, bounded by their header.

The inflate runs on ISA-L (``python-isal``, faster than zlib on CT volumes: see
``docs/benchmarks.md``) when it is installed, and on the standard library's ``zlib`` otherwise; both check the gzip CRC, and both
raise ``zlib.error`` for a corrupt stream.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import NibabelReader
from monai.data.utils import correct_nifti_header_if_necessary
from monai.utils import ensure_tuple

_inflater_module: Any
try:  # ISA-L's inflate: same API and checks as zlib, faster
    from isal import isal_zlib as _inflater_module
except ImportError:  # pragma: no cover - the zlib path is tested by swapping this module
    _inflater_module = zlib

_HEADERS = {348: (nib.Nifti1Header, nib.Nifti1Image), 540: (nib.Nifti2Header, nib.Nifti2Image)}
_TRAILER_SLACK = 1 << 16


def inflate_nifti(path: str | Path, max_bytes: int = 8 * 1024**3) -> nib.Nifti1Image | None:
    """Read a gzipped NIfTI file with a single zlib stream instead of nibabel's ``GzipFile``.

    Decompression stops at the size the header declares (never more than ``max_bytes``), so a
    file that inflates to far more than its header says costs no more memory than the header's
    size; the stream is then followed to its trailer, so a CRC mismatch still raises. Returns
    ``None`` when the file does not start with a NIfTI-1/2 header (the caller falls back to
    ``nibabel.load`` and its error messages).

    Raises:
        EOFError: the stream ends before the declared data.
        zlib.error: the stream is corrupt (including a CRC mismatch).
        ValueError: the header declares more than ``max_bytes``.
    """
    raw = Path(path).read_bytes()
    try:
        return _inflate(path, raw, max_bytes, _inflater_module)
    except _inflater_module.error as exc:
        if isinstance(exc, zlib.error):
            raise
        raise zlib.error(str(exc)) from exc


def _inflate(path: str | Path, raw: bytes, max_bytes: int, lib: Any) -> nib.Nifti1Image | None:
    inflater = lib.decompressobj(wbits=31)
    head = inflater.decompress(raw, 544)
    if len(head) < 4:
        return None
    size = struct.unpack("<i", head[:4])[0]
    if size not in _HEADERS:
        size = struct.unpack(">i", head[:4])[0]
    if size not in _HEADERS or len(head) < size:
        return None
    header_class, image_class = _HEADERS[size]
    header = header_class.from_fileobj(io.BytesIO(head[:size]), check=False)
    shape = header.get_data_shape()
    expected = int(header.get_data_offset()) + int(np.prod(shape, dtype=np.int64)) * int(
        header.get_data_dtype().itemsize
    )
    if expected > max_bytes:
        raise ValueError(f"{path}: header declares {expected:,} bytes, above {max_bytes:,}")
    chunks, got, tail = [head], len(head), inflater.unconsumed_tail
    while got < expected:
        out = inflater.decompress(tail, expected - got)
        tail = inflater.unconsumed_tail
        if not out:
            break
        chunks.append(out)
        got += len(out)
    if got < expected:
        raise EOFError(
            f"compressed file ended after {got:,} of the {expected:,} bytes its header declares"
        )
    extra = 0
    while not inflater.eof and extra <= _TRAILER_SLACK:  # reach the trailer: its CRC is checked
        out = inflater.decompress(tail, _TRAILER_SLACK)
        tail = inflater.unconsumed_tail
        if not out and not tail:
            break
        extra += len(out)
    return image_class.from_bytes(b"".join(chunks)[:expected])


def _native(data: np.ndarray) -> np.ndarray:
    """``data`` in the machine's byte order (a copy only for the rare byte-swapped file)."""
    if data.dtype.isnative:
        return data
    return data.astype(data.dtype.newbyteorder("="))


def native_byte_order(image: Any) -> Any:
    """``image`` with voxels in native byte order: PyTorch refuses byte-swapped arrays, and older
    software writes big-endian NIfTI files (valid files that MONAI's float32 default hides)."""
    data = np.asanyarray(image.dataobj)
    if data.dtype.isnative:
        return image
    return type(image)(_native(data), image.affine, header=image.header)


def reversed_axes(image: Any) -> Any:
    """The same 3D NIfTI image described with its voxel axes in reverse order, without a copy.

    NIfTI stores voxels with the first axis varying fastest; a C-ordered (x, y, z) array of them
    needs a full transposing copy of the volume. Read as (z, y, x), the
    stored bytes are already C-ordered; the affine's columns are permuted to match, so the image
    is the same in world space and ``Orientationd`` brings it back to any axis order as a view.
    Images that are not 3D are returned unchanged; 3D data that is not Fortran-ordered keeps its
    axes (the array already read is reused, so the file is read once either way).
    """
    if len(image.shape) != 3:
        return native_byte_order(image)
    data = _native(np.asanyarray(image.dataobj))
    if not data.flags.f_contiguous:
        return type(image)(data, image.affine, header=image.header)
    affine = np.asarray(image.affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    return type(image)(data.T, affine, header=image.header)


class FastNiftiReader(NibabelReader):
    """MONAI's ``NibabelReader`` with :func:`inflate_nifti` for ``.nii.gz`` files.

    Same images (arrays, affines, metadata), read faster (``benchmarks/run.py`` measures it). Other files, and gzip files that do not hold a NIfTI header, go
    through ``nibabel.load`` as before. With ``reverse_axes``, 3D images come with their voxel
    axes reversed (:func:`reversed_axes`: no transposing copy): only for chains that reorient
    right after loading (``Orientationd``), as the presets do; ``original_affine`` in the
    metadata is then the reversed one.

    Args:
        max_bytes: most bytes a header may declare.
        reverse_axes: hand out 3D images as (z, y, x) with a matching affine.
        kwargs: passed to ``NibabelReader``.
    """

    def __init__(
        self, max_bytes: int = 8 * 1024**3, reverse_axes: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.max_bytes = max_bytes
        self.reverse_axes = reverse_axes

    def read(self, data: Sequence[Any] | Any, **kwargs: Any) -> Any:
        filenames = ensure_tuple(data)
        self.filenames = filenames  # NibabelReader.get_data reads it
        images = []
        for name in filenames:
            image: Any = inflate_nifti(name, self.max_bytes) if str(name).endswith(".gz") else None
            if image is None:
                image = nib.load(name, **{**self.kwargs, **kwargs})
            # trailing dimensions of size 1 (x, y, z, 1, 1) hold no data: a 3D scan, read as one
            image = nib.funcs.squeeze_image(image)
            image = reversed_axes(image) if self.reverse_axes else native_byte_order(image)
            images.append(correct_nifti_header_if_necessary(image))
        return images if len(filenames) > 1 else images[0]
