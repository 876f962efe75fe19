"""Generators of test data that share no code with ``app.data.synth``: the tests import them,
the studies run them (``python -m testdata.NAME``); the wheel leaves them out."""
