"""Multi-node manifests, offline: the plain Indexed Job + headless Service (kubernetes-validate --strict)
and the Kubeflow Trainer v2 TrainJob (jsonschema against the CRD's openAPIV3Schema, in k8s/schemas/),
plus what no schema checks: the rendezvous wiring, the exit-code policy, volumes and recipe accelerate
configs. Nothing here needs a cluster, a GPU or a network.
"""

import copy
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import tool
from qctrain import distributed
from qctrain.errors import ExitCode, InputError

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
MULTI = K8S / "multi-node"
INDEXED_JOB = MULTI / "indexed-job.yaml"
TRAINJOB = MULTI / "trainjob.yaml"
PVC_RWX = MULTI / "pvc-rwx.yaml"
TRAINJOB_CRD = K8S / "schemas" / "trainer.kubeflow.org_trainjobs.yaml"
# Set by Kubeflow Trainer's torch plugin; a TrainJob that sets them itself is rejected by its webhook.
TRAINER_RESERVED_ENV = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                        "PET_MASTER_PORT"}
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def one(path: Path, kind: str) -> dict:
    [doc] = [d for d in docs(path) if d["kind"] == kind]
    return doc


def single_node_job() -> dict:
    return one(K8S / "job.yaml", "Job")


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# --- the Indexed Job and its Service ---

def test_kubernetes_validate_strict():
    # the command k8s/README.md gives
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "k8s/multi-node/indexed-job.yaml",
                             "k8s/multi-node/pvc-rwx.yaml"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # Service, Job, NetworkPolicy, two claims
    assert result.stdout.count(" passed for resource ") == 5, result.stdout


def test_kubernetes_validate_strict_rejects_a_misspelt_field(tmp_path):
    bad = docs(INDEXED_JOB)
    job = next(d for d in bad if d["kind"] == "Job")
    job["spec"]["completionsMode"] = job["spec"].pop("completionMode")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all(bad), encoding="utf-8")
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", str(path)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "completionsMode" in result.stdout + result.stderr


def test_indexed_job_one_pod_per_node_with_static_rendezvous_at_pod_0():
    job, service = one(INDEXED_JOB, "Job"), one(INDEXED_JOB, "Service")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = env_of(container)
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] == int(env["PET_NNODES"]) >= 2
    # Pod i's hostname is <job>-<i>; with subdomain = the headless Service it resolves as <job>-<i>.<svc>.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert env["PET_MASTER_ADDR"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    [port] = service["spec"]["ports"]
    assert int(env["PET_MASTER_PORT"]) == port["port"] == port["targetPort"]
    assert port["port"] in [p["containerPort"] for p in container["ports"]]
    assert env["PET_NODE_RANK"] == {"fieldRef": {"fieldPath": COMPLETION_INDEX}}  # node rank = index
    assert container["args"] == ["train", "--nproc", "auto", "/recipes/recipe.yaml"]
    assert "PET_NPROC_PER_NODE" not in env  # --nproc auto: one worker per GPU the pod got
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_indexed_job_has_the_single_node_jobs_exit_code_policy():
    job, reference = one(INDEXED_JOB, "Job"), single_node_job()
    assert job["spec"]["podFailurePolicy"] == reference["spec"]["podFailurePolicy"]
    by_code = {code: rule["action"] for rule in job["spec"]["podFailurePolicy"]["rules"]
               for code in rule.get("onExitCodes", {}).get("values", [])}
    assert by_code[int(ExitCode.BAD_INPUT)] == "FailJob" and by_code[int(ExitCode.PREEMPTED)] == "Ignore"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] >= reference["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"]
    assert pod["containers"][0]["name"] == job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"][
        "containerName"]


