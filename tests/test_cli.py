"""The CLI's contract for CI pipelines: JSON on stdout, exit codes by error kind."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest
from click.testing import CliRunner

from llmc.errors import EXIT_CODES, ErrorKind
from llmc.kernels.cpu import cpu_kernels


def torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def torch_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def _llmc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmc", *args], capture_output=True, text=True, timeout=300)


def test_build_json_and_inspect(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = _llmc("build", "--m", str(tiny_llama_dir), "-o", str(tmp_path / "a"), "--json", "--name", "tiny")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] is True and summary["model_name"] == "tiny" and summary["dtype"] == "f32"
    # The default --compile and --cpu-isa baseline: one package, for AVX2 (named so on an AVX-512 host).
    stem = "compiled/decode_cpu_avx2" if torch_capability() == "AVX512" else "compiled/decode_cpu"
    compiled = {stem + ".p0.pt2", stem + ".p0.constants.safetensors"}  # one program of every layer
    kernels = {"kernels/" + cpu_kernels.library_name(isa) for isa in cpu_kernels.buildable()}
    assert set(summary["files"]) == {"model.safetensors", "tokenizer.json", "chat_template.jinja", *compiled, *kernels}
    assert summary["compiled"][0]["kind"] == "decode" and summary["compile_seconds"] > 0
    assert "FutureWarning" not in result.stderr  # torch's LeafSpec deprecation, from compiling
    inspected = _llmc("inspect", str(tmp_path / "a"), "--json", "--verify")
    assert inspected.returncode == 0, inspected.stderr
    info = json.loads(inspected.stdout)
    assert info["model"]["num_layers"] == 2 and info["parameters"] == summary["parameters"]
    if kernels:
        best = cpu_kernels.host_isas()[0]
        assert info["targets"]["cpu"]["kernels"][0] == {  # best first
            "file": "kernels/" + cpu_kernels.library_name(best),
            "torch_version": torch_version(),
            "isa": best,
            "runs_here": True,
            "why_not": None,
            "selected": True,
        }
        assert {k["file"] for k in info["targets"]["cpu"]["kernels"]} == kernels
    text = _llmc("inspect", str(tmp_path / "a"))
    assert "model_name: tiny" in text.stdout
    # the digest deployments pin (llmc run --expect-manifest-sha256): the manifest's bytes as stored
    digest = hashlib.sha256((tmp_path / "a" / "manifest.json").read_bytes()).hexdigest()
    assert summary["manifest_sha256"] == info["manifest_sha256"] == digest
    assert f"manifest_sha256: {digest}" in text.stdout


def test_build_errors_have_kind_exit_codes(tmp_path: Path) -> None:
    missing = _llmc("build", "--m", str(tmp_path / "nope"), "-o", str(tmp_path / "a"), "--json")
    assert missing.returncode == EXIT_CODES[ErrorKind.BAD_INPUT]
    assert json.loads(missing.stdout)["error"]["kind"] == "bad_input"
    (tmp_path / "empty").mkdir()
    no_config = _llmc("build", "--m", str(tmp_path / "empty"), "-o", str(tmp_path / "a"))
    assert no_config.returncode == EXIT_CODES[ErrorKind.BAD_MODEL]
    assert "config.json" in no_config.stderr and no_config.stderr.count("\n") == 1
    nothing = _llmc("build", "-o", str(tmp_path / "a"))
    assert nothing.returncode == EXIT_CODES[ErrorKind.BAD_INPUT]


def test_unsupported_architecture_lists_supported(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["FancyForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    result = _llmc("build", "--m", str(src), "-o", str(tmp_path / "a"))
    assert result.returncode == EXIT_CODES[ErrorKind.BAD_MODEL]
    assert "LlamaForCausalLM" in result.stderr


def test_uncached_hub_id_names_the_id(tmp_path: Path) -> None:
    env_result = subprocess.run(
        [sys.executable, "-m", "llmc", "build", "--m", "nobody-here/no-such-model", "-o", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert env_result.returncode == EXIT_CODES[ErrorKind.BAD_MODEL]
    assert "nobody-here/no-such-model" in env_result.stderr


def test_cached_hub_id_builds_offline(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A Hugging Face id already in the cache builds with the network switched off."""
    import os
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmc",
            "build",
            "--m",
            "someone/tiny-llama",
            "-o",
            str(tmp_path / "a"),
            "--json",
            "--no-compile",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model_name"] == "someone/tiny-llama"


