"""The storage layer against a real S3-compatible server (SeaweedFS) and against local folders."""

from __future__ import annotations

import os
import shutil
import time
import traceback
from pathlib import Path

import botocore.exceptions
import pytest

import job.storage.s3
import job.storage.base
from job.errors import ConfigError, InputError, TransientError
from job.storage import ObjectInfo, Store, open_store
from s3server import S3Server, free_ports

FAST = {"max_attempts": 2, "connect_timeout_s": 1.0, "read_timeout_s": 2.0}


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """An empty store of each kind, rooted below the bucket / folder root."""
    if request.param == "s3":
        request.getfixturevalue("s3_env")
        return open_store(f"s3://{request.getfixturevalue('bucket')}/runs/one/")
    return open_store(str(tmp_path / "store" / "runs" / "one"))


def test_roundtrip_put_get_list_exists_delete(store: Store) -> None:
    store.put("a.json", b'{"x": 1}')
    store.put("deep/er/b.txt", b"bee")
    store.put("checkpoints/step-1/c.bin", b"\x00" * 10)

    assert store.list() == [ObjectInfo("a.json", 8), ObjectInfo("checkpoints/step-1/c.bin", 10),
                            ObjectInfo("deep/er/b.txt", 3)]
    assert [o.key for o in store.list("deep/")] == ["deep/er/b.txt"]
    assert store.get("deep/er/b.txt") == b"bee"
    assert store.exists("a.json") and not store.exists("nope.json") and not store.exists("deep")
    assert store.url("a.json") == store.uri + "/a.json"

    child = store.child("checkpoints")
    assert child.uri == store.uri + "/checkpoints"
    assert child.list() == [ObjectInfo("step-1/c.bin", 10)]

    store.put("a.json", b"{}")  # overwrite
    assert store.get("a.json") == b"{}"
    store.delete(["a.json", "never-existed"])
    assert not store.exists("a.json")
    store.delete_prefix("deep/")
    assert [o.key for o in store.list()] == ["checkpoints/step-1/c.bin"]
    child.delete_prefix("")
    assert store.list() == []


def test_missing_object_raises_file_not_found_with_its_uri(store: Store, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        store.get("missing.txt")
    assert err.value.filename == store.url("missing.txt")
    with pytest.raises(FileNotFoundError):
        store.download("missing.txt", tmp_path / "dl" / "missing.txt")
    assert not (tmp_path / "dl" / "missing.txt").exists()


def test_uri_normalisation(s3_env: dict[str, str], tmp_path: Path) -> None:
    assert open_store("s3://bkt/some/prefix/").uri == "s3://bkt/some/prefix"
    assert open_store("s3://bkt//some/prefix").uri == "s3://bkt/some/prefix"
    assert open_store("s3://bkt").uri == "s3://bkt"
    assert open_store(f"file://{tmp_path}/x/").uri == str(tmp_path / "x")
    assert open_store(str(tmp_path / "x") + "/").uri == str(tmp_path / "x")
    with pytest.raises(ConfigError):
        open_store("gs://bkt/x")
    with pytest.raises(ConfigError):
        open_store("s3:///no-bucket")


def test_prefix_is_a_folder_not_a_string_prefix(s3_env: dict[str, str], bucket: str) -> None:
    open_store(f"s3://{bucket}/database").put("x", b"1")
    open_store(f"s3://{bucket}/data").put("y", b"2")
    assert [o.key for o in open_store(f"s3://{bucket}/data").list()] == ["y"]
    assert [o.key for o in open_store(f"s3://{bucket}").list()] == ["data/y", "database/x"]


def test_list_paginates(s3_env: dict[str, str], bucket: str) -> None:
    store = open_store(f"s3://{bucket}/many", page_size=4)
    keys = [f"k/{i:03d}" for i in range(23)]
    raw = store._client  # type: ignore[attr-defined]  # count the requests the store makes
    calls: list[str] = []
    raw.meta.events.register("after-call.s3.ListObjectsV2", lambda **kw: calls.append("list"))
    for key in keys:
        store.put(key, key.encode())
    calls.clear()
    assert [o.key for o in store.list()] == keys
    assert len(calls) >= 6  # 23 keys, 4 per page: the paginator followed continuation tokens


def test_multipart_upload_roundtrips_with_checksums(s3_env: dict[str, str], s3_server: S3Server,
                                                    bucket: str, tmp_path: Path) -> None:
    store = open_store(f"s3://{bucket}/big", part_size_bytes=5 * 1024 * 1024)
    data = os.urandom(12 * 1024 * 1024)
    (tmp_path / "model.safetensors").write_bytes(data)

    store.upload(tmp_path / "model.safetensors", "weights/model.safetensors")

    head = s3_server.client().head_object(Bucket=bucket, Key="big/weights/model.safetensors",
                                          ChecksumMode="ENABLED")
    assert head["ETag"].endswith('-3"')  # three parts: 5 + 5 + 2 MiB
    assert head.get("ChecksumSHA256")  # each part was checksummed and verified by the server
    assert store.download("weights/model.safetensors", tmp_path / "out" / "m.st").read_bytes() == data
    assert store.list() == [ObjectInfo("weights/model.safetensors", len(data))]


def test_put_sends_a_checksum(s3_env: dict[str, str], s3_server: S3Server, bucket: str) -> None:
    open_store(f"s3://{bucket}").put("marker", b"ok")
    head = s3_server.client().head_object(Bucket=bucket, Key="marker", ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256")


def test_download_all_and_upload_tree_many_small_objects(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = {f"img/{i:02d}.png" if i % 2 else f"img/sub/{i:02d}.txt": os.urandom(100 + i) for i in range(50)}
    for key, data in expected.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)

    assert store.upload_tree(src, "inputs/") == sorted(f"inputs/{k}" for k in expected)
    paths = store.child("inputs").download_all(tmp_path / "dest")

    assert [p.relative_to((tmp_path / "dest").resolve()).as_posix() for p in paths] == sorted(expected)
    assert {p.relative_to((tmp_path / "dest").resolve()).as_posix(): p.read_bytes() for p in paths} == expected
    some = store.child("inputs").download_all(tmp_path / "some", keys=["img/01.png"])
    assert some[0].read_bytes() == expected["img/01.png"]


@pytest.mark.parametrize("key", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "a/../b.png", ".."])
def test_download_all_refuses_keys_outside_dest(store: Store, tmp_path: Path, key: str) -> None:
    store.put("fine.png", b"fine")
    dest = tmp_path / "work" / "dest"
    with pytest.raises(InputError, match="refusing"):
        store.download_all(dest, keys=["fine.png", key])
    assert not (tmp_path / "work").exists()  # checked before anything is written


def test_download_all_refuses_a_symlink_in_dest_that_leads_outside(store: Store, tmp_path: Path) -> None:
    store.put("link/x.png", b"x")
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "link").symlink_to(outside)
    with pytest.raises(InputError, match="outside"):
        store.download_all(dest)
    assert list(outside.iterdir()) == []


