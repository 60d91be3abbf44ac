"""sample.py: the schedule against diffusers, the any_11ratio sizes, the Euler sampler, and the command line end to end
on tiny random models saved in the official layouts (edit, t2i, two references, ask, offload) with one-line errors."""

import json
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image

import flux
import sample
from encoders import tiny_siglip, tiny_vlm
from model import Encoders, UniWorld, save_release

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # no network; 1 thread: 2 shared cores


# ----------------------------------------------------------------------------------------------------------------
# schedule and sizes


@pytest.mark.parametrize("height, width", [(256, 256), (512, 512), (1024, 1024), (768, 1360), (1024, 2048)])
@pytest.mark.parametrize("steps", [4, 28, 50])
def test_schedule_matches_diffusers_flux_dev(height, width, steps):
    seq_len = (height // 16) * (width // 16)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                          base_image_seq_len=256, max_image_seq_len=4096)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
    ours = torch.tensor(sample.get_schedule(steps, seq_len), dtype=torch.float64)
    assert ours.shape == ref.sigmas.shape and torch.allclose(ours, ref.sigmas.double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_schedule_matches_diffusers_flux_schnell(steps):
    ref = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    ours = torch.tensor(sample.get_schedule(steps, 4096, shift=False), dtype=torch.float64)
    assert torch.allclose(ours, ref.sigmas.double(), atol=1e-6, rtol=0)


def test_output_size_rules():
    size = lambda refs, height=None, width=None, area=None: sample.output_size(height, width, area, refs, 1024**2)
    wide, square = Image.new("RGB", (64, 48)), Image.new("RGB", (64, 64))
    assert size([]) == (1024, 1024)  # t2i default
    assert size([wide], area=512 * 512) == (480, 640)
    assert size([wide, square], area=20480) == (128, 160)  # mean 56x64 -> 5:4
    assert size([wide], height=32, width=48) == (32, 48)
    for bad in ({"height": 32}, {"height": 32, "width": 48, "area": 4096}, {"height": 40, "width": 32},
                {"area": 0}, {"height": 1048576, "width": 1048576}, {"area": 10**12}):
        with pytest.raises(ValueError):
            size([], **bad)


# ----------------------------------------------------------------------------------------------------------------
# the Euler sampler


class Straight(torch.nn.Module):
    """The ideal velocity of a straight path from `target` to the noise: v = (x - target) / sigma; records sigmas."""

    def __init__(self, target, dtype=torch.float32):
        super().__init__()
        self.target, self.seen, self.p = target, [], torch.nn.Parameter(torch.zeros(1, dtype=dtype))

    def velocity(self, x, sigma, txt, y, guidance, txt_mask=None):
        self.seen.append(sigma[0].item())
        return ((x.float() - self.target) / sigma.view(-1, 1, 1, 1) * (1 + txt)).to(x.dtype)


def test_euler_reaches_the_data_on_straight_paths():
    target, noise = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    sigmas = sample.get_schedule(7, 1024)
    fake = Straight(target)
    x = sample.denoise(fake, noise, sigmas, (torch.tensor(0.0), None, None), 3.5, progress=False)
    assert torch.allclose(x, target, atol=1e-5)  # exact for any schedule: every step stays on the line
    assert fake.seen == pytest.approx(sigmas[:-1])
    x = sample.denoise(Straight(target, torch.bfloat16), noise, sigmas, (torch.tensor(0.0), None, None), 3.5,
                       progress=False)
    assert x.dtype == torch.float32  # the state stays fp32 when the model runs in bf16


def test_true_cfg_combines_velocities():
    # txt scales the fake velocity by (1 + txt): v = 1x, v_neg = 0.5x, so cfg 3 gives 0.5 + 3 * 0.5 = 2x
    target, noise = torch.zeros(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    sigmas = [1.0, 0.5]
    cond, negative = (torch.tensor(0.0), None, None), (torch.tensor(-0.5), None, None)
    x = sample.denoise(Straight(target), noise, sigmas, cond, 1.0, negative, 3.0, progress=False)
    assert torch.allclose(x, noise - 0.5 * 2 * noise)
    same = sample.denoise(Straight(target), noise, sigmas, cond, 1.0, cond, 3.0, progress=False)
    assert torch.allclose(same, noise - 0.5 * noise)  # a negative equal to the prompt changes nothing


# ----------------------------------------------------------------------------------------------------------------
# tiny models in the official layouts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, text_encoders):
    tiny_clip, tiny_t5, save_text_encoders = text_encoders
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = UniWorld(flux.Flux(flux.FLUX_CONFIGS["tiny"]), vlm_dim=64, siglip_dim=32).eval()
    enc = Encoders(vlm=tiny_vlm(seed=0, words=["assistant"]), siglip=tiny_siglip(seed=0),
                   ae=flux.AutoEncoder(flux.AE_CONFIGS["tiny"]),
                   clip=tiny_clip(seed=0, hidden=16), t5=tiny_t5(seed=0, d_model=32))
    save_release(model, str(root / "uniworld"), enc.vlm)
    flux.save_autoencoder(enc.ae, str(root / "flux" / "vae"), "diffusers")
    save_text_encoders(root / "flux", enc.clip, enc.t5)
    enc.siglip.save_pretrained(str(root / "siglip"))
    rng = np.random.default_rng(0)
    for name, (h, w) in {"wide.png": (40, 60), "banner.png": (36, 64), "square.png": (64, 64)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    (root / "notes.png").write_text("not an image")
    (root / "cut.png").write_bytes((root / "wide.png").read_bytes()[:200])
    (root / "folder.png").mkdir()
    Image.new("RGB", (4000, 16)).save(root / "banner250.png")  # an aspect ratio Qwen2.5-VL refuses
    weights = ["--weights", str(root / "uniworld"), "--flux", str(root / "flux"), "--siglip", str(root / "siglip"),
               "--vlm-pixels", str(56 * 56), "--steps", "2", "--device", "cpu"]
    return SimpleNamespace(root=root, model=model, enc=enc, weights=weights)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture
def one_thread():
    """Tiny models on 2 shared cores: one thread is many times faster than two fighting over them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_generate_seeds_and_prompts(tiny, one_thread):
    ref = Image.open(tiny.root / "square.png")
    gen = lambda prompts, seeds: [np.asarray(im, dtype=np.int16) for im in sample.generate(
        tiny.model, tiny.enc, prompts, [[ref]] * len(prompts), 32, 32, seeds, steps=2, progress=False)]
    a, b = gen(["Make it red."] * 2, [1, 2])
    assert a.shape == (32, 32, 3)
    assert np.array_equal(gen(["Make it red."] * 2, [1, 2])[0], a)  # same seed, same image
    assert np.abs(a - b).mean() > 1  # another seed
    assert not np.array_equal(gen(["Make it blue."], [1])[0], a)  # another prompt (weakly, with random weights)
    assert np.abs(gen(["Make it red."], [2])[0] - b).max() <= 1  # a seed's image does not depend on its batch


def test_cli_edit_and_offload_give_the_same_image(tiny, one_thread):
    out = [tiny.root / "edit.png", tiny.root / "edit_offload.png"]
    for path, extra in zip(out, ([], ["--offload"]), strict=True):
        r = run("--edit", "--image", str(tiny.root / "wide.png"), "--prompt", "Make the sky red.", "--area", "6144",
                "--seed", "3", "--out", str(path), *tiny.weights, *extra)
        assert r.returncode == 0, r.stderr
        assert "peak memory" in r.stdout and "joint T5 True" in r.stdout
    assert Image.open(out[0]).size == (96, 64)  # 40x60 is 3:2 -> 64x96 (h x w) at this area
    assert np.array_equal(pixels(out[0]), pixels(out[1]))
    # the same as the in-memory models: weights on disk, joint T5 (256 tokens) and CLIP(prompt) wired as intended
    tiny.enc.t5.max_length = 256
    try:
        ref = Image.open(tiny.root / "wide.png")
        [expected] = sample.generate(tiny.model, tiny.enc, ["Make the sky red."], [[ref]], 64, 96, [3], steps=2,
                                     progress=False)
    finally:
        tiny.enc.t5.max_length = 16
    assert np.abs(pixels(out[0]) - np.asarray(expected, dtype=np.int16)).max() <= 1


def test_cli_two_references_with_true_cfg(tiny):
    out = tiny.root / "pair.png"
    r = run("--edit", "--image", str(tiny.root / "wide.png"), "--image", str(tiny.root / "banner.png"), "--prompt",
            "Put the first on the second.", "--area", "6144", "--cfg", "3", "--negative", "blurry", "--out", str(out),
            *tiny.weights)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (96, 64)  # 3:2 and 16:9 average to 38x62 -> 3:2 (16:9 alone: 288x512)


def test_cli_t2i_several_images(tiny):
    r = run("--t2i", "--prompt", "A red circle.", "--height", "32", "--width", "48", "--num-images", "2",
            "--no-joint-t5", "--out", str(tiny.root / "t2i.png"), *tiny.weights)
    assert r.returncode == 0, r.stderr
    assert "joint T5 False" in r.stdout
    a, b = (tiny.root / f"t2i_{i}.png" for i in range(2))
    assert Image.open(a).size == Image.open(b).size == (48, 32)
    assert np.abs(pixels(a) - pixels(b)).mean() > 1  # seeds 42 and 43


def test_cli_ask_is_the_vlms_greedy_answer(tiny):
    """--ask prints Qwen2.5-VL's own answer to the inference prompt (text, then the image), max_new_tokens long."""
    r = run("--ask", "What color is it?", "--image", str(tiny.root / "wide.png"), "--max-new-tokens", "3",
            *tiny.weights)
    assert r.returncode == 0, r.stderr
    vlm = tiny.enc.vlm
    batch = vlm.tokenize(["What color is it?"], [[Image.open(tiny.root / "wide.png").convert("RGB")]], train=False)
    assert vlm.tokenizer.decode(batch["input_ids"][0]).endswith("<|im_start|>assistant\n")
    out = vlm.model.generate(**batch, max_new_tokens=3, do_sample=False)[0, batch["input_ids"].shape[1] :]
    assert len(out) <= 3
    assert r.stdout.splitlines()[-2] == vlm.tokenizer.decode(out, skip_special_tokens=True)


def task_head(image: bool) -> torch.nn.Sequential:
    """A tiny task head whose logits always prefer one way: (0, 1) generate an image, (1, 0) answer in text."""
    head = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.SiLU(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
    with torch.no_grad():
        head[3].weight.zero_()
        head[3].bias.copy_(torch.tensor([0.0, 1.0] if image else [1.0, 0.0]))
    return head


@pytest.mark.parametrize("image", [True, False])
def test_a_prompt_without_a_mode_is_routed_by_the_task_head(tiny, tmp_path, image):
    """As the official app: the head reads Qwen's last hidden state at the last "assistant" token and picks a mode."""
    weights = tmp_path / "uniworld"
    shutil.copytree(tiny.root / "uniworld", weights)
    torch.save(task_head(image).state_dict(), weights / "task_head_final.pt")
    args = [a if a != str(tiny.root / "uniworld") else str(weights) for a in tiny.weights]
    out = tmp_path / "routed.png"
    r = run("--prompt", "Make it red.", "--image", str(tiny.root / "square.png"), "--max-new-tokens", "2",
            "--height", "32", "--width", "32", "--out", str(out), *args)
    assert r.returncode == 0, r.stderr
    assert f"task head: {'generate an image' if image else 'answer in text'}" in r.stdout
    assert out.exists() == image
    from model import load_task_head, wants_image

    head = load_task_head(str(weights / "task_head_final.pt"))
    assert wants_image(head, tiny.enc.vlm, "Make it red.", [Image.open(tiny.root / "square.png")]) == image


def test_the_toy_says_what_it_cannot_do(capsys):
    """The bundled toy's VLM is random: --ask says so in one line (its sample.json's note) instead of printing noise."""
    with pytest.raises(SystemExit) as exit:
        sample.main(["--ask", "What is this?"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "random and cannot answer" in err and "--weights LanguageBind/UniWorld-V1" in err


# ----------------------------------------------------------------------------------------------------------------
# errors: one line on stderr, exit code 2, no traceback


ERRORS = {
    "missing image": (["--edit", "--image", "{root}/nope.png", "--prompt", "x"], "No such file"),
    "unreadable image": (["--edit", "--image", "{root}/folder.png", "--prompt", "x"], "Is a directory"),
    "not an image": (["--edit", "--image", "{root}/notes.png", "--prompt", "x"], "cannot identify image file"),
    "bad size": (["--t2i", "--prompt", "x", "--height", "40", "--width", "36"], "multiples of 16"),
    "missing weights": (["--t2i", "--prompt", "x", "--weights", "{root}/nothing"], "--weights: no folder"),
    "gated or offline hub id": (["--t2i", "--prompt", "x", "--weights", "nobody/nothing"], "hf auth login"),
    "unknown mode": (["--paint", "--t2i", "--prompt", "x"], "unrecognized arguments: --paint"),
    "conflicting mode": (["--t2i", "--image", "{root}/wide.png", "--prompt", "x"], "--t2i takes no --image"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_cli_errors(tiny, case):
    args, message = ERRORS[case]
    weights = [] if "--weights" in args else tiny.weights
    r = run(*(a.format(root=tiny.root) for a in args), *weights)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


@pytest.mark.parametrize("args", [["--edit"], ["--t2i"],
                                  ["--edit", "--prompt", "segment the red circle at the top left"]])
def test_no_weights_run_the_bundled_toy_as_any_weights_folder(tmp_path, capsys, args):
    """`python sample.py --edit` edits assets/toy/examples/edit.png with its instruction, at the toy's settings: all
    from its sample.json, the same code path as --weights assets/toy."""
    outs = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    sample.main(args + ["--out", outs[0]])
    printed = capsys.readouterr().out
    assert Image.open(outs[0]).size == (32, 32) and "32x32 (h x w), 20 steps, guidance 1.0" in printed
    sample.main(args + ["--out", outs[1], "--weights", sample.BUNDLED])
    assert np.array_equal(pixels(outs[0]), pixels(outs[1]))


@pytest.mark.parametrize("args, message", [
    (["--edit", "--t2i", "--prompt", "x"], "not allowed with argument"),
    (["--edit", "--prompt", "x"], "--edit needs at least one --image"),
    (["--edit", "--image", "{root}/cut.png", "--prompt", "x"], "truncated"),
    (["--t2i", "--prompt", "x", "--height", "32"], "--height and --width together"),
    (["--t2i", "--prompt", "x", "--area", "0"], "--area must be a number of pixels"),
    (["--t2i", "--prompt", "x", "--area", "1000000000000"], "from 256 to 16777216"),
    (["--t2i", "--prompt", "x", "--height", "1048576", "--width", "1048576"], "from 16 to 4096"),
    (["--t2i", "--prompt", "x", "--guidance", "nan"], "finite numbers"),
    (["--t2i", "--prompt", "x", "--guidance", "inf"], "finite numbers"),
    (["--t2i", "--prompt", "x", "--cfg", "nan"], "finite numbers"),
    (["--t2i", "--prompt", "x", "--steps", "100000000000000000000"], "steps must be 1 to 1000"),
    (["--t2i", "--prompt", "x", "--steps", "1e20"], "invalid int value"),
    (["--t2i", "--prompt", "x", "--seed", "100000000000000000000000"], "seeds are integers"),
    (["--t2i", "--prompt", "x", "--out", "{root}"], "give an image file name"),
    (["--edit", "--image", "{root}/banner250.png", "--prompt", "x"], "aspect ratios up to 200"),
    (["--t2i"], "need --prompt"),
    (["--ask", "why?", "--prompt", "x"], "drop --prompt"),
    (["--edit", "--image", "{root}/wide.png", "--prompt", "Make it red <image>"], "remove <image>"),
    (["--t2i", "--prompt", "x", "--device", "gpu"], "--device 'gpu'"),
    (["--t2i", "--prompt", "x", "--out", "{root}/no/such/dir/x.png"], "does not exist or is not writable"),
    (["--t2i", "--prompt", "x", "--out", "{root}/x.txt2"], "give an image file name"),
    (["--t2i", "--prompt", "x", "--flux", "{root}/flux"], "need --weights"),
])
def test_more_argument_errors_in_process(tiny, capsys, args, message):
    # the same main() as above, without a subprocess's seconds of imports
    weights = [] if "--flux" in args else tiny.weights  # with no weights the toy's example would fill the gaps
    with pytest.raises(SystemExit) as exit:
        sample.main(weights + [a.format(root=tiny.root) for a in args])  # the args' flags win
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


# ----------------------------------------------------------------------------------------------------------------
# --batch: many rows, each as it would be alone, over ranks, resumable


BATCH = os.path.join(sample.BUNDLED, "examples", "batch.jsonl")  # the toy's held-out pairs, 2 per task


@pytest.fixture(scope="module")
def batch_outputs(tmp_path_factory):
    """The bundled toy batch file through --batch, 5 images at a time, in this process."""
    out = tmp_path_factory.mktemp("batch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sample.main(["--batch", BATCH, "--out", str(out), "--batch-size", "5"])
    finally:
        torch.set_num_threads(threads)
    return out


def test_batch_rows_are_the_images_of_each_row_alone(batch_outputs, tmp_path, one_thread):
    rows = [json.loads(line) for line in open(BATCH)]
    results = [json.loads(line) for line in open(batch_outputs / "results.jsonl")]
    assert sorted(r["file"] for r in results) == sorted(f"{row['name']}.png" for row in rows)
    for row in rows:  # the single-prompt command line, one row at a time
        mode = ["--edit", *(a for p in row["images"] for a in ("--image", os.path.join(os.path.dirname(BATCH), p)))] \
            if row["images"] else ["--t2i"]
        alone = tmp_path / "alone.png"
        sample.main([*mode, "--prompt", row["prompt"], "--seed", str(row["seed"]), "--out", str(alone)])
        assert alone.read_bytes() == (batch_outputs / f"{row['name']}.png").read_bytes(), row["name"]


@pytest.mark.slow
def test_batch_under_torchrun_shards_the_rows_and_writes_the_same_files(batch_outputs, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sample.py",
           "--batch", BATCH, "--out", str(out), "--batch-size", "3"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0: 6 images written" in r.stdout and "rank 1: 6 images written" in r.stdout
    files = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert files == sorted(p.relative_to(batch_outputs) for p in batch_outputs.rglob("*.png")) and len(files) == 12
    assert all((out / f).read_bytes() == (batch_outputs / f).read_bytes() for f in files)
    assert len(open(out / "results.jsonl").readlines()) == 12  # both ranks' rows, whole lines


@pytest.mark.slow
def test_a_killed_batch_resumes_with_every_output_once(batch_outputs, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "sample.py", "--batch", BATCH, "--out", str(out), "--batch-size", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(out.rglob("*.png"))) < 4 and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    written = list(out.rglob("*.png"))
    assert 4 <= len(written) < 12  # killed mid-way
    for path in written:  # every file named .png is whole: images go to a temporary name first
        assert path.read_bytes() == (batch_outputs / path.relative_to(out)).read_bytes()
    r = run("--batch", BATCH, "--out", str(out), "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    assert f"{12 - len(written)} images written, {len(written)} there already" in r.stdout
    files = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert len(files) == 12 and all((out / f).read_bytes() == (batch_outputs / f).read_bytes() for f in files)


def test_bad_rows_are_skipped_with_their_line_and_counted(tmp_path, capsys):
    image = os.path.join(os.path.dirname(BATCH), "images", "0002_ref.png")
    rows = ['{"prompt": "copy the image", "images": ["' + image + '"], "name": "good"}',
            '{"prompt": "cut in half", "imag',
            '{"prompt": "x", "images": ["missing.png"]}',
            '{"prompt": "x", "height": 40, "width": 32}',
            '{"prompt": "x <image>", "images": ["' + image + '"]}',
            '{"prompt": "x", "name": "../outside"}',
            '["not", "an", "object"]']
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    sample.main(["--batch", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    for line in range(2, 8):
        assert f"rows.jsonl:{line}: skipped" in out, line
    assert "1 images written, 0 there already, 6 bad rows skipped (of 7 rows" in out
    assert sorted(os.listdir(tmp_path / "out")) == ["good.png", "results.jsonl"]


def test_row_names_format_the_image_index(tmp_path):
    """GenEval's layout ("name": "00001/samples/{i:04d}", bench/benchmarks.py); without a name, the line number."""
    (tmp_path / "rows.jsonl").write_text('{"prompt": "x", "seeds": [1, 2], "name": "00001/samples/{i:04d}"}\n'
                                         '{"prompt": "y", "num_images": 2}\n{"prompt": "z", "name": "one"}\n')
    args = SimpleNamespace(seed=42, steps=2, guidance=1.0, area=None, out=str(tmp_path / "out"))
    jobs, bad = sample.read_rows(str(tmp_path / "rows.jsonl"), args, {"area": 32 * 32})
    assert bad == 0 and [os.path.relpath(j["file"], args.out) for j in jobs] == [
        "00001/samples/0000.png", "00001/samples/0001.png", "000002_0.png", "000002_1.png", "one.png"]
    assert [j["seed"] for j in jobs] == [1, 2, 42, 43, 42]


def test_benchmark_files_become_rows_with_the_official_settings(tmp_path):
    """bench/benchmarks.py: GenEval's metadata -> 4 seeds per prompt at 512 in GenEval's folder layout; ImgEdit's
    {key: {"id", "prompt"}} -> one edit per key, the image path relative to the rows file."""
    (tmp_path / "meta.jsonl").write_text('{"tag": "single_object", "prompt": "a photo of a bench"}\n'
                                         '{"tag": "colors", "prompt": "a photo of a red car"}\n')
    script = os.path.join(ROOT, "bench", "benchmarks.py")
    r = subprocess.run([sys.executable, script, "geneval", str(tmp_path / "meta.jsonl"), "--out",
                        str(tmp_path / "geneval")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in open(tmp_path / "geneval.jsonl")]
    assert [r["prompt"] for r in rows] == ["a photo of a bench", "a photo of a red car"]
    assert rows[1]["seeds"] == [42, 43, 44, 45] and rows[1]["name"] == "00001/samples/{i:04d}"
    assert (rows[1]["steps"], rows[1]["guidance"], rows[1]["area"], rows[1]["resize"]) == (28, 3.5, 1024**2, 512)
    assert json.loads((tmp_path / "geneval" / "00001" / "metadata.jsonl").read_text())["tag"] == "colors"
    (tmp_path / "in").mkdir()
    (tmp_path / "basic_edit.json").write_text(json.dumps({"7": {"id": "animal/cat.jpg", "prompt": "Add a hat.",
                                                                "edit_type": "add"}}))
    r = subprocess.run([sys.executable, script, "imgedit", str(tmp_path / "basic_edit.json"), "--images",
                        str(tmp_path / "in"), "--out", str(tmp_path / "imgedit")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    [row] = [json.loads(line) for line in open(tmp_path / "imgedit.jsonl")]
    assert row["prompt"] == "Add a hat." and row["images"] == ["in/animal/cat.jpg"] and row["name"] == "7"
    assert "height" not in row and row["area"] == 1024**2  # any_11ratio of the input, at the 1024² anchor
