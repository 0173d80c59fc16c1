"""sd_scratch.taesd against diffusers' AutoencoderTiny with the same random weights, in every layout TAESD
is published in, and one-line errors for files that are not a TAESD for the model's latents.

The weights start in diffusers' AutoencoderTiny (its own module tree, saved by its own save_pretrained), so
that our key table, not a copy of our state_dict, is what carries them over. The madebyollin files are
written from diffusers' state_dict by the published numbering (the decoder's sequence starts with the
parameterless clamp, diffusers keeps the clamp out of its sequence), independently of the loader's table.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from safetensors.torch import load_file, save_file
from small_models import randomize

from sd_scratch.loading import CheckpointError, load_checkpoint
from sd_scratch.loading.taesd_file import load_taesd, save_taesd
from sd_scratch.taesd import TAESD, TAESDConfig
from sd_scratch.tiny.train_taesd import OUTPUT, picture_latents, psnr, teacher

# The published layout of taesd / taesdxl, and a small one with the tiny model's two upsamples (factor 4).
SD_LAYOUT = TAESDConfig()
SMALL_LAYOUT = TAESDConfig(width=16, decoder_blocks=(2, 2, 1), encoder_blocks=(1, 2, 2))


def diffusers_taesd(config: TAESDConfig, seed: int) -> AutoencoderTiny:
    """diffusers' AutoencoderTiny of `config`'s shape, random weights (all of order 1: no zero biases)."""
    model = AutoencoderTiny(
        latent_channels=config.latent_channels,
        encoder_block_out_channels=(config.width,) * len(config.encoder_blocks),
        decoder_block_out_channels=(config.width,) * len(config.decoder_blocks),
        num_encoder_blocks=config.encoder_blocks, num_decoder_blocks=config.decoder_blocks,
    )
    return randomize(model, seed)


def madebyollin_files(reference: AutoencoderTiny, folder, stem: str = "taesd", suffix: str = ".safetensors"):
    """`reference`'s weights as madebyollin's pair, {stem}_decoder and {stem}_encoder; the decoder's path."""
    state = reference.state_dict()
    halves = {"decoder": 1, "encoder": 0}  # where each published sequence's first conv stands
    for half, first in halves.items():
        tensors = {}
        for key, value in state.items():
            if key.startswith(f"{half}.layers."):
                index, rest = key.removeprefix(f"{half}.layers.").split(".", 1)
                tensors[f"{int(index) + first}.{rest}"] = value.contiguous()
        path = folder / f"{stem}_{half}{suffix}"
        if suffix == ".safetensors":
            save_file(tensors, str(path))
        else:
            torch.save(tensors, path)
    return folder / f"{stem}_decoder{suffix}"


@pytest.fixture(scope="module", params=["sd", "small"])
def reference(request):
    config = SD_LAYOUT if request.param == "sd" else SMALL_LAYOUT
    return config, diffusers_taesd(config, seed=1)


def assert_matches(ours: TAESD, reference: AutoencoderTiny, config: TAESDConfig):
    """decode and encode of ours equal diffusers' within 1e-4, on latents and images of SD's ranges."""
    g = torch.Generator().manual_seed(0)
    latents = 1.5 * torch.randn(2, config.latent_channels, 8, 8, generator=g)  # past the clamp's knee too
    images = torch.rand(2, 3, 8 * config.downsampling_factor, 8 * config.downsampling_factor, generator=g) * 2 - 1
    with torch.no_grad():
        decoded, expected = ours.decode(latents), reference.decode(latents).sample
        encoded, expected_latents = ours.encode(images), reference.encode(images).latents
    assert decoded.shape == expected.shape and encoded.shape == expected_latents.shape
    assert expected.std() > 0.1 and expected_latents.std() > 0.1  # weights that make the comparison count
    assert (decoded - expected).abs().max() < 1e-4
    assert (encoded - expected_latents).abs().max() < 1e-4
    assert torch.equal(ours.images_from_latents(latents), decoded)


def test_published_shapes():
    """The module tree is the published files': madebyollin's README counts 1,222,531 decoder and 1,222,532
    encoder parameters, and the decoder's keys run from 1.weight (after the clamp) to 19.bias."""
    taesd = TAESD()
    assert sum(p.numel() for p in taesd.decoder.parameters()) == 1_222_531
    assert sum(p.numel() for p in taesd.encoder.parameters()) == 1_222_532
    keys = list(taesd.decoder.state_dict())
    assert keys[:3] == ["1.weight", "1.bias", "3.conv.0.weight"] and keys[-1] == "19.bias"
    assert "7.weight" in keys and "7.bias" not in keys  # the conv after an upsample has no bias
    assert SD_LAYOUT.downsampling_factor == 8 and SMALL_LAYOUT.downsampling_factor == 4


def test_diffusers_folder_matches_diffusers(reference, tmp_path):
    config, model = reference
    model.save_pretrained(tmp_path / "taesd")
    ours = load_taesd(tmp_path / "taesd", latent_channels=4, downsampling_factor=config.downsampling_factor)
    assert ours.config == config and ours.name == "taesd"
    assert_matches(ours, model, config)


