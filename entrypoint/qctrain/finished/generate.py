"""Replies of a trained model: greedy generation through the adapter's chat template, and the base model's reply
beside it (the adapter disabled), as the card and `qctrain generate --compare-base` show them; or, for a dpo/kto run,
the reply of the adapter it continued (`--compare-parent`)."""

import torch

from qctrain.card import Sample


@torch.no_grad()
def generate_replies(model, tokenizer, conversations: list[list[dict] | dict], max_new_tokens: int = 48,
                     chat_template: str | None = None, tools: list[dict] | None = None) -> list[str]:
    """Greedy replies, all conversations in one left-padded generate call (bench/eval_samples.py: the same replies
    as one call each, several times faster); a conversation is a list of messages or {"messages", "tools"} (tools:
    for all of them otherwise); chat_template: the one to render with instead of the tokenizer's."""
    if not conversations:
        return []
    texts = []
    for conversation in conversations:
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        these_tools = conversation.get("tools") if isinstance(conversation, dict) else tools
        texts.append(tokenizer.apply_chat_template(messages, tools=these_tools or None, chat_template=chat_template,
                                                   add_generation_prompt=True, tokenize=False))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from each row's last real token
    try:
        inputs = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt").to(model.device)
    finally:
        tokenizer.padding_side = side
    model.eval()
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def before_after_samples(model, tokenizer, conversations: list[list[dict] | dict], max_new_tokens: int = 48,
                         chat_template: str | None = None, tools: list[dict] | None = None) -> list[Sample]:
    """Greedy replies to each conversation with the adapter, and with it disabled (the base model)."""
    tuned = generate_replies(model, tokenizer, conversations, max_new_tokens, chat_template, tools)
    base: list[str | None] = [None] * len(conversations)
    if conversations and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base = list(generate_replies(model, tokenizer, conversations, max_new_tokens, chat_template, tools))
    prompts = [(c["messages"] if isinstance(c, dict) else c)[-1]["content"] for c in conversations]
    return [Sample(p, b, t) for p, b, t in zip(prompts, base, tuned, strict=True)]


def parent_samples(model, tokenizer, conversations: list[list[dict] | dict], parent_dir, max_new_tokens: int = 48,
                   tools: list[dict] | None = None) -> list[Sample]:
    """Greedy replies with the trained adapter, and with the adapter it continued loaded beside it on the same base
    (Sample.base holds the parent's reply)."""
    tuned = generate_replies(model, tokenizer, conversations, max_new_tokens, tools=tools)
    active = model.active_adapter
    model.load_adapter(str(parent_dir), adapter_name="parent")
    model.set_adapter("parent")
    try:
        before = generate_replies(model, tokenizer, conversations, max_new_tokens, tools=tools)
    finally:
        model.set_adapter(active)
    prompts = [(c["messages"] if isinstance(c, dict) else c)[-1]["content"] for c in conversations]
    return [Sample(p, b, t) for p, b, t in zip(prompts, before, tuned, strict=True)]
