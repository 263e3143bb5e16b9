"""An Ollama `Modelfile` for an exported GGUF: `FROM`, a `TEMPLATE` in Ollama's Go template syntax equivalent to
the model's Jinja chat template, `PARAMETER stop` for every end-of-turn token, and `SYSTEM` where the template
puts in a default system prompt.

A Jinja template cannot be translated in general, so the translation is by family: each family we import (ChatML,
as SmolLM2 and Qwen; Llama 3; Llama 3.1, whose system turn is always there) is a shape, every message
`prefix(role) + content + suffix`, a generation prompt and an optional leading BOS. A family is chosen only when
rendering probe conversations with the shape gives the Jinja template's text exactly; the default system prompt is
what the template adds to a conversation without one. Anything else is refused with a clear error rather than
written subtly wrong (the endless-generation and lost-template complaints about exported models come from exactly
that).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from unsloth_core.errors import UnslothError
from unsloth_core.tokenizer import Tokenizer

Message = dict[str, str]


@dataclass(frozen=True)
class Family:
    name: str
    prefix: Callable[[str], str]  # the text before a message of this role
    suffix: str  # after every message: the end-of-turn token (and separator)
    trim: bool  # the template strips each message's content
    bos: bool  # the template starts with the BOS token
    always_system: bool = False  # a system turn opens every conversation, empty when there is no system message

    def render(self, messages: Sequence[Message], add_generation_prompt: bool, bos_token: str) -> str:
        text = bos_token if self.bos else ""
        if self.always_system and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": ""}, *messages]
        for m in messages:
            content = m["content"].strip() if self.trim else m["content"]
            text += self.prefix(m["role"]) + content + self.suffix
        return text + (self.prefix("assistant") if add_generation_prompt else "")


FAMILIES = (
    Family("chatml", lambda role: f"<|im_start|>{role}\n", "<|im_end|>\n", trim=False, bos=False),
    Family("llama-3", lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", trim=True,
           bos=True),
    # Llama 3.1 to 3.3 (without tools): the system turn states the knowledge cutoff and the model card's date first.
    Family("llama-3.1", lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n" + (
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" if role == "system" else ""),
           "<|eot_id|>", trim=True, bos=True, always_system=True),
)
PROBES: list[tuple[list[Message], bool]] = [
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}], True),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
     False),
]


class TemplateNotTranslatable(UnslothError):
    """The chat template is not one whose Ollama equivalent we can write faithfully."""


def detect(tokenizer: Tokenizer) -> tuple[Family, str | None]:
    """The family whose shape renders the tokenizer's template exactly, and the default system prompt (None)."""
    bos = tokenizer.bos_token or ""
    for family in FAMILIES:
        if all(tokenizer.render_chat(m, add_generation_prompt=g) == family.render(m, g, bos) for m, g in PROBES):
            return family, default_system(tokenizer, family, bos)
    raise TemplateNotTranslatable(
        "this chat template is not one we can translate to Ollama's template syntax faithfully (ChatML and "
        "Llama 3 shapes are); export without the Modelfile (ollama=False / no --ollama) and write its TEMPLATE "
        "by hand")


def default_system(tokenizer: Tokenizer, family: Family, bos: str) -> str | None:
    user = [{"role": "user", "content": "Q"}]
    text = tokenizer.render_chat(user, add_generation_prompt=True)
    if text == family.render(user, True, bos):
        return None
    start = (bos if family.bos else "") + family.prefix("system")
    end = text.find(family.suffix, len(start))
    system = text[len(start):end] if text.startswith(start) and end >= 0 else None
    if system is None or text != family.render([{"role": "system", "content": system}, *user], True, bos):
        raise TemplateNotTranslatable("the chat template changes a conversation without a system message in a "
                                      "way other than adding a default system prompt; it cannot be translated")
    return system


def go_template(family: Family, bos_text: str) -> str:
    """Ollama's template over `.Messages`: the system prompt from `.System` (the request's system message, or
    the Modelfile's SYSTEM when it has none), then each user and assistant message, then the generation prompt.
    No whitespace-trimming markers: `{{-` would also eat the newline a message's suffix ends with."""
    def msg(role: str, value: str) -> str:
        # Go templates have no trim: a family that trims matches for contents without surrounding whitespace.
        return _go_text(family.prefix(role)) + f"{{{{ {value} }}}}" + _go_text(family.suffix)

    system = msg("system", ".System")
    if not family.always_system:
        system = f"{{{{ if .System }}}}{system}{{{{ end }}}}"
    return (f"{_go_text(bos_text)}{system}"
            "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            f"{{{{ if eq .Role \"user\" }}}}{msg('user', '.Content')}"
            f"{{{{ else if eq .Role \"assistant\" }}}}{msg('assistant', '.Content')}{{{{ end }}}}"
            f"{{{{ if and $last (ne .Role \"assistant\") }}}}{_go_text(family.prefix('assistant'))}{{{{ end }}}}"
            "{{ end }}")


def _go_text(text: str) -> str:
    """Literal text inside a Go template: only `{{` would be read as an action."""
    return text.replace("{{", '{{ "{{" }}')


def modelfile(gguf_name: str, tokenizer: Tokenizer, add_bos: bool) -> str:
    """The Modelfile's text. `add_bos`: llama.cpp adds the BOS itself (the GGUF says so), so the template must not."""
    family, system = detect(tokenizer)
    bos_text = (tokenizer.bos_token or "") if family.bos and not add_bos else ""
    stops = [family.suffix.strip(), *(tokenizer.decode([i]) for i in tokenizer.eos_token_ids)]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(family, bos_text)}"""']
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops) if s]
    return "\n".join(lines) + "\n"
