"""Chat templates come from strangers (runtime/tokenizer.py): rendered in a sandbox that also
bounds what one expression allocates and how long loops over a request's data may run."""

from __future__ import annotations

import time

import pytest
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import models

from llmc.artifacts.manifest import TokenizerInfo
from llmc.errors import BadArtifactError, BadInputError
from llmc.runtime import tokenizer as tokenizer_module
from llmc.runtime.tokenizer import Tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo"}]


def _tokenizer(template: str) -> Tokenizer:
    info = TokenizerInfo(
        file="tokenizer.json", chat_template_file=None, bos_token=None, eos_token=None, eos_token_ids=[]
    )
    return Tokenizer(HfTokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")), info, template)


def test_real_templates_render_as_before() -> None:
    text = _tokenizer(CHATML).apply_chat_template(MESSAGES)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n"
    # What templates do with tools and messages: items(), tojson, range, loop, slices, `in`, `*`.
    template = (
        "{% for tool in tools %}{% for k, v in tool['function'].items() %}{{ k }}={{ v | tojson }};"
        "{% endfor %}{% endfor %}"
        "{% for i in range(messages | length) %}{{ i }}{% if not loop.last %},{% endif %}{% endfor %}"
        "{{ '-' * 3 }}{{ messages[-1]['content'][:2] }}{{ 'é' in messages[-1]['content'] }}{{ 2 ** 10 }}"
        "{% for c in messages[0]['content'] %}{{ c | upper }}{% endfor %}{{ '%5d' | format(7) }}"
    )
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    text = _tokenizer(template).apply_chat_template(MESSAGES, tools=tools)
    assert text == 'name="f";parameters={"type": "object"};0,1---héTrue1024BE BRIEF.    7'


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ 'a' * 100000000000 }}", "would build"),  # was folded when compiling: 100 GB
        ("{{ 'a' * (messages | length * 3000000000) }}", "would build"),  # 4 GB per request
        ("{{ [1] * 10000000 }}", "would build"),
        ("{{ 3 ** 100000000 }}", "exponent"),
        ("{{ 'x' | center(1000000000) }}", "width"),
        ("{{ 'y' | indent(1000000000, true) }}", "width"),
        ("{{ '%999999999d' | format(1) }}", "width"),
        ("{{ 1 // 0 }}", "ZeroDivisionError"),
        ("{{ messages + 1 }}", "TypeError"),
        ("{% for i in range(1000000) %}{% endfor %}", "range"),
    ],
)
def test_what_one_expression_may_build_is_bounded(template: str, message: str) -> None:
    started = time.monotonic()
    with pytest.raises(BadInputError, match=message) as caught:
        _tokenizer(template).apply_chat_template(MESSAGES)
    assert caught.value.param == "messages"
    assert time.monotonic() - started < 5  # refused before it allocates, not after


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% for m in messages %}{% for a in m['content'] %}{% for b in m['content'] %}{% for c in m['content'] %}"
        "{% endfor %}{% endfor %}{% endfor %}{% endfor %}",
        "{% for t in tools %}{% for a, x in t['function']['parameters']['properties'].items() %}"
        "{% for b in t['function']['parameters']['properties'] %}{% endfor %}{% endfor %}{% endfor %}",
    ],
    ids=["range", "content", "dict"],
)
def test_loops_that_print_nothing_still_stop_at_the_time_limit(template: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # They left the per-piece check nothing to check: the threads ran for hours and starved the server.
    monkeypatch.setattr(tokenizer_module, "TEMPLATE_RENDER_TIMEOUT_S", 0.3)
    long_message = [{"role": "user", "content": "z" * 3000}]
    tools = [{"function": {"name": "f", "parameters": {"properties": {f"p{i}": {} for i in range(3000)}}}}]
    started = time.monotonic()
    with pytest.raises(BadInputError, match="took over"):
        _tokenizer(template).apply_chat_template(long_message, tools=tools)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    "template", ["{% if 1 %}" * 2000 + "x" + "{% endif %}" * 2000, "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}"]
)
def test_a_template_nested_too_deeply_is_a_bad_artifact(template: str) -> None:
    with pytest.raises(BadArtifactError, match="nests too deeply"):
        _tokenizer(template)
