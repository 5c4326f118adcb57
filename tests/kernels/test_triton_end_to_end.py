"""The whole model on the Triton kernels (CPU, Triton interpreter): the same routes and tokens as the torch path."""

import importlib

import pytest
import torch

pytest.importorskip("triton")


def test_env_triton_changes_nothing_in_routes_or_generation(tiny_model, mixed_batch, monkeypatch):
    _, _, batch = mixed_batch
    kwargs = dict(routing="token", routing_top_k=2, reroute_every=1, max_new_tokens=4, do_sample=False,
                  return_dict_in_generate=True)
    torch_routes = tiny_model.route(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch_tokens = tiny_model.generate(**batch, **kwargs)
    monkeypatch.setenv("ARIADNE_KERNEL", "triton")
    epd_module = importlib.import_module("ariadne_hf.kernels.pool_distance_triton")
    mixture_module = importlib.import_module("ariadne_hf.kernels.mixture_triton")

    calls = {"route": 0, "incremental": 0, "mixture": 0}

    def counting(module, name, key):
        original = getattr(module, name)

        def wrapper(*args, **kw):
            calls[key] += 1
            return original(*args, **kw)

        monkeypatch.setattr(module, name, wrapper)

    counting(epd_module, "embed_pool_distance_triton", "route")
    counting(epd_module, "incremental_pool_distance_triton", "incremental")
    counting(mixture_module, "mixture_lora_triton", "mixture")
    triton_routes = tiny_model.route(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert triton_routes.adapter_names == torch_routes.adapter_names
    torch.testing.assert_close(triton_routes.scores, torch_routes.scores, rtol=1e-4, atol=1e-5)
    triton_tokens = tiny_model.generate(**batch, **kwargs)
    assert torch.equal(triton_tokens.sequences, torch_tokens.sequences)
    for a, b in zip(triton_tokens.token_routes.indices, torch_tokens.token_routes.indices, strict=True):
        assert torch.equal(a, b)
    assert all(count > 0 for count in calls.values()), calls  # the Triton kernels really ran
