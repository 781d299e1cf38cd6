"""The serving runtime: maps an artifact and serves it. Never imports llmc.builder."""
