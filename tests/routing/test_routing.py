"""Routing: accuracy, padding invariance, base fallbacks, the oracle, k-means, adding/removing adapters."""

import copy

import torch
import torch.nn.functional as F

from ariadne_hf import BASE_ADAPTER, AriadneRoutedModel
from ariadne_hf.routing.centroids import kmeans


def test_routes_held_out_prompts_to_their_adapter(tiny_assets, tiny_model):
    for name, prompts in tiny_assets["test"].items():
        decision = tiny_model.route(prompts)
        accuracy = sum(n == name for n in decision.adapter_names) / len(prompts)
        assert accuracy >= 0.9, (name, decision.adapter_names)
        assert decision.scores.shape == (len(prompts), 3)
        assert decision.scores.dtype == torch.float32


def test_scores_match_an_independent_per_row_oracle(tiny_model, mixed_batch):
    _, _, batch = mixed_batch
    decision = tiny_model.route(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    table = tiny_model.get_input_embeddings().weight.detach().float()
    router = tiny_model.router
    special = set(tiny_model.tokenizer.all_special_ids)
    for row in range(batch["input_ids"].shape[0]):
        ids = [i for i, m in zip(batch["input_ids"][row].tolist(), batch["attention_mask"][row].tolist(), strict=True)
               if m and i not in special]
        x = router.transform @ (table[ids].mean(0) - router.center)  # whitened, as built by default
        for a in range(3):
            sims = [F.cosine_similarity(x, c, dim=0) for c, owner in zip(router.centroids, router.centroid_adapter,
                                                                        strict=True) if owner == a]
            assert abs(float(max(sims)) - float(decision.scores[row, a])) < 1e-5


def test_left_right_and_no_padding_give_identical_routes(tiny_model, tiny_assets):
    tokenizer = copy.deepcopy(tiny_model.tokenizer)
    prompts = [p for items in tiny_assets["test"].values() for p in items[:3]]
    decisions = []
    for side in ("left", "right"):
        tokenizer.padding_side = side
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        decisions.append(tiny_model.route(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    alone = [tiny_model.route(input_ids=tokenizer([p], return_tensors="pt")["input_ids"]) for p in prompts]
    assert decisions[0].adapter_names == decisions[1].adapter_names == [d.adapter_names[0] for d in alone]
    torch.testing.assert_close(decisions[0].scores, decisions[1].scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(decisions[0].scores, torch.cat([d.scores for d in alone]), rtol=0, atol=1e-6)


def test_empty_rows_and_rows_below_threshold_go_to_base(tiny_model, tiny_assets):
    ids = torch.tensor([[0, 0, 0, 1], [1, 10, 11, 12], [0, 0, 0, 0]])  # only <s>; real words; all padding
    mask = torch.tensor([[0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    decision = tiny_model.route(input_ids=ids, attention_mask=mask)
    assert decision.adapter_names[0] == BASE_ADAPTER and decision.reasons[0] == "empty"
    assert decision.adapter_names[2] == BASE_ADAPTER and decision.adapter_indices[2] == -1
    assert decision.adapter_names[1] != BASE_ADAPTER
    assert tiny_model.route([""]).adapter_names == [BASE_ADAPTER]
    prompt = tiny_assets["test"]["math"][0]
    best = float(tiny_model.route([prompt]).scores.max())
    assert tiny_model.route([prompt], reject_threshold=best + 1e-3).adapter_names == [BASE_ADAPTER]
    assert tiny_model.route([prompt], reject_threshold=best - 1e-3).adapter_names == ["math"]


def test_kmeans_is_seeded_and_clips_k():
    points = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    a, b = kmeans(points, 5, seed=3), kmeans(points, 5, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, kmeans(points, 5, seed=4))
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(5))
    assert kmeans(points[:3], 8).shape == (3, 8)
    l2 = kmeans(points, 4, distance="l2", seed=0)
    assert l2.shape == (4, 8) and not torch.allclose(l2.norm(dim=-1), torch.ones(4))


def test_spherical_kmeans_separates_clear_clusters():
    gen = torch.Generator().manual_seed(1)
    directions = F.normalize(torch.randn(3, 16, generator=gen), dim=-1)
    points = torch.cat([d + 0.05 * torch.randn(30, 16, generator=gen) for d in directions])
    centers = kmeans(points, 3, seed=0)
    matched = (centers @ directions.T).max(dim=0).values
    assert bool((matched > 0.99).all())


def test_add_adapter_computes_only_its_own_centroids_and_remove_drops_them(tiny_assets, tmp_path):
    from tiny_models import make_prompts, save_adapter

    names = ["math", "poetry", "code"]
    model = AriadneRoutedModel.from_adapters(
        tiny_assets["backbone"], {n: tiny_assets["adapters"][n] for n in names},
        {n: tiny_assets["train"][n] for n in names}, num_centroids=4, progress=False,
    )
    before = model.router.centroids.clone()
    legal_dir = save_adapter(tiny_assets["backbone"], "legal", str(tmp_path / "legal"), seed=9)
    model.add_adapter("legal", legal_dir, make_prompts("legal", 30, seed=1), progress=False)
    assert model.adapter_names == names + ["legal"]
    assert torch.equal(model.router.centroids[: before.shape[0]], before)
    assert int((model.router.centroid_adapter == 3).sum()) == 4
    legal_test = make_prompts("legal", 10, seed=5)
    assert sum(n == "legal" for n in model.route(legal_test).adapter_names) >= 9
    model.remove_adapter("poetry")
    assert model.adapter_names == ["math", "code", "legal"]
    kept = torch.cat([before[:4], before[8:]])
    assert torch.equal(model.router.centroids[:8], kept)
    assert model.router.centroid_adapter.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert "poetry" not in model.lora.names
    assert all(n in ("math", "code", "legal") for n in model.route(legal_test + tiny_assets["test"]["code"]).adapter_names)


def test_chat_template_boilerplate_is_not_routed(tiny_assets):
    """A chat-formatted prompt routes exactly like its raw text (the template's fixed tokens are ignored)."""
    from tiny_models import make_tokenizer

    from ariadne_hf.routing.router import chat_template_affixes, strip_template

    tokenizer = make_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}you can write the poem about {{ m['content'] }}"
                               " please{% endfor %}{% if add_generation_prompt %} sing{% endif %}")
    prefix, suffix = chat_template_affixes(tokenizer)
    assert len(prefix) == 6 and len(suffix) == 2
    model = AriadneRoutedModel.from_adapters(tiny_assets["backbone"], tiny_assets["adapters"], tiny_assets["train"],
                                             tokenizer=tokenizer, num_centroids=4, progress=False)
    assert model.config.template_prefix_ids == prefix
    raw = [p for items in tiny_assets["test"].values() for p in items[:4]]
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in raw]
    for side in ("left", "right"):
        tokenizer.padding_side = side
        a = model.route(input_ids=tokenizer(raw, return_tensors="pt", padding=True, add_special_tokens=False)["input_ids"])
        batch = tokenizer(chat, return_tensors="pt", padding=True, add_special_tokens=False)
        b = model.route(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert a.adapter_names == b.adapter_names
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-6)
    ids = torch.tensor([[0, 5, 6, 7, 8], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert strip_template(ids, mask, [5, 6], [8]).tolist() == [[0, 0, 0, 1, 0], [0, 0, 1, 1, 1]]
