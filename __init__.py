"""llmc: an ahead-of-time LLM compiler and a lean serving runtime."""

__version__ = "0.1.0"
