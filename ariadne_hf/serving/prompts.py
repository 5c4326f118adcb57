"""Requests -> token ids: chat templating, tokenization, context-length checks, left padding.

Shared by every serving mode, so a chat request is tokenized (and therefore routed) the same way by the server,
the gateway and the Ray ingress. Tokenization never pads or truncates, so the fast tokenizer's settings are never
mutated (safe while another thread decodes with it).
"""

from __future__ import annotations

import torch

from .protocol import OpenAIError


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat conversation with the generation prompt, as `ariadne generate --chat` builds them."""
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(400, "This bundle's tokenizer has no chat template, so /v1/chat/completions cannot format "
                               "messages; use /v1/completions with a plain prompt.", code="no_chat_template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a plain completion prompt (with the tokenizer's special tokens, e.g. BOS)."""
    return list(tokenizer(text)["input_ids"])


def context_length(model_config, tokenizer) -> int:
    """The backbone's context window: max_position_embeddings, else the tokenizer's model_max_length."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**8 else 2048


def check_length(prompt_tokens: int, max_tokens: int, limit: int) -> None:
    """400 when the prompt plus the requested completion does not fit the context window."""
    if prompt_tokens == 0:
        raise OpenAIError(400, "The prompt is empty after tokenization.", param="prompt", code="empty_prompt")
    if prompt_tokens + max_tokens > limit:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). "
            "Shorten the prompt or lower max_tokens.",
            param="prompt", code="context_length_exceeded",
        )


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, T] and attention mask [B, T] of token-id lists."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def pad_id_of(tokenizer, generation_config=None) -> int:
    """Padding id: the tokenizer's pad token, else the generation config's, else EOS, else 0."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(generation_config, "pad_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0
