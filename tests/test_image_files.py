"""Static checks of the image's files: Dockerfile, lock, .dockerignore, scripts, compose, k8s, CI.

Pure Python except where a linter/validator is installed (hadolint, shellcheck, docker-compose,
kubernetes-validate): those tests skip with the reason when the tool is absent. No test here
installs anything or needs a Docker engine (see test_docker_image.py for the built image).
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tool
from qctrain.errors import ExitCode

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
LOCK = DOCKER / "requirements.lock"
REQUIREMENTS_IN = DOCKER / "requirements.in"
K8S = ROOT / "k8s"
WORKFLOWS = ROOT / ".github" / "workflows"

# The known-good stack the image is locked to.
KNOWN_GOOD = {
    "torch": "2.13.0",
    "transformers": "5.24.0",
    "trl": "1.16.0",
    "peft": "0.21.2",
    "bitsandbytes": "0.50.2",
    "accelerate": "1.15.0",
    "datasets": "5.2.0",
    "huggingface-hub": "2.4.0",
}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    joined = re.sub(r"\\\n", " ", code)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line:
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, list[str]]:
    """name -> versions pinned in the lock (two entries only where markers split a package)."""
    pins: dict[str, list[str]] = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)", line)
        if m:
            pins.setdefault(normalize(m.group(1)), []).append(m.group(2))
    return pins


# ------------------------------------------------------------------------------------- Dockerfile


def test_base_image_is_cuda_base_ubuntu_2404_pinned_by_digest():
    first = dockerfile_instructions()[0]
    assert first[0] == "ARG" and first[1].startswith("BASE_IMAGE="), "ARG BASE_IMAGE must come first"
    base = first[1].split("=", 1)[1]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-base-ubuntu24\.04@sha256:[0-9a-f]{64}", base), base
    froms = [args for word, args in dockerfile_instructions() if word == "FROM"]
    assert froms[0].startswith("${BASE_IMAGE}")


def test_multi_stage_wheel_then_runtime():
    froms = [args for word, args in dockerfile_instructions() if word == "FROM"]
    assert len(froms) >= 3
    names = [f.split(" AS ")[-1].strip() for f in froms if " AS " in f]
    assert {"os", "wheel", "runtime"} <= set(names)
    assert froms[-1].endswith("AS runtime"), "the runtime stage must be last (the default target)"


def test_runtime_stage_installs_locked_hash_checked_wheels_once():
    text = DOCKERFILE.read_text(encoding="utf-8")
    runtime = text[text.index("AS runtime") :]
    assert runtime.count("python3 -m venv /opt/venv") == 1
    assert "--require-hashes" in runtime and "/tmp/requirements.lock > /tmp/wheels.lock" in runtime
    assert "--only-binary=:all:" in runtime and "-r /tmp/wheels.lock" in runtime  # no sdist builds, no compilers
    # the few sdist-only packages: wheels built in their own stage from the lock's hash-checked sdists
    sdists = text[text.index("AS sdists"):text.index("AS wheel")]
    assert "--require-hashes" in sdists and "/tmp/requirements.lock" in sdists and "--no-build-isolation" in sdists
    assert "--mount=type=cache,target=/root/.cache/pip" in runtime  # cache never in a layer
    assert "COPY --from" not in runtime, "the venv is built in place, never copied between stages"
    # every other pip install in the image has --no-cache-dir or a cache mount
    for word, args in dockerfile_instructions():
        if word == "RUN" and "pip install" in args:
            assert "--no-cache-dir" in args or "type=cache" in args, args


def test_no_compilers_or_secrets_in_the_image():
    text = DOCKERFILE.read_text(encoding="utf-8")
    for package in ("build-essential", "gcc", "g++", "python3-dev", "cuda-nvcc"):
        assert not re.search(rf"apt-get install[^\n]*\b{re.escape(package)}\b", text), package
    for word, args in dockerfile_instructions():
        if word in ("ARG", "ENV"):
            assert not re.search(r"\bHF_TOKEN\b|TOKEN=|PASSWORD", args), f"{word} {args}"


def test_entrypoint_tini_qctrain_and_help_by_default():
    instructions = dockerfile_instructions()
    entry = [args for word, args in instructions if word == "ENTRYPOINT"]
    cmd = [args for word, args in instructions if word == "CMD"]
    assert json.loads(entry[-1]) == ["/usr/bin/tini", "--", "qctrain-entrypoint"]
    # the entrypoint script applies CUDA forward compatibility, then execs qctrain with the arguments
    script = (DOCKER / "entrypoint.sh").read_text(encoding="utf-8")
    assert script.rstrip().endswith('exec "$VENV/bin/python3" -m qctrain.cudacompat exec -- "$VENV/bin/qctrain" "$@"')
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert "VENV=${QCTRAIN_VENV:-/opt/venv}" in script and "python3 -m venv /opt/venv" in dockerfile
    assert "COPY docker/entrypoint.sh /usr/local/bin/qctrain-entrypoint" in dockerfile
    assert json.loads(cmd[-1]) == ["--help"]
    assert "tini" in DOCKERFILE.read_text(encoding="utf-8").split("AS wheel")[0]  # installed in os


def test_non_root_fixed_uid_and_writable_dirs_for_any_uid():
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for w, a in instructions if w == "ARG" and a.startswith("APP_"))
    assert args == {"APP_UID": "10001", "APP_GID": "10001"}
    user = [a for w, a in instructions if w == "USER"][-1]
    assert user == "${APP_UID}:${APP_GID}"
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"chmod 1777 [^\n]*/home/qctrain[^\n]*/out[^\n]*/models[^\n]*/cache/huggingface", text)
    env = " ".join(a for w, a in instructions if w == "ENV")
    for setting in ("HOME=/home/qctrain", "HF_HOME=/cache/huggingface", "XDG_CACHE_HOME=/cache",
                    "MPLCONFIGDIR=/tmp/matplotlib", "PATH=/opt/venv/bin:$PATH"):
        assert setting in env, setting
    assert not [a for w, a in instructions if w == "VOLUME"], "VOLUME leaks an anonymous volume per run"


def test_mount_points_exist():
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"mkdir -p /recipes /data /out /models /cache/huggingface", text)


def test_provenance_labels_and_env_from_build_args():
    instructions = dockerfile_instructions()
    labels = " ".join(a for w, a in instructions if w == "LABEL")
    for key, arg in (("source", "SOURCE_URL"), ("revision", "GIT_REVISION"), ("version", "VERSION"),
                     ("created", "BUILD_DATE")):
        assert f'org.opencontainers.image.{key}="${{{arg}}}"' in labels, key
    env = " ".join(a for w, a in instructions if w == "ENV")
    assert "QCTRAIN_GIT_REVISION=${GIT_REVISION}" in env
    assert "QCTRAIN_IMAGE_VERSION=${VERSION}" in env
    assert "QCTRAIN_BUILD_DATE=${BUILD_DATE}" in env
    # provenance comes after the big layers, so a new commit does not rebuild the venv
    words = [w for w, _ in instructions]
    text_runs = [a for w, a in instructions if w == "RUN"]
    assert any("requirements.lock" in r for r in text_runs)
    assert words.index("LABEL") > max(i for i, (w, a) in enumerate(instructions) if "pip install" in a)


def test_dockerfile_copies_only_allowed_context():
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [r.strip() for r in ignore if r.strip() and not r.startswith("#")]
    assert rules[0] == "*", ".dockerignore is an allow-list"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "entrypoint", "docker/requirements.lock", "docker/entrypoint.sh",
                       "docker/left-out.txt"}
    for never in (".venv", ".git", "out", "models", ".env", "data"):
        assert never not in allowed
    for word, args in dockerfile_instructions():
        if word == "COPY" and "--from" not in args:
            for src in args.split()[:-1]:
                assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"
        if word == "RUN":
            for src in re.findall(r"type=bind,source=([^,\s]+)", args):
                assert src in allowed or "from=" in args, src


def test_hadolint_passes_and_ignores_are_justified():
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            # the comment block right above must say why
            assert lines[i - 1].startswith("#") and "DL" in " ".join(lines[max(0, i - 4) : i]), line
    result = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ lock


def test_lock_is_fully_hashed():
    text = LOCK.read_text(encoding="utf-8")
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1] if text.startswith("#") else text)
    reqs = [b for b in blocks if re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==", b)]
    assert len(reqs) > 50
    for block in reqs:
        assert "--hash=sha256:" in block, block.splitlines()[0]


def test_lock_pins_the_known_good_stack():
    pins = lock_pins()
    for name, version in KNOWN_GOOD.items():
        assert pins.get(name) == [version], (name, pins.get(name))
    for name in ("pydantic", "pyyaml", "matplotlib", "setuptools"):  # setuptools builds our wheel
        assert name in pins, name
    # torch's CUDA runtime comes as wheels, for linux only
    assert any(n.startswith("nvidia-cublas") for n in pins)


def test_requirements_in_pins_match_the_lock():
    pins = lock_pins()
    for line in REQUIREMENTS_IN.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            assert pins.get(normalize(name)) == [version], (name, pins.get(normalize(name)))


def test_lock_covers_python_311_and_312():
    text = LOCK.read_text(encoding="utf-8")
    assert "--universal" in text and "--python-version 3.11" in text
    # every package has one version for both Pythons (one set in dev venv, CI image, CUDA image)
    split = {name: versions for name, versions in lock_pins().items() if len(versions) > 1}
    assert not split, split


def test_lock_turns_into_pip_constraints():
    out = subprocess.run([sys.executable, str(DOCKER / "lock_to_constraints.py"), str(LOCK)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out and all(re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==\S+( ;.*)?$", line) for line in out)
    assert "torch==2.13.0" in out


# --------------------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("script", ["build-image.sh", "smoke.sh", "ci.sh", "lock.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(DOCKER / script)], check=True)


def test_scripts_pass_shellcheck():
    scripts = [str(p) for p in sorted(DOCKER.glob("*.sh"))]
    result = subprocess.run([tool("shellcheck"), *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_build_uses_buildkit_client_and_provenance_args():
    text = (DOCKER / "build-image.sh").read_text(encoding="utf-8")
    assert "/usr/bin/docker" in text and "DOCKER_BUILDKIT=1" in text
    for arg in ("GIT_REVISION", "VERSION", "BUILD_DATE", "SOURCE_URL", "BASE_IMAGE"):
        assert f'"{arg}=$' in text, arg


def test_smoke_runs_offline_as_caller_and_checks_outputs():
    text = (DOCKER / "smoke.sh").read_text(encoding="utf-8")
    for needle in ("--network none", '--user "$uid:$gid"', "tiny-model /models/tiny-phi3",
                   "train /recipes/smoke.yaml", "adapter", "README.md", "run_manifest.json",
                   "doctor", "--help", "! -uid"):
        assert needle in text, needle


def test_ci_script_builds_local_base_and_checks_size():
    text = (DOCKER / "ci.sh").read_text(encoding="utf-8")
    assert re.search(r'tar [^\n]*-c \. \| "\$DOCKER" import', text)
    for needle in ("debootstrap --variant=minbase", "docker.io", "SSL_CERT_FILE",
                   "PIP_CERT", "REQUESTS_CA_BUNDLE", "BASE_IMAGE=", "make image", "make smoke",
                   "docker-compose -f compose.yaml config -q", "builder prune", "image prune",
                   "6500000000"):
        assert needle in text, needle


def smoke_recipes():
    return sorted((DOCKER / "smoke").glob("*.yaml"))


@pytest.mark.parametrize("recipe", smoke_recipes(), ids=lambda p: p.name)
def test_smoke_recipes_follow_the_recipe_schema(recipe):
    from qctrain import recipe as recipes

    if not hasattr(recipes, "load_recipe"):
        pytest.skip("qctrain.recipe.load_recipe not available")
    if recipe.name.startswith("bad-"):
        with pytest.raises(Exception) as err:
            recipes.load_recipe(recipe)
        assert getattr(err.value, "exit_code", None) == ExitCode.BAD_INPUT
    else:
        loaded = recipes.load_recipe(recipe)
        assert loaded.model.name == "/models/tiny-phi3"
        assert loaded.output.dir.startswith("/out/")
        assert all(s.path.startswith("/data/") for s in loaded.data.sources)


# --------------------------------------------------------------------------------------- compose


def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))


def test_compose_train_service_has_gpu_mounts_token_cache_and_shm():
    svc = compose()["services"]["train"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    volumes = svc["volumes"]
    targets = {re.search(r":(/[^:]+)(:ro|:rw)?$", v).group(1): v for v in volumes}
    assert targets["/recipes"].endswith(":ro")
    assert {"/recipes", "/data", "/out", "/cache/huggingface"} <= set(targets)
    assert targets["/cache/huggingface"].startswith("hf-cache:")
    assert "hf-cache" in compose()["volumes"]
    assert svc["shm_size"]
    assert svc["environment"]["HF_TOKEN_FILE"] == "/run/secrets/hf_token"
    assert "hf_token" in svc["secrets"] and "hf_token" in compose()["secrets"]
    assert svc["environment"]["HF_HOME"] == "/cache/huggingface"
    assert svc["command"][0] == "train" and "entrypoint" not in svc  # `run train train /recipes/x`
    assert svc["user"].startswith("${QCTRAIN_UID")
    assert svc["stop_grace_period"]


def test_compose_config_validates_with_docker_compose():
    binary = shutil.which("docker-compose")
    if not binary:
        pytest.skip("docker-compose (Debian's v1 package) is not installed; docker/ci.sh validates it")
    result = subprocess.run([binary, "-f", str(ROOT / "compose.yaml"), "config", "-q"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------- k8s


def k8s_docs() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def the_job() -> dict:
    jobs = [d for (kind, _), d in k8s_docs().items() if kind == "Job"]
    assert len(jobs) == 1
    return jobs[0]


def test_job_failure_policy_follows_exit_codes():
    job = the_job()
    spec = job["spec"]
    assert spec["backoffLimit"] >= 1
    container = spec["template"]["spec"]["containers"][0]["name"]
    rules = spec["podFailurePolicy"]["rules"]
    by_code = {}
    for rule in rules:
        codes = rule.get("onExitCodes")
        if codes:
            assert codes["containerName"] == container and codes["operator"] == "In"
            for code in codes["values"]:
                by_code[code] = rule["action"]
    assert by_code[int(ExitCode.BAD_INPUT)] == "FailJob"
    assert by_code[int(ExitCode.DISK_FULL)] == "FailJob"
    assert by_code[int(ExitCode.NOT_BETTER)] == "FailJob"  # a retry would train the same refused model again
    assert by_code[int(ExitCode.PREEMPTED)] in ("Ignore", "Count")
    assert int(ExitCode.INTERNAL) not in by_code or by_code[int(ExitCode.INTERNAL)] == "Count"
    disruption = [
        r for r in rules if any(c["type"] == "DisruptionTarget" for c in r.get("onPodConditions", []))
    ]
    assert disruption and disruption[0]["action"] in ("Ignore", "Count")
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_job_pod_is_non_root_gpu_with_shm_and_grace_period():
    pod = the_job()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["terminationGracePeriodSeconds"] >= 60
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert mounts["/recipes"]["readOnly"] is True
    assert "configMap" in volumes[mounts["/recipes"]["name"]]
    assert "persistentVolumeClaim" in volumes[mounts["/out"]["name"]]
    assert "persistentVolumeClaim" in volumes[mounts["/cache/huggingface"]["name"]]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "HF_TOKEN" not in env, "the token comes as a file, never as an env value"
    token_dir = str(Path(env["HF_TOKEN_FILE"]).parent)
    assert "secret" in volumes[mounts[token_dir]["name"]] and mounts[token_dir]["readOnly"] is True
    assert env["HF_HOME"] == "/cache/huggingface"
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert "/tmp" in mounts and env["HOME"].startswith("/tmp")
    assert container["args"][0] == "train" and container["args"][1].startswith("/recipes/")


def test_job_references_resolve_to_example_manifests():
    docs = k8s_docs()
    pod = the_job()["spec"]["template"]["spec"]
    for volume in pod["volumes"]:
        if "configMap" in volume:
            cm = docs[("ConfigMap", volume["configMap"]["name"])]
            recipe_file = pod["containers"][0]["args"][1].rsplit("/", 1)[1]
            assert recipe_file in cm["data"]
        if "persistentVolumeClaim" in volume:
            assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in docs
        if "secret" in volume:
            assert ("Secret", volume["secret"]["secretName"]) in docs


def test_configmap_recipe_follows_the_recipe_schema(tmp_path):
    from qctrain import recipe as recipes

    if not hasattr(recipes, "load_recipe"):
        pytest.skip("qctrain.recipe.load_recipe not available")
    cm = next(d for (kind, _), d in k8s_docs().items() if kind == "ConfigMap")
    path = tmp_path / "recipe.yaml"
    path.write_text(cm["data"]["recipe.yaml"], encoding="utf-8")
    loaded = recipes.load_recipe(path)
    assert loaded.output.dir.startswith("/out/")


def test_configmap_recipe_is_the_repository_gpu_recipe_without_hub():
    source = ROOT / "recipes" / "phi-3.5-mini-qlora.yaml"
    if not source.exists():
        pytest.skip(f"{source} is gone; keep k8s/configmap-recipe.yaml in line with a real recipe")
    expected = yaml.safe_load(source.read_text(encoding="utf-8"))
    expected.pop("hub", None)
    cm = next(d for (kind, _), d in k8s_docs().items() if kind == "ConfigMap")
    assert yaml.safe_load(cm["data"]["recipe.yaml"]) == expected, "regenerate k8s/configmap-recipe.yaml"


@pytest.mark.parametrize("manifest", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_manifests_validate_offline_strict(manifest):
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", str(manifest)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------- workflows


def workflow_files():
    return sorted(WORKFLOWS.glob("*.y*ml"))


def test_workflows_pin_third_party_actions_by_sha():
    assert workflow_files()
    for path in workflow_files():
        for uses in re.findall(r"uses:\s*([^\s#]+)", path.read_text(encoding="utf-8")):
            if uses.startswith("./"):
                continue
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", uses), f"{path.name}: {uses}"


def test_workflow_lints_tests_builds_smokes_and_pushes_with_attestations():
    text = "\n".join(p.read_text(encoding="utf-8") for p in workflow_files())
    for needle in ("ruff check", "hadolint docker/Dockerfile", "make test", "make smoke",
                   "kubernetes-validate --strict", "ghcr.io", "sbom: true", "provenance: mode=max",
                   "actions/attest-build-provenance", "refs/heads/main", "refs/tags/v"):
        assert needle in text, needle
    for path in workflow_files():
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert data.get("permissions") == {"contents": "read"}, "least privilege by default"


def test_only_pushes_to_main_and_tags_get_write_permissions():
    """Pull requests run the image job (their Dockerfile, their smoke test) read-only; the one job that may
    push, mint an OIDC token and attest runs for pushes to main and v* tags alone, from the tested image."""
    ci = yaml.safe_load((WORKFLOWS / "ci.yml").read_text(encoding="utf-8"))
    triggers = ci.get("on", ci.get(True))  # YAML 1.1 reads the key `on` as true
    assert "pull_request" in triggers
    writers = {}
    for name, job in ci["jobs"].items():
        permissions = job.get("permissions", ci["permissions"])
        writes = {scope for scope, level in permissions.items() if level == "write"}
        if writes:
            writers[name] = job
            condition = job.get("if", "")
            assert "github.event_name == 'push'" in condition and "refs/heads/main" in condition \
                and "refs/tags/v" in condition, (name, condition)
            steps = yaml.safe_dump(job["steps"])
            assert "make smoke" not in steps and "make test" not in steps, name
    assert set(writers) == {"publish"}
    assert {s for s, level in writers["publish"]["permissions"].items() if level == "write"} == {
        "packages", "id-token", "attestations"}
    image = ci["jobs"]["image"]
    assert image["permissions"] == {"contents": "read"} and "if" not in image
    assert "make smoke" in yaml.safe_dump(image["steps"])
    assert writers["publish"]["needs"] == ["image"]
    verify = next(s for s in writers["publish"]["steps"] if s.get("name") == "Pushed image is the smoke-tested image")
    assert verify["env"]["TESTED"] == "${{ needs.image.outputs.tested }}"


def _public_url(url: str) -> str:
    result = subprocess.run(["bash", "-c", 'source docker/build-image.sh && public_url "$1"', "_", url], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    return result.stdout


@pytest.mark.parametrize("remote, label", [
    ("https://x-access-token:ghs_SECRET0123456789@github.com/acme/qc-train-phi.git",
     "https://github.com/acme/qc-train-phi"),
    ("https://ghp_SECRET0123456789@github.com/acme/qc-train-phi", "https://github.com/acme/qc-train-phi"),
    ("https://oauth2:glpat-SECRET@gitlab.example.com/g/r.git?private_token=SECRET#frag", "https://gitlab.example.com/g/r"),
    ("git@github.com:acme/qc-train-phi.git", "https://github.com/acme/qc-train-phi"),
    ("ssh://git@github.com:22/acme/qc-train-phi.git", "https://github.com/acme/qc-train-phi"),
    ("https://github.com/acme/qc-train-phi", "https://github.com/acme/qc-train-phi"),
    ("", ""),
])
def test_source_label_url_has_no_credentials(remote, label):
    assert _public_url(remote) == label


def test_build_script_labels_the_image_without_the_remotes_credentials(tmp_path):
    """The whole script, with a stand-in docker client that records its arguments."""
    fake = tmp_path / "docker"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {tmp_path / "args"}\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "DOCKER": str(fake), "GIT_REVISION": "abc", "VERSION": "1", "BUILD_DATE": "now",
           "QCTRAIN_SOURCE_URL": "https://x-access-token:ghs_SECRET0123456789@github.com/acme/qc-train-phi.git"}
    subprocess.run(["bash", str(DOCKER / "build-image.sh"), "img:test"], env=env, capture_output=True, check=True)
    args = (tmp_path / "args").read_text()
    assert "SOURCE_URL=https://github.com/acme/qc-train-phi\n" in args and "SECRET" not in args
