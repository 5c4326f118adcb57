"""Resident adapter slots (max_resident_adapters): on-demand loads, LRU eviction, pins, same outputs."""

import pytest
import torch

from ariadne_hf import BASE_ADAPTER, AriadneRoutedModel
from ariadne_hf.lora.residency import ResidencyError, SlotTable

GREEDY = {"max_new_tokens": 4, "do_sample": False}


@pytest.fixture(scope="module")
def bundle_dir(tiny_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("bundle")
    tiny_model.save_pretrained(directory)
    return directory


def test_two_slots_give_the_same_outputs_and_load_on_demand(bundle_dir, tiny_model, mixed_batch):
    _, labels, batch = mixed_batch
    model = AriadneRoutedModel.from_pretrained(bundle_dir, max_resident_adapters=2)
    assert model.lora.resident() == ["math", "poetry"] and model.lora.memory_bytes() < tiny_model.lora.memory_bytes()
    for names in (["code"] * 6, ["math", "code"] * 3, ["poetry", BASE_ADAPTER] * 3):
        torch.testing.assert_close(model(**batch, adapter_names=names).logits,
                                   tiny_model(**batch, adapter_names=names).logits, rtol=1e-5, atol=1e-5)
    stats = model.lora.stats.as_dict()
    # code evicts math (least recently used), math evicts poetry, poetry evicts math (code was used after it)
    assert stats["loads"] == 3 and stats["evictions"] == 3 and stats["bytes_loaded"] > 0
    assert sorted(model.lora.resident()) == ["code", "poetry"]
    hits = stats["hits"]
    model(**batch, adapter_names=["poetry"] * 6)
    assert model.lora.stats.hits == hits + 1 and model.lora.stats.loads == 3


def test_a_call_needing_more_adapters_than_slots_is_a_clear_error(bundle_dir, mixed_batch):
    _, labels, batch = mixed_batch
    model = AriadneRoutedModel.from_pretrained(bundle_dir, max_resident_adapters=2)
    with pytest.raises(ResidencyError, match="needs 3 adapters resident at once.*max_resident_adapters=2"):
        model.generate(**batch, adapter_names=labels, **GREEDY)
    grouped = model.generate(**batch, adapter_names=labels, generation_strategy="grouped", **GREEDY)  # one at a time
    assert grouped.shape[0] == 6


def test_token_routing_loads_rerouted_adapters_at_their_step(bundle_dir, tiny_model, mixed_batch):
    _, _, batch = mixed_batch
    kwargs = dict(routing="token", routing_top_k=1, reroute_every=1, max_new_tokens=6, do_sample=False,
                  return_dict_in_generate=True)
    rows = slice(0, 2)  # the math prompts: routes stay within 2 adapters
    one = {k: v[rows] for k, v in batch.items()}
    model = AriadneRoutedModel.from_pretrained(bundle_dir, max_resident_adapters=2)
    expected = tiny_model.generate(**one, **kwargs)
    ours = model.generate(**one, **kwargs)
    assert torch.equal(ours.sequences, expected.sequences)
    assert not any(model.lora.slots.pins.values())  # every pin released when the call ended


def test_pinned_adapters_are_never_evicted():
    table = SlotTable(2)
    for _ in range(3):
        table.append_adapter()
    mapping, loads = table.acquire({2})  # adapter 2 evicts the LRU adapter 0
    assert loads == [(2, mapping[2], 0)]
    table.acquire({1})
    with pytest.raises(ResidencyError, match="plus 2 pinned by running calls"):
        table.acquire({0})
    table.release({1})
    _, loads = table.acquire({0})
    assert loads[0][2] == 1  # the unpinned one was evicted, never 2


def test_saving_copies_adapters_that_are_not_resident(bundle_dir, tmp_path):
    model = AriadneRoutedModel.from_pretrained(bundle_dir, max_resident_adapters=1)
    model.save_pretrained(tmp_path / "again")
    again = AriadneRoutedModel.from_pretrained(tmp_path / "again")
    assert again.adapter_names == model.adapter_names and again.config.max_resident_adapters == 1


def test_ood_tables_are_optional_so_routing_reads_only_centroids(tiny_assets):
    model = AriadneRoutedModel.from_adapters(tiny_assets["backbone"], tiny_assets["adapters"], tiny_assets["train"],
                                             ood=False, progress=False)
    assert not model.router.has_ood() and model.route(["add seven plus three"]).adapter_names == ["math"]
    with pytest.raises(ValueError, match="reject='auto' needs the out-of-distribution score"):
        AriadneRoutedModel.from_adapters(tiny_assets["backbone"], tiny_assets["adapters"], tiny_assets["train"],
                                         ood=False, reject="auto", progress=False)
