"""SDXL on the command line: base and refiner in one run, the size flags, the PNG's fields, and one-line errors
(exit 2, nothing written) for the mistakes SDXL invites."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from small_models import sdxl_single_file_tensors, small_sd, small_sdxl
from sd_scratch.cli import main
from sd_scratch.conditioning import SizeConditioning
from sd_scratch.images import read_parameters
from sd_scratch.loading import load_checkpoint, save_checkpoint
from sd_scratch.sample import SpeedAndMemory, generate


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    save_file(sdxl_single_file_tensors(*small_sdxl(seed=0)), str(folder / "base.safetensors"))
    save_file(sdxl_single_file_tensors(*small_sdxl(seed=10, refiner=True)), str(folder / "refiner.safetensors"))
    save_checkpoint(folder / "sd1.safetensors", *small_sd(1, seed=7), image_size=32)
    base = sdxl_single_file_tensors(*small_sdxl(seed=0))
    save_file({k: v for k, v in base.items() if k.startswith("model.diffusion_model.")}, str(folder / "unet.safetensors"))
    te, te2, _, _ = small_sdxl(seed=0)
    lora = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, te.config.width),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(te.config.mlp_width, 2),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, te2.config.width),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(te2.config.mlp_width, 2)}
    save_file(lora, str(folder / "sdxl_lora.safetensors"))
    return folder


def sdxl_args(files, outdir, *extra):
    return ["--checkpoint", str(files / "base.safetensors"), "--steps", "4", "--height", "64", "--width", "64",
            "--outdir", str(outdir), *map(str, extra)]


def test_an_sdxl_file_is_read_with_sdxl_defaults(files):
    base, refiner = load_checkpoint(files / "base.safetensors"), load_checkpoint(files / "refiner.safetensors")
    assert (base.kind, refiner.kind) == ("SDXL", "SDXL refiner")
    assert base.image_size == refiner.image_size == 1024
    assert base.defaults == {"guidance": 5.0}
    assert base.vae.config.scaling_factor == refiner.vae.config.scaling_factor == 0.13025
    assert base.skip_last_layers == 1  # both encoders read at the penultimate layer
    assert base.tokenizer.pad_token_id == 49407 and base.tokenizer_2.pad_token_id == 0  # ViT-L pads with its end token
    assert refiner.text_encoder is None and refiner.tokenizer is None and refiner.is_refiner


def test_base_and_refiner_run_from_the_command_line_as_in_python(files, tmp_path):
    args = sdxl_args(files, tmp_path, "--refiner", files / "refiner.safetensors", "--refiner-switch", 0.5,
                     "--aesthetic-score", 7, 2, "--original-size", "96,128", "--crop", "8,0", "--seed", 3,
                     "--prompt", "a cat", "--sampler", "dpmpp_2m")
    assert main(args) == 0
    parameters = read_parameters(tmp_path / "sample-00000.png")
    assert parameters.splitlines()[-1] == (
        "Steps: 4, Sampler: DPM++ 2M, CFG scale: 5.0, Seed: 3, Size: 64x64, Model: base, Clip skip: 2, "
        "Refiner: refiner, Refiner switch at: 0.5, Original size: 128x96, Crop top: 8, Crop left: 0, "
        "Aesthetic score: 7.0, Negative aesthetic score: 2.0")
    sizes = SizeConditioning(original_size=(96, 128), target_size=(64, 64), crop=(8, 0), aesthetic_score=7,
                             negative_aesthetic_score=2)
    expected = generate(load_checkpoint(files / "base.safetensors"), "a cat", steps=4, guidance=5, seed=3,
                        sampler="dpmpp_2m", height=64, width=64, sizes=sizes, progress=False,
                        refiner=load_checkpoint(files / "refiner.safetensors"), refiner_switch=0.5)
    saved = np.asarray(Image.open(tmp_path / "sample-00000.png").convert("RGB"))
    assert np.array_equal(saved, np.asarray(expected.pil_images[0]))
    # the refiner changed the picture: the base alone gives another
    alone = generate(load_checkpoint(files / "base.safetensors"), "a cat", steps=4, guidance=5, seed=3,
                     sampler="dpmpp_2m", height=64, width=64, sizes=sizes, progress=False)
    assert (alone.images - expected.images).abs().max() > 0.01


def test_the_size_conditioning_changes_the_picture(files):
    model = load_checkpoint(files / "base.safetensors")
    run = dict(steps=3, height=64, width=64, progress=False, seed=1)
    default = generate(model, "a cat", **run).images
    same = generate(model, "a cat", sizes=SizeConditioning.for_size(64, 64), **run).images
    cropped = generate(model, "a cat", sizes=SizeConditioning((64, 64), (64, 64), crop=(32, 0)), **run).images
    assert torch.equal(default, same)
    assert (default - cropped).abs().max() > 1e-3


@pytest.mark.parametrize("extra, message", [
    (["--aesthetic-score", "7"], "--aesthetic-score is read by the SDXL refiner only"),
    (["--refiner", "{sd1}"], "--refiner: the refiner must be an SDXL refiner"),
    (["--refiner", "{base}"], "--refiner: the refiner must be an SDXL refiner"),
    (["--checkpoint", "{lora}"], "a LoRA, not a full model (give it with --lora)"),
    (["--checkpoint", "{unet}"], "holds a UNet but no VAE and no text encoders: a partial checkpoint"),
    (["--height", "60"], "height must be a multiple of 8, got 60"),
    (["--refiner-switch", "0.5"], "--refiner-switch needs --refiner"),
    (["--refiner", "{refiner}", "--refiner-switch", "1.5"], "--refiner-switch must be a fraction in (0, 1)"),
    (["--refiner", "{refiner}", "--refiner-switch", "0.01"], "leaves the base no step: give a larger switch"),
    (["--refiner", "{refiner}", "--refiner-switch", "0.999"], "leaves the refiner no step: give a smaller switch"),
    (["--original-size", "1024"], "--original-size takes H,W"),
    (["--crop=-8,0"], "--crop takes TOP,LEFT"),
    (["--checkpoint", "{refiner}", "--target-size", "64,64"], "--target-size is read by the SDXL base only"),
    (["--checkpoint", "{sd1}", "--original-size", "64,64"], "--original-size is SDXL's size conditioning"),
])
def test_sdxl_mistakes_are_one_line_exit_2_and_write_nothing(files, tmp_path, capsys, extra, message):
    paths = {name: str(files / f"{name}.safetensors") for name in ("sd1", "base", "refiner", "lora", "unet")}
    paths["lora"] = str(files / "sdxl_lora.safetensors")
    extra = [e.format(**paths) for e in extra]
    assert main(sdxl_args(files, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_align_your_steps_walks_the_sdxl_table_on_sdxl(files):
    from sd_scratch import samplers, schedule
    model = load_checkpoint(files / "base.safetensors")
    plan = samplers.make_plan("euler", 10, schedule_type="ays", schedule=model.schedule)
    expected = schedule.ays_sigmas(10, timesteps=schedule.AYS_SDXL_TIMESTEPS)
    assert torch.allclose(plan.sigmas[:-1].double(), torch.from_numpy(expected), rtol=1e-5)
    sd15 = samplers.make_plan("euler", 10, schedule_type="ays")
    assert not torch.allclose(plan.sigmas, sd15.sigmas)


def resident_file_bytes() -> int:
    return int(open("/proc/self/status").read().split("RssFile:")[1].split()[0]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="/proc/self/status is Linux's")
def test_an_fp16_file_cast_to_fp32_leaves_none_of_its_pages_resident(files, tmp_path):
    """Every tensor is read, cast and its pages handed back in turn, bigG's fused q, k, v too (they are cut from
    the cast copy, not from a view of the file): after loading, the process holds the copies, not the file."""
    tensors = sdxl_single_file_tensors(*small_sdxl(seed=0))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(tmp_path / "h.safetensors"))
    before = resident_file_bytes()
    model = load_checkpoint(tmp_path / "h.safetensors", dtype=torch.float32)
    file_bytes = (tmp_path / "h.safetensors").stat().st_size
    assert resident_file_bytes() - before < 0.1 * file_bytes, "the file's pages stayed resident"  # bigG: 23%
    q = model.text_encoder_2.text_model.encoder.layers[1].self_attn.q_proj.weight
    fused = tensors["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(q, fused[:q.shape[0]].half().float())
    assert q.untyped_storage().nbytes() == q.nbytes  # a third of its own, not a view of the whole copy


def test_a_last_run_frees_every_network_it_is_done_with(files):
    """SpeedAndMemory(free_when_done=True), the command line's last batch: the same picture, the text encoders'
    and the UNet's weights (copies here: the model is loaded in another dtype) freed, the model refused after."""
    run = dict(steps=3, height=32, width=32, progress=False, seed=2)
    expected = generate(load_checkpoint(files / "base.safetensors"), "a cat", **run).images
    model = load_checkpoint(files / "base.safetensors")
    freed = generate(model, "a cat", speed=SpeedAndMemory(free_when_done=True), **run).images
    assert torch.equal(freed, expected)
    for network in (model.text_encoder, model.text_encoder_2, model.unet, model.vae.encoder):
        assert all(p.numel() == 0 for p in network.parameters())
    assert all(p.numel() > 0 for p in model.vae.decoder.parameters())
    with pytest.raises(ValueError, match="were freed by a run with SpeedAndMemory"):
        generate(model, "a cat", **run)
