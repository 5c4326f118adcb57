"""Out-of-distribution score, cross-fitted calibration, reject="auto", bundle storage, staleness, metrics."""

import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from ariadne_hf import BASE_ADAPTER, AriadneRoutedModel
from ariadne_hf.bundle.errors import BundleError
from ariadne_hf.constants import (
    ROUTER_OOD_STATS,
    ROUTER_TOKEN_COUNTS,
    ROUTER_TOKEN_KEYS,
    ROUTER_TOKEN_VALUES,
    ROUTER_WEIGHTS_NAME,
)
from ariadne_hf.routing.calibration import (
    auroc,
    calibrate_ood,
    calibration_stale,
    fold_assignment,
    fpr_at_tpr,
    ood_summary,
)
from ariadne_hf.routing.ood import (
    ALPHA,
    COMPONENT_REGISTRY,
    COMPONENTS,
    OOD_STATS_SHAPE,
    SparseTokenCounts,
    ood_components,
    ood_components_sparse,
    ood_stats_problem,
    token_tables,
)


def test_components_match_a_per_row_python_oracle():
    gen = torch.Generator().manual_seed(0)
    vocab, adapters = 30, 3
    counts = torch.randint(0, 3, (adapters, vocab), generator=gen)
    seen, llr = token_tables(counts)
    ids = torch.randint(0, vocab, (5, 7), generator=gen)
    weights = (torch.rand(5, 7, generator=gen) > 0.3).float()
    weights[4] = 0.0  # an empty row
    scores = torch.randn(5, adapters, generator=gen)
    out = ood_components(ids, weights, scores, seen, llr)
    total = counts.sum(1).double()
    background = counts.sum(0).double()
    for b in range(4):
        a = int(scores[b].argmax())
        ordered = sorted(scores[b].tolist(), reverse=True)
        live = [(int(t), float(w)) for t, w in zip(ids[b], weights[b], strict=True) if w > 0]
        wsum = sum(w for _, w in live)
        unseen = sum(w for t, w in live if counts[a, t] == 0) / wsum

        def log_ratio(t, a=a):
            p_a = (float(counts[a, t]) + ALPHA) / (float(total[a]) + ALPHA * vocab)
            p_b = (float(background[t]) + ALPHA) / (float(background.sum()) + ALPHA * vocab)
            return math.log(p_a) - math.log(p_b)

        mean_llr = sum(w * log_ratio(t) for t, w in live) / wsum
        expected = [-ordered[0], -(ordered[0] - ordered[1]), unseen, -mean_llr]
        assert torch.allclose(out[b], torch.tensor(expected, dtype=torch.float32), atol=1e-5), (b, out[b], expected)
    assert bool(torch.isnan(out[4]).all())


def test_the_component_registry_defines_the_names_the_stats_shape_and_the_stats_check():
    assert COMPONENTS == ("neg_best", "neg_margin", "unseen_share", "neg_unigram_llr")  # bundle format 1.3 columns
    assert COMPONENTS == tuple(c.name for c in COMPONENT_REGISTRY) and OOD_STATS_SHAPE == (2, len(COMPONENTS))
    good = torch.stack([torch.zeros(len(COMPONENTS)), torch.ones(len(COMPONENTS))])
    assert ood_stats_problem(good) is None
    for bad in (good[:, :-1], good[:1], torch.cat([good, good], 1), good * float("nan"), good * -1.0):
        problem = ood_stats_problem(bad)
        assert problem and f"must be finite {list(OOD_STATS_SHAPE)} with positive sd, got {tuple(bad.shape)}" == problem
    out = ood_components(torch.tensor([[1, 2]]), torch.ones(1, 2), torch.tensor([[0.5, 0.1]]),
                         torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 5))
    assert out.shape == (1, len(COMPONENTS))


