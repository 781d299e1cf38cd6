"""The artifact's ahead-of-time compiled decode step, AOTInductor packages of runs of decoder
layers: the CPU's executor of a bucketed step (runtime/bucketed_step.py pads and validates its
inputs).

Loading never compiles anything: the package's code is mapped with torch's C++ loader (Python's
`aoti_load_package` spends seconds importing and probing), and its weights are the eager model's
own tensors, handed over by name. Whether this process can run a package at all (torch version,
CPU capability, kernel library) is the backend's check before loading (runtime/backends/cpu.py).
The package and its constants are loaded from the bytes whose sha256 was checked (unpacked into a
private folder, removed once loaded).

AOTInductor does not check the shapes or index ranges of what it is given: BucketedStep
validates every input first, as a bad slot or block id would otherwise corrupt memory.
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import load

from llmc.artifacts.manifest import CompiledStep
from llmc.artifacts.reader import Artifact
from llmc.errors import BadArtifactError
from llmc.logs import get_logger
from llmc.model.decode_step import DecodeLayers, DecodeLogits, DecodeStep
from llmc.model.decoder import CausalLM
from llmc.runtime.bucketed_step import BucketedStep

log = get_logger("llmc.compiled")

_MODEL_NAME = "model"  # the name aoti_compile_and_package gives the one model in a package
_RUN_SINGLE_THREADED = False  # the engine calls from one thread at a time either way
_NUM_RUNNERS = 1
_CPU_DEVICE_INDEX = -1
_PACKAGE_FILE = "decode.pt2"  # the file a loader that takes no folder gets: it wants a .pt2 name
# The most a package may unpack to. A package holds code only (SmolLM2's unpack to under 1 MB, and
# the code does not grow with the weights); the bound keeps a hostile archive from filling the disk.
_MAX_UNPACKED_BYTES = 1 << 30


def _write_new(path: Path, data: bytes) -> None:
    """Write a file that must not exist yet (nor be a link), readable by us only."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(path, flags, 0o600), "wb") as fh:
        fh.write(data)


def _unpack(package: bytes, root: Path) -> None:
    """Unpack a .pt2 package (a zip archive, from an artifact: untrusted) under `root`: every entry
    a relative path confined to it, nothing linked, its total size bounded."""
    try:
        with zipfile.ZipFile(io.BytesIO(package)) as archive:
            entries = archive.infolist()
            total = sum(entry.file_size for entry in entries)
            if total > _MAX_UNPACKED_BYTES:
                raise BadArtifactError(
                    f"a compiled package unpacks to {total} bytes, more than the {_MAX_UNPACKED_BYTES} a package "
                    "may hold: rebuild the artifact with llmc"
                )
            for entry in entries:
                parts = PurePosixPath(entry.filename).parts
                if not parts or entry.filename.startswith("/") or "\\" in entry.filename or ".." in parts:
                    raise BadArtifactError(
                        f"a compiled package names the path {entry.filename!r}, outside the package: "
                        "rebuild the artifact with llmc"
                    )
                path = root.joinpath(*parts)
                if entry.is_dir():
                    path.mkdir(parents=True, exist_ok=True)
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_new(path, archive.read(entry))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:  # a broken archive, a duplicate entry
        raise BadArtifactError(f"a compiled package cannot be unpacked ({exc}): rebuild the artifact") from exc


def _load_package(package: bytes, count: int = 1) -> list[torch._C._aoti.AOTIModelPackageLoader]:
    """`count` loaders of a .pt2 package from these (verified) bytes: unpacked into a fresh 0700
    directory of our own, loaded from there (torch's loader takes a folder as well as a file), and
    removed at once: the loaded code stays mapped. Loaded from one path, the loaders share one copy
    of the code (the dynamic linker maps a library once per path), each with its own constants: a
    program serving several runs of layers is in the CPU's caches once. Given the file, torch's
    loader unpacks it into a /tmp/aotinductor_* folder of its own that lives as long as the loader,
    and that a killed process leaves behind: that remains the way only where torch's loader takes
    no folder."""
    with tempfile.TemporaryDirectory(prefix="llmc-package-") as private:
        unpacked = Path(private) / "package"
        _unpack(package, unpacked)
        try:
            return [_loader(str(unpacked)) for _ in range(count)]
        except RuntimeError as exc:  # a torch whose loader takes only a file
            log.debug("compiled.load_from_file", reason=str(exc).splitlines()[0] if str(exc) else "")
        path = Path(private) / _PACKAGE_FILE
        _write_new(path, package)
        return [_loader(str(path)) for _ in range(count)]


def _loader(path: str) -> torch._C._aoti.AOTIModelPackageLoader:
    return torch._C._aoti.AOTIModelPackageLoader(
        path, _MODEL_NAME, _RUN_SINGLE_THREADED, _NUM_RUNNERS, _CPU_DEVICE_INDEX
    )


