"""Never lose a user's data, never publish a broken result (issue 9).

The overlap rule (exit 2 before anything is read or written), checkpoint clean-up that deletes only
sdft's own checkpoints, divergence (exit 6, nothing published, strict JSON everywhere), a base model
with non-finite weights (exit 4), and damaged archives (exit 3).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from jobrun import EXAMPLES, job_env, run_job

IMAGES = sorted(EXAMPLES.glob("*.png"))


def _strict(text: str):
    """json.loads that refuses NaN / Infinity, as RFC 8259 parsers (JavaScript, jq, Go) do."""
    def refuse(word):
        raise ValueError(f"not JSON: {word}")

    return json.loads(text, parse_constant=refuse)


def _digests(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _instance_folder(root: Path) -> Path:
    folder = root / "rex"
    folder.mkdir(parents=True)
    for image in IMAGES[:3]:
        shutil.copy(image, folder / image.name)
    return folder


# --- The overlap rule -------------------------------------------------------------------------

# (case, settings relative to a root that holds the instance images at <root>/rex)
OVERLAPS = [
    ("checkpoint = instance", {"SDFT_OUTPUT_URI": "out", "SDFT_CHECKPOINT_URI": "rex"}, ["SDFT_CHECKPOINT_URI", "SDFT_INSTANCE_URI"]),
    ("checkpoint = output", {"SDFT_OUTPUT_URI": "out", "SDFT_CHECKPOINT_URI": "out/"}, ["SDFT_CHECKPOINT_URI", "SDFT_OUTPUT_URI"]),
    ("checkpoint contains output", {"SDFT_OUTPUT_URI": "runs/out", "SDFT_CHECKPOINT_URI": "runs"}, ["SDFT_CHECKPOINT_URI", "SDFT_OUTPUT_URI"]),
    ("output inside instance", {"SDFT_OUTPUT_URI": "rex/out"}, ["SDFT_OUTPUT_URI", "lies inside"]),
    ("class = instance", {"SDFT_OUTPUT_URI": "out", "SDFT_CLASS_URI": "rex//"}, ["SDFT_CLASS_URI", "SDFT_INSTANCE_URI"]),
]


def _absolute(root: str, settings: dict[str, str]) -> dict[str, str]:
    return {name: f"{root}/{value}" for name, value in settings.items()}


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "check"])
@pytest.mark.parametrize(("case", "settings", "named"), OVERLAPS, ids=[c[0] for c in OVERLAPS])
def test_overlapping_local_locations_exit_2_and_touch_nothing(tmp_path, case, settings, named, command):
    instance = _instance_folder(tmp_path / "data")
    before = _digests(sorted(instance.rglob("*")))
    root = "file://" + str(tmp_path / "data") if "class" in case else str(tmp_path / "data")  # file:// optional
    result = run_job(job_env(tmp_path / "work", SDFT_INSTANCE_URI=str(instance), **_absolute(root, settings)), command)
    assert result.exit_code == 2, result.stdout[-2000:] + result.stderr[-2000:]
    for fragment in named:
        assert fragment in result.failure["reason"], result.failure["reason"]
    assert _digests(sorted(instance.rglob("*"))) == before
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "data", "data/rex", *(f"data/rex/{p.name}" for p in IMAGES[:3])], "nothing read into or written anywhere"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "check"])
@pytest.mark.parametrize(("case", "settings", "named"), OVERLAPS, ids=[c[0] for c in OVERLAPS])
def test_overlapping_s3_prefixes_exit_2_and_leave_the_instance_objects_intact(
        s3_server, bucket, tmp_path, case, settings, named, command):
    client = s3_server.client()
    originals = {f"rex/{p.name}": p.read_bytes() for p in IMAGES[:3]}
    for key, body in originals.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    result = run_job(job_env(tmp_path / "work", SDFT_INSTANCE_URI=f"s3://{bucket}/rex/",
                             **_absolute(f"s3://{bucket}", settings), **s3_server.env()), command)
    assert result.exit_code == 2, result.stdout[-2000:] + result.stderr[-2000:]
    for fragment in named:
        assert fragment in result.failure["reason"], result.failure["reason"]
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))
    assert keys == sorted(originals)
    assert all(client.get_object(Bucket=bucket, Key=k)["Body"].read() == body for k, body in originals.items())
    assert not (tmp_path / "work").exists()


def test_every_overlap_is_named_at_once(tmp_path):
    from job.locations import overlap_problems

    problems = overlap_problems("s3://b/data/rex", "s3://b//data/rex/out/", "s3://b/data", "s3://b/data/rex/")
    assert len(problems) == 5  # checkpoint ⊇ instance, class, output; output ⊂ instance; class = instance
    # Normalised: a shared string prefix is not a containing prefix; other buckets never overlap.
    assert overlap_problems("s3://b/rex", "s3://b/rexout", "s3://b/rexout/checkpoints", "s3://b/rexclass") == []
    assert overlap_problems("s3://a/x", "s3://b/x", "s3://c/x", "s3://d/x") == []
    assert overlap_problems(str(tmp_path / "rex"), str(tmp_path / "out"), str(tmp_path / "out" / "checkpoints"),
                            str(tmp_path / "out" / "class_images")) == []  # the default layout


def test_the_class_prefix_counts_only_when_class_images_are_used():
    from job.errors import ConfigError
    from job.settings import load_settings

    same = {"instance_uri": "s3://b/rex", "output_uri": "s3://b/out", "checkpoint_uri": "s3://b/out"}
    with pytest.raises(ConfigError) as without_prior:
        load_settings(same)
    assert "SDFT_OUTPUT_URI" in str(without_prior.value) and "SDFT_CLASS_URI" not in str(without_prior.value)
    with pytest.raises(ConfigError) as with_prior:
        load_settings({**same, "with_prior_preservation": True, "class_prompt": "a photo of dog"})
    assert "SDFT_CLASS_URI (s3://b/out/class_images" in str(with_prior.value)


def test_a_symlinked_local_path_is_compared_where_it_resolves(tmp_path):
    from job.locations import overlap_problems

    (tmp_path / "rex").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "rex")
    assert overlap_problems(str(tmp_path / "rex"), str(tmp_path / "out"), str(tmp_path / "alias"), str(tmp_path / "c"))


@pytest.mark.slow
def test_a_shared_checkpoint_prefix_keeps_unrelated_objects_after_success(tmp_path):
    instance = _instance_folder(tmp_path / "data")
    shared = tmp_path / "shared"
    unrelated = {"notes.txt": b"mine", "photos/cat.png": IMAGES[4].read_bytes(), "step-99/plan.txt": b"not sdft's"}
    for name, body in unrelated.items():
        (shared / name).parent.mkdir(parents=True, exist_ok=True)
        (shared / name).write_bytes(body)
    result = run_job(job_env(tmp_path / "work", SDFT_INSTANCE_URI=str(instance), SDFT_OUTPUT_URI=str(tmp_path / "out"),
                             SDFT_CHECKPOINT_URI=str(shared), SDFT_MAX_TRAIN_STEPS="4", SDFT_CHECKPOINT_EVERY_STEPS="1",
                             SDFT_NUM_VALIDATION_IMAGES="0"))
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [e["step"] for e in result.named("checkpoint.saved")] == [1, 2, 3]
    left = {p.relative_to(shared).as_posix(): p.read_bytes() for p in shared.rglob("*") if p.is_file()}
    assert left == unrelated  # sdft's checkpoints gone, everything else untouched
    assert (tmp_path / "out" / "_SUCCESS").exists()


# --- Divergence and non-finite weights --------------------------------------------------------

@pytest.mark.slow
def test_a_diverging_run_exits_6_publishes_nothing_and_writes_only_strict_json(tmp_path):
    out = tmp_path / "out"
    result = run_job(job_env(tmp_path / "work", SDFT_INSTANCE_URI=str(EXAMPLES), SDFT_OUTPUT_URI=str(out),
                             SDFT_LEARNING_RATE="1e8", SDFT_MAX_TRAIN_STEPS="20", SDFT_CHECKPOINT_EVERY_STEPS="1"))
    assert result.exit_code == 6, result.stdout[-3000:] + result.stderr[-3000:]
    reason = result.failure["reason"]
    step = int(reason.split(" at step ")[1].split("/")[0])
    assert step < 20
    for hint in ("SDFT_LEARNING_RATE", "SDFT_MAX_GRAD_NORM"):
        assert hint in reason
    assert "bf16" not in reason  # no fp16 on the CPU: the precision hint would only mislead
    assert not (out / "_SUCCESS").exists() and not (out / "lora").exists() and not (out / "manifest.json").exists()
    status = _strict((out / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("failed", 6) and f"step {step}/" in status["reason"]
    for path in out.rglob("*"):  # status.json, checkpoint markers, anything else JSON
        if path.suffix == ".json" or path.name == "_COMPLETE":
            _strict(path.read_text())
        elif path.suffix == ".jsonl":
            [_strict(line) for line in path.read_text().splitlines()]
    for line in result.stdout.splitlines():  # the log lines are JSON too
        if line.startswith("{"):
            _strict(line)
    # No checkpoint of a diverged step was kept: resuming would only diverge again from it.
    saved = [e["step"] for e in result.named("checkpoint.saved")]
    assert all(s < step for s in saved)


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory) -> Path:
    """builtin:tiny as a diffusers folder, with one NaN in one UNet weight."""
    import torch
    from safetensors.torch import load_file, save_file

    from models_util import tiny_model_path

    folder = tmp_path_factory.mktemp("nan") / "model"
    shutil.copytree(tiny_model_path(tmp_path_factory), folder)
    [weights_file] = (folder / "unet").glob("*.safetensors")
    weights = load_file(weights_file)
    name = sorted(weights)[3]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = torch.nan
    save_file(weights, weights_file, metadata={"format": "pt"})
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("command", ["check", "run"])
def test_a_base_model_with_a_nan_weight_exits_4(nan_model, tmp_path, command):
    result = run_job(job_env(tmp_path / "work", SDFT_INSTANCE_URI=str(EXAMPLES), SDFT_OUTPUT_URI=str(tmp_path / "out"),
                             SDFT_BASE_MODEL=str(nan_model)), command)
    assert result.exit_code == 4, result.stdout[-3000:] + result.stderr[-3000:]
    assert "non-finite weights" in result.failure["reason"] and "unet/" in result.failure["reason"]
    assert not result.named("train.step")
    assert not (tmp_path / "out" / "_SUCCESS").exists()


# --- Archives ---------------------------------------------------------------------------------

def _zip_of_images(path: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
        for image in IMAGES[:3]:
            bundle.write(image, f"photos/{image.name}")
    return path


def _patch_member(path: Path, member: str, patch) -> Path:
    """Rewrites `member`'s local and central headers with `patch(header: bytearray, at)` (zip format,
    PKWARE APPNOTE 4.3.7 / 4.3.12: flags at +6/+8, method at +8/+10, CRC-32 at +14/+16)."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    with zipfile.ZipFile(path) as bundle:
        local = bundle.getinfo(member).header_offset
    patch(data, local, "local")
    central = data.find(b"PK\x01\x02")
    while central != -1:
        name_length = int.from_bytes(data[central + 28:central + 30], "little")
        if data[central + 46:central + 46 + name_length] == name:
            patch(data, central, "central")
        central = data.find(b"PK\x01\x02", central + 4)
    path.write_bytes(bytes(data))
    return path


