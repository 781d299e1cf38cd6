// llmc's torch ops (and the load-time conversion to the matmul's layout), one translation unit
// written against torch's stable ABI (torch_stable.h): torch's headers are parsed once for all the
// ops, and once for every ISA (kernels_api.h says how the ops reach the ISA's kernels).

#include "half_matmul.cpp"
#include "kernel_form.cpp"
#include "paged_attention_cpu.cpp"
#include "qmatmul.cpp"
#include "rms_norm.cpp"
