"""Open an artifact: check its format version, its files' checksums, then map its weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from llmc.artifacts.files import sha256_file
from llmc.artifacts.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest
from llmc.errors import BadArtifactError

if TYPE_CHECKING:
    import torch

# A manifest lists every tensor; even a 1T-parameter model's stays far below this.
_MAX_MANIFEST_BYTES = 64 * 1024 * 1024


class Artifact:
    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> Artifact:
        root = Path(path)
        manifest_path = root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise BadArtifactError(
                f"{root} is not an llmc artifact: {MANIFEST_NAME} is missing; build one with `llmc build`"
            )
        if manifest_path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise BadArtifactError(
                f"{manifest_path} is larger than {_MAX_MANIFEST_BYTES} bytes; it is not an llmc manifest"
            )
        raw = manifest_path.read_bytes()
        try:
            header: Any = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise BadArtifactError(f"{manifest_path} is not valid JSON ({exc}); rebuild the artifact") from exc
        version = header.get("format_version") if isinstance(header, dict) else None
        if version != FORMAT_VERSION:
            raise BadArtifactError(
                f"{root} has artifact format_version {version!r}; this llmc reads format_version {FORMAT_VERSION}. "
                "Rebuild the artifact with this llmc version, or run it with the llmc that built it."
            )
        try:
            manifest = msgspec.json.decode(raw, type=Manifest)
        except msgspec.ValidationError as exc:
            raise BadArtifactError(f"{manifest_path} does not match format_version {FORMAT_VERSION}: {exc}") from exc
        artifact = cls(root, manifest)
        if verify:
            artifact.verify()
        return artifact

    def verify(self) -> None:
        """Check every listed file's size and sha256; name the first file that differs."""
        for info in self.manifest.files:
            path = self.root / info.path
            if not path.is_file():
                raise BadArtifactError(
                    f"artifact file {info.path} is missing from {self.root}; rebuild or re-copy the artifact"
                )
            if path.stat().st_size != info.size:
                raise BadArtifactError(
                    f"artifact file {info.path} has {path.stat().st_size} bytes, the manifest says {info.size}: "
                    "the artifact is damaged; rebuild or re-copy it"
                )
            if sha256_file(path) != info.sha256:
                raise BadArtifactError(
                    f"artifact file {info.path} fails its sha256 check: the artifact is damaged; rebuild or re-copy it"
                )

    def report(self) -> dict[str, Any] | None:
        """The build's quantization report (build_report.json), if the build quantized anything."""
        name = self.manifest.build.report_file
        if name is None:
            return None
        path = self.root / name
        if not path.is_file() or path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise BadArtifactError(f"artifact file {name} is missing or oversized; rebuild the artifact")
        try:
            body: dict[str, Any] = msgspec.json.decode(path.read_bytes())
        except msgspec.DecodeError as exc:
            raise BadArtifactError(f"{path} is not valid JSON ({exc}); rebuild the artifact") from exc
        return body

    def path(self, name: str) -> Path:
        return self.root / name

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield every tensor, memory-mapped from its safetensors file (no copy until written)."""
        # Imported here: `llmc run` verifies an artifact in its parent process, which never needs torch.
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for tensor in self.manifest.tensors:
            by_file.setdefault(tensor.file, []).append(tensor.name)
        for file_name, names in sorted(by_file.items()):
            with safe_open(str(self.root / file_name), framework="pt", device="cpu") as handle:
                for name in names:
                    yield name, handle.get_tensor(name)
