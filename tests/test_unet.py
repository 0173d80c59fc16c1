import pytest
import torch

from sd_scratch.unet import UNet, UNetConfig
from twins import unet_twin

SMALL_SD1 = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1),
                       num_heads=4, context_dim=48, norm_groups=8)
SMALL_SD2 = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1),
                       num_heads=None, head_dim=8, context_dim=64, use_linear_projection=True, norm_groups=8)


def random_unet(config: UNetConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    unet = UNet(config).eval()
    return unet


def as_diffusers(unet: UNet, sample_size=16):
    """Our weights -> the original file's keys -> diffusers' own converter -> a strictly loaded diffusers UNet."""
    return unet_twin({"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}, unet.config, sample_size)


@pytest.mark.parametrize("config", [SMALL_SD1, SMALL_SD2], ids=["sd1-layout", "sd2-layout"])
@pytest.mark.parametrize("latent_hw", [(8, 8), (6, 10), (7, 9)])
def test_unet_matches_diffusers(config, latent_hw):
    ours = random_unet(config)
    theirs = as_diffusers(ours)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, *latent_hw, generator=g)
    context = torch.randn(2, 7, config.context_dim, generator=g)
    for t in [999, 500.0, 1]:
        timesteps = torch.tensor([t, t])
        with torch.no_grad():
            expected = theirs(latents, timesteps, encoder_hidden_states=context).sample
            got = ours(latents, timesteps, context)
        assert expected.std() > 0.1, "outputs should be of order 1 for the comparison to mean something"
        assert (got - expected).abs().max() < 1e-4


def test_unet_takes_a_scalar_timestep_for_the_whole_batch():
    ours = random_unet(SMALL_SD1)
    latents = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 7, 48)
    with torch.no_grad():
        assert torch.equal(ours(latents, 10, context), ours(latents, torch.tensor([10, 10]), context))


def test_state_dict_keys_follow_the_original_layout():
    keys = set(UNet(UNetConfig()).state_dict())
    for key in [
        "time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.2.weight", "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.1.1.proj_in.weight",
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight", "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight", "middle_block.1.norm.weight", "middle_block.2.out_layers.3.bias",
        "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.11.1.proj_out.bias",
        "out.0.weight", "out.2.bias",
    ]:
        assert key in keys
    assert len(keys) == 686  # tensors under model.diffusion_model. in v1-5-pruned-emaonly.safetensors


@pytest.mark.slow
def test_full_size_sd15_unet_matches_diffusers():
    ours = random_unet(UNetConfig())
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
    theirs = as_diffusers(ours, sample_size=64)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 16, generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    with torch.no_grad():
        expected = theirs(latents, torch.tensor([981, 981]), encoder_hidden_states=context).sample
        got = ours(latents, torch.tensor([981, 981]), context)
    assert (got - expected).abs().max() < 1e-4


def test_a_unet_without_label_emb_refuses_a_conditioning_vector():
    ours = random_unet(SMALL_SD1)
    with pytest.raises(ValueError, match="no label_emb"):
        ours(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 7, 48), torch.randn(1, 16))
