"""The frozen encoders of UniWorld-V1, through transformers: Qwen2.5-VL, SigLIP, and FLUX's T5 / CLIP text encoders.

- VLMEncoder: Qwen2.5-VL-7B-Instruct; the last-layer hidden state of every token of the prompt (docs/official.md §2.1).
- SiglipEncoder: siglip2-so400m-patch16-512; 1024 tokens of width 1152 per reference image (docs/official.md §1.3).
- T5Encoder / ClipPooled: FLUX.1-dev's T5-XXL and pooled CLIP-L (training uses CLIP("") only, docs/official.md §2.5).
`load_*` reads real weights (a local folder or a hub id); `tiny_*` build random, offline, seeded ones (tests, toy).
"""

import logging
import math
import os

import torch
import torch.nn as nn
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import (
    AddedToken,
    CLIPTextModel,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.utils import logging as hf_logging

logger = logging.getLogger(__name__)

QWEN_ID = "Qwen/Qwen2.5-VL-7B-Instruct"
SIGLIP_ID = "google/siglip2-so400m-patch16-512"
FLUX_ID = "black-forest-labs/FLUX.1-dev"
VLM_PIXELS = 448 * 448  # images reach Qwen at about 200,704 pixels: 256 image tokens at 1:1 (docs/official.md §3)
MAX_RATIO = 200  # Qwen2.5-VL refuses images more elongated than this

IMAGE = "<image>"  # the marker of the official data (docs/official.md §7.1): "Make the car red.\n<image>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
IMAGE_BLOCK = VISION_START + IMAGE_PAD + VISION_END  # one pad per image; tokenize() expands it to the image's N


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's size rule (qwen_vl_utils and transformers): sides rounded to multiples of `factor`, then scaled
    down (floor) or up (ceil) into [min_pixels, max_pixels] at the original aspect ratio (docs/official.md §3.1)."""
    if max(height, width) > MAX_RATIO * min(height, width):
        raise ValueError(f"a {width}x{height} image: Qwen2.5-VL takes aspect ratios up to {MAX_RATIO}; crop it")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = (max(factor, math.floor(side / beta / factor) * factor) for side in (height, width))
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def qwen_input_size(width: int, height: int, *, training: bool, pixels: int = VLM_PIXELS) -> tuple[int, int]:
    """(height, width) at which an image reaches Qwen2.5-VL in the official code (docs/official.md §3): training
    resizes once at factor 56 (qwen_vl_utils' fetch_image); inference at factor 28, then again in the processor."""
    if training:
        return smart_resize(height, width, 56, pixels, pixels)
    return smart_resize(*smart_resize(height, width, 28, pixels, pixels), 28, pixels, pixels)


class Frozen(nn.Module):
    """Base of the encoders, built frozen (requires_grad_(False).eval()); .train() keeps them in eval mode."""

    def train(self, mode: bool = True):
        return super().train(False)  # the VLM, SigLIP, T5 and CLIP are frozen in both stages (paper §3.2)


# ----------------------------------------------------------------------------------------------------------------
# Qwen2.5-VL


class VLMEncoder(Frozen):
    """Qwen2.5-VL as UniWorld's condition encoder: the last hidden state (after the final norm) of every token."""

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration, tokenizer, image_processor, pixels: int = VLM_PIXELS):
        super().__init__()
        self.model, self.tokenizer, self.image_processor, self.pixels = model, tokenizer, image_processor, pixels
        self.image_pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.vision_end_id = tokenizer.convert_tokens_to_ids(VISION_END)  # the j-th one closes the j-th image
        self.assistant_id = tokenizer.convert_tokens_to_ids("assistant")  # the task router reads its last one
        self.requires_grad_(False).eval()

    def prompt(self, instruction: str, n_images: int, train: bool = True) -> str:
        """The prompt before its image pads are expanded, as the official code builds it (docs/official.md §2.2)."""
        if train:  # Qwen2VLPrompter.get_train_prompt: no system turn; the answer <gen_image> becomes <|vision_start|>
            if instruction.count(IMAGE) != n_images:
                raise ValueError(
                    f"training instructions mark each image with {IMAGE} where it goes (e.g. 'Make the car red.\\n"
                    f"<image>'); got {instruction.count(IMAGE)} markers for {n_images} images in {instruction!r}"
                )
            user = instruction.replace(IMAGE, IMAGE_BLOCK)
            return f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{VISION_START}"
        if IMAGE in instruction:  # app.py / cli.py: the text first, then the images
            raise ValueError(f"at inference the images follow the instruction; remove the {IMAGE} markers")
        # official: Qwen's chat template (apply_chat_template, add_generation_prompt) minus its default system turn
        return f"{IM_START}user\n{instruction}{IMAGE_BLOCK * n_images}{IM_END}\n{IM_START}assistant\n"

    def tokenize(self, instructions: list[str], images: list[list[Image.Image]], train: bool = True) -> dict:
        """Prompts, images -> left-padded model inputs; each image's pad becomes grid.prod() / merge² pads."""
        if len(instructions) != len(images):
            raise ValueError(f"got {len(instructions)} instructions but {len(images)} image lists; give one per sample")
        texts = [self.prompt(text, len(imgs), train) for text, imgs in zip(instructions, images, strict=True)]
        batch = {}
        flat = [img.convert("RGB") for imgs in images for img in imgs]
        if flat:  # as the official code: PIL bicubic at factor 56 (training) or 28 (inference), then the processor,
            # which keeps that size in training and resizes it once more at inference (docs/official.md §3.2, §3.3)
            factor, bounds = (56, (56 * 56, 28 * 28 * 16384)) if train else (28, (self.pixels, self.pixels))
            flat = [img.resize(smart_resize(img.height, img.width, factor, self.pixels, self.pixels)[::-1],
                               Image.BICUBIC) for img in flat]
            size = {"shortest_edge": bounds[0], "longest_edge": bounds[1]}
            px = self.image_processor(images=flat, size=size, return_tensors="pt")
            batch.update(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])  # (sum hw, 1176), (N, 3)
            counts = iter((px["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist())
            texts = [_expand_pads(text, [next(counts) for _ in imgs]) for text, imgs in zip(texts, images, strict=True)]
        tok = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")  # official: left padding
        batch.update(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        batch["mm_token_type_ids"] = (tok["input_ids"] == self.image_pad_id).int()  # 1 on image tokens (M-RoPE)
        return {k: v.to(self.model.device) for k, v in batch.items()}

    @torch.no_grad()
    def forward(self, instructions: list[str], images: list[list[Image.Image]], train: bool = True):
        """-> hidden (B, L, D), attention_mask (B, L), input_ids (B, L), rows left-padded. Image j of row b ends at the
        j-th `vision_end_id` of input_ids[b]; its SigLIP tokens go right before it (docs/official.md §2.3)."""
        batch = self.tokenize(instructions, images, train)
        qwen = self.model.model  # ViT + text decoder, no lm_head
        ids, mask, grid = batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw")
        # M-RoPE positions that skip the left padding (also for text-only rows, as transformers 4.50 did)
        pos, _ = qwen.get_rope_index(ids, batch["mm_token_type_ids"], grid, attention_mask=mask)  # (3, B, L)
        out = qwen(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=batch.get("pixel_values"),
                   image_grid_thw=grid, use_cache=False)
        return out.last_hidden_state, mask, ids

    @torch.no_grad()
    def answer(self, question: str, images: list[Image.Image] = (), max_new_tokens: int = 128) -> str:
        """Understanding mode: plain Qwen2.5-VL generation with the inference prompt (app.py, max_new_tokens 128)."""
        batch = self.tokenize([question], [list(images)], train=False)
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens)
        return self.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def _expand_pads(text: str, counts: list[int]) -> str:
    """Replace the k-th <|image_pad|> with counts[k] of them, as Qwen2_5_VLProcessor does."""
    pieces = text.split(IMAGE_PAD)  # one more piece than images
    return pieces[0] + "".join(IMAGE_PAD * n + piece for n, piece in zip(counts, pieces[1:], strict=True))


def load_vlm(path_or_id: str = QWEN_ID, pixels: int = VLM_PIXELS, dtype: torch.dtype | None = None) -> VLMEncoder:
    """Qwen2.5-VL from a Qwen folder, a UniWorld-V1 release folder (denoise_tower.* keys skipped) or a hub id."""
    fields, _ = Qwen2_5_VLConfig.get_config_dict(path_or_id, **_source(path_or_id, "Qwen2.5-VL"))
    config = None
    if fields.get("model_type") == "univa_qwen2p5vl":  # docs/official.md §10.1: unknown to transformers; Qwen's fields
        config = Qwen2_5_VLConfig(**{k: v for k, v in fields.items() if k != "model_type"})
    model = _load(Qwen2_5_VLForConditionalGeneration, path_or_id, config=config, dtype=dtype,
                  ignore=("denoise_tower.",))
    local = os.path.isdir(path_or_id)
    tokenizer = Qwen2Tokenizer.from_pretrained(path_or_id, local_files_only=local)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path_or_id, local_files_only=local)
    return VLMEncoder(model, tokenizer, image_processor, pixels)


def tiny_vlm(seed: int = 0, hidden: int = 64, layers: int = 2, words: list[str] | None = None,
             pixels: int = 56 * 56) -> VLMEncoder:
    """A random Qwen2.5-VL with a byte-level tokenizer (+ optional whole-word tokens); 56² pixels = 4 image tokens."""
    tok = Qwen2Tokenizer(vocab=_byte_vocab(), merges=[], unk_token="<|endoftext|>", eos_token=IM_END,
                         pad_token="<|endoftext|>")
    specials = [IM_START, VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    _add_words(tok, words)
    ids = tok.convert_tokens_to_ids
    half = hidden // 4 // 2  # 4 heads; M-RoPE splits head_dim / 2 over (t, h, w) like 7B's [16, 24, 24]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=None,
            eos_token_id=ids(IM_END), pad_token_id=ids("<|endoftext|>"),
            rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                             "mrope_section": [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=hidden,
                           fullatt_block_indexes=[1]),
        image_token_id=ids(IMAGE_PAD), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids(VISION_START), vision_end_token_id=ids(VISION_END))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return VLMEncoder(model, tok, Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels), pixels)


# ----------------------------------------------------------------------------------------------------------------
# SigLIP


class SiglipEncoder(Frozen):
    """SigLIP vision tower: last_hidden_state (post-layernorm, no pooling head) per image (docs/official.md §1.3)."""

    def __init__(self, model: SiglipVisionModel, image_processor):
        super().__init__()
        self.model, self.image_processor = model, image_processor
        self.size = model.config.image_size  # 512 for siglip2-so400m-patch16-512
        self.tokens = (self.size // model.config.patch_size) ** 2  # 1024
        self.requires_grad_(False).eval()

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Squash to size² (no crop), rescale 1/255, normalise with mean = std = 0.5: (N, 3, S, S) in [-1, 1]."""
        size = {"height": self.size, "width": self.size}
        rgb = [img.convert("RGB") for img in images]
        return self.image_processor(images=rgb, size=size, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def forward(self, images: list[Image.Image]) -> torch.Tensor:
        """-> (N, T, C): T = (size / patch)², C = hidden (1024, 1152 at full size); (0, T, C) for no images."""
        if not images:
            return torch.zeros(0, self.tokens, self.model.config.hidden_size).to(self.model.device, self.model.dtype)
        pixels = self.preprocess(images).to(self.model.device, self.model.dtype)
        return self.model(pixel_values=pixels).last_hidden_state

    def save_pretrained(self, folder: str):
        """Write the SigLIP hub layout: config, weights, preprocessor config."""
        self.model.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)


def load_siglip(path_or_id: str = SIGLIP_ID, dtype: torch.dtype | None = None) -> SiglipEncoder:
    """SigLIP from a folder or hub id; a full SiglipModel checkpoint (model_type siglip) gives its vision tower."""
    model = _load(SiglipVisionModel, path_or_id, dtype=dtype, ignore=("text_model.", "logit_scale", "logit_bias"))
    image_processor = SiglipImageProcessorPil.from_pretrained(path_or_id, local_files_only=os.path.isdir(path_or_id))
    return SiglipEncoder(model, image_processor)


def tiny_siglip(seed: int = 0, hidden: int = 32, image_size: int = 64, patch: int = 16) -> SiglipEncoder:
    """A random SigLIP vision tower: (N, (image_size / patch)², hidden) = (N, 16, 32) by default."""
    config = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                num_attention_heads=2, image_size=image_size, patch_size=patch, vision_use_head=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SiglipVisionModel(config)
    return SiglipEncoder(model, SiglipImageProcessorPil(size={"height": image_size, "width": image_size}))


# ----------------------------------------------------------------------------------------------------------------
# FLUX text encoders (diffusers FLUX.1-dev layout: text_encoder/ + tokenizer/, text_encoder_2/ + tokenizer_2/)


class ClipPooled(Frozen):
    """CLIP-L pooler_output (EOS token, no projection), 77 tokens padded to max length; zeros without weights."""

    def __init__(self, model: CLIPTextModel | None = None, tokenizer=None, dim: int = 768):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.register_buffer("zero", torch.zeros(dim), persistent=False)  # the pooled vector without a model
        if model is None:
            logger.warning("no CLIP weights: the pooled prompt vector is zeros (%d); the official recipe uses "
                           "CLIP-L('')", dim)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        """-> (B, dim); training always feeds [""] (docs/official.md §2.5)."""
        if self.model is None:
            return self.zero.expand(len(prompts), -1)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")["input_ids"].to(self.model.device)
        return self.model(input_ids=ids).pooler_output


class T5Encoder(Frozen):
    """T5-XXL encoder last_hidden_state, padded to max_length and run with attention_mask=None as BFL does."""

    def __init__(self, model: T5EncoderModel, tokenizer, max_length: int = 512):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length  # 512 dev; 256 in app.py/cli.py
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        """-> (B, max_length, d_model); the padding tokens are encoded and kept, unmasked."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")["input_ids"].to(self.model.device)
        return self.model(input_ids=ids).last_hidden_state


def load_clip(path_or_id: str = FLUX_ID, dtype: torch.dtype | None = None) -> ClipPooled:
    """CLIP-L text encoder of a FLUX folder or hub id (text_encoder/, tokenizer/)."""
    model = _load(CLIPTextModel, path_or_id, subfolder="text_encoder", dtype=dtype)
    local = os.path.isdir(path_or_id)
    tokenizer = CLIPTokenizer.from_pretrained(path_or_id, subfolder="tokenizer", local_files_only=local)
    return ClipPooled(model, tokenizer)


def load_t5(path_or_id: str = FLUX_ID, max_length: int = 512, dtype: torch.dtype | None = None) -> T5Encoder:
    """T5-XXL encoder of a FLUX folder or hub id (text_encoder_2/, tokenizer_2/)."""
    model = _load(T5EncoderModel, path_or_id, subfolder="text_encoder_2", dtype=dtype)
    local = os.path.isdir(path_or_id)
    tokenizer = T5Tokenizer.from_pretrained(path_or_id, subfolder="tokenizer_2", local_files_only=local)
    return T5Encoder(model, tokenizer, max_length)


# ----------------------------------------------------------------------------------------------------------------
# Loading helpers


def _source(path_or_id: str, what: str, subfolder: str = "") -> dict:
    """from_pretrained kwargs: a local folder never touches the network; a missing path is an error, not a hub id."""
    if os.path.isdir(path_or_id):
        if not os.path.isfile(os.path.join(path_or_id, subfolder, "config.json")):
            raise FileNotFoundError(f"{what}: no config.json in {os.path.join(path_or_id, subfolder)!r}; "
                                    f"pass the folder of a saved checkpoint")
        return {"local_files_only": True}
    if os.path.exists(path_or_id) or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(f"{what}: no folder at {path_or_id!r}; pass a local checkpoint folder or a hub id "
                                f"('organisation/name', e.g. {QWEN_ID!r})")
    return {}  # a hub id: huggingface_hub downloads (or finds it in its cache)


def _load(cls, path_or_id: str, subfolder: str = "", dtype=None, ignore: tuple[str, ...] = (), **kwargs):
    """cls.from_pretrained with our own key report: missing weights are an error; keys under `ignore` are expected."""
    kwargs.update(_source(path_or_id, cls.__name__, subfolder), dtype=dtype)  # dtype None: the checkpoint's
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its LOAD REPORT would list e.g. the release's denoise_tower.* keys as UNEXPECTED
    try:
        model, info = cls.from_pretrained(path_or_id, subfolder=subfolder, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise ValueError(f"{path_or_id}: {len(info['missing_keys'])} weights of {cls.__name__} are missing (e.g. "
                         f"{sorted(info['missing_keys'])[:3]}); is this the right checkpoint?")
    skipped = [k for k in info["unexpected_keys"] if k.startswith(ignore)]
    other = sorted(k for k in info["unexpected_keys"] if not k.startswith(ignore))
    if skipped:
        logger.info("%s: skipped %d keys that %s does not use (%s...)", path_or_id, len(skipped), cls.__name__, ignore)
    if other:
        logger.warning("%s: %d unexpected keys ignored by %s, e.g. %s", path_or_id, len(other), cls.__name__, other[:3])
    return model


def _byte_vocab() -> dict[str, int]:
    """The 256 byte-level characters of GPT-2 style BPE, no merges: any text round-trips."""
    return {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}


def _add_words(tokenizer, words: list[str] | None):
    """Whole words as single tokens (a small world's vocabulary), matched only at word boundaries."""
    tokenizer.add_tokens([AddedToken(w, single_word=True) for w in words or []])
