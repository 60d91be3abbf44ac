"""Training data in the official UniWorld-V1 format (docs/official.md §7): read, checked, bucketed, sharded, resumable.

    data.txt  one dataset per line: image_root,json_path,need_weight  (relative paths start at data.txt's folder)
    JSON      a list of records {"image": ["ref.png", "target.png"],            the last image is the target
                                 "conversations": [{"from": "human", "value": "Make the car red.\\n<image>"},
                                                   {"from": "gpt", "value": "<gen_image>"}]}
              valid when the <image> and <gen_image> markers together number the images (official check_data.py)

    record -> PIL (EXIF-transposed, RGB) -> target at its training size, sides multiples of 16 -> pixels in [-1, 1]
                                         -> references as they are (resized to the target's size when theirs differs)
                                         -> edit weights (paper §3.5) on the images at Qwen's size, as official

Sizes: the official default squashes every target to 512² ('any_1ratio'); `buckets=True` picks the closest of 11
ratios at a resolution² area anchor ('any_11ratio', as the released run did; docs/official.md §4.7). A batch holds one
size and one number of references, so a text-to-image sample is never padded to an edit's SigLIP tokens.
Bad data (an unreadable JSON file, a malformed record, a missing, truncated, corrupt, tiny or too elongated image, an
edit masks.py rejects) is skipped with one warning naming it, replaced by the next sample of its bucket and counted:
train.py stops only when the bad part passes --max_bad. build_cache stores the frozen encoders' outputs per sample.
"""

import contextlib
import json
import logging
import math
import os
import uuid
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from encoders import IMAGE, VLM_PIXELS, qwen_input_size
from masks import EditTooSmall, loss_weights

log = logging.getLogger(__name__)

GEN_IMAGE = "<gen_image>"  # the target's marker, in the gpt turn
MIN_SIDE = 16  # smaller images are "wrongly sized": nothing to learn from them at 512²
MAX_TRIES = 16  # bad samples in a row before a bucket is declared broken
MIN_SEEN = 50  # check_bad waits for this many samples, so that one early bad file does not stop a run
RATIOS = [(16, 9), (9, 16), (7, 5), (5, 7), (5, 4), (4, 5), (4, 3), (3, 4), (3, 2), (2, 3), (1, 1)]  # (w, h)


class BadSample(Exception):
    """This sample cannot be used (bad file, bad record, rejected edit); the dataset draws the next one."""


class TooMuchBadData(RuntimeError):
    """More of the data is bad than the limit allows: better to stop than to train on a fraction of it."""


def dynamic_resize(height: float, width: float, area: int = 1024 * 1024) -> tuple[int, int]:
    """Official anyres 'any_11ratio' (univa/utils/anyres_util.py): the closest of 11 ratios w:h, in blocks of 32 px,
    scaled by round(sqrt(area / block area)). At 1024²: 4:3 -> 864x1152, 3:2 -> 832x1248, 16:9 -> 864x1536."""
    rw, rh = min(RATIOS, key=lambda r: abs(r[0] / r[1] - width / height))
    scale = max(1, round(math.sqrt(area / (32 * rh * 32 * rw))))  # max: the official gives 0 below half a block
    return 32 * rh * scale, 32 * rw * scale


@dataclass
class Record:
    root: str
    images: list[str]  # relative to root; the last one is the target
    instruction: str  # the human turn, one <image> per reference image
    need_weight: bool  # edit-region loss weighting for this dataset (3rd column of data.txt)


def parse_record(raw, root: str, need_weight: bool) -> Record:
    """One JSON record -> Record; raises BadSample saying what is wrong with it."""
    if not isinstance(raw, dict) or "image" not in raw or "conversations" not in raw:
        raise BadSample("a record needs the keys 'image' and 'conversations'")
    images, turns = [raw["image"]] if isinstance(raw["image"], str) else raw["image"], raw["conversations"]
    if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
        raise BadSample(f"'image' must be a path or a non-empty list of paths, got {raw['image']!r}")
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        raise BadSample("'conversations' must be a list of {'from': ..., 'value': str} turns")
    markers = sum(t["value"].count(IMAGE) + t["value"].count(GEN_IMAGE) for t in turns)
    if markers != len(images):
        raise BadSample(f"{markers} <image>/<gen_image> markers for {len(images)} images")
    if [t.get("from") for t in turns] != ["human", "gpt"] or GEN_IMAGE not in turns[1]["value"]:
        raise BadSample("expected one human turn and one gpt turn '<gen_image>' (the denoiser trains generation only)")
    return Record(root, images, turns[0]["value"], need_weight)


