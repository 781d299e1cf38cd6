"""The builder: model sources → normalised spec → an artifact (`llmc build`)."""

# Batch sizes the compiled decode step pads a batch up to (`llmc build --buckets`), up to the
# runtime's default --max-num-seqs (64): batches beyond the largest run eagerly, at about half the
# speed (docs/BENCHMARKS.md). Here, not in compile_step, so that the command line shows the default
# without importing torch.
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# `llmc build --isq` formats (quant/formats.py FORMATS, which a test holds this to) and
# `--dtype` choices (build.py DTYPES), named here so the command line refuses a typo before it
# imports torch or opens (or downloads) the model.
ISQ_FORMATS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2k", "q3k", "q4k", "q5k", "q6k")
BUILD_DTYPES = ("f32", "f16", "bf16")
# `llmc build --cpu-isa`: the CPU capabilities the decode step is compiled for (builder/targets/cpu.py).
# "host": the build machine's only; "baseline": x86-64 AVX2 only (a non-x86 or AVX2 machine: its
# own); "all": both (the runtime takes the best package the host supports). The default is the
# baseline: the package's own code is only the glue between llmc's kernels (norms, rope, residual
# adds), whose vector width did not change the step time on an AVX-512 host (docs/BENCHMARKS.md,
# "The cold default build"), and one package is half the compile of two, yet runs on every x86-64 CPU.
CPU_ISAS = ("host", "baseline", "all")
DEFAULT_CPU_ISA = "baseline"
