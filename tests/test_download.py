from __future__ import annotations

import http.server
import io
import threading
import zipfile
from pathlib import Path

import pytest

from app.data.cli import main as data_main
from app.data.download import download_mosmed, fetch
from app.errors import DownloadError


def make_zip(folder: str, n: int = 3) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            zf.writestr(f"{folder}/study_{i:04d}.nii.gz", bytes(range(256)) * 200)
    return buf.getvalue()


class RangeServer:
    """A 127.0.0.1 file server that honours ``Range`` and can cut a response short."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: int | None = None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after is not None:
                    self.wfile.write(body[: server.cut_after])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    server.cut_after = None
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = RangeServer({"CT-0.zip": make_zip("CT-0"), "CT-23.zip": make_zip("CT-23", 2)})
    yield srv
    srv.close()


def archives(server: RangeServer, size0: int | None = None):
    return {
        "CT-0": {"url": f"{server.url}/rel/CT-0.zip", "size": size0},
        "CT-23": {"url": f"{server.url}/rel/CT-23.zip", "size": None},
    }


def test_download_unpacks_and_is_idempotent(tmp_path, server):
    size0 = len(server.files["CT-0.zip"])
    data_dir = download_mosmed(tmp_path, archives(server, size0), progress=False)
    assert sorted(p.name for p in (data_dir / "CT-0").iterdir()) == [
        f"study_{i:04d}.nii.gz" for i in range(3)
    ]
    assert len(list((data_dir / "CT-23").iterdir())) == 2
    assert not (tmp_path / "CT-0.zip").exists()
    count = len(server.requests)
    download_mosmed(tmp_path, archives(server, size0), progress=False)
    assert len(server.requests) == count  # second run fetches nothing


def test_broken_download_resumes_with_range(tmp_path, server):
    data = server.files["CT-0.zip"]
    server.cut_after = 1000
    with pytest.raises(DownloadError, match="run the same command again"):
        fetch(f"{server.url}/CT-0.zip", tmp_path / "CT-0.zip", len(data), progress=False)
    assert (tmp_path / "CT-0.zip.part").stat().st_size == 1000
    fetch(f"{server.url}/CT-0.zip", tmp_path / "CT-0.zip", len(data), progress=False)
    assert server.requests[-1] == ("CT-0.zip", "bytes=1000-")
    assert (tmp_path / "CT-0.zip").read_bytes() == data


def test_size_mismatch_is_refused(tmp_path, server):
    with pytest.raises(DownloadError, match="expected 12345"):
        fetch(f"{server.url}/CT-0.zip", tmp_path / "CT-0.zip", 12345, progress=False)
    assert not (tmp_path / "CT-0.zip").exists()


def test_cli_with_mirror_and_unreachable_network(tmp_path, server, capsys):
    assert (
        data_main(["download", "--root", str(tmp_path), "--base-url", server.url, "--no-progress"])
        == 1
    )
    # CT-0's published size differs from the test zip: refused with a clear message
    assert "expected 1045162547" in capsys.readouterr().err
    # nothing listens on port 9 of 127.0.0.1 (discard): connection refused
    assert (
        data_main(
            [
                "download",
                "--root",
                str(tmp_path),
                "--base-url",
                "http://127.0.0.1:9",
                "--no-progress",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "cannot reach http://127.0.0.1:9/CT-0.zip" in err and "resumes" in err


def test_zip_slip_is_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../evil.nii.gz", b"x")
    srv = RangeServer({"CT-0.zip": buf.getvalue()})
    try:
        with pytest.raises(DownloadError, match="escapes"):
            download_mosmed(
                tmp_path / "root",
                {"CT-0": {"url": f"{srv.url}/CT-0.zip", "size": None}},
                progress=False,
            )
    finally:
        srv.close()
    assert not (tmp_path / "root" / "MosMedData" / "evil.nii.gz").exists()
    assert not Path(tmp_path / "evil.nii.gz").exists()


def serve_and_download(tmp_path: Path, payload: bytes, **spec):
    srv = RangeServer({"CT-0.zip": payload})
    try:
        return download_mosmed(
            tmp_path / "root",
            {"CT-0": {"url": f"{srv.url}/CT-0.zip", "size": None, **spec}},
            progress=False,
        )
    finally:
        srv.close()


def zip_of(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    import stat

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def test_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    bomb = zip_of({"CT-0/study_0000.nii.gz": bytes(64 * 1024**2)})  # 64 MB of zeros, ~64 KB
    with pytest.raises(DownloadError, match="zip bomb"):
        serve_and_download(tmp_path, bomb)
    assert not list((tmp_path / "root").rglob("*.nii.gz"))


def test_too_many_members_and_links_are_refused(tmp_path):
    from app.data.download import ZipLimits, safe_extract

    many = tmp_path / "many.zip"
    many.write_bytes(zip_of({f"CT-0/s{i}.nii.gz": b"x" for i in range(12)}))
    with pytest.raises(DownloadError, match="12 entries"):
        safe_extract(many, tmp_path / "out", ZipLimits(max_members=10))
    link = zip_of({"CT-0/a.nii.gz": b"x" * 100}, links={"CT-0/b.nii.gz": "/etc/passwd"})
    with pytest.raises(DownloadError, match="link or special file"):
        serve_and_download(tmp_path, link)
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "root").rglob("b.nii.gz"))


def test_checksum_is_checked_and_recorded(tmp_path):
    import hashlib
    import json

    payload = make_zip("CT-0")
    with pytest.raises(DownloadError, match="SHA-256"):
        serve_and_download(tmp_path, payload, sha256="0" * 64)
    assert not (tmp_path / "root" / "CT-0.zip").exists()  # the wrong archive is deleted
    good = hashlib.sha256(payload).hexdigest()
    data_dir = serve_and_download(tmp_path, payload, sha256=good)
    record = json.loads((data_dir / ".CT-0.complete").read_text())
    assert record["sha256"] == good and record["bytes"] == len(payload)


def test_unknown_size_download_is_bounded(tmp_path):
    srv = RangeServer({"big.zip": bytes(5000)})
    try:
        with pytest.raises(DownloadError, match="above 4,096"):
            fetch(f"{srv.url}/big.zip", tmp_path / "big.zip", None, progress=False, max_size=4096)
    finally:
        srv.close()
    assert not (tmp_path / "big.zip").exists()


def test_zip_limits_are_the_quoted_ones():
    """README: at most 10,000 members and 20x the archive's size inflated (16 GiB at most)."""
    from app.data.download import ZipLimits

    assert ZipLimits() == ZipLimits(max_members=10_000, max_bytes=16 * 1024**3, max_ratio=20.0)
