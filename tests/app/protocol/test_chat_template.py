"""Chat templates render exactly as transformers' `apply_chat_template` renders them, on the same
template (the demo's example and a ChatML-style one using the Jinja features templates use)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from app.protocol.chat_template import ChatTemplateError, load_chat_template
from model.tokenizer import GPT2Tokenizer

DEMO_TEMPLATE = Path(__file__).resolve().parents[3] / "model" / "demo" / "chat_template.jinja"

# What chat-tuned checkpoints' templates use: loop controls, namespace(), tojson on tools, the
# `{% generation %}` tag, raise_exception, special-token variables, a kwarg, reasoning content.
CHATML = """{%- set ns = namespace(system=none) %}
{%- if tools %}{{- '<|im_start|>system\\nTools: ' + tools | tojson + '<|im_end|>\\n' }}{%- endif %}
{%- for message in messages %}
{%- if message.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + message.role)}}{% endif %}
{%- if loop.index0 > 20 %}{% break %}{% endif %}
{%- if message.role == 'assistant' %}<|im_start|>assistant
{% if message.reasoning_content and enable_thinking %}<think>{{ message.reasoning_content }}</think>{% endif %}
{% generation %}{{ message.content }}{% endgeneration %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if documents %}{% for d in documents %}[{{ d.title }}] {{ d.text }}
{% endfor %}{% endif %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}{{ eos_token if end_with_eos else '' }}"""

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Bonjour, ça va ? \u00e9\u4e2d"},
        {"role": "assistant", "content": "Oui.", "reasoning_content": "think first"},
        {"role": "user", "content": "<|endoftext|> and more"}]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_lm_dir) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(tiny_lm_dir)  # the checkpoint's own files, no download


@pytest.fixture(scope="module")
def ours(tiny_lm_dir) -> GPT2Tokenizer:
    return GPT2Tokenizer.from_dir(tiny_lm_dir)


def _hf(tok, template: str, messages: list[dict], **kw) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)


@pytest.mark.parametrize("template_name", ["demo", "chatml"])
@pytest.mark.parametrize("kw", [
    {"add_generation_prompt": True},
    {"add_generation_prompt": False},
    {"add_generation_prompt": False, "continue_final_message": True},
])
def test_rendering_equals_transformers(tmp_path, hf_tokenizer, ours, template_name, kw) -> None:
    source = DEMO_TEMPLATE.read_text() if template_name == "demo" else CHATML
    (tmp_path / "t.jinja").write_text(source)
    template = load_chat_template(str(tmp_path / "t.jinja"), None)
    messages = [{k: v for k, v in m.items() if k != "reasoning_content" or template_name == "chatml"} for m in CHAT]
    want = _hf(hf_tokenizer, source, messages, **kw)
    got = template.render(messages, add_generation_prompt=kw["add_generation_prompt"],
                          continue_final_message=kw.get("continue_final_message", False))
    assert got == want and got
    # the prompt tokens too: transformers encodes the rendered text without adding special tokens
    ids = hf_tokenizer.apply_chat_template(messages, chat_template=source, tokenize=True, return_dict=False, **kw)
    assert ours.encode(got) == list(ids)
    assert 50256 in ours.encode(got)  # "<|endoftext|>" in a message is the special token, as in transformers


def test_tools_documents_kwargs_and_special_tokens_equal_transformers(tmp_path, hf_tokenizer) -> None:
    template = load_chat_template(CHATML, None)
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"type": "object"}}}]
    docs = [{"title": "A", "text": "first"}, {"title": "B", "text": "second"}]
    kw = {"enable_thinking": True, "end_with_eos": True}
    want = _hf(hf_tokenizer, CHATML, CHAT, tools=tools, documents=docs, add_generation_prompt=True, **kw)
    got = template.render(CHAT, add_generation_prompt=True, tools=tools, documents=docs, kwargs=kw)
    assert got == want and "météo" in got and "<think>think first</think>" in got and got.endswith("<|endoftext|>")


def test_raise_exception_and_sandbox_refusals_are_template_errors(hf_tokenizer) -> None:
    template = load_chat_template(CHATML, None)
    bad = [{"role": "robot", "content": "x"}]
    with pytest.raises(Exception, match="bad role robot"):
        _hf(hf_tokenizer, CHATML, bad)
    with pytest.raises(ChatTemplateError, match="bad role robot"):
        template.render(bad)
    escape = load_chat_template("{{ messages.__class__.__mro__ }}", None)
    with pytest.raises(ChatTemplateError):
        escape.render(CHAT)
    with pytest.raises(ChatTemplateError):
        load_chat_template("{% set ns = namespace() %}{% set ns._x = 1 %}", None).render(CHAT)


def test_where_the_template_comes_from(tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert load_chat_template(None, ckpt) is None  # a base GPT-2: no template
    (ckpt / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "default", "template": "D{{ messages[0].content }}"},
                          {"name": "tool_use", "template": "T{{ tools | length }}"}],
        "eos_token": {"content": "<|endoftext|>", "special": True}, "bos_token": "<s>"}))
    t = load_chat_template(None, ckpt)
    assert t.origin == "tokenizer_config.json" and t.render([{"role": "user", "content": "x"}]) == "Dx"
    assert t.render([{"role": "user", "content": "x"}], tools=[{"a": 1}]) == "T1"  # as transformers picks tool_use
    assert t.special_tokens == {"eos_token": "<|endoftext|>", "bos_token": "<s>"}
    (ckpt / "chat_template.jinja").write_text("J{{ bos_token }}")
    assert load_chat_template(None, ckpt).render([]) == "J<s>"  # the .jinja file wins over tokenizer_config
    (tmp_path / "mine.jinja").write_text("M")
    assert load_chat_template(str(tmp_path / "mine.jinja"), ckpt).origin.startswith("CHAT_TEMPLATE=")
    with pytest.raises(ValueError, match="CHAT_TEMPLATE='nope.jinja': no such file"):
        load_chat_template("nope.jinja", ckpt)
    with pytest.raises(ValueError, match="does not compile"):
        load_chat_template("{% for %}", ckpt)
