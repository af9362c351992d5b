"""Exception types raised by ragseg.

Every problem a user can cause (a bad file, a missing label, missing weights) is raised as one
of these, with a message that names the file or key and says what is wrong, so the CLI and the
MONAI Label app can turn it into a clear error without a traceback.
"""

from __future__ import annotations


class RagsegError(Exception):
    """Base class for all errors this package raises on purpose."""


class InputError(RagsegError, ValueError):
    """An input file or array is unusable (wrong shape, NaNs, unreadable, unknown format...)."""

    def __init__(self, path: object, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class WeightsMissingError(RagsegError, FileNotFoundError):
    """A model checkpoint is not on disk. The message names the file and the fetch command."""

    def __init__(self, name: str, path: object, fetch_command: str):
        self.name = name
        self.path = str(path)
        self.fetch_command = fetch_command
        super().__init__(
            f"weights for {name!r} are missing: {self.path} does not exist. "
            f"Fetch them with `{fetch_command}` (or pass an explicit path for air-gapped sites)."
        )


class ChecksumError(RagsegError):
    """A downloaded or cached file does not have the SHA-256 it should have."""


class IndexCorruptError(RagsegError):
    """The on-disk slice index cannot be read; it must be rebuilt from the labels."""
