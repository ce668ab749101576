"""`sidecar-export`: turn a checkpoint (local dir or Hub id) into a servable model dir."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from export import quantize
from export.compare import DEFAULT_ATOL, DEFAULT_RTOL, VALIDATED_TOKENS
from sidecar.errors import SidecarError
from sidecar.models.manifest import ONNX_SELF_CONSISTENCY, TOKENIZER_ONLY, Task
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
        "--atol",
        type=float,
        default=DEFAULT_ATOL,
        help="allowed difference from PyTorch, absolute part: each value may differ by "
        f"atol + rtol x |PyTorch's value| (default: {DEFAULT_ATOL:g})",
    )
    parser.add_argument(
        "--rtol",
        type=float,
        default=DEFAULT_RTOL,
        help=f"allowed difference from PyTorch, relative part (default: {DEFAULT_RTOL:g})",
    )
    parser.add_argument(
        "--validate-tokens",
        type=int,
        default=VALIDATED_TOKENS,
        help="longest input validation runs through both models; the tokenizers are still "
        f"compared at the full max length (default: {VALIDATED_TOKENS})",
    )
    parser.add_argument("--opset", type=int, help="ONNX opset (default: optimum's choice)")
    parser.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) weights")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="run the checkpoint's own Python code"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing model dir")
    parser.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read files a local checkpoint links to outside its dir (refused by default; "
        "the Hub cache's own links are always followed)",
    )
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
        help="with --quantize int8, embedding models: lowest allowed cosine between int8 and "
        "fp32 embeddings (default: 0.99); for an imported graph whose outputs depend on its "
        "batch (dynamic int8, fp16): between each input alone and batched (default: 0.95)",
    )
    parser.add_argument(
        "--int8-min-agreement",
        type=float,
        help="with --quantize int8, classifiers: lowest allowed share of inputs where int8 and "
        "fp32 pick the same top label (default: 0.9); for an imported graph whose outputs "
        "depend on its batch: share of labels or next tokens kept between alone and batched "
        "(default: 0.9)",
    )
    parser.add_argument(
        "--onnx-file",
        help="import this pre-exported ONNX graph (a path in the checkpoint, such as "
        "onnx/model_quantized.onnx) instead of exporting from the weights; a dir with graphs "
        "and no weights is imported without it",
    )
    parser.add_argument(
        "--debug", action="store_true", help="on an unexpected failure, show the traceback"
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from export.pipeline import export_model

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
            rtol=args.rtol,
            validate_tokens=args.validate_tokens,
            opset=args.opset,
            allow_pickle=args.allow_pickle,
            trust_remote_code=args.trust_remote_code,
            force=args.force,
            backend=args.backend,
            quantize=args.quantize,
            onnx_file=args.onnx_file,
            int8_min_cosine=args.int8_min_cosine,
            int8_min_agreement=args.int8_min_agreement,
            follow_symlinks=args.follow_symlinks,
        )
    except KeyboardInterrupt:
        print(f"sidecar-export: interrupted; {args.out} was left as it was", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug and not isinstance(exc, SidecarError):
            raise
        print(f"sidecar-export: {_reason(exc, args.source)}", file=sys.stderr)
        return 1
    validation = manifest["validation"]
    if validation.get("compared") == TOKENIZER_ONLY:
        checked = f"tokenizer checked on {len(validation['cases'])} inputs"
    elif validation.get("compared") == ONNX_SELF_CONSISTENCY:
        checked = f"imported without a PyTorch reference: {_self_consistency(validation)}"
    else:
        checked = (
            f"max |ONNX - PyTorch| {validation['max_abs_diff']:.2e} over "
            f"{len(validation['cases'])} cases, {validation['tolerance_used']:.0%} of the "
            f"allowed difference (atol {validation['atol']:g}, rtol {validation['rtol']:g})"
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
    if isinstance(quantization, dict) and "quality" in quantization:
        print(f"quantized to {quantization['mode']}: {_quality_line(quantization['quality'])}")
    elif isinstance(quantization, dict):
        print(f"the imported graph is quantized: {quantization['mode']}")
    return 0


def _self_consistency(validation: dict[str, Any]) -> str:
    """What an imported graph was held to, for the last line of the export."""
    head = "inputs, outputs and vocabulary checked, and the graph against itself"
    if "gate" in validation:
        measures = [
            f"{name.replace('_', ' ')} {validation[name]:.4g} (at least {bar:g})"
            for name, bar in validation["gate"].items()
            if name in validation
        ]
        return f"{head}, as callers see its outputs: {', '.join(measures)}"
    return (
        f"{head} within {validation['tolerance_used']:.0%} of the allowed difference "
        f"(atol {validation['atol']:g}, rtol {validation['rtol']:g})"
    )


def _reason(exc: BaseException, source: str) -> str:
    """One line saying why the export failed and what to do."""
    message = " ".join(str(exc).split())  # library messages may span lines
    if isinstance(exc, SidecarError):
        return message
    if isinstance(exc, ImportError):
        return (
            f"a package this checkpoint needs is not installed ({message}): install it, or the "
            "export extra: pip install 'transformers-sidecar[export]'"
        )
    if isinstance(exc, MemoryError):
        return (
            f"ran out of memory exporting {source}: free memory, or lower --validate-tokens "
            "(and --max-length)"
        )
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"cannot export {source}: {exc.strerror}{where}"
    return (
        f"cannot export {source}: {type(exc).__name__}: {message} (run again with --debug "
        "for the traceback; if transformers loads this checkpoint, please report it)"
    )


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
