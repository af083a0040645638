"""The errors of finding and reading a model file (shared by the loader and the model registry)."""

from __future__ import annotations

from metronome.config import ParamError


class ModelFileError(ValueError):
    """A model file or folder that metronome cannot use; the message names the file and the fix."""


class ModelNotFoundError(ParamError, ModelFileError):
    """`--model` / `draft` names neither an existing file or folder nor a registered model; `param` names
    the setting."""


class ModelInstallError(ModelFileError):
    """A registered model whose packages are missing, or whose file is not the pinned one; the message names
    the model, what differs and the command that fixes it."""
