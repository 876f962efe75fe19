"""Download the reference MosMedData subset (CT-0.zip, CT-23.zip): resumable and idempotent."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
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
) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` with an HTTP Range request.

    Does nothing when ``dest`` exists with the expected size. Raises :class:`DownloadError` when
    the server is unreachable or the size does not match.
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
            except (OSError, urllib.error.URLError) as exc:
                raise DownloadError(
                    f"download of {url} broke off after {f.tell()} bytes ({exc}); run the same "
                    "command again to resume"
                ) from exc
    size = part.stat().st_size
    want = expected_size if expected_size is not None else total
    if want is not None and size != want:
        if size > want:
            part.unlink()
        raise DownloadError(
            f"{url}: got {size} bytes, expected {want}; run the same command again to resume"
        )
    part.replace(dest)
    return dest


def safe_extract(archive: Path, target: Path) -> None:
    """Extract ``archive`` into ``target``, refusing members that would land outside it."""
    target = target.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                out = (target / member.filename).resolve()
                if not out.is_relative_to(target):
                    raise DownloadError(
                        f"{archive}: member {member.filename!r} escapes the target folder"
                    )
            zf.extractall(target)
    except zipfile.BadZipFile as exc:
        raise DownloadError(
            f"{archive} is not a valid zip archive ({exc}); delete it and run again"
        ) from exc


def download_mosmed(
    root: str | Path,
    archives: Mapping[str, Mapping[str, Any]],
    base_url: str | None = None,
    keep_archives: bool = False,
    progress: bool = True,
) -> Path:
    """Fetch and unpack each archive (``{"CT-0": {"url": ..., "size": ...}}``) into
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
        staging = data_dir / f".{name}.extracting"
        shutil.rmtree(staging, ignore_errors=True)
        safe_extract(archive, staging)
        source = staging / name if (staging / name).is_dir() else staging
        if not any(source.rglob("*.nii*")):
            raise DownloadError(f"{archive} holds no .nii/.nii.gz scans")
        shutil.rmtree(data_dir / name, ignore_errors=True)
        source.replace(data_dir / name)
        shutil.rmtree(staging, ignore_errors=True)
        marker.write_text(url + "\n")
        if not keep_archives:
            archive.unlink()
        print(f"{data_dir / name}: {sum(1 for _ in (data_dir / name).rglob('*.nii*'))} scans")
    return data_dir