def _with_constants(
    loader: torch._C._aoti.AOTIModelPackageLoader,
    module: torch.nn.Module,
    made: dict[str, torch.Tensor],
    info: CompiledStep,
) -> bool:
    """Hand `loader` `module`'s tensors (by their names in it) and the compiler-made constants
    `made`; False (with a warning) when the package asks for others."""
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    tensors |= dict(module.named_buffers(remove_duplicate=False))
    tensors |= made
    wanted = loader.get_constant_fqns()
    missing = [name for name in wanted if name not in tensors]
    if missing:
        log.warning("compiled.not_used", kind=info.kind, reason="constants missing", missing=missing[:5])
        return False
    # user_managed: the package uses our tensors in place (memory-mapped weights are not copied).
    loader.load_constants({name: tensors[name] for name in wanted}, False, True, True)
    return True


class AOTInductorStep(BucketedStep):
    """A loaded compiled step; see BucketedStep for how to call it. Its decoder layers run as its
    programs' packages, one loader per run of layers holding that run's own tensors, the last
    run's program, a program of their own or eager torch computing the logits; the first run's
    program embeds the token ids (from them alone, or by a select beside its input where it serves
    other runs too), else the embedding runs eagerly before it (a lookup of B rows)."""

    def __init__(
        self,
        info: CompiledStep,
        model: CausalLM,
        runs: list[tuple[int, int, torch._C._aoti.AOTIModelPackageLoader, bool, bool]],
        logits: torch._C._aoti.AOTIModelPackageLoader | None,
        num_slots: int,
    ) -> None:
        super().__init__(info, num_slots, model.max_positions)
        self._model = model
        # (first layer, layers, loader, whether its program embeds by a select, whether it computes
        # the logits by a flag)
        self._runs = runs
        self._logits = logits  # None: the last run's program ends with the logits, or they run eagerly
        self._eager_logits = DecodeLogits(model) if info.eager_logits else None
        self._embedded = info.programs[info.order[0]].embed  # the first run's program starts from the ids
        # The select's flag: set for the first run, unset for the others sharing its program.
        self._take, self._keep = torch.tensor([True]), torch.tensor([False])

    @classmethod
    def load(cls, artifact: Artifact, info: CompiledStep, step: DecodeStep, num_slots: int) -> AOTInductorStep | None:
        """The loaded step, or None (with a warning) when a package lacks constants it needs."""
        model = step.model
        if sum(layers for _, layers, _ in info.runs()) != len(model.model.layers):
            raise BadArtifactError("a compiled step's programs do not cover the model's layers: rebuild the artifact")
        runs = []
        loaders: dict[int, list[torch._C._aoti.AOTIModelPackageLoader]] = {}
        made: dict[int, dict[str, torch.Tensor]] = {}
        for index, program in enumerate(info.programs):  # one unpacked copy of each program's code
            loaders[index] = _load_package(artifact.read_verified(program.package), info.order.count(index))
            made[index] = load(artifact.read_verified(program.constants))
        for (first, layers, program), index in zip(info.runs(), info.order, strict=True):
            module = DecodeLayers(
                model,
                first,
                layers,
                step.block_size,
                program.logits,
                program.embed,
                program.embed_select,
                program.logits_select,
            )
            loader = loaders[index].pop()
            if not _with_constants(loader, module, made[index], info):
                return None
            runs.append((first, layers, loader, program.embed_select, program.logits_select))
        logits = None
        if info.logits is not None:
            logits_made = load(artifact.read_verified(info.logits.constants))
            (logits,) = _load_package(artifact.read_verified(info.logits.package))
            if not _with_constants(logits, DecodeLogits(model), logits_made, info):
                return None
        log.info(
            "compiled.loaded",
            kind=info.kind,
            buckets=info.buckets,
            max_seq_len=info.max_seq_len,
            programs=len(info.programs),
            calls=len(runs),
        )
        return cls(info, model, runs, logits, num_slots)

    def _run(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        input_ids, positions, slot_mapping, block_tables, context_lens, *kv_caches = inputs
        model = self._model
        if self._embedded:
            hidden = input_ids
        elif self._runs[0][3]:  # the first run's program embeds them by a select, in place of this
            hidden = torch.zeros(len(input_ids), model.spec.hidden_size, dtype=model.dtype)
        else:
            hidden = model.embed(input_ids)
        last = len(self._runs) - 1
        for i, (first, layers, loader, selects, computes_logits) in enumerate(self._runs):
            kv = kv_caches[2 * first : 2 * (first + layers)]
            inputs = [hidden, positions, slot_mapping, block_tables, context_lens, *kv]
            if selects:
                inputs += [input_ids, self._take if i == 0 else self._keep]
            if computes_logits:
                inputs.append(self._take if i == last else self._keep)
            out: list[torch.Tensor] = loader.run(inputs)
            if computes_logits and i == last:
                return out[1]
            hidden = out[0]
        if self._eager_logits is not None:
            return self._eager_logits(hidden)
        if self._logits is None:
            return hidden
        logits: list[torch.Tensor] = self._logits.run([hidden])
        return logits[0]
