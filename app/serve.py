"""python -m app.serve: classify scans over HTTP, the model loaded once (FastAPI on uvicorn).

    python -m app.serve --checkpoint runs/demo [--host 127.0.0.1] [--port 8000]
    curl --data-binary @scan.nii.gz http://127.0.0.1:8000/predict
    curl --data-binary @series.zip http://127.0.0.1:8000/predict

``POST /predict``: the scan as the body (a NIfTI file or a zip of one DICOM series); the answer
is app.infer's row for it (prob_abnormal, label, threshold, warnings, error; 422 when the scan
cannot be classified, with why). ``GET /health``, ``GET /model`` (the model card). Bounded: the
body's size (413), work at once (503 with Retry-After beyond the slots and the queue), each
request's time (504). It listens on 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse

from app.cli import add_device_option, add_precision_option, fail


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", help="run folder, checkpoint file or bundle (default: newest run)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument(
        "--max-upload-mb", type=float, default=1024.0, help="largest body (default %(default)s)"
    )
    p.add_argument(
        "--max-concurrent", type=int, default=1, help="inferences at once (default %(default)s)"
    )
    p.add_argument(
        "--max-queue", type=int, default=4, help="requests that may wait (default %(default)s)"
    )
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per request (default %(default)s)"
    )
    add_device_option(p, "where the model runs (default auto: CUDA when there is a GPU)")
    add_precision_option(p, default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from app.errors import CTClassifyError, UsageError

    try:
        if not 0 < args.port < 65536:
            raise UsageError("--port must be in 1-65535")
        if (
            args.max_concurrent < 1
            or args.max_queue < 0
            or args.max_upload_mb <= 0
            or args.timeout <= 0
        ):
            raise UsageError(
                "--max-concurrent >= 1, --max-queue >= 0, --max-upload-mb and --timeout > 0"
            )
        import uvicorn

        from app.inference.classifier import Classifier
        from app.inference.service import ServiceLimits, create_app

        clf = Classifier.load(args.checkpoint, device=args.device, precision=args.precision)
        limits = ServiceLimits(
            max_upload_bytes=int(args.max_upload_mb * 2**20),
            max_concurrent=args.max_concurrent,
            max_queue=args.max_queue,
            timeout_s=args.timeout,
        )
        print(f"model: {clf.describe()}; device {clf.device}", flush=True)
        uvicorn.run(create_app(clf, limits), host=args.host, port=args.port, log_level="warning")
    except CTClassifyError as exc:
        return fail(exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
