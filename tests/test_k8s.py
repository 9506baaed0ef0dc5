"""Kubernetes manifests: every overlay and component renders with the real kustomize, validates
against the Kubernetes schemas, passes checkov, and says what issue 5 and the contract require."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tools import REPO, run_checkov, tool

K8S = REPO / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir() if p.is_dir())
NON_RETRYABLE = {2, 3, 4, 5, 6}  # contract §4
RETRYABLE = {1, 75, 143}
# kubernetes-validate ships only the built-in API schemas; these CRDs are checked by the
# assertions below instead (test_jobset_pod_template_matches_the_base_job).
CRD_KINDS = {"JobSet": "jobset.x-k8s.io CRD: no schema in kubernetes-validate"}


def kubectl() -> str:
    return tool("kubectl")


def kustomize(directory: Path) -> list[dict]:
    done = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def with_components(tmp_path: Path, *components: str) -> Path:
    """A throwaway kustomization: the base plus components (kustomize wants relative paths)."""
    here = tmp_path / "with-components"
    here.mkdir(exist_ok=True)
    rel = lambda p: os.path.relpath(p, here)  # noqa: E731
    (here / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [rel(K8S / "base")],
        "components": [rel(K8S / "components" / c) for c in components],
    }))
    return here


def targets() -> list[pytest.param]:
    params = [pytest.param(("base",), id="base")]
    params += [pytest.param(("overlays", o), id=f"overlay-{o}") for o in OVERLAYS]
    params += [pytest.param(("components", c), id=f"component-{c}") for c in COMPONENTS]
    return params


def render(target: tuple[str, ...], tmp_path: Path) -> list[dict]:
    if target[0] == "components":
        return kustomize(with_components(tmp_path, target[1]))
    return kustomize(K8S.joinpath(*target))


def kinds(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_templates(doc: dict) -> list[dict]:
    if doc["kind"] in ("Job", "Deployment"):
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "JobSet":
        return [r["template"]["spec"]["template"]["spec"] for r in doc["spec"]["replicatedJobs"]]
    return []


def training_jobs(docs: list[dict]) -> list[dict]:
    """Job specs (plain or inside a JobSet) that run the sdft container."""
    specs = []
    for doc in docs:
        if doc["kind"] == "Job" and doc["spec"]["template"]["spec"]["containers"][0]["name"] == "sdft":
            specs.append(doc["spec"])
        if doc["kind"] == "JobSet":
            specs += [r["template"]["spec"] for r in doc["spec"]["replicatedJobs"]]
    return specs


def test_every_component_is_covered() -> None:
    assert set(COMPONENTS) >= {"fanout", "spot", "multi-gpu", "multi-node", "kueue"}
    assert set(OVERLAYS) >= {"dev", "eks", "gke"}


@pytest.mark.parametrize("target", targets())
def test_renders_and_validates_strictly(target: tuple[str, ...], tmp_path: Path) -> None:
    docs = render(target, tmp_path)
    known = [d for d in docs if d["kind"] not in CRD_KINDS]
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(known))
    done = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", str(rendered)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert training_jobs(docs), "renders a training Job or JobSet"


@pytest.mark.parametrize("target", targets())
def test_pods_run_restricted_with_writable_scratch_only(target: tuple[str, ...], tmp_path: Path) -> None:
    for doc in render(target, tmp_path):
        for pod in pod_templates(doc):
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            assert pod["automountServiceAccountToken"] is False
            for container in pod["containers"]:
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["capabilities"]["drop"] == ["ALL"]
            sdft = [c for c in pod["containers"] if c["name"] == "sdft"]
            if not sdft:
                continue
            mounts = {m["mountPath"]: m["name"] for m in sdft[0]["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            for path in ("/tmp", "/cache/huggingface", "/work", "/dev/shm"):
                assert "emptyDir" in volumes[mounts[path]], path
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
            assert sdft[0]["terminationMessagePolicy"] == "FallbackToLogsOnError"
            assert pod["terminationGracePeriodSeconds"] >= 300, "time to upload a checkpoint"
            assert pod["restartPolicy"] == "Never"


def failure_rules(job_spec: dict) -> tuple[dict, dict]:
    rules = job_spec["podFailurePolicy"]["rules"]
    exit_rule = next(r for r in rules if "onExitCodes" in r)
    disruption = next(r for r in rules if "onPodConditions" in r)
    return exit_rule, disruption


def test_base_job_fails_fast_on_every_non_retryable_exit_code() -> None:
    (job,) = kinds(kustomize(K8S / "base"), "Job")
    spec = job["spec"]
    exit_rule, disruption = failure_rules(spec)
    assert exit_rule["action"] == "FailJob"
    assert exit_rule["onExitCodes"]["operator"] == "In"
    assert set(exit_rule["onExitCodes"]["values"]) == NON_RETRYABLE
    assert not RETRYABLE & set(exit_rule["onExitCodes"]["values"])
    assert disruption == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert spec["podReplacementPolicy"] == "Failed"
    for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert spec[key] > 0, key
    limits = spec["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["template"]["spec"]["tolerations"]


def test_fanout_fails_only_the_index_and_reads_the_batch_file(tmp_path: Path) -> None:
    docs = kustomize(with_components(tmp_path, "fanout"))
    (job,) = kinds(docs, "Job")
    spec = job["spec"]
    exit_rule, disruption = failure_rules(spec)
    assert exit_rule["action"] == "FailIndex" and set(exit_rule["onExitCodes"]["values"]) == NON_RETRYABLE
    assert disruption["action"] == "Ignore"
    assert spec["completionMode"] == "Indexed"
    assert spec["backoffLimitPerIndex"] >= 1 and spec["maxFailedIndexes"] <= spec["completions"]
    (settings,) = kinds(docs, "ConfigMap")
    assert settings["data"]["SDFT_BATCH_URI"].startswith("s3://")


def test_jobset_pod_template_matches_the_base_job(tmp_path: Path) -> None:
    (job,) = kinds(kustomize(K8S / "base"), "Job")
    docs = kustomize(with_components(tmp_path, "multi-node"))
    assert not kinds(docs, "Job"), "the JobSet replaces the Job"
    (jobset,) = kinds(docs, "JobSet")
    inner = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    exit_rule, _ = failure_rules(inner)
    assert set(exit_rule["onExitCodes"]["values"]) == NON_RETRYABLE
    base_pod, pod = job["spec"]["template"]["spec"], inner["template"]["spec"]
    for key in ("securityContext", "volumes", "tolerations", "terminationGracePeriodSeconds", "serviceAccountName"):
        assert pod[key] == base_pod[key], key
    base_c, c = base_pod["containers"][0], pod["containers"][0]
    for key in ("image", "resources", "securityContext", "volumeMounts", "args"):
        assert c[key] == base_c[key], key
    unhashed = lambda ref: ref["configMapRef"]["name"].rsplit("-", 1)[0]  # noqa: E731 (settings differ)
    assert list(map(unhashed, c["envFrom"])) == list(map(unhashed, base_c["envFrom"]))
    env = {e["name"] for e in c["env"]}
    assert {"SDFT_MACHINE_RANK", "SDFT_MAIN_PROCESS_IP", "SDFT_MAIN_PROCESS_PORT"} <= env
    assert inner["parallelism"] == inner["completions"] and inner["completionMode"] == "Indexed"
    (settings,) = kinds(docs, "ConfigMap")
    assert int(settings["data"]["SDFT_NUM_MACHINES"]) == inner["completions"]


def test_kueue_labels_and_suspends(tmp_path: Path) -> None:
    (job,) = kinds(kustomize(with_components(tmp_path, "kueue")), "Job")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    assert job["spec"]["suspend"] is True


def test_overlays_bind_an_identity_or_an_in_cluster_store() -> None:
    (sa,) = kinds(kustomize(K8S / "overlays" / "eks"), "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    gke = kustomize(K8S / "overlays" / "gke")
    (sa,) = kinds(gke, "ServiceAccount")
    assert "iam.gke.io/gcp-service-account" in sa["metadata"]["annotations"]
    dev = kustomize(K8S / "overlays" / "dev")
    assert {"Deployment", "Service", "NetworkPolicy"} <= {d["kind"] for d in dev}
    (settings,) = [d for d in kinds(dev, "ConfigMap") if d["metadata"]["name"].startswith("sdft-settings")]
    assert settings["data"]["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"


def test_checkov_passes_on_the_rendered_manifests(tmp_path: Path) -> None:
    out = tmp_path / "rendered"
    out.mkdir()
    for target in targets():
        docs = render(target.values[0], tmp_path)
        (out / f"{target.id}.yaml").write_text(yaml.safe_dump_all(docs))
    done = run_checkov("-d", str(out), "--framework", "kubernetes")
    assert done.returncode == 0, done.stdout + done.stderr


def test_render_batch_script_makes_one_index_per_line(tmp_path: Path) -> None:
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(
        f'{{"instance_uri": "s3://b/subjects/{s}/", "output_uri": "s3://b/runs/{s}/"}}\n\n' for s in ("a", "b", "c")
    ))
    digest = "sha256:" + "ab" * 32
    env = {**os.environ, "IMAGE": f"registry.example/sdft@{digest}", "SUFFIX": "t42", "KUBECTL": kubectl()}
    done = subprocess.run(
        [str(REPO / "scripts" / "render-batch.sh"), str(batch), "s3://b/batches/t42.jsonl"],
        env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    (job,) = kinds(docs, "Job")
    assert job["metadata"]["name"] == "sdft-t42"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == f"registry.example/sdft@{digest}"
    (settings,) = kinds(docs, "ConfigMap")
    assert settings["data"]["SDFT_BATCH_URI"] == "s3://b/batches/t42.jsonl"
    assert not list((REPO / ".work").glob("render-*")), "the script cleans up after itself"


# --- every SDFT_* name anywhere outside the code is a real setting --------------------------

SDFT_NAME = re.compile(r"\bSDFT_[A-Z0-9_]*[A-Z0-9]\b")


def setting_names() -> set[str]:
    from job.settings import Settings

    return {"SDFT_" + name.upper() for name in Settings.model_fields}


def documents_naming_settings() -> list[Path]:
    paths = [REPO / "README.md", REPO / "Dockerfile", REPO / "entrypoint.sh"]
    paths += sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.env"))
    paths += sorted((REPO / ".github" / "workflows").glob("*.y*ml"))
    paths += sorted((REPO / "scripts").glob("*"))
    return [p for p in paths if p.is_file()]


def test_every_sdft_variable_named_outside_the_code_is_a_setting() -> None:
    known = setting_names()
    unknown = {
        f"{path.relative_to(REPO)}: {name}"
        for path in documents_naming_settings()
        for name in SDFT_NAME.findall(path.read_text())
        if name not in known
    }
    assert not unknown, sorted(unknown)


@pytest.mark.parametrize("target", targets())
def test_rendered_settings_are_accepted_by_the_job(target: tuple[str, ...], tmp_path: Path, monkeypatch) -> None:
    from job.settings import load_settings

    docs = render(target, tmp_path)
    for config in [d for d in kinds(docs, "ConfigMap") if d["metadata"]["name"].startswith("sdft-settings")]:
        for name, value in config["data"].items():
            if name.startswith("SDFT_") and name != "SDFT_BATCH_URI":  # the batch file is read at run time
                monkeypatch.setenv(name, value)
        load_settings()  # raises ConfigError listing every problem