def _encrypted(data, at, kind):
    flags = at + (6 if kind == "local" else 8)
    data[flags] |= 0x01  # "file is encrypted"


def _deflate64(data, at, kind):
    method = at + (8 if kind == "local" else 10)
    data[method:method + 2] = (9).to_bytes(2, "little")  # 9 = Deflate64, which Python cannot inflate


def _bad_crc(data, at, kind):
    crc = at + (14 if kind == "local" else 16)
    data[crc] ^= 0xFF


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_encrypted, _deflate64, _bad_crc], ids=["encrypted", "deflate64", "crc error"])
def test_a_damaged_or_unsupported_zip_exits_3_naming_archive_and_member(tmp_path, damage):
    member = f"photos/{IMAGES[1].name}"
    archive = _patch_member(_zip_of_images(tmp_path / "photos.zip"), member, damage)
    result = run_job(job_env(tmp_path / "work", SDFT_INSTANCE_URI=str(archive), SDFT_OUTPUT_URI=str(tmp_path / "out")),
                     "check")
    assert result.exit_code == 3, result.stdout[-3000:] + result.stderr[-3000:]
    reason = result.failure["reason"]
    assert "photos.zip" in reason and member in reason and "upload it again" in reason, reason


@pytest.mark.slow
def test_a_truncated_tar_gz_exits_3_naming_the_archive(tmp_path):
    import tarfile

    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        for image in IMAGES[:3]:
            bundle.add(image, f"photos/{image.name}")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    result = run_job(job_env(tmp_path / "work", SDFT_INSTANCE_URI=str(archive), SDFT_OUTPUT_URI=str(tmp_path / "out")),
                     "check")
    assert result.exit_code == 3, result.stdout[-3000:] + result.stderr[-3000:]
    assert "photos.tar.gz" in result.failure["reason"]


