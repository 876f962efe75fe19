"""Inference: the Python API (``Classifier``), the checks before and after a scan is read, the
predictions log, the model card and the report."""
