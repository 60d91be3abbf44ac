"""The paper's benchmark prompt files -> `sample.py --batch` rows, with each benchmark's official settings
(docs/official.md §9: joint T5, 28 steps, guidance 3.5, the 1024² anchor; the scorers themselves are other projects).

    python bench/benchmarks.py geneval prompts/evaluation_metadata.jsonl --out geneval_out
    python bench/benchmarks.py imgedit basic_edit.json --images Benchmark/singleturn --out imgedit_out
    python bench/benchmarks.py gedit gedit_edit.json --images gedit_images --out gedit_out
    then: [torchrun --nproc_per_node 8] sample.py --weights W --batch <out>.jsonl --out <out>

geneval  4 images per prompt (seeds 42..45), saved at 512x512 in GenEval's layout: <out>/<NNNNN>/metadata.jsonl (the
         prompt's metadata line) and <out>/<NNNNN>/samples/<XXXX>.png, what evaluate_images.py reads.
imgedit  one edit per item of basic_edit.json ({key: {"id": image path, "prompt": ...}}), the output at the input's
         aspect ratio (any_11ratio at 1024²), saved as <out>/<key>.png for the GPT-4.1 judge (step2_basic_bench.py).
gedit    the same for GEdit-Bench's prepared items; the image and instruction fields and the output name are flags,
         as the prepared file's schema is GEdit's own (default: "image"/"input_image"/"id", "instruction"/"prompt").
The rows file is written beside the output folder (<out>.jsonl), its image paths relative to it.
"""

import argparse
import json
import os

OFFICIAL = {"steps": 28, "guidance": 3.5, "area": 1024 * 1024}


def geneval(path: str, out: str) -> list[dict]:
    """GenEval: 4 samples per prompt at the 1024² anchor, saved at 512 (geneval.yaml)."""
    rows = []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    for n, line in enumerate(lines):
        meta = json.loads(line)
        folder = os.path.join(out, f"{n:05d}")
        os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            f.write(json.dumps(meta) + "\n")
        rows.append({"prompt": meta["prompt"], "seeds": [42, 43, 44, 45], "resize": 512, **OFFICIAL,
                     "name": f"{n:05d}/samples/{{i:04d}}"})
    return rows


def edits(path: str, images: str, out: str, image_keys: list[str], prompt_keys: list[str], name: str) -> list[dict]:
    """An edit benchmark's items ({key: item} or [item]) -> one row each: its input image and instruction."""
    with open(path) as f:
        items = json.load(f)
    items = items.items() if isinstance(items, dict) else enumerate(items)

    def pick(item: dict, keys: list[str], what: str) -> str:
        for k in keys:
            if isinstance(item.get(k), str):
                return item[k]
        raise SystemExit(f"{path}: an item has none of the {what} fields {keys}: {json.dumps(item)[:200]}")

    rows, here = [], os.path.dirname(os.path.abspath(out)) or "."
    for key, item in items:
        image = os.path.abspath(os.path.join(images, pick(item, image_keys, "image")))
        rows.append({"prompt": pick(item, prompt_keys, "instruction"), "images": [os.path.relpath(image, here)],
                     "seed": 42, **OFFICIAL, "name": name.format(key=key, **item)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("benchmark", choices=["geneval", "imgedit", "gedit"])
    ap.add_argument("prompts", help="the benchmark's prompt file")
    ap.add_argument("--out", required=True, help="the output folder of sample.py --batch")
    ap.add_argument("--images", default=".", help="edit benchmarks: the folder of their input images")
    ap.add_argument("--image-keys", nargs="+", default=["image", "input_image", "id"])
    ap.add_argument("--prompt-keys", nargs="+", default=["instruction", "prompt"])
    ap.add_argument("--name", default="{key}", help="edit benchmarks: output name, from the key and item fields")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    if args.benchmark == "geneval":
        rows = geneval(args.prompts, out)
    else:
        keys = ["id", *args.image_keys] if args.benchmark == "imgedit" else args.image_keys
        rows = edits(args.prompts, args.images, out, keys, ["prompt", *args.prompt_keys], args.name)
    with open(out + ".jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{len(rows)} rows in {out}.jsonl; run: python sample.py --weights WEIGHTS --batch {out}.jsonl --out {out}")


if __name__ == "__main__":
    main()
