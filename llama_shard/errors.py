"""User-facing errors. Each carries one sentence that names the problem and its numbers."""


class LlamaShardError(Exception):
    """Base class for errors the CLI reports as one line (exit code 2), never as a traceback."""


class ModelFormatError(LlamaShardError):
    """The model file or directory is missing, corrupt, truncated or of an unsupported kind."""


class ContextLengthError(LlamaShardError):
    """A prompt (plus the tokens asked for) does not fit the context."""
