"""User-facing error types.

Every error a user can cause (a wrong file, a wrong model, a word missing from
the prompt) is raised as a subclass of :class:`ModAdapterError` with a message
that names the problem and says what to do. ComfyUI shows the message in the
UI; the CLI prints it without a traceback.
"""


class ModAdapterError(ValueError):
    """Base class of every error caused by the user's input."""


class ConfigError(ModAdapterError):
    """An adapter configuration is inconsistent or unknown."""


class CheckpointError(ModAdapterError):
    """An adapter checkpoint file cannot be used."""


class ConceptFileError(ModAdapterError):
    """A concept file cannot be used."""


class ConceptWordNotFoundError(ModAdapterError):
    """A concept word does not occur in the prompt."""


class ModelMismatchError(ModAdapterError):
    """The diffusion model is not the kind this pack can patch."""
