"""Write an artifact directory deterministically: the same inputs give byte-identical files."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmc.artifacts.files import sha256_file
from llmc.artifacts.manifest import MANIFEST_NAME, FileInfo, Manifest, TensorInfo, encode
from llmc.artifacts.staging import check_output, new_stage, publish, recover, remove_marked
from llmc.errors import BadInputError

# Weight shards are cut at this size so no single file (or in-memory shard) grows unbounded;
# 2 GiB keeps shards well inside any filesystem's and safetensors' limits.
SHARD_BYTES = 2 * 1024**3

TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Fixed metadata: safetensors would otherwise write none, and anything variable breaks reproducibility.
_SAFETENSORS_METADATA = {"format": "pt"}


def _shard_name(index: int, total: int) -> str:
    if total == 1:
        return "model.safetensors"
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def _plan_shards(sizes: list[tuple[str, int]]) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    current = 0
    for name, size in sizes:
        if shards[-1] and current + size > SHARD_BYTES:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


class ArtifactWriter:
    """Stage files in a marked directory next to `out_dir`, then swap it in at `commit`.

    A failed or killed build therefore never leaves a half-written artifact where a good one was,
    and never replaces anything but an earlier artifact (see artifacts/staging.py).
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir.resolve()
        check_output(self.out_dir)
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInputError(f"cannot create the folder {self.out_dir.parent} ({exc}); choose another -o") from exc
        recover(self.out_dir)
        self._stage = new_stage(self.out_dir)
        self._files: list[str] = []
        self.tensors: list[TensorInfo] = []

    def write_weights(
        self,
        shapes: dict[str, tuple[torch.dtype, list[int]]],
        load: Callable[[str], torch.Tensor],
        on_tensor: Callable[[str], None] | None = None,
        quant: dict[str, str] | None = None,
    ) -> None:
        """Write tensors sharded by size, loading them one shard at a time via `load(name)`.

        `quant` names the tensors that are GGML blocks (uint8) and their format, for the manifest."""
        quant = quant or {}
        names = sorted(shapes)
        sizes = [(n, _nbytes(*shapes[n])) for n in names]
        shards = _plan_shards(sizes)
        for index, shard in enumerate(shards):
            file_name = _shard_name(index, len(shards))
            tensors: dict[str, torch.Tensor] = {}
            for name in shard:
                tensor = load(name).contiguous()
                dtype, shape = shapes[name]
                assert tensor.dtype == dtype and list(tensor.shape) == shape, name
                tensors[name] = tensor
                self.tensors.append(
                    TensorInfo(name=name, dtype=_dtype_name(dtype), shape=shape, file=file_name, quant=quant.get(name))
                )
                if on_tensor is not None:
                    on_tensor(name)
            save_file(tensors, str(self._stage / file_name), metadata=_SAFETENSORS_METADATA)
            self._files.append(file_name)
        self.tensors.sort(key=lambda t: t.name)

    @property
    def stage(self) -> Path:
        """The directory being filled; files written here directly must be `add`ed."""
        return self._stage

    def add(self, name: str) -> None:
        """List a file someone else wrote into the stage (relative path)."""
        assert (self._stage / name).is_file(), name
        self._files.append(name)

    def staged_tensor_files(self) -> list[str]:
        """The weight files written so far (relative to the stage), for steps that need the model."""
        return sorted({info.file for info in self.tensors})

    def write_bytes(self, name: str, data: bytes) -> None:
        (self._stage / name).write_bytes(data)
        self._files.append(name)

    def file_infos(self) -> list[FileInfo]:
        return [
            FileInfo(path=name, size=(self._stage / name).stat().st_size, sha256=sha256_file(self._stage / name))
            for name in sorted(self._files)
        ]

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest and swap the stage in for `out_dir` (any earlier artifact is replaced)."""
        (self._stage / MANIFEST_NAME).write_bytes(encode(manifest))
        publish(self._stage, self.out_dir)

    def abort(self) -> None:
        """Delete the stage (kept marked until last, so a kill midway leaves it for the next build)."""
        if self._stage.is_dir():
            with contextlib.suppress(OSError):
                remove_marked(self._stage)


_DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.int64: "I64",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def _nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * torch.empty((), dtype=dtype).element_size()


def read_staged_tensors(stage: Path, files: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the given safetensors files of a stage, by name."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(stage / file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                tensors[name] = handle.get_tensor(name)
    return tensors
