"""The Hub test double answers the real huggingface_hub client the way the Hub does."""

import huggingface_hub
import pytest
from hub_double import HubDouble, Token, point_client_at
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

ALICE, BOB = "hf_FAKEalice_0001", "hf_FAKEbob_0002"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubDouble({ALICE: Token("alice", orgs={"acme": "admin"}), BOB: Token("bob")}) as double:
        point_client_at(double, monkeypatch, tmp_path / "hf-home")
        yield double


def test_module_level_functions_and_hfapi_both_reach_the_double(hub):
    me = huggingface_hub.whoami(token=ALICE)
    assert me["name"] == "alice" and me["orgs"][0]["name"] == "acme"
    assert me["auth"]["accessToken"]["role"] == "write"
    url = huggingface_hub.create_repo("acme/model", token=ALICE, private=True)
    assert url.repo_id == "acme/model" and hub.repos["acme/model"].private
    assert HfApi(token=ALICE).model_info("acme/model").private is True


def test_commits_trees_refs_and_deletes(hub):
    api = HfApi(token=ALICE)
    api.create_repo("alice/m")
    api.create_commit(
        "alice/m",
        [CommitOperationAdd("a/b/c.txt", b"c"), CommitOperationAdd("top.txt", b"t")],
        commit_message="add",
        commit_description="two files",
    )
    assert api.list_repo_files("alice/m") == [".gitattributes", "a/b/c.txt", "top.txt"]
    assert [e.path for e in api.list_repo_tree("alice/m")] == [".gitattributes", "a", "top.txt"]
    assert [e.path for e in api.list_repo_tree("alice/m", "a", recursive=True)] == ["a/b", "a/b/c.txt"]
    api.create_branch("alice/m", branch="dev")
    api.create_commit("alice/m", [CommitOperationDelete("a/")], commit_message="rm a", revision="dev")
    assert set(hub.files("alice/m", "dev")) == {".gitattributes", "top.txt"}
    assert [c.title for c in api.list_repo_commits("alice/m", revision="dev")] == [
        "rm a",
        "add",
        "initial commit",
    ]
    assert {b.name for b in api.list_repo_refs("alice/m").branches} == {"main", "dev"}
    assert hub.history("alice/m", "main")[-1].description == "two files"


def test_private_repos_are_invisible_to_others(hub, tmp_path):
    hub.add_repo("alice/secret", private=True, files={"w.bin": b"w"})
    assert hf_hub_download("alice/secret", "w.bin", token=ALICE, cache_dir=tmp_path / "a")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=BOB).model_info("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "w.bin", token=BOB, cache_dir=tmp_path / "b")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/secret", "missing.bin", token=ALICE, cache_dir=tmp_path / "c")
    with pytest.raises(HfHubHTTPError) as denied:
        HfApi(token=BOB).create_repo("alice/other")
    assert denied.value.response.status_code == 403


def test_injected_statuses_and_drops(hub):
    api = HfApi(token=ALICE)
    hub.fail("whoami", 503, 429, retry_after=3)
    for status in (503, 429):
        with pytest.raises(HfHubHTTPError) as err:
            api.whoami()
        assert err.value.response.status_code == status
    assert err.value.response.headers["Retry-After"] == "3"
    hub.drop(1)
    with pytest.raises(Exception, match="disconnected|reset|closed"):
        api.whoami()
    assert api.whoami()["name"] == "alice"
    assert [r.status for r in hub.requests("whoami")] == [503, 429, None, 200]
    with pytest.raises(ValueError, match="unknown route"):
        hub.fail("comit", 500)


def test_card_validation_through_modelcard_and_commit(hub):
    ModelCard("---\nlicense: apache-2.0\nlibrary_name: peft\n---\n# ok").validate()
    with pytest.raises(ValueError, match='"license" must be one of'):
        ModelCard("---\nlicense: nope\n---\n# bad").validate()
    HfApi(token=ALICE).create_repo("alice/m")
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        HfApi(token=ALICE).create_commit(
            "alice/m", [CommitOperationAdd("README.md", b"---\ntags: x\n---\n")], commit_message="card"
        )
    assert len(hub.history("alice/m")) == 1


def test_unknown_routes_answer_404_with_their_name(hub):
    with pytest.raises(HfHubHTTPError, match="not implemented by the Hub double"):
        HfApi(token=ALICE).list_models(limit=1).__next__()
