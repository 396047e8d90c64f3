"""The installed package's version, for the servers' info and metadata routes."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """inferd's version; "0" when it runs from a source tree that was never installed."""
    try:
        return version("inferd")
    except PackageNotFoundError:
        return "0"
