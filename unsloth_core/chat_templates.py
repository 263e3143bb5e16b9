"""Unsloth's chat-template helpers, as its notebooks import them:

    from unsloth_core.chat_templates import get_chat_template, standardize_sharegpt, train_on_responses_only
    tokenizer = get_chat_template(tokenizer, chat_template="llama-3.1")

`get_chat_template` returns a tokenizer that renders conversations in a named format and whose stop tokens end a
reply where that format ends it. The formats are the ones Llama-architecture models are trained on (and Unsloth's
names for them); each template is written here from the format's own description: the tokens it writes, where
the system prompt goes, what ends a turn. Where a format ends replies with a token other than the tokenizer's EOS:

- ChatML (`<|im_end|>`) and Gemma (`<end_of_turn>`) make it the EOS, as Unsloth does: when the tokenizer has no
  such token, its EOS token is renamed to it, so the token the model already ends texts with ends each reply and
  the vocabulary (and the embedding matrix) keeps its size. The pad token follows when it was the EOS.
- Llama 3 (`<|eot_id|>`) keeps the EOS and adds the end-of-turn token to the ids generation stops at, when the
  tokenizer has it (a base Llama 3 tokenizer's EOS is `<|end_of_text|>`; Unsloth leaves this to the model's
  generation_config).

A format whose special tokens this tokenizer lacks still renders (they are tokenized as text); a warning says so.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from tokenizers import Tokenizer as HFTokenizer

from unsloth_core.response_only import train_on_responses_only
from unsloth_core.sharegpt import standardize_sharegpt
from unsloth_core.tokenizer import Tokenizer

__all__ = ["CHAT_FORMATS", "ChatFormat", "get_chat_template", "standardize_sharegpt", "train_on_responses_only"]

STANDARD_MAPPING = {"role": "role", "content": "content", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class ChatFormat:
    """One conversation format.

    Args:
        template: Jinja over `messages` (dicts with `role` and `content`), `add_generation_prompt`, `bos_token`
            and `eos_token`, as transformers renders chat templates.
        end_of_turn: the token that ends a reply, when it is not simply the tokenizer's EOS.
        map_eos: make `end_of_turn` the tokenizer's EOS (ChatML, Gemma) instead of adding it as a stop token.
        special: tokens the format writes that a tokenizer for it has as single tokens.
        default_system: the system prompt a conversation without one gets.
    """

    template: str
    end_of_turn: str | None = None
    map_eos: bool = False
    special: tuple[str, ...] = ()
    default_system: str | None = None


def _jinja(text: str) -> str:
    """Templates are written one statement a line; the `-` markers strip the layout, so a template renders the same
    with or without trim_blocks/lstrip_blocks (transformers and llama.cpp set them differently)."""
    return "".join(line.strip() for line in text.strip().splitlines())


CHATML = _jinja(r"""
{%- for message in messages -%}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
""")

# Zephyr: `<|role|>` headers, every message closed by the EOS token, no BOS.
ZEPHYR = _jinja(r"""
{%- for message in messages -%}
    {{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>\n' -}}
{%- endif -%}
""")

# Stanford Alpaca's prompt, made multi-turn: the system text, then Instruction / Response sections.
ALPACA = _jinja(r"""
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {{- message['content'] + '\n\n' -}}
    {%- elif message['role'] == 'user' -%}
        {{- '### Instruction:\n' + message['content'] + '\n\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '### Response:\n' + message['content'] + eos_token + '\n\n' -}}
    {%- else -%}
        {{- raise_exception('the alpaca format has system, user and assistant messages only') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '### Response:\n' -}}
{%- endif -%}
""")

# Vicuna v1.1: the system text, then `USER: ... ASSISTANT: ...</s>`, separated by spaces.
VICUNA = _jinja(r"""
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {{- message['content'] + ' ' -}}
    {%- elif message['role'] == 'user' -%}
        {{- 'USER: ' + message['content'] + ' ' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- 'ASSISTANT: ' + message['content'] + eos_token -}}
    {%- else -%}
        {{- raise_exception('the vicuna format has system, user and assistant messages only') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'ASSISTANT:' -}}
{%- endif -%}
""")

# Mistral Instruct: `[INST] user [/INST]assistant</s>`; it has no system role, so a system message opens the
# first instruction.
MISTRAL = _jinja(r"""
{{- bos_token -}}
{%- set ns = namespace(system='') -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' and loop.first -%}
        {%- set ns.system = message['content'] + '\n\n' -%}
    {%- elif message['role'] == 'user' -%}
        {{- '[INST] ' + ns.system + message['content'] + ' [/INST]' -}}
        {%- set ns.system = '' -%}
    {%- elif message['role'] == 'assistant' -%}
        {{- message['content'] + eos_token -}}
    {%- else -%}
        {{- raise_exception('the mistral format has user and assistant messages after an optional system one') -}}
    {%- endif -%}
{%- endfor -%}
""")

# Llama 2 chat: each exchange in its own `<s>[INST] ... [/INST] ... </s>`, the system prompt in `<<SYS>>` inside
# the first instruction, contents stripped.
LLAMA_2 = _jinja(r"""
{%- set ns = namespace(system='') -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' and loop.first -%}
        {%- set ns.system = '<<SYS>>\n' + message['content'] | trim + '\n<</SYS>>\n\n' -%}
    {%- elif message['role'] == 'user' -%}
        {{- bos_token + '[INST] ' + ns.system + message['content'] | trim + ' [/INST]' -}}
        {%- set ns.system = '' -%}
    {%- elif message['role'] == 'assistant' -%}
        {{- ' ' + message['content'] | trim + ' ' + eos_token -}}
    {%- else -%}
        {{- raise_exception('the llama (2) format has user and assistant messages after an optional system one') -}}
    {%- endif -%}
{%- endfor -%}
""")

# Gemma: `<start_of_turn>user|model`, contents stripped, `<end_of_turn>` after each; no system role, so a system
# message opens the first user turn.
GEMMA = _jinja(r"""
{{- bos_token -}}
{%- set ns = namespace(system='') -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' and loop.first -%}
        {%- set ns.system = message['content'] | trim + '\n\n' -%}
    {%- elif message['role'] == 'user' -%}
        {{- '<start_of_turn>user\n' + ns.system + message['content'] | trim + '<end_of_turn>\n' -}}
        {%- set ns.system = '' -%}
    {%- elif message['role'] == 'assistant' -%}
        {{- '<start_of_turn>model\n' + message['content'] | trim + '<end_of_turn>\n' -}}
    {%- else -%}
        {{- raise_exception('the gemma format has user and assistant messages after an optional system one') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\n' -}}
{%- endif -%}
""")

# Llama 3 Instruct: BOS, then `<|start_header_id|>role<|end_header_id|>\n\n` + stripped content + `<|eot_id|>`.
LLAMA_3 = _jinja(r"""
{{- bos_token -}}
{%- for message in messages -%}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
""")

# Llama 3.1 Instruct (also 3.2 and 3.3): as Llama 3, but every conversation opens with a system turn that states
# the knowledge cutoff and a date (`date_string`, by default the model card's 26 Jul 2024) before the system prompt
# (empty when there is none). Tool definitions are not written by this template.
LLAMA_31 = _jinja(r"""
{{- bos_token -}}
{%- if tools is defined and tools -%}
    {{- raise_exception("this llama-3.1 template does not write tool definitions; use the model's own template") -}}
{%- endif -%}
{%- if date_string is not defined -%}
    {%- set date_string = '26 Jul 2024' -%}
{%- endif -%}
{%- set ns = namespace(system='', rest=messages) -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set ns.system = messages[0]['content'] | trim -%}
    {%- set ns.rest = messages[1:] -%}
{%- endif -%}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' -}}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + date_string + '\n\n' + ns.system + '<|eot_id|>' -}}
{%- for message in ns.rest -%}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
""")

_LLAMA_3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_LLAMA_3 = ChatFormat(LLAMA_3, "<|eot_id|>", special=_LLAMA_3_TOKENS)
_LLAMA_31 = ChatFormat(LLAMA_31, "<|eot_id|>", special=_LLAMA_3_TOKENS)

# Unsloth's names (and aliases) for each format.
CHAT_FORMATS: dict[str, ChatFormat] = {
    "chatml": ChatFormat(CHATML, "<|im_end|>", map_eos=True, special=("<|im_start|>", "<|im_end|>")),
    "zephyr": ChatFormat(ZEPHYR),
    "alpaca": ChatFormat(ALPACA, default_system="Below is an instruction that describes a task. Write a response "
                                                "that appropriately completes the request."),
    "vicuna": ChatFormat(VICUNA, default_system="A chat between a curious user and an artificial intelligence "
                                                "assistant. The assistant gives helpful, detailed, and polite "
                                                "answers to the user's questions."),
    "mistral": ChatFormat(MISTRAL),
    "llama": ChatFormat(LLAMA_2),
    "gemma": ChatFormat(GEMMA, "<end_of_turn>", map_eos=True, special=("<start_of_turn>", "<end_of_turn>")),
    "llama-3": _LLAMA_3,
    "llama3": _LLAMA_3,
    **dict.fromkeys(("llama-3.1", "llama-31", "llama-3.2", "llama-32", "llama-3.3", "llama-33"), _LLAMA_31),
}


def get_chat_template(tokenizer: Tokenizer, chat_template: str | tuple[str, str] = "chatml",
                      mapping: Mapping[str, str] | None = None, map_eos_token: bool = True,
                      system_message: str | None = None) -> Tokenizer:
    """A copy of `tokenizer` that renders conversations in `chat_template` and stops where its replies end.

    Args:
        chat_template: a name from CHAT_FORMATS, or a (Jinja template, end-of-turn token) pair of your own.
        mapping: the keys a dataset's messages use, as Unsloth takes them: `{"role": "from", "content": "value",
            "user": "human", "assistant": "gpt"}` renders ShareGPT messages as they are.
        map_eos_token: make the format's end-of-turn token the EOS where the format does so (ChatML, Gemma, a pair);
            False only adds it to the stop tokens (and needs it to be a token).
        system_message: the system prompt for conversations that have none (the format's own default otherwise).
    """
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"get_chat_template takes an unsloth_core Tokenizer (from FastLanguageModel."
                        f"from_pretrained), not {type(tokenizer).__name__}")
    fmt = _format(chat_template)
    template = _preamble(mapping, system_message or fmt.default_system) + fmt.template
    backend, settings, stops = tokenizer.backend, tokenizer.settings(), list(tokenizer.eos_token_ids)
    end = fmt.end_of_turn
    if end is not None and end != settings.get("eos_token"):
        end_id = backend.token_to_id(end)
        if fmt.map_eos and map_eos_token:
            if end_id is None:
                backend = _renamed(backend, settings, end)
            if settings.get("pad_token") in (None, settings.get("eos_token")):
                settings["pad_token"] = end
            settings["eos_token"] = end
        elif end_id is not None:
            stops.append(end_id)
        elif end not in fmt.special:  # a format's own tokens are warned about below
            warnings.warn(f"{end} is not a token of this tokenizer, so generation cannot stop at it: it stops at "
                          f"the EOS ({settings.get('eos_token')}) only", stacklevel=2)
    missing = [t for t in fmt.special if backend.token_to_id(t) is None]
    if missing:
        warnings.warn(f"chat_template {chat_template if isinstance(chat_template, str) else 'given'} writes "
                      f"{', '.join(missing)}, which this tokenizer does not have as tokens: they are tokenized as "
                      f"plain text, which the model has to learn (a format whose tokens the model knows trains "
                      f"faster)", stacklevel=2)
    settings["chat_template"] = template
    out = Tokenizer(backend, settings, template, stops)
    out.padding_side, out.truncation_side = tokenizer.padding_side, tokenizer.truncation_side
    return out


def _format(chat_template: str | tuple[str, str]) -> ChatFormat:
    if isinstance(chat_template, tuple | list) and len(chat_template) == 2:
        template, stop = chat_template
        if not (isinstance(template, str) and isinstance(stop, str)):
            raise TypeError("a custom chat_template is a (Jinja template, end-of-turn token) pair of strings")
        return ChatFormat(template, stop, map_eos=True)
    if isinstance(chat_template, str) and chat_template in CHAT_FORMATS:
        return CHAT_FORMATS[chat_template]
    raise ValueError(f"unknown chat_template {chat_template!r}; the formats are {', '.join(CHAT_FORMATS)}, or a "
                     f"(Jinja template, end-of-turn token) pair")


def _preamble(mapping: Mapping[str, str] | None, system: str | None) -> str:
    """Jinja that puts `messages` in the standard shape before the format's template reads them: ShareGPT-style
    keys and role names renamed per `mapping`, and the default system prompt inserted where there is none."""
    parts = []
    if mapping is not None and dict(mapping) != STANDARD_MAPPING:
        if set(mapping) != set(STANDARD_MAPPING):
            raise ValueError(f"mapping needs exactly the keys {', '.join(STANDARD_MAPPING)}, got "
                             f"{', '.join(mapping) or 'none'}")
        role, content, user, assistant = (json.dumps(mapping[k]) for k in STANDARD_MAPPING)
        roles = f"{{{user}: 'user', {assistant}: 'assistant'}}"
        parts.append(_jinja(f"""
            {{%- set unsloth_ns = namespace(messages=[]) -%}}
            {{%- for m in messages -%}}
                {{%- set role = {roles}.get(m[{role}], m[{role}]) -%}}
                {{%- set unsloth_ns.messages = unsloth_ns.messages + [{{'role': role, 'content': m[{content}]}}] -%}}
            {{%- endfor -%}}
            {{%- set messages = unsloth_ns.messages -%}}
            """))
    if system is not None:
        parts.append(_jinja(f"""
            {{%- if not messages or messages[0]['role'] != 'system' -%}}
                {{%- set messages = [{{'role': 'system', 'content': {json.dumps(system)}}}] + messages -%}}
            {{%- endif -%}}
            """))
    return "".join(parts)


def _renamed(backend: HFTokenizer, settings: dict[str, object], new: str) -> HFTokenizer:
    """The tokenizer with its EOS token's text changed to `new` (same id): in the added tokens, the model's
    vocabulary and the post-processor, wherever the old text names that token."""
    old = settings.get("eos_token")
    if not isinstance(old, str) or backend.token_to_id(old) is None:
        raise ValueError(f"cannot map {new} onto the EOS token: this tokenizer has no EOS token")
    if old in (settings.get("bos_token"), settings.get("unk_token")):
        raise ValueError(f"cannot rename the EOS token {old} to {new}: it is also the BOS or unknown token")
    data = json.loads(backend.to_str())
    for token in data.get("added_tokens", []):
        if token.get("content") == old:
            token["content"] = new
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, dict) and old in vocab:
        vocab[new] = vocab.pop(old)
    elif isinstance(vocab, list):  # Unigram: [piece, score] pairs
        data["model"]["vocab"] = [[new, s] if p == old else [p, s] for p, s in vocab]
    data["post_processor"] = _replace_text(data.get("post_processor"), old, new)
    return HFTokenizer.from_str(json.dumps(data))


def _replace_text(node: object, old: str, new: str) -> object:
    if isinstance(node, dict):
        return {(new if k == old else k): _replace_text(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_text(v, old, new) for v in node]
    return new if node == old else node
