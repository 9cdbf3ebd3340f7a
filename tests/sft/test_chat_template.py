"""Chat templates render exactly the documented layout, and the loss mask covers exactly the replies.

The layouts below are written out by hand with a character tokenizer (one id per character), so
each expected token is readable as the text it stands for.
"""

import pytest

from megatron_ds.data import chat
from megatron_ds.data.chat import ConversationError, render, render_prompt, render_prompt_response

BOS, EOS = 1, 2


class CharTokenizer:
    """One token per character (its code point); BOS 1 and EOS 2 as the special ids."""

    def __init__(self, bos=BOS):
        self.bos, self.eod = bos, EOS

    def encode(self, text):
        return [ord(c) for c in text]


def layout(*pieces):
    """(ids, mask) from pieces: ("text", counts) -> its characters; BOS / EOS ints -> themselves."""
    ids, mask = [], []
    for piece, counts in pieces:
        part = [piece] if isinstance(piece, int) else [ord(c) for c in piece]
        ids += part
        mask += [int(counts)] * len(part)
    return ids, mask


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_deepseek_layout_and_mask():
    # <bos>{system}\n\nUser: {user}\n\nAssistant: {reply}<eos>User: ...; mask on " {reply}" and <eos>.
    expected = layout((BOS, 0), ("Be brief.\n\nUser: hi\n\nAssistant:", 0), (" yo", 1), (EOS, 1),
                      ("User: 2+2?\n\nAssistant:", 0), (" 4", 1), (EOS, 1))
    assert render(CONVERSATION, CharTokenizer()) == expected


def test_deepseek_without_bos_token_starts_with_the_text():
    expected = layout(("User: hi\n\nAssistant:", 0), (" yo", 1), (EOS, 1))
    assert render(CONVERSATION[1:3], CharTokenizer(bos=None)) == expected


def test_chatml_layout_and_mask():
    # No BOS; "{reply}<|im_end|>" counts, the newline after it does not.
    expected = layout(("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                       "<|im_start|>assistant\n", 0), ("yo<|im_end|>", 1),
                      ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", 0), ("4<|im_end|>", 1),
                      ("\n", 0))
    assert render(CONVERSATION, CharTokenizer(), "chatml") == expected


def test_prompt_response_pair_equals_the_two_message_conversation():
    tok = CharTokenizer()
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert render_prompt_response("hi", "yo", tok) == render(conv, tok)
    assert chat.messages_from_record({"prompt": "hi", "response": "yo"}) == conv


def test_prompt_response_with_history_counts_only_the_last_reply():
    tok = CharTokenizer()
    ids, mask = render_prompt_response(CONVERSATION[:4], "4", tok)
    full_ids, full_mask = render(CONVERSATION, tok)
    assert ids == full_ids
    expected_mask = layout((BOS, 0), ("Be brief.\n\nUser: hi\n\nAssistant: yo", 0), (EOS, 0),
                           ("User: 2+2?\n\nAssistant:", 0), (" 4", 1), (EOS, 1))[1]
    assert mask == expected_mask and full_mask != mask


@pytest.mark.parametrize("template", ["deepseek", "chatml"])
def test_generation_prompt_is_the_unmasked_prefix_of_the_pair(template):
    # DPO and generation rely on it: the prompt's ids are exactly the pair's ids before the reply.
    tok = CharTokenizer()
    ids, mask = render_prompt_response(CONVERSATION[:4], "4", tok, template)
    prompt = render_prompt(CONVERSATION[:4], tok, template)
    assert ids[:len(prompt)] == prompt and mask.index(1) == len(prompt)


def test_real_tokenizer_decodes_back_to_the_documented_text(chat_tokenizer):
    from megatron_ds.data.tokenizer import build_tokenizer

    tok = build_tokenizer(chat_tokenizer)
    ids, mask = render(CONVERSATION, tok)
    bos, eos = tok.decode([tok.bos]), tok.decode([tok.eod])
    assert tok.decode(ids) == f"{bos}Be brief.\n\nUser: hi\n\nAssistant: yo{eos}User: 2+2?\n\nAssistant: 4{eos}"
    # The counted tokens decode to exactly the replies and their <eos>.
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == f" yo{eos} 4{eos}"


@pytest.mark.parametrize("messages,reason", [
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}], "unknown role 'bot'"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "yo"}], "message 1 (user) has empty content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}], "message 2 (assistant) has empty content"),
    ([{"role": "assistant", "content": "yo"}], "message 1 (assistant) is out of order: expected a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 2 (user) is out of order: expected an assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first message may be one"),
    ([{"role": "user", "content": 3}], "message 1 (user) has no string \"content\""),
    ([], "non-empty list"),
    ("hello", "non-empty list"),
])
def test_invalid_conversation_is_a_one_line_reason(messages, reason):
    with pytest.raises(ConversationError) as e:
        render(messages, CharTokenizer())
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_unknown_template_names_the_flag_and_the_choices():
    with pytest.raises(chat.DataError, match="--chat-template 'llama9' is not known; choose one of deepseek, chatml"):
        render(CONVERSATION, CharTokenizer(), "llama9")


@pytest.mark.parametrize("template", ["deepseek", "chatml"])
def test_prompt_text_is_what_render_prompt_tokenizes(template):
    # --generate-prompt after SFT is wrapped with it: the text form of the generation prompt, less BOS.
    tok = CharTokenizer()
    prompt = CONVERSATION[:2]
    ids = render_prompt(prompt, tok, template)
    assert [ord(c) for c in chat.prompt_text(prompt, template)] == [i for i in ids if i != BOS]
    assert chat.prompt_text("hi") == "User: hi\n\nAssistant:"
    with pytest.raises(ConversationError, match="no plain-text form"):
        chat.prompt_text(CONVERSATION[:4], template)
