"""The build streams: its peak memory does not grow with the number of layers.

Two synthetic Llama models that differ only in depth (4 and 16 layers of a 512-wide model, about
190 MB more weights in float32) are built in child processes, and the deeper build's peak RSS
may exceed the shallower one's by only a fraction of the extra weights. A build that held the
model (a dict of every tensor, a whole shard in memory, the source mapped and never released)
grows by about the extra weights and fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llmc.benchmarks.synthetic_models import llama_config, make_model

# Small enough to build in seconds, wide enough that 12 extra layers are ~200 MB of f32 weights,
# far above the few MB by which a process's peak RSS varies between runs.
_WIDTH = {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_key_value_heads": 4}
_SMALL = {**_WIDTH, "head_dim": 64, "vocab_size": 4096, "max_position_embeddings": 1024, "rope_scaling": None}
# The deeper build may grow by at most this fraction of the extra weights it writes: streaming
# holds a tensor or two whatever the depth; whole-model loading grows by about all of them (1.0).
_MAX_GROWTH_FRACTION = 0.25


# Runs `llmc build` and, at exit, writes this process's peak RSS (VmHWM, the high-water mark of
# its own address space since exec) to the file named by argv[1]. Not the child's rusage: that
# also counts the parent's memory, whose image the child had between fork and exec.
_MEASURED_BUILD = """
import atexit, runpy, sys
out = sys.argv[1]
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(out, "w").write(line.split()[1])
atexit.register(peak)
sys.argv = ["llmc", *sys.argv[2:]]
runpy.run_module("llmc", run_name="__main__")
"""


def _build_peak_rss(model: Path, out: Path, isq: str) -> int:
    """Peak RSS in bytes of `llmc build` of `model` in a child process."""
    peak_file = out.parent / f"{out.name}.peak"
    cmd = [sys.executable, "-P", "-c", _MEASURED_BUILD, str(peak_file), "build", "--m", str(model), "--isq", isq]
    cmd += ["--no-compile", "--no-cpu-kernels", "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(peak_file.read_text()) * 1024  # kB


def _float_bytes(source: Path) -> int:
    """The source's weights in float32: what the build handles, whatever it then stores."""
    count = 0
    for file in source.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                count += int(torch.tensor(handle.get_slice(name).get_shape()).prod())
    return 4 * count


@pytest.mark.parametrize(
    ("isq", "layers"),
    [
        ("none", (4, 16)),  # f32 artifact: the float path, the writer, the source
        # The quantized path too (quantizer, report), shallower: llmc's quantizer is slow on 2 cores.
        pytest.param("q8_0", (2, 8), marks=pytest.mark.slow),
    ],
)
def test_peak_rss_does_not_grow_with_layers(tmp_path: Path, isq: str, layers: tuple[int, int]) -> None:
    peaks, sizes = [], []
    for depth in layers:
        model = make_model(tmp_path / f"src{depth}", llama_config("llama-3.2-1b", num_hidden_layers=depth, **_SMALL))
        peaks.append(_build_peak_rss(model, tmp_path / f"out{depth}", isq))
        sizes.append(_float_bytes(model))
    extra = sizes[1] - sizes[0]
    assert extra > 90 * 1024**2, "the deeper model must be large enough for the check to mean something"
    growth = peaks[1] - peaks[0]
    assert growth < _MAX_GROWTH_FRACTION * extra, (
        f"peak RSS grew by {growth / 1e6:.0f} MB for {extra / 1e6:.0f} MB more float weights: the build holds the model"
    )


def test_sharded_source_builds_the_same_weights(tmp_path: Path) -> None:
    """A source sharded into several safetensors files (with an index) builds as one file would."""
    config = llama_config("llama-3.2-1b", num_hidden_layers=2, **_SMALL)
    sharded = make_model(tmp_path / "sharded", config, shard_bytes=4 * 1024**2)
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    out = tmp_path / "out"
    cmd = [sys.executable, "-P", "-m", "llmc", "build", "--m", str(sharded), "--isq", "none", "--no-compile"]
    cmd += ["--no-cpu-kernels", "--dtype", "bf16", "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    source: dict[str, torch.Tensor] = {}
    for file in sharded.glob("model-*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            source |= {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        built = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    assert set(built) == set(source)
    for name, tensor in source.items():
        assert torch.equal(built[name], tensor), name
