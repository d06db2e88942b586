"""Export an expression checkpoint for runtimes without this package (``ferstream export``).

* ``torchscript``: a traced module; the checkpoint metadata travels inside the file as the extra
  file ``ferstream_metadata.json`` (see :func:`load_torchscript`).
* ``onnx``: opset-17 graph with a dynamic batch axis, input ``faces`` (N x C x S x S, already
  preprocessed) and output ``logits``. The metadata is stored in the model's ``metadata_props``
  under ``ferstream_metadata``; :func:`pipeline.runtimes.onnx_runtime.load_onnx` opens it with ONNX Runtime
  (as the classifier's ``backend: onnxruntime`` does).

Both get a ``<output>.json`` sidecar with the metadata, because preprocessing (resize to
``resize_to``, centre crop ``input_size``, mean/std) is not part of the exported graph: it
must be reproduced exactly by the consumer, as :func:`pipeline.checkpoint.preprocess_crops` does.
After exporting, the exported model is run against the PyTorch model on random face crops and
the largest logit difference is reported (with whether every crop gets the same top class); it
must be below ``--tolerance`` (default 1e-4 on logits) or the export fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.checkpoint import (
    ONNX_INPUT,
    ONNX_METADATA_KEY,
    ONNX_OUTPUT,
    CheckpointError,
    ModelMetadata,
    default_checkpoint_path,
    load_checkpoint,
    preprocess_crops,
)
from pipeline.runtimes.onnx_runtime import load_onnx

__all__ = ["ExportError", "export_onnx", "export_torchscript", "load_torchscript", "main", "parity_inputs"]

METADATA_FILE = "ferstream_metadata.json"
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
DEFAULT_TOLERANCE = 1e-4  # max |logit| difference between the exported model and the checkpoint


class ExportError(RuntimeError):
    """Exporting failed, or the exported model does not match the checkpoint; the message says how."""


def parity_inputs(metadata: ModelMetadata, n: int = 8, seed: int = 0) -> torch.Tensor:
    """Preprocessed random face crops of mixed sizes, the same for the PyTorch and the exported model."""
    rng = np.random.default_rng(seed)
    crops = [rng.integers(0, 256, (int(rng.integers(30, 120)),) * 2, dtype=np.uint8) for _ in range(n)]
    return preprocess_crops(crops, metadata)


def export_torchscript(model: nn.Module, metadata: ModelMetadata, path: Path) -> None:
    example = parity_inputs(metadata, n=2)
    # torch.jit is deprecated in favour of torch.export, but TorchScript is still what C++/mobile runtimes load.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model.eval(), example)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata.to_dict())})


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, ModelMetadata]:
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if not extra[METADATA_FILE]:
        raise ExportError(f"{path} carries no {METADATA_FILE}; not a ferstream export")
    return module.eval(), ModelMetadata.from_dict(json.loads(extra[METADATA_FILE]))


def export_onnx(model: nn.Module, metadata: ModelMetadata, path: Path, opset: int = 17) -> None:
    import onnx

    example = parity_inputs(metadata, n=2)
    # The TorchScript-based exporter: this plain conv net needs nothing newer, and it avoids the onnxscript dependency.
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        dynamo=False,
        input_names=[ONNX_INPUT],
        output_names=[ONNX_OUTPUT],
        dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
        opset_version=opset,
    )
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(metadata.to_dict())
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _exported_logits(fmt: str, path: Path, inputs: torch.Tensor) -> np.ndarray:
    """The exported file, loaded back the way its consumers load it, run on ``inputs``."""
    if fmt == "torchscript":
        module, _ = load_torchscript(path)
        with torch.no_grad():
            return module(inputs).numpy()
    session, _ = load_onnx(path)
    return session.run([ONNX_OUTPUT], {ONNX_INPUT: inputs.numpy()})[0]


def export(model_path: Path, fmt: str, output: Path | None = None, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    model, metadata = load_checkpoint(model_path)
    output = output or model_path.with_name(model_path.stem + SUFFIXES[fmt])
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        export_torchscript(model, metadata, output)
    else:
        export_onnx(model, metadata, output)
    output.with_name(output.name + ".json").write_text(json.dumps(metadata.to_dict(), indent=2) + "\n")
    inputs = parity_inputs(metadata)
    with torch.no_grad():
        reference = model(inputs).numpy()
    exported = _exported_logits(fmt, output, inputs)
    max_abs = float(np.abs(exported - reference).max())
    same_argmax = bool((exported.argmax(1) == reference.argmax(1)).all())
    result: dict[str, Any] = {
        "format": fmt,
        "output": str(output),
        "model_id": metadata.model_id,
        "bytes": output.stat().st_size,
        "parity_inputs": len(inputs),
        "parity_tolerance": tolerance,
        "parity_max_abs_logit_diff": max_abs,
        "parity_same_argmax": same_argmax,
    }
    if max_abs > tolerance:
        raise ExportError(f"exported {fmt} model differs from the checkpoint by {max_abs:.2e} > {tolerance:.0e} in logits")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferstream export", description="Export an expression checkpoint to ONNX or TorchScript")
    parser.add_argument("--format", required=True, choices=sorted(SUFFIXES))
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped pipeline/assets/expression_default.pt)")
    parser.add_argument("--output", default=None, help="output file (default: next to the model, <stem>.onnx / <stem>.torchscript.pt)")
    parser.add_argument(
        "--tolerance", type=float, default=DEFAULT_TOLERANCE, help="max allowed |logit| difference in the parity check (default 1e-4)"
    )
    args = parser.parse_args(argv)
    model_path = Path(args.model).expanduser() if args.model else default_checkpoint_path()
    try:
        result = export(model_path, args.format, Path(args.output).expanduser() if args.output else None, args.tolerance)
    except (FileNotFoundError, CheckpointError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
