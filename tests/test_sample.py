"""sample.py: the schedule against diffusers, the any_11ratio sizes, the Euler sampler, and the command line end to end
on tiny random models saved in the official layouts (edit, t2i, two references, ask, offload) with one-line errors."""

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image

import flux
import sample
from encoders import tiny_clip, tiny_siglip, tiny_t5, tiny_vlm
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


def test_any_11ratio_sizes():
    # uniworld.md §6.2, at the 1024² anchor, for landscape inputs (h x w)
    for (h, w), expected in {(768, 1024): (864, 1152), (1000, 1000): (1024, 1024), (600, 900): (832, 1248),
                             (720, 1280): (864, 1536), (800, 1000): (896, 1120)}.items():
        assert sample.dynamic_resize(h, w) == expected
        assert sample.dynamic_resize(w, h) == expected[::-1]  # portrait: the transpose
    assert sample.dynamic_resize(480, 640, area=512 * 512) == (480, 640)  # 4:3 block 96x128, scale round(4.6) = 5
    assert sample.dynamic_resize(9, 16, area=16) == (288, 512)  # below one 32-px block: one block, not 0
    for area in (256**2, 777**2, 1024**2, 1536**2):
        for h, w in ((3000, 2000), (512, 513), (100, 170), (17, 5)):
            assert all(s % 32 == 0 and s > 0 for s in sample.dynamic_resize(h, w, area))


def test_output_size_rules():
    args = lambda **kw: SimpleNamespace(**{"height": None, "width": None, "area": None, **kw})
    wide, square = Image.new("RGB", (64, 48)), Image.new("RGB", (64, 64))
    assert sample.output_size(args(), []) == (1024, 1024)  # t2i default
    assert sample.output_size(args(area=512 * 512), [wide]) == (480, 640)
    assert sample.output_size(args(area=20480), [wide, square]) == (128, 160)  # mean 56x64 -> 5:4
    assert sample.output_size(args(height=32, width=48), [wide]) == (32, 48)
    for bad in (args(height=32), args(height=32, width=48, area=4096), args(height=40, width=32), args(area=0)):
        with pytest.raises(ValueError):
            sample.output_size(bad, [])


# ----------------------------------------------------------------------------------------------------------------
# the Euler sampler


class Straight(torch.nn.Module):
    """The ideal velocity of a straight path from `target` to the noise: v = (x - target) / sigma; records sigmas."""

    def __init__(self, target, dtype=torch.float32):
        super().__init__()
        self.target, self.seen, self.p = target, [], torch.nn.Parameter(torch.zeros(1, dtype=dtype))

    def velocity(self, x, sigma, txt, y, guidance):
        self.seen.append(sigma[0].item())
        return ((x.float() - self.target) / sigma.view(-1, 1, 1, 1) * (1 + txt)).to(x.dtype)


def test_euler_reaches_the_data_on_straight_paths():
    target, noise = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    sigmas = sample.get_schedule(7, 1024)
    fake = Straight(target)
    x = sample.denoise(fake, noise, sigmas, torch.tensor(0.0), None, 3.5, progress=False)
    assert torch.allclose(x, target, atol=1e-5)  # exact for any schedule: every step stays on the line
    assert fake.seen == pytest.approx(sigmas[:-1])
    x = sample.denoise(Straight(target, torch.bfloat16), noise, sigmas, torch.tensor(0.0), None, 3.5, progress=False)
    assert x.dtype == torch.float32  # the state stays fp32 when the model runs in bf16


