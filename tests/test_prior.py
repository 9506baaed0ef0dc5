"""Prior preservation through the real S3 server: class images generated once, reused, and doing their job."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from job.class_images import plan_class_images
from job.digests import sha256_file
from job.storage import open_store
from jobrun import EXAMPLES, job_env, run_job
from models_util import (
    CLASS_PROMPT, DREAMBOOTH_LEARN, INSTANCE_PROMPT, denoising_loss, s3_run, tiny_model_path, upload_folder,
)

RESOLUTION = 32
PRIOR = {**DREAMBOOTH_LEARN, "SDFT_VALIDATION_EVERY_STEPS": "0", "SDFT_WITH_PRIOR_PRESERVATION": "true",
         "SDFT_CLASS_PROMPT": CLASS_PROMPT, "SDFT_NUM_CLASS_IMAGES": "3"}


@pytest.fixture(scope="module")
def learned(s3_server, tmp_path_factory):
    """The first run of the class: an empty class URI, then DreamBooth with the prior loss."""
    return s3_run("prior", s3_server, tmp_path_factory, **PRIOR)


@pytest.fixture(scope="module")
def reused(learned, s3_server, tmp_path_factory):
    """The next run of the same class (same class URI, another output), kept short."""
    env = job_env(tmp_path_factory.mktemp("work-reuse"), SDFT_INSTANCE_URI=f"s3://{learned.bucket}/subjects/dog/",
                  SDFT_OUTPUT_URI=f"s3://{learned.bucket}/second/", SDFT_CLASS_URI=f"s3://{learned.bucket}/out/class_images/",
                  **{**PRIOR, "SDFT_MAX_TRAIN_STEPS": "2"}, **s3_server.env())
    result = run_job(env)
    assert result.exit_code == 0, result.stdout[-3000:]
    return result


@pytest.mark.slow
def test_missing_class_images_are_generated_from_the_class_prompt_and_uploaded(learned, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    first = learned
    class_images = sorted((first.out / "class_images").glob("*.png"))
    # Named by content: `class-<sha256[:16]>.png`, so concurrent jobs cannot overwrite each other.
    assert len(class_images) == 3
    assert all(p.name == f"class-{sha256_file(p)[:16]}.png" for p in class_images)
    [event] = first.result.named("class_images.generated")
    assert event["count"] == 3 and event["prompt"] == CLASS_PROMPT
    assert first.result.named("class_images.reused")[0]["count"] == 0

    # Each image is exactly what the base model renders from the class prompt at the recorded seed,
    # and not what it renders from the instance prompt.
    base = StableDiffusionPipeline.from_pretrained(tiny_model_path(tmp_path_factory), safety_checker=None)
    base.set_progress_bar_config(disable=True)
    seeds = set()
    for path in class_images:
        info = Image.open(path).text
        assert info["prompt"] == CLASS_PROMPT
        seeds.add(info["seed"])
        stored = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255

        def render(prompt):
            return base(prompt, height=RESOLUTION, width=RESOLUTION, num_inference_steps=int(info["num_inference_steps"]),
                        guidance_scale=float(info["guidance_scale"]), generator=torch.Generator().manual_seed(int(info["seed"])),
                        output_type="np").images[0]

        assert np.abs(render(CLASS_PROMPT) - stored).max() <= 2 / 255
        assert np.abs(render(INSTANCE_PROMPT) - stored).max() > 2 / 255
    assert len(seeds) == 3  # a fixed seed per image, not one for all


@pytest.mark.slow
def test_the_next_run_of_the_same_class_reuses_them(reused):
    second = reused
    assert second.named("class_images.reused")[0]["count"] == 3
    assert second.named("class_images.generated")[0]["count"] == 0


@pytest.mark.slow
def test_instance_and_prior_losses_are_both_logged(learned):
    first = learned
    metrics = [json.loads(line) for line in (first.out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 30
    for line in metrics:
        assert line["loss"] == pytest.approx(line["instance_loss"] + line["prior_loss"], rel=1e-5)  # weight 1.0
    steps = first.result.named("train.step")
    assert all({"instance_loss", "prior_loss"} <= set(e) for e in steps)


@pytest.mark.slow
def test_prior_preservation_without_a_class_prompt_is_a_config_error(s3_server, tmp_path_factory):
    settings = {**PRIOR, "SDFT_CLASS_PROMPT": None}
    s3_server.start()
    bucket = s3_server.create_bucket("prior-noprompt")
    instance_uri = upload_folder(s3_server, bucket, EXAMPLES, "dog")
    result = run_job(job_env(tmp_path_factory.mktemp("work-noprompt"), SDFT_INSTANCE_URI=instance_uri,
                             SDFT_OUTPUT_URI=f"s3://{bucket}/out/", **settings, **s3_server.env()))
    assert result.exit_code == 2
    assert "SDFT_CLASS_PROMPT" in result.failure["reason"]
    assert not s3_server.client().list_objects_v2(Bucket=bucket, Prefix="out/class_images/").get("Contents")


def test_plan_reuses_stored_images_and_generates_only_the_rest(tmp_path):
    store = open_store(str(tmp_path))
    for name in ("mine-b.jpg", "class-00001.png", "mine-a.png", "notes.txt"):
        store.put(name, b"x")
    plan = plan_class_images(store, 5)
    assert plan.reused == ["class-00001.png", "mine-a.png", "mine-b.jpg"]
    assert plan.to_generate == [3, 4]
    assert plan_class_images(store, 2).reused == ["class-00001.png", "mine-a.png"]
    assert plan_class_images(store, 2).to_generate == []


# Prior preservation's job, measured on the class images at fixed timesteps and noise. A random
# base (builtin:tiny) improves on any images it trains on, so first the base is taught the class:
# DreamBooth on drawn class images (rings, nothing like the dog photos) until their loss plateaus.
# From that base, two DreamBooth runs on the dog with the same steps and seed, one with the prior
# loss on those class images and one without: the class loss drifts less from the base's with it.
def draw_class_images(folder):
    folder.mkdir()
    colors = [((230, 60, 40), (20, 40, 160)), ((40, 180, 70), (240, 220, 30)),
              ((250, 250, 250), (10, 10, 10)), ((120, 30, 160), (250, 150, 0))]
    for i, (background, ring) in enumerate(colors):
        image = Image.new("RGB", (64, 64), background)
        draw = ImageDraw.Draw(image)
        for radius in range(28, 0, -8):
            draw.ellipse((32 - radius, 32 - radius, 32 + radius, 32 + radius), outline=ring, width=4)
        image.save(folder / f"class-{i:05d}.png")
    return sorted(folder.glob("*.png"))


@pytest.mark.slow
@pytest.mark.timeout(2400)  # three runs, one of 300 steps: a busy 2-core machine needs far more than 600 s
def test_prior_preservation_keeps_the_class_closer_to_the_base(s3_server, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    class_images = draw_class_images(tmp_path_factory.mktemp("drawn") / "class")
    s3_server.start()
    class_uri = upload_folder(s3_server, s3_server.create_bucket("prior-rings"), class_images[0].parent, "class")
    quiet = {"SDFT_METHOD": "dreambooth", "SDFT_VALIDATION_EVERY_STEPS": "0", "SDFT_NUM_VALIDATION_IMAGES": "0",
             "SDFT_CHECKPOINT_EVERY_STEPS": "1000"}
    taught = s3_run("rings-base", s3_server, tmp_path_factory, **quiet, SDFT_INSTANCE_URI=class_uri,
                    SDFT_INSTANCE_PROMPT=CLASS_PROMPT, SDFT_TRAIN_BATCH_SIZE="4", SDFT_LEARNING_RATE="1e-3",
                    SDFT_MAX_TRAIN_STEPS="300", SDFT_SEED="0")
    dog = {**quiet, "SDFT_BASE_MODEL": str(taught.out / "model"), "SDFT_LEARNING_RATE": "2e-3",
           "SDFT_MAX_TRAIN_STEPS": "30", "SDFT_SEED": "0"}
    kept = s3_run("rings-with-prior", s3_server, tmp_path_factory, **dog, SDFT_WITH_PRIOR_PRESERVATION="true",
                  SDFT_CLASS_PROMPT=CLASS_PROMPT, SDFT_CLASS_URI=class_uri, SDFT_NUM_CLASS_IMAGES="4")
    forgot = s3_run("rings-without-prior", s3_server, tmp_path_factory, **dog)
    assert kept.result.named("class_images.reused")[0]["count"] == 4  # the drawn rings, nothing generated

    def class_loss(path):
        pipeline = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
        return denoising_loss(pipeline, class_images, CLASS_PROMPT, RESOLUTION)

    base, with_prior, without_prior = (class_loss(run.out / "model") for run in (taught, kept, forgot))
    # Measured (seeds 0/1/2): drift 0.041/0.033/0.023 with the prior against 0.066/0.069/0.072 without.
    assert abs(with_prior - base) < abs(without_prior - base) - 0.01, (base, with_prior, without_prior)


@pytest.mark.slow
def test_two_jobs_generating_into_one_class_prefix_at_once_keep_each_others_images(tmp_path):
    from job.class_images import class_image_seed
    from jobrun import WatchedJob

    shared = tmp_path / "class"
    jobs = {}
    for seed in (1, 2):  # other seeds, so other images: under fixed names one job's would replace the other's
        env = job_env(tmp_path / f"work-{seed}", SDFT_INSTANCE_URI=str(EXAMPLES), SDFT_OUTPUT_URI=str(tmp_path / f"out-{seed}"),
                      SDFT_CLASS_URI=str(shared), SDFT_WITH_PRIOR_PRESERVATION="true", SDFT_CLASS_PROMPT=CLASS_PROMPT,
                      SDFT_NUM_CLASS_IMAGES="2", SDFT_MAX_TRAIN_STEPS="1", SDFT_NUM_VALIDATION_IMAGES="0",
                      SDFT_SEED=str(seed))
        jobs[seed] = WatchedJob(env)
    results = {seed: job.finish(900) for seed, job in jobs.items()}

    expected_seeds = set()
    for seed, result in results.items():
        assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
        reused = result.named("class_images.reused")[0]["count"]
        expected_seeds |= {str(class_image_seed(seed, CLASS_PROMPT, index)) for index in range(reused, 2)}
    stored = sorted(shared.glob("*.png"))
    generated = sum(r.named("class_images.generated")[0]["count"] for r in results.values())
    assert len(stored) == generated  # the union: every image either job generated, none overwritten
    assert {Image.open(p).text["seed"] for p in stored} == expected_seeds
    assert all(p.name == f"class-{sha256_file(p)[:16]}.png" for p in stored)
