"""The loader: a known model's weights, chat template and runner, on the hardware plan's backends.

load() blocks (seconds to minutes: it reads the weights and runs a warm-up decode) and
is run in a worker thread. It tries the plan's steps in order: a load that fails on a
GPU (a broken driver, too little GPU memory) is tried again on the next, the CPU last.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from edgellm.config import EngineConfig
from edgellm.engine.catalog import Known, snapshot_key
from edgellm.engine.chat import ChatTemplate
from edgellm.engine.errors import EngineError, ModelLoadError, StartTimeout
from edgellm.engine.model import Model
from edgellm.engine.prompt_cache import PromptCache
from edgellm.engine.runner import Runner
from edgellm.hardware.plan import Plan
from edgellm.metrics import Metrics

log = logging.getLogger("edgellm.engine")


class Loaded:
    """A model ready to serve: weights, the runner that runs it, and how to prompt it.

    Requests hold it while they use it (on the event loop or in a worker thread); the
    weights are freed only when nobody holds them.
    """

    def __init__(self, known: Known, model: Model, runner: Runner, chat_template: ChatTemplate | None, *,
                 backend: str, gpu_layers: int) -> None:
        self.id = known.id
        self.model = model
        self.runner = runner
        self.chat_template = chat_template  # None for embedding models
        self.defaults = known.entry.defaults  # sampling defaults the model recommends
        self.backend = backend  # cuda, vulkan or cpu
        self.gpu_layers = gpu_layers
        self.leases = 0  # requests in flight on it (users counts worker threads' holds too)
        self._users = 0
        self._idle = threading.Condition()

    @property
    def users(self) -> int:
        return self._users

    def acquire(self) -> None:
        with self._idle:
            self._users += 1

    def release(self) -> None:
        with self._idle:
            self._users -= 1
            if self._users == 0:
                self._idle.notify_all()

    @contextmanager
    def held(self) -> Iterator[Loaded]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._users == 0, timeout)

    def close(self) -> bool:
        """Stop the runner and free the weights once nobody holds them; False if someone still does
        after a while (a worker thread still tokenizing): leaking beats a use-after-free."""
        self.runner.close()
        if not self.wait_idle(10):
            return False
        self.model.close()
        return True


def load(known: Known, engine: EngineConfig, plan: Plan, *, metrics: Metrics,
         on_exit: Callable[[str], None], prompt_cache: PromptCache | None = None) -> Loaded:
    """Load on the plan's first backend that works. `on_exit(reason)`: the runner thread ended
    by itself (runner.py). `prompt_cache`: where the runner keeps prompt snapshots."""
    n_layer = known.headers[0].arch_int("block_count", 0)
    steps = plan.steps
    for i, step in enumerate(steps):
        layers = plan.gpu_layers(step, known.estimate, n_layer, engine.n_gpu_layers)
        try:
            return _load_on(known, engine, step.device if layers else "", layers, metrics, on_exit,
                            backend=step.backend if layers else "cpu", gpu_layers=min(layers, n_layer + 1),
                            prompt_cache=prompt_cache)
        except StartTimeout:
            raise  # it may start yet, holding that backend's memory: trying another would double it
        except (ModelLoadError, EngineError) as e:
            if i == len(steps) - 1:
                raise
            log.warning("loading model %s on %s failed (%s); trying %s instead", known.id,
                        step.device or step.backend, e, steps[i + 1].device or steps[i + 1].backend)
    raise AssertionError("the plan always ends with the CPU")


def _load_on(known: Known, engine: EngineConfig, device: str, layers: int, metrics: Metrics,
             on_exit: Callable[[str], None], *, backend: str, gpu_layers: int,
             prompt_cache: PromptCache | None) -> Loaded:
    entry = known.entry
    model = Model(entry.paths, n_gpu_layers=layers, device=device)
    try:
        template = None if model.is_embedding else ChatTemplate.for_model(model, entry.chat_template)
        if template is not None:
            # Walks over the vocabulary, here rather than in a request.
            model.control_initials  # noqa: B018
            model.hidden_tokens  # noqa: B018
        runner = Runner(model, engine, model_id=entry.id, metrics=metrics, on_exit=on_exit,
                        prompt_cache=prompt_cache, model_key=snapshot_key(entry))
    except StartTimeout as e:  # the weights go once the runner's thread has let go of them, if it ever does
        threading.Thread(target=_free_after, args=(e.thread, model), name="edgellm-late-free", daemon=True).start()
        raise
    except BaseException:
        model.close()
        raise
    return Loaded(known, model, runner, template, backend=backend, gpu_layers=gpu_layers)


def _free_after(thread: threading.Thread, model: Model) -> None:
    thread.join()
    model.close()
