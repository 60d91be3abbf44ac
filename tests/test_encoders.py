"""Tests for encoders.py: prompts and tokens as the official code builds them, hidden states against the HF models."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, SiglipConfig, SiglipModel
from transformers.processing_utils import ProcessorMixin

from encoders import (
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    ClipPooled,
    load_clip,
    load_siglip,
    load_t5,
    load_vlm,
    qwen_input_size,
    tiny_siglip,
    tiny_vlm,
)

BLOCK = VISION_START + IMAGE_PAD + VISION_END


def image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm(seed=0, words=["red", "car"], pixels=112 * 112)  # 8x8 patches = 16 tokens at 1:1


class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    """The stock HF processor as the reference, minus its video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = IMAGE_PAD, "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


# ----------------------------------------------------------------------------------------------------------------
# prompts and tokens


def test_train_prompt_strings(vlm):
    assert vlm.prompt("Make the car red.\n<image>", 1) == (
        f"<|im_start|>user\nMake the car red.\n{BLOCK}<|im_end|>\n<|im_start|>assistant\n<|vision_start|>"
    )
    assert vlm.prompt("Merge <image> with <image>", 2) == (
        f"<|im_start|>user\nMerge {BLOCK} with {BLOCK}<|im_end|>\n<|im_start|>assistant\n<|vision_start|>"
    )
    assert vlm.prompt("A red car.", 0) == (
        "<|im_start|>user\nA red car.<|im_end|>\n<|im_start|>assistant\n<|vision_start|>"
    )
    with pytest.raises(ValueError, match="markers"):
        vlm.prompt("Make the car red.", 1)


def test_inference_prompt_string(vlm):
    # the chat template minus the default system block; the instruction before the images; ends with assistant\n
    assert vlm.prompt("Make the car red.", 2, train=False) == (
        f"<|im_start|>user\nMake the car red.{BLOCK}{BLOCK}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert vlm.prompt("A red car.", 0, train=False) == "<|im_start|>user\nA red car.<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="follow the instruction"):
        vlm.prompt("Make the car red.<image>", 1, train=False)


def test_train_tokens_match_hf_processor(vlm):
    instructions = ["Merge <image> with <image>", "Make the car red.\n<image>"]
    images = [[image(112, 112, 0), image(60, 150, 1)], [image(90, 70, 2)]]
    batch = vlm.tokenize(instructions, images)
    grids = batch["image_grid_thw"]
    assert grids[0].tolist() == [1, 8, 8]  # 112² at a 112² budget
    ids = batch["input_ids"][0]
    pads = [n for tok, n in _runs(ids.tolist()) if tok == vlm.image_pad_id]
    assert pads == (grids[:2].prod(-1) // 4).tolist()  # N = grid.prod() / merge² per image, in order
    assert vlm.tokenizer.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n<|vision_start|>")
    assert (ids == vlm.vision_end_id).sum() == 2
    # the reference: qwen_vl_utils' fetch_image (PIL bicubic at factor 56), then HF's Qwen2_5_VLProcessor with the
    # checkpoint's default bounds, expanding the same one-pad prompts (docs/official.md §3.2)
    proc = ImageOnlyProcessor(Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16384), vlm.tokenizer)
    texts = [vlm.prompt(t, len(i)) for t, i in zip(instructions, images, strict=True)]
    resized = [im.resize(qwen_input_size(im.width, im.height, training=True, pixels=vlm.pixels)[::-1], Image.BICUBIC)
               for ims in images for im in ims]
    ref = proc(text=texts, images=resized, padding=True, padding_side="left", return_tensors="pt")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(batch[key], ref[key]), key


# (reference W, H) -> Qwen's input (H, W) in official training and inference: facts computed by running the official
# code (docs/official.md §3.4), not by this project's code
QWEN_SIZES = [((512, 512), (448, 448), (448, 448)), ((1024, 1024), (448, 448), (448, 448)),
              ((768, 512), (336, 504), (392, 560)), ((512, 768), (504, 336), (560, 392)),
              ((1024, 576), (336, 560), (364, 616)), ((576, 1024), (560, 336), (616, 364)),
              ((640, 480), (336, 504), (392, 532)), ((1280, 720), (336, 560), (364, 616)),
              ((333, 500), (560, 392), (532, 364)), ((2000, 300), (168, 1120), (196, 1176)),
              ((300, 2000), (1120, 168), (1176, 196)), ((1000, 1001), (448, 392), (476, 448))]


@pytest.mark.parametrize("size, training, inference", QWEN_SIZES)
def test_qwen_input_size_is_the_official_one(size, training, inference):
    assert qwen_input_size(*size, training=True) == training
    assert qwen_input_size(*size, training=False) == inference


def test_qwen_token_counts_end_to_end():
    """A 768x512 reference: 216 image tokens in training, 280 at inference, as in the official code."""
    vlm = tiny_vlm(seed=0)
    vlm.pixels = 448 * 448
    for train, tokens in ((True, 216), (False, 280)):
        batch = vlm.tokenize(["Make it red" + ("\n<image>" if train else "")], [[image(512, 768, 0)]], train)
        assert (batch["input_ids"] == vlm.image_pad_id).sum() == tokens
    with pytest.raises(ValueError, match="aspect ratios up to 200"):
        qwen_input_size(2010, 10, training=False)


