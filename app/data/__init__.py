"""Data: class folders and datalists, the generated MosMed-like data, the MosMedData download
(``python -m app.data``)."""
