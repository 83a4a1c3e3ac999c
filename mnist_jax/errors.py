"""Errors that the CLI turns into one-line messages and exit codes.

``DataError`` (exit 1) means the data, an image or a saved run is bad;
``UsageError`` (exit 2) means the user asked for something invalid.
"""

from __future__ import annotations


class MnistJaxError(Exception):
    """Base class: an expected failure with a one-line message."""

    exit_code = 1


class DataError(MnistJaxError):
    """Bad input data: missing/damaged files, wrong format, inconsistent contents."""

    exit_code = 1


class UsageError(MnistJaxError):
    """Invalid request from the user: bad flag values, wrong folder, refused overwrite."""

    exit_code = 2


def first_line(e: object) -> str:
    """The first line of ``e``'s message (an exception or any text), for a one-line error
    that quotes it; "" when it has none."""
    text = str(e).strip().splitlines()
    return text[0].strip() if text else ""