def test_true_cfg_combines_velocities():
    # txt scales the fake velocity by (1 + txt): v = 1x, v_neg = 0.5x, so cfg 3 gives 0.5 + 3 * 0.5 = 2x
    target, noise = torch.zeros(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    sigmas = [1.0, 0.5]
    x = sample.denoise(Straight(target), noise, sigmas, torch.tensor(0.0), None, 1.0, (torch.tensor(-0.5), None), 3.0,
                       progress=False)
    assert torch.allclose(x, noise - 0.5 * 2 * noise)
    same = sample.denoise(Straight(target), noise, sigmas, torch.tensor(0.0), None, 1.0, (torch.tensor(0.0), None),
                          3.0, progress=False)
    assert torch.allclose(same, noise - 0.5 * noise)  # a negative equal to the prompt changes nothing


# ----------------------------------------------------------------------------------------------------------------
# tiny models in the official layouts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = UniWorld(flux.Flux(flux.FLUX_CONFIGS["tiny"]), vlm_dim=64, siglip_dim=32).eval()
    enc = Encoders(vlm=tiny_vlm(seed=0), siglip=tiny_siglip(seed=0), ae=flux.AutoEncoder(flux.AE_CONFIGS["tiny"]),
                   clip=tiny_clip(seed=0, hidden=16), t5=tiny_t5(seed=0, d_model=32))
    save_release(model, str(root / "uniworld"), enc.vlm)
    flux.save_autoencoder(enc.ae, str(root / "flux" / "vae"), "diffusers")
    enc.clip.save_pretrained(str(root / "flux"))
    enc.t5.save_pretrained(str(root / "flux"))
    enc.siglip.save_pretrained(str(root / "siglip"))
    rng = np.random.default_rng(0)
    for name, (h, w) in {"wide.png": (40, 60), "banner.png": (36, 64), "square.png": (64, 64)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    (root / "notes.png").write_text("not an image")
    (root / "cut.png").write_bytes((root / "wide.png").read_bytes()[:200])
    (root / "folder.png").mkdir()
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


def test_cli_ask(tiny):
    r = run("--ask", "What color is it?", "--image", str(tiny.root / "wide.png"), "--max-new-tokens", "3",
            *tiny.weights)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith("peak memory") and len(r.stdout.splitlines()) >= 2


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


@pytest.mark.skipif(not os.path.isdir(sample.TOY), reason="no toy model in assets/toy")
@pytest.mark.parametrize("args", [["--edit"], ["--t2i"],
                                  ["--edit", "--prompt", "segment the red circle at the top left"]])
def test_no_arguments_but_the_mode_run_the_bundled_toy(tmp_path, capsys, args):
    """`python sample.py --edit` edits assets/toy/examples/edit.png with its instruction, at the toy's settings."""
    out = str(tmp_path / "out.png")
    sample.main(args + ["--out", out])
    assert Image.open(out).size == (32, 32)
    assert "32x32 (h x w), 20 steps, guidance 1.0" in capsys.readouterr().out


@pytest.mark.skipif(os.path.isdir(sample.TOY), reason="the toy model is there")
def test_cli_without_weights_says_what_to_pass():
    r = run("--t2i", "--prompt", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--weights" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--edit", "--t2i", "--prompt", "x"], "not allowed with argument"),
    (["--edit", "--prompt", "x"], "--edit needs at least one --image"),
    (["--edit", "--image", "{root}/cut.png", "--prompt", "x"], "truncated"),
    (["--t2i", "--prompt", "x", "--height", "32"], "--height and --width together"),
    (["--t2i", "--prompt", "x", "--area", "0"], "--area must be a positive"),
    (["--t2i"], "need --prompt"),
    (["--ask", "why?", "--prompt", "x"], "drop --prompt"),
    (["--edit", "--image", "{root}/wide.png", "--prompt", "Make it red <image>"], "remove <image>"),
    (["--t2i", "--prompt", "x", "--device", "gpu"], "--device 'gpu'"),
    (["--t2i", "--prompt", "x", "--out", "{root}/no/such/dir/x.png"], "the folder does not exist"),
    (["--t2i", "--prompt", "x", "--out", "{root}/x.txt2"], "image extension"),
    (["--t2i", "--prompt", "x", "--flux", "{root}/flux"], "need --weights"),
])
def test_more_argument_errors_in_process(tiny, capsys, args, message):
    # the same main() as above, without a subprocess's seconds of imports
    weights = [] if "--flux" in args else tiny.weights  # with no weights the toy's example would fill the gaps
    with pytest.raises(SystemExit) as exit:
        sample.main(weights + [a.format(root=tiny.root) for a in args])  # the args' flags win
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
