"""Typed errors of ctclassify; the command lines turn them into one-line messages and exit codes."""

from __future__ import annotations


class CTClassifyError(Exception):
    """Base class: a problem the user can act on (message says what and where)."""


class DataError(CTClassifyError):
    """The data (a root folder, a datalist, a scan) is missing or unusable."""


class DownloadError(CTClassifyError):
    """A download failed: network unreachable, wrong size, bad archive."""


class ConfigError(CTClassifyError):
    """A configuration or command-line setting is invalid."""


class UsageError(CTClassifyError):
    """A command-line value that cannot work (a CLI prints it as one line, exit status 2)."""
