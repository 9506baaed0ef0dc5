"""Fan-out: one batch file, one subject per Indexed Job pod, each with outputs of its own."""

import json

import pytest

from job.errors import ConfigError
from job.fanout import read_batch_line
from job.settings import BatchLineSource, batch_line_source, load_settings
from jobrun import EXAMPLES, job_env, run_job


@pytest.mark.slow
def test_three_line_batch_gives_three_complete_outputs_and_index_3_exits_2(s3_server, tmp_path):
    bucket = s3_server.create_bucket("fanout")
    client = s3_server.client()
    subjects = ["rex", "tom", "ada"]
    for subject in subjects:
        for image in sorted(EXAMPLES.glob("*.png"))[:2]:
            client.upload_file(str(image), bucket, f"subjects/{subject}/{image.name}")
    lines = [
        {"instance_uri": f"s3://{bucket}/subjects/{s}/", "output_uri": f"s3://{bucket}/runs/{s}/",
         "instance_prompt": f"a photo of sks {s}", "SEED": index}
        for index, s in enumerate(subjects)
    ]
    client.put_object(Bucket=bucket, Key="batches/b.jsonl", Body="\n".join(json.dumps(line) for line in lines) + "\n")
    common = dict(SDFT_BATCH_URI=f"s3://{bucket}/batches/b.jsonl", SDFT_INSTANCE_URI="unused", SDFT_OUTPUT_URI="unused",
                  SDFT_MAX_TRAIN_STEPS="2", SDFT_RUN_ID="subjects", **s3_server.env())

    for index, subject in enumerate(subjects):
        result = run_job(job_env(tmp_path / f"work-{index}", JOB_COMPLETION_INDEX=str(index), **common))
        assert result.exit_code == 0, result.stdout[-2000:]
        keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"runs/{subject}/")["Contents"]}
        assert f"runs/{subject}/_SUCCESS" in keys
        assert f"runs/{subject}/lora/subjects-{index}.safetensors" in keys
        manifest = json.loads(client.get_object(Bucket=bucket, Key=f"runs/{subject}/manifest.json")["Body"].read())
        assert manifest["run_id"] == f"subjects-{index}"
        assert manifest["settings"]["instance_prompt"] == f"a photo of sks {subject}"
        assert manifest["settings"]["seed"] == index  # keys are case-insensitive
        assert len(manifest["inputs"]) == 2

    past_the_end = run_job(job_env(tmp_path / "work-3", JOB_COMPLETION_INDEX="3", **common))
    assert past_the_end.exit_code == 2
    assert "only 3 lines" in past_the_end.failure["reason"]


def test_batch_without_an_index_exits_2(tmp_path):
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"instance_uri": "x"}\n')
    with pytest.raises(ConfigError, match="JOB_COMPLETION_INDEX") as refused:
        read_batch_line(BatchLineSource(str(batch), None, "pod"))
    assert refused.value.exit_code == 2


def test_the_edge_finds_the_batch_line_from_the_environment(tmp_path, monkeypatch):
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"instance_uri": "x", "OUTPUT_URI": "y"}\n\n{"instance_uri": "z", "output_uri": "w"}\n')
    monkeypatch.setenv("SDFT_BATCH_URI", str(batch))
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    monkeypatch.setenv("SDFT_RUN_ID", "subjects")
    line = read_batch_line(batch_line_source())
    assert line == {"instance_uri": "z", "output_uri": "w", "run_id": "subjects-1"}
    assert load_settings(line).instance_uri == "z"


def test_unknown_key_in_a_batch_line_exits_2(tmp_path):
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"instance_uri": "x", "output_uri": "y", "learning_rat": 1}\n')
    with pytest.raises(ConfigError, match="learning_rat") as refused:
        load_settings(read_batch_line(BatchLineSource(str(batch), "0", "pod")))
    assert refused.value.exit_code == 2
