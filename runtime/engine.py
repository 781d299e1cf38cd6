"""The engine loop: a thread that schedules, runs the model, samples and hands outputs back.

The API's async handlers never block on the model: they `submit` a request with a callback
(`sink`) that the engine calls from its thread; the handler's sink hops back onto its event loop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmc.artifacts import generation
from llmc.artifacts.reader import Artifact
from llmc.errors import BadInputError, OutOfResourcesError
from llmc.logs import get_logger
from llmc.runtime.backends import make_backend
from llmc.runtime.backends.base import BackendOptions
from llmc.runtime.block_manager import BlockManager
from llmc.runtime.output_processor import OutputProcessor, RequestOutput
from llmc.runtime.resident import keep_freed_heap, trim_heap
from llmc.runtime.sampler import Sampler, log_softmax, token_logprob
from llmc.runtime.sampling_params import SamplingParams, TokenLogprob
from llmc.runtime.scheduler import Scheduler
from llmc.runtime.sequence import Sequence
from llmc.runtime.structured_output import GrammarCompiler
from llmc.runtime.tokenizer import Tokenizer

log = get_logger("llmc.engine")

Sink = Callable[[RequestOutput], None]

# Sequences that may wait for a slot in the batch (submitted, not yet scheduled) before new ones
# are refused with 503 + Retry-After. Four times the default --max-num-seqs: a request behind 256
# others waits minutes on a CPU, and a client does better to retry (or go elsewhere) than to queue
# without bound and time out; `llmc run --max-waiting` changes it.
DEFAULT_MAX_WAITING = 256
# What a refused client is told to wait (Retry-After, seconds): about one step of a loaded batch
# finishes a few sequences; clients back off further on their own if it is still full.
RETRY_AFTER_S = 1


class EngineBusyError(OutOfResourcesError):
    """The waiting queue is full: the server answers 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int | None = None  # None: the model's own context length
    kv_cache_mb: int = 1024  # default KV budget: 1 GiB holds ~22k tokens of SmolLM2 in f32
    kv_blocks: int | None = None  # an exact block count, overriding kv_cache_mb
    block_size: int = 16  # tokens per KV block: vLLM's default, a good balance of waste and table size
    max_num_seqs: int = 64
    # Tokens computed per step, decodes and prefill chunks together. 512 keeps a step short
    # (smooth streams for everyone) while big enough for efficient prefill matmuls.
    max_batched_tokens: int = 512
    enable_prefix_cache: bool = True
    seed: int | None = None
    threads: int | None = None
    device: str = "cpu"  # the backend that runs the model (runtime/backends/)
    compiled: bool = True  # use the artifact's compiled decode step where it can run (`--eager`: never)
    # Keep bf16 copies of quantized weights for prefill and big batches; None: when memory allows.
    dense_weights: bool | None = None
    autotune: bool = True  # measure the weight forms on this host (kernels/cpu/autotune.py); False: defaults
    kv_huge_pages: bool = False  # 2 MiB pages for the KV cache (BackendOptions.kv_huge_pages says when)
    kv_prefault: bool = True  # fault the KV cache in at start, in the background (BackendOptions.kv_prefault)
    max_waiting: int | None = DEFAULT_MAX_WAITING  # None: never refuse (embedding, tests)
    # Sampling defaults over the artifact's (`llmc run --temperature ...`), parsed by
    # artifacts/generation.py; requests still override them.
    generation_overrides: dict[str, Any] = field(default_factory=dict)


_MIB = 1024 * 1024


