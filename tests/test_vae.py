"""sd_scratch.vae against diffusers' AutoencoderKL, with the same random weights.

Our weights reach diffusers through diffusers' own converter for original single-file checkpoints
(`convert_ldm_vae_checkpoint`). That the converter uses every one of our tensors and fills every one
of diffusers' parameters is the independent proof that our module tree is the CompVis layout.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL

from sd_scratch.loading.configs import infer_vae_config
from sd_scratch.vae import VAE, Upsample, VAEConfig
from small_models import randomize
from twins import vae_twin

SMALL = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=2, norm_groups=8)
# Three levels with the same width at the two deepest: a decoder that ran up.{i} in the wrong order
# would still have matching shapes, so only the numbers can catch it. Also a non-SD latent width.
SMALL_3_LEVELS = VAEConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4, latent_channels=3)


def to_diffusers(ours: VAE) -> AutoencoderKL:
    """diffusers' AutoencoderKL carrying our weights, mapped by diffusers' own single-file converter
    (which must use every one of our tensors once and fill every one of its parameters)."""
    return vae_twin({"first_stage_model." + k: v for k, v in ours.state_dict().items()}, ours.config)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("config", [SMALL, SMALL_3_LEVELS], ids=["2-levels", "3-levels"])
@torch.no_grad()
def test_encode_and_decode_match_diffusers(config):
    ours = randomize(VAE(config), seed=0)
    reference = to_diffusers(ours)
    factor = 2 ** (len(config.channel_mult) - 1)
    assert config.downsampling_factor == factor
    images = torch.rand(2, 3, 12 * factor, 20 * factor, generator=torch.Generator().manual_seed(1)) * 2 - 1

    mean, logvar = ours.encode(images)
    posterior = reference.encode(images).latent_dist
    assert mean.shape == (2, config.latent_channels, 12, 20)
    assert 0.1 < mean.std() < 10 and 0.1 < logvar.std() < 10  # the comparison below is not of near-zeros
    assert max_abs_diff(mean, posterior.mean) <= 1e-4
    assert max_abs_diff(logvar, posterior.logvar) <= 1e-4

    z = torch.randn(2, config.latent_channels, 12, 20, generator=torch.Generator().manual_seed(2))
    decoded = ours.decode(z)
    assert decoded.shape == images.shape
    assert 0.1 < decoded.std() < 10
    assert max_abs_diff(decoded, reference.decode(z).sample) <= 1e-4


@torch.no_grad()
def test_scaling_factor_helpers_match_diffusers_usage():
    """latents = 0.18215 * posterior sample (image-to-image), images = decode(latents / 0.18215) (text-to-image)."""
    ours = randomize(VAE(SMALL), seed=0)
    reference = to_diffusers(ours)
    images = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1

    latents = ours.latents_from_images(images, generator=torch.Generator().manual_seed(4))
    posterior = reference.encode(images).latent_dist
    expected = reference.config.scaling_factor * posterior.sample(generator=torch.Generator().manual_seed(4))
    assert max_abs_diff(latents, expected) <= 1e-4

    assert max_abs_diff(ours.images_from_latents(latents), reference.decode(latents / 0.18215).sample) <= 1e-4


@torch.no_grad()
def test_logvar_is_clamped_like_the_original():
    ours = randomize(VAE(SMALL), seed=0)
    ours.quant_conv.weight.mul_(1000)  # push the log-variance far past [-30, 20]
    reference = to_diffusers(ours)
    images = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    _, logvar = ours.encode(images)
    assert logvar.min() == -30 and logvar.max() == 20
    assert max_abs_diff(logvar, reference.encode(images).latent_dist.logvar) == 0


def test_state_dict_keys_are_the_original_checkpoint_keys():
    keys = set(VAE(SMALL).state_dict())
    for key in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.1.conv2.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",  # the width changes 32 -> 64 here
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.conv_out.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.up.0.block.2.norm1.weight",  # three blocks per decoder level
        "decoder.up.0.block.0.nin_shortcut.weight",  # up.0 runs last: 64 -> 32
        "decoder.up.1.upsample.conv.weight",
        "decoder.norm_out.bias",
    ]:
        assert key in keys, key
    assert "encoder.down.1.downsample.conv.weight" not in keys  # no downsample on the last level
    assert "decoder.up.0.upsample.conv.weight" not in keys  # no upsample at full resolution


def test_infer_vae_config_reads_the_sd_vae_exactly():
    with torch.device("meta"):  # shapes only: the full-size model costs no memory and no init time
        state_dict = VAE(VAEConfig()).state_dict()
    assert infer_vae_config(state_dict) == VAEConfig()


@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        SMALL_3_LEVELS,
        dataclasses.replace(SMALL, in_channels=1, out_channels=2, channel_mult=(1, 1, 3), num_res_blocks=3),
    ],
    ids=["small", "3-levels", "odd-shapes"],
)
def test_infer_vae_config_round_trips(config):
    with torch.device("meta"):
        state_dict = VAE(config).state_dict()
    # The number of groups is in no tensor's shape: it is read as SD's 32, so put the test's back.
    assert dataclasses.replace(infer_vae_config(state_dict), norm_groups=config.norm_groups) == config


@pytest.mark.parametrize(
    "dtype, max_tolerance, rms_tolerance",
    # Measured against float32, outputs of std ~0.5 and up to ~2.4 in size (torch 2.13 CPU, which runs
    # conv, group norm, SDPA and nearest upsampling in both; about 1.7x (fp16) and 1.4x (bf16) slower
    # than fp32 on this CPU, whose cores have no half-precision arithmetic):
    #   float16   max abs 4.3e-3 here, 6.3e-3 at full SD size; RMS error 0.2% of the output's std
    #   bfloat16  max abs 3.3e-2 here, 4.6e-2 at full SD size; RMS error 1.4%
    # as their 10 and 7 mantissa bits allow (bf16 values in [2, 4) are 1/64 apart). Tolerances: ~3x.
    [(torch.float16, 2e-2, 5e-3), (torch.bfloat16, 1e-1, 4e-2)],
    ids=["float16", "bfloat16"],
)
@torch.no_grad()
def test_half_precision_stays_close_to_float32(dtype, max_tolerance, rms_tolerance):
    ours = randomize(VAE(SMALL), seed=0)
    half = randomize(VAE(SMALL), seed=0).to(dtype)
    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(6)) * 2 - 1
    z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(7))

    for ours_out, half_out in [
        (ours.encode(images)[0], half.encode(images.to(dtype))[0]),
        (ours.decode(z), half.decode(z.to(dtype))),
    ]:
        assert half_out.dtype == dtype
        assert max_abs_diff(half_out, ours_out) <= max_tolerance
        assert (half_out.float() - ours_out).pow(2).mean().sqrt() <= rms_tolerance * ours_out.std()


@pytest.mark.slow
@torch.no_grad()
def test_full_size_sd_vae_matches_diffusers():
    config = VAEConfig()  # SD 1.x / 2.x: 83.7M parameters
    ours = randomize(VAE(config), seed=0)
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    reference = to_diffusers(ours)

    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    decoded = ours.decode(z)
    assert decoded.shape == (1, 3, 64, 64)
    assert 0.1 < decoded.std() < 10
    assert max_abs_diff(decoded, reference.decode(z).sample) <= 1e-4

    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(9)) * 2 - 1
    mean, logvar = ours.encode(images)
    posterior = reference.encode(images).latent_dist
    assert mean.shape == (1, 4, 8, 8)
    assert max_abs_diff(mean, posterior.mean) <= 1e-4
    assert max_abs_diff(logvar, posterior.logvar) <= 1e-4


@pytest.mark.parametrize("grad", [False, True])
def test_blocks_add_their_residual_in_place_without_touching_their_input(grad):
    """ResnetBlock and AttnBlock add the residual into their own fresh output (VAE.decode's page faults): the
    input stays as it was, the result is x + f(x) exactly, and gradients still flow (training the tiny VAE)."""
    from sd_scratch.vae import AttnBlock, ResnetBlock

    config = VAEConfig(norm_groups=4)
    x = torch.randn(1, 8, 5, 6, generator=torch.Generator().manual_seed(0))
    for block in (randomize(ResnetBlock(8, 8, config), seed=1), randomize(ResnetBlock(8, 12, config), seed=2),
                  randomize(AttnBlock(8, config), seed=3)):
        inputs = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = block(inputs)
        assert torch.equal(inputs.detach(), x)
        if isinstance(block, AttnBlock):
            h = block.norm(x)
            q, k, v = (t.flatten(2).transpose(1, 2).contiguous().unsqueeze(1) for t in (block.q(h), block.k(h), block.v(h)))
            attended = torch.nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(x.shape)
            expected = x + block.proj_out(attended)
        else:
            silu = torch.nn.functional.silu
            h = block.conv2(silu(block.norm2(block.conv1(silu(block.norm1(x))))))
            expected = block.nin_shortcut(x) + h
        assert torch.equal(out.detach(), expected.detach())
        if grad:
            out.sum().backward()
            assert inputs.grad is not None and inputs.grad.abs().sum() > 0


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_upsample_from_the_small_image_is_the_same_sum(channels_last):
    """vae.Upsample convolves the small image with 2x2 kernels of summed taps, one per kind of output pixel.
    In float64 that is the enlarged image's 3x3 convolution to the last bits, gradients included, for odd
    sizes and a batch; the output keeps the input's memory layout."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    upsample = randomize(Upsample(6), seed=0).double()
    x = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x.to(memory_format=layout).requires_grad_()
    out = upsample(x)
    assert out.shape == (2, 6, 10, 14) and out.is_contiguous(memory_format=layout)
    expected = upsample.convolve_enlarged(x)
    assert expected.abs().mean() > 0.1  # not a comparison of near-zeros
    assert (out - expected).abs().max() <= 1e-13

    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.autograd.grad(out, [x, *upsample.parameters()], upstream)
    expected_grads = torch.autograd.grad(expected, [x, *upsample.parameters()], upstream)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert (grad - expected_grad).abs().max() <= 1e-12 * expected_grad.abs().max()


@torch.no_grad()
def test_upsample_from_the_small_image_rounds_no_worse_in_float32():
    """Fewer products per output (4 x 4 instead of 9 per input channel): against float64, float32's rounding
    error is smaller than the enlarged image's way, in both memory layouts."""
    upsample = randomize(Upsample(64), seed=3)
    x = torch.randn(1, 64, 32, 32, generator=torch.Generator().manual_seed(4))
    exact = upsample.double().convolve_enlarged(x.double())
    upsample.float()
    for layout in (torch.contiguous_format, torch.channels_last):
        inputs = x.to(memory_format=layout)
        ours = (upsample(inputs).double() - exact).pow(2).mean().sqrt()
        original = (upsample.convolve_enlarged(inputs).double() - exact).pow(2).mean().sqrt()
        assert 0 < ours <= original


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_upsample_in_16_bits_makes_the_enlarged_image(dtype):
    """Summed taps would be rounded to 11 (8) bits: in 16-bit formats the upsample is computed as written."""
    upsample = randomize(Upsample(8), seed=5).to(dtype)
    x = torch.randn(1, 8, 6, 9, generator=torch.Generator().manual_seed(6)).to(dtype)
    assert torch.equal(upsample(x), upsample.convolve_enlarged(x))
