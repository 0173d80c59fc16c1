"""What a user may type or do that must end in one line and a non-zero exit, or in every image saved:
concurrent runs into one folder, devices, non-finite numbers, seeds, sizes, Ctrl-C, files without
configs, deep images, and the PNG parameters of every file written."""

import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sd_scratch import cli, images, memory, sample, samplers, schedule
from sd_scratch.cli import main
from sd_scratch.images import from_pil, read_parameters, save_numbered
from sd_scratch.loading import DEFAULT_CHECKPOINT, CheckpointError, StableDiffusion, load_checkpoint, save_checkpoint
from sd_scratch.loading.strict import build_empty
from sd_scratch.text_encoder import TextEncoder, TextEncoderConfig
from sd_scratch.unet import UNet, UNetConfig
from sd_scratch.vae import VAE, VAEConfig
from small_models import TEXT_SD1, UNET_SD1, randomize, small_sd


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small_sd.safetensors"
    save_checkpoint(path, *small_sd(1, seed=7), image_size=32)
    return path


def one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err, err
    return err


# --------------------------------------------------------------------------------------------------
# Output files: claimed atomically


def test_four_runs_into_one_folder_at_once_save_sixteen_images(checkpoint, tmp_path):
    command = [sys.executable, "-m", "sd_scratch.sample", "--checkpoint", str(checkpoint), "--steps", "2",
               "--n-samples", "4", "--no-grid", "--outdir", str(tmp_path)]
    runs = [subprocess.Popen([*command, "--seed", str(100 * k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for k in range(4)]
    results = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0] * 4, [err[-500:] for _, err in results]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"sample-{n:05d}.png" for n in range(16)]
    seeds = sorted(int(read_parameters(tmp_path / name).split("Seed: ")[1].split(",")[0]) for name in names)
    assert seeds == sorted(100 * k + i for k in range(4) for i in range(4))  # every image kept, none replaced


def test_a_number_taken_between_looking_and_claiming_moves_on(tmp_path, monkeypatch):
    picture = Image.new("RGB", (8, 8), "red")
    (tmp_path / "sample-00000.png").write_bytes(b"another run's")
    monkeypatch.setattr(images, "next_free_number", lambda folder, prefix: 0)  # as if it looked before the other run
    path = save_numbered(picture, tmp_path, "sample", "a red square")
    assert path.name == "sample-00001.png" and read_parameters(path) == "a red square"
    assert (tmp_path / "sample-00000.png").read_bytes() == b"another run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample-00000.png", "sample-00001.png"]  # no leftovers


# --------------------------------------------------------------------------------------------------
# Devices, numbers, seeds, sizes


@pytest.mark.parametrize("device", ["cpuu", "cuda:99", "banana:0"]
                         + ([] if torch.backends.mps.is_available() else ["mps"]))
def test_a_device_this_torch_cannot_use_is_named_with_the_ones_it_can(checkpoint, tmp_path, capsys, device):
    assert main(["--checkpoint", str(checkpoint), "--device", device, "--outdir", str(tmp_path)]) == 2
    one_line_error(capsys, device, "this torch can use: cpu")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["--guidance", "--eta", "--strength"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_number_flag_refuses_nan_and_inf(checkpoint, tmp_path, capsys, flag, value):
    assert main(["--checkpoint", str(checkpoint), f"{flag}={value}", "--outdir", str(tmp_path)]) == 2
    one_line_error(capsys, flag, "is not a finite number")


@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**64)], f"--seed must be between 0 and {2**64 - 1}, got {2**64}"),
    (["--seed", "-1"], "--seed must be between 0"),
    (["--seed", str(2**64 - 1), "--n-samples", "2"], "the last image's seed, 18446744073709551616, is past"),
    (["--seed", str(2**64 - 3), "--n-iter", "2", "--n-samples", "2"], "use a seed of at most 18446744073709551612"),
])
def test_every_seed_of_the_run_is_checked_before_loading(tmp_path, capsys, args, message):
    # No --checkpoint: were the seeds checked after loading, the missing file would be reported instead.
    assert main([*args, "--checkpoint", str(tmp_path / "not_there.safetensors"), "--outdir", str(tmp_path)]) == 2
    one_line_error(capsys, message)


