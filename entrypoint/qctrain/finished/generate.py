"""Replies of a trained model: greedy generation through the adapter's chat template, and the base model's reply
beside it (the adapter disabled), as the card and `qctrain generate --compare-base` show them."""

import torch

from qctrain.card import Sample


@torch.no_grad()
def generate_replies(model, tokenizer, conversations: list[list[dict] | dict], max_new_tokens: int = 48,
                     chat_template: str | None = None, tools: list[dict] | None = None) -> list[str]:
    """Greedy replies; a conversation is a list of messages or {"messages", "tools"} (tools: for all of them
    otherwise); chat_template: the one to render with instead of the tokenizer's."""
    model.eval()
    replies = []
    for conversation in conversations:
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        these_tools = conversation.get("tools") if isinstance(conversation, dict) else tools
        inputs = tokenizer.apply_chat_template(messages, tools=these_tools or None, chat_template=chat_template,
                                               add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return replies


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
