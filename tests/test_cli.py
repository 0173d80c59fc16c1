"""The command line: files it writes, their parameters chunk, and one-line errors for bad input."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from small_models import small_sd
from sd_scratch.cli import main
from sd_scratch.images import read_parameters
from sd_scratch.loading import save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small_sd.safetensors"
    save_checkpoint(path, *small_sd(1, seed=7), image_size=32)
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sd_scratch.sample", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_cli_writes_pngs_with_parameters_and_a_grid(checkpoint, tmp_path):
    result = run_cli("--checkpoint", checkpoint, "--prompt", "a green square on a white background",
                     "--negative-prompt", "red", "--steps", 4, "--guidance", 5, "--sampler", "dpmpp_2m", "--karras",
                     "--seed", 123, "--height", 24, "--width", 40, "--n-samples", 2, "--outdir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid-00000.png", "sample-00000.png", "sample-00001.png"]
    assert Image.open(tmp_path / "sample-00000.png").size == (40, 24)
    assert Image.open(tmp_path / "grid-00000.png").size == (80, 24)
    assert read_parameters(tmp_path / "sample-00001.png") == (
        "a green square on a white background\n"
        "Negative prompt: red\n"
        "Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.0, Seed: 124, Size: 40x24, Model: small_sd"
    )


def test_same_seed_same_pixels_and_batches_split_by_seed(checkpoint, tmp_path):
    common = ["--checkpoint", checkpoint, "--steps", 3, "--sampler", "euler_a", "--no-grid"]
    assert main([*map(str, common), "--seed", "5", "--n-samples", "2", "--outdir", str(tmp_path / "a")]) == 0
    assert main([*map(str, common), "--seed", "5", "--n-samples", "2", "--outdir", str(tmp_path / "b")]) == 0
    assert main([*map(str, common), "--seed", "6", "--outdir", str(tmp_path / "c")]) == 0
    first, again = pixels(tmp_path / "a" / "sample-00000.png"), pixels(tmp_path / "b" / "sample-00000.png")
    assert np.array_equal(first, again)
    assert np.array_equal(pixels(tmp_path / "a" / "sample-00001.png"), pixels(tmp_path / "b" / "sample-00001.png"))
    # image 1 of the batch of two from seed 5 is the single image from seed 6 (up to batched rounding)
    assert np.abs(pixels(tmp_path / "a" / "sample-00001.png") - pixels(tmp_path / "c" / "sample-00000.png")).max() <= 1
    assert not np.array_equal(first, pixels(tmp_path / "a" / "sample-00001.png"))


@pytest.mark.parametrize("schedule, label", [("exponential", "Exponential"), ("beta", "Beta"),
                                             ("sgm_uniform", "SGM Uniform"), ("ays", "Align Your Steps")])
def test_the_schedule_type_is_taken_and_recorded_as_a1111_names_it(checkpoint, tmp_path, schedule, label):
    assert main(["--checkpoint", str(checkpoint), "--steps", "3", "--sampler", "dpmpp_2m", "--schedule", schedule,
                 "--outdir", str(tmp_path)]) == 0
    assert f"Sampler: DPM++ 2M, Schedule type: {label}, CFG scale" in read_parameters(tmp_path / "sample-00000.png")


def test_samplers_and_schedules_are_taken_by_automatic1111s_names_too(checkpoint, tmp_path):
    assert main(["--checkpoint", str(checkpoint), "--steps", "3", "--sampler", "DPM++ 2M SDE", "--schedule",
                 "sgm uniform", "--outdir", str(tmp_path)]) == 0
    assert "Sampler: DPM++ 2M SDE, Schedule type: SGM Uniform," in read_parameters(tmp_path / "sample-00000.png")


def test_existing_files_are_never_overwritten(checkpoint, tmp_path):
    (tmp_path / "sample-00000.png").write_bytes(b"mine")
    for _ in range(2):
        assert main(["--checkpoint", str(checkpoint), "--steps", "2", "--outdir", str(tmp_path)]) == 0
    assert (tmp_path / "sample-00000.png").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample-00000.png", "sample-00001.png", "sample-00002.png"]


def test_prompts_from_file_iterations_and_intermediates(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue square  \n")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "--from-file", str(prompts), "--steps", "4", "--n-iter", "2",
                 "--save-intermediates", "2", "--sampler", "ddim", "--outdir", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["grid-00000.png"] + [f"sample-0000{i}{s}.png" for i in range(4) for s in ("", "-steps")])
    assert read_parameters(out / "sample-00001.png").startswith("a blue square\nSteps: 4, Sampler: DDIM")
    # image i of the run uses seed + i, whichever prompt and iteration it belongs to
    assert [read_parameters(out / f"sample-0000{i}.png").split("Seed: ")[1].split(",")[0] for i in range(4)] == \
        ["42", "43", "44", "45"]
    assert read_parameters(out / "sample-00002-steps.png").endswith("Model: small_sd, Preview every: 2 steps")
    assert read_parameters(out / "grid-00000.png") == read_parameters(out / "sample-00000.png")
    assert Image.open(out / "sample-00000-steps.png").size == (32 * 3, 32)  # 2 previews + the final image


def test_image_to_image_from_the_command_line(checkpoint, tmp_path):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "init.png")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "--init-image", str(tmp_path / "init.png"), "--strength", "0.5",
                 "--steps", "4", "--outdir", str(out)]) == 0
    assert "Denoising strength: 0.5" in read_parameters(out / "sample-00000.png")


def test_a_long_prompt_is_read_whole_and_only_past_eight_chunks_warns(checkpoint, tmp_path):
    long_prompt = " ".join(["circle"] * 80) + " zebra"  # 81 tokens: two chunks, nothing dropped, nothing said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["--checkpoint", str(checkpoint), "--prompt", long_prompt, "--steps", "1",
                     "--outdir", str(tmp_path / "a")]) == 0
    assert read_parameters(tmp_path / "a" / "sample-00000.png").startswith(long_prompt + "\n")
    too_long = " ".join(["circle"] * 600) + " zebra"
    with pytest.warns(UserWarning, match=r"prompt is 9 chunks of 75 tokens, more than the 8 read; .*'zebra'"):
        assert main(["--checkpoint", str(checkpoint), "--prompt", too_long, "--steps", "1",
                     "--outdir", str(tmp_path / "b")]) == 0


@pytest.mark.parametrize("args, message", [
    (["--height", "50"], "height must be a multiple of 8, got 50: try 48 or 56"),
    (["--width", "3"], "width must be a multiple of 8, at least 8, got 3"),
    (["--width", "0"], "width must be a multiple of 8, at least 8, got 0"),
    (["--height", "-8"], "height must be a multiple of 8, at least 8, got -8"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--guidance", "-1"], "--guidance must not be negative"),
    (["--strength", "0.5"], "--strength needs --init-image"),
    (["--init-image", "INIT", "--strength", "1.5"], r"--strength must be in \(0, 1\]"),
    (["--init-image", "INIT", "--strength", "0"], r"--strength must be in \(0, 1\]"),
    (["--init-image", "NOTANIMAGE"], "cannot read init image"),
    (["--from-file", "EMPTY"], "has no prompts: write one prompt per line"),
    (["--sampler", "magic"], "argument --sampler: unknown sampler 'magic'; known: euler, euler_a, lms, ddim, pndm, "
                             "dpmpp_2m, heun"),
    (["--checkpoint", "nowhere.safetensors"], "checkpoint not found: nowhere.safetensors; put a Stable Diffusion"),
    (["--outdir", "UNWRITABLE"], "cannot write to output folder"),
    (["--eta", "-0.1"], "eta must be >= 0"),
    (["--steps", "1001"], "num_steps 1001 is more than the 1000 training timesteps"),
    (["--sampler", "ddim", "--karras"], "karras sigmas need a sigma-based sampler"),
    (["--sampler", "pndm", "--schedule", "ays"], "'pndm' walks the 'spaced' schedule, not 'ays'"),
    (["--schedule", "cosine"], "argument --schedule: unknown schedule 'cosine'; known: spaced, karras"),
    (["--karras", "--schedule", "beta"], "--karras is --schedule karras"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--clip-skip", "9"], "--clip-skip 9 leaves no text encoder layer"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(checkpoint, tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "not_an_image.png").write_text("hello")
    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    (tmp_path / "a_file").write_text("")
    replace = {"INIT": tmp_path / "init.png", "NOTANIMAGE": tmp_path / "not_an_image.png",
               "EMPTY": tmp_path / "empty.txt", "UNWRITABLE": tmp_path / "a_file" / "sub"}
    args = [str(replace.get(a, a)) for a in args]
    out = tmp_path / "out"
    if "--checkpoint" not in args:
        args += ["--checkpoint", str(checkpoint)]
    if "--outdir" not in args:
        args += ["--outdir", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert pytest.importorskip("re").search(message, err), err
    assert not out.exists() or not any(out.iterdir())


def test_bad_input_from_a_subprocess_has_no_traceback(tmp_path):
    result = run_cli("--height", "100", "--outdir", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: height must be a multiple of 8, got 100: try 96 or 104"
    assert "Traceback" not in result.stderr and not any(tmp_path.iterdir())


def test_no_arguments_draws_the_default_prompt_with_the_shipped_tiny_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sd_scratch.sample"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    image = tmp_path / "outputs" / "sample-00000.png"
    assert Image.open(image).size == (64, 64)
    # the shipped model recommends guidance 3 in its metadata: the command line takes it and records it
    assert read_parameters(image).startswith("a red circle on a blue background\nSteps: 25, Sampler: Euler, CFG scale: 3.0")
