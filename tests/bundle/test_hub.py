"""Bundles to and from a Hub over real HTTP on 127.0.0.1: the real huggingface_hub client, olah + front server.

Hand-made bundles (AriadneConfig + dummy safetensors) test the transport; the end-to-end test pushes a tiny real
routed model and loads it back with AriadneRoutedModel and AutoModelForCausalLM.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, use_hub
from safetensors.torch import save_file

from ariadne_hf import AriadneConfig
from ariadne_hf.bundle.errors import (
    BundleNotCachedError,
    BundleNotFoundError,
    BundleRevisionNotFoundError,
    IncompleteBundleError,
    NotABundleError,
    UnsafeBundleError,
)
from ariadne_hf.bundle.hub import pull_bundle, push_bundle, push_bundle_dir, resolve_bundle
from ariadne_hf.bundle.layout import list_local_files


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub")) as server:
        yield server


@pytest.fixture
def hub(hub_server, tmp_path, monkeypatch) -> HubServer:
    """The server, with huggingface_hub pointed at it and an empty HF_HOME for this test."""
    use_hub(monkeypatch, hub_server.url, tmp_path / "hf_home")
    return hub_server


def new_repo_id() -> str:
    return f"org/bundle-{uuid.uuid4().hex[:8]}"


def make_bundle(directory, adapter_names=("math", "code"), *, readme: str | None = "generated",
                backbone: str = "org/tiny-backbone", seed: int = 0) -> Path:
    """A hand-made bundle folder: real config and safetensors layout, dummy tensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    adapters = {n: {"rank": 2, "target_modules": ["q_proj"], "num_prompts": 5, "num_centroids": 2,
                    "heldout_accuracy": None, "sha256": ""} for n in adapter_names}
    AriadneConfig(backbone_name_or_path=backbone, backbone_revision="0" * 40, adapter_names=list(adapter_names),
                  adapters=adapters, embedding_dim=8, embedding_vocab_size=32).save_pretrained(directory)
    k = 2 * len(adapter_names)
    save_file({"router.centroids": torch.randn(k, 8, generator=gen),
               "router.centroid_adapter": torch.arange(len(adapter_names)).repeat_interleave(2)},
              str(directory / "model.safetensors"))
    (directory / "generation_config.json").write_text('{"max_new_tokens": 8}')
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    for name in adapter_names:
        folder = directory / "adapters" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
        save_file({"lora_A": torch.randn(2, 8, generator=gen)}, str(folder / "adapter_model.safetensors"))
    if readme == "generated":
        from ariadne_hf.bundle.model_card import write_model_card

        config = AriadneConfig.from_pretrained(directory)
        write_model_card(directory, config, torch.randn(k, 8, generator=gen),
                         torch.arange(len(adapter_names)).repeat_interleave(2))
    elif readme is not None:
        (directory / "README.md").write_text(readme)
    return directory


def read_tree(directory) -> dict[str, bytes]:
    return {p: Path(directory, p).read_bytes() for p in list_local_files(directory)}


