"""Write an artifact directory deterministically: the same inputs give byte-identical files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from llmc.artifacts.files import sha256_file
from llmc.artifacts.manifest import MANIFEST_NAME, FileInfo, Manifest, TensorInfo, encode
from llmc.artifacts.staging import check_output, new_stage, publish, recover, remove_marked
from llmc.errors import BadInputError, InternalError

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
        # sha256 and size of the files hashed as they were written (the weights), so that
        # file_infos need not read them back.
        self._digests: dict[str, tuple[str, int]] = {}
        self.tensors: list[TensorInfo] = []

    def write_weights(
        self,
        shapes: dict[str, tuple[torch.dtype, list[int]]],
        load: Callable[[str], torch.Tensor],
        on_tensor: Callable[[str], None] | None = None,
        quant: dict[str, str] | None = None,
    ) -> None:
        """Write tensors sharded by size, loading, writing and dropping them one at a time via
        `load(name)` (write_safetensors): memory holds one tensor, however large the model.

        `quant` names the tensors that are GGML blocks (uint8) and their format, for the manifest."""
        quant = quant or {}
        names = sorted(shapes)
        sizes = [(n, _nbytes(*shapes[n])) for n in names]
        shards = _plan_shards(sizes)

        def loaded(name: str) -> torch.Tensor:
            tensor = load(name)
            if on_tensor is not None:
                on_tensor(name)
            return tensor

        for index, shard in enumerate(shards):
            file_name = _shard_name(index, len(shards))
            layout = [(name, *shapes[name]) for name in shard]
            self._digests[file_name] = write_safetensors(self._stage / file_name, layout, loaded)
            self._files.append(file_name)
            for name in shard:
                dtype, shape = shapes[name]
                self.tensors.append(
                    TensorInfo(name=name, dtype=_dtype_name(dtype), shape=shape, file=file_name, quant=quant.get(name))
                )
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
        infos = []
        for name in sorted(self._files):
            if name in self._digests:
                digest, size = self._digests[name]
            else:
                path = self._stage / name
                digest, size = sha256_file(path), path.stat().st_size
            infos.append(FileInfo(path=name, size=size, sha256=digest))
        return infos

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


# The order safetensors' own writer lays tensors out in: by dtype, largest alignment first (its
# Dtype enum reversed), then by name. Keeping it makes a streamed file byte-identical to
# safetensors.torch.save_file's for the same tensors (tests/artifacts/test_writer_stream.py).
_SAFETENSORS_DTYPE_ORDER = {
    torch.int64: 0,
    torch.float32: 1,
    torch.int32: 2,
    torch.bfloat16: 3,
    torch.float16: 4,
    torch.int8: 5,
    torch.uint8: 6,
}
# safetensors pads its JSON header with spaces to a multiple of this, so the data stays aligned.
_HEADER_ALIGN = 8


def write_safetensors(
    path: Path,
    layout: list[tuple[str, torch.dtype, list[int]]],
    load: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> tuple[str, int]:
    """Write a safetensors file one tensor at a time: the header is computed from `layout`
    (name, dtype, shape) before any data, then each tensor is loaded, written and dropped, so
    memory holds one tensor, never the file. Returns the file's sha256 and size, hashed while
    writing. `load(name)` must return a tensor of the promised dtype and shape."""
    ordered = sorted(layout, key=lambda entry: (_SAFETENSORS_DTYPE_ORDER[entry[1]], entry[0]))
    header: dict[str, object] = {"__metadata__": dict(metadata or _SAFETENSORS_METADATA)}
    offset = 0
    for name, dtype, shape in ordered:
        end = offset + _nbytes(dtype, shape)
        header[name] = {"dtype": _dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % _HEADER_ALIGN)
    digest = hashlib.sha256()
    size = 0
    with open(path, "wb") as fh:
        for chunk in (struct.pack("<Q", len(encoded)), encoded):
            fh.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        for name, dtype, shape in ordered:
            tensor = load(name)
            if tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise InternalError(f"tensor {name} came back as {tensor.dtype} {list(tensor.shape)}, not {shape}")
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data
            fh.write(data)
            digest.update(data)
            size += len(data)
            del tensor, data
    return digest.hexdigest(), size


def read_staged_tensors(stage: Path, files: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the given safetensors files of a stage, by name."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(stage / file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                tensors[name] = handle.get_tensor(name)
    return tensors