def read_data_txt(path: str) -> tuple[list[Record], int]:
    """data.txt -> (valid records, number of bad ones: a JSON file that cannot be read counts as one)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data.txt at {path!r}; pass --data with lines image_root,json_path,need_weight")
    here, records, bad = os.path.dirname(os.path.abspath(path)), [], 0
    with open(path) as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3 or fields[2].lower() not in ("true", "false"):
            raise ValueError(f"{path}:{n}: expected 'image_root,json_path,need_weight' (need_weight true or false), "
                             f"got {line.strip()!r}")
        root, json_path = (os.path.join(here, f) for f in fields[:2])  # join keeps absolute paths as they are
        if not os.path.isfile(json_path):  # a typo in data.txt, not bad data
            raise FileNotFoundError(f"{path}:{n}: annotation file {json_path!r} does not exist")
        try:
            with open(json_path, encoding="utf-8") as f:
                raws = json.load(f)
            if not isinstance(raws, list):
                raise ValueError(f"expected a JSON list of records, got {type(raws).__name__}")
        except (OSError, ValueError) as e:  # unreadable, torn, not UTF-8, not JSON: skipped like a bad record
            log.warning("skipping %s (%s:%d): %s", json_path, path, n, e)
            bad += 1
            continue
        for i, raw in enumerate(raws):
            try:
                records.append(parse_record(raw, root, fields[2].lower() == "true"))
            except BadSample as e:
                log.warning("skipping record %d of %s: %s", i, json_path, e)
                bad += 1
    return records, bad


def open_image(path: str) -> Image.Image:
    """RGB PIL image with its EXIF orientation applied; any problem that would stop the encoders is a BadSample."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncated and corrupt files fail here, not later in a worker
            im = ImageOps.exif_transpose(im).convert("RGB")
        qwen_input_size(*im.size, training=True)  # Qwen's limits (aspect ratio) checked before anything runs
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib/struct errors... for bad files
        raise BadSample(f"{path}: {type(e).__name__}: {e}") from e
    if min(im.size) < MIN_SIDE:
        raise BadSample(f"{path}: {im.size[0]}x{im.size[1]} is smaller than {MIN_SIDE} px")
    return im


