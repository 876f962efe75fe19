"""The classification service under load (issue 33): throughput, latency and memory.

    python -m benchmarks.service_load --requests 200 --clients 8 --max-concurrent 2

Starts ``python -m app.serve`` on a free loopback port with a model of the spec's full width
(seeded random weights: the work per scan is the trained model's) and sends ``--requests``
requests from ``--clients`` concurrent httpx clients: the shared real chest CT as NIfTI, the
same scan as a zipped DICOM series, and every fifth a hostile body (random bytes, a zip naming
``../``, an empty body). Prints throughput (good answers per second), p50/p95 latency of the
good answers, the statuses, and the server's resident memory after a warm-up and at the end.
Side by side in the same run: the same scans classified one after another in one process
(``Classifier.predict``), the throughput the service's HTTP, upload and queue add to.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Answer",
    "free_port",
    "hostile_bodies",
    "resident_mb",
    "send_load",
    "start_service",
    "zip_series",
]


@dataclass
class Answer:
    name: str
    status: int
    seconds: float
    body: dict


def zip_series(folder: Path) -> bytes:
    """A DICOM series folder as the zip ``POST /predict`` takes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"series/{f.name}")
    return buf.getvalue()


def hostile_bodies() -> dict[str, bytes]:
    """Bodies a careless or hostile client sends: each must be refused with a 4xx."""
    slip = io.BytesIO()
    with zipfile.ZipFile(slip, "w") as z:
        z.writestr("../escape.dcm", b"x")
    return {"random": os.urandom(4096), "zip-slip": slip.getvalue(), "empty": b""}


def start_service(checkpoint: Path, port: int, log: Path, *options: str) -> subprocess.Popen:
    """``python -m app.serve`` on ``port`` (loopback), answering /health; its output in
    ``log``. Raises RuntimeError if it does not come up within 120 s."""
    import httpx

    out = log.open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "app.serve", "--checkpoint", str(checkpoint), "--port", str(port),
         "--device", "cpu", *options],
        stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError(f"app.serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.3)


def send_load(port: int, bodies: dict[str, bytes], order: list[str], clients: int) -> list[Answer]:
    """``order`` (names of ``bodies``) sent by ``clients`` concurrent httpx clients, each taking
    the next request when its last is answered; every answer, in the order they came."""
    import httpx

    answers: list[Answer] = []
    lock = threading.Lock()
    queue = list(reversed(order))

    def client() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    name = queue.pop()
                start = time.perf_counter()
                response = http.post("/predict", content=bodies[name])
                answer = Answer(
                    name, response.status_code, time.perf_counter() - start, response.json()
                )
                with lock:
                    answers.append(answer)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resident_mb(pid: int) -> float:
    """A process's resident memory (VmRSS), MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _checkpoint(folder: Path) -> Path:
    import torch

    from nets.cnn3d import CNN3D

    torch.manual_seed(0)
    path = folder / "best_model.pt"
    settings = {  # the spec's network and preprocessing (SPEC.md)
        "spatial_size": [128, 128, 64], "hu_window": [-1000, 400], "axcodes": "LAS",
        "in_channels": 1, "filters": [64, 64, 128, 256], "dense_units": 512, "dropout": 0.3,
        "bn_eps": 1e-3, "bn_momentum": 0.01, "threshold": 0.5, "class_names": ["normal", "abnormal"],
    }  # fmt: skip
    torch.save({"network": CNN3D().state_dict(), "run_info": settings}, path)
    return path


def _in_process(checkpoint: Path, scans: list[Path]) -> float:
    """Scans per second, classified one after another in this process."""
    from app.inference.classifier import Classifier

    clf = Classifier.load(checkpoint, device="cpu")
    clf.predict(scans[0])  # warm-up
    start = time.perf_counter()
    for scan in scans:
        clf.predict(scan)
    return len(scans) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument(
        "--shared", type=Path, default=Path(os.environ.get("CTCLASSIFY_SHARED", "../shared"))
    )
    args = p.parse_args(argv)
    real = args.shared / "data" / "real-ct"
    nifti, series = real / "cip_ct-64_chest.nii.gz", real / "cip_ct-64_dicom"
    bodies = {"nifti": nifti.read_bytes(), "series": zip_series(series), **hostile_bodies()}
    hostile = list(hostile_bodies())
    order = [
        hostile[i // 5 % len(hostile)] if i % 5 == 4 else ("nifti", "series")[i % 2]
        for i in range(args.requests)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _checkpoint(Path(tmp))
        port = free_port()
        server = start_service(
            checkpoint, port, Path(tmp) / "serve.log", "--max-concurrent", str(args.max_concurrent),
            "--max-queue", str(args.clients),
        )  # fmt: skip
        try:
            send_load(port, bodies, ["nifti", "series"] * args.max_concurrent, args.clients)
            warm = resident_mb(server.pid)
            start = time.perf_counter()
            answers = send_load(port, bodies, order, args.clients)
            wall = time.perf_counter() - start
            end = resident_mb(server.pid)
        finally:
            server.terminate()
            server.wait(30)
        direct = _in_process(checkpoint, [nifti, series] * 5)
    good = [a for a in answers if a.name in ("nifti", "series")]
    ok = [a.seconds for a in good if a.status == 200]
    statuses: dict[int, int] = {}
    for a in answers:
        statuses[a.status] = statuses.get(a.status, 0) + 1
    p95 = statistics.quantiles(ok, n=20)[18] if len(ok) >= 20 else max(ok)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{args.requests} requests from {args.clients} clients, {args.max_concurrent} slots, "
          f"{len(good)} good scans (full-width CNN, 128 x 128 x 64 input)")  # fmt: skip
    print(f"statuses: {dict(sorted(statuses.items()))}")
    print(f"service: {len(ok) / wall:.2f} scans/s; latency p50 {statistics.median(ok):.2f} s, "
          f"p95 {p95:.2f} s")  # fmt: skip
    print(f"one process, one scan after another: {direct:.2f} scans/s (service/direct "
          f"{len(ok) / wall / direct:.2f})")  # fmt: skip
    print(f"server memory: {warm:.0f} MiB after warm-up, {end:.0f} MiB after the load")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
