"""Typed errors of ctclassify, and the exit status each gives: every command line prints an
error as one line and exits with its class's ``exit_status`` (``app.cli.fail``)."""

from __future__ import annotations

#: the exit statuses of every command line (the README's table)
EXIT_DONE = 0  # everything done
EXIT_FAILED = 1  # the work ran but some inputs failed (their rows say why), or the work failed
EXIT_REFUSED = 2  # a usage error or a refused input, setting or file: nothing was done
EXIT_INTERRUPTED = 130  # stopped by a signal; a rerun (--resume) continues


class CTClassifyError(Exception):
    """Base class: a problem the user can act on (message says what and where)."""

    exit_status = EXIT_FAILED


class DataError(CTClassifyError):
    """The data (a root folder, a datalist, a scan) is missing or unusable."""

    exit_status = EXIT_REFUSED


class DownloadError(CTClassifyError):
    """A download failed: network unreachable, wrong size, bad archive."""


class ConfigError(CTClassifyError):
    """A configuration or command-line setting is invalid."""

    exit_status = EXIT_REFUSED


class UsageError(CTClassifyError):
    """A command-line value that cannot work (a CLI prints it as one line, exit status 2)."""

    exit_status = EXIT_REFUSED
