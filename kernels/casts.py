"""A dtype conversion that leaves no trace when there is nothing to convert.

`x.to(dtype)` and `x.float()` return `x` itself when it already has that dtype, yet torch.export
records each as an `aten.to` node with a metadata assertion beside it. In the decode step those
no-ops were a third of all nodes (two per conversion, ~36 per layer), and every node costs the
ahead-of-time compile time in AOTAutograd's retrace and Inductor's lowering. Converting only where
the dtype differs decides at trace time, where dtypes are static, so the graph holds only real
conversions; eager results are the same tensors as before.
"""

from __future__ import annotations

import torch


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype`: `x` itself when it already is, else `x.to(dtype)`."""
    return x if x.dtype == dtype else x.to(dtype)
