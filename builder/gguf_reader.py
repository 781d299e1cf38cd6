"""gguf's GGUFReader, parsing the metadata ~3.5x faster (0.85 s instead of 3.0 s for SmolLM2's
file on the 2-core Xeon, docs/BENCHMARKS.md): the same fields, tensors and errors.

The reader slices its memory map once per value: ~98,000 times for a 49k-token vocabulary and
its merges. A slice of a numpy.memmap runs memmap's Python-level __getitem__ and
__array_finalize__, ~20 µs together; a slice of a plain ndarray over the same memory does not.
Import it lazily: gguf is the builder's dependency, not the runtime's.
"""

from __future__ import annotations

from typing import Any, Literal

import gguf
import numpy as np
import numpy.typing as npt

# numpy dtypes by (the dtype asked for, byte order): made once, not once per value.
_DTYPES: dict[tuple[Any, str], np.dtype[Any]] = {}
# The most items a metadata array may claim. The largest real ones are vocabularies and merge
# lists (Gemma 3: 262,144 tokens; merges up to ~500,000); the parser keeps a numpy view per item
# (~100 bytes each), so a count from a stranger's header is bounded here, before the loop.
MAX_ARRAY_ITEMS = 1 << 21
# The fewest bytes an array item of a non-scalar type takes: a string's 8-byte length, a nested
# array's 4-byte type and 8-byte count.
_MIN_ITEM_BYTES = {int(gguf.GGUFValueType.STRING): 8, int(gguf.GGUFValueType.ARRAY): 12}
_VALUE_TYPES = frozenset(int(t) for t in gguf.GGUFValueType)


class FastGGUFReader(gguf.GGUFReader):
    """GGUFReader whose values are read from a plain ndarray view of its memory map. Its `data`
    stays the memory map (the builder releases the map's pages through it); the tensors' data
    are views into the same memory either way."""

    def _get(
        self,
        offset: int,
        dtype: npt.DTypeLike,
        count: int = 1,
        override_order: Literal["I", "S", "<"] | None = None,
    ) -> npt.NDArray[Any]:
        plain: npt.NDArray[np.uint8] | None = self.__dict__.get("_plain")
        if plain is None:
            plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
        order = self.byte_order if override_order is None else override_order
        key = (dtype, order)
        wanted = _DTYPES.get(key)
        if wanted is None:
            wanted = _DTYPES[key] = np.dtype(dtype).newbyteorder(order)
        count = int(count)
        end = offset + wanted.itemsize * count
        if offset < 0 or count < 0 or end > len(plain):
            # The base class returns a short slice here, which an array's loop does not notice: a
            # 68-byte file claiming 2^62 items grew the reader by GBs without moving forward.
            raise ValueError(f"the file ends before the {count} value(s) its header places at byte {offset}")
        return plain[offset:end].view(wanted)

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[npt.NDArray[Any]], list[int], Any]:
        if raw_type == gguf.GGUFValueType.ARRAY:
            item_type = int(self._get(orig_offs, np.uint32)[0])
            count = int(self._get(orig_offs + 4, np.uint64)[0])
            scalar = self.gguf_scalar_to_np.get(gguf.GGUFValueType(item_type)) if item_type in _VALUE_TYPES else None
            least = np.dtype(scalar).itemsize if scalar is not None else _MIN_ITEM_BYTES.get(item_type, 1)
            left = len(self.data) - (orig_offs + 12)
            if count > MAX_ARRAY_ITEMS or count * least > left:
                raise ValueError(
                    f"a metadata array at byte {orig_offs} claims {count} items: more than "
                    f"{MAX_ARRAY_ITEMS} or than the {left} bytes left in the file hold"
                )
        parts: tuple[int, list[npt.NDArray[Any]], list[int], Any] = super()._get_field_parts(orig_offs, raw_type)
        return parts
