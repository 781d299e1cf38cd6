"""The lean runtime (issue #26): llmc's onnx backend without torch beside llmc's torch backend on the
same artifact, llama.cpp on the same GGUF and onnxruntime-genai's int4 model of the same weights.

One artifact is built from the GGUF for `--target cpu,onnx` (its blocks kept). Each llmc server
runs alone (never two at once): the onnx one in an environment where `import torch` fails, as in a
`pip install llmc[lean]`. Per server: start -> /health, start -> first token, resident memory at
ready and after a round of 16 concurrent clients, single-stream decode, prefill of 512 tokens and
the 16 clients' aggregate tok/s. Greedy agreement: the first 20 greedy tokens of each against
transformers in float32 on the GGUF's weights (dequantized), all from the same token ids.

    python -m llmc.benchmarks.lean --gguf SmolLM2-135M-Instruct.Q4_1.gguf --onnx-genai-model DIR

`--onnx-genai-model`: onnxruntime-genai's own int4 model of the same weights, made with its builder
from the dequantized checkpoint (docs/BENCHMARKS.md has the commands); `--hf-model`: that float32
checkpoint, the agreement reference. `--install-size` also measures a fresh `llmc[lean]` venv.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmc.benchmarks.e2e import (
    DECODE_TOKENS,
    PREFILL_TOKENS,
    PROMPT,
    bench_llama_cpp,
    prefill_prompt,
    stream_completion,
)
from llmc.benchmarks.ready import _memory_mb, _tree, wait_healthy
from llmc.benchmarks.serving import free_port, prompt_for, run_round

CLIENTS = 16
CLIENT_TOKENS = 64  # per client in the concurrent round, as benchmarks/serving.py
AGREEMENT_TOKENS = 20  # the greedy-agreement length
TEACHER_FORCED_TOKENS = 1000  # positions of the steadier accuracy measure (teacher_forced)
_POLL_S = 0.01  # /health polling: fine against the ~0.5 s start being measured
# Hides torch from a child process, as a lean install lacks it (tests/runtime/test_lean_imports.py).
_FAKE_TORCH = 'raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n'


def no_torch_env(folder: Path) -> dict[str, str]:
    (folder / "torch").mkdir(parents=True, exist_ok=True)
    (folder / "torch" / "__init__.py").write_text(_FAKE_TORCH)
    path = [str(folder), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def build(gguf: Path, out: Path) -> float:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "llmc", "build", "--m", str(gguf), "--name", "bench", "--target", "cpu,onnx"]
    subprocess.run([*cmd, "-o", str(out), "--json"], check=True, capture_output=True)
    return time.perf_counter() - started


def bench_llmc(
    artifact: Path, backend: str, threads: int, runs: int, env: dict[str, str], llmc: list[str]
) -> dict[str, Any]:
    port = free_port()
    cmd = [*llmc, "run", str(artifact), "--p", str(port), "--threads", str(threads)]
    started = time.perf_counter()
    proc = subprocess.Popen([*cmd, "--backend", backend], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        ready = wait_healthy(proc, base, started, f"llmc run --backend {backend}", poll_s=_POLL_S)
        first_token = stream_completion(base, 1, PROMPT)[0] - started
        rss_ready = _memory_mb(_tree(proc.pid))
        stream_completion(base, 8, PROMPT)  # warm-up
        decode = []
        for _ in range(runs):
            times = stream_completion(base, DECODE_TOKENS, PROMPT)
            decode.append((len(times) - 1) / (times[-1] - times[0]))
        prefill = []
        for run in range(runs):
            sent = time.perf_counter()
            first = stream_completion(base, 1, prefill_prompt(run))[0]
            prefill.append(PREFILL_TOKENS / (first - sent))
        clients = asyncio.run(run_round(base, {"model": "bench"}, CLIENTS, CLIENT_TOKENS, 600.0, "lean"))
        rss_after = _memory_mb(_tree(proc.pid))
    finally:
        proc.terminate()
        proc.wait()
    return {
        "ready_s": round(ready, 3),
        "first_token_s": round(first_token, 3),
        "rss_ready_mb": rss_ready["rss_mb"],
        "rss_after_16_clients_mb": rss_after["rss_mb"],
        "decode_tok_s": round(statistics.median(decode), 1),
        "prefill_tok_s": round(statistics.median(prefill), 1),
        "clients_16_tok_s": round(clients["tok_per_s"], 1),
        "clients_16_ok": clients["ok"],
    }


def bench_llama_server(server: Path, gguf: Path, threads: int) -> float:
    """llama-server's aggregate tok/s over one round of 16 clients (benchmarks/serving.py's round)."""
    port = free_port()
    ctx = CLIENTS * (192 + CLIENT_TOKENS)  # room per slot for a prompt and its tokens, as serving.py
    cmd = [str(server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(CLIENTS)]
    cmd += ["-c", str(ctx), "-t", str(threads), "--cont-batching"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, time.perf_counter(), "llama-server")
        asyncio.run(run_round(base, {"model": gguf.name}, 2, 8, 600.0, "warm-up"))
        result = asyncio.run(run_round(base, {"model": gguf.name}, CLIENTS, CLIENT_TOKENS, 600.0, "lean"))
        return round(float(result["tok_per_s"]), 1)
    finally:
        proc.terminate()
        proc.wait()


_GENAI = """
import json, sys, time, resource
started = time.perf_counter()
import onnxruntime_genai as og
model = og.Model(sys.argv[1])
ids = json.loads(sys.argv[2])
def greedy(prompt, n):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    out, times = [], []
    while not gen.is_done() and len(out) < n:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0])); times.append(time.perf_counter())
    return out, times
