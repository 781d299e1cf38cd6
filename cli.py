"""The `llmc` command line: build, inspect, run."""

from __future__ import annotations

import atexit
import errno
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import msgspec

from llmc.builder import BUILD_DTYPES, CPU_ISAS, DEFAULT_BUCKETS, DEFAULT_CPU_ISA, ISQ_FORMATS
from llmc.builder.targets import TARGET_NAMES
from llmc.errors import BadInputError, LlmcError, OutOfResourcesError
from llmc.logs import configure
from llmc.runtime.api.http_guard import BODY_TIMEOUT_S
from llmc.runtime.api.requests import MAX_TEMPERATURE
from llmc.runtime.backends.choice import BACKEND_CHOICES
from llmc.runtime.server import HEADER_TIMEOUT_S, SHUTDOWN_TIMEOUT_S

if TYPE_CHECKING:
    from llmc.builder.build import BuildResult

POSITIVE = click.IntRange(min=1)
PORT = click.IntRange(1, 65535)
# Most verbose first: -v moves a command's default one step left, -q one step right.
LEVEL_ORDER = ("debug", "info", "warning", "error", "critical")
LOG_LEVELS = click.Choice(list(LEVEL_ORDER), case_sensitive=False)
# `llmc run` logs at info by default (each request's id, sizes and timing; server.ready); the other
# commands print their results on stdout and log only warnings.
DEFAULT_LOG_LEVEL = "warning"
DEFAULT_RUN_LOG_LEVEL = "info"
# Where the log flags wait in click's context (ctx.meta, shared by the group and its subcommand).
_LOG_LEVEL_KEY = "llmc.log_level"
_VERBOSITY_KEY = "llmc.verbosity"
_LOG_LEVEL_HELP = "Log level for llmc's own logs (stderr); info by default for run, warning for the rest."
# What llama.cpp and vLLM users type: -h as well as --help, on every command.
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}


def _target_list(value: str) -> str:
    """`--target cpu,onnx`: every name known, none twice; exit code 2 otherwise."""
    names = [n.strip() for n in value.split(",")]
    unknown = [n for n in names if n not in TARGET_NAMES]
    if unknown or len(set(names)) != len(names):
        raise click.BadParameter(f"{value!r}: give targets from {', '.join(TARGET_NAMES)}, each once, comma-separated")
    return ",".join(names)


def _set_log_level(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """`--log-level` is taken before the subcommand and after it; the later one wins."""
    if value is not None:
        ctx.meta[_LOG_LEVEL_KEY] = value.lower()


def _add_verbosity(step: int) -> Any:
    def callback(ctx: click.Context, _param: click.Parameter, value: int) -> None:
        ctx.meta[_VERBOSITY_KEY] = ctx.meta.get(_VERBOSITY_KEY, 0) + step * value

    return callback


def _log_level_option(command: Any) -> Any:
    """--log-level, -v/--verbose and -q/--quiet, accepted before and after the subcommand."""
    command = click.option(
        "-q",
        "--quiet",
        count=True,
        callback=_add_verbosity(1),
        expose_value=False,
        help="Log less: one step quieter than the default per -q (-q on run: no per-request lines).",
    )(command)
    command = click.option(
        "-v",
        "--verbose",
        count=True,
        callback=_add_verbosity(-1),
        expose_value=False,
        help="Log more: one step more verbose than the default per -v (-vv: debug).",
    )(command)
    return click.option(
        "--log-level", type=LOG_LEVELS, callback=_set_log_level, expose_value=False, help=_LOG_LEVEL_HELP
    )(command)


def log_level(meta: dict[str, Any], default: str) -> str:
    """The level the flags ask for: --log-level if given, else `default` moved by -v/-q."""
    if _LOG_LEVEL_KEY in meta:
        return str(meta[_LOG_LEVEL_KEY])
    index = LEVEL_ORDER.index(default) + int(meta.get(_VERBOSITY_KEY, 0))
    return LEVEL_ORDER[max(0, min(index, len(LEVEL_ORDER) - 1))]


# Operating-system errors that are the machine's or the caller's, not llmc's: said as LlmcErrors
# with their exit codes (5 out of resources, 2 bad input) rather than tracebacks and exit 1.
_RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EFBIG})
_PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS, errno.ELOOP, errno.EILSEQ})


