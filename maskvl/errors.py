"""User-facing errors: each carries a one-line message the CLI prints without a traceback."""

from __future__ import annotations


class MaskvlError(Exception):
    """Bad input or an unusable environment; the message is one line, meant for the user."""

    exit_code = 2


class InputError(MaskvlError, ValueError):
    """An argument, image, prompt or file that maskvl cannot use."""


class ModelLoadError(MaskvlError):
    """A model id or directory that cannot be loaded."""


class OutOfMemory(MaskvlError):
    """The device ran out of memory even after the engine shrank its batches; the message names the
    options that lower memory use."""