def test_indexed_job_pod_is_the_single_node_pod_on_shared_storage():
    pod = one(INDEXED_JOB, "Job")["spec"]["template"]["spec"]
    reference = single_node_job()["spec"]["template"]["spec"]
    assert pod["securityContext"] == reference["securityContext"]
    container, ref_container = pod["containers"][0], reference["containers"][0]
    assert container["securityContext"] == ref_container["securityContext"]
    assert container["image"] == ref_container["image"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert set(mounts) == {m["mountPath"] for m in ref_container["volumeMounts"]}
    rank_env = {k: v for k, v in env_of(container).items() if not k.startswith("PET_")}
    assert rank_env == env_of(ref_container)
    check_volumes(pod["volumes"], container["volumeMounts"])


def check_volumes(volumes: list[dict], mounts: list[dict]) -> None:
    """Every mount has a volume; /out and /data on a ReadWriteMany claim; ConfigMap/Secret exist."""
    by_name = {v["name"]: v for v in volumes}
    assert {m["name"] for m in mounts} <= set(by_name)
    claims = {d["metadata"]["name"]: d for d in docs(PVC_RWX)}
    assert all(c["spec"]["accessModes"] == ["ReadWriteMany"] for c in claims.values())
    for mount in mounts:
        volume = by_name[mount["name"]]
        if mount["mountPath"] in ("/out", "/data", "/cache/huggingface"):
            assert volume["persistentVolumeClaim"]["claimName"] in claims, mount
    single = {(d["kind"], d["metadata"]["name"]) for p in K8S.glob("*.yaml") for d in docs(p)}
    for volume in volumes:
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in single
        if "secret" in volume:
            assert ("Secret", volume["secret"]["secretName"]) in single
    shm = next(v for v in volumes if v["name"] == next(m["name"] for m in mounts if m["mountPath"] == "/dev/shm"))
    assert shm["emptyDir"]["medium"] == "Memory"


# --- the TrainJob ---

def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields rejected (what the API server's strict field validation does;
    structural schemas otherwise prune them silently)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(schema)
    return schema


@pytest.fixture(scope="module")
def trainjob_validator():
    jsonschema = pytest.importorskip("jsonschema")
    [crd] = docs(TRAINJOB_CRD)
    assert crd["spec"]["names"]["kind"] == "TrainJob"
    [version] = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    assert version["name"] == "v1alpha1"
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "namespace": {"type": "string"}}, "additionalProperties": False}
    return jsonschema.Draft7Validator(schema)


def test_trainjob_validates_against_the_crd_schema(trainjob_validator):
    doc = one(TRAINJOB, "TrainJob")
    [crd] = docs(TRAINJOB_CRD)
    assert doc["apiVersion"] == f"{crd['spec']['group']}/v1alpha1"
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in trainjob_validator.iter_errors(doc)]
    assert errors == []


@pytest.mark.parametrize("path, value", [
    (("spec", "trainer", "numNode"), 2),                      # misspelt field
    (("spec", "trainer", "numNodes"), "two"),                 # wrong type
    (("spec", "runtimeRef", "name"), ""),                     # below minLength
    (("spec", "trainer", "resourcesPerNode", "limits", "nvidia.com/gpu"), "4 GPUs"),  # not a quantity
    # runtimePatches may not change the image (only pod-level fields and env/mounts/security)
    (("spec", "runtimePatches", 0, "trainingRuntimeSpec", "template", "spec", "replicatedJobs", 0, "template",
      "spec", "template", "spec", "containers", 0, "image"), "other:latest"),
])
def test_the_trainjob_validator_is_strict(trainjob_validator, path, value):
    doc = one(TRAINJOB, "TrainJob")
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert list(trainjob_validator.iter_errors(doc)), path


def test_trainjob_runs_qctrain_on_the_torch_distributed_runtime():
    spec = one(TRAINJOB, "TrainJob")["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "torch-distributed"}
    trainer = spec["trainer"]
    entrypoint = re.findall(r"^ENTRYPOINT (.+)$", (ROOT / "docker" / "Dockerfile").read_text(), flags=re.M)[-1]
    assert trainer["command"] == json.loads(entrypoint)  # the image's entrypoint, exactly
    assert trainer["args"] == ["train", "--nproc", "auto", "/recipes/recipe.yaml"]
    assert trainer["numNodes"] >= 2
    assert int(trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]) >= 1
    assert not TRAINER_RESERVED_ENV & {e["name"] for e in trainer["env"]}
    assert trainer["image"] == single_node_job()["spec"]["template"]["spec"]["containers"][0]["image"]