def test_words_are_single_tokens(vlm):
    tokens = vlm.tokenizer.tokenize("the red car")
    assert "red" in tokens and "car" in tokens
    assert "red" not in vlm.tokenizer.tokenize("bored")  # whole words only


# ----------------------------------------------------------------------------------------------------------------
# hidden states


def test_hidden_equals_hf_last_hidden_state(vlm):
    instructions, images = ["Make the car red.\n<image>"], [[image(80, 100, 3)]]
    hidden, mask, ids = vlm(instructions, images)
    ref = vlm.model(**vlm.tokenize(instructions, images), output_hidden_states=True).hidden_states[-1]
    assert hidden.shape == (1, ids.shape[1], 64) and mask.shape == ids.shape
    torch.testing.assert_close(hidden, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("with_images", [True, False])
def test_left_padding_matches_single_samples(vlm, with_images):
    instructions = ["Make the car red.\n<image>", "Put <image> next to <image> on a long table"]
    images = [[image(64, 64, 4)], [image(100, 60, 5), image(50, 50, 6)]]
    if not with_images:  # the text-to-image path
        instructions, images = ["A car.", "A red car on a long table in the sun."], [[], []]
    hidden, mask, ids = vlm(instructions, images)
    short = mask[0].sum().item()
    n_pad = ids.shape[1] - short
    assert n_pad > 0 and mask[0, :n_pad].sum() == 0 and mask[0, n_pad:].all() and mask[1].all()
    assert (ids[0, :n_pad] == vlm.tokenizer.pad_token_id).all()
    for b in range(2):
        alone, alone_mask, alone_ids = vlm(instructions[b:b + 1], images[b:b + 1])
        assert alone_mask.all() and torch.equal(ids[b, mask[b].bool()], alone_ids[0])
        torch.testing.assert_close(hidden[b, mask[b].bool()], alone[0], atol=1e-5, rtol=1e-5)


def test_encoders_are_frozen(vlm, text_encoders):
    tiny_clip, tiny_t5, _ = text_encoders
    siglip = tiny_siglip()
    for enc in (vlm, siglip, tiny_clip(), tiny_t5()):
        enc.train()  # a parent's .train() must not unfreeze them
        assert not any(p.requires_grad for p in enc.parameters())
        assert not any(m.training for m in enc.modules())
    with torch.enable_grad():
        assert not vlm(["A car."], [[]])[0].requires_grad
        assert not siglip([image(64, 64, 0)]).requires_grad


def test_answer_is_greedy_generation_after_the_inference_prompt(vlm):
    """Understanding mode (app.py): plain Qwen2.5-VL, greedy from the inference prompt, decoded without specials."""
    img = image(64, 64, 7)
    batch = vlm.tokenize(["What is this?"], [[img]], train=False)
    assert vlm.tokenizer.decode(batch["input_ids"][0]).endswith("<|vision_end|><|im_end|>\n<|im_start|>assistant\n")
    new = vlm.model.generate(**batch, max_new_tokens=3, do_sample=False)[0, batch["input_ids"].shape[1] :]
    assert len(new) == 3 and new[0] == vlm.model(**batch).logits[0, -1].argmax()  # the most likely next token
    assert vlm.answer("What is this?", [img], max_new_tokens=3) == vlm.tokenizer.decode(new, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------
# SigLIP, CLIP, T5


def test_siglip_preprocess_and_output():
    siglip = tiny_siglip(image_size=64, patch=16, hidden=32)
    imgs = [image(90, 40, 8), image(64, 64, 9)]
    px = siglip.preprocess(imgs)
    assert px.shape == (2, 3, 64, 64) and px.min() >= -1 and px.max() <= 1
    # squash (no crop), bicubic, x / 255, then (x - 0.5) / 0.5
    manual = np.asarray(imgs[0].resize((64, 64), Image.BICUBIC), dtype=np.float32) / 255 * 2 - 1
    torch.testing.assert_close(px[0], torch.from_numpy(manual).permute(2, 0, 1), atol=1e-5, rtol=0)
    out = siglip(imgs)
    assert out.shape == (2, 16, 32)
    torch.testing.assert_close(out, siglip.model(pixel_values=px).last_hidden_state, atol=0, rtol=0)
    assert siglip([]).shape == (0, 16, 32)  # text-to-image: no reference images


def test_clip_pooled_is_eos_hidden_state(text_encoders):
    clip = text_encoders[0](hidden=32)
    pooled = clip(["", "a red car"])
    assert pooled.shape == (2, 32)
    ids = clip.tokenizer(["", "a red car"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    hidden = clip.model(input_ids=ids).last_hidden_state  # (2, 77, 32), after the final layer norm
    eos = (ids == 1).int().argmax(-1)  # first <|endoftext|>
    torch.testing.assert_close(pooled, hidden[torch.arange(2), eos], atol=0, rtol=0)


def test_zero_pooled_fallback(caplog):
    with caplog.at_level(logging.WARNING, logger="encoders"):
        clip = ClipPooled(dim=768)
    assert "zeros" in caplog.text
    assert torch.equal(clip(["", ""]), torch.zeros(2, 768))


def test_t5_is_unmasked_and_padded(text_encoders):
    t5 = text_encoders[1](d_model=32, max_length=16)
    out = t5(["a red car", "a much longer prompt"])
    assert out.shape == (2, 16, 32)
    tok = t5.tokenizer(["a red car"], padding="max_length", max_length=16, return_tensors="pt")
    torch.testing.assert_close(out[:1], t5.model(input_ids=tok["input_ids"]).last_hidden_state, atol=0, rtol=0)
    masked = t5.model(**tok).last_hidden_state
    assert not torch.allclose(out[:1], masked)  # BFL: attention_mask=None, so padding is attended


# ----------------------------------------------------------------------------------------------------------------
# loading


def test_save_load_round_trips(vlm, tmp_path, text_encoders):
    instructions, images = ["Make the car red.\n<image>"], [[image(70, 90, 10)]]
    for part in (vlm.model, vlm.tokenizer, vlm.image_processor):  # the Qwen hub layout
        part.save_pretrained(tmp_path / "qwen")
    loaded = load_vlm(str(tmp_path / "qwen"), pixels=vlm.pixels)
    assert all(torch.equal(a, b) for a, b in zip(vlm(instructions, images), loaded(instructions, images), strict=True))
    siglip = tiny_siglip()
    siglip.save_pretrained(tmp_path / "siglip")
    assert torch.equal(siglip(images[0]), load_siglip(str(tmp_path / "siglip"))(images[0]))
    tiny_clip, tiny_t5, save_text_encoders = text_encoders
    clip, t5 = tiny_clip(), tiny_t5()
    save_text_encoders(tmp_path / "flux", clip, t5)  # text_encoder/ + tokenizer/, text_encoder_2/ + tokenizer_2/
    prompts = ["a red car", ""]
    assert torch.equal(clip(prompts), load_clip(str(tmp_path / "flux"))(prompts))
    assert torch.equal(t5(prompts), load_t5(str(tmp_path / "flux"), max_length=t5.max_length)(prompts))


def test_loads_univa_release_folder(vlm, tmp_path, caplog):
    """docs/official.md §10.1: a flat transformers-4.50 config with model_type univa_qwen2p5vl, legacy keys,
    denoise_tower.* keys."""
    config = vlm.model.config.to_dict()
    text = config.pop("text_config")
    flat = {**{k: v for k, v in text.items() if k not in ("model_type", "rope_parameters")}, **config}
    flat.update(model_type="univa_qwen2p5vl", architectures=["UnivaQwen2p5VLForConditionalGeneration"],
                rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                denoise_tower={"denoiser_type": "flux", "input_hidden_size": 64}, shortcut_image_embeds=False)
    (tmp_path / "config.json").write_text(json.dumps(flat))
    legacy = {k.replace("model.visual.", "visual.").replace("model.language_model.", "model."): v.contiguous()
              for k, v in vlm.model.state_dict().items()}
    assert "model.layers.0.self_attn.q_proj.weight" in legacy and "visual.patch_embed.proj.weight" in legacy
    legacy["denoise_tower.denoise_projector.0.weight"] = torch.randn(12, 64)
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    vlm.tokenizer.save_pretrained(tmp_path)
    vlm.image_processor.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="encoders"):
        loaded = load_vlm(str(tmp_path), pixels=vlm.pixels)
    assert not [r for r in caplog.records if r.name == "encoders"]  # denoise_tower.* keys: expected
    instructions, images = ["Make the car red.\n<image>"], [[image(64, 64, 11)]]
    assert torch.equal(vlm(instructions, images)[0], loaded(instructions, images)[0])


def test_loads_full_siglip_checkpoint(tmp_path, caplog):
    """The siglip2 FixRes release is a whole SiglipModel (model_type siglip): the vision tower is taken from it."""
    vision = tiny_siglip().model.config.to_dict()
    full = SiglipModel(SiglipConfig(vision_config=vision, text_config=dict(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)))
    full.save_pretrained(tmp_path)
    tiny_siglip().image_processor.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="encoders"):
        siglip = load_siglip(str(tmp_path))
    assert not [r for r in caplog.records if r.name == "encoders"]  # text_model.*, logit_*: expected
    px = siglip.preprocess([image(64, 64, 12)])
    torch.testing.assert_close(siglip.model(pixel_values=px).last_hidden_state,
                               full.vision_model(pixel_values=px).last_hidden_state, atol=0, rtol=0)


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder at"):
        load_vlm(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_siglip(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_clip(str(tmp_path))


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Run-length encoding: [5, 5, 7] -> [(5, 2), (7, 1)]."""
    runs = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    return runs
