"""A TensorFlow Lite model file run as a PyTorch module.

MediaPipe ships its face detectors only as ``.tflite`` files. Rebuilding their graph in torch
(rather than calling a TFLite interpreter) gives every runtime from one file: batched torch on
CPU or CUDA, and an ONNX export of that module for ONNX Runtime. The file is parsed with the
``tflite`` package (the flatbuffer schema, pure Python) and its weights become torch tensors;
nothing of TensorFlow is needed.

Only the operators that convolutional detectors such as BlazeFace use are supported; any other
operator fails at load time with its name, never silently at run time. Activations are kept in
NCHW (torch's layout) and moved to NHWC only where the graph reshapes or concatenates them, so the
results match the interpreter's element for element.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TFLiteGraphError(ValueError):
    """The model file cannot be read or uses something this converter does not support."""


_NUMPY_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    constant: np.ndarray | None


@dataclass
class _Op:
    name: str
    inputs: list[int]
    outputs: list[int]
    options: Any
    params: dict[str, Any] = field(default_factory=dict)


def _builtin_names() -> dict[int, str]:
    from tflite.BuiltinOperator import BuiltinOperator

    return {value: key for key, value in vars(BuiltinOperator).items() if not key.startswith("_")}


def _read_graph(path: Path) -> tuple[list[_Tensor], list[_Op], list[int], list[int]]:
    try:
        import tflite
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise TFLiteGraphError("the 'tflite' package is required to read .tflite models") from exc
    try:
        data = path.read_bytes()
        model = tflite.Model.GetRootAsModel(data, 0)
        graph = model.Subgraphs(0)
    except Exception as exc:  # noqa: BLE001 - the flatbuffer reader raises untyped errors on garbage
        raise TFLiteGraphError(f"{path}: not a readable TFLite model ({exc})") from exc
    names = _builtin_names()
    tensors = []
    for index in range(graph.TensorsLength()):
        tensor = graph.Tensors(index)
        buffer = model.Buffers(tensor.Buffer())
        raw = buffer.DataAsNumpy() if buffer is not None and buffer.DataLength() else None
        shape = tuple(int(v) for v in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
        constant = None
        if raw is not None:
            dtype = _NUMPY_TYPES.get(tensor.Type())
            if dtype is None:
                raise TFLiteGraphError(f"{path}: tensor {tensor.Name().decode()} has unsupported type {tensor.Type()}")
            constant = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape)
        tensors.append(_Tensor(name=tensor.Name().decode(), shape=shape, constant=constant))
    ops = []
    for index in range(graph.OperatorsLength()):
        operator = graph.Operators(index)
        code = model.OperatorCodes(operator.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        ops.append(
            _Op(
                name=names.get(builtin, str(builtin)),
                inputs=[int(v) for v in operator.InputsAsNumpy()],
                outputs=[int(v) for v in operator.OutputsAsNumpy()],
                options=(operator.BuiltinOptions(), operator.BuiltinOptionsType()),
            )
        )
    inputs = [int(v) for v in graph.InputsAsNumpy()]
    outputs = [int(v) for v in graph.OutputsAsNumpy()]
    return tensors, ops, inputs, outputs


def _options(op: _Op, cls_name: str) -> Any:
    import importlib

    table, _kind = op.options
    module = importlib.import_module(f"tflite.{cls_name}")
    options = getattr(module, cls_name)()
    options.Init(table.Bytes, table.Pos)
    return options


def _activation(code: int) -> Callable[[torch.Tensor], torch.Tensor]:
    if code == 0:
        return lambda x: x
    if code == 1:
        return F.relu
    if code == 3:
        return lambda x: torch.clamp(x, 0.0, 6.0)
    raise TFLiteGraphError(f"unsupported fused activation {code}")


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's SAME padding: the extra pixel, when the total is odd, goes after."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


class TFLiteGraph(nn.Module):
    """Runs a TFLite graph on a float batch. Input: N x C x H x W (the model's own H, W, C, any N);
    output: the model's outputs, in order, with their batch axis N."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        tensors, ops, inputs, outputs = _read_graph(self.path)
        if len(inputs) != 1:
            raise TFLiteGraphError(f"{self.path}: expected one input, found {len(inputs)}")
        self._tensors = tensors
        self._input = inputs[0]
        self._outputs = outputs
        self.input_shape_nhwc = tensors[inputs[0]].shape
        self.output_names = [tensors[index].name for index in outputs]
        self._constants: dict[int, np.ndarray] = {i: t.constant for i, t in enumerate(tensors) if t.constant is not None}
        self._steps: list[Callable[[dict[int, torch.Tensor]], None]] = []
        self._parameter_index = 0
        for op in ops:
            builder = getattr(self, f"_build_{op.name.lower()}", None)
            if builder is None:
                raise TFLiteGraphError(f"{self.path}: unsupported TFLite operator {op.name}")
            builder(op)

    # -- constants ------------------------------------------------------------------------
    def _constant(self, index: int) -> np.ndarray:
        value = self._constants.get(index)
        if value is None:
            raise TFLiteGraphError(f"{self.path}: tensor {self._tensors[index].name} must be a constant")
        return value

    def _register(self, value: np.ndarray) -> str:
        name = f"w{self._parameter_index}"
        self._parameter_index += 1
        self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))
        return name

    # -- operators ------------------------------------------------------------------------
    def _build_dequantize(self, op: _Op) -> None:
        # Half-precision weights: widen them once at load time instead of on every call.
        self._constants[op.outputs[0]] = self._constant(op.inputs[0]).astype(np.float32)

    def _build_conv_2d(self, op: _Op) -> None:
        options = _options(op, "Conv2DOptions")
        weight = self._constant(op.inputs[1]).transpose(0, 3, 1, 2)  # OHWI -> OIHW
        self._conv(
            op,
            weight,
            groups=1,
            stride=(options.StrideH(), options.StrideW()),
            dilation=(options.DilationHFactor(), options.DilationWFactor()),
            same=options.Padding() == 0,
            activation=options.FusedActivationFunction(),
        )

    def _build_depthwise_conv_2d(self, op: _Op) -> None:
        options = _options(op, "DepthwiseConv2DOptions")
        weight = self._constant(op.inputs[1])  # 1 x H x W x (C * multiplier)
        in_channels = self._tensors[op.inputs[0]].shape[3]
        weight = weight.transpose(3, 0, 1, 2)  # (C*M) x 1 x H x W
        self._conv(
            op,
            weight,
            groups=in_channels,
            stride=(options.StrideH(), options.StrideW()),
            dilation=(options.DilationHFactor(), options.DilationWFactor()),
            same=options.Padding() == 0,
            activation=options.FusedActivationFunction(),
        )

    def _conv(
        self, op: _Op, weight: np.ndarray, groups: int, stride: tuple[int, int], dilation: tuple[int, int], same: bool, activation: int
    ) -> None:
        weight_name = self._register(weight)
        bias_name = self._register(self._constant(op.inputs[2])) if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
        _, height, width, _ = self._tensors[op.inputs[0]].shape
        pad = (0, 0, 0, 0)
        if same:
            top, bottom = _same_padding(height, weight.shape[2], stride[0], dilation[0])
            left, right = _same_padding(width, weight.shape[3], stride[1], dilation[1])
            pad = (left, right, top, bottom)
        act = _activation(activation)
        source, target = op.inputs[0], op.outputs[0]

        def step(values: dict[int, torch.Tensor]) -> None:
            x = values[source]
            if any(pad):
                x = F.pad(x, pad)
            bias = getattr(self, bias_name) if bias_name else None
            values[target] = act(F.conv2d(x, getattr(self, weight_name), bias, stride, 0, dilation, groups))

        self._steps.append(step)

    def _build_relu(self, op: _Op) -> None:
        source, target = op.inputs[0], op.outputs[0]
        self._steps.append(lambda values: values.__setitem__(target, F.relu(values[source])))

    def _build_add(self, op: _Op) -> None:
        options = _options(op, "AddOptions")
        act = _activation(options.FusedActivationFunction())
        left, right, target = op.inputs[0], op.inputs[1], op.outputs[0]
        self._steps.append(lambda values: values.__setitem__(target, act(values[left] + values[right])))

    def _build_max_pool_2d(self, op: _Op) -> None:
        options = _options(op, "Pool2DOptions")
        kernel = (options.FilterHeight(), options.FilterWidth())
        stride = (options.StrideH(), options.StrideW())
        _, height, width, _ = self._tensors[op.inputs[0]].shape
        pad = (0, 0, 0, 0)
        if options.Padding() == 0:
            top, bottom = _same_padding(height, kernel[0], stride[0], 1)
            left, right = _same_padding(width, kernel[1], stride[1], 1)
            pad = (left, right, top, bottom)
        act = _activation(options.FusedActivationFunction())
        source, target = op.inputs[0], op.outputs[0]

        def step(values: dict[int, torch.Tensor]) -> None:
            x = values[source]
            if any(pad):
                x = F.pad(x, pad, value=float("-inf"))
            values[target] = act(F.max_pool2d(x, kernel, stride))

        self._steps.append(step)

    def _build_pad(self, op: _Op) -> None:
        paddings = self._constant(op.inputs[1]).astype(np.int64)  # NHWC rows of (before, after)
        if paddings[0].any():
            raise TFLiteGraphError(f"{self.path}: PAD on the batch axis is not supported")
        # F.pad lists the last axis first: W, then H, then C (NCHW).
        pad = tuple(int(v) for v in (*paddings[2], *paddings[1], *paddings[3]))
        source, target = op.inputs[0], op.outputs[0]
        self._steps.append(lambda values: values.__setitem__(target, F.pad(values[source], pad)))

    def _build_resize_bilinear(self, op: _Op) -> None:
        options = _options(op, "ResizeBilinearOptions")
        if options.AlignCorners() == options.HalfPixelCenters():
            # Neither flag (TF1's legacy sampling) has no torch equivalent; both is invalid.
            raise TFLiteGraphError(f"{self.path}: RESIZE_BILINEAR needs exactly one of align_corners and half_pixel_centers")
        size = tuple(int(v) for v in self._tensors[op.outputs[0]].shape[1:3])
        align = bool(options.AlignCorners())
        source, target = op.inputs[0], op.outputs[0]
        self._steps.append(
            lambda values: values.__setitem__(target, F.interpolate(values[source], size=size, mode="bilinear", align_corners=align))
        )

    def _build_reshape(self, op: _Op) -> None:
        shape = self._tensors[op.outputs[0]].shape
        source, target = op.inputs[0], op.outputs[0]
        four_d = len(self._tensors[source].shape) == 4

        def step(values: dict[int, torch.Tensor]) -> None:
            x = values[source]
            if four_d:
                x = x.permute(0, 2, 3, 1)  # the flat order TFLite reshapes in is NHWC
            values[target] = x.reshape(x.shape[0], *shape[1:])

        self._steps.append(step)

    def _build_concatenation(self, op: _Op) -> None:
        options = _options(op, "ConcatenationOptions")
        rank = len(self._tensors[op.outputs[0]].shape)
        axis = options.Axis() % rank
        if rank == 4:
            axis = {0: 0, 1: 2, 2: 3, 3: 1}[axis]
        act = _activation(options.FusedActivationFunction())
        sources, target = list(op.inputs), op.outputs[0]
        self._steps.append(lambda values: values.__setitem__(target, act(torch.cat([values[i] for i in sources], dim=axis))))

    # -- running ----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        values: dict[int, torch.Tensor] = {self._input: images}
        for step in self._steps:
            step(values)
        return [values[index] for index in self._outputs]
