"""Finding the checkpoint: a local dir, or a Hub id at a revision (via the HF cache)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export import gguf, imported
from export.errors import ExportError
from sidecar.errors import ModelLoadError
from sidecar.model_files import links_outside
from sidecar.models.manifest import sha256_file

# Enough to rebuild the model, its tokenizer and chat templates; never pickles unless asked for.
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.txt",
    "*.model",
    "*.jinja",
    "1_Pooling/*",
    "additional_chat_templates/*",
    "tokenizer*",
]


@dataclass(frozen=True)
class Source:
    """A checkpoint on local disk and where it came from."""

    path: Path
    hub_id: str | None = None
    revision: str | None = None
    # A GGUF file the checkpoint is dequantized from (it lies in `path`).
    gguf: Path | None = None
    # A pre-exported ONNX graph in `path` to import instead of exporting from weights.
    onnx_graph: Path | None = None

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's `source` object."""
        entry: dict[str, Any] = {
            "path": None if self.hub_id else str(self.gguf or self.path),
            "hub_id": self.hub_id,
            "revision": self.revision,
        }
        if self.gguf is not None:
            entry["gguf_file"] = self.gguf.name
            entry["gguf_sha256"] = sha256_file(self.gguf)
        if self.onnx_graph is not None:
            entry["onnx_file"] = str(self.onnx_graph.relative_to(self.path))
        return entry


def resolve(
    name: str,
    revision: str | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    onnx_file: str | None = None,
    follow_symlinks: bool = False,
) -> Source:
    """A local checkpoint dir or GGUF file as is, otherwise a Hub id downloaded (or found in
    the cache). A dir with a pre-exported ONNX graph and no weights (or `onnx_file`) names
    that graph for import."""
    local = Path(name).expanduser()
    if local.exists() and revision:
        raise ExportError(f"--revision applies to Hub ids, but {name} is a local path")
    if local.is_file():
        return _gguf_file(name, local, onnx_file=onnx_file)
    if local.is_dir():
        if not follow_symlinks:
            check_links(local)
        source = Source(path=local.resolve())
        graph = imported.find_graph(source.path, onnx_file)
        if graph is not None:
            return Source(path=source.path, onnx_graph=graph)
        found = gguf.find(source.path)
        if found is not None:
            return Source(path=source.path, gguf=found)
    elif local.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ExportError(f"{name} is neither a checkpoint directory nor a Hub id like org/model")
    else:
        if trust_remote_code and not _is_commit(revision):
            raise ExportError(
                f"--trust-remote-code runs {name}'s own Python code: pin --revision to a full "
                f"commit sha (40 hex characters), not {revision or 'the main branch'!r}, so the "
                "code you reviewed is the code that runs"
            )
        source = _from_hub(
            name,
            revision,
            allow_pickle=allow_pickle,
            remote_code=trust_remote_code,
            onnx_file=onnx_file,
        )
        if onnx_file:
            graph = imported.find_graph(source.path, onnx_file)
            return Source(source.path, source.hub_id, source.revision, onnx_graph=graph)
    check_weights(source.path, allow_pickle=allow_pickle)
    return source


def _gguf_file(name: str, local: Path, *, onnx_file: str | None) -> Source:
    """A checkpoint given as one file (`name` as given, `local` its path): only GGUF is one."""
    if gguf.find(local) is None:
        raise ExportError(
            f"{name} is a file but not a .gguf model: pass a checkpoint directory, a GGUF "
            "file or a Hub id like org/model"
        )
    if onnx_file:
        raise ExportError("--onnx-file imports a graph from a directory, not from a GGUF file")
    return Source(path=local.parent.resolve(), gguf=local.resolve())


def check_links(checkpoint: Path) -> None:
    """Refuse a local checkpoint holding links that lead outside it (--follow-symlinks reads
    them anyway): what a model dir serves should be what its checkpoint dir holds."""
    root = checkpoint.resolve()
    # The Hub cache's own layout: snapshots/<revision>/ files are links into ../../blobs/.
    blobs = root.parent.parent / "blobs"
    allowed = (blobs,) if root.parent.name == "snapshots" and blobs.is_dir() else ()
    try:
        for link, target in links_outside(root, allowed):
            raise ExportError(
                f"{link} is a link to {target}, outside the checkpoint {root}: copy the file "
                "into the checkpoint, or pass --follow-symlinks to read it anyway"
            )
    except ModelLoadError as exc:  # a link that loops
        raise ExportError(str(exc)) from None


def _is_commit(revision: str | None) -> bool:
    return (
        revision is not None
        and len(revision) == 40
        and all(c in "0123456789abcdef" for c in revision)
    )


def _from_hub(
    repo_id: str,
    revision: str | None,
    *,
    allow_pickle: bool,
    remote_code: bool,
    onnx_file: str | None,
) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = (
        HUB_PATTERNS + (["*.bin"] if allow_pickle else []) + (["*.py"] if remote_code else [])
    )
    if onnx_file:
        # The one graph asked for and its external data: not every variant the repo ships,
        # nor the weights an import does not use.
        patterns = [p for p in patterns if p not in ("*.safetensors", "*.bin")]
        patterns += [onnx_file, f"{onnx_file}_data*", f"{onnx_file}.data"]
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise ExportError(
            f"{repo_id}@{revision or 'main'} is not in the local Hugging Face cache and the Hub "
            "cannot be reached (HF_HUB_OFFLINE=1 or no network): download it where a network "
            "exists, or pass a local checkpoint directory"
        ) from None
    except (HfHubHTTPError, ValueError) as exc:
        raise ExportError(
            f"cannot fetch {repo_id}@{revision or 'main'} from the Hub: {exc}"
        ) from None
    # Snapshots live under snapshots/<commit>: record the commit, not a movable branch name.
    return Source(path=path, hub_id=repo_id, revision=path.name)


def check_weights(path: Path, *, allow_pickle: bool) -> None:
    """Refuse pickle-only checkpoints (loading a pickle runs arbitrary code) and safetensors
    files whose header cannot be read, naming the file."""
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        from safetensors import safe_open

        for file in safetensors:
            try:
                with safe_open(str(file), framework="np"):
                    pass
            except Exception as exc:  # safetensors raises its own SafetensorError
                raise ExportError(
                    f"{file} is not a readable safetensors file ({exc}): the download may be "
                    "incomplete; fetch the checkpoint again"
                ) from None
        return
    pickles = sorted(p.name for p in path.glob("*.bin"))
    if not pickles:
        raise ExportError(
            f"{path} holds no weights: export a transformers checkpoint (safetensors "
            "weights, or pickle .bin weights with --allow-pickle), a GGUF file, or a dir with "
            "a pre-exported ONNX graph (model.onnx or onnx/model*.onnx; from the Hub, name it "
            "with --onnx-file)"
        )
    if not allow_pickle:
        raise ExportError(
            f"{path} has only pickle weights ({', '.join(pickles)}); loading them can run "
            "arbitrary code. Convert the checkpoint to safetensors, or pass --allow-pickle "
            "if you trust its author"
        )
