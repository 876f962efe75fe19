"""Download the reference MosMedData subset (CT-0.zip, CT-23.zip): resumable and idempotent."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import DownloadError

CHUNK = 1 << 20


def _total_size(response: Any, offset: int) -> int | None:
    content_range = response.headers.get("Content-Range")
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return int(length) + offset if length is not None and length.isdigit() else None


def fetch(
    url: str,
    dest: Path,
    expected_size: int | None = None,
    progress: bool = True,
    timeout: float = 30.0,
    max_size: int = 8 * 1024**3,
) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` with an HTTP Range request.

    Does nothing when ``dest`` exists with the expected size. Raises :class:`DownloadError` when
    the server is unreachable, the size does not match, or (size unknown) the server sends more
    than ``max_size`` bytes.
    """
    from tqdm import tqdm

    if dest.exists() and (expected_size is None or dest.stat().st_size == expected_size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and expected_size is not None and offset == expected_size:
            part.replace(dest)
            return dest
        raise DownloadError(f"{url}: server answered HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"cannot reach {url} ({reason}); check the network connection or proxy, then run the "
            "same command again: finished bytes are kept and the download resumes"
        ) from exc
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the Range request: start over
        total = _total_size(response, offset)
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(f"{url}: server reports {total} bytes, expected {expected_size}")
        limit = expected_size if expected_size is not None else max_size
        if total is not None and total > limit:
            raise DownloadError(f"{url}: server reports {total:,} bytes, above {limit:,}: refused")
        with (
            part.open("ab" if offset else "wb") as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=dest.name,
                disable=not progress,
            ) as bar,
        ):
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
                    if f.tell() > limit:
                        break  # more than announced or allowed: refused below
            except (OSError, urllib.error.URLError) as exc:
                raise DownloadError(
                    f"download of {url} broke off after {f.tell()} bytes ({exc}); run the same "
                    "command again to resume"
                ) from exc
    size = part.stat().st_size
    want = expected_size if expected_size is not None else total
    if size > limit:
        part.unlink()
        raise DownloadError(f"{url}: sent more than {limit:,} bytes: refused and deleted")
    if want is not None and size != want:
        if size > want:
            part.unlink()
        raise DownloadError(
            f"{url}: got {size} bytes, expected {want}; run the same command again to resume"
        )
    part.replace(dest)
    return dest


@dataclass(frozen=True)
class ZipLimits:
    """Bounds checked against a zip's directory before anything is extracted.

    Args:
        max_members: most entries an archive may hold (MosMedData: 100 per class).
        max_bytes: most bytes all members may inflate to.
        max_ratio: most the members may inflate to, as a multiple of the archive's size
            (``.nii.gz`` scans barely compress again; a zip bomb inflates a thousandfold).
    """

    max_members: int = 10_000
    max_bytes: int = 16 * 1024**3
    max_ratio: float = 20.0


def safe_extract(archive: Path, target: Path, limits: ZipLimits = ZipLimits()) -> None:
    """Extract ``archive`` into ``target`` after checking every member: none may land outside
    ``target`` (absolute paths, ``..``), be a symbolic link or special file, or make the archive
    exceed ``limits`` (members, inflated bytes, inflation ratio). ``zipfile`` stops each member
    at its declared size and checks its CRC, so the declared sizes bound what is written."""

    target = target.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            if len(members) > limits.max_members:
                raise DownloadError(
                    f"{archive} holds {len(members):,} entries, above the limit of "
                    f"{limits.max_members:,}: refused"
                )
            total = sum(m.file_size for m in members)
            cap = min(limits.max_bytes, limits.max_ratio * archive.stat().st_size + (1 << 20))
            if total > cap:
                raise DownloadError(
                    f"{archive} would inflate to {total:,} bytes, above the limit of {int(cap):,} "
                    "(a zip bomb?): refused, nothing was extracted"
                )
            for member in members:
                kind = stat.S_IFMT(member.external_attr >> 16)  # Unix file type, if recorded
                if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                    raise DownloadError(
                        f"{archive}: member {member.filename!r} is a link or special file: refused"
                    )
                out = (target / member.filename).resolve()
                if not out.is_relative_to(target) or Path(member.filename).is_absolute():
                    raise DownloadError(
                        f"{archive}: member {member.filename!r} escapes the target folder"
                    )
            zf.extractall(target)
    except zipfile.BadZipFile as exc:
        raise DownloadError(
            f"{archive} is not a valid zip archive ({exc}); delete it and run again"
        ) from exc


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_mosmed(
    root: str | Path,
    archives: Mapping[str, Mapping[str, Any]],
    base_url: str | None = None,
    keep_archives: bool = False,
    progress: bool = True,
    limits: ZipLimits = ZipLimits(),
) -> Path:
    """Fetch and unpack each archive (``{"CT-0": {"url": ..., "size": ..., "sha256": ...}}``;
    size and checksum are checked where known, extraction is bounded by ``limits``) into
    ``root/MosMedData/<name>``; an archive already unpacked (its ``.complete`` marker present) is
    skipped. ``base_url`` replaces the folder part of every URL (a mirror).

    Returns ``root/MosMedData``.
    """
    root = Path(root)
    data_dir = root / "MosMedData"
    for name, spec in archives.items():
        marker = data_dir / f".{name}.complete"
        if marker.exists() and (data_dir / name).is_dir():
            print(f"{data_dir / name}: already downloaded, nothing to do")
            continue
        url = str(spec["url"])
        if base_url:
            url = base_url.rstrip("/") + "/" + url.rsplit("/", 1)[1]
        size = spec.get("size")
        archive = fetch(url, root / url.rsplit("/", 1)[1], int(size) if size else None, progress)
        digest = sha256_of(archive)
        expected = spec.get("sha256")
        if expected and digest != str(expected).lower():
            archive.unlink()
            raise DownloadError(
                f"{url}: SHA-256 {digest} differs from the expected {expected}: the archive was "
                "deleted; run again, or check the mirror"
            )
        staging = data_dir / f".{name}.extracting"
        shutil.rmtree(staging, ignore_errors=True)
        safe_extract(archive, staging, limits)
        source = staging / name if (staging / name).is_dir() else staging
        if not any(source.rglob("*.nii*")):
            raise DownloadError(f"{archive} holds no .nii/.nii.gz scans")
        shutil.rmtree(data_dir / name, ignore_errors=True)
        source.replace(data_dir / name)
        shutil.rmtree(staging, ignore_errors=True)
        # what was unpacked, for the record (a size or checksum not published can be pinned
        # in configs/common.yaml from it)
        record = {"url": url, "bytes": archive.stat().st_size, "sha256": digest}
        marker.write_text(json.dumps(record, indent=1) + "\n")
        if not keep_archives:
            archive.unlink()
        print(f"{data_dir / name}: {sum(1 for _ in (data_dir / name).rglob('*.nii*'))} scans")
    return data_dir
