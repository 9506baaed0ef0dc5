"""Archives as SDFT_INSTANCE_URI: unpacked safely, junk skipped, dataset_info.json honoured."""

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from job.errors import InputError
from job.inputs import unpack_archive
from jobrun import EXAMPLES, job_env, run_job
from models_util import CLASS_PROMPT, INSTANCE_PROMPT, download_prefix

IMAGES = sorted(EXAMPLES.glob("*.png"))


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return path


def _tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as bundle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return path


def _photo_album() -> dict[str, bytes]:
    """What a Mac user's zip looks like: a nested folder, Finder junk, a caption, dataset_info.json."""
    members = {f"my dog/photos/{p.name}": p.read_bytes() for p in IMAGES[:3]}
    members["my dog/photos/dog-0.txt"] = b"a photo of sks dog on the grass"
    members["my dog/dataset_info.json"] = json.dumps({"instance_prompt": INSTANCE_PROMPT, "class_prompt": CLASS_PROMPT}).encode()
    members["__MACOSX/my dog/photos/._dog-0.png"] = b"\x00\x05\x16\x07 resource fork"
    members["my dog/photos/._dog-1.png"] = b"\x00\x05\x16\x07 resource fork"
    members["my dog/.DS_Store"] = b"\x00\x00\x00\x01Bud1"
    return members


@pytest.fixture(scope="module")
def zip_run(s3_server, tmp_path_factory):
    """A real run from a zip in the bucket, prompts only from dataset_info.json, with prior preservation."""
    s3_server.start()
    bucket = s3_server.create_bucket("archive-run")
    archive = _zip(tmp_path_factory.mktemp("zip") / "my dog.zip", _photo_album())
    s3_server.client().upload_file(str(archive), bucket, "uploads/my dog.zip")
    env = job_env(tmp_path_factory.mktemp("work"), SDFT_INSTANCE_URI=f"s3://{bucket}/uploads/my dog.zip",
                  SDFT_OUTPUT_URI=f"s3://{bucket}/out/", SDFT_INSTANCE_PROMPT=None, SDFT_MAX_TRAIN_STEPS="2",
                  SDFT_WITH_PRIOR_PRESERVATION="true", SDFT_NUM_CLASS_IMAGES="2", **s3_server.env())
    result = run_job(env)
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path_factory.mktemp("out")
    download_prefix(s3_server, bucket, "out", out)
    return result, out


@pytest.mark.slow
def test_zip_trains_on_exactly_the_real_images_with_their_captions(zip_run):
    _, out = zip_run
    manifest = json.loads((out / "manifest.json").read_text())
    captions = {i["path"]: i["caption"] for i in manifest["inputs"]}
    assert captions == {
        "my dog/photos/dog-0.png": "a photo of sks dog on the grass",
        "my dog/photos/dog-1.png": INSTANCE_PROMPT,  # from dataset_info.json: SDFT_INSTANCE_PROMPT is unset
        "my dog/photos/dog-2.png": INSTANCE_PROMPT,
    }
    assert manifest["skipped"] == []  # the junk is not even reported as a skipped image


@pytest.mark.slow
def test_dataset_info_gives_the_class_prompt(zip_run):
    from PIL import Image

    _, out = zip_run
    class_images = sorted((out / "class_images").glob("*.png"))
    assert len(class_images) == 2
    assert all(Image.open(p).text["prompt"] == CLASS_PROMPT for p in class_images)


@pytest.mark.slow
def test_zip_member_escaping_the_destination_is_refused_with_exit_3(s3_server, tmp_path):
    s3_server.start()
    bucket = s3_server.create_bucket("archive-escape")
    archive = _zip(tmp_path / "evil.zip", {"ok.png": IMAGES[0].read_bytes(), "../../../escaped.png": IMAGES[1].read_bytes()})
    s3_server.client().upload_file(str(archive), bucket, "evil.zip")
    work = tmp_path / "sandbox" / "work"
    result = run_job(job_env(work, SDFT_INSTANCE_URI=f"s3://{bucket}/evil.zip", SDFT_OUTPUT_URI=f"s3://{bucket}/out/",
                             **s3_server.env()))
    assert result.exit_code == 3, result.stdout[-2000:]
    assert "escapes" in result.failure["reason"] and "../../../escaped.png" in result.failure["reason"]
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert all(p.is_relative_to(work) or p == archive for p in written)
    assert not list(tmp_path.rglob("escaped.png"))


@pytest.mark.parametrize("name", ["../x.png", "a/../../x.png", "/tmp/x.png", "//x.png"])
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_escaping_members_are_refused_before_anything_is_written(tmp_path, kind, name):
    make = _zip if kind == "zip" else _tar
    archive = make(tmp_path / f"bad.{kind}", {"good.png": IMAGES[0].read_bytes(), name: b"x"})
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(InputError, match="escapes the destination"):
        unpack_archive(archive, dest)
    assert not any(p.is_file() for p in tmp_path.rglob("*") if p != archive)


def test_tar_links_are_refused(tmp_path):
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as bundle:
        link = tarfile.TarInfo("photos/dog.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        bundle.addfile(link)
    with pytest.raises(InputError, match="link"):
        unpack_archive(archive, tmp_path / "dest")
    assert not (tmp_path / "dest" / "photos" / "dog.png").exists()


def test_tar_gz_nested_folder_without_junk(tmp_path):
    members = _photo_album()
    unpack_archive(_tar(tmp_path / "album.tar.gz", members), tmp_path / "dest")
    found = {p.relative_to(tmp_path / "dest").as_posix() for p in (tmp_path / "dest").rglob("*") if p.is_file()}
    assert found == {n for n in members if "__MACOSX" not in n and "/._" not in n and not n.endswith(".DS_Store")}


def test_not_an_archive_is_an_input_error(tmp_path):
    bogus = tmp_path / "photos.tar.gz"
    bogus.write_bytes(b"this is not a tarball")
    with pytest.raises(InputError, match="not a readable zip or tar"):
        unpack_archive(bogus, tmp_path / "dest")
