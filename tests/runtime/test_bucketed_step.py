"""Issue 18: the bucketed step's padding and input checks, written once for every device's
executor, tested with an executor that records what it is given."""

from __future__ import annotations

import pytest
import torch

from llmc.artifacts.manifest import CompiledStep, LayerProgram
from llmc.errors import InternalError
from llmc.runtime.bucketed_step import BucketedStep

BLOCK = 4
NUM_SLOTS = 10 * BLOCK  # 9 blocks for sequences, the last one for padding rows
PAD_SLOT = 9 * BLOCK


def _info(buckets: list[int]) -> CompiledStep:
    return CompiledStep(
        kind="decode",
        programs=[LayerProgram(package="compiled/none.pt2", constants="compiled/none.constants.safetensors", layers=1)],
        order=[0],
        buckets=buckets,
        max_seq_len=4 * BLOCK,
        block_size=BLOCK,
        torch_version="0",
        cpu_capability="none",
    )


class Recording(BucketedStep):
    """Returns each row's input id and slot as its "logits", and keeps the padded inputs."""

    def __init__(self, buckets: list[int], max_positions: int | None = None) -> None:
        super().__init__(_info(buckets), NUM_SLOTS, max_positions)
        self.seen: list[torch.Tensor] = []

    def _run(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        self.seen = inputs
        return torch.stack([inputs[0].float(), inputs[2].float()], dim=1)


def _batch(n: int) -> tuple[torch.Tensor, ...]:
    ids = torch.arange(1, n + 1)
    positions = torch.full((n,), 5)
    slots = torch.arange(n) * BLOCK + 1
    tables = torch.arange(n * 2).view(n, 2)
    lens = torch.full((n,), 6)
    return ids, positions, slots, tables, lens


def test_a_batch_is_padded_to_its_bucket_and_only_real_rows_come_back() -> None:
    step = Recording([1, 2, 4])
    kv = [torch.zeros(NUM_SLOTS, 1, 2)] * 2
    ids, positions, slots, tables, lens = _batch(3)
    logits = step(ids, positions, slots, tables, lens, kv, PAD_SLOT)
    assert logits[:, 0].tolist() == [1.0, 2.0, 3.0] and logits[:, 1].tolist() == slots.float().tolist()
    got_ids, got_pos, got_slots, got_tables, got_lens, *got_kv = step.seen
    assert got_ids.shape == (4,) and got_ids[3] == 0 and got_pos[3] == 0
    assert got_slots[3] == PAD_SLOT  # the padding row writes where no sequence reads
    assert got_tables[3].tolist() == [PAD_SLOT // BLOCK] * 2 and got_lens[3] == 1
    assert torch.equal(got_tables[:3], tables) and len(got_kv) == 2
    assert step.calls == 1
    step(*_batch(2), kv, PAD_SLOT)
    assert step.seen[0].shape == (2,) and step.calls == 2  # a full bucket is not padded


def test_buckets_and_limits() -> None:
    step = Recording([1, 2, 4])
    assert [step.bucket(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    assert step.accepts(4, 4 * BLOCK) and not step.accepts(5, 1) and not step.accepts(1, 4 * BLOCK + 1)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"slots": torch.tensor([NUM_SLOTS])}, "slot"),
        ({"tables": torch.tensor([[NUM_SLOTS // BLOCK]])}, "block id"),
        ({"lens": torch.tensor([BLOCK + 1])}, "context length"),
        ({"positions": torch.tensor([4 * BLOCK])}, "position"),
        ({"positions": torch.tensor([-1])}, "position"),
    ],
)
def test_inputs_the_executor_would_trust_blindly_are_refused(change: dict[str, torch.Tensor], problem: str) -> None:
    step = Recording([1, 2])
    inputs = {
        "ids": torch.tensor([1]),
        "positions": torch.tensor([0]),
        "slots": torch.tensor([0]),
        "tables": torch.tensor([[0]]),
        "lens": torch.tensor([1]),
    } | change
    with pytest.raises(InternalError, match=problem):
        step(*inputs.values(), [torch.zeros(NUM_SLOTS, 1, 2)], PAD_SLOT)
    assert step.calls == 0


def test_positions_are_bounded_by_the_tables_the_step_was_handed() -> None:
    """The runtime's rope tables hold the context it serves, which may be less than the compiled
    maximum: a position past them would read outside the table."""
    step = Recording([1], max_positions=6)
    kv = [torch.zeros(NUM_SLOTS, 1, 2)]
    ids, slots, tables = torch.tensor([1]), torch.tensor([0]), torch.tensor([[0, 1]])
    step(ids, torch.tensor([5]), slots, tables, torch.tensor([6]), kv, PAD_SLOT)
    with pytest.raises(InternalError, match="outside the rope tables' 6 rows"):
        step(ids, torch.tensor([6]), slots, tables, torch.tensor([7]), kv, PAD_SLOT)
    assert step.calls == 1
