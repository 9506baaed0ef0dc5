"""SDXL DreamBooth through the real S3 server (issue 11): `model/` is an SDXL pipeline people load, its
text encoders are saved in the standard `text_model.` layout, and prior preservation generates class
images with the SDXL pipeline from the class prompt, once, for every later run of the class."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from job.digests import sha256_file
from jobrun import job_env, run_job
from models_util import CLASS_PROMPT, INSTANCE_PROMPT, contract_files, render, s3_run, tiny_model_path

pytestmark = pytest.mark.slow  # each test runs the job end to end

RESOLUTION = 64
DREAMBOOTH = {"SDFT_BASE_MODEL": "builtin:tiny-sdxl", "SDFT_METHOD": "dreambooth", "SDFT_RESOLUTION": str(RESOLUTION),
              "SDFT_LEARNING_RATE": "1e-3", "SDFT_MAX_TRAIN_STEPS": "4", "SDFT_CHECKPOINT_EVERY_STEPS": "1000",
              "SDFT_SAMPLE_INFERENCE_STEPS": "2"}
PRIOR = {**DREAMBOOTH, "SDFT_WITH_PRIOR_PRESERVATION": "true", "SDFT_CLASS_PROMPT": CLASS_PROMPT,
         "SDFT_NUM_CLASS_IMAGES": "2", "SDFT_TRAIN_TEXT_ENCODER": "true"}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def prior_run(s3_server, tmp_path_factory):
    """DreamBooth of UNet and both text encoders with the prior loss, from an empty class URI."""
    return s3_run("sdxl-prior", s3_server, tmp_path_factory, **PRIOR)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_model_path(tmp_path_factory, "tiny-sdxl"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _sdxl_model_files() -> set[str]:
    files = {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}
    for name in TEXT_ENCODERS:
        files |= {f"{name}/config.json", f"{name}/model.safetensors"}
    for name in ("tokenizer", "tokenizer_2"):
        files |= {f"{name}/tokenizer.json", f"{name}/tokenizer_config.json"}
    return {f"model/{f}" for f in files}


def test_the_output_is_an_sdxl_pipeline_folder_and_the_record(prior_run):
    record = contract_files("lora") - {"lora/pytorch_lora_weights.safetensors", "lora/test-run.safetensors"}
    class_images = {k for k in prior_run.keys if k.startswith("class_images/")}
    assert prior_run.keys - class_images == record | _sdxl_model_files()


def test_model_loads_as_an_sdxl_pipeline_and_renders_what_was_trained(prior_run, base):
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(prior_run.out / "model")  # a plain user's call
    pipeline.set_progress_bar_config(disable=True)
    image = render(pipeline, INSTANCE_PROMPT, RESOLUTION)
    assert image.shape == (RESOLUTION, RESOLUTION, 3) and np.isfinite(image).all()
    assert np.abs(image - render(base, INSTANCE_PROMPT, RESOLUTION)).max() > 2 / 255


def _standard(state_dict: dict) -> dict:
    """transformers 5's CLIPTextModel keys (no `text_model.` level) in the standard layout."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in state_dict.items()}


def test_text_encoders_are_saved_in_the_standard_layout_and_load_with_every_weight(prior_run, base):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    for name, model_class in zip(TEXT_ENCODERS, (CLIPTextModel, CLIPTextModelWithProjection)):
        with safe_open(prior_run.out / "model" / name / "model.safetensors", "pt") as saved:
            stored = {key: saved.get_tensor(key) for key in saved.keys()}
        # What ComfyUI's and InvokeAI's loaders (and transformers 4) look for.
        assert all(key.startswith(("text_model.", "text_projection.")) for key in stored), name
        loaded = _standard(model_class.from_pretrained(prior_run.out / "model", subfolder=name).state_dict())
        assert loaded.keys() == stored.keys()
        assert all(torch.equal(loaded[key], stored[key]) for key in stored), f"{name}: not every weight loaded"
        before = _standard(getattr(base, name).state_dict())
        assert any(not torch.equal(before[key], stored[key]) for key in stored), f"{name} did not train"


def test_class_images_come_from_the_class_prompt_through_the_sdxl_pipeline(prior_run, base):
    class_images = sorted((prior_run.out / "class_images").glob("*.png"))
    assert len(class_images) == 2
    assert all(p.name == f"class-{sha256_file(p)[:16]}.png" for p in class_images)  # named by content
    assert prior_run.result.named("class_images.generated")[0]["count"] == 2
    for path in class_images:
        info = Image.open(path).text
        assert info["prompt"] == CLASS_PROMPT
        stored = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
        assert stored.shape == (RESOLUTION, RESOLUTION, 3)

        def rendered(prompt):
            return base(prompt, height=RESOLUTION, width=RESOLUTION, num_inference_steps=int(info["num_inference_steps"]),
                        guidance_scale=float(info["guidance_scale"]), generator=torch.Generator().manual_seed(int(info["seed"])),
                        output_type="np").images[0]

        assert np.abs(rendered(CLASS_PROMPT) - stored).max() <= 2 / 255
        assert np.abs(rendered(INSTANCE_PROMPT) - stored).max() > 2 / 255
    import json

    metrics = [json.loads(line) for line in (prior_run.out / "metrics.jsonl").read_text().splitlines()]
    assert all(line["prior_loss"] > 0 and line["instance_loss"] > 0 for line in metrics)


def test_a_second_run_of_the_class_reuses_the_class_images(prior_run, s3_server, tmp_path_factory):
    bucket = prior_run.bucket
    env = job_env(tmp_path_factory.mktemp("work-sdxl-reuse"), SDFT_INSTANCE_URI=f"s3://{bucket}/subjects/dog/",
                  SDFT_OUTPUT_URI=f"s3://{bucket}/second/", SDFT_CLASS_URI=f"s3://{bucket}/out/class_images/",
                  **{**PRIOR, "SDFT_MAX_TRAIN_STEPS": "1", "SDFT_NUM_VALIDATION_IMAGES": "0"}, **s3_server.env())
    result = run_job(env)
    assert result.exit_code == 0, result.stdout[-3000:]
    assert result.named("class_images.reused")[0]["count"] == 2
    assert result.named("class_images.generated")[0]["count"] == 0
