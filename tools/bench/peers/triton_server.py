"""Triton (through PyTriton) serving an ONNX export with ONNX Runtime, as a user would set it up.

    <triton venv>/bin/python tools/bench/peers/triton_server.py --model-dir DIR --http-port P

Runs in the bench's triton venv (tools/bench/peers/triton.txt), not the project's: it imports
nothing from the project. One model, `minilm`, with dynamic batching on: Triton queues the
single-text requests and hands the infer function whatever has queued, up to
`--max-batch-size`. The function tokenizes the batch (padding to its longest text,
truncating at `--max-length`, as sentence-transformers does), runs the graph and mean-pools
and normalizes the hidden states, the pooling the checkpoint's sentence-transformers config
asks for. Called over Triton's KServe v2 HTTP/JSON API (the load generator's triton://).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def _session(graph: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def build_infer(model_dir: Path, max_length: int, threads: int) -> Any:
    """The infer function: text bytes [B, 1] in, normalized mean-pooled vectors [B, D] out."""
    from pytriton.decorators import batch

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding()
    session = _session(model_dir / "model.onnx", threads)
    wanted = {i.name for i in session.get_inputs()}

    @batch
    def infer(text: np.ndarray) -> dict[str, np.ndarray]:
        encodings = tokenizer.encode_batch([t.decode("utf-8") for t in text[:, 0]])
        feeds = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        (hidden,) = session.run(
            ["last_hidden_state"], {k: v for k, v in feeds.items() if k in wanted}
        )
        mask = feeds["attention_mask"][:, :, None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return {"embedding": pooled.astype(np.float32)}

    return infer


def main() -> None:
    """Bind the model and serve until terminated."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    # Triton's Python backend stub links the system libpython; without this it loads that one
    # against this interpreter's stdlib and fails ('_thread.RLock' ... '_recursion_count').
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p
    )

    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=0,
    )
    # PyTriton stops tritonserver when its context exits; a plain SIGTERM would skip that.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with Triton(config=config) as triton:
        triton.bind(
            model_name="minilm",
            infer_func=build_infer(args.model_dir, args.max_length, args.threads),
            inputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="embedding", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(max_batch_size=args.max_batch_size, batcher=DynamicBatcher()),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