def os_error(exc: OSError) -> LlmcError | None:
    """The LlmcError an OSError stands for, or None where it is not one of the above."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in _RESOURCE_ERRNOS:
        return OutOfResourcesError(f"{exc.strerror or exc}{where}: free disk space or memory, or ask for less")
    if exc.errno in _PATH_ERRNOS:
        return BadInputError(f"{exc.strerror or exc}{where}: choose a path this user can use")
    return None


class _Command(click.Command):
    """Configures logging once every flag (before and after the subcommand) has been read, and
    reports a full disk, exhausted memory or an unusable path as an llmc error."""

    def invoke(self, ctx: click.Context) -> Any:
        default = DEFAULT_RUN_LOG_LEVEL if self.name == "run" else DEFAULT_LOG_LEVEL
        configure(log_level(ctx.meta, default))
        as_json = bool(ctx.params.get("as_json"))
        try:
            return super().invoke(ctx)
        except OSError as exc:
            error = os_error(exc)
            if error is None:
                raise
            _fail(error, as_json)
        except MemoryError:
            _fail(OutOfResourcesError("out of memory: free memory, or use a smaller model or --mem"), as_json)


class _Group(click.Group):
    command_class = _Command


def _report(error: LlmcError, as_json: bool) -> None:
    if as_json:
        body = {"ok": False, "error": {"kind": error.kind.value, "message": error.message}}
        click.echo(msgspec.json.encode(body).decode())
    else:
        click.echo(f"llmc: error: {error.message}", err=True)


def _fail(error: LlmcError, as_json: bool) -> None:
    _report(error, as_json)
    sys.exit(error.exit_code)


@click.group(cls=_Group, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="llmc")
@_log_level_option
def main() -> None:
    """llmc: compile an LLM into a self-contained artifact, then serve it."""
    configure(log_level(click.get_current_context().meta, DEFAULT_LOG_LEVEL))


@main.command()
@_log_level_option
@click.option("-m", "--m", "--model", "model", help="Model: a Hugging Face id, a local folder, or a .gguf path.")
@click.option("-f", "--f", "--file", "gguf_file", help="GGUF file, alone or inside the --m folder / repository.")
@click.option("--w", "weights", help="Folder holding the safetensors weights, if not the --m folder.")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", *BUILD_DTYPES]),
    help="Weight dtype; auto is f32 for the cpu target.",
)
@click.option(
    "--isq",
    type=click.Choice([*ISQ_FORMATS, "none"]),
    help="In-situ quantization to a GGML format, or none to dequantize everything. "
    "Default: keep a GGUF source's quantized blocks, leave other sources unquantized.",
)
@click.option(
    "--target",
    default="cpu",
    show_default=True,
    callback=lambda _ctx, _param, value: _target_list(value),
    help=f"What to build for, one or several comma-separated: {', '.join(TARGET_NAMES)} (onnx: a graph that "
    "onnxruntime serves without torch).",
)
@click.option(
    "--compile/--no-compile",
    "compile_step",
    default=True,
    show_default=True,
    help="Compile the decode step ahead of time (torch.export + AOTInductor); --no-compile: an eager artifact.",
)
@click.option(
    "--cpu-kernels/--no-cpu-kernels",
    default=True,
    show_default=True,
    help="Compile llmc's CPU kernels (quantized matmuls, paged decode attention) for every x86 ISA (AVX-512 VNNI, "
    "AVX-VNNI, AVX2) into the artifact; the runtime loads the best one the host runs ($LLMC_CPU_ISA forces "
    "one). --no-cpu-kernels: torch's kernels only.",
)
@click.option(
    "--cpu-isa",
    default=DEFAULT_CPU_ISA,
    show_default=True,
    type=click.Choice(CPU_ISAS),
    help="CPUs the compiled step is built for: baseline (x86-64 AVX2, which every x86-64 CPU since 2013 runs, "
    "AVX-512 ones as fast: the step's own code is glue between llmc's kernels, which pick their ISA at run time; "
    "other CPUs: their own), host (this machine's vector ISA) or all (both; the runtime takes the best).",
)
@click.option(
    "--buckets",
    default=",".join(str(b) for b in DEFAULT_BUCKETS),
    show_default=True,
    help="Batch sizes the compiled step pads a batch up to; the largest is the most it runs at once.",
)
@click.option("--max-seq-len", type=POSITIVE, help="Longest context the compiled step covers (default: the model's).")
@click.option(
    "--layers-per-program",
    type=POSITIVE,
    help="Decoder layers per compiled program; runs of layers of one form share a program (default: chosen from "
    "the model's layers and size: fewest programs to compile, at most ~1% of a step spent calling them).",
)
@click.option("--name", help="Model name the server answers to (default: from the source).")
@click.option(
    "--generation-config",
    metavar="FILE|JSON",
    help='Sampling defaults to bake in over the source\'s, e.g. \'{"temperature": 0.7, "top_p": 0.9}\' '
    "or a generation_config.json (keys: temperature top_p top_k min_p repetition_penalty max_new_tokens do_sample).",
)
@click.option(
    "--autotune/--no-autotune",
    default=True,
    show_default=True,
    help="Time the weight forms on this machine into the user's cache ($LLMC_CACHE_DIR), so that `llmc run` "
    "here starts without that pause; --no-autotune: skip.",
)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Artifact directory to write.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout (for CI).")
@click.option(
    "--report", "show_report", is_flag=True, help="Also print the quantization report: every quantized tensor."
)
def build(
    model: str | None,
    gguf_file: str | None,
    weights: str | None,
    dtype: str,
    isq: str | None,
    target: str,
    compile_step: bool,
    cpu_kernels: bool,
    cpu_isa: str,
    autotune: bool,
    buckets: str,
    max_seq_len: int | None,
    layers_per_program: int | None,
    name: str | None,
    generation_config: str | None,
    output: Path,
    as_json: bool,
    show_report: bool,
) -> None:
    """Build an artifact from a model."""
    from llmc.builder.build import BuildOptions
    from llmc.builder.build import build as run_build
    from llmc.builder.progress import TerminalProgress
    from llmc.builder.targets.base import CompileOptions

    try:
        sizes = tuple(int(b) for b in buckets.split(","))
    except ValueError:
        _fail(BadInputError(f"--buckets takes comma-separated batch sizes such as 1,2,4,8; got {buckets!r}"), as_json)
        return
    options = BuildOptions(
        model=model,
        gguf_file=gguf_file,
        weights=weights,
        output=output,
        dtype=dtype,
        target=target,
        name=name,
        isq=isq,
        compile=(
            CompileOptions(buckets=sizes, max_seq_len=max_seq_len, layers_per_program=layers_per_program)
            if compile_step
            else None
        ),
        cpu_kernels=cpu_kernels,
        cpu_isa=cpu_isa,
        autotune=autotune,
        generation_config=generation_config,
    )
    # A progress line only for a person watching: never into a pipe, a log file or --json's stdout.
    progress = TerminalProgress(sys.stderr) if sys.stderr.isatty() else None
    try:
        result = run_build(options, on_progress=progress)
    except LlmcError as exc:
        if progress is not None:
            progress.close()
        _fail(exc, as_json)
        return
    if progress is not None:
        progress.close()
    summary = result.summary()
    summary["manifest_sha256"] = manifest_digest(output)
    if as_json:
        click.echo(msgspec.json.encode(summary).decode())
    else:
        for line in build_summary(result, summary):
            click.echo(line)
    if show_report and result.report is not None:
        from llmc.artifacts.inspect import report_table

        body = {"summary": result.report.summary(), **result.report.report_body()}
        for line in report_table(msgspec.to_builtins(body)):
            click.echo(line, err=as_json)  # with --json, stdout holds the one JSON object only


def build_summary(result: BuildResult, summary: dict[str, Any]) -> list[str]:
    """The few lines `llmc build` prints: what was built, how it is stored, the digest to pin."""
    lines = [
        f"built {summary['output']}: {summary['model_name']} ({summary['architecture']}, "
        f"{summary['parameters']:,} parameters, {summary['bytes']:,} bytes) in {summary['seconds']} s",
        f"weights: {summary['weights']}",
    ]
    if result.report is not None:
        total = result.report.summary()
        lines.append(
            f"quantized {total['tensors_quantized']} tensors: {total['bytes_before']:,} → {total['bytes_after']:,} "
            f"bytes (per tensor: --report, or `llmc inspect {summary['output']} --report`)"
        )
    compiled = result.manifest.compiled_for(result.manifest.target)
    if compiled:
        packages = ", ".join(f"{c.weights} weights for {c.cpu_capability} batches {c.buckets}" for c in compiled)
        lines.append(f"compiled the decode step ({packages}) in {summary['compile_seconds']} s")
        first = compiled[0]
        if len(first.order) > 1:
            sizes = "+".join(str(p.layers) for p in first.programs)
            logits = ", then a logits program" if first.logits is not None else ""
            if first.eager_logits:
                logits = ", then the logits eagerly"
            lines.append(f"  as programs of {sizes} layers: {len(first.order)} runs of layers per step{logits}")
    elif result.compile_skipped is not None:
        lines.append(f"not compiled (the artifact runs eagerly): {result.compile_skipped}")
    lines.append(f"manifest sha256: {summary['manifest_sha256']} (pin it: llmc run --expect-manifest-sha256)")
    return lines


@main.command()
@_log_level_option
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
@click.option(
    "--verify/--no-verify",
    default=False,
    help="Also check every file's size and sha256 (the manifest's paths and model are always checked).",
)
@click.option("--report", is_flag=True, help="Also show the quantization report: every quantized tensor.")
def inspect(artifact: Path, as_json: bool, verify: bool, report: bool) -> None:
    """Summarise an artifact."""
    from llmc.artifacts.inspect import report_table, summarize
    from llmc.artifacts.reader import Artifact

    try:
        _recover(artifact)
        _check_directory(artifact)
        opened = Artifact.open(artifact, verify=verify)
        body = opened.report() if report else None
    except LlmcError as exc:
        _fail(exc, as_json)
        return
    summary = {"manifest_sha256": opened.manifest_sha256, **summarize(opened.manifest)}
    if body is not None:
        if as_json:
            summary["report"] = body
        else:
            for line in report_table(body):
                click.echo(line)
    if as_json:
        click.echo(msgspec.json.encode(summary).decode())
        return
    summary.pop("weight_formats")  # the weights line says the same for people
    for key, value in summary.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k}: {v}")
        else:
            click.echo(f"{key}: {value}")


@main.command()
@_log_level_option
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--gguf", "gguf_path", required=True, type=click.Path(path_type=Path), help="GGUF file to write.")
def export(artifact: Path, gguf_path: Path) -> None:
    """Write an artifact back to a GGUF file (llama.cpp loads it)."""
    from llmc.builder.gguf_export import export_gguf

    try:
        _recover(artifact)  # as inspect and run: put back an artifact a killed build moved aside
        _check_directory(artifact)  # a typo is bad input (2), not a damaged artifact (4)
        export_gguf(artifact, gguf_path)
    except LlmcError as exc:
        _fail(exc, False)
        return
    click.echo(f"wrote {gguf_path}")


@main.command()
@_log_level_option
@click.argument("artifact", required=False, type=click.Path(path_type=Path))
@click.option(
    "-m",
    "--model",
    "model_dir",
    type=click.Path(path_type=Path),
    help="The artifact directory, as llama-server's -m takes it (instead of the ARTIFACT argument).",
)
@click.option("-p", "--p", "--port", "port", default=2000, show_default=True, type=PORT, help="Port to listen on.")
@click.option("--h", "--host", "host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--served-model-name", help="Model name clients must send (default: the artifact's).")
@click.option(
    "--max-model-len", type=POSITIVE, help="Context length (default: the model's, or the longest the KV cache holds)."
)
@click.option("--mem", "kv_cache_mb", default=1024, show_default=True, type=POSITIVE, help="KV cache size in MB.")
@click.option("--kv-blocks", type=POSITIVE, help="KV cache size in blocks (overrides --mem).")
@click.option("--block-size", default=16, show_default=True, type=POSITIVE, help="Tokens per KV cache block.")
@click.option(
    "--max-num-seqs", default=64, show_default=True, type=POSITIVE, help="Sequences decoded together at most."
)
@click.option(
    "--prefill-chunk-size",
    default=512,
    show_default=True,
    type=POSITIVE,
    help="Tokens computed per step: decodes plus chunks of prompts being prefilled.",
)
@click.option(
    "--api-key",
    envvar="LLMC_API_KEY",
    help="Require `Authorization: Bearer KEY` on every route but /health (env: LLMC_API_KEY).",
)
@click.option(
    "--tool-parser",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "hermes", "mistral", "llama", "json"]),
    help="Tool-call output format; auto reads the chat template.",
)
@click.option("--ui-server", is_flag=True, help="Also serve a chat page at /ui on the same port.")
@click.option(
    "--mcp-config",
    type=click.Path(exists=True, dir_okay=False),
    help='An mcp.json ({"mcpServers": {...}}): the model may call its servers\' tools; llmc runs the calls.',
)
@click.option(
    "--unauthenticated-mcp",
    is_flag=True,
    help="Allow --mcp-config without --api-key: every client that can reach the port may make the server "
    "run the MCP tools.",
)
@click.option(
    "--vision-proxy",
    metavar="URL",
    help="An OpenAI-compatible vision chat endpoint (http://host:8080/v1): image parts of chats are "
    "described there and sent to the model as text.",
)
@click.option("--vision-proxy-model", metavar="NAME", help="The `model` sent to the --vision-proxy endpoint.")
@click.option("--vision-proxy-prompt", metavar="TEXT", help="What the caption model is asked about each image.")
@click.option(
    "--vision-proxy-format",
    metavar="TEXT",
    help='How each caption is added to the message; {n} is the image number (default "Image {n}: {caption}").',
)
@click.option(
    "--vision-proxy-fallback",
    default="error",
    show_default=True,
    type=click.Choice(["error", "text"]),
    help="When a caption fails: error answers 502; text writes [image could not be described] instead.",
)
@click.option(
    "--vision-proxy-timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a caption (or a remote image fetch) may take (default 60).",
)
@click.option(
    "--vision-proxy-api-key",
    envvar="LLMC_VISION_PROXY_API_KEY",
    help="Sent as `Authorization: Bearer KEY` to the --vision-proxy endpoint (env: LLMC_VISION_PROXY_API_KEY).",
)
@click.option(
    "--vision-allow-remote",
    is_flag=True,
    help="Also fetch http(s) image URLs (public addresses only, no redirects); default: data: URLs only.",
)
@click.option(
    "--allowed-hosts",
    help="Comma-separated names the Host header may carry besides IP addresses, localhost and (off "
    "loopback) this machine's name; .example.com allows subdomains, * any name (unsafe: DNS rebinding).",
)
@click.option(
    "--cors-origins",
    help="Comma-separated web origins (https://app.example.com) whose pages may call the API from a "
    "browser; * allows every page (unsafe). Default: same-origin pages only.",
)
@click.option(
    "--shutdown-timeout",
    default=SHUTDOWN_TIMEOUT_S,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds running requests may keep generating after SIGTERM/SIGINT; a second signal exits at once.",
)
@click.option(
    "--header-timeout",
    default=HEADER_TIMEOUT_S,
    show_default=True,
    type=click.FloatRange(min=0.001),
    help="Seconds a client has to send its request headers before the connection is closed.",
)
@click.option(
    "--body-timeout",
    default=BODY_TIMEOUT_S,
    show_default=True,
    type=click.FloatRange(min=0.001),
    help="Seconds a client has to send its request body once the headers are in (408 after).",
)
@click.option("--disable-prefix-cache", is_flag=True, help="Do not reuse KV blocks of equal prompt prefixes.")
@click.option(
    "--prefix-cache-isolation",
    default="shared",
    show_default=True,
    type=click.Choice(["shared", "key"]),
    help="key: requests share cached prompt blocks only with requests made with the same API key.",
)
@click.option(
    "--max-waiting",
    type=POSITIVE,
    help="Sequences that may wait for the batch before new requests get 503 + Retry-After (default 256).",
)
@click.option(
    "--max-request-chars",
    type=POSITIVE,
    help="Characters of prompt or message text per request (default: 32 per token of context).",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a request may wait and generate before it is stopped with a 504 (default: no limit).",
)
# Sampling defaults for requests that set none, over the artifact's (`llmc inspect` shows those).
@click.option(
    "--generation-config",
    metavar="FILE|JSON",
    help="Sampling defaults over the artifact's: inline JSON or a generation_config.json (vLLM style).",
)
@click.option("--temperature", type=click.FloatRange(0, MAX_TEMPERATURE), help="Default temperature (0: greedy).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Default top-p.")
@click.option("--top-k", type=click.IntRange(min=-1), help="Default top-k (0 or -1: no cut).")
@click.option("--min-p", type=click.FloatRange(0, 1), help="Default min-p.")
@click.option("--max-tokens", type=POSITIVE, help="Default max_tokens (default: the rest of the context).")
@click.option("--seed", type=int, help="Seed for requests that give none (reproducible servers).")
@click.option(
    "--threads",
    type=POSITIVE,
    help="CPU threads for the model (default: torch's choice; onnx: every core this process may use).",
)
@click.option("--eager", is_flag=True, help="Run the model eagerly, ignoring the artifact's compiled steps.")
@click.option(
    "--backend",
    type=click.Choice(BACKEND_CHOICES),
    default="auto",
    show_default=True,
    help="What runs the model: cpu (torch, the artifact's cpu target) or onnx (onnxruntime, the artifact's onnx "
    "target; needs no torch). auto: onnx where torch is not installed or the artifact has only the onnx target.",
)
@click.option(
    "--dense-weights/--no-dense-weights",
    default=None,
    help="Keep dense copies of quantized weights for prefill and big batches (2 bytes per weight, 4 on CPUs "
    "without native bf16; default: where measured faster for the batches served and they take at most a "
    "quarter of the memory).",
)
@click.option(
    "--autotune/--no-autotune",
    default=True,
    show_default=True,
    help="Time the weight forms on this host at first start (a few seconds, cached in $LLMC_CACHE_DIR) to "
    "choose which serves which batch size; --no-autotune: the built-in defaults.",
)
@click.option(
    "--kv-huge-pages/--no-kv-huge-pages",
    default=False,
    show_default=True,
    help="Ask for 2 MiB pages for the KV cache: batched decode of long contexts is a few per cent faster once "
    "the cache is warm, but where the kernel compacts memory for huge pages (THP defrag 'madvise') every first "
    "touch of the cache costs ~4x more, which slows a fresh server.",
)
@click.option(
    "--kv-prefault/--no-kv-prefault",
    default=True,
    show_default=True,
    help="Fault the KV cache's memory in at start, in the background (Linux 5.14+; skipped when the cache is more "
    "than half the memory available): steps never stall on fresh pages, and RSS includes the cache from the start. "
    "--no-kv-prefault: pages come as the cache fills.",
)
@click.option(
    "--expect-manifest-sha256",
    metavar="SHA256",
    help="Refuse to serve (exit 4) unless manifest.json has this sha256, as `llmc build` and `llmc inspect` print.",
)
def run(
    artifact: Path | None,
    model_dir: Path | None,
    disable_prefix_cache: bool,
    allowed_hosts: str | None,
    cors_origins: str | None,
    **options: Any,
) -> None:
    """Serve an artifact with an OpenAI-compatible API (`llmc serve` is the same command)."""
    from llmc.runtime.server import ServeConfig, serve

    if (artifact is None) == (model_dir is None):
        _fail(BadInputError("name the artifact directory once: `llmc run DIR` or `llmc run -m DIR`"), False)
    path = artifact if artifact is not None else model_dir
    assert path is not None
    level = log_level(click.get_current_context().meta, DEFAULT_RUN_LOG_LEVEL)
    code = 0
    try:
        _recover(path)
        _check_directory(path)
    except LlmcError as exc:
        _fail(exc, False)
    config = ServeConfig(
        artifact=str(path),
        enable_prefix_cache=not disable_prefix_cache,
        log_level=level,
        allowed_hosts=_names(allowed_hosts),
        cors_origins=_names(cors_origins),
        **options,
    )
    try:
        serve(config)
    except LlmcError as exc:
        _report(exc, False)
        code = exc.exit_code
    _exit_without_finalizing(code)


main.add_command(run, name="serve")  # vLLM's verb: `llmc serve ART` is `llmc run ART`


def _check_directory(artifact: Path) -> None:
    """A path that is not there at all is a typo, not a damaged artifact: say so, exit 2."""
    if not artifact.exists():
        raise BadInputError(f"{artifact}: no such directory; build an artifact there with `llmc build -m MODEL -o DIR`")
    if not artifact.is_dir():
        raise BadInputError(f"{artifact} is not a directory; pass the artifact directory `llmc build -o` wrote")


def manifest_digest(artifact: Path) -> str:
    """The sha256 of an artifact's manifest.json as stored: the digest deployments pin."""
    from llmc.artifacts.manifest import MANIFEST_NAME
    from llmc.artifacts.reader import manifest_sha256

    return manifest_sha256((artifact / MANIFEST_NAME).read_bytes())


