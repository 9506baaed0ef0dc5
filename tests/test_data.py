"""Fast, in-process: input preparation, per-step batching and kohya key renaming."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from job.errors import InputError
from job.inputs import Example, prepare_dataset
from job.kohya import to_kohya
from job.training_data import ImageSet
from jobrun import EXAMPLES

IMAGES = sorted(EXAMPLES.glob("*.png"))


def _folder(tmp_path: Path, count: int) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for image in IMAGES[:count]:
        shutil.copy(image, folder / image.name)
    return folder


def test_captions_come_from_the_txt_file_else_the_prompt_and_bad_files_are_skipped(tmp_path):
    folder = _folder(tmp_path, 2)
    (folder / IMAGES[0].with_suffix(".txt").name).write_text("  my own caption\n")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.pdf").write_bytes(b"%PDF")
    dataset = prepare_dataset(folder, "a photo of sks dog")
    assert {e.source: e.caption for e in dataset.examples} == {IMAGES[0].name: "my own caption",
                                                              IMAGES[1].name: "a photo of sks dog"}
    assert all(len(e.sha256) == 64 for e in dataset.examples)
    assert {s["path"] for s in dataset.skipped} == {"broken.png", "notes.pdf"}


def test_dataset_info_gives_the_prompts(tmp_path):
    folder = _folder(tmp_path, 1)
    (folder / "dataset_info.json").write_text(json.dumps({"instance_prompt": "sks cat", "class_prompt": "a cat"}))
    dataset = prepare_dataset(folder, None)
    assert (dataset.instance_prompt, dataset.class_prompt) == ("sks cat", "a cat")
    assert [e.caption for e in dataset.examples] == ["sks cat"]


@pytest.mark.parametrize("count, prompt, fragment", [(0, "a dog", "no usable instance images"), (1, None, "no caption")])
def test_no_images_or_no_caption_is_an_input_error(tmp_path, count, prompt, fragment):
    with pytest.raises(InputError, match=fragment) as refused:
        prepare_dataset(_folder(tmp_path, count), prompt)
    assert refused.value.exit_code == 3


def _image_set(seed: int = 0) -> ImageSet:
    examples = [Example(str(p), p.name, "0" * 64, f"caption {i}") for i, p in enumerate(IMAGES[:3])]
    return ImageSet(examples, resolution_px=32, bucketing=True, center_crop=True, random_flip=True, caption_dropout=0.0,
                    seed=seed, role="instance")


def test_each_epoch_shows_every_image_once_in_a_keyed_order():
    images = _image_set()  # three square images: one bucket, one image per micro-step at batch 1
    for epoch in range(3):
        assert sorted(images.draw(m, 0, 1, 1)[0].index for m in range(epoch * 3, epoch * 3 + 3)) == [0, 1, 2]
    # Keyed by micro-step, not drawn from a running generator: a resumed run sees the same batches.
    again = _image_set()
    assert [(d.index, d.flip) for m in (7, 2, 5) for d in again.draw(m, 0, 1, 1)] == \
        [(d.index, d.flip) for m in (7, 2, 5) for d in images.draw(m, 0, 1, 1)]
    draws = images.draw(4, 0, 1, 1)
    assert images.captions(draws) == [images.examples[d.index].caption for d in draws]
    orders = {tuple(_image_set(seed).draw(m, 0, 1, 1)[0].index for m in range(3)) for seed in range(8)}
    assert len(orders) > 1, "the seed changes the order"


def test_peft_keys_are_renamed_to_kohyas():
    up, down = torch.ones(4, 2), torch.zeros(2, 4, dtype=torch.float16)
    converted = to_kohya({"down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.lora_A.weight": down,
                          "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.lora_B.weight": up},
                         "lora_unet_", alpha=8)
    module = "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q"
    assert set(converted) == {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"}
    assert converted[f"{module}.lora_down.weight"].dtype == torch.float32
    assert converted[f"{module}.alpha"].item() == 8.0
    with pytest.raises(ValueError, match="unexpected LoRA key"):
        to_kohya({"to_q.weight": up}, "lora_unet_", alpha=8)
