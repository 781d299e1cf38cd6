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
        # Past the end of the file the slice is short, as the base class's: its caller fails.
        return plain[offset : offset + wanted.itemsize * count].view(wanted)
