"""Routed generation equals PEFT with the routed adapters, and each prompt alone with its adapter."""

import threading

import pytest
import torch

from ariadne_hf import BASE_ADAPTER

GREEDY = {"max_new_tokens": 6, "do_sample": False}


def _alone(peft_oracle, tokenizer, prompt, adapter, **kwargs):
    """The prompt run alone on the independent PEFT model with `adapter` active (no routing involved)."""
    batch = tokenizer([prompt], return_tensors="pt")
    if adapter == BASE_ADAPTER:
        with peft_oracle.disable_adapter():
            return peft_oracle.generate(**batch, **kwargs)
    peft_oracle.set_adapter(adapter)
    return peft_oracle.generate(**batch, **kwargs)


def _strip_pad(seq, pad=0):
    return [t for t in seq.tolist() if t != pad]


def test_adapters_really_change_outputs(tiny_model, mixed_batch):
    _, _, batch = mixed_batch
    logits = {name: tiny_model(**batch, adapter_names=[name] * 6).logits for name in tiny_model.adapter_names}
    logits[BASE_ADAPTER] = tiny_model(**batch, adapter_names=[BASE_ADAPTER] * 6).logits
    names = list(logits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (logits[a] - logits[b]).abs().max() > 1e-2, (a, b)


def test_routed_batch_equals_peft_mixed_batch_and_each_prompt_alone(tiny_model, peft_oracle, mixed_batch):
    prompts, labels, batch = mixed_batch
    out = tiny_model.generate(**batch, **GREEDY, return_dict_in_generate=True)
    assert out.routes.adapter_names == labels
    peft_out = peft_oracle.generate(**batch, adapter_names=labels, **GREEDY)
    assert torch.equal(out.sequences, peft_out)
    width = batch["input_ids"].shape[1]
    for row, (prompt, label) in enumerate(zip(prompts, labels, strict=True)):
        alone = _alone(peft_oracle, tiny_model.tokenizer, prompt, label, **GREEDY)
        assert _strip_pad(out.sequences[row, width:]) == _strip_pad(alone[0, -6:]), (row, label)


@pytest.mark.parametrize("strategy", ["batched", "grouped"])
def test_beams_and_multiple_return_sequences_equal_each_prompt_alone_in_peft(tiny_model, peft_oracle, mixed_batch, strategy):
    prompts, labels, batch = mixed_batch
    kwargs = {"max_new_tokens": 5, "do_sample": False, "num_beams": 3, "num_return_sequences": 2}
    out = tiny_model.generate(**batch, generation_strategy=strategy, **kwargs)
    assert out.shape[0] == len(prompts) * 2
    for row, (prompt, label) in enumerate(zip(prompts, labels, strict=True)):
        alone = _alone(peft_oracle, tiny_model.tokenizer, prompt, label, **kwargs)  # [2, L]
        for j in range(2):
            assert _strip_pad(out[2 * row + j, batch["input_ids"].shape[1]:]) == _strip_pad(alone[j, -5:])


def test_num_return_sequences_with_sampling_matches_peft_on_expanded_batch(tiny_model, peft_oracle, mixed_batch):
    _, labels, batch = mixed_batch
    kwargs = {"max_new_tokens": 5, "do_sample": True, "top_k": 0, "num_return_sequences": 3}
    torch.manual_seed(123)
    ours = tiny_model.generate(**batch, **kwargs)
    expanded = {k: v.repeat_interleave(3, dim=0) for k, v in batch.items()}
    torch.manual_seed(123)
    peft = peft_oracle.generate(**expanded, adapter_names=[n for n in labels for _ in range(3)],
                                **{**kwargs, "num_return_sequences": 1})
    assert torch.equal(ours, peft)


def test_grouped_equals_batched_greedy(tiny_model, mixed_batch):
    _, _, batch = mixed_batch
    batched = tiny_model.generate(**batch, **GREEDY, generation_strategy="batched")
    grouped = tiny_model.generate(**batch, **GREEDY, generation_strategy="grouped")
    assert torch.equal(batched, grouped)


def test_forward_routes_and_returns_routed_logits(tiny_model, peft_oracle, mixed_batch):
    _, labels, batch = mixed_batch
    out = tiny_model(**batch)
    assert out.routes.adapter_names == labels
    expected = peft_oracle(**batch, adapter_names=labels).logits
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-5)


def test_explicit_adapter_names_override_routing_and_reach_the_callback(tiny_model, peft_oracle, mixed_batch):
    _, labels, batch = mixed_batch
    forced = ["code", BASE_ADAPTER, "math", "poetry", "code", BASE_ADAPTER]
    seen = []
    out = tiny_model.generate(**batch, **GREEDY, adapter_names=forced, on_route=seen.append)
    assert seen[0].adapter_names == forced and seen[0].reasons == ["override"] * 6
    assert torch.equal(out, peft_oracle.generate(**batch, adapter_names=forced, **GREEDY))
    with pytest.raises(ValueError, match="Unknown adapter name 'nope'"):
        tiny_model.generate(**batch, **GREEDY, adapter_names=["nope"] * 6)
    with pytest.raises(ValueError, match="2 entries but the batch has 6 rows"):
        tiny_model.generate(**batch, **GREEDY, adapter_names=["math", "code"])


def test_concurrent_generate_calls_do_not_share_routes(tiny_model, tiny_assets):
    tokenizer = tiny_model.tokenizer
    jobs = {
        "math": tokenizer(tiny_assets["test"]["math"][:3], return_tensors="pt", padding=True),
        "poetry": tokenizer(tiny_assets["test"]["poetry"][:3], return_tensors="pt", padding=True),
        "mixed": tokenizer([tiny_assets["test"][n][4] for n in ("code", "math", "poetry")], return_tensors="pt",
                           padding=True),
    }
    kwargs = {"max_new_tokens": 12, "do_sample": False}
    alone = {k: tiny_model.generate(**b, **kwargs) for k, b in jobs.items()}
    alone_grouped = {k: tiny_model.generate(**b, generation_strategy="grouped", **kwargs) for k, b in jobs.items()}
    results, errors = {}, []

    def run(key, strategy, repeat):
        try:
            for i in range(repeat):
                results[(key, strategy, i)] = tiny_model.generate(**jobs[key], generation_strategy=strategy, **kwargs)
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(k, s, 3)) for k in jobs for s in ("batched", "grouped")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (key, strategy, _), value in results.items():
        assert torch.equal(value, alone[key] if strategy == "batched" else alone_grouped[key]), (key, strategy)
