"""A Hugging Face model folder: config.json, *.safetensors (single or sharded), tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from llmc.artifacts.tokenizer_file import parse_tokenizer_json
from llmc.builder.sources.base import ModelSource, TensorMeta, TokenizerBundle
from llmc.errors import BadModelError

# Config and tokenizer JSON files are small; anything bigger is not what it claims to be.
_MAX_JSON_BYTES = 64 * 1024 * 1024

_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def read_json(path: Path) -> dict[str, Any]:
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise BadModelError(f"{path} is larger than {_MAX_JSON_BYTES} bytes; refusing to parse it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadModelError(f"{path} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BadModelError(f"{path} nests JSON too deeply to be a model's configuration") from exc
    if not isinstance(data, dict):
        raise BadModelError(f"{path} does not hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any, where: str) -> list[int]:
    """A token id or a list of them, as config.json and generation_config.json write them."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise BadModelError(f"{where} is {value!r}; it must be a token id or a list of token ids")
    return list(values)


def load_hf_tokenizer(folder: Path, config: dict[str, Any], generation: dict[str, Any]) -> TokenizerBundle:
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise BadModelError(
            f"{folder} has no tokenizer.json; llmc needs a fast tokenizer (save one with transformers' "
            "AutoTokenizer.from_pretrained(...).save_pretrained(folder))"
        )
    tokenizer_json = tok_path.read_bytes()
    if len(tokenizer_json) > _MAX_JSON_BYTES:
        raise BadModelError(f"{tok_path} is larger than {_MAX_JSON_BYTES} bytes")
    try:
        tokenizer = parse_tokenizer_json(tokenizer_json.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # UnicodeDecodeError is a ValueError; said for the reader
        raise BadModelError(f"{tok_path} cannot be loaded by the tokenizers library: {exc}") from exc
    tok_config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = (t for t in template if isinstance(t, dict) and t.get("name") == "default")
        template = next((t.get("template") for t in named), None)
    if template is not None and not isinstance(template, str):
        raise BadModelError(f"{folder / 'tokenizer_config.json'}'s chat_template is neither text nor named templates")
    if (folder / "chat_template.jinja").is_file():
        try:
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise BadModelError(f"{folder / 'chat_template.jinja'} is not UTF-8 text ({exc})") from exc
    bos = _token_text(tok_config.get("bos_token"))
    eos = _token_text(tok_config.get("eos_token"))
    eos_ids = _as_id_list(generation.get("eos_token_id"), "generation_config.json's eos_token_id") or _as_id_list(
        config.get("eos_token_id"), "config.json's eos_token_id"
    )
    if eos is not None and (eos_id := tokenizer.token_to_id(eos)) is not None and eos_id not in eos_ids:
        eos_ids.append(eos_id)
    if bos is None and isinstance(config.get("bos_token_id"), int):
        bos = tokenizer.id_to_token(config["bos_token_id"])
    if eos is None and eos_ids:
        eos = tokenizer.id_to_token(eos_ids[0])
    # Whether the model expects BOS first: the tokenizer's own post-processor says so by adding it.
    bos_id = tokenizer.token_to_id(bos) if bos else None
    adds_bos = bos_id is not None and tokenizer.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    add_bos = bool(tok_config.get("add_bos_token", adds_bos))
    return TokenizerBundle(
        tokenizer_json=tokenizer_json,
        chat_template=template if isinstance(template, str) else None,
        bos_token=bos,
        eos_token=eos,
        eos_token_ids=sorted(set(eos_ids)),
        add_bos_token=add_bos,
    )


def read_hf_folder(
    folder: Path, weights_folder: Path | None = None
) -> tuple[dict[str, Any], TokenizerBundle, dict[str, Any], list[Path]]:
    """A Hugging Face model folder's config, tokenizer, generation config and safetensors files
    (from `weights_folder` where given): what every safetensors-based source starts from."""
    if not (folder / "config.json").is_file():
        raise BadModelError(f"{folder} has no config.json; pass a Hugging Face model folder or a .gguf file")
    config = read_json(folder / "config.json")
    generation = read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    tokenizer = load_hf_tokenizer(folder, config, generation)
    weights_dir = weights_folder or folder
    files = sorted(weights_dir.glob("*.safetensors"))
    if not files:
        raise BadModelError(f"{weights_dir} has no *.safetensors weight files")
    return config, tokenizer, generation, files


class SafetensorsFolderSource(ModelSource):
    def __init__(self, folder: Path, name: str, weights_folder: Path | None = None) -> None:
        config, tokenizer, generation, files = read_hf_folder(folder, weights_folder)
        super().__init__("safetensors", name, config, tokenizer, generation, files)
        self._where: dict[str, Path] = {}
        self._meta: dict[str, TensorMeta] = {}
        for file in files:
            try:
                self._index(file)
            except SafetensorError as exc:  # a damaged or crafted header
                raise BadModelError(f"{file} is not a readable safetensors file: {exc}") from exc

    def _index(self, file: Path) -> None:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if key.endswith("rotary_emb.inv_freq"):
                    continue  # older checkpoints saved the rope table; it is recomputed
                tensor_slice = handle.get_slice(key)
                dtype = tensor_slice.get_dtype()
                if dtype not in _ST_DTYPES:
                    raise BadModelError(f"tensor {key} in {file.name} has dtype {dtype}; expected F32/F16/BF16")
                self._where[key] = file
                self._meta[key] = TensorMeta(shape=list(tensor_slice.get_shape()), dtype=_ST_DTYPES[dtype])

    def tensors(self) -> dict[str, TensorMeta]:
        return dict(self._meta)

    def load(self, name: str) -> torch.Tensor:
        with safe_open(str(self._where[name]), framework="pt") as handle:
            return handle.get_tensor(name)
