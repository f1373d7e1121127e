"""Errors the engine raises to its callers."""

from __future__ import annotations


class EngineError(RuntimeError):
    """The engine failed to serve a request (load failure, fatal llama.cpp error, shutdown)."""


class EngineNotReadyError(EngineError):
    """The model is not loaded yet (or failed to load): the engine cannot take work now."""


class EngineStoppedError(EngineError):
    """The engine was stopped while the request was in flight."""


class ModelLoadError(EngineError):
    """llama.cpp could not load the model or create its context."""


class DoesNotFitError(ModelLoadError):
    """The settings need more memory than is free: refused before anything was allocated."""


class PromptTooLongError(ValueError):
    """prompt tokens + max_tokens do not fit the context a single sequence may use."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.limit = limit
        super().__init__(
            f"this model's context is {limit} tokens per sequence, but the request needs "
            f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt + {max_tokens} max_tokens)"
        )


class EmptyPromptError(ValueError):
    """The prompt tokenized to nothing: there is no position to generate from."""

    def __init__(self) -> None:
        super().__init__("the prompt is empty")


class InvalidTokenError(ValueError):
    """A token id (in the prompt or the logit bias) outside the model's vocabulary."""

    def __init__(self, where: str, n_vocab: int) -> None:
        self.where = where
        super().__init__(f"{where}: token ids must be in [0, {n_vocab})")


class SpeculationUnavailableError(ValueError):
    """A request asked for speculative decoding from an engine started without it."""

    def __init__(self) -> None:
        super().__init__("speculative decoding is off on this server (start it with --spec-type ngram-simple "
                         "or draft-simple)")


class InvalidGrammarError(ValueError):
    """llama.cpp's grammar parser refused a request's grammar."""