@pytest.mark.slow
def test_a_zip_beside_a_readme_and_finder_junk_trains_on_the_zip(tmp_path):
    upload = tmp_path / "upload"
    upload.mkdir()
    _zip_of_images(upload / "photos.zip")
    (upload / "README.md").write_text("my dog, 3 photos")
    (upload / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (upload / "dataset_info.json").write_text(json.dumps({"instance_prompt": "a photo of sks dog"}))
    out = tmp_path / "out"
    result = run_job(job_env(tmp_path / "work", SDFT_INSTANCE_URI=str(upload), SDFT_OUTPUT_URI=str(out),
                             SDFT_INSTANCE_PROMPT=None, SDFT_MAX_TRAIN_STEPS="2", SDFT_NUM_VALIDATION_IMAGES="0"))
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {i["path"] for i in manifest["inputs"]} == {f"photos/{p.name}" for p in IMAGES[:3]}
    assert {i["caption"] for i in manifest["inputs"]} == {"a photo of sks dog"}  # dataset_info.json beside the zip


@pytest.mark.parametrize("precision", ["fp16", "no"])
def test_the_divergence_reason_suggests_bf16_only_when_fp16_is_in_use(precision):
    from job.settings import load_settings
    from job.train import _diverged_reason

    settings = load_settings({"instance_uri": "s3://b/rex", "output_uri": "s3://b/out", "mixed_precision": precision})
    reason = _diverged_reason(settings, 3, float("nan"))
    assert "at step 3/" in reason and "SDFT_LEARNING_RATE" in reason
    assert ("SDFT_MIXED_PRECISION=bf16" in reason) == (precision == "fp16")
