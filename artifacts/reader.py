"""Open an artifact: check its format version, its manifest, its files' checksums, then map its weights.

An artifact comes from strangers. Every path it names is checked (relative, listed in `files`
with its size and sha256, resolving inside the artifact, symlinks included) before anything is
opened, and whatever runs as code or decides how text is read (the CPU kernel library, compiled
packages, the tokenizer, the chat template) is read once into memory, hashed, and used from those
very bytes (`read_verified`): no file can be swapped between the check and the use.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from llmc.artifacts.files import sha256_file
from llmc.artifacts.manifest import FORMAT_VERSION, MANIFEST_NAME, FileInfo, Manifest, validate
from llmc.errors import BadArtifactError, BadInputError

if TYPE_CHECKING:
    import torch

# A manifest lists every tensor; even a 1T-parameter model's stays far below this.
_MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_SHA256_HEX_CHARS = 64


def manifest_sha256(raw: bytes) -> str:
    """The digest that identifies an artifact: the sha256 of manifest.json as stored (it lists every
    other file's sha256, so it covers them all)."""
    return hashlib.sha256(raw).hexdigest()


def _read_bounded(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of a regular file, read from one open (no stat-then-read gap)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise BadArtifactError(f"{path} is larger than {limit} bytes; it is not an llmc manifest")
    return data


class Artifact:
    def __init__(self, root: Path, manifest: Manifest, manifest_sha256: str = "") -> None:
        self.root = root
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self._listed: dict[str, FileInfo] = {f.path: f for f in manifest.files}

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True, expect_manifest_sha256: str | None = None) -> Artifact:
        """Read and check the manifest; with `verify`, also every file's size and sha256.
        `expect_manifest_sha256` pins the manifest's digest (`llmc run --expect-manifest-sha256`)."""
        if expect_manifest_sha256 is not None:
            expect_manifest_sha256 = expect_manifest_sha256.strip().lower()
            if len(expect_manifest_sha256) != _SHA256_HEX_CHARS or any(
                c not in "0123456789abcdef" for c in expect_manifest_sha256
            ):
                raise BadInputError(
                    "--expect-manifest-sha256 takes the 64 hex digits `llmc build` and `llmc inspect` print"
                )
        root = Path(path).resolve()
        manifest_path = root / MANIFEST_NAME
        if manifest_path.is_symlink() or not manifest_path.is_file():
            raise BadArtifactError(
                f"{root} is not an llmc artifact: {MANIFEST_NAME} is missing (or a link); build one with `llmc build`"
            )
        try:
            raw = _read_bounded(manifest_path, _MAX_MANIFEST_BYTES)
        except OSError as exc:
            raise BadArtifactError(f"{manifest_path} cannot be read ({exc})") from exc
        digest = manifest_sha256(raw)
        if expect_manifest_sha256 is not None and digest != expect_manifest_sha256:
            raise BadArtifactError(
                f"{manifest_path} has sha256 {digest}, not the expected {expect_manifest_sha256}: "
                "this is not the artifact that was pinned; deploy the right one or update the pin"
            )
        try:
            header: Any = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise BadArtifactError(f"{manifest_path} is not valid JSON ({exc}); rebuild the artifact") from exc
        except RecursionError as exc:  # msgspec decodes untyped JSON recursively
            raise BadArtifactError(f"{manifest_path} nests JSON too deeply to be a manifest") from exc
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
        validate(manifest)
        artifact = cls(root, manifest, digest)
        for info in manifest.files:  # confinement is cheap: checked even without `verify`
            artifact.path(info.path)
        if verify:
            artifact.verify()
        return artifact

    def verify(self, skip: Collection[str] = ()) -> None:
        """Check every listed file's size and sha256 but those in `skip` (files this process never
        opens); name the first file that differs. The files hash on every core at once (hashlib
        lets go of the GIL): start-up waits on this."""
        infos = [info for info in self.manifest.files if info.path not in skip]
        paths = [self.path(info.path) for info in infos]
        for info, path in zip(infos, paths, strict=True):
            self._check_size(info, path.stat().st_size)
        workers = max(1, min(len(paths), len(os.sched_getaffinity(0))))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = list(pool.map(sha256_file, paths))
        for info, digest in zip(infos, digests, strict=True):
            if digest != info.sha256:
                raise self._damaged(info)

    @contextlib.contextmanager
    def verifying(self, skip: Collection[str] = ()) -> Iterator[None]:
        """Run `verify(skip)` on other threads while the block loads the model, and wait for it at
        the block's end: nothing serves from a damaged artifact, and its check no longer delays the
        load. A damaged file may make the load itself fail first; the check's error then wins, since
        it names the file."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            check = pool.submit(self.verify, skip)
            try:
                yield
            except BaseException:
                failure = check.exception()  # waits for the check
                if failure is not None:
                    raise failure from None
                raise
            check.result()

    def path(self, name: str) -> Path:
        """Where a file the manifest lists is: BadArtifactError if it is not listed, is missing, or
        resolves (through symlinks) outside the artifact."""
        if name not in self._listed:
            raise BadArtifactError(f"the manifest does not list {name!r} in `files`; rebuild the artifact")
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root):
            raise BadArtifactError(
                f"artifact file {name} resolves to {path}, outside the artifact {self.root}: "
                "an artifact may not link outside itself; rebuild or re-copy it without links",
                param=name,
            )
        if not path.is_file():
            raise BadArtifactError(
                f"artifact file {name} is missing from {self.root}; rebuild or re-copy the artifact", param=name
            )
        return path

    def read_verified(self, name: str) -> bytes:
        """A listed file's bytes, checked against its size and sha256: use these bytes, never the file again."""
        info = self._listed.get(name)
        path = self.path(name)
        assert info is not None  # path() refused unlisted names
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
            with os.fdopen(fd, "rb") as fh:
                data = fh.read(info.size + 1)
        except OSError as exc:
            raise BadArtifactError(f"artifact file {name} cannot be read ({exc})", param=name) from exc
        self._check_size(info, len(data))
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise self._damaged(info)
        return data

    @staticmethod
    def _check_size(info: FileInfo, size: int) -> None:
        if size != info.size:
            raise BadArtifactError(
                f"artifact file {info.path} has {size} bytes, the manifest says {info.size}: "
                "the artifact is damaged; rebuild or re-copy it",
                param=info.path,
            )

    @staticmethod
    def _damaged(info: FileInfo) -> BadArtifactError:
        return BadArtifactError(
            f"artifact file {info.path} fails its sha256 check: the artifact is damaged; rebuild or re-copy it",
            param=info.path,
        )

    def report(self) -> dict[str, Any] | None:
        """The build's quantization report (build_report.json), if the build quantized anything."""
        name = self.manifest.build.report_file
        if name is None:
            return None
        if self._listed[name].size > _MAX_MANIFEST_BYTES:
            raise BadArtifactError(f"artifact file {name} is oversized; rebuild the artifact")
        path = self.path(name)
        try:
            body: dict[str, Any] = msgspec.json.decode(self.read_verified(name))
        except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: untyped JSON nested deeply
            why = exc or "nested too deeply"
            raise BadArtifactError(f"{path} is not valid JSON ({why}); rebuild the artifact") from exc
        return body

    def lazy_weights(self) -> Mapping[str, torch.Tensor]:
        """Every tensor by name, each read from its file only when looked up (and not kept), so
        that a pass over a large model holds one tensor at a time (`llmc export --gguf`)."""
        return _LazyWeights(self)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield every tensor, memory-mapped from its safetensors file (no copy until written)."""
        # Imported here: `llmc run` verifies an artifact in its parent process, which never needs torch.
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for tensor in self.manifest.tensors:
            by_file.setdefault(tensor.file, []).append(tensor.name)
        for file_name, names in sorted(by_file.items()):
            with safe_open(str(self.path(file_name)), framework="pt", device="cpu") as handle:
                for name in names:
                    yield name, handle.get_tensor(name)


class _LazyWeights(Mapping[str, "torch.Tensor"]):
    """Artifact.lazy_weights: the manifest's tensors, each read on lookup from a file opened for it
    alone (a mapping kept open would keep every page read so far resident)."""

    def __init__(self, artifact: Artifact) -> None:
        self._artifact = artifact
        self._files = {t.name: t.file for t in artifact.manifest.tensors}

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._artifact.path(self._files[name])), framework="pt", device="cpu") as handle:
            tensor: torch.Tensor = handle.get_tensor(name)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)
