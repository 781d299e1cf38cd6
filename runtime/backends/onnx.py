"""The onnx backend: the artifact's ONNX graph (`--target onnx`) served by onnxruntime, without torch.

Its KV cache is a slot per running sequence (runtime/slot_cache.py), so it has no prefix cache:
a prompt's keys live in its own sequence's slot, where no other sequence can read them.
"""

from __future__ import annotations

import os
from typing import Any

from llmc.artifacts.manifest import Manifest
from llmc.artifacts.reader import Artifact
from llmc.errors import BadArtifactError, BadInputError
from llmc.logs import get_logger
from llmc.runtime.backends.base import Backend, BackendOptions
from llmc.runtime.onnx_runner import OnnxRunner
from llmc.runtime.resident import drop_clean_file_pages

log = get_logger("llmc.onnx")

TARGET = "onnx"  # the manifest's target key (builder/targets/onnx.py)
_F32 = 4  # bytes per cached value: the graph's KV cache is float32
_MIB = 1024 * 1024


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise BadInputError("serving an artifact's onnx target needs onnxruntime: pip install 'llmc[lean]'") from None
    return onnxruntime


def has_graph(manifest: Manifest) -> bool:
    code = manifest.targets.get(TARGET)
    return code is not None and code.graph is not None


class OnnxBackend(Backend):
    name = "onnx"
    supports_prefix_cache = False  # per-sequence slots (module docstring)

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.ort = _onnxruntime()
        # All cores by default: onnxruntime's own default, made explicit (onnxruntime-genai's is one).
        self.threads = options.threads or len(os.sched_getaffinity(0))

    def kv_bytes_per_token(self, manifest: Manifest) -> int:
        spec = manifest.model
        return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * _F32

    def make_runner(
        self, artifact: Artifact, max_model_len: int, num_blocks: int, block_size: int, compiled: bool
    ) -> OnnxRunner:
        code = artifact.manifest.targets.get(TARGET)
        if code is None or code.graph is None:
            raise BadArtifactError(
                f"{artifact.root} has no onnx target; rebuild it with `llmc build --target onnx` (or cpu,onnx), "
                "or serve it with torch (`llmc run --backend cpu`, needs llmc[torch])"
            )
        options = self.ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # onnxruntime parses the graph from bytes checked against the manifest (its weights are
        # hashed while they load, Artifact.verifying): with a pinned manifest
        # (--expect-manifest-sha256) a changed graph is never parsed. It reads the external data
        # from the graph's folder (where the manifest keeps it, artifacts/manifest.py) and refuses a
        # location outside it (absolute, `..`, or through a link).
        graph = artifact.read_verified(code.graph.model)
        folder = str(artifact.path(code.graph.weights).parent)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        try:
            session = self.ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own errors for a graph it cannot load
            raise BadArtifactError(
                f"onnxruntime cannot load the artifact's ONNX graph ({type(exc).__name__}: {str(exc)[:300]}); "
                "rebuild the artifact with this llmc"
            ) from exc
        # onnxruntime maps the weights file and prepacks most of it into copies of its own; the
        # pages it read would stay resident beside them (resident.py). Those it still reads (the
        # embedding's rows) come back from the file as they are touched.
        weights = os.path.realpath(artifact.path(code.graph.weights))
        log.debug("onnx.weights_pages_dropped", mb=round(drop_clean_file_pages(weights) / _MIB, 1))
        slots = self.options.max_seqs or 1
        return OnnxRunner(session, artifact.manifest.model, slots, max_model_len)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": "cpu",
            "runtime": f"onnxruntime {self.ort.__version__}",
            "threads": self.threads,
        }