def test_hostile_key_listed_in_a_bucket_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SeaweedFS rejects keys with '..' segments on upload, but AWS S3 stores them verbatim, so this
    # case runs against moto's in-process S3, which does the same as AWS.
    moto = pytest.importorskip("moto")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    with moto.mock_aws():
        import boto3

        raw = boto3.client("s3", region_name="us-east-1")
        raw.create_bucket(Bucket="hostile")
        raw.put_object(Bucket="hostile", Key="in/ok.png", Body=b"ok")
        raw.put_object(Bucket="hostile", Key="in/../../escaped.png", Body=b"bad")
        store = open_store("s3://hostile/in")
        assert "../../escaped.png" in [o.key for o in store.list()]
        with pytest.raises(InputError, match=r"\.\./\.\./escaped\.png"):
            store.download_all(tmp_path / "a" / "b" / "dest")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_single_object_uri(store: Store, tmp_path: Path) -> None:
    store.put("data/photos.zip", b"zipbytes")
    store.put("data/photos.zip.bak", b"old")  # a sibling sharing the name as a string prefix
    single = open_store(store.url("data/photos.zip"))

    assert single.list() == [ObjectInfo("photos.zip", 8)]
    assert single.exists("photos.zip")
    assert single.get("photos.zip") == b"zipbytes"
    [path] = single.download_all(tmp_path / "dest")
    assert path == (tmp_path / "dest" / "photos.zip").resolve() and path.read_bytes() == b"zipbytes"


