"""The MONAI bundle: export (``python -m app.export``) and the portable code a bundle carries."""