def test_generate_refuses_a_seed_past_the_generators_range_and_a_guidance_of_nan(checkpoint):
    model = load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="the last image's seed, 18446744073709551616"):
        sample.generate(model, ["a", "b"], seed=2**64 - 1, steps=1, progress=False)
    with pytest.raises(ValueError, match="guidance must be a finite number, got nan"):
        sample.generate(model, "a", guidance=float("nan"), steps=1, progress=False)


def test_a_size_too_large_for_the_memory_is_refused_with_what_it_needs_and_force_runs_it(checkpoint, tmp_path,
                                                                                           capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 400_000)  # 0.4 MB free
    args = ["--checkpoint", str(checkpoint), "--steps", "1", "--height", "64", "--width", "96",
            "--outdir", str(tmp_path)]
    assert main(args) == 2
    err = one_line_error(capsys, "a batch of 1 96x64 image(s) needs at least", "0.0004 GB are available",
                         "--force runs anyway")
    assert "try " in err and not any(tmp_path.iterdir())
    assert main([*args, "--force"]) == 0
    assert (tmp_path / "sample-00000.png").exists()


def test_the_decode_alone_too_large_suggests_tiled_decoding(checkpoint, tmp_path, capsys, monkeypatch):
    model = load_checkpoint(checkpoint)
    floor = memory.memory_floor(model, 1, 1024, 1024, guided=True)
    tiled = memory.memory_floor(model, 1, 1024, 1024, guided=True, tiled_decode=True)
    assert floor.decode > floor.unet and tiled.decode < floor.decode
    monkeypatch.setattr(memory, "available_memory", lambda device: max(floor.unet, tiled.decode) + 1)
    arguments = ["--checkpoint", str(checkpoint), "--height", "1024", "--width", "1024", "--outdir", str(tmp_path)]
    assert main(arguments) == 2
    one_line_error(capsys, "add --tiled-decode")


def test_the_memory_floor_of_sd15_lies_under_what_a_decode_was_measured_to_take():
    # benchmarks/results/tiled_decode.md: a plain 1024x1024 decode of SD 1.5's VAE (float32, CPU) added
    # 3.58 GB to the process; a 64-latent tiled one added 1.25 GB.
    model = StableDiffusion(None, build_empty(TextEncoder, TextEncoderConfig()), build_empty(UNet, UNetConfig()),
                            build_empty(VAE, VAEConfig()), "SD 1.x", "epsilon", 0, 512, "sd15")  # shapes only
    floor = memory.memory_floor(model, 1, 1024, 1024, guided=True)
    assert floor.decode == 1024 * 1024 * (256 + 128) * 4 and floor.decode < 3.58e9
    assert memory.memory_floor(model, 1, 1024, 1024, guided=True, tiled_decode=True).decode < 1.25e9
    assert floor.unet == 2 * 128 * 128 * 9 * 320 * 4  # the guided batch, GEGLU's 8 widths + the residual


# --------------------------------------------------------------------------------------------------
# Interrupts


