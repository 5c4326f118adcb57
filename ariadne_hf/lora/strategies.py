"""The grouped generation strategy: one `generate` per routed adapter group (the batched strategy is one plain
`generate` under the call's per-row plan, in `AriadneRoutedModel.generate`)."""

from __future__ import annotations

import torch
from transformers.utils import ModelOutput

from .plans import use_plan


def generate_grouped(backbone, adapters: list[int], input_ids, attention_mask, kwargs: dict, plan_for):
    """Rows grouped by routed adapter; one `generate` per group; outputs re-assembled in input order.

    `adapters[i]` is row i's adapter index (-1 = none); `plan_for(adapters)` builds one group's `SequencePlan`.

    Each group's adapter is selected through this call's own plan (no `set_adapter`, no shared state), so
    concurrent calls cannot race. Sequences of groups that stopped early are right-padded with the pad token,
    exactly as a batched generate pads finished rows. With `return_dict_in_generate=True`, `sequences` (and
    `sequences_scores`) are merged; per-step fields (scores, logits, attentions) are not and are set to None.
    """
    groups: dict[int, list[int]] = {}
    for row, adapter in enumerate(adapters):
        groups.setdefault(adapter, []).append(row)
    if len(groups) == 1:
        with use_plan(plan_for(adapters)):
            return backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    outputs, rows_per_group = [], []
    for adapter, rows in groups.items():
        index = torch.tensor(rows, device=input_ids.device)
        with use_plan(plan_for([adapter] * len(rows))):
            outputs.append(
                backbone.generate(input_ids=input_ids[index], attention_mask=attention_mask[index], **kwargs)
            )
        rows_per_group.append(rows)
    return _merge_group_outputs(outputs, rows_per_group, input_ids.shape[0], _pad_token_id(backbone, kwargs))


def _pad_token_id(backbone, kwargs: dict) -> int:
    config = kwargs.get("generation_config") or backbone.generation_config
    pad = kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))
    if pad is None:
        eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    return 0 if pad is None else int(pad)


def _merge_group_outputs(outputs: list, rows_per_group: list[list[int]], batch: int, pad_token_id: int):
    sequences = [o.sequences if isinstance(o, ModelOutput) else o for o in outputs]
    per_row = sequences[0].shape[0] // len(rows_per_group[0])  # num_return_sequences
    length = max(s.shape[1] for s in sequences)
    merged = sequences[0].new_full((batch * per_row, length), pad_token_id)  # [B * n, L]
    for seq, rows in zip(sequences, rows_per_group, strict=True):
        target = torch.tensor([r * per_row + j for r in rows for j in range(per_row)], device=seq.device)
        merged[target, : seq.shape[1]] = seq
    if not isinstance(outputs[0], ModelOutput):
        return merged
    result = outputs[0].__class__(sequences=merged)
    if getattr(outputs[0], "sequences_scores", None) is not None:
        scores = outputs[0].sequences_scores.new_zeros(batch * per_row)
        for out, rows in zip(outputs, rows_per_group, strict=True):
            target = torch.tensor([r * per_row + j for r in rows for j in range(per_row)], device=scores.device)
            scores[target] = out.sequences_scores
        result.sequences_scores = scores
    return result