def test_trainjob_patches_the_runtimes_node_pod_like_the_single_node_pod():
    [patch] = one(TRAINJOB, "TrainJob")["spec"]["runtimePatches"]
    [replicated] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == "node"  # torch-distributed's replicated job and container are `node`
    pod = replicated["template"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["name"] == "node"
    reference = single_node_job()["spec"]["template"]["spec"]
    assert pod["securityContext"] == reference["securityContext"]
    assert container["securityContext"] == reference["containers"][0]["securityContext"]
    assert pod["terminationGracePeriodSeconds"] >= reference["terminationGracePeriodSeconds"]
    env = {e["name"]: e.get("value") for e in one(TRAINJOB, "TrainJob")["spec"]["trainer"]["env"]}
    assert env == env_of(reference["containers"][0])
    check_volumes(pod["volumes"], container["volumeMounts"])


def test_the_crd_copy_keeps_its_licence():
    assert "Apache License" in (K8S / "schemas" / "LICENSE").read_text(encoding="utf-8")
    assert "Licensed under the Apache License" in TRAINJOB_CRD.read_text(encoding="utf-8")[:1000]


# --- what torchrun makes of the environment both manifests give a pod ---

def rendezvous_of(env: dict) -> dict:
    """The torchrun arguments `qctrain train --nproc 4 R` ends up with in a pod with this environment."""
    from torch.distributed.run import parse_args

    cmd = distributed.launch_command(["train", "/recipes/recipe.yaml"], 4, env=env, python="python")
    assert cmd[1:3] == ["-m", "qctrain.distributed"]
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, env, clear=False):
        args = parse_args(cmd[3:])
    return {"standalone": args.standalone, "nnodes": args.nnodes, "node_rank": args.node_rank,
            "master_addr": args.master_addr, "master_port": args.master_port, "backend": args.rdzv_backend,
            "nproc": args.nproc_per_node, "module": args.module, "script": [args.training_script,
                                                                              *args.training_script_args]}


def test_indexed_job_pod_gets_a_static_rendezvous_with_node_rank_from_its_index():
    job = one(INDEXED_JOB, "Job")
    env = {k: v for k, v in env_of(job["spec"]["template"]["spec"]["containers"][0]).items()
           if k.startswith("PET_")}
    env["PET_NODE_RANK"] = "1"  # what the kubelet puts there for the pod of index 1
    assert rendezvous_of(env) == {
        "standalone": False, "nnodes": "2", "node_rank": 1, "master_addr": "qctrain-multinode-0.qctrain-multinode",
        "master_port": 29500, "backend": "static", "nproc": "4", "module": True,
        "script": ["qctrain", "train", "/recipes/recipe.yaml"]}


def test_trainjob_pod_gets_the_rendezvous_kubeflow_trainer_sets():
    name = one(TRAINJOB, "TrainJob")["metadata"]["name"]
    # What Trainer's torch plugin sets (pkg/runtime/framework/plugins/torch/torch.go): pod 0 of the
    # `node` replicated job as master, its trainer port 29400, the completion index as node rank.
    env = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "auto", "PET_NODE_RANK": "0",
           "PET_MASTER_ADDR": f"{name}-node-0-0.{name}", "PET_MASTER_PORT": "29400"}
    got = rendezvous_of(env)
    assert got["standalone"] is False and got["backend"] == "static" and got["nnodes"] == "2"
    assert got["master_addr"] == f"{name}-node-0-0.{name}" and got["master_port"] == 29400
    assert got["nproc"] == "4"  # --nproc auto (resolved to the pod's GPUs) wins over PET_NPROC_PER_NODE


# --- accelerate configs and the FSDP recipe ---

ACCELERATE = ROOT / "recipes" / "accelerate"
FSDP_RECIPE = ROOT / "recipes" / "examples" / "fsdp-qlora.yaml"


@pytest.mark.parametrize("name, kind", [("ddp.yaml", "MULTI_GPU"), ("fsdp_qlora.yaml", "FSDP")])
def test_accelerate_configs_load_as_accelerate_reads_them(name, kind):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE / name), "-m", "qctrain",
                                               "train", "r.yaml"])
    args, _, _ = _validate_launch_command(args)  # rejects unknown keys and bad values
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # precision comes from the recipe (train.bf16)
    if kind == "FSDP":
        from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment

        assert env["ACCELERATE_USE_FSDP"] == "true"
        with patch_environment(**env):
            plugin = FullyShardedDataParallelPlugin()  # what the Trainer builds from that environment
        assert plugin.fsdp_version == 2 and plugin.activation_checkpointing is True
        assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    else:
        assert args.multi_gpu and not args.use_fsdp


def test_fsdp_recipe_stores_4bit_weights_in_the_compute_dtype(tmp_path, monkeypatch):
    import torch
    from qctrain.basemodel.load import bnb_config
    from qctrain.recipe import load_recipe
    from qctrain.train import sft_config

    recipe = load_recipe(FSDP_RECIPE)
    quant = recipe.model.quantization
    assert quant.storage_dtype == quant.compute_dtype == "bfloat16"
    assert bnb_config(recipe.model).bnb_4bit_quant_storage == torch.bfloat16
    with monkeypatch.context() as patched:
        patched.setenv("WORLD_SIZE", "2")  # as under torchrun
        distributed.check_fsdp(recipe, env={})  # passes
    args = sft_config(recipe, tmp_path, has_eval=True)
    assert args.fsdp and args.fsdp_plugin_args["fsdp_version"] == 2
    from accelerate.utils import FullyShardedDataParallelPlugin

    FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)  # the plugin the Trainer would build
    # the same recipe without FSDP keeps bitsandbytes' default storage
    plain = load_recipe(ROOT / "recipes" / "phi-3.5-mini-qlora.yaml")
    assert bnb_config(plain.model).bnb_4bit_quant_storage == torch.uint8