def test_local_store_writes_atomically_and_lists_only_files(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/out")
    store.put("a/b.json", b"{}")
    (tmp_path / "out" / "empty-dir").mkdir()
    (tmp_path / "out" / "a" / (job.storage.base.TEMP_PREFIX + "half")).write_bytes(b"half-written")
    assert store.list() == [ObjectInfo("a/b.json", 2)]
    store.delete(["a/b.json"])
    assert not (tmp_path / "out" / "a" / "b.json").exists()
    with pytest.raises(InputError):
        store.put("../escape.json", b"{}")


def test_local_delete_prefix_of_everything_removes_the_emptied_root(tmp_path: Path) -> None:
    out = open_store(str(tmp_path / "out"))
    out.put("model.safetensors", b"w")
    checkpoints = out.child("checkpoints")
    checkpoints.put("step-1/a.bin", b"a")
    checkpoints.delete_prefix("")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    out.child("step").put("x", b"1")
    out.delete_prefix("step")  # a partial prefix keeps the root
    assert (tmp_path / "out").is_dir()


def test_s3_download_all_gets_each_small_object_once_and_large_ones_in_parts(
        s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    store = open_store(f"s3://{bucket}/mixed", part_size_bytes=5 * 1024 * 1024)
    expected = {f"small/{i}.bin": os.urandom(1000 + i) for i in range(20)} | {"large.bin": os.urandom(11 << 20)}
    for key, data in expected.items():
        store.put(key, data)
    calls: list[str] = []
    for operation in ("GetObject", "HeadObject"):
        store._client.meta.events.register(  # type: ignore[attr-defined]
            f"after-call.s3.{operation}", lambda model, **kw: calls.append(model.name))

    paths = store.download_all(tmp_path / "dest")

    assert {p.relative_to((tmp_path / "dest").resolve()).as_posix(): p.read_bytes() for p in paths} == expected
    # 20 small GETs, one GET of the large object that stops at its headers, then 3 ranged parts.
    assert calls.count("GetObject") == 20 + 1 + 3 and calls.count("HeadObject") == 0
    assert [p for p in (tmp_path / "dest").rglob("*") if p.name.startswith(job.storage.base.TEMP_PREFIX)] == []


def test_s3_body_read_errors_are_retried_then_transient(s3_env: dict[str, str], bucket: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(f"s3://{bucket}/flaky", **FAST)
    store.put("a.bin", b"payload")
    real_copy, failures = shutil.copyfileobj, [1]

    def copy_failing_first(src: object, dst: object, length: int = 0) -> None:
        if failures:
            failures.pop()
            raise botocore.exceptions.ResponseStreamingError(error="connection reset mid-body")
        real_copy(src, dst, length)

    monkeypatch.setattr(shutil, "copyfileobj", copy_failing_first)
    assert store.download("a.bin", tmp_path / "one" / "a.bin").read_bytes() == b"payload"

    failures.extend([1] * FAST["max_attempts"])
    with pytest.raises(TransientError, match=f"s3://{bucket}/flaky/a.bin"):
        store.download("a.bin", tmp_path / "two" / "a.bin")
    assert list((tmp_path / "two").iterdir()) == []  # no half-written file, no temp file


def test_delete_batches(s3_env: dict[str, str], bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job.storage.s3, "DELETE_BATCH", 2)
    store = open_store(f"s3://{bucket}/d")
    for i in range(5):
        store.put(f"{i}", b"x")
    store.delete_prefix("")
    assert store.list() == []


def test_endpoint_from_generic_variable_and_addressing_style(s3_server: S3Server, bucket: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    env = s3_server.env()
    env["AWS_ENDPOINT_URL"] = env.pop("AWS_ENDPOINT_URL_S3")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    store = open_store(f"s3://{bucket}")
    store.put("x", b"1")
    assert store.list() == [ObjectInfo("x", 1)]
    monkeypatch.setenv("AWS_S3_ADDRESSING_STYLE", "sideways")
    with pytest.raises(ConfigError, match="AWS_S3_ADDRESSING_STYLE"):
        open_store(f"s3://{bucket}")


def _assert_secret_absent(exc: BaseException, secret: str) -> None:
    assert secret not in "".join(traceback.format_exception(exc))


@pytest.mark.parametrize("wrong", ["secret", "key"])
def test_wrong_credentials_is_a_config_error_without_the_secret(
        s3_env: dict[str, str], bucket: str, monkeypatch: pytest.MonkeyPatch, wrong: str) -> None:
    bad_secret = "wrong-" + s3_env["AWS_SECRET_ACCESS_KEY"][::-1]
    if wrong == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    store = open_store(f"s3://{bucket}/in", **FAST)
    for operation in (store.list, lambda: store.exists("x"), lambda: store.put("x", b"1")):
        with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID") as err:
            operation()
        assert "\n" not in str(err.value) and f"s3://{bucket}/in" in str(err.value)
        _assert_secret_absent(err.value, s3_env["AWS_SECRET_ACCESS_KEY"])
        _assert_secret_absent(err.value, bad_secret)


def test_no_credentials_at_all_is_a_config_error(s3_server: S3Server, bucket: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    with pytest.raises(ConfigError, match="credentials"):
        open_store(f"s3://{bucket}", **FAST).list()


def test_missing_bucket_is_a_config_error_naming_it(s3_env: dict[str, str]) -> None:
    for uri in ("s3://no-such-bucket-sdft/prefix", "s3://no-such-bucket-sdft"):
        store = open_store(uri, **FAST)
        for operation in (store.list, lambda: store.exists("_SUCCESS"), lambda: store.get("x")):
            with pytest.raises(ConfigError, match="'no-such-bucket-sdft'"):
                operation()


def test_closed_port_is_transient_within_a_bounded_time(s3_env: dict[str, str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_ports(1)[0]}")
    started = time.monotonic()
    with pytest.raises(TransientError, match=r"s3://bkt/in.*EndpointConnectionError") as err:
        open_store("s3://bkt/in", **FAST).list()
    assert time.monotonic() - started < 10
    assert err.value.exit_code == 75


def test_server_stopped_mid_run_is_transient_then_recovers(s3_env: dict[str, str], s3_server: S3Server,
                                                           bucket: str, tmp_path: Path) -> None:
    store = open_store(f"s3://{bucket}/run", **FAST)
    store.put("before", b"1")
    (tmp_path / "f").write_bytes(b"payload")
    s3_server.stop()
    try:
        started = time.monotonic()
        for operation in (store.list, lambda: store.get("before"), lambda: store.upload(tmp_path / "f", "f"),
                          lambda: store.download_all(tmp_path / "dest")):
            with pytest.raises(TransientError, match=f"s3://{bucket}/run"):
                operation()
        assert time.monotonic() - started < 20
    finally:
        s3_server.start()
    assert store.get("before") == b"1"
