"""The servers a user would pick instead of the sidecar, each started from a venv of its own.

- infinity-optimum: Infinity 0.0.78, its optimum engine (ONNX Runtime), `--pooling-method
  mean`; infinity-torch: the same server on its torch engine (sentence-transformers). Both
  from the infinity venv (tools/bench/peers/infinity.txt).
- triton: Triton 2.51 through PyTriton 0.7.0, ONNX Runtime inside the infer function,
  dynamic batching on (tools/bench/peers/triton_server.py, the triton venv).
- naive: FastAPI + uvicorn + transformers.pipeline (tools/bench/naive.py, the naive venv).

Infinity's optimum engine and Triton serve an export of the checkpoint made once with
`optimum-cli export onnx --library transformers` into .cache/bench-exports/ (Infinity finds
a graph only at the top of its model dir, so it is started from that dir with
`--model-id .`). Every peer gets as many threads for its forward passes as the sidecar
takes by default (the cores its CPU quota allows); Infinity's optimum engine takes one ONNX
Runtime thread per physical core and cannot be told otherwise, the same on a machine with
one thread per core (the bench machine's). The peers run on the CPU only.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sidecar.runtime.threads import cpu_count
from tools.bench.peers.venvs import CACHE, INFINITY, NAIVE, TRITON, Venv
from tools.bench.processes import http_ok, process, run_child
from tools.coldstart import free_port

NAMES = ("infinity-optimum", "infinity-torch", "triton", "naive")
# The sidecar's own default: one pass on every core it may use.
THREADS = cpu_count()
HERE = Path(__file__).resolve().parent
EXPORTS = CACHE.parent / "bench-exports"


@dataclass(frozen=True)
class Setup:
    """What every peer is started from."""

    checkpoint: Path
    device: str
    # Each peer's output goes to <name>.log here.
    logs: Path
    # The naive peer in the project's venv instead of its own (the quick smoke run).
    naive_in_main_venv: bool = False


@dataclass(frozen=True)
class Running:
    """A peer that answers: its load-generator target and its process id."""

    name: str
    target: str
    pid: int


def venv_of(name: str, setup: Setup) -> Venv | None:
    """The venv a peer runs in; None for the project's own."""
    if name == "naive":
        return None if setup.naive_in_main_venv else NAIVE
    return TRITON if name == "triton" else INFINITY


def _export_dir(checkpoint: Path) -> Path:
    key = hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:12]
    return EXPORTS / f"{checkpoint.name}-transformers-{key}"


def export_ready(checkpoint: Path) -> bool:
    """Whether the peers' export of `checkpoint` is made."""
    out = _export_dir(checkpoint)
    return (out / "model.onnx").is_file() and (out / "tokenizer.json").is_file()


def ensure_export(checkpoint: Path) -> Path:
    """The checkpoint as a plain optimum ONNX export (graph at the top), made once."""
    out = _export_dir(checkpoint)
    if export_ready(checkpoint):
        return out
    print(f"exporting {checkpoint} for the peers into {out} (once) ...", flush=True)
    cli = Path(sys.executable).parent / "optimum-cli"
    command = [str(cli), "export", "onnx", "--model", str(checkpoint)]
    command += ["--task", "feature-extraction", "--library", "transformers", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run_child(command, f"optimum-cli exporting {checkpoint}", 1800, env=env)
    return out


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    # Offline, no telemetry, and the thread budget for torch's and OpenMP's pools.
    env.update(HF_HUB_OFFLINE="1", DO_NOT_TRACK="1", OMP_NUM_THREADS=str(THREADS))
    env["MKL_NUM_THREADS"] = str(THREADS)
    return {**env, **(extra or {})}


@contextmanager
def serve(name: str, setup: Setup) -> Iterator[Running]:
    """Start peer `name` from its venv (built first if need be) and yield it once it answers."""
    venv = venv_of(name, setup)
    bindir = venv.ensure() / "bin" if venv else Path(sys.executable).parent
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if name.startswith("infinity-"):
        engine = name.removeprefix("infinity-")
        # An HF cache per export: Infinity keeps the graph it optimized there under the model
        # id, which is "." for every export, and would reuse another checkpoint's.
        home = CACHE / f"infinity-hf-home-{_export_dir(setup.checkpoint).name}"
        env = _env({"HF_HOME": str(home)})
        command = [str(bindir / "infinity_emb"), "v2", "--engine", engine, "--device", "cpu"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        if engine == "optimum":
            # Infinity pools by the CLS token unless told; the checkpoint mean-pools.
            cwd: Path | None = ensure_export(setup.checkpoint)
            command += ["--model-id", ".", "--pooling-method", "mean"]
        else:
            cwd = None
            command += ["--model-id", str(setup.checkpoint)]
        ready, target = http_ok(f"{base}/health"), f"infinity://127.0.0.1:{port}"
    elif name == "triton":
        env, cwd = _env(), None
        command = [str(bindir / "python"), str(HERE / "triton_server.py")]
        command += ["--model-dir", str(ensure_export(setup.checkpoint))]
        command += ["--http-port", str(port), "--grpc-port", str(free_port())]
        command += ["--metrics-port", str(free_port()), "--threads", str(THREADS)]
        ready = http_ok(f"{base}/v2/models/minilm/ready")
        target = f"triton://127.0.0.1:{port}/minilm"
    elif name == "naive":
        env = _env({"BENCH_NAIVE_MODEL": str(setup.checkpoint)})
        env["BENCH_NAIVE_DEVICE"] = setup.device
        cwd = None
        # By path, so its own venv needs nothing of the project installed.
        command = [str(bindir / "python"), "-m", "uvicorn", "naive:app", "--app-dir"]
        command += [str(HERE.parent), "--port", str(port), "--log-level", "warning"]
        ready, target = http_ok(f"{base}/docs"), base
    else:
        raise SystemExit(f"unknown peer {name!r}: one of {', '.join(NAMES)}")
    with process(command, ready, name, env, cwd, setup.logs / f"{name}.log") as child:
        yield Running(name, target, child.pid)
