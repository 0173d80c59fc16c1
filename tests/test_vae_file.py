"""A VAE from a file of its own (--vae): every layout it is published in against diffusers' AutoencoderKL
loaded from the same file, a whole run with the swapped VAE against a checkpoint with that VAE built in, what
the PNG records, and one-line errors for files that are not a VAE for this model."""

import dataclasses
import gc
import hashlib
import json
import re
import shutil
import weakref

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file
from small_models import VAE_SMALL, randomize, small_sd
from twins import diffusers_vae_config, vae_twin

from sd_scratch.cli import main
from sd_scratch.images import read_parameters
from sd_scratch.loading import (
    CheckpointError,
    load_checkpoint,
    load_vae,
    replace_vae,
    save_checkpoint,
)
from sd_scratch.sample import generate
from sd_scratch.vae import VAE

LAYOUTS = ["prefixed", "unprefixed", "diffusers_folder", "diffusers_file", "fp16_folder"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same random VAE (not the checkpoints' own) in every layout, and two checkpoints of one text encoder
    and UNet: `own` with its own VAE, `built_in` with this VAE."""
    folder = tmp_path_factory.mktemp("vae_files")
    vae = randomize(VAE(VAE_SMALL), seed=11)
    original = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file({"first_stage_model." + k: v for k, v in original.items()}, str(folder / "prefixed.safetensors"))
    save_file(original, str(folder / "unprefixed.safetensors"))
    twin = vae_twin({"first_stage_model." + k: v for k, v in original.items()}, vae.config)
    twin.save_pretrained(folder / "diffusers_folder")
    shutil.copy(folder / "diffusers_folder" / "diffusion_pytorch_model.safetensors",
                folder / "diffusers_file.safetensors")
    twin.half().save_pretrained(folder / "fp16_folder", variant="fp16")
    assert (folder / "fp16_folder" / "diffusion_pytorch_model.fp16.safetensors").exists()
    text_encoder, unet, own_vae = small_sd(1, seed=7)
    save_checkpoint(folder / "own.safetensors", text_encoder, unet, own_vae, image_size=32)
    save_checkpoint(folder / "built_in.safetensors", text_encoder, unet, vae, image_size=32)
    return folder


def path_of(files, layout):
    return files / (layout if layout.endswith("folder") else f"{layout}.safetensors")


def diffusers_reference(files, layout) -> AutoencoderKL:
    """diffusers' AutoencoderKL loaded from the same file by diffusers' own means."""
    path = path_of(files, layout)
    if layout.endswith("folder"):
        return AutoencoderKL.from_pretrained(path, variant="fp16" if "fp16" in layout else None,
                                             torch_dtype=torch.float32).eval()
    config = diffusers_vae_config(VAE_SMALL)
    state = load_file(str(path))
    if layout != "diffusers_file":  # the original layout, through diffusers' single-file converter
        state = convert_ldm_vae_checkpoint(state, config)
    reference = AutoencoderKL(**config)
    reference.load_state_dict(state, strict=True)
    return reference.eval()


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_every_layout_decodes_and_encodes_as_diffusers_does(files, layout):
    # Measured (torch 2.13 CPU, float32): decode 6.7e-6 and encode mean 5.0e-6 at most for every layout (fp16
    # folder: 6.1e-6, 3.7e-6), on decoded images of std 0.57 and up to 3.8 in size.
    ours = load_vae(path_of(files, layout))
    reference = diffusers_reference(files, layout)
    assert dataclasses.replace(ours.config, scaling_factor=0.18215) == VAE_SMALL
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 6, 10, generator=generator)
    images = torch.rand(2, 3, 48, 80, generator=generator) * 2 - 1
    decoded = ours.decode(z)
    assert 0.1 < decoded.std() < 10
    assert (decoded - reference.decode(z).sample).abs().max() <= 1e-4
    assert (ours.encode(images)[0] - reference.encode(images).latent_dist.mean).abs().max() <= 1e-4


@pytest.mark.parametrize("layout", ["prefixed", "unprefixed", "diffusers_folder", "diffusers_file"])
def test_a_run_with_the_swapped_vae_is_the_run_with_that_vae_built_in(files, layout):
    swapped = load_checkpoint(files / "own.safetensors", vae=path_of(files, layout))
    built_in = load_checkpoint(files / "built_in.safetensors")
    init = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    for options in [{}, {"init_image": init, "strength": 0.6}]:  # decoder; encoder and decoder
        a = generate(swapped, "a red circle", steps=3, seed=1, progress=False, **options)
        b = generate(built_in, "a red circle", steps=3, seed=1, progress=False, **options)
        assert torch.equal(a.images, b.images)


def test_the_replaced_vae_is_no_longer_referenced(files):
    model = load_checkpoint(files / "own.safetensors")
    own = weakref.ref(model.vae)
    replace_vae(model, files / "prefixed.safetensors")
    gc.collect()
    assert own() is None
    assert model.vae_file == ("prefixed.safetensors", sha256(files / "prefixed.safetensors")[:10])


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_scaling_factor_is_the_folders_else_the_models(files, tmp_path):
    folder = tmp_path / "vae"
    shutil.copytree(files / "diffusers_folder", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"scaling_factor": 0.5}))
    assert load_vae(folder, scaling_factor=0.3).config.scaling_factor == 0.5
    assert load_vae(files / "diffusers_file.safetensors", scaling_factor=0.3).config.scaling_factor == 0.3
    assert load_vae(files / "prefixed.safetensors").config.scaling_factor == 0.18215
    model = load_checkpoint(files / "own.safetensors")
    model.vae.config = dataclasses.replace(model.vae.config, scaling_factor=0.25)
    replace_vae(model, files / "unprefixed.safetensors")
    assert model.vae.config.scaling_factor == 0.25


def test_a_training_ckpt_loads_without_its_loss_and_ema_counters(files, tmp_path):
    """The .ckpt releases carry the VAE's training loss and the EMA's counters: skipped, as A1111 skips them.
    Any other EMA tensor would be a copy of the weights: named, not quietly left out."""
    tensors = load_file(str(files / "unprefixed.safetensors"))
    extra = {"loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4), "loss.logvar": torch.zeros(()),
             "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840000)}
    torch.save({"state_dict": tensors | extra, "global_step": 840000}, tmp_path / "vae.ckpt")
    ours, plain = load_vae(tmp_path / "vae.ckpt"), load_vae(files / "unprefixed.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), plain.state_dict().values()))
    torch.save({"state_dict": tensors | {"model_ema.encoderconv_inweight": torch.zeros(1)}}, tmp_path / "ema.ckpt")
    with pytest.raises(CheckpointError, match=r"1 unexpected \(model_ema.encoderconv_inweight\)"):
        load_vae(tmp_path / "ema.ckpt")


def test_the_png_records_the_vae_as_a1111_does_and_matches_the_built_in_run(files, tmp_path):
    common = ["--steps", "3", "--seed", "4", "--prompt", "a red circle"]
    assert main([*common, "--checkpoint", str(files / "own.safetensors"), "--vae", str(files / "prefixed.safetensors"),
                 "--outdir", str(tmp_path / "swapped")]) == 0
    assert main([*common, "--checkpoint", str(files / "built_in.safetensors"), "--outdir", str(tmp_path / "b")]) == 0
    swapped, built_in = tmp_path / "swapped" / "sample-00000.png", tmp_path / "b" / "sample-00000.png"
    assert np.array_equal(np.asarray(Image.open(swapped)), np.asarray(Image.open(built_in)))
    expected = f"Model: own, VAE hash: {sha256(files / 'prefixed.safetensors')[:10]}, VAE: prefixed.safetensors"
    assert expected in read_parameters(swapped)
    assert "VAE" not in read_parameters(built_in)


def bad_vae(files, tmp_path, case):
    """A VAE argument that must be refused, written for `case`."""
    target = tmp_path / f"{case}.safetensors"
    tensors = load_file(str(files / "prefixed.safetensors"))
    if case == "unet":
        _, unet, _ = small_sd(1)
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(target))
    elif case == "whole_checkpoint":
        target = files / "own.safetensors"
    elif case == "whole_folder":
        (tmp_path / "model" / "vae").mkdir(parents=True)
        (tmp_path / "model" / "unet").mkdir()
        target = tmp_path / "model"
    elif case == "truncated":
        data = (files / "prefixed.safetensors").read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif case == "missing":
        target = tmp_path / "nowhere.safetensors"
    elif case == "three_latent_channels":
        other = randomize(VAE(dataclasses.replace(VAE_SMALL, latent_channels=3)), seed=1)
        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(target))
    elif case == "unknown_key":
        save_file(tensors | {"first_stage_model.encoder.extra.weight": torch.zeros(2)}, str(target))
    elif case == "missing_key":
        del tensors["first_stage_model.decoder.up.0.block.1.conv2.bias"]
        save_file(tensors, str(target))
    elif case == "no_post_quant_conv":  # the shape of an SD3-style VAE, which has no quant convolutions
        save_file({k: v for k, v in tensors.items() if "quant_conv" not in k}, str(target))
    return target


@pytest.mark.parametrize("case, message", [
    ("unet", "is not a VAE: it looks like a UNet; give a VAE file"),
    ("whole_checkpoint", "is not a VAE: it looks like a whole checkpoint"),
    ("whole_folder", "is a whole diffusers model folder, not a VAE: give its vae/ folder"),
    ("truncated", "is not a readable safetensors file"),
    ("missing", "VAE not found: .*nowhere.safetensors"),
    ("three_latent_channels", "3-channel latents at 1/8 of the image size, and this model's UNet works on 4 "),
    ("unknown_key", r"original VAE layout: 0 missing \(none\), 1 unexpected \(encoder.extra.weight\); is this a "),
    ("missing_key", r"1 missing \(decoder.up.0.block.1.conv2.bias\), 0 unexpected"),
    ("no_post_quant_conv", "holds no original-layout VAE tensor post_quant_conv.weight"),
])
def test_a_bad_vae_is_one_line_exit_2_and_writes_nothing(files, tmp_path, capsys, case, message):
    out = tmp_path / "out"
    args = ["--checkpoint", str(files / "own.safetensors"), "--vae", str(bad_vae(files, tmp_path, case)),
            "--steps", "1", "--outdir", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert not out.exists() or not any(out.iterdir())
