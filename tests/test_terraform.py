"""terraform/: formatted, initialised offline from the machine's provider mirror, valid, every
variable and output described, checkov-clean, and applied then destroyed against moto server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import hcl2
import pytest

from tools import REPO, VENV_BIN, run_checkov

TERRAFORM_DIR = REPO / "terraform"
PROVIDER = Path("registry.terraform.io") / "hashicorp" / "aws"
MIRROR_CANDIDATES = [Path("/opt/tf-plugins"), Path("/usr/share/terraform/plugins"),
                     Path.home() / ".terraform.d" / "plugins", Path("/usr/local/share/terraform/plugins")]

terraform_bin = shutil.which("terraform")
needs_terraform = pytest.mark.skipif(
    terraform_bin is None, reason="terraform is not installed here (it comes with the machine image, not PyPI)"
)


def provider_mirror() -> Path | None:
    """The folder that holds registry.terraform.io/hashicorp/aws (TF_PLUGIN_MIRROR overrides)."""
    candidates = [Path(os.environ["TF_PLUGIN_MIRROR"])] if os.environ.get("TF_PLUGIN_MIRROR") else []
    for base in candidates + MIRROR_CANDIDATES:
        if (base / PROVIDER).is_dir():
            return base
    for base in (Path("/opt"), Path("/usr/share"), Path("/usr/local")):
        for found in base.glob("*/registry.terraform.io/hashicorp/aws"):
            return found.parents[2]
    return None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A copy of terraform/ initialised offline; yields (dir, env for terraform)."""
    if terraform_bin is None:
        pytest.skip("terraform is not installed here (it comes with the machine image, not PyPI)")
    mirror = provider_mirror()
    if mirror is None:
        pytest.skip("no offline provider mirror holding registry.terraform.io/hashicorp/aws")
    root = tmp_path_factory.mktemp("terraform")
    work = root / "config"
    shutil.copytree(TERRAFORM_DIR, work, ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*"))
    cli_config = root / "cli.tfrc"
    cli_config.write_text(
        "provider_installation {\n"
        f'  filesystem_mirror {{\n    path    = "{mirror}"\n    include = ["registry.terraform.io/hashicorp/*"]\n  }}\n'
        '  direct {\n    exclude = ["registry.terraform.io/hashicorp/*"]\n  }\n'
        "}\n"
    )
    env = {
        "PATH": os.environ["PATH"], "HOME": str(root), "TF_CLI_CONFIG_FILE": str(cli_config),
        "TF_IN_AUTOMATION": "1", "TF_INPUT": "0", "CHECKPOINT_DISABLE": "1",
    }
    terraform(work, env, "init", "-backend=false")
    yield work, env


def terraform(work: Path, env: dict[str, str], *args: str, timeout_s: float = 300) -> str:
    done = subprocess.run(
        [terraform_bin, *args, "-no-color"], cwd=work, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    assert done.returncode == 0, f"terraform {args[0]}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@needs_terraform
def test_fmt_is_clean() -> None:
    done = subprocess.run([terraform_bin, "fmt", "-check", "-diff", "-recursive", str(TERRAFORM_DIR)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_files_are_split_the_usual_way() -> None:
    assert {p.name for p in TERRAFORM_DIR.glob("*.tf")} == {"versions.tf", "variables.tf", "main.tf", "outputs.tf"}
    versions = (TERRAFORM_DIR / "versions.tf").read_text()
    assert 'source  = "hashicorp/aws"' in versions and 'version = "~> 5.0"' in versions
    assert "module " not in (TERRAFORM_DIR / "main.tf").read_text(), "plain resources, no registry modules"


def test_every_variable_and_output_is_described() -> None:
    for file, block in (("variables.tf", "variable"), ("outputs.tf", "output")):
        with open(TERRAFORM_DIR / file) as f:
            parsed = hcl2.load(f)
        entries = parsed.get(block, [])
        assert entries, file
        for entry in entries:
            ((name, body),) = entry.items()
            assert str(body.get("description", "")).strip(" \"'"), f"{block} {name} has no description"


def test_checkov_passes() -> None:
    done = run_checkov("-d", "terraform", "--framework", "terraform")
    assert done.returncode == 0, done.stdout + done.stderr


def test_validate(workdir: tuple[Path, dict[str, str]]) -> None:
    work, env = workdir
    assert "configuration is valid" in terraform(work, env, "validate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto() -> Iterator[str]:
    """moto_server on a free 127.0.0.1 port, stopped afterwards."""
    moto_server = VENV_BIN / "moto_server"
    if not moto_server.exists() and not shutil.which("moto_server"):
        pytest.skip("moto_server is not installed (make test-deps installs moto[server])")
    port = free_port()
    proc = subprocess.Popen([str(moto_server) if moto_server.exists() else "moto_server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def moto_data(url: str, path: str) -> dict:
    with urllib.request.urlopen(f"{url}{path}") as response:
        return json.load(response)


@pytest.mark.slow  # a real terraform apply and destroy: minutes on a shared 2-core machine
@needs_terraform
def test_apply_and_destroy_against_moto(workdir: tuple[Path, dict[str, str]], moto: str, tmp_path: Path) -> None:
    work, env = workdir
    # An override file points the provider at moto; terraform merges it into versions.tf's block.
    endpoints = "\n".join(f'    {service} = "{moto}"' for service in ("s3", "iam", "ecr", "sts", "eks"))
    (work / "moto_override.tf").write_text(
        'provider "aws" {\n  access_key = "test"\n  secret_key = "test"\n'
        "  skip_credentials_validation = true\n  skip_metadata_api_check = true\n"
        "  skip_region_validation = true\n  s3_use_path_style = true\n"
        f"  endpoints {{\n{endpoints}\n  }}\n}}\n"
    )
    state = tmp_path / "moto.tfstate"
    variables = [
        "-var", "oidc_provider_arn=arn:aws:iam::123456789012:oidc-provider/oidc.eks.us-east-1.amazonaws.com/id/TEST",
        "-var", "oidc_provider_url=https://oidc.eks.us-east-1.amazonaws.com/id/TEST",
        f"-state={state}",
    ]
    try:
        terraform(work, env, "apply", "-auto-approve", *variables)
        outputs = json.loads(terraform(work, env, "output", "-json", f"-state={state}"))
        assert outputs["bucket"]["value"] == "sdft-data-123456789012"
        assert outputs["repository_url"]["value"].endswith("/sdft")
        assert outputs["job_role_arn"]["value"].endswith(":role/sdft-job")
        assert outputs.get("gpu_node_group", {}).get("value") is None  # terraform omits null outputs

        resources = {r["type"] for r in json.loads(state.read_text())["resources"] if r["mode"] == "managed"}
        assert {"aws_s3_bucket", "aws_s3_bucket_policy", "aws_s3_bucket_lifecycle_configuration",
                "aws_s3_bucket_public_access_block", "aws_s3_bucket_server_side_encryption_configuration",
                "aws_s3_bucket_versioning", "aws_ecr_repository", "aws_iam_role", "aws_iam_policy",
                "aws_iam_role_policy_attachment"} <= resources
        assert "aws_eks_node_group" not in resources

        # What moto now holds, seen through its own API.
        import boto3

        session = boto3.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
        s3 = session.client("s3", endpoint_url=moto)
        assert s3.get_bucket_versioning(Bucket="sdft-data-123456789012")["Status"] == "Enabled"
        policy = json.loads(s3.get_bucket_policy(Bucket="sdft-data-123456789012")["Policy"])
        assert policy["Statement"][0]["Condition"]["Bool"]["aws:SecureTransport"] == "false"
        ecr = session.client("ecr", endpoint_url=moto)
        (repo,) = ecr.describe_repositories(repositoryNames=["sdft"])["repositories"]
        assert repo["imageTagMutability"] == "IMMUTABLE" and repo["imageScanningConfiguration"]["scanOnPush"]
        iam = session.client("iam", endpoint_url=moto)
        trust = iam.get_role(RoleName="sdft-job")["Role"]["AssumeRolePolicyDocument"]
        trust = json.loads(trust) if isinstance(trust, str) else trust
        condition = trust["Statement"][0]["Condition"]["StringEquals"]
        assert condition["oidc.eks.us-east-1.amazonaws.com/id/TEST:sub"] == "system:serviceaccount:sdft:sdft"
    finally:
        terraform(work, env, "destroy", "-auto-approve", *variables)
    assert not [r for r in json.loads(state.read_text())["resources"] if r["mode"] == "managed"]
