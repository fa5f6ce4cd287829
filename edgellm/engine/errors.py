"""What can go wrong in the engine, each error with the status a front end answers with."""

from __future__ import annotations

import threading

from edgellm.errors import EdgeError, InvalidRequest, LocalFailure, NotFound


class ModelNotFound(NotFound):
    code = "model_not_found"
    param = "model"

    def __init__(self, name: str | None, available: list[str]) -> None:
        if not available:
            message = "no models are installed here: add one with `edgellm models add PATH`"
        elif name is None:
            message = f"'model' is required: this server has several ({', '.join(available)})"
        else:
            message = f"model '{name}' does not exist here; available: {', '.join(available)}"
        super().__init__(message)
        if name is None and available:
            self.status, self.code = 400, "model_required"
        self.name = name
        self.available = available


class NotGenerative(InvalidRequest):
    """An embedding model asked to generate text, or a generative one asked for embeddings."""

    code = "model_not_supported"
    param = "model"


class NotReady(LocalFailure):
    """The model is loading, failed to load, or cannot load yet; retry_after hints when to retry."""

    status = 503
    code = "model_not_ready"


class ModelTooLarge(LocalFailure):
    """The model cannot fit in memory here even with every other model unloaded."""

    status = 400
    code = "model_too_large"
    param = "model"


class NoRoom(LocalFailure):
    """It could fit, but never as configured: pinned models take every place ([models] max_loaded)."""

    status = 409
    code = "no_room"
    param = "model"


class ModelBusy(EdgeError):
    """An operation that must wait for the requests in flight on a model (removing it)."""

    status = 409
    code = "model_busy"
    param = "model"


class ModelLoadError(EdgeError):
    """llama.cpp could not load a model file or create its context."""

    code = "model_load_failed"


class StartTimeout(ModelLoadError):
    """The runner did not start in time; its thread may still be using the model."""

    def __init__(self, message: str, thread: threading.Thread) -> None:
        super().__init__(message)
        self.thread = thread


class QueueFull(LocalFailure):
    """Too many requests are waiting already; retry_after estimates when one will fit."""

    status = 429
    code = "queue_full"


class EngineError(LocalFailure):
    """A generation or embedding failed inside llama.cpp: the request ends, the service goes on."""

    code = "engine_error"


class ShuttingDown(EngineError):
    """The engine is stopping and takes no more work."""

    status = 503
    code = "shutting_down"

    def __init__(self, message: str = "the server is shutting down") -> None:
        super().__init__(message)


class RunnerFailed(EngineError):
    """The runner thread of a model ended unexpectedly; its model is loaded afresh on the next request."""

    status = 503
    code = "runner_failed"


class TemplateError(InvalidRequest):
    """The chat template could not render these messages."""

    code = "chat_template_error"
    param = "messages"


class SchemaError(InvalidRequest):
    """A JSON schema that cannot become a grammar."""

    code = "invalid_json_schema"
    param = "response_format"
