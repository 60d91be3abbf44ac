"""Shared fixtures: the official key tables (tests/keys), a small data set in the official format with bad data, tiny
text encoders, and a small toy-world data set."""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

import toy_data
from encoders import ClipPooled, T5Encoder, _add_words, _byte_vocab

KEYS = Path(__file__).resolve().parent / "keys"  # every tensor name and shape of the official checkpoints


@pytest.fixture(scope="session")
def official_keys():
    """name -> {key: shape} of an official checkpoint's table (docs/official.md §10.5)."""

    def read(name: str) -> dict[str, tuple]:
        rows = (line.rstrip("\n").split("\t") for line in open(KEYS / name).readlines()[1:])
        return {k: tuple(json.loads(s)) for k, s in rows}

    return read


GRAY, RED, BLUE = (128, 128, 128), (220, 40, 40), (40, 70, 220)


def scene(shapes, size=(64, 64), background=GRAY) -> Image.Image:
    """Flat shapes on a flat background: ("circle" | "square", colour, (x, y)) with radius 10."""
    im = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(im)
    for kind, color, (x, y) in shapes:
        (draw.ellipse if kind == "circle" else draw.rectangle)((x - 10, y - 10, x + 10, y + 10), fill=color)
    return im


def record(images, instruction: str) -> dict:
    """An official JSON record: the images (the last one the target), a human turn and the gpt turn <gen_image>."""
    return {"image": images, "conversations": [{"from": "human", "value": instruction},
                                               {"from": "gpt", "value": "<gen_image>"}]}