def test_run_on_a_taken_port_fails_before_loading(tmp_path: Path) -> None:
    with socket.socket() as holder:
        # Another server, bound as Granian binds (SO_REUSEPORT): a second one could share the port.
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _llmc("run", str(tmp_path), "--p", str(port))  # a folder, not an artifact: not loaded
    assert result.returncode == EXIT_CODES[ErrorKind.OUT_OF_RESOURCES], result.stderr
    assert f"could not serve on 127.0.0.1:{port}" in result.stderr and "choose another --p" in result.stderr


def test_short_flags_reach_the_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What llama.cpp and vLLM users type: -m -f -o on build, -m -p on run, -h everywhere, serve = run."""
    import llmc.builder.build
    import llmc.runtime.server
    from llmc import cli

    builds: list[Any] = []
    monkeypatch.setattr(llmc.builder.build, "build", lambda options, on_progress=None: builds.append(options) or 1 / 0)
    runner = CliRunner()
    runner.invoke(cli.main, ["build", "-m", "owner/name", "-f", "x.gguf", "-o", str(tmp_path / "out")])
    runner.invoke(cli.main, ["build", "--model", "m", "--file", "f.gguf", "--output", str(tmp_path / "o2")])
    runner.invoke(cli.main, ["build", "--m", "m3", "--f", "f3.gguf", "-o", str(tmp_path / "o3")])  # the card's
    assert [(b.model, b.gguf_file, b.output) for b in builds] == [
        ("owner/name", "x.gguf", tmp_path / "out"),
        ("m", "f.gguf", tmp_path / "o2"),
        ("m3", "f3.gguf", tmp_path / "o3"),
    ]
    served: list[Any] = []

    def no_exit(code: int) -> NoReturn:
        raise SystemExit(code)

    monkeypatch.setattr(llmc.runtime.server, "serve", served.append)
    monkeypatch.setattr(cli, "_exit_without_finalizing", no_exit)
    for args in (["run", str(tmp_path), "-p", "2001"], ["serve", "-m", str(tmp_path), "--port", "2002"]):
        assert runner.invoke(cli.main, args).exit_code == 0
    assert runner.invoke(cli.main, ["serve", "--model", str(tmp_path), "--p", "2003"]).exit_code == 0
    assert [(c.artifact, c.port) for c in served] == [
        (str(tmp_path), 2001),
        (str(tmp_path), 2002),
        (str(tmp_path), 2003),
    ]
    both = runner.invoke(cli.main, ["run", str(tmp_path), "-m", str(tmp_path)])
    assert both.exit_code == 2 and "once" in both.output
    for command in ([], ["build"], ["run"], ["serve"], ["inspect"], ["export"]):
        shown = runner.invoke(cli.main, [*command, "-h"])
        assert shown.exit_code == 0 and "Usage:" in shown.output, command
    assert "-m, --m, --model" in runner.invoke(cli.main, ["build", "-h"]).output
    assert "-p, --p, --port" in runner.invoke(cli.main, ["serve", "-h"]).output
    assert "serve" in runner.invoke(cli.main, ["-h"]).output


def test_enum_flags_are_refused_before_the_model_is_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--isq bogus` (and a bad --dtype or --target) is a usage error, exit 2, before any source is
    opened or downloaded and before the output folder is made."""
    import llmc.builder.build
    from llmc import cli

    opened: list[Any] = []
    monkeypatch.setattr(llmc.builder.build, "open_source", lambda *args: opened.append(args) or 1 / 0)
    runner = CliRunner()
    bad = (
        ("--isq", "bogus"),
        ("--dtype", "f64"),
        ("--target", "tpu"),
        ("--target", "cpu,tpu"),
        ("--target", "cpu,cpu"),
    )
    for flag, value in bad:
        result = runner.invoke(cli.main, ["build", "-m", "owner/name", "-o", str(tmp_path / "out"), flag, value])
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '{flag}'" in result.output
    assert opened == [] and not (tmp_path / "out").exists()