first, _ = greedy(ids, 1)
first_token = time.perf_counter() - started
rss = int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) / 1024
tokens, _ = greedy(ids, %(agree)d)
rates = []
for _ in range(%(runs)d):
    _, times = greedy(ids, %(decode)d)
    rates.append((len(times) - 1) / (times[-1] - times[0]))
prefill = []
for run in range(%(runs)d):
    prompt = json.loads(sys.argv[3])[run]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 1, do_sample=False)
    gen = og.Generator(model, params)
    sent = time.perf_counter()
    gen.append_tokens(prompt)
    gen.generate_next_token()
    prefill.append(len(prompt) / (time.perf_counter() - sent))
rates.sort(); prefill.sort()
print(json.dumps({"first_token_s": first_token, "rss_mb": rss, "tokens": tokens,
                  "decode_tok_s": rates[len(rates) // 2], "prefill_tok_s": prefill[len(prefill) // 2]}))
"""


def bench_onnx_genai(model_dir: Path, threads: int, runs: int, ids: list[int]) -> dict[str, Any]:
    """onnxruntime-genai in a fresh process (its cold start), with `threads` intra-op threads (its
    default is one); the model folder is copied so its config can name the thread count."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(model_dir, folder)
        config = json.loads((folder / "genai_config.json").read_text())
        options = config["model"]["decoder"].setdefault("session_options", {})
        options["intra_op_num_threads"] = threads
        (folder / "genai_config.json").write_text(json.dumps(config))
        prompts = [prefill_prompt(run) for run in range(runs)]
        script = _GENAI % {"agree": AGREEMENT_TOKENS, "runs": runs, "decode": DECODE_TOKENS}
        done = subprocess.run(
            [sys.executable, "-c", script, str(folder), json.dumps(ids), json.dumps(prompts)],
            check=True,
            capture_output=True,
            text=True,
        )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def greedy_llmc(artifact: Path, backend: str, ids: list[int]) -> list[int]:
    from llmc.artifacts.reader import Artifact
    from llmc.runtime.engine import Engine, EngineConfig
    from llmc.runtime.output_processor import RequestOutput
    from llmc.runtime.sampling_params import SamplingParams

    engine = Engine(Artifact.open(artifact), EngineConfig(device=backend, max_waiting=None))
    tokens: list[int] = []
    finished: list[bool] = []

    def sink(out: RequestOutput) -> None:
        tokens.extend(out.token_ids)
        finished.append(out.finished)

    params = SamplingParams(max_tokens=AGREEMENT_TOKENS, temperature=0.0, ignore_eos=True)
    engine.submit("agree", ids, params, sink)
    engine.stop()
    engine.run()  # takes the submit, then returns at the stop
    while not any(finished):
        engine.step()
    return tokens


def greedy_llama_cpp(gguf: Path, ids: list[int], threads: int) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_threads=threads, n_ctx=256, verbose=False)
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        out.append(int(token))
        if len(out) == AGREEMENT_TOKENS:
            break
    return out


def greedy_reference(hf_model: Path, ids: list[int]) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=AGREEMENT_TOKENS, do_sample=False, pad_token_id=0)
    return [int(t) for t in out[0, len(ids) :]]


def reference_logits(hf_model: Path, ids: list[int]) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def teacher_forced(artifact: Path, backend: str, ids: list[int], reference: Any) -> dict[str, float]:
    """Over every position of a long text fed whole: how often the top token is the float32
    reference's, and the mean KL(reference || llmc) of the next-token distributions. Steadier
    than 20 greedy tokens, where one near-tie decides everything after it."""
    import numpy as np

    from llmc.artifacts.reader import Artifact
    from llmc.runtime.engine import Engine, EngineConfig
    from llmc.runtime.sampling_params import SamplingParams
    from llmc.runtime.sequence import Sequence

    engine = Engine(Artifact.open(artifact), EngineConfig(device=backend, max_waiting=None))
    seq = Sequence("tf", ids, SamplingParams(max_tokens=1))
    engine.block_manager.allocate(seq)
    got = engine.runner.run([(seq, len(ids))], all_logits=True)[1].astype(np.float64)

    def log_softmax(x: Any) -> Any:
        shifted = x - x.max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    ref_lp, got_lp = log_softmax(reference), log_softmax(got)
    kl = float((np.exp(ref_lp) * (ref_lp - got_lp)).sum(-1).mean())
    top1 = float((got.argmax(-1) == reference.argmax(-1)).mean())
    return {"positions": len(ids), "top1_agreement_pct": round(100 * top1, 2), "mean_kl": round(kl, 5)}


def agreement(tokens: list[int], reference: list[int]) -> dict[str, int]:
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b), len(reference))
    same = sum(a == b for a, b in zip(tokens, reference, strict=False))
    return {"same_positions": same, "same_prefix": prefix}


