"""qctrain.publish against the Hub test double, through the real huggingface_hub client."""

import hashlib
import json
import logging
import socket
import time
from pathlib import Path

import pytest
from hub_double import HubDouble, Token, point_client_at, validate_card_metadata
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from qctrain.errors import ExitCode, InputError, PushFailed
from qctrain.hubtoken import redact, resolve_token
from qctrain.publish import (
    RetryPolicy,
    check_hub_access,
    default_commit_message,
    push_checkpoint,
    push_output,
)

TOKEN = "hf_FAKEtoken_DO_NOT_LEAK_123"  # alice, write; member of acme (write) and guests (read)
READ_TOKEN = "hf_FAKEreadonly_DO_NOT_LEAK_456"
SCOPED_TOKEN = "hf_FAKEscoped_DO_NOT_LEAK_789"  # fine-grained: writes alice/allowed only
BAD_TOKEN = "hf_FAKEunknown_DO_NOT_LEAK_000"
FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)

CARD = """---
base_model: microsoft/Phi-3-mini-4k-instruct
library_name: peft
license: mit
tags:
- qlora
- qctrain
---
# phi-3 support adapter
"""
ADAPTER = {
    "adapter_model.safetensors": bytes(range(256)) * 64,
    "adapter_config.json": b'{"peft_type": "LORA", "r": 16}',
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b'{"model_max_length": 4096}',
    "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
    "README.md": b"# stub card PEFT writes; the run's card replaces it",
}
RUN = {
    "README.md": CARD.encode(),
    "run_manifest.json": json.dumps(
        {"run_id": "run-7f3a", "recipe_sha256": "ab" * 32, "final_loss": 1.23456}
    ).encode(),
    "metrics.jsonl": b'{"step": 10, "loss": 2.1}\n{"step": 20, "loss": 1.2}\n',
    "loss.png": b"\x89PNG\r\n\x1a\n" + bytes(100),
    "data_report.json": b'{"records": 100}',
}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    tokens = {
        TOKEN: Token("alice", orgs={"acme": "write", "guests": "read"}),
        READ_TOKEN: Token("alice", role="read"),
        SCOPED_TOKEN: Token("alice", role="fineGrained", scopes=("alice/allowed",)),
    }
    with HubDouble(tokens) as double:
        point_client_at(double, monkeypatch, tmp_path / "hf-home")
        yield double


def make_output(root: Path) -> Path:
    out = root / "out"
    for name, content in ADAPTER.items():
        _write(out / "adapter" / name, content)
    for name, content in RUN.items():
        _write(out / name, content)
    _write(out / "checkpoints/checkpoint-10/adapter_model.safetensors", b"old weights")
    _write(out / "checkpoints/checkpoint-10/optimizer.pt", b"optimizer state")
    _write(out / "prepared/train.arrow", b"cached data")
    return out