def test_sparse_token_tables_equal_the_dense_ones_and_edit_like_them():
    gen = torch.Generator().manual_seed(3)
    vocab, adapters = 40, 4
    counts = torch.randint(0, 3, (adapters, vocab), generator=gen) * (torch.rand(adapters, vocab, generator=gen) > 0.6)
    sparse = SparseTokenCounts.from_dense(counts)
    assert torch.equal(sparse.dense(), counts) and sparse.keys.numel() == int((counts > 0).sum())
    ids = torch.randint(0, vocab, (6, 9), generator=gen)
    weights = (torch.rand(6, 9, generator=gen) > 0.2).float()
    scores = torch.randn(6, adapters, generator=gen)
    assert torch.allclose(ood_components_sparse(ids, weights, scores, sparse),
                          ood_components(ids, weights, scores, *token_tables(counts)), atol=1e-6, equal_nan=True)
    lists = [[[t for t in range(vocab) for _ in range(int(counts[a, t]))]] for a in range(adapters)]
    assert torch.equal(SparseTokenCounts.from_token_ids(lists, vocab).dense(), counts)
    grown = sparse.append([[5, 5, 7]])
    assert grown.num_adapters == adapters + 1 and grown.dense()[-1, 5] == 2 and grown.dense()[-1, 7] == 1
    assert torch.equal(grown.drop(1).dense(), torch.cat([counts[:1], counts[2:], grown.dense()[-1:]]))
    with pytest.raises(ValueError, match="sorted, unique"):
        SparseTokenCounts(sparse.keys.flip(0), sparse.values, adapters, vocab)


def test_auroc_matches_pairwise_count_and_fpr_at_tpr():
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 10, (40,), generator=gen).float()
    b = torch.randint(3, 14, (30,), generator=gen).float()
    pairs = sum(1.0 if y > x else 0.5 if y == x else 0.0 for x in a.tolist() for y in b.tolist())
    assert abs(auroc(a, b) - pairs / (len(a) * len(b))) < 1e-9
    assert auroc(torch.zeros(3), torch.ones(2)) == 1.0 and auroc(torch.ones(3), torch.zeros(2)) == 0.0
    assert fpr_at_tpr(torch.arange(100.0), torch.arange(1000.0, 1010.0)) == 0.0
    summary = ood_summary(torch.arange(100.0), torch.arange(50.0, 150.0), threshold=89.5)
    assert abs(summary["in_domain_false_reject_rate"] - 0.10) < 1e-9 and abs(summary["ood_reject_rate"] - 0.6) < 1e-9
    with pytest.raises(ValueError, match="at least one"):
        auroc(torch.zeros(0), torch.ones(2))


def test_folds_hold_out_every_prompt_once_and_keep_single_prompt_adapters_in():
    assignment = fold_assignment([12, 1, 3], folds=5, seed=0)
    assert sorted(assignment[0]) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4]
    assert assignment[1] == [-1] and sorted(assignment[2]) == [0, 1, 2]
    assert fold_assignment([12, 1, 3], folds=5, seed=0) == assignment


def test_calibration_is_cross_fitted_and_hits_its_target_on_held_out_prompts():
    gen = torch.Generator().manual_seed(2)
    vocab = 50
    pooled = [torch.randn(60, 8, generator=gen) + 3 * torch.eye(8)[a] for a in range(3)]
    token_ids = [[torch.randint(10 * a, 10 * a + 15, (6,), generator=gen).tolist() for _ in range(60)]
                 for a in range(3)]
    kwargs = dict(num_centroids=1, distance="cosine", center=True, whitening="within")
    first = calibrate_ood(pooled, token_ids, vocab, build_kwargs=kwargs, reject_rate=0.05, seed=0)
    again = calibrate_ood(pooled, token_ids, vocab, build_kwargs=kwargs, reject_rate=0.05, seed=0)
    assert first.threshold == again.threshold and torch.equal(first.stats, again.stats)
    assert tuple(first.stats.shape) == OOD_STATS_SHAPE and ood_stats_problem(first.stats) is None
    assert first.info["heldout_prompts"] == 180 and first.info["folds"] == 5
    assert abs(first.info["heldout_reject_rate"] - 0.05) <= 1 / 180 + 1e-9
    assert first.token_counts.dense().shape == (3, vocab) and int(first.token_counts.dense().sum()) == 3 * 60 * 6
    # a prompt's own tokens never count as "seen" when it is held out: a token used once only is unseen then
    single = [[[40 + i] for i in range(10)], [[1, 2]] * 10]
    result = calibrate_ood([pooled[0][:10], pooled[1][:10]], single, vocab, build_kwargs=kwargs, seed=0)
    assert result.stats[0, 2] > 0.4  # half of the held-out prompts consist of a token seen nowhere else
    with pytest.raises(ValueError, match="reject_rate"):
        calibrate_ood(pooled, token_ids, vocab, build_kwargs=kwargs, reject_rate=0.9)


