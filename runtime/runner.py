"""The model runner owns the tensors: the model, the KV cache, and each step's input tensors."""

from __future__ import annotations

import math
import mmap

import torch

from llmc.artifacts.manifest import CompiledStep, ModelSpec
from llmc.artifacts.reader import Artifact
from llmc.kernels.paged_attention import SeqSlice, block_tables_tensor
from llmc.kernels.qmatmul_cpu import DENSE_MIN_ROWS, has_dense_choice
from llmc.runtime.compiled_step import CompiledDecode
from llmc.runtime.decode_step import DecodeStep
from llmc.runtime.model import CausalLM, StepContext
from llmc.runtime.sequence import Sequence


def _zeroed(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """`numel` zeros in fresh anonymous memory, which the OS zeroes page by page when first touched:
    a 1 GiB cache costs nothing at startup (torch.zeros writes it all, ~0.3 s here). The tensor
    keeps the mapping alive. Zeros matter: attention multiplies masked-out slots by 0, and garbage
    there could be NaN."""
    nbytes = numel * dtype.itemsize
    if nbytes == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(numel, dtype=dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # Huge pages where the kernel allows them: attention gathers slots from all over the cache,
        # and 2 MiB pages keep those reads from missing the TLB.
        memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype)


def kv_bytes_per_token(spec: ModelSpec, dtype: torch.dtype) -> int:
    """KV cache bytes one token takes over all layers (keys and values, in the compute dtype);
    known before the model is built, so the engine can size the context first."""
    return spec.num_layers * spec.num_kv_heads * (spec.head_dim + (spec.v_head_dim or spec.head_dim)) * dtype.itemsize


def allocate_kv_caches(spec: ModelSpec, dtype: torch.dtype, num_slots: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed (keys, values) per layer, flat [num_slots, kv_heads, head_dim] (kernels/paged_attention.py)."""
    k_shape = (num_slots, spec.num_kv_heads, spec.head_dim)
    v_shape = (num_slots, spec.num_kv_heads, spec.v_head_dim or spec.head_dim)
    k_numel, v_numel = math.prod(k_shape), math.prod(v_shape)
    memory = _zeroed(spec.num_layers * (k_numel + v_numel), dtype)
    caches = []
    for layer in range(spec.num_layers):
        start = layer * (k_numel + v_numel)
        keys = memory[start : start + k_numel].view(k_shape)
        values = memory[start + k_numel : start + k_numel + v_numel].view(v_shape)
        caches.append((keys, values))
    return caches


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        # After run(): seq_id -> logits at the prompt positions of sequences that asked for prompt logprobs.
        self.prompt_logits: dict[int, torch.Tensor] = {}
        # One block more than the block manager hands out: the rows that pad a compiled step's
        # batch up to its bucket write their keys there, where no sequence reads.
        self._pad_slot = num_blocks * block_size
        self.kv_caches = allocate_kv_caches(model.spec, model.dtype, (num_blocks + 1) * block_size)
        self._kv_flat = [cache for pair in self.kv_caches for cache in pair]
        self.compiled: list[CompiledDecode] = []

    def load_compiled(self, artifact: Artifact, info: CompiledStep) -> bool:
        """Use one of the artifact's compiled decode steps for the steps it covers; False if it
        cannot run here (a "dense" package also needs the model's dense weight copies)."""
        if info.weights == "dense" and not has_dense_choice(self.model):
            return False
        step = DecodeStep(self.model, self.block_size)
        loaded = CompiledDecode.load(artifact, info, step, self._kv_flat[0].shape[0])
        if loaded is not None:
            self.compiled.append(loaded)
        return loaded is not None

    def _compiled_for(self, batch: int, max_context: int) -> CompiledDecode | None:
        """The package for a batch: the dense one from DENSE_MIN_ROWS sequences on (where eager
        execution also takes the dense copies, so both compute alike), else the packed one."""
        usable = {c.info.weights: c for c in self.compiled if c.accepts(batch, max_context)}
        return usable.get("dense") if batch >= DENSE_MIN_ROWS and "dense" in usable else usable.get("packed")

    @property
    def compiled_steps(self) -> int:
        """Steps the compiled code ran (the rest ran eagerly)."""
        return sum(c.calls for c in self.compiled)

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]], all_logits: bool = False) -> tuple[list[Sequence], torch.Tensor]:
        """Compute `n` more tokens of each (seq, n); return the sequences now fully computed, with
        the logits of their last token (every position's logits instead with `all_logits`)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        slices: list[SeqSlice] = []
        done: list[Sequence] = []
        rows: list[int] = []
        prompt_rows: dict[int, list[int]] = {}  # seq_id -> rows whose next token is a prompt token
        long_rope: list[bool] = []
        long_after = self.model.long_rope_after
        bs = self.block_size
        for seq, count in batch:
            start = seq.num_computed
            end = start + count
            tokens = seq.token_ids
            slices.append(
                SeqSlice(
                    query_start=len(input_ids),
                    query_len=count,
                    context_len=end,
                    block_table=torch.tensor(seq.block_table, dtype=torch.int64),
                )
            )
            input_ids.extend(tokens[start:end])
            positions.extend(range(start, end))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, end))
            if long_after is not None:
                # longrope picks its factors by the sequence's whole length (HF: the longest
                # position in the forward pass), so every chunk of a long prompt agrees.
                long_rope.extend([len(tokens) > long_after] * count)
            if seq.params.prompt_logprobs is not None and start < len(seq.prompt_ids) - 1:
                first = len(input_ids) - count
                prompt_rows[seq.seq_id] = list(range(first, first + min(end, len(seq.prompt_ids) - 1) - start))
            seq.num_computed = end
            if end == len(tokens):
                done.append(seq)
                rows.append(len(input_ids) - 1)
        decoding = not all_logits and not prompt_rows and long_after is None and all(s.query_len == 1 for s in slices)
        compiled = self._compiled_for(len(slices), max(s.context_len for s in slices)) if decoding else None
        if compiled is not None:
            self.prompt_logits = {}
            logits = compiled(
                torch.tensor(input_ids, dtype=torch.int64),
                torch.tensor(positions, dtype=torch.int64),
                torch.tensor(slots, dtype=torch.int64),
                block_tables_tensor(slices, bs),
                torch.tensor([s.context_len for s in slices], dtype=torch.int64),
                self._kv_flat,
                self._pad_slot,
            )
            return done, logits[torch.tensor(rows, dtype=torch.int64)] if len(rows) != len(slices) else logits
        ctx = StepContext(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_size=bs,
            seqs=slices,
            rope_long=torch.tensor(long_rope) if long_after is not None else None,
            cpu_kernel=self.model.cpu_kernels,
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.int64),
            torch.tensor(positions, dtype=torch.int64),
            self.kv_caches,
            ctx,
        )
        self.prompt_logits = {
            seq_id: self.model.compute_logits(hidden[torch.tensor(r, dtype=torch.int64)])
            for seq_id, r in prompt_rows.items()
        }
        if not all_logits:
            hidden = hidden[torch.tensor(rows, dtype=torch.int64)]
        return done, self.model.compute_logits(hidden)
