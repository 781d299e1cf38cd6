"""The artifact format: the one contract between the builder and the runtime.

See docs/artifact-format.md. The builder writes with `writer`, the runtime reads with `reader`;
both share the schema in `manifest`.
"""