def _legal_and_in_domain(tiny_model):
    from tiny_models import make_prompts

    test = {n: make_prompts(n, 12, seed=2) for n in tiny_model.adapter_names}
    return [p for items in test.values() for p in items], make_prompts("legal", 24, seed=3)


def test_unseen_task_scores_higher_and_reject_auto_sends_it_to_the_base(tiny_model):
    in_domain, legal = _legal_and_in_domain(tiny_model)
    assert tiny_model.config.ood_calibration["adapters"] == tiny_model.adapter_names
    assert calibration_stale(tiny_model.config) is None
    inside, outside = tiny_model.route(in_domain), tiny_model.route(legal)
    assert inside.ood_scores.shape == (len(in_domain),) and inside.reasons == ["nearest"] * len(in_domain)
    assert auroc(inside.ood_scores, outside.ood_scores) > 0.9
    auto_in, auto_out = tiny_model.route(in_domain, reject="auto"), tiny_model.route(legal, reject="auto")
    threshold = tiny_model.config.ood_threshold
    expected = [BASE_ADAPTER if s > threshold else n for s, n in zip(outside.ood_scores.tolist(),
                                                                     outside.adapter_names, strict=True)]
    assert auto_out.adapter_names == expected
    assert sum(n == BASE_ADAPTER for n in auto_out.adapter_names) >= len(legal) // 2
    assert {r for r, n in zip(auto_out.reasons, auto_out.adapter_names, strict=True) if n == BASE_ADAPTER} == {
        "out_of_distribution"}
    assert sum(n == BASE_ADAPTER for n in auto_in.adapter_names) <= len(in_domain) // 4
    assert "ood_scores" in outside.to_dict()
    with pytest.raises(ValueError, match="reject must be None or 'auto'"):
        tiny_model.route(legal, reject="yes")


def test_bundle_round_trip_keeps_ood_tables_and_refuses_broken_ones(tiny_model, tmp_path):
    path = str(tmp_path / "bundle")
    tiny_model.save_pretrained(path, include_backbone=True)
    loaded = AriadneRoutedModel.from_pretrained(path)
    _, legal = _legal_and_in_domain(tiny_model)
    assert torch.equal(loaded.route(legal).ood_scores, tiny_model.route(legal).ood_scores)
    assert loaded.config.ood_threshold == tiny_model.config.ood_threshold
    router_file = os.path.join(path, ROUTER_WEIGHTS_NAME)
    tensors = load_file(router_file)
    keys = tensors[ROUTER_TOKEN_KEYS]
    tensors[ROUTER_TOKEN_KEYS] = keys + 3 * 200  # adapter indices beyond the 3 adapters
    save_file(tensors, router_file)
    _drop_router_checksum(path)
    with pytest.raises(BundleError, match="do not fit 3 adapters x 200 tokens"):
        AriadneRoutedModel.from_pretrained(path)
    tensors[ROUTER_TOKEN_KEYS] = keys
    values = tensors.pop(ROUTER_TOKEN_VALUES)
    save_file(tensors, router_file)
    with pytest.raises(BundleError, match="only one of"):
        AriadneRoutedModel.from_pretrained(path)
    tensors[ROUTER_TOKEN_VALUES] = values
    stats = tensors[ROUTER_OOD_STATS]
    tensors[ROUTER_OOD_STATS] = stats[:, :-1].contiguous()  # one component short: statistics of another component list
    save_file(tensors, router_file)
    expected = re.escape(f"must be finite {list(OOD_STATS_SHAPE)} with positive sd, got {tuple(stats[:, :-1].shape)}")
    with pytest.raises(BundleError, match=expected + "; the router file is corrupt"):
        AriadneRoutedModel.from_pretrained(path)
    with pytest.raises(ValueError, match="Router ood stats " + expected):
        tiny_model.router.set_ood(tiny_model.router.token_table, stats[:, :-1])
    tensors[ROUTER_OOD_STATS] = stats
    tensors.pop(ROUTER_TOKEN_VALUES)
    # a 1.2 bundle: dense [A, V] counts load into the same sparse tables and give the same scores
    tensors.pop(ROUTER_TOKEN_KEYS)
    tensors[ROUTER_TOKEN_COUNTS] = tiny_model.router.token_counts
    save_file(tensors, router_file)
    dense_loaded = AriadneRoutedModel.from_pretrained(path)
    assert torch.equal(dense_loaded.route(legal).ood_scores, tiny_model.route(legal).ood_scores)
    tensors[ROUTER_TOKEN_COUNTS] = tensors[ROUTER_TOKEN_COUNTS][:2]
    save_file(tensors, router_file)
    with pytest.raises(BundleError, match="one row per adapter"):
        AriadneRoutedModel.from_pretrained(path)
    tensors.pop(ROUTER_TOKEN_COUNTS)
    save_file(tensors, router_file)
    with pytest.raises(BundleError, match="only one of"):
        AriadneRoutedModel.from_pretrained(path)
    tensors.pop(ROUTER_OOD_STATS)
    save_file(tensors, router_file)
    loaded = AriadneRoutedModel.from_pretrained(path)  # an older bundle: no ood score, no auto rejection
    assert loaded.route(legal).ood_scores is None
    with pytest.raises(ValueError, match="reject='auto' needs a calibrated"):
        loaded.route(legal, reject="auto")