def make_dataset(root) -> str:
    """A tiny dataset in the official format; returns data.txt. 15 records: 3 malformed, and of the 12 valid ones
    5 are bad when loaded (records 1, 3, 5, 7, 8: missing, truncated, corrupt, 8x8 image, an edit too small to
    learn); 7 are good: 4 edits (0, 2, 4, 6: the last a reconstruction) and 3 text-to-image (9, 10, 11)."""
    img = os.path.join(root, "images")
    os.makedirs(img, exist_ok=True)
    save = lambda im, name, **kw: im.save(os.path.join(img, name), **kw) or name
    circle, blue = scene([("circle", RED, (20, 30))]), scene([("circle", BLUE, (20, 30))])
    save(circle, "ref.png")
    good = [record([save(circle, "e0_ref.png"), save(blue, "e0_tgt.png")], "Make the circle blue.\n<image>"),
            record([save(scene([("square", RED, (40, 40))]), "e1_ref.png"), save(scene([]), "e1_tgt.png")],
                   "Remove the square <image>"),
            record(["ref.png", save(scene([("circle", RED, (20, 30)), ("square", BLUE, (50, 20))]), "e2_tgt.png")],
                   "Add a blue square at the right. <image>"),
            record(["ref.png", "ref.png"], "Simply reconstruct the original image with no enhancements. <image>")]
    with open(os.path.join(img, "e0_tgt.png"), "rb") as f:
        png = f.read()
    with open(os.path.join(img, "truncated.png"), "wb") as f:
        f.write(png[: len(png) // 2])
    with open(os.path.join(img, "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    speck = circle.copy()
    speck.putpixel((60, 60), BLUE)  # 1 pixel of 4096 changed: under masks.py's 0.1%, rejected
    blue_it = "Make the circle blue. <image>"
    bad = [record(["missing.png", "e0_tgt.png"], blue_it), record(["ref.png", "truncated.png"], blue_it),
           record(["corrupt.png", "e0_tgt.png"], blue_it),
           record(["ref.png", save(scene([], size=(8, 8)), "tiny.png")], blue_it),
           record(["ref.png", save(speck, "speck.png")], blue_it)]
    edits = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], bad[3], bad[4],
             record(["ref.png", "e0_tgt.png"], "Two markers <image> <image>"),  # malformed: 3 markers, 2 images
             {"image": ["e0_tgt.png"]},  # malformed: no conversations
             record(["ref.png", "e0_tgt.png"], "no marker")]  # malformed: 1 marker for 2 images
    palette = scene([("square", BLUE, (30, 30))]).convert("P")  # colour modes other than RGB are converted
    t2i = [record(save(scene([("circle", RED, (32, 32))], background=(255, 255, 255)), "t0.png"),
                  "A red circle on a white background."),  # "image" as a str, not a list
           record(save(palette, "t1.png"), "A blue square."),
           record(save(exif_rotated(), "t2.jpg", exif=exif_rotated().getexif(), quality=95), "A tall red square.")]
    for name, recs in (("edit.json", edits), ("t2i.json", t2i)):
        with open(os.path.join(root, name), "w") as f:
            json.dump(recs, f)
    with open(os.path.join(root, "data.txt"), "w") as f:
        f.write("images,edit.json,true\nimages,t2i.json,false\n")
    return os.path.join(root, "data.txt")


def exif_rotated() -> Image.Image:
    """Stored 80 wide x 60 high, red on the left; EXIF orientation 6: shown 60 wide x 80 high, red on top."""
    im = Image.new("RGB", (80, 60), BLUE)
    ImageDraw.Draw(im).rectangle((0, 0, 39, 59), fill=RED)
    im.getexif()[0x0112] = 6
    return im


@pytest.fixture(scope="session")
def data_txt(tmp_path_factory):
    """make_dataset's data.txt, made once for the session."""
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def new_dataset():
    """make_dataset itself, for tests that need a data set of their own: new_dataset(folder) -> data.txt."""
    return make_dataset


# ----------------------------------------------------------------------------------------------------------------
# FLUX's text encoders at tiny size (inference extras: only sample.py's tests need them)


def tiny_clip(seed: int = 0, hidden: int = 32, layers: int = 2, words: list[str] | None = None) -> ClipPooled:
    """A random CLIP text encoder with a byte-level tokenizer (77 tokens; pooled width = hidden)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _byte_vocab():  # CLIP's BPE marks the end of a word with </w>
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    _add_words(tok, words)
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return ClipPooled(model, tok)


def tiny_t5(seed: int = 0, d_model: int = 32, layers: int = 2, max_length: int = 16,
            words: list[str] | None = None) -> T5Encoder:
    """A random T5 v1.1 encoder with a character-level unigram tokenizer: (B, max_length, d_model)."""
    chars = [chr(c) for c in range(33, 127)]  # printable ASCII; "▁" marks a word start, as in sentencepiece
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    tok = T5Tokenizer(vocab=pieces + [(c, -3.0) for c in chars] + [("▁" + c, -3.5) for c in chars], extra_ids=0)
    _add_words(tok, words)
    config = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=layers,
                      num_heads=4, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    return T5Encoder(model, tok, max_length)


def save_text_encoders(folder, clip: ClipPooled, t5: T5Encoder) -> None:
    """text_encoder/ + tokenizer/ (CLIP) and text_encoder_2/ + tokenizer_2/ (T5) under folder, as in FLUX.1-dev."""
    for part, name in ((clip, ""), (t5, "_2")):
        part.model.save_pretrained(os.path.join(folder, f"text_encoder{name}"))
        part.tokenizer.save_pretrained(os.path.join(folder, f"tokenizer{name}"))


@pytest.fixture(scope="session")
def text_encoders():
    """(tiny_clip, tiny_t5, save_text_encoders): builders of random tiny CLIP and T5 encoders, and their saver."""
    return tiny_clip, tiny_t5, save_text_encoders


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory):
    """toy_data.make_dataset's folder (36 training and 12 held-out pairs, seed 3), made once for the session."""
    root = str(tmp_path_factory.mktemp("toy"))
    toy_data.make_dataset(root, n_train=36, n_test=12, seed=3)
    return root
