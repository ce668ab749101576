"""The configured models by name, their load state, and routing a call to one of them."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from sidecar.config import ModelSettings, Settings
from sidecar.domain import ModelState, ModelStatus
from sidecar.errors import (
    PROPAGATE,
    ConfigError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    SidecarError,
    WrongTaskError,
)
from sidecar.models.manifest import Manifest, Task, read_manifest
from sidecar.runtime.devices import canonical_device
from sidecar.serving.loader import choose_backend, load_model
from sidecar.serving.served import LoadedModel

log = logging.getLogger(__name__)

OnState = Callable[[str, ModelState], Awaitable[None]]


@dataclass
class _Entry:
    settings: ModelSettings
    status: ModelStatus
    model: LoadedModel | None = None


def _name_and_manifest(model: ModelSettings) -> tuple[str, Manifest | None, str]:
    """Read the manifest early so a model is listed under its real name even if it fails."""
    try:
        manifest = read_manifest(model.path)
    except ModelLoadError as exc:
        return model.name or Path(model.path).name, None, str(exc)
    except PROPAGATE:
        raise
    except BaseException as exc:  # any file of a model dir fails that model alone
        error = f"{model.path} cannot be read ({type(exc).__name__}: {exc})"
        return model.name or Path(model.path).name, None, error
    return model.name or manifest.name, manifest, ""


class ModelRegistry:
    """Knows every configured model; hands out only the ones that are serving."""

    def __init__(
        self,
        settings: Settings,
        on_loaded: Callable[[str, float], None] | None = None,
        attach: Callable[[LoadedModel], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_loaded = on_loaded  # (name, seconds) once a model serves
        self._attach = attach  # gives a loaded model its engine, before it serves
        self._entries: dict[str, _Entry] = {}
        # Names the operator gave (name=path) come first, wherever they stand in the list: a
        # dir's own manifest can neither take one nor stop the server by colliding with it.
        given = [m.name for m in settings.models if m.name]
        for name in given:
            if given.count(name) > 1:
                raise ConfigError(
                    f"two models are named {name!r}: give one another name (name=path)"
                )
        failed_reading = False
        for model in settings.models:
            name, manifest, error = _name_and_manifest(model)
            failed_reading |= manifest is None and not model.name  # unnamed: it may be it
            backend = settings.model_backend(model)
            if manifest is not None:
                try:
                    backend = choose_backend(backend, manifest, model.path)
                except ModelLoadError as exc:
                    error = str(exc)
            if not model.name and (name in given or name in self._entries):
                source = "its manifest names it" if manifest else "its dir is named"
                error = error or (
                    f"{model.path}: {source} {name!r}, the name of another model: serve it "
                    "under another name (name=path)"
                )
                name, manifest = str(model.path), None
            if name in self._entries or (not model.name and name in given):
                raise ConfigError(
                    f"{model.path} cannot be listed under a name of its own ({name!r} is "
                    "taken): list each model dir once, and give it a name (name=path)"
                )
            status = ModelStatus(
                name=name,
                state=ModelState.FAILED if error else ModelState.LOADING,
                backend=backend,
                device=canonical_device(settings.model_device(model)),
                manifest=manifest,
                error=error,
                task=manifest.task if manifest else None,
            )
            self._entries[name] = _Entry(model, status)
        self.default_name = settings.default_model or next(iter(self._entries))
        if self.default_name not in self._entries:
            if not failed_reading:
                raise ConfigError(
                    f"default_model {self.default_name!r} is not among the models: "
                    f"{self.names_text()}"
                )
            # It may be the dir that could not be read: the others serve, and calls for the
            # default get NOT_FOUND naming the models there are.
            log.error(
                "default_model %r is none of the models (%s): a dir that could not be read may "
                "be it",
                self.default_name,
                self.names_text(),
            )

    def names_text(self) -> str:
        """Served model names for error messages."""
        return ", ".join(repr(n) for n in self._entries)

    async def load_all(self, executor: Executor, on_state: OnState) -> None:
        """Load every model on the executor, one after another; a failure fails only its model.

        on_state(name, state) is awaited as each model settles (health reporting).
        """
        loop = asyncio.get_running_loop()
        for entry in self._entries.values():
            await self._load(loop, executor, entry)
            await on_state(entry.status.name, entry.status.state)

    async def _load(
        self, loop: asyncio.AbstractEventLoop, executor: Executor, entry: _Entry
    ) -> None:
        manifest = entry.status.manifest
        if manifest is None:
            log.error("model %s refused: %s", entry.status.name, entry.status.error)
            return
        began = time.perf_counter()
        try:
            load = functools.partial(
                load_model,
                entry.status.name,
                entry.settings.path,
                manifest,
                entry.status.device,
                self._settings.pass_threads(entry.settings),
                verify_checksums=self._settings.verify_checksums,
                backend=entry.status.backend,
                torch_dtype=self._settings.model_dtype(entry.settings),
                half_lane=self._settings.adaptive_passes,
            )
            entry.model = await loop.run_in_executor(executor, load)
        except SidecarError as exc:
            log.error("model %s refused: %s", entry.status.name, exc)
            entry.status.state, entry.status.error = ModelState.FAILED, str(exc)
        except PROPAGATE:
            raise
        except BaseException as exc:
            # ONNX Runtime and tokenizers raise their own errors (a corrupt graph, CUDA out of
            # memory in warm-up): they fail this model, never the server or the other models.
            log.exception("model %s failed to load", entry.status.name)
            entry.status.state = ModelState.FAILED
            entry.status.error = f"{type(exc).__name__}: {exc}"
        else:
            if self._attach is not None:
                self._attach(entry.model)
            entry.status.state = ModelState.SERVING
            if self._on_loaded is not None:
                self._on_loaded(entry.status.name, time.perf_counter() - began)

    def __iter__(self) -> Iterator[ModelStatus]:
        return (entry.status for entry in self._entries.values())

    def status(self, name: str) -> ModelStatus:
        """A model's status by name (empty: the default model)."""
        return self._entry(name).status

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name or self.default_name)
        if entry is None and not name:
            raise ModelNotFoundError(
                f"no model named {self.default_name!r} (default_model) is served; its dir may "
                f"be one that could not be read. This sidecar serves {self.names_text()}: name "
                "one in `model`"
            )
        if entry is None:
            raise ModelNotFoundError(
                f"no model named {name!r}; this sidecar serves {self.names_text()} "
                "(leave model empty for the default)"
            )
        return entry

    def resolve(self, name: str, tasks: Task | tuple[Task, ...] = (), rpc: str = "") -> LoadedModel:
        """The serving model for a call, checked against the task(s) the call needs."""
        entry = self._entry(name)
        status = entry.status
        wanted = (tasks,) if isinstance(tasks, Task) else tasks
        if wanted and status.task is not None and status.task not in wanted:
            able = [e.status.name for e in self._entries.values() if e.status.task in wanted]
            hint = f"models that do: {', '.join(able)}" if able else "no served model does"
            raise WrongTaskError(
                f"model {status.name!r} does {status.task.value}, but {rpc} needs a "
                f"{' or '.join(t.value for t in wanted)} model; {hint}"
            )
        if status.state is ModelState.LOADING:
            raise ModelNotReadyError(f"model {status.name!r} is still loading; retry shortly")
        if status.state is ModelState.FAILED or entry.model is None:
            raise ModelNotReadyError(f"model {status.name!r} failed to load: {status.error}")
        return entry.model

    @property
    def serving(self) -> bool:
        """True when at least one model serves."""
        return any(e.status.state is ModelState.SERVING for e in self._entries.values())
