"""The MONAI bundle exporter (``python -m app.export``); the code a bundle carries is ``app.runtime``."""