def _drop_router_checksum(path):
    import json

    config_path = os.path.join(path, "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config["router_sha256"] = None
    with open(config_path, "w") as handle:
        json.dump(config, handle)


def test_add_and_remove_adapter_mark_the_calibration_stale(tiny_assets, tmp_path):
    from tiny_models import make_prompts, save_adapter

    names = ["math", "poetry"]
    model = AriadneRoutedModel.from_adapters(tiny_assets["backbone"], {n: tiny_assets["adapters"][n] for n in names},
                                             {n: tiny_assets["train"][n] for n in names}, reject="auto",
                                             progress=False)
    assert model.config.reject == "auto" and calibration_stale(model.config) is None
    code = tiny_assets["test"]["code"]
    before = model.route(code)
    assert sum(n == BASE_ADAPTER for n in before.adapter_names) > len(code) // 2  # unseen task: rejected
    model.add_adapter("code", tiny_assets["adapters"]["code"], tiny_assets["train"]["code"], progress=False)
    assert model.router.token_counts.shape[0] == 3
    assert "add_adapter" in calibration_stale(model.config)
    after = model.route(code)  # still routed with the stored (stale) threshold, now mostly to the new adapter
    assert sum(n == "code" for n in after.adapter_names) > len(code) // 2
    model.remove_adapter("code")
    assert model.router.token_counts.shape[0] == 2 and calibration_stale(model.config) is None
    legal_adapter = save_adapter(tiny_assets["backbone"], "legal", str(tmp_path / "legal"), seed=9)
    model.add_adapter("legal", legal_adapter, make_prompts("legal", 20, seed=1), progress=False)
    assert calibration_stale(model.config) is not None


def test_reject_auto_without_enough_prompts_fails_at_build_time(tiny_assets):
    with pytest.raises(ValueError, match="single prompt"):
        AriadneRoutedModel.from_adapters(tiny_assets["backbone"], {"math": tiny_assets["adapters"]["math"]},
                                         {"math": tiny_assets["train"]["math"][:1]}, reject="auto",
                                         whitening="none", progress=False)


def test_token_routed_generate_reports_ood_scores(tiny_model, mixed_batch):
    _, _, batch = mixed_batch
    out = tiny_model.generate(**batch, routing="token", max_new_tokens=2, do_sample=False,
                              return_dict_in_generate=True)
    expected = tiny_model.route(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).ood_scores
    assert expected is not None
    torch.testing.assert_close(out.routes.ood_scores, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