def _write(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


# ---- tokens ----------------------------------------------------------------------------------
def test_resolve_token_from_env_wins_over_file(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    assert resolve_token({"HF_TOKEN": " from-env \n", "HF_TOKEN_FILE": str(secret)}) == "from-env"
    assert resolve_token({}) is None
    assert resolve_token({"HF_TOKEN": ""}) is None


def test_resolve_token_from_mounted_secret_file(tmp_path):
    secret = tmp_path / "secret" / "token"
    _write(secret, f"  {TOKEN}\n".encode())
    assert resolve_token({"HF_TOKEN_FILE": str(secret)}) == TOKEN


def test_unreadable_or_empty_token_file_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match=f"HF_TOKEN_FILE={missing} cannot be read"):
        resolve_token({"HF_TOKEN_FILE": str(missing)})
    with pytest.raises(InputError, match="cannot be read"):
        resolve_token({"HF_TOKEN_FILE": str(tmp_path)})  # a directory
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(InputError, match="is empty"):
        resolve_token({"HF_TOKEN_FILE": str(tmp_path / "empty")})


def test_redact_masks_the_token_and_token_shaped_strings():
    text = f"Authorization: Bearer {TOKEN}; other hf_{'a1' * 17}"
    assert redact(text, TOKEN) == "Authorization: Bearer ***; other hf_***"
    assert redact("nothing secret", None) == "nothing secret"


# ---- check_hub_access --------------------------------------------------------------------------
def test_check_reports_missing_token_without_calling_the_hub(hub):
    (problem,) = check_hub_access("alice/adapter", private=True, token=None)
    assert "no Hub token" in problem and "HF_TOKEN" in problem
    assert hub.log == []


@pytest.mark.parametrize(
    "repo_id", ["adapter", "alice/team/adapter", "alice/bad--name", "alice/-x", "alice/a b"]
)
def test_check_reports_malformed_repo_id_without_calling_the_hub(hub, repo_id):
    (problem,) = check_hub_access(repo_id, private=True, token=TOKEN)
    assert f"repo id {repo_id!r} is malformed" in problem
    assert hub.log == []


def test_check_reports_invalid_token(hub):
    (problem,) = check_hub_access("alice/adapter", private=True, token=BAD_TOKEN)
    assert "rejected the token (401)" in problem
    assert len(hub.requests("whoami")) == 1  # 401 is not retried
    assert "alice/adapter" not in hub.repos


def test_check_reports_read_only_token(hub):
    (problem,) = check_hub_access("alice/adapter", private=True, token=READ_TOKEN)
    assert "read-only" in problem and "write access to 'alice'" in problem
    assert "alice/adapter" not in hub.repos


@pytest.mark.parametrize("namespace", ["bob", "guests"])  # not a member / a read-only member
def test_check_reports_namespace_the_token_cannot_write(hub, namespace):
    (problem,) = check_hub_access(f"{namespace}/adapter", private=True, token=TOKEN)
    assert f"may not write to namespace '{namespace}'" in problem and "alice, acme" in problem


def test_check_creates_missing_repo_private_by_default(hub):
    assert check_hub_access("alice/adapter", private=True, token=TOKEN) == []
    assert hub.repos["alice/adapter"].private is True
    assert check_hub_access("acme/public-adapter", private=False, token=TOKEN) == []
    assert hub.repos["acme/public-adapter"].private is False
    assert check_hub_access("alice/adapter", private=True, token=TOKEN) == []  # exists now: write checked
    assert [r.status for r in hub.requests("create_repo")] == [200, 200]
    assert [r.status for r in hub.requests("auth_check")] == [200]


def test_check_without_create_reports_missing_repo(hub):
    (problem,) = check_hub_access("alice/adapter", private=True, token=TOKEN, create=False)
    assert "does not exist" in problem and "alice/adapter" not in hub.repos


def test_check_fine_grained_token_is_judged_by_the_hub(hub):
    hub.add_repo("alice/allowed", private=True)
    assert check_hub_access("alice/allowed", private=True, token=SCOPED_TOKEN) == []
    (problem,) = check_hub_access("alice/elsewhere", private=True, token=SCOPED_TOKEN)
    assert "permission denied (403)" in problem


def test_check_flags_existing_public_repo_when_private_is_wanted(hub):
    hub.add_repo("alice/adapter", private=False)
    (problem,) = check_hub_access("alice/adapter", private=True, token=TOKEN)
    assert "is public" in problem and "hub.private" in problem
    assert check_hub_access("alice/adapter", private=False, token=TOKEN) == []


@pytest.mark.timing  # under xdist it runs alone: the other workers' training must not eat the 5 s
def test_check_is_fast_through_a_hiccup_and_when_the_hub_is_unreachable(hub):
    hub.fail("whoami", 503)
    hub.drop(1, route="repo_info")
    started = time.monotonic()
    assert check_hub_access("alice/adapter", private=True, token=TOKEN) == []
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    (problem,) = check_hub_access("alice/x", True, TOKEN, endpoint=closed, retry=FAST)
    assert f"cannot reach the Hub at {closed}" in problem
    assert time.monotonic() - started < 5


# ---- push_output -------------------------------------------------------------------------------
def test_push_round_trip_is_byte_identical(hub, tmp_path):
    out = make_output(tmp_path)
    result = push_output(out, "alice/adapter", TOKEN, retry=FAST)

    assert result.pushed and result.skipped_reason is None and result.revision == "main"
    assert result.url == f"{hub.url}/alice/adapter"
    initial, commit = hub.history("alice/adapter")
    assert result.commit_sha == commit.sha
    assert commit.message == "qctrain: adapter from run run-7f3a (recipe abababababab), final loss 1.2346"
    expected = {**ADAPTER, **RUN}  # the run's README.md replaces the PEFT stub
    assert set(hub.files("alice/adapter")) == {*expected, ".gitattributes"}
    assert sorted(result.files) == sorted(expected)

    snapshot = Path(snapshot_download("alice/adapter", token=TOKEN, cache_dir=tmp_path / "dl"))
    for name, content in expected.items():
        assert (snapshot / name).read_bytes() == content, name
    assert not (snapshot / "checkpoints").exists() and not (snapshot / "prepared").exists()
    weights = hf_hub_download(
        "alice/adapter", "adapter_model.safetensors", token=TOKEN, cache_dir=tmp_path / "d2"
    )
    assert Path(weights).read_bytes() == (out / "adapter/adapter_model.safetensors").read_bytes()

    record = json.loads((out / "push.json").read_text())
    assert record["repo_id"] == "alice/adapter" and record["commit_sha"] == commit.sha and record["time"]
    assert hub.repos["alice/adapter"].private is True
    assert HfApi(token=TOKEN).model_info("alice/adapter").card_data.license == "mit"


def test_model_card_header_passes_hub_validation(hub):
    assert validate_card_metadata(CARD, token=TOKEN) == []
    assert validate_card_metadata(CARD, endpoint=hub.url) == []


def test_the_card_qctrain_writes_passes_hub_validation(hub, tmp_path):
    from qctrain.basemodel.reference import BaseReference, base_license
    from qctrain.card import Sample, model_card
    from qctrain.recipe import Recipe

    recipe = Recipe.model_validate({"model": {"name": "microsoft/Phi-3.5-mini-instruct"},
                                    "data": {"sources": [{"path": "hub:acme/chats"}]},
                                    "output": {"dir": str(tmp_path / "run")}, "hub": {"repo_id": "alice/adapter"}})
    base = BaseReference("microsoft/Phi-3.5-mini-instruct", None, "microsoft/Phi-3.5-mini-instruct")
    samples = [Sample("Who are you?", "I | am\nthe base", "I am Quill.")]
    card = model_card(recipe, {}, {"eval_loss": 0.5}, samples, base, base_license(base))
    assert validate_card_metadata(card, endpoint=hub.url) == []
    assert "license: mit" in card and "base_model_relation: adapter" in card and "model-index:" in card


@pytest.mark.parametrize(
    ("header", "complaint"),
    [
        ("license: not-a-license", '"license" must be one of'),
        ("tags: qlora", '"tags" must be a list of strings'),
        ("base_model: {name: phi}", '"base_model" must be a string or a list'),
        ("library_name: [peft]", '"library_name" must be a string'),
        ("license: mit\n  bad: [indent", "Invalid YAML"),
        ("- just\n- a list", "must be a YAML mapping"),
    ],
)
def test_invalid_card_metadata_is_rejected(hub, header, complaint):
    problems = validate_card_metadata(f"---\n{header}\n---\n# card\n", token=TOKEN)
    assert any(complaint in p for p in problems), problems


def test_card_without_header_is_a_problem(hub):
    assert "no YAML metadata header" in validate_card_metadata("# just a title\n")[0]
    assert hub.log == []


def test_push_with_invalid_card_fails_before_upload(hub, tmp_path):
    out = make_output(tmp_path)
    (out / "README.md").write_text("---\nlicense: not-a-license\n---\n")
    with pytest.raises(PushFailed, match="Invalid metadata in README.md") as failed:
        push_output(out, "alice/adapter", TOKEN, retry=FAST)
    assert failed.value.exit_code == ExitCode.NOT_PUSHED
    assert hub.requests("preupload") == [] and len(hub.history("alice/adapter")) == 1


def test_push_survives_503s_and_a_dropped_connection(hub, tmp_path):
    hub.drop(1, route="create_repo")
    hub.fail("commit", 503, 503)
    result = push_output(make_output(tmp_path), "alice/adapter", TOKEN, retry=RetryPolicy(5, 0.01, 0.05))
    assert result.pushed
    assert [r.status for r in hub.requests("commit")] == [503, 503, 200]
    assert len(hub.history("alice/adapter")) == 2


def test_push_waits_as_long_as_retry_after_says(hub, tmp_path):
    sleeps: list[float] = []
    hub.fail("commit", 429, retry_after=7)
    result = push_output(
        make_output(tmp_path), "alice/adapter", TOKEN, retry=RetryPolicy(3, 0.01, 0.05, sleeps.append)
    )
    assert result.pushed and sleeps == [7.0]


def test_lost_commit_answer_is_retried_without_a_duplicate_commit(hub, tmp_path):
    hub.drop(1, route="commit", after_handling=True)  # the commit lands, its answer never arrives
    result = push_output(make_output(tmp_path), "alice/adapter", TOKEN, retry=FAST)
    initial, commit = hub.history("alice/adapter")
    assert result.pushed and result.commit_sha == commit.sha


@pytest.mark.parametrize(
    ("token", "fault", "says"),
    [
        (BAD_TOKEN, None, "rejected the token (401)"),
        (READ_TOKEN, None, "permission denied (403): the token may not write to 'alice/adapter'"),
        (TOKEN, ("preupload", 404), "repo id 'alice/adapter' not found (404)"),
    ],
)
def test_push_failures_name_token_permission_or_repo_id_and_are_not_retried(
    hub, tmp_path, token, fault, says
):
    out = make_output(tmp_path)
    before = tree_digest(out)
    hub.add_repo("alice/adapter", private=True)
    if fault:
        hub.fail(*fault)
    with pytest.raises(PushFailed) as failed:
        push_output(out, "alice/adapter", token, retry=FAST)
    assert says in str(failed.value) and "outputs are intact" in str(failed.value)
    assert failed.value.exit_code == ExitCode.NOT_PUSHED
    assert token not in str(failed.value)
    assert len(hub.requests("create_repo")) == 1  # one attempt only
    assert tree_digest(out) == before and not (out / "push.json").exists()
    assert len(hub.history("alice/adapter")) == 1


def test_push_after_a_failed_push_succeeds_and_outputs_were_untouched(hub, tmp_path):
    out = make_output(tmp_path)
    before = tree_digest(out)
    hub.fail("commit", *[503] * FAST.attempts)
    with pytest.raises(PushFailed, match=r"kept failing \(HTTP 503\)"):
        push_output(out, "alice/adapter", TOKEN, retry=FAST)
    assert tree_digest(out) == before and len(hub.history("alice/adapter")) == 1

    result = push_output(out, "alice/adapter", TOKEN, retry=FAST)
    assert result.pushed and len(hub.history("alice/adapter")) == 2


def test_pushing_the_same_output_twice_makes_no_second_commit(hub, tmp_path):
    out = make_output(tmp_path)
    first = push_output(out, "alice/adapter", TOKEN, retry=FAST)
    second = push_output(out, "alice/adapter", TOKEN, retry=FAST)
    assert not second.pushed and second.skipped_reason == "already up to date"
    assert second.commit_sha == first.commit_sha
    assert len(hub.history("alice/adapter")) == 2 and len(hub.requests("commit")) == 1
    assert json.loads((out / "push.json").read_text())["pushed"] is False

    (out / "metrics.jsonl").write_text('{"step": 30, "loss": 0.9}\n')  # a changed output is pushed
    assert push_output(out, "alice/adapter", TOKEN, retry=FAST).pushed


def test_push_to_a_branch(hub, tmp_path):
    out = make_output(tmp_path)
    result = push_output(out, "alice/adapter", TOKEN, revision="run-42", retry=FAST)
    assert result.revision == "run-42" and result.url.endswith("/alice/adapter/tree/run-42")
    assert len(hub.history("alice/adapter", "main")) == 1
    assert hub.history("alice/adapter", "run-42")[-1].sha == result.commit_sha
    path = hf_hub_download("alice/adapter", "adapter_config.json", revision="run-42", token=TOKEN)
    assert Path(path).read_bytes() == ADAPTER["adapter_config.json"]


def test_push_honours_private(hub, tmp_path):
    out = make_output(tmp_path)
    push_output(out, "alice/private", TOKEN, retry=FAST)
    push_output(out, "acme/public", TOKEN, private=False, retry=FAST)
    assert hub.repos["alice/private"].private is True and hub.repos["acme/public"].private is False

    hub.add_repo("alice/was-public", private=False)
    with pytest.raises(PushFailed, match="is public, but hub.private is true"):
        push_output(out, "alice/was-public", TOKEN, retry=FAST)
    assert len(hub.history("alice/was-public")) == 1


def test_base_license_is_read_from_the_base_card_on_the_hub(hub):
    from qctrain.basemodel.reference import BaseReference, base_license

    card = b"---\nlicense: other\nlicense_name: acme-community\nlicense_link: LICENSE.md\n---\n# base\n"
    hub.add_repo("acme/base-7b", files={"README.md": card, "config.json": b"{}"})
    found = base_license(BaseReference("acme/base-7b", None, "acme/base-7b"))
    assert found == {"license": "other", "license_name": "acme-community", "license_link": "LICENSE.md"}
    assert base_license(BaseReference("acme/missing", None, "acme/missing")) == {}  # 404: unknown, no error


def test_gguf_adapters_are_pushed_but_not_the_local_modelfile(tmp_path):
    from qctrain.publish import output_files

    out = make_output(tmp_path)
    _write(out / "gguf" / "run-lora-f32.gguf", b"GGUF")
    _write(out / "gguf" / "Modelfile", b"FROM /local/path\n")
    files = output_files(out)
    assert files["gguf/run-lora-f32.gguf"] == out / "gguf" / "run-lora-f32.gguf"
    assert not [name for name in files if "Modelfile" in name]


def test_push_without_adapter_is_bad_input(hub, tmp_path):
    with pytest.raises(InputError, match="no trained adapter"):
        push_output(tmp_path, "alice/adapter", TOKEN)
    assert hub.log == []


def test_commit_message_tolerates_missing_or_partial_manifest(tmp_path):
    assert default_commit_message(tmp_path) == "qctrain: adapter"
    (tmp_path / "run_manifest.json").write_text('{"metrics": {"train_loss": 0.5}}')
    assert default_commit_message(tmp_path) == "qctrain: adapter, final loss 0.5000"
    manifest = {"recipe_sha256": "cd" * 32, "finished": "2026-01-02T03:04:05+00:00"}
    (tmp_path / "run_manifest.json").write_text(json.dumps({**manifest, "metrics": {"eval_loss": 1.7}}))
    assert default_commit_message(tmp_path) == (
        "qctrain: adapter from run 2026-01-02T03:04:05+00:00 (recipe cdcdcdcdcdcd), eval loss 1.7000"
    )
    (tmp_path / "run_manifest.json").write_text("not json")
    assert default_commit_message(tmp_path) == "qctrain: adapter"


# ---- checkpoints --------------------------------------------------------------------------------
def test_push_checkpoint_to_its_branch_folder(hub, tmp_path):
    out = make_output(tmp_path)
    ckpt = out / "checkpoints/checkpoint-10"
    _write(ckpt / "trainer_state.json", b'{"global_step": 10}')
    result = push_checkpoint(ckpt, "alice/adapter", TOKEN, retry=FAST)
    assert result.pushed and result.revision == "checkpoints"
    files = hub.files("alice/adapter", "checkpoints")
    assert files["checkpoints/checkpoint-10/optimizer.pt"] == b"optimizer state"
    assert files["checkpoints/checkpoint-10/adapter_model.safetensors"] == b"old weights"
    assert (
        hub.history("alice/adapter", "checkpoints")[-1].message
        == "qctrain: checkpoint checkpoint-10 (step 10)"
    )
    assert set(hub.files("alice/adapter", "main")) == {".gitattributes"}

    _write(out / "checkpoints/checkpoint-20/adapter_model.safetensors", b"new weights")
    push_checkpoint(out / "checkpoints/checkpoint-20", "alice/adapter", TOKEN, retry=FAST)
    files = hub.files("alice/adapter", "checkpoints")
    assert (
        "checkpoints/checkpoint-10/optimizer.pt" in files
        and "checkpoints/checkpoint-20/adapter_model.safetensors" in files
    )


# ---- secret hygiene -----------------------------------------------------------------------------
def test_token_never_reaches_logs_output_or_files(hub, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    out = make_output(tmp_path)
    errors = []
    check_hub_access("alice/adapter", True, TOKEN)
    check_hub_access("alice/adapter", True, BAD_TOKEN)
    hub.fail("commit", 503, 429)
    push_output(out, "alice/adapter", TOKEN, retry=FAST)
    push_output(out, "alice/adapter", TOKEN, retry=FAST)
    push_checkpoint(out / "checkpoints/checkpoint-10", "alice/adapter", TOKEN, retry=FAST)
    for token in (BAD_TOKEN, READ_TOKEN):
        try:
            push_output(out, "alice/adapter", token, retry=FAST)
        except PushFailed as err:
            errors.append(str(err))
    assert len(errors) == 2

    captured = capfd.readouterr()
    logged = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    files = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert "retry 1/" in caplog.text  # the retries were logged, so the check below has teeth
    for token in (TOKEN, BAD_TOKEN, READ_TOKEN):
        assert token not in captured.out + captured.err + logged + "".join(errors)
        assert token.encode() not in files
