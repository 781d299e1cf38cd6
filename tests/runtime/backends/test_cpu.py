"""Issue 18: the CPU backend's own choices: the KV cache's memory and the compiled step per batch."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import pytest
import torch

from llmc.artifacts.manifest import CompiledStep, LayerProgram, ModelSpec
from llmc.errors import BadInputError
from llmc.kernels.cpu import autotune
from llmc.kernels.cpu.qmatmul_cpu import DEFAULT_PLAN, DENSE_MIN_ROWS, DensePlan
from llmc.model.kv_layout import allocate_kv_caches, kv_bytes_per_token
from llmc.runtime.backends import make_backend
from llmc.runtime.backends.base import BackendOptions
from llmc.runtime.backends.cpu import CpuBackend
from llmc.runtime.bucketed_step import BucketedStep

SPEC = ModelSpec(
    architecture="deepseek_v2",
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_layers=3,
    num_heads=2,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    v_head_dim=4,
)


def test_the_kv_cache_is_zeroed_anonymous_memory_in_the_model_layout() -> None:
    backend = make_backend("cpu", BackendOptions())
    caches = backend.allocate_kv(SPEC, torch.float32, 48)
    assert [(k.shape, v.shape) for k, v in caches] == [((48, 2, 8), (48, 2, 4))] * SPEC.num_layers
    assert all(not k.any() and not v.any() for k, v in caches)
    plain = allocate_kv_caches(SPEC, torch.float32, 48)  # the layout the builder traces over
    assert [(k.shape, v.shape) for k, v in plain] == [(k.shape, v.shape) for k, v in caches]
    # every layer is a view of one allocation, of the size the engine budgets per token
    storage = {k.untyped_storage().data_ptr() for pair in caches for k in pair}
    assert len(storage) == 1
    assert caches[0][0].untyped_storage().nbytes() == 48 * kv_bytes_per_token(SPEC, torch.float32)


def _smaps_field(address: int, field: str) -> list[str]:
    """The values of `field` ("VmFlags:", "Rss:") of the mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == field:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _vm_flags(address: int) -> list[str]:
    return _smaps_field(address, "VmFlags:")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
@pytest.mark.parametrize("huge", [False, True])
def test_the_kv_cache_asks_for_huge_pages_only_when_told(huge: bool) -> None:
    """Huge pages cost a compaction on every first touch where THP defrag is `madvise`: opt-in."""
    backend = make_backend("cpu", BackendOptions(kv_huge_pages=huge))
    # 4 MiB of cache, so that the kernel could back it with huge pages at all
    caches = backend.allocate_kv(SPEC, torch.float32, 4 * 1024 * 1024 // kv_bytes_per_token(SPEC, torch.float32))
    assert ("hg" in _vm_flags(caches[0][0].data_ptr())) is huge  # "hg": MADV_HUGEPAGE was given


def _resident_pages(address: int, nbytes: int) -> int:
    """Pages of [address, address + nbytes) in memory (mincore(2)): of this range only, where the
    kernel may have merged its mapping with a neighbour whose smaps Rss would count too."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    pages = -(-nbytes // mmap.PAGESIZE)
    vector = ctypes.create_string_buffer(pages)
    assert libc.mincore(address, nbytes, vector) == 0, ctypes.get_errno()
    return sum(byte & 1 for byte in vector.raw[:pages])


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
@pytest.mark.parametrize("prefault", [False, True])
def test_the_kv_cache_is_faulted_in_at_start_unless_told_not_to(prefault: bool) -> None:
    """Prefaulted on a thread of its own once the engine is loaded (steps then never fault fresh
    blocks in); lazily with --no-kv-prefault, where an untouched cache takes no memory."""
    backend = make_backend("cpu", BackendOptions(kv_prefault=prefault))
    assert isinstance(backend, CpuBackend)
    mib = 8  # 8 MiB of cache
    caches = backend.allocate_kv(SPEC, torch.float32, mib * 1024 * 1024 // kv_bytes_per_token(SPEC, torch.float32))
    assert backend.prefault_thread is None  # not while loading
    backend.ready()  # the engine is loaded
    thread = backend.prefault_thread
    assert (thread is not None) is prefault
    if thread is not None:
        thread.join(timeout=30)
    memory = caches[0][0].untyped_storage()
    resident = _resident_pages(memory.data_ptr(), memory.nbytes())
    assert resident == (-(-memory.nbytes() // mmap.PAGESIZE) if prefault else 0)  # every page, or none
    assert all(not k.any() and not v.any() for k, v in caches)  # zeros either way


def test_an_unknown_device_is_refused_naming_the_ones_there_are() -> None:
    with pytest.raises(BadInputError, match=r"'tpu'.*cpu"):
        make_backend("tpu", BackendOptions())


class _Step(BucketedStep):
    def __init__(self, weights: str, buckets: list[int]) -> None:
        info = CompiledStep(
            kind="decode",
            programs=[LayerProgram(package="p", constants="c", layers=1)],
            order=[0],
            buckets=buckets,
            max_seq_len=32,
            block_size=16,
            torch_version="0",
            cpu_capability="none",
            weights=weights,
        )
        super().__init__(info, 64)

    def _run(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        raise AssertionError("not run here")


def test_the_dense_package_takes_batches_from_dense_min_rows() -> None:
    backend = CpuBackend(BackendOptions())
    backend.tuning = autotune.Tuning(DEFAULT_PLAN, "defaults")
    packed, dense = _Step("packed", [1, 2, 4, 64]), _Step("dense", [DENSE_MIN_ROWS, 64])
    steps: list[BucketedStep] = [packed, dense]
    assert backend.choose_step(steps, 1, 20) is packed
    assert backend.choose_step(steps, DENSE_MIN_ROWS - 1, 20) is packed
    assert backend.choose_step(steps, DENSE_MIN_ROWS, 20) is dense
    assert backend.choose_step([packed], DENSE_MIN_ROWS, 20) is packed
    assert backend.choose_step(steps, 1, 33) is None  # longer than the steps were traced for


def test_the_dense_package_follows_the_measured_pair_threshold() -> None:
    """The package pins the pairs' bf16 copies: used from where this host measured them faster,
    never where the pairs keep no copy or the copies are f32."""
    backend = CpuBackend(BackendOptions())
    packed, dense = _Step("packed", [1, 2, 4, 64]), _Step("dense", [DENSE_MIN_ROWS, 64])
    steps: list[BucketedStep] = [packed, dense]
    backend.tuning = autotune.Tuning(DensePlan(pair=16), "measured")
    assert backend.choose_step(steps, DENSE_MIN_ROWS, 20) is packed
    assert backend.choose_step(steps, 16, 20) is dense
    backend.tuning = autotune.Tuning(DensePlan(pair=4), "measured")
    assert backend.choose_step(steps, 4, 20) is packed  # never below the batches it was traced for
    assert backend.choose_step(steps, DENSE_MIN_ROWS, 20) is dense
    for plan in (DensePlan(pair=None), DensePlan(pair=8, dtype=torch.float32)):
        backend.tuning = autotune.Tuning(plan, "measured")
        assert backend.choose_step(steps, 64, 20) is packed