def _recover(artifact: Path) -> None:
    """Where the artifact is missing because a build was killed between moving the old one aside
    and renaming the new one in, move the old one back (see artifacts/staging.py)."""
    from llmc.artifacts.staging import recover

    if not artifact.exists():
        recover(artifact.resolve(), sweep=False)


def _names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


# The status CPython exits with when flushing the standard streams fails at exit (Py_FinalizeEx).
_FLUSH_FAILED_EXIT = 120


def entry() -> NoReturn:
    """The `llmc` command (pyproject's script and `python -m llmc`): `main`, then an exit that skips
    the interpreter's finalization once every command has finished its work.

    Tearing down torch's and Inductor's modules took 0.9 s after a warm default SmolLM2 build and
    1.4 s after a cold one (measured here), seconds a CI pipeline waits for nothing: the artifact
    is committed, worker processes and threads have ended. Non-daemon threads are joined and the
    exit handlers run as at a normal exit; an exception other than SystemExit keeps Python's own
    exit (its traceback). Tests call `main` through click's runner and never reach this.
    """
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    if not isinstance(code, int):  # sys.exit("message") or sys.exit(None), as Python's exit treats them
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    threading._shutdown()  # type: ignore[attr-defined]  # what a normal exit does first: join the non-daemon threads
    _exit_without_finalizing(code)


def _exit_without_finalizing(code: int) -> NoReturn:
    """End the process once its work is done, skipping the interpreter's finalization (see `entry`).

    The server calls it itself once it has shut down, whoever called `main`: Granian's Rust
    threads can outlive its stop() by a moment; one that touches Python while the interpreter
    finalizes panics in a function that cannot unwind, and the process aborts (exit 134 after
    SIGTERM, about 1 run in 10 with a request served). The exit handlers (MCP servers,
    logging) and the standard streams are flushed first; the rest is the OS's to reclaim.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or file: Python's own exit says 120 then
            code = code or _FLUSH_FAILED_EXIT
    os._exit(code)
