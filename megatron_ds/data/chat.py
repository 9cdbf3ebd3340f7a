"""Chat templates: a conversation -> token ids + a loss mask (1 on the tokens the model learns).

Shared by SFT (megatron_ds/data/sft_dataset.py, tools/preprocess_sft.py) and DPO. The API:

    render(messages, tokenizer, template="deepseek") -> (token_ids, loss_mask)
    render_prompt_response(prompt, response, tokenizer, template="deepseek") -> (token_ids, loss_mask)
    render_prompt(prompt, tokenizer, template="deepseek") -> token_ids   # ends with the generation cue
    prompt_text(prompt, template="deepseek") -> str                       # the same as text, without BOS
    messages_from_record(record) -> messages       # a jsonl record: {"messages": [...]} or {"prompt", "response"}
    validate_messages(messages)                    # raises ConversationError (a DataError) with the reason

A message is ``{"role": "system" | "user" | "assistant", "content": str}``. A conversation is an
optional system message first, then user and assistant turns alternating, starting with a user turn,
with at least one assistant turn; no content is empty (or only whitespace).

The default template is DeepSeek LLM's chat format (its Hugging Face chat_template):

    <bos>{system}\\n\\nUser: {user}\\n\\nAssistant: {reply}<eos>User: {user}\\n\\nAssistant: {reply}<eos>

BOS only when the tokenizer has one. Only the assistant replies and the <eos> closing each count in
the loss. The text is tokenized in segments so the mask boundary is exact: everything up to and
including "Assistant:" is one prompt segment, then " {reply}" (with the separating space, which a
byte-level BPE merges into the reply's first word, as it would when the model generates after the
"Assistant:" cue) and the <eos> id are the assistant segment.

"chatml" is the ChatML layout (no BOS):

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n{reply}<|im_end|>\\n

where "{reply}<|im_end|>" counts in the loss (<|im_end|> is what stops generation; it is one token
when the tokenizer has it as an added token, else its characters). The newline after it does not count.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ds.data.errors import DataError

ROLES = ("system", "user", "assistant")


class ConversationError(DataError):
    """One conversation is unusable; the message is the reason, without file or line (the caller adds them)."""


@dataclass(frozen=True)
class ChatTemplate:
    """How each role's text is laid out. Strings hold "{content}"; END is the tokenizer's end-of-document id."""

    name: str
    bos: bool  # prepend the tokenizer's BOS (when it has one) to a conversation
    system: str  # the whole system message, in the prompt
    user: str  # the whole user turn, in the prompt
    assistant_prefix: str  # the text before a reply, in the prompt (e.g. "Assistant:")
    reply: str  # the reply itself, counted in the loss
    reply_end_eod: bool  # close each reply with the tokenizer's end-of-document id (counted in the loss)
    after_reply: str  # text after the reply's end, not counted (e.g. ChatML's newline)


TEMPLATES = {
    "deepseek": ChatTemplate(name="deepseek", bos=True, system="{content}\n\n", user="User: {content}\n\n",
                             assistant_prefix="Assistant:", reply=" {content}", reply_end_eod=True, after_reply=""),
    "chatml": ChatTemplate(name="chatml", bos=False, system="<|im_start|>system\n{content}<|im_end|>\n",
                           user="<|im_start|>user\n{content}<|im_end|>\n", assistant_prefix="<|im_start|>assistant\n",
                           reply="{content}<|im_end|>", reply_end_eod=False, after_reply="\n"),
}


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """The template named `name` (or `name` itself when it already is one)."""
    if isinstance(name, ChatTemplate):
        return name
    if name not in TEMPLATES:
        raise DataError(f"--chat-template {name!r} is not known; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def validate_messages(messages) -> None:
    """Raise ConversationError saying what is wrong with `messages`, if anything (rules in the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("\"messages\" must be a non-empty list of {\"role\", \"content\"} objects")
    expected = "user"
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ConversationError(f"message {i} is not an object with a string \"role\"")
        role, content = m["role"], m.get("content")
        if role not in ROLES:
            raise ConversationError(f"message {i} has unknown role {role!r} (expected system, user or assistant)")
        if not isinstance(content, str):
            raise ConversationError(f"message {i} ({role}) has no string \"content\"")
        if not content.strip():
            raise ConversationError(f"message {i} ({role}) has empty content")
        if role == "system":
            if i != 1:
                raise ConversationError(f"message {i} is a system message; only the first message may be one")
            continue
        if role != expected:
            article = "an" if expected == "assistant" else "a"
            raise ConversationError(f"message {i} ({role}) is out of order: expected {article} {expected} turn "
                                    f"(turns alternate user, assistant, starting with user)")
        expected = "assistant" if role == "user" else "user"
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("the conversation has no assistant turn, so nothing to learn from")


def _segments(messages, template: ChatTemplate):
    """The conversation as (text, is_reply) pieces; consecutive prompt texts are joined."""
    pieces: list[tuple[str, bool]] = []
    prompt = ""
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "assistant":
            pieces.append((prompt + template.assistant_prefix, False))
            pieces.append((template.reply.format(content=content), True))
            prompt = template.after_reply
        else:
            prompt += getattr(template, role).format(content=content)
    if prompt:
        pieces.append((prompt, False))
    return pieces


def _render(messages, tokenizer, template: ChatTemplate, generation_cue: bool = False, last_reply_only: bool = False):
    ids: list[int] = []
    mask: list[int] = []
    if template.bos and getattr(tokenizer, "bos", None) is not None:
        ids.append(tokenizer.bos)
        mask.append(0)
    pieces = _segments(messages, template)
    if generation_cue:
        text = pieces.pop()[0] if pieces and not pieces[-1][1] else ""
        pieces.append((text + template.assistant_prefix, False))
    last = max((i for i, (_, is_reply) in enumerate(pieces) if is_reply), default=-1)
    for i, (text, is_reply) in enumerate(pieces):
        if not text:
            continue
        part = tokenizer.encode(text)
        if is_reply and template.reply_end_eod:
            part = part + [tokenizer.eod]
        counts = is_reply and (i == last or not last_reply_only)
        ids.extend(part)
        mask.extend([int(counts)] * len(part))
    return ids, mask


def render(messages, tokenizer, template: str | ChatTemplate = "deepseek") -> tuple[list[int], list[int]]:
    """(token_ids, loss_mask) of one conversation; loss_mask[i] is 1 when token i is part of an
    assistant reply (including the token closing it). The tokenizer needs encode(text), eod and bos
    (None when it has none), as megatron_ds.data.tokenizer.Tokenizer has. Raises ConversationError."""
    validate_messages(messages)
    return _render(messages, tokenizer, get_template(template))


def _prompt_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return list(prompt)
    raise ConversationError("\"prompt\" must be a string or a list of messages")


def render_prompt_response(prompt, response: str, tokenizer,
                           template: str | ChatTemplate = "deepseek") -> tuple[list[int], list[int]]:
    """(token_ids, loss_mask) of a prompt (a user message as a string, or a list of messages ending
    with a user turn; earlier assistant turns there are context, not counted) answered by `response`;
    the mask is 1 on the response and its closing token only.
    For DPO: the same prompt with the chosen and the rejected response gives two sequences sharing
    the prompt's tokens (the mask's first 1 is where they start to differ)."""
    messages = _prompt_messages(prompt)
    if not isinstance(response, str):
        raise ConversationError("\"response\" must be a string")
    messages.append({"role": "assistant", "content": response})
    validate_messages(messages)
    return _render(messages, tokenizer, get_template(template), last_reply_only=True)


def render_prompt(prompt, tokenizer, template: str | ChatTemplate = "deepseek") -> list[int]:
    """Token ids of a prompt (string or messages ending with a user turn) followed by the cue after
    which the model writes its reply (DeepSeek: "...\\n\\nAssistant:"), for generation."""
    messages = _prompt_messages(prompt)
    # Validate as if a reply followed, which checks roles, order and content of the prompt.
    validate_messages(messages + [{"role": "assistant", "content": "x"}])
    ids, _ = _render(messages, tokenizer, get_template(template), generation_cue=True)
    return ids


def prompt_text(prompt, template: str | ChatTemplate = "deepseek") -> str:
    """The text ``render_prompt`` tokenizes, without BOS, for a prompt with no assistant turns (a string,
    or a system and a user message): e.g. DeepSeek's "User: {prompt}\\n\\nAssistant:". Used to wrap
    --generate-prompt after SFT; earlier replies would need the tokenizer's <eos> id, so they are refused."""
    messages = _prompt_messages(prompt)
    validate_messages(messages + [{"role": "assistant", "content": "x"}])
    if any(m["role"] == "assistant" for m in messages):
        raise ConversationError("a prompt with assistant turns has no plain-text form; use render_prompt")
    t = get_template(template)
    return "".join(text for text, _ in _segments(messages, t)) + t.assistant_prefix


def messages_from_record(record) -> list[dict]:
    """The messages of one jsonl record: {"messages": [...]} or {"prompt": str | messages, "response": str}.
    Raises ConversationError when the record is neither."""
    if isinstance(record, dict) and "messages" in record:
        return record["messages"]
    if isinstance(record, dict) and "prompt" in record and "response" in record:
        if not isinstance(record["response"], str):
            raise ConversationError("\"response\" must be a string")
        return _prompt_messages(record["prompt"]) + [{"role": "assistant", "content": record["response"]}]
    raise ConversationError("the record has neither \"messages\" nor \"prompt\" and \"response\"")
