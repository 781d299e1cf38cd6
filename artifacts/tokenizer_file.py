"""tokenizer.json from strangers, made into a `tokenizers.Tokenizer` both the builder (a model's
folder) and the runtime (an artifact) can trust with requests."""

from __future__ import annotations

from tokenizers import Tokenizer


def parse_tokenizer_json(source: str) -> Tokenizer:
    """The tokenizer `source` describes, with its padding and truncation settings off: llmc never
    pads or truncates, and a file's fixed padding length is an allocation every encode makes (a
    length of 10^12 aborted the process on the first request). ValueError where the library
    refuses the file, Rust panics included: pyo3 raises those as PanicException, a BaseException
    that `except Exception` lets through."""
    try:
        tokenizer = Tokenizer.from_str(source)
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(str(exc)) from exc
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise  # KeyboardInterrupt, SystemExit
        raise ValueError(f"the tokenizers library panicked on it: {exc}") from exc
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
