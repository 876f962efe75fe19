"""Training: the workflow behind ``python -m app.train``, the Ignite handlers, batch preparation,
cached datasets and multi-process helpers."""
