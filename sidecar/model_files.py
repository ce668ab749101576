"""Reading a model dir's files: only inside the dir, only regular files, bounded in size.

Model dirs come from volumes, images and init containers other teams write, so nothing in
one may make the server read elsewhere: a name in the manifest is refused if it is
absolute or climbs with `..`, and a dir holding anything that resolves outside it
(a symlink to another volume, to /dev/zero) is refused whole, since ONNX Runtime and
transformers open files (external data, configs) the sidecar never names. Every failure
names the file and what was wrong with it.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from sidecar.errors import ModelLoadError

MIB = 1 << 20
# manifest.json, config.json, tokenizer_config.json, special_tokens_map.json, chat templates:
# real ones are kilobytes (a config with thousands of labels stays under 1 MiB).
MAX_METADATA_BYTES = 8 * MIB
# tokenizer.json: the largest real ones (256k-token multilingual vocabularies) are 30-35 MB.
MAX_TOKENIZER_BYTES = 64 * MIB


def shown(value: Any) -> str:
    """A value from a model dir for a message: repr, cut so a hostile one cannot flood logs."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "…"


def relative_name(value: Any, entry: str, where: Path) -> str:
    """`value` as a name inside a model dir; refuses absolute names and `..` components.

    entry says where the name came from ("files entry", "onnx_file"), for the message.
    """
    if not isinstance(value, str) or not value:
        raise ModelLoadError(f"{where}: {entry} {shown(value)} is not a file name")
    name = PurePosixPath(value)
    if name.is_absolute() or "\\" in value or "\0" in value:
        raise ModelLoadError(
            f"{where}: {entry} {shown(value)} is not a name inside the model dir: model dirs "
            "may only name their own files"
        )
    if ".." in name.parts:
        raise ModelLoadError(
            f"{where}: {entry} {shown(value)} climbs out of the model dir with '..': model "
            "dirs may only name their own files"
        )
    return value


def resolved(path: Path) -> Path:
    """Where a path leads once every link is followed; a loop or an unreadable link is named."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: a link loop, before Python 3.13
        raise ModelLoadError(f"{path} is a link that cannot be followed ({exc})") from None


def absent(path: Path) -> bool:
    """True when nothing (not even a dangling link) is at `path`; unreadable is an error."""
    try:
        path.lstat()
    except FileNotFoundError:
        return True
    except OSError as exc:
        raise ModelLoadError(f"{path} cannot be read ({exc.strerror or exc})") from None
    return False


def inside(model_dir: Path, name: str) -> Path:
    """model_dir / name, refused when a link makes it resolve outside the dir."""
    path = model_dir / name
    root = resolved(model_dir)
    target = resolved(path)
    if not target.is_relative_to(root):
        raise ModelLoadError(
            f"{path} is a link to {target}, outside the model dir {root}: copy the file into "
            "the dir instead of linking to it"
        )
    return path


def links_outside(root: Path, allowed: tuple[Path, ...] = ()) -> Iterator[tuple[Path, Path]]:
    """(link, target) for each link under root that resolves outside root and `allowed`.

    Raises ModelLoadError for a link that loops."""
    roots = (resolved(root), *(resolved(a) for a in allowed))
    for top, dirs, names in os.walk(root):
        for name in (*dirs, *names):
            path = Path(top) / name
            if path.is_symlink():
                target = resolved(path)
                if not any(target.is_relative_to(r) for r in roots):
                    yield path, target


def check_contained(model_dir: Path) -> None:
    """Refuse a dir holding a link that resolves outside it, or a file that is not regular.

    Links that stay inside (a Kubernetes ConfigMap's `..data` layout) are fine.
    """
    for path, _ in links_outside(model_dir):  # named under the dir as configured
        inside(model_dir, str(path.relative_to(model_dir)))  # raises, naming link and target
    for top, _, names in os.walk(model_dir):
        for name in names:
            path = Path(top) / name
            try:
                mode = path.stat().st_mode  # links were checked above: this is their target
            except OSError as exc:
                raise ModelLoadError(f"{path} cannot be read ({exc.strerror or exc})") from None
            if not stat.S_ISREG(mode):
                raise ModelLoadError(
                    f"{path} is not a regular file (a pipe, socket or device): "
                    "a model dir holds files and dirs only"
                )


def read_bytes(path: Path, limit: int) -> bytes:
    """A regular file's bytes, refused by name when larger than `limit` or not a file."""
    try:
        # O_NONBLOCK: opening a named pipe must not wait for a writer (regular files ignore it).
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ModelLoadError(f"{path} is not a regular file")
            if info.st_size > limit:
                raise ModelLoadError(_too_large(path, info.st_size, limit))
            data = handle.read(limit + 1)  # the file may grow while read
    except OSError as exc:
        raise ModelLoadError(f"{path} cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise ModelLoadError(_too_large(path, len(data), limit))
    return data


def _too_large(path: Path, size: int, limit: int) -> str:
    return (
        f"{path} is {size / MIB:.1f} MiB, more than the {limit / MIB:.0f} MiB a file of "
        "its kind may be: it is not the file the model was exported with"
    )


def read_text(path: Path, limit: int = MAX_METADATA_BYTES) -> str:
    """A UTF-8 text file of the model dir, its decoding error named by file and offset."""
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def parse_json(path: Path, text: str | bytes) -> Any:
    """JSON from a model dir file, with any parse failure (nesting included) named."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except RecursionError:
        raise ModelLoadError(f"{path} is nested deeper than a JSON reader can follow") from None


def read_json_object(path: Path, limit: int = MAX_METADATA_BYTES) -> dict[str, Any] | None:
    """A JSON object file of the model dir; None when absent. Anything else is refused by name."""
    if absent(path):
        return None
    data = parse_json(path, read_text(path, limit))
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data
