"""Secrets stay in: what comes from the environment or a secret file is never printed, written or pushed.

Unit tests of the one mechanism (qctrain.secretmask) and of the recipe's refusals, then the acceptance test: a
run whose environment holds secrets and whose data quotes them, through validate, check, prepare and train; no
secret in any stream or in any file under output.dir."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_recipe
from qctrain import secretmask
from qctrain.atomic import write_json_atomic
from qctrain.errors import InputError
from qctrain.recipe import load_recipe

HF = "hf_Zq7Xw2Lp9Rt4Vb8Nm3Kc6Jd1Hg5Fs0Ae"  # token-shaped: 34 characters after hf_
ORG = "api_org_" + "Yt5Ur7Ie9Ow2Pq4As6Df8Gh1Jk3"
OTHER_HF = "hf_" + "Tu8Yi3Op6Aa2Ss5Dd9Ff1Gg4Hh7Jj0Kk"  # token-shaped, in no variable
AWS = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"  # not token-shaped: only its value says it is secret
WANDB = "wb-6a1f0c9e2d4b8a7f3e5c"
FROM_FILE = "filesecret-3c8d1e9b7a2f"  # in the file HF_TOKEN_FILE names, not in the environment itself
MINIMAL = {"model": {"name": "org/model"}, "data": {"sources": [{"path": "d.json"}]}, "output": {"dir": "out"}}


def secret_env(tmp_path: Path) -> dict[str, str]:
    token_file = tmp_path / "secrets" / "hf-token"
    token_file.parent.mkdir(exist_ok=True)
    token_file.write_text(FROM_FILE + "\n")
    return {"HF_TOKEN": HF, "HF_TOKEN_FILE": str(token_file), "AWS_SECRET_ACCESS_KEY": AWS,
            "WANDB_API_KEY": WANDB, "HF_HOME": str(tmp_path / "hf-home")}


SECRETS = (HF, OTHER_HF, ORG, AWS, WANDB, FROM_FILE)


# --- which names and values are secret --------------------------------------------------------------

@pytest.mark.parametrize("name", ["HF_TOKEN", "HF_TOKEN_FILE", "HF_TOKEN_PATH", "WANDB_API_KEY", "GITHUB_TOKEN",
                                  "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY",
                                  "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "OPENAI_APIKEY", "HFTOKEN",
                                  "DB_PASSWD", "GOOGLE_APPLICATION_CREDENTIALS", "hf_token", "CLIENT_SECRET"])
def test_secret_names(name):
    assert secretmask.is_secret_name(name)


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "MAX_TOKENS", "PATH", "HOME", "AWS_REGION",
                                  "AWS_PROFILE", "MODEL_REVISION", "KEYRING_BACKEND", "QCTRAIN_TEST_OUT"])
def test_ordinary_names(name):
    assert not secretmask.is_secret_name(name)


def test_mask_finds_known_values_anywhere_in_a_line(tmp_path):
    env = secret_env(tmp_path)
    text = f"run_{HF}_v2 x{AWS}y key={WANDB}; file:{FROM_FILE}. {ORG} git https://x-access-token:ghs_abc@github.com/o/r"
    masked = secretmask.mask(text, env=env)
    for secret in (*SECRETS, "ghs_abc"):
        assert secret not in masked, masked
    assert masked.startswith("run_***_v2 x***y key=***; file:***.")
    assert "https://***@github.com/o/r" in masked
    assert env["HF_TOKEN_FILE"] in secretmask.mask(env["HF_TOKEN_FILE"], env=env)  # the path is not the secret


def test_short_and_flag_values_are_not_masked():
    env = {"HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "SOME_KEY": "true", "TOKENIZERS_PARALLELISM": "false"}
    assert secretmask.mask("loss 1.0, true, false", env=env) == "loss 1.0, true, false"


def test_a_token_file_that_is_a_fifo_does_not_block(tmp_path):
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    assert secretmask.known_secrets({"HF_TOKEN_FILE": str(fifo), "HF_HOME": str(tmp_path)}) == {}
    from qctrain.hubtoken import resolve_token
    with pytest.raises(InputError, match="FIFO"):
        resolve_token({"HF_TOKEN_FILE": str(fifo)})


def test_the_hub_token_file_is_masked(tmp_path):
    (tmp_path / "token").write_text("hubfile-secret-0042\n")
    assert secretmask.mask("x hubfile-secret-0042 y", env={"HF_HOME": str(tmp_path)}) == "x *** y"


def test_json_files_are_masked_even_where_json_escapes_the_secret(tmp_path, monkeypatch):
    quoted = 'pa"ss\\word-123'
    monkeypatch.setenv("DB_PASSWORD", quoted)
    monkeypatch.setenv("WANDB_API_KEY", WANDB)
    path = tmp_path / "report.json"
    write_json_atomic(path, {"examples": [f"line 3: {WANDB}", f"x{quoted}y"], WANDB: 1, "hub": f"{HF}!", "n": 2})
    text = path.read_text()
    assert WANDB not in text and "pa\\\"ss" not in text and HF not in text
    assert json.loads(text) == {"examples": ["line 3: ***", "x***y"], "***": 1, "hub": "hf_***!", "n": 2}
    write_json_atomic(path, {"plain": [1, 2, 3]})  # nothing secret: written as it is
    assert json.loads(path.read_text()) == {"plain": [1, 2, 3]}


def test_error_lines_and_argparse_errors_are_masked(tmp_path, monkeypatch, capfd):
    from qctrain.cli import main

    monkeypatch.setenv("WANDB_API_KEY", WANDB)
    assert main(["validate", str(tmp_path / f"{WANDB}.yaml")]) == 2
    assert main(["validate", str(tmp_path / f"{HF}.yaml")]) == 2
    with pytest.raises(SystemExit):
        main(["generate", "out", "--max-new-tokens", WANDB, "--prompt", "x"])
    captured = capfd.readouterr()
    assert captured.err.count("recipe file not found") == 2 and "***" in captured.err
    assert WANDB not in captured.out + captured.err and HF not in captured.out + captured.err


def test_commit_messages_are_masked(tmp_path, monkeypatch):
    from hub_double import HubDouble, Token, point_client_at
    from qctrain.publish import RetryPolicy, push_output

    token = "hf_FAKEsecretstest_DO_NOT_LEAK_1"
    monkeypatch.setenv("WANDB_API_KEY", WANDB)
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text('{"r": 4}')
    (out / "run_manifest.json").write_text(json.dumps({"run_id": f"run-{HF}", "recipe_sha256": "ab" * 32}))
    with HubDouble({token: Token("alice")}) as hub:
        point_client_at(hub, monkeypatch, tmp_path / "hf-home")
        push_output(out, "alice/a", token, retry=RetryPolicy(attempts=1))
        (out / "adapter" / "adapter_config.json").write_text('{"r": 8}')  # a change, so a second commit
        push_output(out, "alice/a", token, commit_message=f"again {WANDB} {token}", retry=RetryPolicy(attempts=1))
        messages = [c.message for c in hub.history("alice/a")]
    assert "qctrain: adapter from run run-hf_*** (recipe abababababab)" in messages
    assert any(m.startswith("again *** ***") for m in messages), messages
    assert not any(s in m for m in messages for s in (HF, WANDB, token))


# --- the recipe refuses secrets, naming the place and the variable, never the value ------------------

SPLICED = {  # how a secret gets into a recipe value -> the line that refuses it
    "ref": ({"train": {"run_name": "run_${HF_TOKEN}_v2"}}, [], "train.run_name: ${HF_TOKEN} names a secret"),
    "aws-ref": ({"data": {"sources": [{"path": "${AWS_SECRET_ACCESS_KEY}.jsonl"}]}}, [],
                "data.sources[0].path: ${AWS_SECRET_ACCESS_KEY} names a secret"),
    "set": ({}, [f"train.run_name=x_{OTHER_HF}"], "train.run_name: never put a Hub token in a recipe"),
    "set-env": ({}, [f"train.run_name=x_{HF}"], "train.run_name: holds the value of HF_TOKEN, a secret"),
    "org": ({}, [f"train.run_name={ORG}"], "train.run_name: never put a Hub token in a recipe"),
    "typed": ({"train": {"run_name": f"my-{WANDB}"}}, [],
              "train.run_name: holds the value of WANDB_API_KEY, a secret"),
    "via-other-var": ({"train": {"run_name": "${RUN}"}}, [],
                      "train.run_name: holds the value of AWS_SECRET_ACCESS_KEY"),
    "file": ({"train": {"run_name": f"{FROM_FILE}"}}, [], "train.run_name: holds the value of the file HF_TOKEN_FILE"),
    "key": ({"train": {"lr_scheduler_kwargs": {f"k{HF}": 1}}}, [], "train.lr_scheduler_kwargs.<a key>: "),
}


@pytest.mark.parametrize("case", SPLICED)
def test_recipe_with_a_secret_is_refused_without_showing_it(case, tmp_path):
    extra, overrides, expected = SPLICED[case]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, **extra}))
    env = {**secret_env(tmp_path), "RUN": f"r-{AWS}"}
    with pytest.raises(InputError) as err:
        load_recipe(path, overrides, env=env)
    lines = str(err.value).splitlines()
    assert any(expected in line for line in lines), lines
    assert not any(s in str(err.value) for s in SECRETS)


@pytest.mark.parametrize("command", ["validate", "check", "prepare", "train"])
def test_commands_refuse_spliced_secrets_and_print_none(command, tmp_path, monkeypatch, capfd):
    from qctrain.cli import main

    for name, value in secret_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    for case, (extra, overrides, expected) in SPLICED.items():
        if case in ("via-other-var", "key"):
            continue
        path = tmp_path / f"{case}.yaml"
        path.write_text(yaml.safe_dump({**MINIMAL, **extra, "output": {"dir": str(out)}}))
        args = [a for o in overrides for a in ("--set", o)]
        assert main([command, str(path), *args]) == 2, case
        captured = capfd.readouterr()
        assert expected in captured.err, captured.err
        assert not any(s in captured.out + captured.err for s in SECRETS), captured.err
    assert not out.exists()


# --- acceptance: a whole run with secrets around ---------------------------------------------------

def secret_data(path: Path) -> Path:
    """Records that quote every secret (in prompts, answers, a bad record's field), as users' data may."""
    rows = []
    for i in range(40):
        secret = SECRETS[i % len(SECRETS)]
        rows.append({"instruction": f"Question {i}: what is {secret}?", "output": f"Answer {i} quotes {secret}."})
    lines = [json.dumps(r) for r in rows]
    lines.append(json.dumps({"instruction": f"bad {AWS}", "output": ["a list"]}))
    lines.append(f'{{"instruction": "{WANDB} broken json')
    path.write_text("\n".join(lines) + "\n")
    return path


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_no_secret_in_any_stream_or_file_of_a_run(tmp_path, tiny_model_dir):
    env = {**os.environ, **secret_env(tmp_path), "PYTHONPATH": str(REPO / "entrypoint"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, secret_data(tmp_path / "data.jsonl"), out,
                          data={"on_bad_record": "skip", "eval": {"fraction": 0.2}},
                          train={"max_steps": 4, "save_steps": 2, "logging_steps": 1})
    streams = []
    for command in ("validate", "check", "prepare", "train"):
        proc = subprocess.run([sys.executable, "-m", "qctrain", command, str(recipe)], env=env, cwd=REPO,
                              capture_output=True, timeout=600)
        assert proc.returncode == 0, (command, proc.stderr.decode()[-2000:])
        streams.append(proc.stdout + proc.stderr)
    files = all_files(out)
    written = b"".join(streams) + b"".join(files.values())
    for secret in SECRETS:
        assert secret.encode() not in written, [n for n, b in files.items() if secret.encode() in b]
    # The run did write what quotes the data (so the check above had something to find): masked, not missing.
    assert {"run_manifest.json", "data_report.json", "README.md", "metrics.jsonl"} <= set(files)
    assert any(n.startswith("checkpoints/") and n.endswith("qctrain_checkpoint.json") for n in files), list(files)
    assert "what is ***?" in files["data_report.json"].decode()  # the held-out prompts quote the data
    assert "what is ***?" in files["README.md"].decode()  # the card's sample generations
    assert b"quotes ***." in streams[2]  # prepare printed a sample that quoted a secret


def test_debug_tracebacks_are_masked(tmp_path, monkeypatch, capfd):
    """An internal error under --debug: the whole traceback, with the secret it quotes masked."""
    from qctrain import cli

    def broken(args):
        raise RuntimeError(f"library failed talking to https://user:{WANDB}@example.com with {HF}")

    monkeypatch.setenv("WANDB_API_KEY", WANDB)
    monkeypatch.setattr(cli, "cmd_doctor", broken)
    assert cli.main(["--debug", "doctor"]) == 1
    assert cli.main(["doctor"]) == 1
    err = capfd.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: library failed" in err
    assert "internal error: RuntimeError" in err
    assert WANDB not in err and HF not in err
