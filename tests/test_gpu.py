"""CUDA-only checks (marked `gpu`, skipped without CUDA): what a CPU run cannot show."""

import math

import pytest

from jobrun import EXAMPLES

pytestmark = pytest.mark.gpu


def test_on_cuda_auto_precision_is_half_and_a_tiny_run_trains_on_the_gpu(tmp_path):
    import torch

    from job.base_model import resolve_base_model
    from job.inputs import prepare_dataset
    from job.settings import Settings
    from job.train import load_models, make_accelerator, mixed_precision, train

    settings = Settings(base_model="builtin:tiny", instance_uri=str(EXAMPLES), instance_prompt="a photo of sks dog",
                        output_uri=str(tmp_path / "out"), resolution=32, max_train_steps=3)
    assert mixed_precision("auto") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    accelerator = make_accelerator(settings)
    models = load_models(resolve_base_model("builtin:tiny", tmp_path / "models").path, accelerator)
    result = train(settings, models, accelerator, prepare_dataset(EXAMPLES, "a photo of sks dog"))
    assert result.steps == 3 and all(math.isfinite(loss) for loss in result.losses)
    assert models.unet.device.type == "cuda"
    # Trainable LoRA weights stay fp32 under half-precision autocast (Adam updates underflow in half).
    assert {p.dtype for p in models.unet.parameters() if p.requires_grad} == {torch.float32}
