"""Routing a call to a model, and request checks that need no model."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import ModelSettings, Settings
from sidecar.dataplane.registry import ModelRegistry
from sidecar.domain import ModelState
from sidecar.errors import (
    ConfigError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    WrongTaskError,
)
from sidecar.models.manifest import Task
from sidecar.tasks.checks import check_inputs, check_non_negative


def registry(*models: ModelSettings, default: str | None = None) -> ModelRegistry:
    return ModelRegistry(Settings(models=models, default_model=default))


def test_loading_models_answer_unavailable(classifier_dir: Path) -> None:
    reg = registry(ModelSettings(path=classifier_dir))
    assert reg.status("").state is ModelState.LOADING
    with pytest.raises(ModelNotReadyError, match="'triage' is still loading; retry shortly"):
        reg.resolve("triage", Task.CLASSIFY, "Classify")


def test_wrong_task_is_checked_before_readiness(classifier_dir: Path) -> None:
    with pytest.raises(
        WrongTaskError, match="Embed needs a feature-extraction model; no served model does"
    ):
        registry(ModelSettings(path=classifier_dir)).resolve("", Task.EMBED, "Embed")


def test_unreadable_dir_is_failed_under_its_dir_name(tmp_path: Path) -> None:
    reg = registry(ModelSettings(path=tmp_path / "ghost"))
    status = reg.status("ghost")
    assert status.state is ModelState.FAILED
    assert "has no manifest.json" in status.error
    with pytest.raises(
        ModelNotFoundError, match="no model named 'other'; this sidecar serves 'ghost'"
    ):
        reg.resolve("other")


def test_names_must_be_unique_and_default_must_exist(classifier_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="two models are named 'triage'"):
        registry(
            ModelSettings(path=classifier_dir, name="triage"),
            ModelSettings(path=tmp_path, name="triage"),
        )
    # A name only a dir's manifest gave cannot take a name the operator gave, before or after
    # it in the list, nor stop the server: that dir fails, listed under its path.
    for models in (
        (ModelSettings(path=classifier_dir), ModelSettings(path=tmp_path, name="triage")),
        (ModelSettings(path=tmp_path, name="triage"), ModelSettings(path=classifier_dir)),
    ):
        reg = registry(*models)
        assert reg.status("triage").error.endswith(
            "has no manifest.json: it is not a model dir. "
            "Create one with: sidecar-export <checkpoint> <model-dir>"
        )
        taken = reg.status(str(classifier_dir))
        assert taken.state is ModelState.FAILED
        assert "its manifest names it 'triage', the name of another model" in taken.error
    twice = registry(ModelSettings(path=classifier_dir), ModelSettings(path=classifier_dir))
    assert twice.status("triage").state is ModelState.LOADING
    assert twice.status(str(classifier_dir)).state is ModelState.FAILED
    # A dir that cannot be read keeps its own reason, even when its dir name is taken.
    ghost = tmp_path / "ghost"
    reg = registry(ModelSettings(path=classifier_dir, name="ghost"), ModelSettings(path=ghost))
    assert "has no manifest.json" in reg.status(str(ghost)).error
    # default_model may be the dir that could not be read: the rest still serve.
    reg = registry(ModelSettings(path=classifier_dir), ModelSettings(path=ghost), default="pii")
    with pytest.raises(ModelNotFoundError, match="no model named 'pii'"):
        reg.resolve("")
    with pytest.raises(ConfigError, match="default_model 'nope' is not among the models: 'triage'"):
        registry(ModelSettings(path=classifier_dir), default="nope")
    renamed = registry(
        ModelSettings(path=classifier_dir),
        ModelSettings(path=classifier_dir, name="t2"),
        default="t2",
    )
    assert renamed.default_name == "t2"


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([], "inputs is empty"),
        (["a"] * 5, "5 inputs, over max_client_batch_size 4"),
        (["a", ""], r"inputs\[1\] is empty or whitespace-only"),
        (["a", "b", " \t\n"], r"inputs\[2\] is empty or whitespace-only"),
    ],
)
def test_input_checks(inputs: list[str], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        check_inputs(inputs, limit=4)


def test_counts() -> None:
    check_non_negative("top_k", 0)
    with pytest.raises(InvalidInputError, match=r"top_k must be 0 .no limit. or positive, got -3"):
        check_non_negative("top_k", -3)
