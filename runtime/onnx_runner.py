"""The ONNX target's model runner: the artifact's graph in an onnxruntime session, over a slot cache.

Each step's prefill chunks run one sequence at a time (a batch of one over that sequence's slot:
a long chunk is already a matrix product of many rows); the step's decodes run as one batch over
the slots 0..n-1 that cover them. A decode batch row whose slot has no decode this step (a free
slot, or a sequence still prefilling) is fed a padding token at that slot's next unwritten
position, which its real token overwrites later: rows cost a little compute, never a wrong key.
Slots are handed out lowest first, so the decode batch stays as small as the running set allows.

The graph's input and output contract is builder/onnx/graph.py's; onnxruntime writes the new keys
and values into the cache in place (each layer's present is bound to its past).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from llmc.artifacts.manifest import ModelSpec
from llmc.errors import BadArtifactError
from llmc.logs import get_logger
from llmc.runtime.backends.base import Runner
from llmc.runtime.sequence import Sequence, SequenceStatus
from llmc.runtime.slot_cache import SlotCache

if TYPE_CHECKING:
    import onnxruntime

log = get_logger("llmc.onnx")

PAD_TOKEN = 0  # what a decode batch's idle rows are fed; any id in the vocabulary does
LONG_ROPE = "long_rope"  # longrope graphs' input: which rows rotate with the long factors (Phi-3)


@dataclass
class _Chunk:
    seq: Sequence
    slot: int
    start: int
    end: int
    rows: list[int]  # positions (0..end-start-1 within the chunk) whose logits are wanted
    done: bool  # the sequence is fully computed after this chunk


class OnnxRunner(Runner):
    """Runs the engine's scheduled batches through one onnxruntime session (runtime/engine.py's
    runner interface: `run`, `prompt_logits`)."""

    def __init__(self, session: onnxruntime.InferenceSession, spec: ModelSpec, slots: int, max_len: int) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        self.spec = spec
        self.vocab_size = spec.vocab_size
        self.prompt_logits: dict[int, np.ndarray] = {}
        self.cache = SlotCache(spec, slots, max_len)
        self._owners: list[Sequence | None] = [None] * slots
        self._slot_of: dict[int, int] = {}
        self._kv_names = [f"{kind}.{i}.{part}" for i in range(spec.num_layers) for kind, part in _KV_PARTS]
        # Per range of slots, the cache's OrtValues and a binding with them bound: made once.
        self._bindings: dict[tuple[int, int], Any] = {}
        # Phi-3's longrope: a sequence longer than this rotates with the long factors, and the
        # engine recomputes its cache when it grows past it (as on the torch backend).
        scaling = spec.rope_scaling or {}
        if scaling.get("rope_type") == "longrope":
            self.long_rope_after = int(scaling["original_max_position_embeddings"])
        check_graph(session, spec, self.long_rope_after is not None)

    def describe(self) -> dict[str, Any]:
        return {"kv_slots": self.cache.slots}

    # ---- slots -----------------------------------------------------------------------------
    def _slot(self, seq: Sequence) -> int:
        slot = self._slot_of.get(seq.seq_id)
        if slot is not None and self._owners[slot] is seq:
            return slot
        for i, owner in enumerate(self._owners):
            if owner is not None and owner.status is not SequenceStatus.RUNNING:
                self._free(i)  # finished, or preempted (it restarts from its first token)
        free = self._owners.index(None) if None in self._owners else None
        if free is None:  # the engine runs at most max_num_seqs sequences, the slot count
            raise RuntimeError(f"no free KV slot among {self.cache.slots}")
        self._owners[free] = seq
        self._slot_of[seq.seq_id] = free
        return free

    def _free(self, slot: int) -> None:
        owner = self._owners[slot]
        if owner is not None:
            self._slot_of.pop(owner.seq_id, None)
        self._owners[slot] = None
        self.cache.release(slot)

    def _binding(self, first: int, last: int) -> Any:
        """An IOBinding with slots first..last-1 of every layer's cache bound as past and present."""
        key = (first, last)
        binding = self._bindings.get(key)
        if binding is None:
            binding = self.session.io_binding()
            for name, array in zip(self._kv_names, self.cache.arrays, strict=True):
                value = self._ort.OrtValue.ortvalue_from_numpy(array[first:last])
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(_present(name), value)
            self._bindings[key] = binding
        return binding

    # ---- steps -----------------------------------------------------------------------------
    def run(self, batch: list[tuple[Sequence, int]], all_logits: bool = False) -> tuple[list[Sequence], np.ndarray]:
        """Compute `n` more tokens of each (seq, n); return the sequences now fully computed, with
        the logits of their last token (every position's instead with `all_logits`)."""
        self.prompt_logits = {}
        decodes: list[tuple[Sequence, int]] = []
        chunks: list[_Chunk] = []
        for seq, count in batch:
            slot = self._slot(seq)
            start = seq.num_computed
            end = start + count
            complete = end == len(seq)
            prompt_rows = _prompt_rows(seq, start, end)
            if count == 1 and complete and not prompt_rows and not all_logits:
                decodes.append((seq, slot))
            else:
                last = {count - 1} if complete else set()
                rows = list(range(count)) if all_logits else sorted(set(prompt_rows) | last)
                chunks.append(_Chunk(seq, slot, start, end, rows, complete))
            seq.num_computed = end
        results: dict[int, np.ndarray] = {}
        for chunk in chunks:
            logits = self._prefill(chunk)
            prompt_rows = _prompt_rows(chunk.seq, chunk.start, chunk.end)
            if prompt_rows:
                picked = [chunk.rows.index(r) for r in prompt_rows]
                self.prompt_logits[chunk.seq.seq_id] = logits[picked]
            if chunk.done:
                results[chunk.seq.seq_id] = logits if all_logits else logits[-1:]
        if decodes:
            logits = self._decode(decodes)
            for row, (seq, _) in enumerate(decodes):
                results[seq.seq_id] = logits[row : row + 1]
        done = [seq for seq, _ in batch if seq.seq_id in results]
        if not done:
            return [], np.empty((0, self.vocab_size), np.float32)
        return done, np.concatenate([results[seq.seq_id] for seq in done])

    def _prefill(self, chunk: _Chunk) -> np.ndarray:
        tokens = chunk.seq.token_ids[chunk.start : chunk.end]
        binding = self._binding(chunk.slot, chunk.slot + 1)
        return self._run(
            binding,
            np.array([tokens], np.int64),
            np.array([chunk.end - 1], np.int32),
            chunk.end,
            np.array(chunk.rows, np.int64),
            [chunk.seq],
        )

    def _decode(self, decodes: list[tuple[Sequence, int]]) -> np.ndarray:
        width = max(slot for _, slot in decodes) + 1
        ids = np.full((width, 1), PAD_TOKEN, np.int64)
        last = np.zeros(width, np.int32)
        for slot in range(width):
            owner = self._owners[slot]
            if owner is not None:  # its next unwritten position: the pad's key lands where nothing reads
                last[slot] = min(owner.num_computed, self.cache.max_len - 1)
        for seq, slot in decodes:
            ids[slot, 0] = seq.last_token
            last[slot] = seq.num_computed - 1
        rows = np.array([slot for _, slot in decodes], np.int64)
        return self._run(self._binding(0, width), ids, last, int(last.max()) + 1, rows, self._owners[:width])

    def _run(
        self,
        binding: Any,
        ids: np.ndarray,
        last: np.ndarray,
        total: int,
        rows: np.ndarray,
        owners: list[Sequence | None],
    ) -> np.ndarray:
        """One session run; `owners`: each batch row's sequence (None for an idle decode row)."""
        if self.long_rope_after is not None:
            after = self.long_rope_after  # by the sequence's whole length, as InputBatch does
            long = np.array([seq is not None and len(seq.token_ids) > after for seq in owners], np.bool_)
            binding.bind_cpu_input(LONG_ROPE, long)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("seqlens_k", last)
        binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        binding.bind_cpu_input("logits_rows", rows)
        logits = np.empty((len(rows), self.vocab_size), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits


_KV_PARTS = (("past_key_values", "key"), ("past_key_values", "value"))


def _present(past_name: str) -> str:
    return past_name.replace("past_key_values.", "present.", 1)


def _prompt_rows(seq: Sequence, start: int, end: int) -> list[int]:
    """Rows of a chunk (0-based within it) whose logits predict prompt tokens, when asked for."""
    if seq.params.prompt_logprobs is None or start >= len(seq.prompt_ids) - 1:
        return []
    return list(range(min(end, len(seq.prompt_ids) - 1) - start))


def check_graph(session: onnxruntime.InferenceSession, spec: ModelSpec, long_rope: bool = False) -> None:
    """The graph must have llmc's inputs and outputs for this model (builder/onnx/graph.py), with
    `long_rope` for longrope models: an artifact is untrusted, and a graph of another shape would
    misread the cache."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    expected_in = {"input_ids", "seqlens_k", "total_sequence_length", "logits_rows"} | (
        {LONG_ROPE} if long_rope else set()
    )
    expected_out = {"logits"}
    for i in range(spec.num_layers):
        for part in ("key", "value"):
            expected_in.add(f"past_key_values.{i}.{part}")
            expected_out.add(f"present.{i}.{part}")
    if set(inputs) != expected_in or set(outputs) != expected_out:
        raise BadArtifactError("the artifact's ONNX graph does not have llmc's inputs and outputs; rebuild it")
    kv = [spec.num_kv_heads, spec.head_dim]
    for i in range(spec.num_layers):
        for part in ("key", "value"):
            shape = inputs[f"past_key_values.{i}.{part}"].shape
            if (
                len(shape) != 4
                or [shape[1], shape[3]] != kv
                or inputs[f"past_key_values.{i}.{part}"].type != "tensor(float)"
            ):
                raise BadArtifactError(f"the artifact's ONNX graph has a KV cache of shape {shape}; rebuild it")
    if outputs["logits"].shape[-1] != spec.vocab_size:
        raise BadArtifactError("the artifact's ONNX graph's logits do not match the vocabulary; rebuild it")
