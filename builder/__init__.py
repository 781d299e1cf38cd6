"""The builder: model sources → normalised spec → an artifact (`llmc build`)."""

# Batch sizes the compiled decode step pads a batch up to (`llmc build --buckets`), up to the
# runtime's default --max-num-seqs (64): batches beyond the largest run eagerly, at about half the
# speed (docs/BENCHMARKS.md). Here, not in compile_step, so that the command line shows the default
# without importing torch.
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