def upload_raw(repo_id: str, files: dict[str, bytes]) -> None:
    """Create a repo holding exactly `files`, with the plain huggingface_hub client (for broken repos)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.create_commit(repo_id, [CommitOperationAdd(p, c) for p, c in files.items()], commit_message="raw")


def commit_posts(server: HubServer, since: int) -> int:
    return sum(1 for method, path in server.requests[since:] if method == "POST" and "/commit/" in path)


# ---- the server answers like the Hub --------------------------------------------------------------------------
def test_server_speaks_hub_errors_and_the_patch_reaches_it(hub, tmp_path):
    from huggingface_hub import file_exists, hf_hub_download
    from huggingface_hub.errors import (
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from transformers.utils import find_adapter_config_file

    repo_id = new_repo_id()
    upload_raw(repo_id, {"config.json": b'{"model_type": "llama"}'})
    before = len(hub.requests)
    assert Path(hf_hub_download(repo_id, "config.json")).read_bytes() == b'{"model_type": "llama"}'
    assert len(hub.requests) > before, "huggingface_hub did not talk to the test server"
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo_id, "missing.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/no-such-repo", "config.json")
    # transformers probes optional files: a missing one must read as "absent", not as an error.
    assert find_adapter_config_file(repo_id) is None
    # the module-level helpers (used by PEFT) reach the server too
    assert file_exists(repo_id, "config.json") and not file_exists(repo_id, "missing.json")


# ---- push -----------------------------------------------------------------------------------------------------
def test_push_is_one_commit_of_the_whole_bundle_and_pull_gets_it_back(hub, tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    repo_id = new_repo_id()
    before = len(hub.requests)
    info = push_bundle_dir(bundle, repo_id, commit_message="first bundle")
    assert commit_posts(hub, before) == 1
    assert hub.commits(repo_id)[0] == info.oid and len(hub.commits(repo_id)) == 2  # repo creation + bundle
    remote = hub.files(repo_id)
    local = read_tree(bundle)
    assert set(remote) == set(local) | {".gitattributes"}
    assert {p for p in remote if p.startswith("adapters/")} == {
        f"adapters/{n}/{f}" for n in ("math", "code") for f in ("adapter_config.json", "adapter_model.safetensors")}
    assert all(remote[p] == local[p] for p in local if p != "README.md")
    assert f'bundle = "{repo_id}"' in remote["README.md"].decode()  # placeholder filled in

    folder = resolve_bundle(repo_id)
    pulled = read_tree(folder)
    assert "README.md" not in pulled and not any(p.startswith("images/") for p in pulled)  # not needed to load
    assert pulled == {p: c for p, c in local.items() if p != "README.md" and not p.startswith("images/")}

    target = pull_bundle(repo_id, local_dir=tmp_path / "pulled")
    assert read_tree(target) == {p: remote[p] for p in local}  # the whole bundle, card and images included


def test_push_bundle_writes_with_the_callable_and_keeps_a_remote_readme(hub, tmp_path):
    from huggingface_hub import HfApi

    repo_id = new_repo_id()
    push_bundle(lambda d: make_bundle(d, ("math", "code", "poetry")), repo_id)
    HfApi().upload_file(path_or_fileobj=b"# My own card\n", path_in_repo="README.md", repo_id=repo_id)
    before = len(hub.requests)
    push_bundle(lambda d: make_bundle(d, ("math", "code"), seed=1), repo_id)  # poetry removed
    assert commit_posts(hub, before) == 1
    remote = hub.files(repo_id)
    assert remote["README.md"] == b"# My own card\n"
    assert not any(p.startswith("adapters/poetry/") for p in remote)  # stale adapter deleted in the same commit
    assert "images/centroids_pca.png" in remote  # the kept README may link the images: they stay

    push_bundle(lambda d: make_bundle(d, ("math", "code"), seed=1), repo_id, replace_readme=True)
    assert hub.files(repo_id)["README.md"].startswith(b"---\n")


def test_unchanged_push_makes_no_commit(hub, tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    repo_id = new_repo_id()
    first = push_bundle_dir(bundle, repo_id)
    second = push_bundle_dir(bundle, repo_id, replace_readme=True)
    assert second.oid == first.oid and len(hub.commits(repo_id)) == 2


def test_push_to_a_branch_and_a_pull_request(hub, tmp_path):
    repo_id = new_repo_id()
    push_bundle_dir(make_bundle(tmp_path / "main", ("math",)), repo_id)
    push_bundle_dir(make_bundle(tmp_path / "dev", ("math", "code")), repo_id, revision="dev")
    assert not any(p.startswith("adapters/code/") for p in hub.files(repo_id, "main"))
    dev = resolve_bundle(repo_id, revision="dev")
    assert json.loads(Path(dev, "config.json").read_text())["adapter_names"] == ["math", "code"]

    info = push_bundle_dir(make_bundle(tmp_path / "pr", ("math", "poetry")), repo_id, create_pr=True)
    assert info.pr_revision == "refs/pr/1"
    pr = resolve_bundle(repo_id, revision=info.pr_revision)
    assert sorted(os.listdir(Path(pr, "adapters"))) == ["math", "poetry"]
    assert json.loads(Path(resolve_bundle(repo_id), "config.json").read_text())["adapter_names"] == ["math"]


def test_push_refuses_pickles_and_non_bundles_before_any_request(hub, tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    torch.save({"w": torch.zeros(1)}, bundle / "adapters" / "math" / "adapter_model.bin")
    before = len(hub.requests)
    with pytest.raises(UnsafeBundleError, match="pickled"):
        push_bundle_dir(bundle, new_repo_id())
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(NotABundleError, match="model_type 'llama'"):
        push_bundle_dir(plain, new_repo_id())
    assert len(hub.requests) == before


def test_self_contained_bundle_pulls_its_base_folder_without_pickles(hub, tmp_path):
    bundle = make_bundle(tmp_path / "b", ("math",), backbone="base", readme=None)
    (bundle / "base").mkdir()
    (bundle / "base" / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.ones(3)}, str(bundle / "base" / "model.safetensors"))
    repo_id = new_repo_id()
    push_bundle_dir(bundle, repo_id)
    assert read_tree(resolve_bundle(repo_id)) == read_tree(bundle)
    (bundle / "base" / "model.safetensors").unlink()
    torch.save({"w": torch.ones(3)}, bundle / "base" / "pytorch_model.bin")
    with pytest.raises(UnsafeBundleError):
        push_bundle_dir(bundle, repo_id)
    with pytest.raises(ValueError, match="commit sha"):
        push_bundle_dir(bundle, repo_id, revision="a" * 40)


# ---- pull: errors ---------------------------------------------------------------------------------------------
def test_missing_repo_and_revision_are_clear_errors(hub, tmp_path):
    with pytest.raises(BundleNotFoundError, match=r"org/absent.*token"):
        resolve_bundle("org/absent")
    repo_id = new_repo_id()
    push_bundle_dir(make_bundle(tmp_path / "b"), repo_id)
    with pytest.raises(BundleRevisionNotFoundError, match="'v9'"):
        resolve_bundle(repo_id, revision="v9")
    with pytest.raises(BundleNotFoundError, match="neither a local folder"):
        resolve_bundle("./not/a/folder/nor/an/id")


def test_repos_that_are_not_bundles_are_refused_without_downloading_weights(hub):
    model_repo, adapter_repo, empty_repo = new_repo_id(), new_repo_id(), new_repo_id()
    upload_raw(model_repo, {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\x00" * 200})
    upload_raw(adapter_repo, {"adapter_config.json": b'{"peft_type": "LORA"}',
                              "adapter_model.safetensors": b"\x00" * 200})
    upload_raw(empty_repo, {"notes.txt": b"hello"})
    with pytest.raises(NotABundleError, match="model_type 'llama'"):
        resolve_bundle(model_repo)
    with pytest.raises(NotABundleError, match="single PEFT adapter"):
        resolve_bundle(adapter_repo)
    with pytest.raises(NotABundleError, match="not an ariadne bundle: config.json is missing"):
        resolve_bundle(empty_repo)
    cached = [p for p in Path(os.environ["HF_HUB_CACHE"]).rglob("*") if p.name.endswith(".safetensors")]
    assert cached == []


def test_pickle_only_and_incomplete_repos_are_refused(hub, tmp_path):
    bundle = read_tree(make_bundle(tmp_path / "b", readme=None))
    pickled = dict(bundle)
    pickled["adapters/code/adapter_model.bin"] = pickled.pop("adapters/code/adapter_model.safetensors")
    pickled_repo, incomplete_repo = new_repo_id(), new_repo_id()
    upload_raw(pickled_repo, pickled)
    with pytest.raises(UnsafeBundleError, match=r"adapters/code/adapter_model\.safetensors.*pickled"):
        resolve_bundle(pickled_repo)
    upload_raw(incomplete_repo, {p: c for p, c in bundle.items() if not p.startswith("adapters/math/")})
    with pytest.raises(IncompleteBundleError, match="adapter 'math' is listed in config.json but its folder "
                                                    "adapters/math/ is missing"):
        resolve_bundle(incomplete_repo)


def test_a_broken_bundle_raises_the_same_error_from_the_same_validator_locally_and_from_the_hub(hub, tmp_path):
    """A folder loaded locally, the same files as a Hub repo before any download, and the folder pushed: one
    validator (layout.check_bundle_files), one error class, the same problem named."""
    from ariadne_hf.bundle.errors import BundleError
    from ariadne_hf.bundle.local_io import read_bundle

    complete = read_tree(make_bundle(tmp_path / "complete", readme=None))
    weights = "adapters/code/adapter_model.safetensors"
    cases = [
        (None, IncompleteBundleError, f"adapter 'code' is listed in config.json but {weights} is missing"),
        ("adapters/code/adapter_model.bin", UnsafeBundleError, "only pickled adapters/code/adapter_model.bin found"),
    ]
    for number, (pickled, error, problem) in enumerate(cases):
        files = {p: c for p, c in complete.items() if p != weights}
        if pickled:
            files[pickled] = complete[weights]
        folder = tmp_path / f"broken{number}"
        for path, content in files.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(content)
        repo_id = new_repo_id()
        upload_raw(repo_id, files)
        calls = [(read_bundle, str(folder)), (resolve_bundle, repo_id)]
        if not pickled:  # (a push refuses any pickle before this check)
            calls.append((push_bundle_dir, folder, new_repo_id()))
        for function, *args in calls:
            with pytest.raises(BundleError) as info:
                function(*args)
            assert type(info.value) is error and isinstance(info.value, OSError) and problem in str(info.value)
            raised_in = info.traceback[-1]
            assert (Path(raised_in.path).name, raised_in.name) == ("layout.py", "check_bundle_files")


def test_interrupted_download_raises_and_is_never_served_from_the_cache(hub, tmp_path):
    repo_id = new_repo_id()
    push_bundle_dir(make_bundle(tmp_path / "b"), repo_id)
    hub.fail_downloads.add((repo_id, "adapters/code/adapter_model.safetensors"))
    try:
        with pytest.raises(IncompleteBundleError, match="failed part-way"):
            resolve_bundle(repo_id)
        with pytest.raises(BundleNotCachedError, match="adapters/code/adapter_model.safetensors"):
            resolve_bundle(repo_id, local_files_only=True)
    finally:
        hub.fail_downloads.clear()
    assert os.path.isfile(Path(resolve_bundle(repo_id), "adapters/code/adapter_model.safetensors"))


# ---- pull: cache and offline ----------------------------------------------------------------------------------
def test_offline_loads_from_the_cache_only(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo_id, never_pulled = new_repo_id(), new_repo_id()
    push_bundle_dir(make_bundle(tmp_path / "b"), repo_id)
    push_bundle_dir(make_bundle(tmp_path / "c"), never_pulled)
    online = resolve_bundle(repo_id)
    before = len(hub.requests)
    assert resolve_bundle(repo_id, local_files_only=True) == online
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_bundle(repo_id) == online
    assert len(hub.requests) == before  # no request at all
    with pytest.raises(BundleNotCachedError, match="not in the local cache"):
        resolve_bundle(never_pulled)


def test_a_partly_cached_bundle_is_not_returned_offline(hub, tmp_path):
    from huggingface_hub import hf_hub_download

    repo_id = new_repo_id()
    push_bundle_dir(make_bundle(tmp_path / "b"), repo_id)
    hf_hub_download(repo_id, "config.json")  # what AutoConfig alone leaves in the cache
    with pytest.raises(BundleNotCachedError, match="model.safetensors"):
        resolve_bundle(repo_id, local_files_only=True)


def test_cache_dir_and_local_directories(hub, tmp_path):
    repo_id = new_repo_id()
    push_bundle_dir(make_bundle(tmp_path / "b"), repo_id)
    folder = resolve_bundle(repo_id, cache_dir=tmp_path / "elsewhere")
    assert Path(folder).is_relative_to(tmp_path / "elsewhere")
    assert resolve_bundle(str(tmp_path / "b")) == str(tmp_path / "b")  # a local folder is returned as is
    with pytest.raises(FileExistsError):
        pull_bundle(repo_id, local_dir=tmp_path / "b")


# ---- end to end: a real routed model through the Hub ----------------------------------------------------------
def test_routed_model_round_trips_through_the_hub(hub, tiny_assets, mixed_batch, tmp_path, monkeypatch):
    """Backbone on the Hub -> build -> push -> pull in an empty cache with both loaders -> same routes and logits;
    then again offline from the cache."""
    from huggingface_hub import HfApi, constants
    from transformers import AutoModelForCausalLM, pipeline

    from ariadne_hf import AriadneRoutedModel

    backbone_id, repo_id = new_repo_id(), new_repo_id()
    HfApi().create_repo(backbone_id)
    HfApi().upload_folder(repo_id=backbone_id, folder_path=tiny_assets["backbone"])
    model = AriadneRoutedModel.from_adapters(backbone_id, tiny_assets["adapters"], tiny_assets["train"],
                                             heldout_prompts=tiny_assets["test"], num_centroids=4, progress=False)
    assert model.config.backbone_revision == hub.commits(backbone_id)[0]  # pinned to the commit
    model.push_to_hub(repo_id)

    remote = hub.files(repo_id)
    meta = yaml_front_matter(remote["README.md"].decode())
    assert meta["base_model"] == backbone_id and f"base_model:adapter:{backbone_id}" in meta["tags"]
    for link in ("images/routing_confusion.png", "images/centroids_pca.png"):
        assert f"]({link})" in remote["README.md"].decode() and link in remote

    use_hub(monkeypatch, hub.url, tmp_path / "fresh_home")  # nothing cached: bundle and backbone over HTTP
    _, labels, batch = mixed_batch
    expected = model(**batch)
    for loader in (AriadneRoutedModel, AutoModelForCausalLM):
        loaded = loader.from_pretrained(repo_id)
        assert isinstance(loaded, AriadneRoutedModel)
        got = loaded(**batch)
        assert got.routes.adapter_names == expected.routes.adapter_names
        assert torch.equal(got.logits, expected.logits)
    assert expected.routes.adapter_names == labels  # the tiny tasks are separable: routing is right
    fresh_cache = tmp_path / "fresh_home" / "hub"
    for repo in (repo_id, backbone_id):  # both really came over HTTP into the new HF_HOME
        assert (fresh_cache / f"models--{repo.replace('/', '--')}" / "snapshots").is_dir()

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # PEFT reads the variable itself
    before = len(hub.requests)
    offline = AutoModelForCausalLM.from_pretrained(repo_id)
    assert torch.equal(offline(**batch).logits, expected.logits)
    generator = pipeline("text-generation", model=repo_id)
    assert generator(tiny_assets["test"]["math"][0], max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert len(hub.requests) == before


def yaml_front_matter(readme: str) -> dict:
    import yaml

    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n", 2)[1])


def test_cli_push_and_pull(hub, tmp_path, capsys):
    from ariadne_hf.cli import main

    bundle, repo_id = make_bundle(tmp_path / "bundle"), new_repo_id()
    assert main(["push", str(bundle), repo_id, "--message", "first bundle"]) == 0
    assert repo_id in capsys.readouterr().out
    target = tmp_path / "pulled"
    assert main(["pull", repo_id, "--local-dir", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert read_tree(target)["config.json"] == read_tree(bundle)["config.json"]
    assert main(["pull", "org/does-not-exist"]) == 2
    assert "org/does-not-exist" in capsys.readouterr().err
