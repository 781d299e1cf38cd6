"""runtime/resident.py: the pages a library read from a weights file leave RSS at ready, written
ones never do, and what the mapping holds does not change."""

from __future__ import annotations

import mmap
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from llmc.runtime import resident

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")

_PAGES = 2048  # 8 MiB of 4 KiB pages: far above RSS noise


def _resident_kb(start: int) -> int:
    """Rss of the mapping that starts at `start` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            inside = int(fields[0].split("-")[0], 16) == start
        elif inside and fields[0] == "Rss:":
            return int(fields[1])
    raise AssertionError(f"no mapping starts at {start:#x}")


def _address(view: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_clean_mappings_of_the_file_leave_rss_and_written_ones_stay(tmp_path: Path) -> None:
    data = os.urandom(_PAGES * mmap.PAGESIZE)
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    with path.open("rb") as handle:
        # Private and writable, as onnxruntime maps an initializer: one only read, one written to.
        clean = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        written = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    assert clean[:] == data and written[:] == data  # every page read: resident
    written[0:1] = bytes([data[0] ^ 0xFF])
    clean_at, written_at = _address(clean), _address(written)
    assert _resident_kb(clean_at) >= _PAGES * mmap.PAGESIZE // 1024 * 0.9
    written_before = _resident_kb(written_at)  # the write may split a large folio: measure after it

    dropped = resident.drop_clean_file_pages(str(path.resolve()))

    assert dropped >= 0.9 * len(data)
    assert _resident_kb(clean_at) < 0.1 * len(data) // 1024
    assert _resident_kb(written_at) == written_before  # a written page: the mapping is kept whole
    assert written[0] == data[0] ^ 0xFF and written[1:] == data[1:]  # the write survives
    assert clean[:] == data  # read back from the file, unchanged


def test_other_files_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "other.bin"
    path.write_bytes(os.urandom(_PAGES * mmap.PAGESIZE))
    with path.open("rb") as handle:
        view = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    assert sum(view[:: mmap.PAGESIZE]) >= 0  # touch every page
    before = _resident_kb(_address_readonly(view))
    assert resident.drop_clean_file_pages(str((tmp_path / "weights.bin").resolve())) == 0
    assert _resident_kb(_address_readonly(view)) == before


def _address_readonly(view: mmap.mmap) -> int:
    """A read-only mmap has no writable buffer for ctypes: find it by its file in /proc/self/maps."""
    name = None
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith("other.bin"):
            name = int(fields[0].split("-")[0], 16)
    assert name is not None
    return name


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_the_heap_is_trimmed_on_glibc() -> None:
    assert resident.trim_heap() is True


# A thread (as the engine's) allocating, touching and freeing MB-sized blocks of varied sizes, as
# a prefill's activations are: how many pages it faults in after a warm-up.
_HEAP_CHILD = """
import ctypes, ctypes.util, resource, sys, threading
from llmc.runtime.resident import keep_freed_heap
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert keep_freed_heap()
sizes = [3 << 20, 5 << 20, 8 << 20, 12 << 20, 6 << 20, 20 << 20]
def step(i):
    a, b = libc.malloc(sizes[i % 6]), libc.malloc(sizes[(i + 1) % 6])
    ctypes.memset(a, 1, sizes[i % 6]); ctypes.memset(b, 1, sizes[(i + 1) % 6])
    libc.free(a); libc.free(b)
def work():
    for i in range(6):
        step(i)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for i in range(30):
        step(i)
    print(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's thresholds are glibc's")
def test_freed_heap_is_reused_without_faulting_pages_in_again() -> None:
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _HEAP_CHILD, mode], capture_output=True, text=True, check=True)
        return int(out.stdout)

    default = faults("default")
    if default == 0:
        pytest.skip("this C library already keeps these blocks between uses")
    assert faults("keep") <= default // 10
