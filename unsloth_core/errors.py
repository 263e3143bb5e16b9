"""Errors a user can act on. Each message names the problem and, where there is one, the fix."""


class UnslothError(Exception):
    """Base class: the CLI prints these as one line, the service maps them to a 400-class error."""


class ModelFormatError(UnslothError):
    """A model directory, config or weight file we cannot load (missing, truncated, another architecture)."""


class ContextLengthError(UnslothError):
    """A prompt (plus the tokens asked for) longer than the model's context."""


class CapacityError(UnslothError):
    """A request the server cannot fit in memory now (its KV cache or prefill); other requests are unaffected."""


class EngineClosedError(UnslothError):
    """A request still running when its model's engine was stopped (the server shutting down)."""


class DataFormatError(UnslothError):
    """A training file that does not validate; `errors` holds every bad line."""

