"""diffusers → original (LDM / "checkpoint") key layout, the minimum a test needs to write a faithful
single-file checkpoint: the inverse of the mapping in diffusers' `loaders/single_file_utils.py`
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`), as in the original CompVis / Stability repositories' module names.

Each function takes a diffusers state dict and returns {original key: tensor}.
"""

import re

import torch

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
UNET_FIXED = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0", "conv_out": "out.2",
}


def unet_to_ldm(state: dict, config: dict, prefix: str = "model.diffusion_model.") -> dict:
    """UNet2DConditionModel keys → `model.diffusion_model.{input_blocks,middle_block,output_blocks,…}`."""
    per_block = config["layers_per_block"] + 1  # resnets + the down/upsampler slot
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        new = None
        if module in UNET_FIXED:
            new = UNET_FIXED[module]
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", module):
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + block * per_block + layer
            new = f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", module):
            new = f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", module):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", module):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", module):
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = block * per_block + layer
            new = f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", module):
            block = int(m[1])
            slot = 2 if up_has_attention[block] else 1
            new = f"output_blocks.{block * per_block + per_block - 1}.{slot}.conv"
        if new is None:
            raise KeyError(f"no original name for UNet key {key}")
        out[f"{prefix}{new}.{param}"] = tensor
    return out


def _resnet(name: str) -> str:
    for diffusers, original in RESNET:
        if name == diffusers:
            return original
    raise KeyError(name)


def vae_to_ldm(state: dict, prefix: str = "first_stage_model.") -> dict:
    """AutoencoderKL keys → `first_stage_model.{encoder,decoder}.{down,mid,up}…` (attention as 1×1 convs)."""
    blocks = 4
    out = {}
    for key, tensor in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.block.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.upsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            new = (new.replace("group_norm.", "norm.").replace("to_q.", "q.").replace("to_k.", "k.")
                   .replace("to_v.", "v.").replace("to_out.0.", "proj_out."))
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # the original attention projections are 1×1 convolutions
        out[prefix + new] = tensor
    return out


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """CLIPTextModel keys → `<prefix>text_model.…` (SD 1.x `cond_stage_model.transformer.`, SDXL
    `conditioner.embedders.0.transformer.`)."""
    return {prefix + _with_text_model(key): tensor for key, tensor in state.items() if "position_ids" not in key}


def _with_text_model(key: str) -> str:
    # transformers 5 saves CLIPTextModel without the `text_model.` level; the original layout has it.
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


OPEN_CLIP_LAYER = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                   ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]


def open_clip_to_ldm(state: dict, prefix: str, width: int, extra_layer: bool = False) -> dict:
    """CLIPTextModel(WithProjection) keys → OpenCLIP's (`<prefix>transformer.resblocks.N.attn.in_proj_weight`, …).

    q/k/v are stacked into `in_proj_*`; `text_projection` is stored transposed (OpenCLIP multiplies
    `x @ text_projection`). `extra_layer` appends a copy of the last layer, as SD 2.x files hold the
    24th layer that the diffusers text encoder (penultimate-layer output) leaves out.
    """
    state = {_with_text_model(k): v for k, v in state.items() if "position_ids" not in k}
    out = {
        prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    else:
        out[prefix + "text_projection"] = torch.eye(width, dtype=out[prefix + "ln_final.weight"].dtype)
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    for layer in layers + ([layers[-1] + 1] if extra_layer else []):
        source = min(layer, layers[-1])
        get = lambda name: state[f"text_model.encoder.layers.{source}.{name}"]  # noqa: E731
        base = f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[base + f"attn.in_proj_{kind}"] = torch.cat([get(f"self_attn.{p}_proj.{kind}") for p in "qkv"])
            for diffusers, original in OPEN_CLIP_LAYER:
                out[base + f"{original}.{kind}"] = get(f"{diffusers}.{kind}")
    return out
