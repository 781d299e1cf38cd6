"""The model, beneath both builder and runtime: the generic decoder (attention incl. MLA, MoE,
rope, quantized layers), the decode step that a target compiles, and the KV cache layout. It knows
no device: a device's kernels come in through `decoder.DeviceKernels`."""
