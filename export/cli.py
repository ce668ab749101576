"""`sidecar-export`: turn a checkpoint (local dir or Hub id) into a servable model dir."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from export import quantize
from sidecar.errors import SidecarError
from sidecar.models.manifest import Task
from sidecar.tasks.embed import POOLING_MODES


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sidecar-export` command."""
    parser = argparse.ArgumentParser(prog="sidecar-export", description=__doc__)
    parser.add_argument("source", help="checkpoint directory, or a Hub id such as org/model")
    parser.add_argument("out", type=Path, help="model dir to create")
    parser.add_argument(
        "--task", choices=[t.value for t in Task], help="default: detected from the checkpoint"
    )
    parser.add_argument("--revision", help="Hub branch, tag or commit (Hub ids only)")
    parser.add_argument("--name", help="model name callers use (default: the out dir's name)")
    parser.add_argument(
        "--max-length", type=int, help="longest input in tokens (default: from the checkpoint)"
    )
    parser.add_argument(
        "--pooling", choices=POOLING_MODES, help="embedding pooling (default: from 1_Pooling)"
    )
    parser.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="normalize embeddings by default (default: on if the checkpoint ends in Normalize)",
    )
    parser.add_argument(
        "--atol", type=float, default=1e-4, help="largest allowed difference from PyTorch"
    )
    parser.add_argument("--opset", type=int, help="ONNX opset (default: optimum's choice)")
    parser.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) weights")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="run the checkpoint's own Python code"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing model dir")
    parser.add_argument(
        "--backend",
        choices=("auto", "onnx", "torch", "both"),
        default="auto",
        help="onnx: ONNX only; torch: the safetensors weights for the PyTorch backend, no ONNX; "
        "both: ONNX plus the weights; auto: onnx, or torch when optimum cannot export the "
        "architecture (default: auto)",
    )
    parser.add_argument(
        "--quantize",
        choices=quantize.CHOICES,
        default="none",
        help="int8: dynamic int8 weights, checked against the fp32 export (default: none)",
    )
    parser.add_argument(
        "--int8-min-cosine",
        type=float,
        default=0.99,
        help="with --quantize int8, embedding models: lowest allowed cosine between int8 and "
        "fp32 embeddings (default: 0.99)",
    )
    parser.add_argument(
        "--int8-min-agreement",
        type=float,
        default=0.9,
        help="with --quantize int8, classifiers: lowest allowed share of inputs where int8 and "
        "fp32 pick the same top label (default: 0.9)",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from export.pipeline import export_model
    from export.validate import TOKENIZER_ONLY

    try:
        manifest = export_model(
            args.source,
            args.out,
            task=Task(args.task) if args.task else None,
            revision=args.revision,
            name=args.name,
            max_length=args.max_length,
            pooling=args.pooling,
            normalize=args.normalize,
            atol=args.atol,
            opset=args.opset,
            allow_pickle=args.allow_pickle,
            trust_remote_code=args.trust_remote_code,
            force=args.force,
            backend=args.backend,
            quantize=args.quantize,
            int8_min_cosine=args.int8_min_cosine,
            int8_min_agreement=args.int8_min_agreement,
        )
    except SidecarError as exc:
        print(f"sidecar-export: {exc}", file=sys.stderr)
        return 1
    validation = manifest["validation"]
    if validation.get("compared") == TOKENIZER_ONLY:
        checked = f"tokenizer checked on {len(validation['cases'])} inputs"
    else:
        checked = (
            f"max |ONNX - PyTorch| {validation['max_abs_diff']:.2e} over "
            f"{len(validation['cases'])} cases (atol {validation['atol']:.0e})"
        )
    backends = " and ".join(
        b
        for b, present in (("onnx", manifest["onnx_file"]), ("torch", manifest["weights"]))
        if present
    )
    print(
        f"exported {manifest['name']} ({manifest['task']}, served by {backends}) to {args.out}: "
        f"{checked}"
    )
    quantization = manifest["quantization"]
    if isinstance(quantization, dict):
        print(f"quantized to {quantization['mode']}: {_quality_line(quantization['quality'])}")
    return 0


def _quality_line(quality: dict[str, Any]) -> str:
    if "cosine_min" in quality:
        return (
            f"cosine to fp32 min {quality['cosine_min']:.4f}, mean {quality['cosine_mean']:.4f} "
            f"over {quality['sentences']} sentences"
        )
    return (
        f"top-1 label agrees with fp32 on {quality['top1_agreement']:.0%} of "
        f"{quality['sentences']} sentences, max probability difference "
        f"{quality['max_abs_prob_diff']:.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())
