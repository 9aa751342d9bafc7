"""DeepSeek's chat formats and text-level generation.

V3 / R1 (``style="v3"``)::

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜><｜User｜>...<｜Assistant｜>

V2 / V2-Lite chat (``style="v2"``)::

    <｜begin▁of▁sentence｜>{system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}<｜end▁of▁sentence｜>User: ...

System messages are gathered (joined by a blank line) after the BOS token, as the released templates do. With
``think=True`` (R1) the generation prompt ends with ``<think>\\n`` and earlier assistant turns keep only the text
after their ``</think>``, as R1's template drops past reasoning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dsjax.data.tokenizer import DEEPSEEK_BOS, DEEPSEEK_EOS, Tokenizer

DEEPSEEK_USER = "<｜User｜>"
DEEPSEEK_ASSISTANT = "<｜Assistant｜>"
STYLES = ("v3", "v2")
_ROLES = ("system", "user", "assistant")

Message = Mapping[str, str]


def render_chat(
    messages: Sequence[Message],
    *,
    style: str = "v3",
    add_generation_prompt: bool = True,
    think: bool = False,
    bos: str = DEEPSEEK_BOS,
    eos: str = DEEPSEEK_EOS,
) -> str:
    """The prompt text of a conversation: ``messages`` are ``{"role": system|user|assistant, "content": str}``.

    Raises:
      ValueError: an unknown style or role, a message without string content, or no user/assistant turn.
    """
    if style not in STYLES:
        raise ValueError(f"style={style!r}; choose one of {STYLES}")
    if think and style != "v3":
        raise ValueError("think=True is R1's format; use style='v3'")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} must be a mapping with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise ValueError(f"message {i}: role must be one of {_ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        (system if role == "system" else turns).append((role, content))
    if not turns:
        raise ValueError("a conversation needs at least one user or assistant message")
    system_text = "\n\n".join(c for _, c in system)
    parts = [bos]
    if style == "v3":
        parts.append(system_text)
        for role, content in turns:
            if role == "user":
                parts.append(DEEPSEEK_USER + content)
            else:
                parts.append(DEEPSEEK_ASSISTANT + (_after_thinking(content) if think else content) + eos)
        if add_generation_prompt:
            parts.append(DEEPSEEK_ASSISTANT + ("<think>\n" if think else ""))
    else:
        if system_text:
            parts.append(system_text + "\n\n")
        for role, content in turns:
            parts.append(f"User: {content}\n\n" if role == "user" else f"Assistant: {content}{eos}")
        if add_generation_prompt:
            parts.append("Assistant:")
    return "".join(parts)


def _after_thinking(content: str) -> str:
    return content.split("</think>")[-1].lstrip("\n") if "</think>" in content else content


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str | Sequence[Message]], **chat_options) -> list[list[int]]:
    """Token ids of each prompt: a string is plain text after a BOS token; a list of messages is rendered with
    :func:`render_chat` (``chat_options``), whose special tokens the tokenizer must know."""
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append([tokenizer.bos_id, *tokenizer.encode(p)])
            continue
        text = render_chat(p, **chat_options)
        _check_chat_tokens(tokenizer, chat_options.get("style", "v3"))
        out.append(list(tokenizer.encode(text)))
        if not out[-1] or out[-1][0] != tokenizer.bos_id:
            raise ValueError(f"prompt {i}: the tokenizer did not encode the BOS token of the chat template")
    return out


def _check_chat_tokens(tokenizer: Tokenizer, style: str) -> None:
    lookup = getattr(tokenizer, "token_id", None)
    if lookup is None:
        raise ValueError(f"{tokenizer!r} has no DeepSeek chat tokens; chat needs an HF tokenizer.json")
    if style == "v3":
        missing = [t for t in (DEEPSEEK_USER, DEEPSEEK_ASSISTANT) if lookup(t) is None]
        if missing:
            raise ValueError(f"the tokenizer lacks the chat tokens {missing}; use style='v2' or another tokenizer")


def generate_text(
    model, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[Message]], *, chat_options=None, **generate_kwargs
) -> list[str]:
    """Text in, text out: encode ``prompts`` (strings or conversations, see :func:`encode_prompts`), run
    :func:`~dsjax.infer.generate` (``generate_kwargs``; stop tokens default to the tokenizer's EOS) and decode
    each continuation without its final stop token."""
    from dsjax.infer.engine import generate

    ids = encode_prompts(tokenizer, prompts, **(chat_options or {}))
    stops = generate_kwargs.pop("stop_tokens", None)
    stops = [tokenizer.eos_id] if stops is None else list(stops)
    outs = generate(model, ids, stop_tokens=stops, **generate_kwargs)
    return [tokenizer.decode(o[:-1] if o and o[-1] in stops else o) for o in outs]
