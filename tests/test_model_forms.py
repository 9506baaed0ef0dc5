"""Base models in the forms people have them — fast checks (no real-shaped weights):
CLIP's tokenizer built offline, single-file headers (junk, not SD, inpainting, SD 2 prediction
type), the Hub download's file selection, fp16-variant-only folders, and early refusals."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from jobrun import EXAMPLES, job_env, run_job
from models_util import tiny_model_path, upload_folder

from job.errors import ModelError


def test_clip_tokenizer_is_clips_own_offline():
    from job.clip_tokenizer import VOCAB_SIZE, clip_tokenizer

    tokenizer = clip_tokenizer()
    assert len(tokenizer) == VOCAB_SIZE == 49408
    # openai/clip-vit-large-patch14 tokenizes this caption so (CLIP's README example ids).
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = clip_tokenizer(pad_token="!")("a cat", padding="max_length", max_length=6).input_ids
    assert padded == [49406, 320, 2368, 49407, 0, 0]  # OpenCLIP pads with "!" (id 0)


# --- single-file headers -----------------------------------------------------------------------

def _fake_checkpoint(path, tensors: dict, metadata=None):
    """A safetensors file holding only the named keys (tiny tensors of the given shapes)."""
    save_file({k: torch.zeros(shape, dtype=torch.float16) for k, shape in tensors.items()}, str(path), metadata)
    return path


SD1_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
}
SD2_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
}


@pytest.mark.parametrize("keys, family", [(SD1_KEYS, "sd1"), (SD2_KEYS, "sd2")])
def test_the_family_is_read_from_the_header(tmp_path, keys, family):
    from job.single_file import inspect_single_file

    model = inspect_single_file(_fake_checkpoint(tmp_path / "m.safetensors", keys), "m.safetensors")
    assert model.family == family and model.dtype == "float16"


def test_junk_and_not_sd_files_get_different_reasons(tmp_path):
    from job.single_file import inspect_single_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    with pytest.raises(ModelError, match="could not be read") as unreadable:
        inspect_single_file(junk, "junk.safetensors")
    lora = _fake_checkpoint(tmp_path / "lora.safetensors", {"lora_unet_down_blocks_0.lora_down.weight": (4, 8)})
    with pytest.raises(ModelError, match="not Stable Diffusion.*this file holds a LoRA") as not_sd:
        inspect_single_file(lora, "lora.safetensors")
    assert "could not be read" not in str(not_sd.value) and "this file holds" not in str(unreadable.value)


@pytest.mark.parametrize("channels, kind", [(9, "an inpainting model"), (8, "an instruct-pix2pix model")])
def test_an_inpainting_or_pix2pix_single_file_is_named(tmp_path, channels, kind):
    from job.single_file import inspect_single_file

    keys = {**SD1_KEYS, "model.diffusion_model.input_blocks.0.0.weight": (320, channels, 3, 3)}
    with pytest.raises(ModelError, match=f"this file holds {kind} \\(SD UNet with {channels} input channels\\)"):
        inspect_single_file(_fake_checkpoint(tmp_path / "m.safetensors", keys), "m.safetensors")


def test_a_unet_whose_cross_attention_does_not_fit_its_text_encoder_is_refused(tmp_path):
    from job.single_file import inspect_single_file

    keys = {**SD1_KEYS, "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}
    with pytest.raises(ModelError, match=r"cross-attention width \(1024\) does not match its text encoder\(s\) \(768\)"):
        inspect_single_file(_fake_checkpoint(tmp_path / "m.safetensors", keys), "m.safetensors")


@pytest.mark.parametrize("metadata, setting, expected", [
    ({}, "auto", ("v_prediction", "default")),  # SD 2.x 768 models are the common ones, as diffusers assumes
    ({"modelspec.prediction_type": "epsilon"}, "auto", ("epsilon", "metadata")),
    ({"modelspec.prediction_type": "v"}, "auto", ("v_prediction", "metadata")),
    ({"modelspec.architecture": "stable-diffusion-v2-512"}, "auto", ("epsilon", "metadata")),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, "auto", ("v_prediction", "metadata")),
    ({"ss_v_parameterization": "False"}, "auto", ("epsilon", "metadata")),
    ({"modelspec.prediction_type": "v"}, "epsilon", ("epsilon", "setting")),  # the setting wins
])
def test_sd2_prediction_type_from_setting_then_metadata(metadata, setting, expected):
    from job.single_file import prediction_type

    assert prediction_type("sd2", metadata, setting) == expected


def test_sd1_defaults_to_epsilon():
    from job.single_file import prediction_type

    assert prediction_type("sd1", {}, "auto") == ("epsilon", "default")


# --- the Hub download -------------------------------------------------------------------------

# The file listing of stable-diffusion-v1-5/stable-diffusion-v1-5 (main).
SD15_LISTING = """
.gitattributes README.md model_index.json v1-inference.yaml
v1-5-pruned.ckpt v1-5-pruned.safetensors v1-5-pruned-emaonly.ckpt v1-5-pruned-emaonly.safetensors
v1-5-pruned-emaonly.fp16.safetensors
feature_extractor/preprocessor_config.json
safety_checker/config.json safety_checker/model.safetensors safety_checker/model.fp16.safetensors
safety_checker/pytorch_model.bin safety_checker/pytorch_model.fp16.bin
scheduler/scheduler_config.json
text_encoder/config.json text_encoder/model.safetensors text_encoder/model.fp16.safetensors
text_encoder/pytorch_model.bin text_encoder/pytorch_model.fp16.bin
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
unet/config.json unet/diffusion_pytorch_model.safetensors unet/diffusion_pytorch_model.fp16.safetensors
unet/diffusion_pytorch_model.bin unet/diffusion_pytorch_model.fp16.bin
unet/diffusion_pytorch_model.non_ema.bin unet/diffusion_pytorch_model.non_ema.safetensors
vae/config.json vae/diffusion_pytorch_model.safetensors vae/diffusion_pytorch_model.fp16.safetensors
vae/diffusion_pytorch_model.bin vae/diffusion_pytorch_model.fp16.bin
""".split()
SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline", "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"], "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def _fake_hub(monkeypatch, tmp_path, listing, model_index, snapshot):
    """Replaces the Hub calls sdft makes; returns the list of snapshot_download calls' kwargs."""
    import huggingface_hub
    from huggingface_hub import constants

    calls = []
    index_file = tmp_path / "hub-model_index.json"
    index_file.write_text(json.dumps(model_index))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, revision=None: str(index_file))
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: list(listing))

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns, **kwargs})
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_the_hub_download_takes_only_the_components_sdft_loads(tmp_path, tmp_path_factory, monkeypatch):
    from fnmatch import fnmatch

    from job.base_model import resolve_base_model

    calls = _fake_hub(monkeypatch, tmp_path, SD15_LISTING, SD15_INDEX, tiny_model_path(tmp_path_factory))
    base = resolve_base_model("stable-diffusion-v1-5/stable-diffusion-v1-5", tmp_path / "models")
    assert base.path == tiny_model_path(tmp_path_factory) and len(calls) == 1
    # What huggingface_hub would download: the listing filtered by the allow patterns.
    selected = {f for f in SD15_LISTING if any(fnmatch(f, p) for p in calls[0]["allow_patterns"])}
    assert not [f for f in selected if "/" not in f and f != "model_index.json"]  # no root-level checkpoints
    assert not [f for f in selected if f.startswith(("safety_checker/", "feature_extractor/"))]
    assert not [f for f in selected if f.endswith((".bin", ".ckpt")) or ".fp16." in f or "non_ema" in f]
    assert selected == {
        "model_index.json", "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    }


def test_a_hub_repo_with_only_fp16_weights_downloads_the_fp16_ones(tmp_path, monkeypatch):
    from job.model_folder import pipeline_files

    listing = [f for f in SD15_LISTING if not (f.endswith(".safetensors") and ".fp16." not in f and "/" in f)]
    chosen = pipeline_files(listing, SD15_INDEX)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in chosen
    assert "text_encoder/model.fp16.safetensors" in chosen
    assert not [f for f in chosen if f.endswith(".bin") or f.startswith("safety_checker/")]


def test_another_architecture_on_the_hub_is_refused_before_any_weights(tmp_path, monkeypatch):
    from job.base_model import resolve_base_model

    flux = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    calls = _fake_hub(monkeypatch, tmp_path, ["model_index.json", "transformer/config.json"], flux, tmp_path)
    with pytest.raises(ModelError, match="it is FLUX"):
        resolve_base_model("black-forest-labs/FLUX.1-dev", tmp_path / "models")
    assert calls == []


# --- fp16-variant-only folders ----------------------------------------------------------------

@pytest.fixture(scope="module")
def fp16_only_model(tmp_path_factory):
    """builtin:tiny saved as `save_pretrained(variant="fp16")` does: fp16 weights, `.fp16.` names only."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("fp16-only") / "model"
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_path(tmp_path_factory), torch_dtype=torch.float16)
    pipeline.save_pretrained(folder, variant="fp16", safe_serialization=True)
    assert not list(folder.glob("*/diffusion_pytorch_model.safetensors")) and list(folder.glob("unet/*.fp16.safetensors"))
    return folder


def test_an_fp16_only_folder_is_presented_with_plain_names(tmp_path, fp16_only_model):
    from diffusers import UNet2DConditionModel

    from job.base_model import resolve_base_model

    base = resolve_base_model(str(fp16_only_model), tmp_path / "models")
    assert base.variant == "fp16" and base.manifest_fields() == {"format": "diffusers", "variant": "fp16"}
    unet = UNet2DConditionModel.from_pretrained(base.path, subfolder="unet", torch_dtype=torch.float32)
    assert unet.dtype == torch.float32  # the trainable weights are upcast as from any folder
    assert list(fp16_only_model.glob("unet/*.fp16.safetensors"))  # the user's folder is untouched


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_fp16_only_folder_passes_check_and_trains(tmp_path, fp16_only_model, where, request):
    if where == "s3":
        s3_server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("bucket")
        env_extra = request.getfixturevalue("s3_env")
        reference = upload_folder(s3_server, bucket, fp16_only_model, "models/tiny-fp16")
    else:
        env_extra, reference = {}, str(fp16_only_model)
    env = job_env(tmp_path / "work", SDFT_BASE_MODEL=reference, SDFT_INSTANCE_URI=str(EXAMPLES),
                  SDFT_OUTPUT_URI=str(tmp_path / "out"), SDFT_MAX_TRAIN_STEPS="2", **env_extra)
    checked = run_job(env, "check")
    assert checked.exit_code == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    result = run_job(env)
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(result.named("train.step")) == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["base_model"]["variant"] == "fp16"


# --- refusals in check and run ----------------------------------------------------------------

@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory):
    """builtin:tiny with a 9-channel UNet, as the SD inpainting models have (image + mask + masked latents)."""
    from diffusers import UNet2DConditionModel

    from job.builtin_models import tiny_configs

    folder = tmp_path_factory.mktemp("inpainting") / "model"
    shutil.copytree(tiny_model_path(tmp_path_factory), folder, ignore=shutil.ignore_patterns(".*"))
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel(**{**tiny_configs()["unet"], "in_channels": 9}).save_pretrained(folder / "unet")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("command", ["check", "run"])
def test_an_inpainting_model_is_exit_4_before_training(tmp_path, inpainting_model, command):
    env = job_env(tmp_path / "work", SDFT_BASE_MODEL=str(inpainting_model), SDFT_INSTANCE_URI=str(EXAMPLES),
                  SDFT_OUTPUT_URI=str(tmp_path / "out"))
    result = run_job(env, command)
    assert result.exit_code == 4, result.stdout[-3000:] + result.stderr[-3000:]
    assert "inpainting model (SD UNet with 9 input channels)" in result.failure["reason"]
    assert result.named("train.step") == []


def test_other_pipelines_and_mismatched_parts_are_refused_by_name(tmp_path, tmp_path_factory):
    from job.base_model import resolve_base_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_path(tmp_path_factory), folder, ignore=shutil.ignore_patterns(".*"))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ModelError, match="it is Stable Diffusion 3"):
        resolve_base_model(str(folder), tmp_path / "models")
    (folder / "model_index.json").write_text(json.dumps(index))
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    (folder / "text_encoder" / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ModelError, match="cross-attention width is 32 but its text encoder\\(s\\) give 64"):
        resolve_base_model(str(folder), tmp_path / "models")


def test_a_sharded_fp16_only_unet_loads_through_the_view(tmp_path, fp16_only_model):
    from diffusers import UNet2DConditionModel

    from job.base_model import resolve_base_model

    folder = tmp_path / "model"
    shutil.copytree(fp16_only_model, folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", variant="fp16")
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", variant="fp16", max_shard_size="100KB")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    base = resolve_base_model(str(folder), tmp_path / "models")
    loaded = UNet2DConditionModel.from_pretrained(base.path, subfolder="unet")
    for name, tensor in unet.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name].to(tensor.dtype), tensor)