def test_diffusers_weights_file_alone(reference, tmp_path):
    config, model = reference
    model.save_pretrained(tmp_path / "taesd")
    assert_matches(load_taesd(tmp_path / "taesd" / "diffusion_pytorch_model.safetensors"), model, config)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_madebyollin_pair_matches_diffusers(reference, tmp_path, suffix):
    config, model = reference
    ours = load_taesd(madebyollin_files(model, tmp_path, suffix=suffix), latent_channels=4)
    assert ours.config == config and ours.name == "taesd_decoder"
    assert_matches(ours, model, config)


def test_sdxl_names_and_decoder_alone(tmp_path):
    """taesdxl_decoder finds taesdxl_encoder beside it; a decoder with no encoder beside loads alone and refuses
    to encode, in one line."""
    model = diffusers_taesd(SD_LAYOUT, seed=2)
    decoder = madebyollin_files(model, tmp_path, stem="taesdxl")
    assert load_taesd(decoder).encoder is not None
    (tmp_path / "taesdxl_encoder.safetensors").unlink()
    alone = load_taesd(decoder)
    assert alone.encoder is None and alone.config.encoder_blocks is None
    with torch.no_grad():
        assert torch.allclose(alone.decode(torch.zeros(1, 4, 4, 4)), model.decode(torch.zeros(1, 4, 4, 4)).sample,
                              atol=1e-4)
    with pytest.raises(ValueError, match="has no encoder"):
        alone.encode(torch.zeros(1, 3, 32, 32))


def test_own_file_round_trip(tmp_path):
    """save_taesd writes our keys and the config in the metadata; load_taesd reads both back."""
    taesd = randomize(TAESD(TAESDConfig(width=8, decoder_blocks=(1, 1, 1), encoder_blocks=None)), seed=3)
    save_taesd(tmp_path / "tiny_taesd.safetensors", taesd)
    back = load_taesd(tmp_path / "tiny_taesd.safetensors", latent_channels=4, downsampling_factor=4)
    assert back.config == taesd.config and back.name == "tiny_taesd"
    for key, value in taesd.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)


def test_shipped_tiny_taesd_draws_what_the_vae_draws():
    """weights/tiny_taesd.safetensors decodes the tiny model's latents (4 channels at 1/4) to within 28 dB of its
    VAE's pictures, on pictures of a seed neither trained on (measured: 33.5 dB; train_taesd.py's held-out
    pictures 33.4 dB)."""
    model = load_checkpoint()
    taesd = load_taesd(OUTPUT, latent_channels=model.vae.config.latent_channels,
                       downsampling_factor=model.vae.config.downsampling_factor)
    assert taesd.encoder is None and taesd.config.downsampling_factor == 4
    latents = picture_latents(model, 32, seed=2024)
    with torch.no_grad():
        assert psnr(taesd.decode(latents), teacher(model, latents)) > 28


# --------------------------------------------------------------------------------------------------
# One-line errors


def one_line_error(path, match: str, **kwargs) -> str:
    with pytest.raises(CheckpointError, match=match) as error:
        load_taesd(path, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return madebyollin_files(diffusers_taesd(SMALL_LAYOUT, seed=4), tmp_path_factory.mktemp("pair"))


def test_missing_and_unexpected_tensors_named(pair, tmp_path):
    tensors = load_file(pair)
    del tensors["3.conv.2.weight"]
    tensors["99.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "taesd_decoder.safetensors"))
    message = one_line_error(tmp_path / "taesd_decoder.safetensors", "does not match the madebyollin TAESD layout")
    assert "1 missing (decoder.3.conv.2.weight)" in message and "1 unexpected (decoder.99.weight)" in message


def test_wrong_latent_channels_refused(tmp_path):
    """SD3's and Flux's TAESDs (taesd3, taef1) work on 16 channels: both counts are named."""
    wide = diffusers_taesd(TAESDConfig(latent_channels=16, width=8, decoder_blocks=(1, 1), encoder_blocks=(1, 1)), 5)
    decoder = madebyollin_files(wide, tmp_path, stem="taef1")
    message = one_line_error(decoder, "16-channel latents", latent_channels=4)
    assert "have 4 channels" in message
    wide.save_pretrained(tmp_path / "taef1")
    one_line_error(tmp_path / "taef1", "16-channel latents and this model's latents have 4 channels", latent_channels=4)


def test_wrong_downsampling_refused(pair):
    one_line_error(pair, "at 1/4 of the image size and this model's are at 1/8", downsampling_factor=8)


def test_not_a_taesd(pair, tmp_path):
    one_line_error(tmp_path / "nothing.safetensors", "TAESD not found")
    one_line_error(pair.with_name("taesd_encoder.safetensors"), "is a TAESD encoder; give its decoder")
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    vae.save_pretrained(tmp_path / "vae")
    one_line_error(tmp_path / "vae", "not an AutoencoderTiny folder .*'AutoencoderKL'")
    one_line_error(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", "not a TAESD: it looks like a full VAE")
    model = diffusers_taesd(SMALL_LAYOUT, seed=6)
    model.register_to_config(scaling_factor=0.5)
    model.save_pretrained(tmp_path / "rescaled")
    one_line_error(tmp_path / "rescaled", "rescales its latents")
