"""Finding the checkpoint: a local dir, or a Hub id at a revision (via the HF cache)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sidecar.errors import ExportError

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

    def manifest_entry(self) -> dict[str, str | None]:
        """The manifest's `source` object."""
        return {
            "path": None if self.hub_id else str(self.path),
            "hub_id": self.hub_id,
            "revision": self.revision,
        }


def resolve(
    name: str,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Source:
    """A local checkpoint dir as is, otherwise a Hub id downloaded (or found in the cache)."""
    local = Path(name).expanduser()
    if local.is_dir():
        if revision:
            raise ExportError(f"--revision applies to Hub ids, but {name} is a local directory")
        source = Source(path=local.resolve())
    elif local.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ExportError(f"{name} is neither a checkpoint directory nor a Hub id like org/model")
    else:
        if trust_remote_code and not _is_commit(revision):
            raise ExportError(
                f"--trust-remote-code runs {name}'s own Python code: pin --revision to a full "
                f"commit sha (40 hex characters), not {revision or 'the main branch'!r}, so the "
                "code you reviewed is the code that runs"
            )
        source = _from_hub(name, revision, allow_pickle, trust_remote_code)
    check_weights(source.path, allow_pickle)
    return source


def _is_commit(revision: str | None) -> bool:
    return (
        revision is not None
        and len(revision) == 40
        and all(c in "0123456789abcdef" for c in revision)
    )


def _from_hub(repo_id: str, revision: str | None, allow_pickle: bool, remote_code: bool) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = (
        HUB_PATTERNS + (["*.bin"] if allow_pickle else []) + (["*.py"] if remote_code else [])
    )
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


def check_weights(path: Path, allow_pickle: bool) -> None:
    """Refuse pickle-only checkpoints: loading a pickle runs arbitrary code."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.glob("*.bin"))
    if not pickles:
        raise ExportError(
            f"{path} holds no safetensors weights; a checkpoint with only pickle (.bin) "
            "weights needs --allow-pickle"
        )
    if not allow_pickle:
        raise ExportError(
            f"{path} has only pickle weights ({', '.join(pickles)}); loading them can run "
            "arbitrary code. Convert the checkpoint to safetensors, or pass --allow-pickle "
            "if you trust its author"
        )