def test_run_missing_directory_exits_2(tmp_path: Path) -> None:
    for command in ("run", "serve", "inspect"):
        result = _llmc(command, str(tmp_path / "missing") + "/")
        assert result.returncode == EXIT_CODES[ErrorKind.BAD_INPUT], (command, result.stderr)
        assert "no such directory" in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_serve_starts_quietly(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`llmc serve -m ART -p PORT -q`: serves; stdout stays empty and stderr holds no Granian line,
    no per-request line and nothing at INFO (-q after the subcommand: warnings only)."""
    import os
    import signal

    import httpx

    from llmc.tests.server import free_port, wait_healthy

    built = _llmc("build", "-m", str(tiny_llama_dir), "-o", str(tmp_path / "a"), "--no-compile", "--name", "tiny")
    assert built.returncode == 0, built.stderr
    port = free_port()
    command = [sys.executable, "-m", "llmc", "serve", "-m", str(tmp_path / "a"), "-p", str(port), "-q"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_healthy(proc, f"http://127.0.0.1:{port}"), proc.communicate()
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert out == ""
    assert "granian" not in err.lower() and "experimental" not in err and " INFO " not in err, err


def test_build_prints_a_short_summary(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Off a terminal: no progress line and no per-tensor table, only a few summary lines;
    --report adds the table; with --json stdout stays one JSON object."""
    from safetensors import safe_open

    args = ["build", "-m", str(tiny_llama_dir), "--isq", "q4_0", "--no-compile"]
    plain = _llmc(*args, "-o", str(tmp_path / "a"))
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert 3 <= len(lines) <= 5, lines
    assert "model.layers.0" not in plain.stdout and plain.stderr == ""
    assert lines[1].startswith("weights: q4_0 (") and "f32 (" in lines[1]
    with safe_open(str(tiny_llama_dir / "model.safetensors"), "pt") as f:
        names = f.keys()
        real = sum(_numel(f.get_slice(name).get_shape()) for name in names)
    assert f"{real:,} parameters" in lines[0]
    reported = _llmc(*args, "-o", str(tmp_path / "a"), "--report")
    assert reported.returncode == 0 and "model.layers.0.mlp.down_proj.weight" in reported.stdout
    as_json = _llmc(*args, "-o", str(tmp_path / "a"), "--report", "--json")
    assert as_json.returncode == 0, as_json.stderr
    summary = json.loads(as_json.stdout)  # the table went to stderr
    assert "model.layers.0.mlp.down_proj.weight" in as_json.stderr
    inspected = json.loads(_llmc("inspect", str(tmp_path / "a"), "--json").stdout)
    assert summary["parameters"] == inspected["parameters"] == real
    assert set(inspected["weight_formats"]) == {"q4_0", "q8_0", "f32"}  # q8_0: the output projection
    assert sum(f["parameters"] for f in inspected["weight_formats"].values()) == real
    text = _llmc("inspect", str(tmp_path / "a")).stdout
    assert "weights: q4_0 (" in text and "dtype: f32" in text


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def test_offline_hub_fails_fast_and_says_hf_download(tmp_path: Path) -> None:
    """No network (the hub's address is a closed loopback port): the build fails at once, no
    retries, and says how to download (`hf download`) and build offline (HF_HUB_OFFLINE)."""
    import os

    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    timed = (
        "import time; from llmc.builder.sources import hub; from llmc.errors import BadModelError\n"
        "for file in (None, 'model.gguf'):\n"
        "    started = time.monotonic()\n"
        "    try: hub.resolve('nobody-here/no-such-model', file)\n"
        "    except BadModelError as exc: print(round(time.monotonic() - started, 2), exc.message)\n"
    )
    probe = subprocess.run([sys.executable, "-c", timed], capture_output=True, text=True, timeout=120, env=env)
    results = probe.stdout.splitlines()
    assert len(results) == 2, probe.stdout + probe.stderr
    for line in results:
        seconds, message = line.split(" ", 1)
        assert float(seconds) < OFFLINE_FAIL_S, line  # huggingface_hub's own retries took 23 s
        assert "hf download nobody-here/no-such-model" in message and "HF_HUB_OFFLINE=1" in message
        assert "huggingface-cli" not in message
    assert "Retrying" not in probe.stderr
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmc",
            "build",
            "-m",
            "nobody-here/no-such-model",
            "-f",
            "m.gguf",
            "-o",
            str(tmp_path / "a"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert built.returncode == EXIT_CODES[ErrorKind.BAD_MODEL]
    assert "hf download nobody-here/no-such-model m.gguf" in built.stderr and built.stderr.count("\n") == 1


# A refused connection fails in milliseconds; the bound leaves room for a loaded 2-core CI machine.
OFFLINE_FAIL_S = 3.0


def _closed_port() -> int:
    """A loopback port nothing listens on: bound, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_ENTRY_SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
from llmc import cli

out = Path(sys.argv[1])

def work():
    time.sleep(0.3)
    out.joinpath("thread").write_text("done")

def fake_main():
    threading.Thread(target=work).start()  # a non-daemon thread still at work when main returns
    atexit.register(lambda: out.joinpath("atexit").write_text("ran"))
    print("buffered", end="")  # stdout is a pipe: block-buffered until the exit flushes it
    if sys.argv[2] != "return":
        sys.exit(None if sys.argv[2] == "none" else int(sys.argv[2]) if sys.argv[2].isdigit() else sys.argv[2])

cli.main = fake_main
cli.entry()
"""


@pytest.mark.parametrize(("how", "code"), [("return", 0), ("none", 0), ("3", 3), ("a message", 1)])
def test_the_command_skips_finalizing_but_ends_as_a_normal_exit(tmp_path: Path, how: str, code: int) -> None:
    """`entry` exits without the interpreter's slow teardown (~1 s after a build), yet the process
    ends as a normal exit would: threads joined, exit handlers run, stdout flushed, the status and
    a message passed to sys.exit kept."""
    result = subprocess.run(
        [sys.executable, "-P", "-c", _ENTRY_SCRIPT, str(tmp_path), how], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == code, result.stderr
    assert result.stdout == "buffered"
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "atexit").read_text() == "ran"
    assert result.stderr == ("a message\n" if how == "a message" else "")


def test_a_full_disk_or_an_unusable_path_is_an_llmc_error_not_a_traceback(tmp_path: Path) -> None:
    """A path component over 255 bytes crashed build, inspect and export; a full disk at build or
    export and ENOMEM from the KV cache's mmap exited 1 with a traceback (exit 5 is out of resources)."""
    import errno

    from llmc.cli import main, os_error

    missing = CliRunner().invoke(main, ["export", str(tmp_path / "typo"), "--gguf", str(tmp_path / "x.gguf")])
    assert missing.exit_code == EXIT_CODES[ErrorKind.BAD_INPUT], missing.output  # as inspect: was 4
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / ("a" * 300)), "--json"])
    assert result.exit_code == EXIT_CODES[ErrorKind.BAD_INPUT], result.output
    assert json.loads(result.output)["error"]["message"].startswith("File name too long")
    full = os_error(OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors"))
    assert full is not None and full.exit_code == EXIT_CODES[ErrorKind.OUT_OF_RESOURCES]
    assert "/out/model.safetensors" in full.message
    assert os_error(OSError(errno.ENOMEM, "Cannot allocate memory")).kind == ErrorKind.OUT_OF_RESOURCES  # type: ignore[union-attr]
    assert os_error(OSError(errno.EIO, "I/O error")) is None  # not the machine's limits: a traceback still