def install_size_mib(repo: Path) -> float:
    """A fresh venv with `pip install llmc[lean]` from this checkout: its site-packages, in MiB."""
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "install", "-q"]
        subprocess.run([*pip, f"{repo}[lean]"], check=True)
        site = next((venv / "lib").glob("python3*/site-packages"))
        pip_dirs = [p for p in site.iterdir() if p.name.startswith(("pip", "setuptools"))]  # venv's own
        total = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
        own = sum(f.stat().st_size for d in pip_dirs for f in d.rglob("*") if f.is_file())
        return round((total - own) / 2**20, 1)


def cpu_flags() -> str:
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")
    return " ".join(f for f in wanted if f" {f} " in f"{flags} ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--hf-model", type=Path, required=True, help="the GGUF's weights as a float32 HF folder")
    parser.add_argument("--onnx-genai-model", type=Path, help="onnxruntime-genai's int4 model folder")
    parser.add_argument("--llama-server", type=Path, default=Path(".cache/llama.cpp/build/bin/llama-server"))
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--install-size", action="store_true")
    parser.add_argument("--lean-venv", type=Path, help="a venv with `pip install llmc[lean]` to serve onnx from")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, flags: {cpu_flags()}",
        "threads": args.threads,
        "model": args.gguf.name,
    }
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "artifact"
        result["build_s"] = round(build(args.gguf, artifact), 1)
        sizes = {p.name: p.stat().st_size for p in artifact.rglob("*") if p.is_file()}
        result["onnx_weights_mb"] = round(sizes["model.onnx.data"] / 2**20, 1)
        result["llmc_weights_mb"] = round(sum(v for k, v in sizes.items() if k.endswith(".safetensors")) / 2**20, 1)
        this = [sys.executable, "-m", "llmc"]
        if args.lean_venv is not None:  # a real `pip install llmc[lean]`: no torch installed at all
            lean_cmd, lean_env = [str(args.lean_venv / "bin" / "llmc")], dict(os.environ)
        else:  # this environment with torch hidden
            lean_cmd, lean_env = this, no_torch_env(Path(tmp) / "hide")
        result["lean_server"] = "the venv " + str(args.lean_venv) if args.lean_venv else "torch hidden"
        result["llmc_onnx"] = bench_llmc(artifact, "onnx", args.threads, args.runs, lean_env, lean_cmd)
        result["llmc_torch"] = bench_llmc(artifact, "cpu", args.threads, args.runs, dict(os.environ), this)
        from llmc.artifacts.reader import Artifact
        from llmc.runtime.tokenizer import Tokenizer

        ids = Tokenizer.from_artifact(Artifact.open(artifact)).encode(PROMPT)
        reference = greedy_reference(args.hf_model, ids)
        tokens = {
            "llmc_onnx": greedy_llmc(artifact, "onnx", ids),
            "llmc_torch": greedy_llmc(artifact, "cpu", ids),
            "llama_cpp": greedy_llama_cpp(args.gguf, ids, args.threads),
        }
        tokenizer = Tokenizer.from_artifact(Artifact.open(artifact))
        text_ids = tokenizer.encode(" ".join(prompt_for("accuracy", i) for i in range(16)))[:TEACHER_FORCED_TOKENS]
        logits = reference_logits(args.hf_model, text_ids)
        result["teacher_forced"] = {b: teacher_forced(artifact, b, text_ids, logits) for b in ("onnx", "cpu")}
    result["llama_cpp"] = {
        k: round(v, 3 if k.endswith("_s") else 1)
        for k, v in bench_llama_cpp(args.gguf, args.threads, args.runs).items()
    }
    if args.llama_server.exists():
        result["llama_cpp"]["clients_16_tok_s"] = bench_llama_server(args.llama_server, args.gguf, args.threads)
    if args.onnx_genai_model is not None:
        genai = bench_onnx_genai(args.onnx_genai_model, args.threads, args.runs, ids)
        tokens["onnx_genai_int4"] = genai.pop("tokens")
        result["onnx_genai_int4"] = {k: round(v, 3 if k.endswith("_s") else 1) for k, v in genai.items()}
    result["greedy_agreement_of_20"] = {name: agreement(t, reference) for name, t in tokens.items()}
    for name in ("llmc_onnx", "llmc_torch"):
        ours = result[name]
        ours["decode_vs_llama_cpp"] = round(ours["decode_tok_s"] / result["llama_cpp"]["decode_tok_s"], 2)
        ours["prefill_vs_llama_cpp"] = round(ours["prefill_tok_s"] / result["llama_cpp"]["prefill_tok_s"], 2)
        if "clients_16_tok_s" in result["llama_cpp"]:
            ours["clients_16_vs_llama_cpp"] = round(
                ours["clients_16_tok_s"] / result["llama_cpp"]["clients_16_tok_s"], 2
            )
    if args.install_size:
        result["lean_install_mib"] = install_size_mib(Path(__file__).resolve().parent.parent)
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