def oriented_size(path: str) -> tuple[int, int]:
    """(height, width) after the EXIF rotation, from the header alone (for buckets)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            return (w, h) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (h, w)  # rotated by 90 or 270 degrees
    except Exception as e:
        raise BadSample(f"{path}: {type(e).__name__}: {e}") from e


def to_pixels(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1], as the VAE expects."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


class EditData(torch.utils.data.Dataset):
    """The samples of data.txt; dataset[i] is sample i, or the next good one of its bucket if i is bad."""

    def __init__(self, data_txt: str, resolution: int = 512, buckets: bool = False, weighting: str = "log",
                 factor: int = 8, vlm_pixels: int = VLM_PIXELS):
        if resolution % (2 * factor):
            raise ValueError(f"resolution {resolution} must be a multiple of {2 * factor} (the autoencoder's "
                             f"{factor}x, then 2x2 packing)")
        self.records, self.bad_records = read_data_txt(data_txt)
        self.weighting, self.factor, self.vlm_pixels, self.cache = weighting, factor, vlm_pixels, None
        self.sizes = {}  # index -> (H, W) of the target in training; official default: every one at resolution²
        for i, r in enumerate(self.records):
            try:
                target = os.path.join(r.root, r.images[-1])
                self.sizes[i] = dynamic_resize(*oriented_size(target), resolution**2) if buckets else (resolution,) * 2
            except BadSample as e:
                log.warning("skipping record %d: %s", i, e)
                self.bad_records += 1
        self.buckets = {}  # (H, W, number of references) -> indices, in order
        for i, size in self.sizes.items():
            self.buckets.setdefault((*size, len(self.records[i].images) - 1), []).append(i)
        if not self.buckets:
            raise ValueError(f"{data_txt}: no usable records ({self.bad_records} bad); see the warnings above")
        self.bucket_of = {i: (key, k) for key, members in self.buckets.items() for k, i in enumerate(members)}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        """Sample i, or the next good sample of its bucket; `skipped` counts the bad ones passed over."""
        key, k = self.bucket_of[i]
        members = self.buckets[key]
        for tries in range(min(MAX_TRIES, len(members))):
            idx = members[(k + tries) % len(members)]
            try:
                return {**self.load(idx), "skipped": tries}
            except BadSample as e:
                log.warning("skipping sample %d: %s", idx, e)
        raise TooMuchBadData(f"{min(MAX_TRIES, len(members))} bad samples in a row in the {key[:2]} bucket from "
                             f"sample {i}: check the images of {self.records[i].root}")

    def first_samples(self, n: int) -> list[dict]:
        """The first n good samples, from their image files (train.py's fixed validation prompts)."""
        samples = []
        for idx in sorted(self.sizes):
            if len(samples) == n:  # checked first: n = 0 (--val_samples 0) loads nothing
                break
            with contextlib.suppress(BadSample):
                samples.append(self.load_images(idx))
        return samples

    def load(self, idx: int) -> dict:
        """Sample idx from the cache if there is one, else from the image files."""
        if self.cache is None:
            return self.load_images(idx)
        path = cache_path(self.cache, idx)
        if not os.path.isfile(path):  # it was bad when the cache was built
            raise BadSample(f"not in the cache {self.cache} (bad when the cache was built)")
        return read_cached(path)

    def load_images(self, idx: int) -> dict:
        """{'index', 'instruction', 'references' [PIL], 'pixels' (3, H, W), 'weights' (1, H/factor, W/factor)}."""
        r, (H, W) = self.records[idx], self.sizes[idx]
        *refs, target = [open_image(os.path.join(r.root, p)) for p in r.images]
        if any(ref.size != target.size for ref in refs):  # official: then every reference takes the target's size
            refs = [ref.resize(target.size, Image.BICUBIC) for ref in refs]
        weights = self.edit_weights(refs, target, (H // self.factor, W // self.factor), r.need_weight)
        return {"index": idx, "instruction": r.instruction, "references": refs,
                "pixels": to_pixels(target.resize((W, H), Image.BICUBIC)), "weights": weights}

    def edit_weights(self, refs: list[Image.Image], target: Image.Image, latent: tuple[int, int],
                     need_weight: bool) -> torch.Tensor:
        """Paper §3.5 weights (1, *latent) as the official loader computes them: on the images at the target's Qwen
        training size (bicubic), then nearest-resized to the training latent grid (docs/official.md §6)."""
        if not refs or not need_weight:
            return torch.ones(1, *latent)
        h, w = qwen_input_size(*target.size, training=True, pixels=self.vlm_pixels)
        try:
            weights = loss_weights([r.resize((w, h), Image.BICUBIC) for r in refs],
                                   target.resize((w, h), Image.BICUBIC), self.weighting, True, self.factor)
        except EditTooSmall as e:  # official: the loader raises and draws another sample
            raise BadSample(str(e)) from e
        return F.interpolate(weights[None], size=latent, mode="nearest")[0]  # from (1, h / factor, w / factor)


def collate(samples: list[dict]) -> dict:
    """Same-size samples -> one batch: tensors stacked, everything else in lists, skips summed."""
    batch = {key: [s[key] for s in samples] for key in samples[0]}
    batch = {key: torch.stack(v) if isinstance(v[0], torch.Tensor) else v for key, v in batch.items()}
    return {**batch, "skipped": sum(batch["skipped"])}


def check_bad(bad: int, seen: int, limit: float, what: str = "samples", min_seen: int = MIN_SEEN) -> None:
    """Raise TooMuchBadData when more than `limit` of the `seen` items were bad, once at least `min_seen` were seen."""
    if seen >= max(min_seen, 1) and bad > limit * seen:
        raise TooMuchBadData(f"{bad} of {seen} {what} ({bad / seen:.1%}) were bad, over the limit of {limit:.1%}; "
                             "fix the data (the warnings name each bad file) or raise --max_bad")


# ----------------------------------------------------------------------------------------------------------------
# Batches: one bucket each, shuffled per epoch, split over ranks, resumable


class Batches:
    """Endless one-bucket batches for one rank; `epoch` and `batch` (the next one to yield) are its position."""

    def __init__(self, dataset: EditData, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 workers: int = 0):
        self.dataset, self.batch_size, self.rank, self.world = dataset, batch_size, rank, world
        self.seed, self.workers = seed, workers
        self.epoch = self.batch = 0
        if len(self.epoch_batches(0)) == 0:
            raise ValueError(f"no batch of {batch_size} same-size samples per rank for {world} ranks: "
                             f"bucket sizes {[len(m) for m in dataset.buckets.values()]}; lower --batch_size")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`: the same on every run for the same seed, epoch and world size."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        batches = []
        for _, members in sorted(self.dataset.buckets.items()):  # each bucket shuffled, cut into full batches
            perm = [members[p] for p in torch.randperm(len(members), generator=g).tolist()]
            batches += [perm[i : i + self.batch_size] for i in range(0, len(perm) - self.batch_size + 1,
                                                                     self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()  # then the buckets mixed
        usable = len(order) // self.world * self.world  # every rank gets the same number of batches
        return [batches[j] for j in order[:usable]][self.rank :: self.world]

    def __iter__(self):
        while True:
            todo = self.epoch_batches(self.epoch)[self.batch :]
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=todo, num_workers=self.workers,
                                                 collate_fn=collate)
            for batch in loader:
                self.batch += 1
                yield batch
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]


# ----------------------------------------------------------------------------------------------------------------
# The encoder cache: the encoders never train, so their outputs per sample can be computed once


def cache_path(folder: str, idx: int) -> str:
    return os.path.join(folder, f"{idx // 10_000:04d}", f"{idx:08d}.safetensors")  # 10k files per folder


def write_cached(path: str, sample: dict) -> None:
    """One encoded sample as a safetensors file: its tensors flat ("features.vlm", ...), the rest in metadata."""
    features = sample["features"]
    tensors = {f"features.{k}": v.contiguous() for k, v in features.items() if v is not None}
    tensors.update(latents=sample["latents"].contiguous(), weights=sample["weights"].contiguous())
    meta = {"index": str(sample["index"]), "instruction": sample["instruction"], "features": json.dumps(list(features))}
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"  # the writer's own name: runs sharing a cache may build it at once
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)  # a killed build never leaves a half-written sample


def read_cached(path: str) -> dict:
    """write_cached's file -> {'index', 'instruction', 'weights', 'latents', 'features'} (absent features: None)."""
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    features = {k: tensors.get(f"features.{k}") for k in json.loads(meta["features"])}
    return {"index": int(meta["index"]), "instruction": meta["instruction"], "weights": tensors["weights"],
            "latents": tensors["latents"], "features": features}


def build_cache(dataset: EditData, encoders, device, folder: str, fingerprint: dict, batch_size: int = 1) -> None:
    """Write the encoded form (model.Encoders.encode) of every good sample, a bucket's `batch_size` at a time, split
    over the ranks and resumable; `meta.json` then marks the cache complete and the dataset reads from it. A cache built
    for another fingerprint (data, sizes, encoders) is an error rather than silently wrong features."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    meta = os.path.join(folder, "meta.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            found = json.load(f)
        if found != fingerprint:
            raise ValueError(f"the cache {folder} was built for {found}, not {fingerprint}; delete it or pass "
                             "another --cache folder")
        dataset.cache = folder
        return
    todo = [[i for i in members[rank::world] if not os.path.isfile(cache_path(folder, i))]
            for members in dataset.buckets.values()]  # this rank's samples not cached yet, by bucket
    chunks = [idxs[i : i + batch_size] for idxs in todo for i in range(0, len(idxs), batch_size)]
    bad = 0
    for chunk in tqdm(chunks, desc=f"cache {folder}", unit="batch", disable=rank != 0, dynamic_ncols=True):
        samples = []
        for idx in chunk:
            try:
                samples.append({**dataset.load_images(idx), "skipped": 0})
            except BadSample as e:
                log.warning("not caching sample %d: %s", idx, e)
                bad += 1
        if samples:
            batch = encoders.encode(collate(samples), "cpu")
            for sample, features, latents in zip(samples, batch["features"], batch["latents"], strict=True):
                write_cached(cache_path(folder, sample["index"]), {**sample, "features": features, "latents": latents})
    log.info("cache %s: rank %d wrote its share (%d bad samples left out)", folder, rank, bad)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        tmp = f"{meta}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w") as f:
            json.dump(fingerprint, f, indent=1)
        os.replace(tmp, meta)
    if dist.is_initialized():
        dist.barrier()
    dataset.cache = folder
