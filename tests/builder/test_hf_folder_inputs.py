"""A Hugging Face folder from a stranger: every field the builder reads that is of the wrong kind
is refused as a bad model naming the file, never a traceback (builder/sources/safetensors_folder.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from llmc.builder.sources import open_source
from llmc.errors import BadModelError


def _config(key: str, value: object, file: str = "config.json") -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / file).read_text())
        config[key] = value
        (folder / file).write_text(json.dumps(config))

    return edit


def _tokenizer_config(key: str, value: object) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "tokenizer_config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
        config[key] = value
        path.write_text(json.dumps(config))

    return edit


def _damage_weights(folder: Path) -> None:
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"a": 1}        ' + weights.read_bytes()[24:])


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "eos id a string": (_config("eos_token_id", "abc", "generation_config.json"), "eos_token_id"),
    "eos id a float": (_config("eos_token_id", [2, 1.5], "generation_config.json"), "eos_token_id"),
    "named template a number": (
        _tokenizer_config("chat_template", [{"name": "default", "template": 5}]),
        "chat_template",
    ),
    "template a number": (_tokenizer_config("chat_template", 5), "chat_template"),
    "template file not utf-8": (lambda f: (f / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}"), "UTF-8"),
    "weights header damaged": (_damage_weights, "not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fields_of_the_wrong_kind_are_a_bad_model(tiny_llama_dir: Path, tmp_path: Path, case: str) -> None:
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
    edit, message = CASES[case]
    edit(folder)
    with pytest.raises(BadModelError, match=message):
        open_source(str(folder))


def test_the_untouched_folder_opens(tiny_llama_dir: Path) -> None:
    assert open_source(str(tiny_llama_dir)).tensors()
