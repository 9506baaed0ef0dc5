"""SD 2.x: SD 1.x's shape with an OpenCLIP ViT-H text encoder (1024 wide) and, for the 768 px models,
v-prediction (read from the scheduler config). The UNet's `upcast_attention` comes with its config."""

from job.families.sd1 import SD1


class SD2(SD1):
    name = "sd2"
    kohya_version = "sd_v2"

    def native_resolution(self, prediction_type: str) -> int:
        """768 for the v-prediction models (stable-diffusion-2(-1)), 512 for the epsilon ones (-base)."""
        return 768 if prediction_type == "v_prediction" else 512

    def architecture(self, prediction_type: str) -> str:
        # sai_model_spec's names: the 768 px v-prediction model and the 512 px base.
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"