def test_fsdp_with_mismatched_storage_or_8bit_or_one_process_is_refused(monkeypatch):
    from qctrain.recipe import load_recipe

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(InputError, match="--nproc"):  # FSDP in one process: say how to launch it
        distributed.check_fsdp(load_recipe(FSDP_RECIPE), env={})
    monkeypatch.setenv("WORLD_SIZE", "2")
    plain = load_recipe(ROOT / "recipes" / "phi-3.5-mini-qlora.yaml")
    distributed.check_fsdp(plain, env={})  # no FSDP: nothing to check
    with pytest.raises(InputError, match=r"storage_dtype: .*set storage_dtype: bfloat16"):
        distributed.check_fsdp(plain, env={"ACCELERATE_USE_FSDP": "true"})  # accelerate launch + FSDP config
    fsdp = load_recipe(FSDP_RECIPE, ["model.quantization.storage_dtype=float16"])
    with pytest.raises(InputError, match="storage_dtype"):
        distributed.check_fsdp(fsdp, env={})
    eight = load_recipe(FSDP_RECIPE, ["model.quantization.bits=8"])
    with pytest.raises(InputError, match="bits: FSDP needs 4-bit"):
        distributed.check_fsdp(eight, env={})


def test_manifest_names_are_dns_labels():
    for path in (INDEXED_JOB, TRAINJOB, PVC_RWX):
        for doc in docs(path):
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
            assert len(doc["metadata"]["name"]) <= 50  # room for "-<index>" hostnames and pod suffixes


# --- who may reach the pods, and what they carry ---

def test_network_policies_admit_only_the_jobs_own_pods():
    """The ranks trust their peers (the rendezvous store, all_gather_object unpickles what they send): only
    the run's own pods may connect to them, from the same namespace, on any port (NCCL/gloo pick theirs)."""
    job, service = one(INDEXED_JOB, "Job"), one(INDEXED_JOB, "Service")
    trainjob = one(TRAINJOB, "TrainJob")
    for path, own in ((INDEXED_JOB, {"batch.kubernetes.io/job-name": job["metadata"]["name"]}),
                      (TRAINJOB, {"jobset.sigs.k8s.io/jobset-name": trainjob["metadata"]["name"]})):
        policy = one(path, "NetworkPolicy")["spec"]
        assert policy["podSelector"] == {"matchLabels": own}
        assert policy["policyTypes"] == ["Ingress"]
        assert policy["ingress"] == [{"from": [{"podSelector": {"matchLabels": own}}]}]  # no namespace, no ipBlock
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}


def test_pods_mount_no_service_account_token():
    for pod in (single_node_job()["spec"]["template"]["spec"], one(INDEXED_JOB, "Job")["spec"]["template"]["spec"]):
        assert pod["automountServiceAccountToken"] is False
    # A TrainJob's runtimePatches cannot set the pod field: its ServiceAccount says it instead.
    [patch] = one(TRAINJOB, "TrainJob")["spec"]["runtimePatches"]
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    account = one(TRAINJOB, "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["automountServiceAccountToken"] is False


def test_trainjob_companions_validate_strict(tmp_path):
    """The ServiceAccount and NetworkPolicy beside the TrainJob (kubernetes-validate has no TrainJob schema)."""
    path = tmp_path / "companions.yaml"
    path.write_text(yaml.safe_dump_all([d for d in docs(TRAINJOB) if d["kind"] != "TrainJob"]), encoding="utf-8")
    result = subprocess.run([tool("kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.count(" passed for resource ") == 2, result.stdout


@pytest.mark.parametrize("path", [K8S / "job.yaml", INDEXED_JOB, TRAINJOB], ids=lambda p: p.name)
def test_examples_show_the_image_pinned_by_digest(path):
    text = path.read_text(encoding="utf-8")
    image_line = next(i for i, line in enumerate(text.splitlines()) if re.match(r"\s*image: ", line))
    above = "\n".join(text.splitlines()[image_line - 3:image_line])
    assert re.search(r"#\s+image: ghcr\.io/OWNER/qc-train-phi:[\w.]+@sha256:<", above), above