def fit_context(model_len: int, config: EngineConfig, num_blocks: int, bytes_per_block: int) -> int:
    """The context length to serve: `--max-model-len` (at most the model's), or without it the
    model's own, shortened to what the KV cache holds (with a warning that says how to get more).

    An explicit `--max-model-len` the cache cannot hold is the user's to fix: BadInputError."""
    capacity = num_blocks * config.block_size
    wanted = min(config.max_model_len or model_len, model_len)
    if capacity >= wanted:
        return wanted
    needed_blocks = -(-wanted // config.block_size)  # rounded up
    budget = f"--kv-blocks {num_blocks}" if config.kv_blocks else f"--mem {config.kv_cache_mb}"
    more = (
        f"--kv-blocks {needed_blocks}" if config.kv_blocks else f"--mem {-(-needed_blocks * bytes_per_block // _MIB)}"
    )
    if num_blocks < 1:
        raise OutOfResourcesError(
            f"{budget} does not hold one KV cache block of {bytes_per_block} bytes ({config.block_size} tokens); "
            f"raise it ({more} holds the model's whole context)"
        )
    if config.max_model_len is not None:
        raise BadInputError(
            f"a KV cache of {num_blocks} blocks ({budget}) holds {capacity} tokens, fewer than --max-model-len "
            f"{wanted}; give it {more}, or lower --max-model-len to {capacity} or less",
            param="max_model_len",
        )
    log.warning(
        "engine.context_fitted",
        max_model_len=capacity,
        model_max_len=model_len,
        kv_blocks=num_blocks,
        advice=f"the KV cache ({budget}) holds {capacity} of the model's {model_len} tokens of context; "
        f"{more} serves all of it; --max-model-len N fixes the context at N",
    )
    return capacity


# While draining with nothing to step, how long to wait for an abort or submit before checking the
# deadline again: short enough that the deadline is kept to a tenth of a second.
_DRAIN_IDLE_WAIT_S = 0.1


@dataclass
class _Submit:
    seqs: list[Sequence]
    sink: Sink


class Engine:
    """Construct, then run the engine loop with `run()` on the thread that built it (the server's
    main thread), or step it yourself with `step()` (tests, benchmarks). `start()` runs the loop on
    a thread of its own instead, for embedding; it is slower: torch's OpenMP-parallel CPU kernels
    (bf16 and int4 matmuls) run 2-3x slower when their parallel regions open from a thread other
    than the process's main one (docs/BENCHMARKS.md)."""

    def __init__(self, artifact: Artifact, config: EngineConfig) -> None:
        manifest = artifact.manifest
        spec = manifest.model
        max_rows = max(config.max_batched_tokens, config.max_num_seqs)
        options = BackendOptions(
            config.threads,
            config.dense_weights,
            config.autotune,
            max_rows,
            config.max_num_seqs,
            config.kv_huge_pages,
            config.kv_prefault,
        )
        self.backend = make_backend(config.device, options)
        self.model_name = manifest.model_name
        self.generation_defaults = generation.override(
            generation.effective(manifest.generation), config.generation_overrides, "llmc run flags"
        )
        bytes_per_block = self.backend.kv_bytes_per_token(manifest) * config.block_size
        num_blocks = config.kv_blocks or self.backend.kv_blocks(config.kv_cache_mb * _MIB, bytes_per_block)
        self.max_model_len = fit_context(spec.max_position_embeddings, config, num_blocks, bytes_per_block)
        self.tokenizer = Tokenizer.from_artifact(artifact)
        self.runner = self.backend.make_runner(
            artifact, self.max_model_len, num_blocks, config.block_size, config.compiled
        )
        # Phi-3's longrope recomputes a sequence's cache with other factors once it outgrows the
        # original context (below); blocks shared through the prefix cache must not be rewritten.
        self._long_rope_after = self.runner.long_rope_after
        prefix_cache = (
            config.enable_prefix_cache and self._long_rope_after is None and self.backend.supports_prefix_cache
        )
        self.block_manager = BlockManager(num_blocks, config.block_size, prefix_cache)
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_batched_tokens, config.max_batched_tokens
        )
        self.sampler = Sampler(config.seed)
        self.outputs = OutputProcessor(self.tokenizer, self.max_model_len)
        self._inbox: queue.SimpleQueue[_Submit | str | None] = queue.SimpleQueue()
        self._sinks: dict[int, Sink] = {}
        self._by_request: dict[str, Sequence] = {}
        self._followers: dict[int, list[Sequence]] = {}
        self._batch: list[Sequence] | None = None  # the sequences of the step under way, once scheduled
        # Admission control: sequences submitted and not yet scheduled (submit() counts them on
        # the caller's thread, the engine thread uncounts them), bounded by max_waiting.
        self.max_waiting = config.max_waiting
        self._waiting_lock = threading.Lock()
        self._num_waiting = 0
        self._unscheduled: set[int] = set()
        self._grammars: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self._thread = threading.Thread(target=self.run, name="llmc-engine", daemon=True)
        self._submit_lock = threading.Lock()  # a submit either reaches the inbox before drain() closes it, or fails
        self._closed = False
        trim_heap()  # what parsing the tokenizer and loading the model freed goes back to the system
        keep_freed_heap()  # while serving, a step's freed memory waits for the next step (run() trims when idle)
        log.info(
            "engine.ready",
            model=self.model_name,
            kv_blocks=num_blocks,
            block_size=config.block_size,
            max_model_len=self.max_model_len,
            **self.runner.describe(),
            **self.backend.describe(),
        )
        self.backend.ready()

    # ---- called from any thread -------------------------------------------------------------
    def start(self) -> None:
        """Run the engine loop on a thread of its own (see the class docstring for its cost)."""
        self._thread.start()

    def stop(self) -> None:
        """Make `run()` return once the current step is done (and wait for it on `start()`'s thread)."""
        self._inbox.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def grammars(self) -> GrammarCompiler:
        """Built on first use: loading llguidance's view of the vocabulary takes a moment."""
        with self._grammar_lock:
            if self._grammars is None:
                tokenizer_json = self.tokenizer.source_json
                assert tokenizer_json is not None  # the engine's tokenizer comes from its artifact
                vocab = self.runner.vocab_size
                self._grammars = GrammarCompiler(tokenizer_json, vocab, sorted(self.tokenizer.eos_ids))
            return self._grammars

    def stats(self) -> dict[str, float]:
        """Gauges for /metrics. Read from another thread: each value is one atomic read."""
        blocks = self.block_manager
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_usage": 1.0 - blocks.num_free / blocks.num_blocks,
            "preemptions": self.scheduler.num_preemptions,
        }

    def check_length(self, num_prompt_tokens: int, max_tokens: int) -> None:
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise BadInputError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request has "
                f"{num_prompt_tokens} prompt tokens and asks for {max_tokens} more. "
                "Shorten the prompt or lower max_tokens.",
                param="max_tokens",
            )

    def submit(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams | list[SamplingParams], sink: Sink
    ) -> list[str]:
        """Queue one sequence per SamplingParams (n choices share the prompt); return their ids.

        Outputs of choice i carry request id f"{request_id}/{i}" when there are several.
        """
        if not prompt_ids:
            raise BadInputError("the prompt is empty", param="prompt")
        choices = params if isinstance(params, list) else [params]
        for p in choices:
            self.check_length(len(prompt_ids), p.max_tokens)
        ids = [request_id] if len(choices) == 1 else [f"{request_id}/{i}" for i in range(len(choices))]
        seqs = [Sequence(i, prompt_ids, p) for i, p in zip(ids, choices, strict=True)]
        with self._submit_lock:
            if self._closed:
                raise OutOfResourcesError("the server is shutting down; send the request again once it is back")
            with self._waiting_lock:
                # An idle server takes any one request, even one with more choices than the bound.
                busy = self._num_waiting and self._num_waiting + len(seqs) > (self.max_waiting or 0)
                if self.max_waiting is not None and busy:
                    raise EngineBusyError(
                        f"the server is busy: {self._num_waiting} sequences are waiting (--max-waiting "
                        f"{self.max_waiting}); retry after {RETRY_AFTER_S} s"
                    )
                self._num_waiting += len(seqs)
                self._unscheduled.update(seq.seq_id for seq in seqs)
            self._inbox.put(_Submit(seqs, sink))
        return ids

    @property
    def num_waiting(self) -> int:
        """Sequences submitted and not yet scheduled: what max_waiting bounds."""
        return self._num_waiting

    def _scheduled(self, seq: Sequence) -> None:
        """Uncount a sequence from the waiting queue once: when first scheduled, or finished before."""
        with self._waiting_lock:
            if seq.seq_id in self._unscheduled:
                self._unscheduled.discard(seq.seq_id)
                self._num_waiting -= 1

    def abort(self, request_ids: str | list[str]) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            self._inbox.put(request_id)

    # ---- the engine thread ------------------------------------------------------------------
    def run(self) -> None:
        """The engine loop: accept work, step while there is any; return after `stop()`."""
        stepped = False  # since the heap was last trimmed
        while True:
            block = not self.scheduler.has_work()
            if block and stepped:
                trim_heap()  # idle: the memory steps kept for each other goes back to the system
                stepped = False
            while True:
                try:
                    item = self._inbox.get(block=block)
                except queue.Empty:
                    break
                block = False
                if item is None:
                    return
                self._accept(item)
            if self.scheduler.has_work():
                self._step_safely()
                stepped = True

    def drain(self, timeout_s: float) -> bool:
        """After `run()` returned on `stop()`: keep stepping until every request has finished or
        `timeout_s` has passed (aborts and submits already on their way are still taken), then
        refuse new submits and end what is left with an error output, so every client gets a
        complete response. True when everything finished by itself."""
        deadline = time.monotonic() + timeout_s
        while self._by_request and time.monotonic() < deadline:
            block = not self.scheduler.has_work()
            while True:
                try:
                    item = self._inbox.get(block=block, timeout=_DRAIN_IDLE_WAIT_S if block else None)
                except queue.Empty:
                    break
                block = False
                if item is not None:
                    self._accept(item)
            if self.scheduler.has_work():
                self._step_safely()
        with self._submit_lock:
            self._closed = True
        while True:  # submits that reached the inbox before it closed
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._accept(item)
        clean = not self._by_request
        for seq in list(self._by_request.values()):
            message = f"the server shut down before this request finished (after {timeout_s:g} s); send it again"
            self._finish(seq, RequestOutput(seq.request_id, "", [], True, "error", error=message))
        return clean

    def _accept(self, item: _Submit | str) -> None:
        """Take one submission or abort; a submission that fails here fails alone, with an error."""
        try:
            self._accept_unguarded(item)
        except Exception as exc:
            log.exception("engine.accept_failed", error=type(exc).__name__)
            if isinstance(item, _Submit):
                try:
                    self._reject(item, f"internal error while accepting the request ({type(exc).__name__})")
                except Exception:  # the engine loop must survive even a failing sink
                    log.exception("engine.reject_failed")

    def _accept_unguarded(self, item: _Submit | str) -> None:
        if isinstance(item, str):
            seq = self._by_request.get(item)
            if seq is not None:
                self._finish(seq, RequestOutput(item, "", [], True, "abort"))
            return
        leader, *followers = item.seqs
        for seq in item.seqs:
            if seq.params.grammar is not None:
                seq.constraint = self.grammars.constraint(seq.params.grammar)
            self._sinks[seq.seq_id] = item.sink
            self._by_request[seq.request_id] = seq
            self.outputs.start(seq)
        # Followers wait until the leader has prefilled the shared prompt, then find it in the
        # prefix cache and compute only its last partial block.
        self._followers[leader.seq_id] = followers
        self.scheduler.add(leader)

    def _reject(self, item: _Submit, reason: str) -> None:
        """Undo whatever `_accept` did for a submission and end each of its sequences with `reason`."""
        self._followers.pop(item.seqs[0].seq_id, None)
        for seq in item.seqs:
            self._scheduled(seq)  # it leaves the waiting count, or its slot under --max-waiting stays taken
            self.scheduler.finish(seq)
            self.outputs.discard(seq)
            self._sinks.pop(seq.seq_id, None)
            if self._by_request.get(seq.request_id) is seq:
                del self._by_request[seq.request_id]
            item.sink(RequestOutput(seq.request_id, "", [], True, "error", error=reason))

    def _release_followers(self, seq: Sequence) -> None:
        for follower in self._followers.pop(seq.seq_id, []):
            if follower.request_id in self._by_request:  # not aborted meanwhile
                self.scheduler.add(follower)

    def _finish(self, seq: Sequence, output: RequestOutput) -> None:
        self._scheduled(seq)
        self._release_followers(seq)
        self.scheduler.finish(seq)
        self.outputs.discard(seq)
        self._by_request.pop(seq.request_id, None)
        sink = self._sinks.pop(seq.seq_id)
        sink(output)

    def _record_prompt_logprobs(self, seq: Sequence, logits: np.ndarray) -> None:
        """Logprobs of the prompt tokens this chunk predicted (the chunk's positions, shifted by one)."""
        k = seq.params.prompt_logprobs or 0
        logprobs = log_softmax(logits)
        first = len(seq.prompt_logprobs)  # the prompt token the chunk's first row predicts
        for row in range(logprobs.shape[0]):
            seq.prompt_logprobs.append(token_logprob(logprobs[row], seq.prompt_ids[first + row], k))

    def _fail(self, seq: Sequence, reason: str) -> None:
        """End one sequence with an error; the rest of the batch carries on."""
        if seq.seq_id not in self._sinks:  # already finished
            return
        log.warning("engine.request_failed", request_id=seq.request_id, reason=reason)
        self._finish(seq, RequestOutput(seq.request_id, "", [], True, "error", error=reason))

    def _step_safely(self) -> None:
        """Step; a failure that per-sequence isolation in `step` could not pin on one request (the
        model run itself) fails the batch it hit, or everything when no batch was formed yet."""
        self._batch = None
        try:
            self.step()
        except Exception as exc:  # a bug must not take the server down: fail the batch, keep serving
            log.exception("engine.step_failed", error=type(exc).__name__)
            victims = list(self._by_request.values()) if self._batch is None else self._batch
            for seq in victims:
                self._fail(seq, "internal error")

    def step(self) -> None:
        batch = self.scheduler.schedule()
        if not batch:
            return
        self._batch = [seq for seq, _ in batch]
        for seq, _ in batch:
            self._scheduled(seq)
        seqs, logits = self.runner.run(batch)
        for seq, _ in batch:
            self.block_manager.register_computed(seq)
            if seq.seq_id in self.runner.prompt_logits:
                try:
                    self._record_prompt_logprobs(seq, self.runner.prompt_logits[seq.seq_id])
                except Exception as exc:
                    log.exception("engine.prompt_logprobs_failed", request_id=seq.request_id, error=type(exc).__name__)
                    self._fail(seq, "internal error while computing prompt logprobs")
        tokens, logprobs, failed = self.sampler.sample(logits, seqs)
        for row, (seq, token, logprob) in enumerate(zip(seqs, tokens, logprobs, strict=True)):
            if row in failed:
                self._fail(seq, failed[row])
            elif seq.seq_id in self._sinks:  # not failed earlier in this step
                try:
                    self._advance(seq, token, logprob)
                except Exception as exc:
                    log.exception("engine.output_failed", request_id=seq.request_id, error=type(exc).__name__)
                    self._fail(seq, "internal error while producing output")

    def _advance(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        """Append one sampled token to a sequence and hand its new output to the client."""
        if not seq.output_ids:
            self._release_followers(seq)
        seq.output_ids.append(token)
        if self._long_rope_after is not None and len(seq) - 1 == self._long_rope_after:
            seq.num_computed = 0  # as transformers does: recompute the whole cache with long factors
        output = self.outputs.on_token(seq, token, logprob)
        if output.finished:
            self._finish(seq, output)
        else:
            self._sinks[seq.seq_id](output)
