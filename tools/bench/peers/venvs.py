"""A pinned venv per peer, built once with the project's Python and reused.

Each venv installs its requirements under the constraints file of the same name beside this
module (every package pinned, torch at the local CPU wheel). It lives in
`.cache/bench-venvs/<name>-<digest>`, the digest taken over the constraints, the requirements
and the Python version, so editing a pin builds a new venv and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE.parents[2] / ".cache" / "bench-venvs"
# Marks a venv whose installs all finished: a build cut short is rebuilt, not reused.
_COMPLETE = ".bench-complete"


@dataclass(frozen=True)
class Venv:
    """A venv made of `requirements` under `constraints`."""

    name: str
    requirements: tuple[str, ...]

    @property
    def constraints(self) -> Path:
        """The pins: `<name>.txt` beside this module."""
        return HERE / f"{self.name}.txt"

    @property
    def path(self) -> Path:
        """Where this exact set of pins lives."""
        digest = hashlib.sha256(self.constraints.read_bytes())
        digest.update("\n".join(self.requirements).encode())
        digest.update(sys.version.encode())
        return CACHE / f"{self.name}-{digest.hexdigest()[:12]}"

    @property
    def python(self) -> Path:
        """The venv's interpreter."""
        return self.path / "bin" / "python"

    def ready(self) -> bool:
        """Whether the venv is built and complete."""
        return (self.path / _COMPLETE).is_file()

    def ensure(self) -> Path:
        """The venv, built first when it is missing; returns its directory."""
        if self.ready():
            return self.path
        began = time.monotonic()
        print(f"building the {self.name} venv in {self.path} (once) ...", flush=True)
        shutil.rmtree(self.path, ignore_errors=True)
        # The interpreter the project's venv was made from: the same Python for every venv.
        base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
        subprocess.run([str(base), "-m", "venv", str(self.path)], check=True, timeout=300)
        pip = [str(self.python), "-m", "pip", "--disable-pip-version-check", "install", "--quiet"]
        subprocess.run([*pip, "--upgrade", "pip>=24"], check=True, timeout=600)
        # A few minutes here; past half an hour a download is stuck.
        command = [*pip, "-c", str(self.constraints), *self.requirements]
        subprocess.run(command, check=True, timeout=1800)
        (self.path / _COMPLETE).touch()
        print(f"  built in {time.monotonic() - began:.0f} s", flush=True)
        return self.path


INFINITY = Venv("infinity", ("infinity-emb[server,optimum,torch]==0.0.78",))
TRITON = Venv("triton", ("nvidia-pytriton==0.7.0", "onnxruntime", "tokenizers", "numpy"))
NAIVE = Venv("naive", ("fastapi", "uvicorn", "transformers", "torch", "numpy"))
VENVS = {v.name: v for v in (INFINITY, TRITON, NAIVE)}


def main() -> None:
    """`python -m tools.bench.peers.venvs [NAME ...]`: build the named venvs (default: all)."""
    for name in sys.argv[1:] or list(VENVS):
        print(VENVS[name].ensure())


if __name__ == "__main__":
    main()
