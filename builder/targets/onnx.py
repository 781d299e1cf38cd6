"""The ONNX target: the model as an ONNX graph that onnxruntime serves without torch (issue #26).

It adds `onnx/model.onnx` (the graph, builder/onnx/graph.py), `onnx/model.onnx.data` (its
weights as ONNX external data: GGML blocks as MatMulNBits without requantizing) and
`onnx/mapping.json` (how each tensor was written) beside the artifact's own weights, all listed
and checksummed in the manifest like every file. The runtime's onnx backend
(runtime/backends/onnx.py) runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch

from llmc.artifacts.manifest import ModelSpec, OnnxGraph, TargetCode
from llmc.artifacts.writer import ArtifactWriter
from llmc.builder.onnx.external import ExternalData
from llmc.builder.onnx.graph import DEFAULT_ACCURACY_LEVEL, OPSET, Weight, build_graph, unsupported
from llmc.builder.targets.base import Progress, Target, TargetOutput
from llmc.errors import BadInputError
from llmc.logs import get_logger

log = get_logger("llmc.build")

GRAPH_DIR = "onnx"
GRAPH_FILE = f"{GRAPH_DIR}/model.onnx"
WEIGHTS_NAME = "model.onnx.data"  # as the graph names it: in the graph's folder
WEIGHTS_FILE = f"{GRAPH_DIR}/{WEIGHTS_NAME}"
MAPPING_FILE = f"{GRAPH_DIR}/mapping.json"


class OnnxTarget(Target):
    name = "onnx"
    default_dtype = "f32"  # onnxruntime's CPU kernels compute in float32

    def __init__(self, accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> None:
        self.accuracy_level = accuracy_level

    def check(self, spec: ModelSpec) -> None:
        problem = unsupported(spec)
        if problem is not None:
            raise BadInputError(f"{problem}; build this model for --target cpu")

    def start(self, writer: ArtifactWriter) -> None:
        """Nothing runs beside the weights: the graph needs them."""

    def finish(
        self,
        writer: ArtifactWriter,
        spec: ModelSpec,
        formats: dict[str, str],
        dtype: torch.dtype,
        on_progress: Progress | None,
    ) -> TargetOutput:
        from safetensors import safe_open

        stage: Path = writer.stage
        (stage / GRAPH_DIR).mkdir(exist_ok=True)
        infos = {t.name: t for t in writer.tensors}
        handles = {
            file: safe_open(str(stage / file), framework="pt", device="cpu")
            for file in {t.file for t in infos.values()}
        }

        def weight(name: str) -> Weight:
            info = infos[name]
            tensor: torch.Tensor = handles[info.file].get_tensor(name)
            return tensor, info.quant

        data = ExternalData(stage / WEIGHTS_FILE, WEIGHTS_NAME)
        try:
            model, mapping = build_graph(spec, weight, set(infos), data, self.accuracy_level)
        finally:
            data.close()
        onnx.save_model(model, str(stage / GRAPH_FILE))
        writer.add(GRAPH_FILE)
        writer.add(WEIGHTS_FILE)
        report = {"inexact_group_offsets": mapping.inexact_groups, "tensors": mapping.tensors}
        writer.write_bytes(MAPPING_FILE, json.dumps(report, indent=1, sort_keys=True).encode())
        log.info(
            "build.onnx_graph",
            nodes=len(model.graph.node),
            weights_mib=round(data.size / 2**20, 1),
            inexact_group_offsets=mapping.inexact_groups,
        )
        graph = OnnxGraph(
            model=GRAPH_FILE,
            weights=WEIGHTS_FILE,
            mapping=MAPPING_FILE,
            opset=OPSET,
            accuracy_level=self.accuracy_level,
        )
        return TargetOutput(TargetCode(capability=f"onnx opset {OPSET}", graph=graph))

    def close(self) -> None:
        """Nothing to release."""

    def abort(self) -> None:
        """Nothing runs in the background."""