def test_ctrl_c_during_the_loop_is_one_line_and_exit_130(checkpoint, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "generate", interrupted)
    assert main(["--checkpoint", str(checkpoint), "--outdir", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted") and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_a_real_sigint_mid_run_leaves_no_traceback_and_no_half_file(checkpoint, tmp_path):
    run = subprocess.Popen([sys.executable, "-m", "sd_scratch.sample", "--checkpoint", str(checkpoint),
                            "--steps", "1000", "--outdir", str(tmp_path)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    seen = ""
    deadline = time.monotonic() + 120
    while "euler:" not in seen and time.monotonic() < deadline:  # the loop's progress bar has started
        chunk = os.read(run.stderr.fileno(), 4096).decode()
        assert chunk, f"the run ended before its loop started: {seen}"
        seen += chunk
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted"), err
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# Checkpoints without configs


@pytest.mark.parametrize("form", ["ckpt", "safetensors without metadata"])
def test_the_tiny_models_tensors_without_their_configs_load_as_the_tiny_model(tmp_path, form):
    shipped = load_checkpoint()
    tensors = load_file(str(DEFAULT_CHECKPOINT))
    path = tmp_path / ("tiny.ckpt" if form == "ckpt" else "tiny.safetensors")
    if form == "ckpt":
        torch.save({"state_dict": tensors}, path)
    else:
        save_file(tensors, str(path))
    model = load_checkpoint(path)
    assert (model.unet.config, model.vae.config, model.text_encoder.config) == \
        (shipped.unet.config, shipped.vae.config, shipped.text_encoder.config)
    assert model.image_size == 64 and model.defaults == {"guidance": 3.0}
    settings = dict(steps=3, seed=1, progress=False)
    assert torch.equal(sample.generate(model, "a red circle on a blue background", **settings).images,
                       sample.generate(shipped, "a red circle on a blue background", **settings).images)


def test_other_shapes_without_configs_are_refused_naming_what_was_read_and_what_does_not_fit(tmp_path):
    narrow_vae = VAEConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4)
    save_file({k: v.contiguous() for k, v in load_file(str(_written(tmp_path, narrow_vae))).items()},
              str(tmp_path / "plain.safetensors"))  # the same tensors, no sd_scratch config
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path / "plain.safetensors")
    message = str(error.value)
    assert "carries no sd_scratch config and its shapes fit no family sd_scratch knows" in message
    assert "a VAE of 8 x (1, 2)" in message
    assert "the VAE's widths [8, 16] do not split into SD's 32 group-norm" in message
    assert "save_checkpoint" in message and "\n" not in message


def _written(tmp_path, vae_config):
    path = tmp_path / "with_configs.safetensors"
    save_checkpoint(path, randomize(TextEncoder(TEXT_SD1), 0), randomize(UNet(UNET_SD1), 1),
                    randomize(VAE(vae_config), 2))
    load_checkpoint(path)  # with its configs it loads
    return path


class RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_that_would_run_code_is_refused_in_words_of_what_it_holds(tmp_path, capsys):
    torch.save({"state_dict": RunsCode()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path / "evil.ckpt")
    message = str(error.value)
    assert "it holds more than tensors: Unsupported global: GLOBAL print was not an allowed global" in message
    assert "Re-running" not in message and "weights_only` set to `False" not in message
    # A plain (not zip) pickle too, through the command line: one line, no warning from torch before it.
    with open(tmp_path / "plain.ckpt", "wb") as f:
        pickle.dump({"state_dict": RunsCode()}, f)
    assert main(["--checkpoint", str(tmp_path / "plain.ckpt"), "--outdir", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and len(captured.err.strip().splitlines()) == 1
    assert "could not be read as a weights-only PyTorch pickle (it holds more than tensors" in captured.err
    assert "must never run" not in captured.out


# --------------------------------------------------------------------------------------------------
# Deep images, defaults from the model, parameters in every file


@pytest.mark.parametrize("mode, dtype, white", [("I;16", np.uint16, 65535), ("I", np.int32, 65535),
                                                ("F", np.float32, 1.0)])
def test_high_depth_images_keep_their_whole_range(mode, dtype, white):
    gray = np.linspace(0, white, 8 * 8, dtype=np.float64).reshape(8, 8)
    if mode != "F":
        gray = gray.round()
    image = Image.fromarray(gray.astype(dtype))
    assert image.mode == mode
    pixels = from_pil(image, 8, 8)
    expected = torch.from_numpy(gray / white * 2 - 1).float()
    assert pixels.shape == (1, 3, 8, 8)
    for channel in range(3):
        torch.testing.assert_close(pixels[0, channel], expected, atol=1e-6, rtol=0)


def test_a_16_bit_png_as_init_image_is_read_at_its_depth(tmp_path):
    Image.fromarray(np.full((16, 16), 16384, dtype=np.uint16)).save(tmp_path / "deep.png")  # mode "I;16"
    with Image.open(tmp_path / "deep.png") as image:
        pixels = from_pil(image, 16, 16)
    torch.testing.assert_close(pixels, torch.full((1, 3, 16, 16), 16384 / 65535 * 2 - 1), atol=1e-6, rtol=0)


def test_the_models_recommended_guidance_is_the_default_and_an_explicit_one_wins(tmp_path):
    assert load_checkpoint().defaults == {"guidance": 3.0}
    assert "the shipped tiny model recommends 3" in " ".join(cli.build_parser().format_help().split())
    assert main(["--steps", "2", "--outdir", str(tmp_path)]) == 0
    assert main(["--steps", "2", "--guidance", "7.5", "--outdir", str(tmp_path)]) == 0
    assert "CFG scale: 3.0" in read_parameters(tmp_path / "sample-00000.png")
    assert "CFG scale: 7.5" in read_parameters(tmp_path / "sample-00001.png")


def test_every_png_carries_its_parameters(checkpoint, tmp_path):
    assert main(["--checkpoint", str(checkpoint), "--steps", "2", "--n-samples", "2", "--spacing", "trailing",
                 "--save-intermediates", "1", "--outdir", str(tmp_path)]) == 0
    first = read_parameters(tmp_path / "sample-00000.png")
    assert first.endswith("Model: small_sd, Spacing: trailing")
    assert read_parameters(tmp_path / "grid-00000.png") == first
    assert read_parameters(tmp_path / "sample-00001-steps.png") == \
        read_parameters(tmp_path / "sample-00001.png") + ", Preview every: 1 steps"
    result = sample.generate(load_checkpoint(checkpoint), "a cat", steps=2, seed=9, progress=False)
    saved = result.save(0, tmp_path / "api.png")
    assert read_parameters(saved) == result.parameters[0] and "Seed: 9" in result.parameters[0]
    with pytest.raises(FileExistsError):
        result.save(0, saved)


def test_many_batches_draw_one_progress_bar(checkpoint, tmp_path):
    (tmp_path / "prompts.txt").write_text("a\nb\nc\n")
    run = subprocess.run([sys.executable, "-m", "sd_scratch.sample", "--checkpoint", str(checkpoint), "--steps", "2",
                          "--from-file", str(tmp_path / "prompts.txt"), "--no-grid", "--outdir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "batches" in run.stderr and "euler:" not in run.stderr


# --------------------------------------------------------------------------------------------------
# The command line answers before torch is imported


@pytest.mark.parametrize("args", [["--help"], ["--steps", "many"], ["--width", "3"], ["--sampler", "magic"],
                                  ["--guidance", "nan"], ["--seed", "-1"]])
def test_help_and_usage_errors_do_not_import_torch(args):
    code = ("import runpy, sys\n"
            f"sys.argv = ['sample', *{args!r}]\n"
            "try:\n    runpy.run_module('sd_scratch.sample', run_name='__main__')\n"
            "except SystemExit as done:\n    print('exit', done.code, 'torch' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip().splitlines()[-1] == f"exit {0 if args == ['--help'] else 2} False", run.stderr


def test_the_command_lines_own_lists_are_the_registrys():
    assert cli.SAMPLER_LABELS == {name: sampler.label for name, sampler in samplers.SAMPLERS.items()}
    assert cli.SPACINGS == schedule.SPACINGS
    assert cli.SCHEDULE_TYPES == schedule.SCHEDULE_TYPES
    assert {k: v for k, v in cli.SCHEDULE_LABELS.items() if k != "spaced"} == sample.SCHEDULE_LABELS
