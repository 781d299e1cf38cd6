// llmc's torch ops (and the load-time conversion to the matmul's layout), one translation unit: parsing torch's headers is most of a compile, so they
// are parsed once for both ops (and once for every ISA: kernels_api.h says how the ops reach the
// ISA's kernels).

#include "half_matmul.cpp"
#include "kernel_form.cpp"
#include "paged_attention_cpu.cpp"
#include "qmatmul.cpp"
#include "rms_norm.cpp"
