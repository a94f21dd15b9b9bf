"""Exceptions of the engine. Every message says what is wrong and what to do about it."""


class TextsegError(Exception):
    """Base class: an error the user can act on (the CLI prints it without a traceback)."""

    exit_code = 1


class InputError(TextsegError):
    """The input image or segmentation cannot be used (unreadable, 4D, empty, NaN, ...)."""


class UsageError(TextsegError):
    """The request itself is wrong (unknown model, unsupported modality, bad prompt, ...)."""

    exit_code = 2


class WeightsError(TextsegError):
    """Model weights are missing, incomplete, corrupt or cannot be downloaded."""


class ModelError(TextsegError):
    """A model failed while running."""


class OutputExistsError(TextsegError):
    """An output file exists and overwriting was not asked for."""


class Cancelled(TextsegError):
    """The operation was cancelled by the user. Completed work is kept."""


class ServerError(TextsegError):
    """A remote inference server cannot be reached, failed, or speaks another API version."""


class AuthError(ServerError):
    """The remote server refused the API key (missing or wrong)."""
