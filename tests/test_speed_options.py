"""The speed and memory options: each gives the picture it promises, and the default layout change is invisible."""

import json
import os
import resource
import subprocess
import sys

import pytest
import torch

from small_models import VAE_SMALL, randomize
from sd_scratch.memory import glibc_malloc
from sd_scratch.unet import UNet, UNetConfig
from sd_scratch.vae import VAE, decode_tiled, ramp, store_channels_last, tile_starts

UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                  num_heads=4, context_dim=48, norm_groups=8)


@torch.no_grad()
@pytest.mark.parametrize("slices", [2, 3, 7])
def test_attention_slices_give_the_unsliced_result(slices):
    unet = randomize(UNet(UNET), seed=0)
    g = torch.Generator().manual_seed(1)
    latents, context = torch.randn(2, 4, 12, 10, generator=g), torch.randn(2, 7, 48, generator=g)
    unsliced = unet(latents, 500, context)
    unet.set_attention_slices(slices)  # 3 and 7 do not divide the 120 or 30 tokens: uneven slices
    sliced = unet(latents, 500, context)
    assert unsliced.std() > 0.1
    assert (sliced - unsliced).abs().max() <= 1e-5


def test_attention_slices_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        UNet(UNET).set_attention_slices(0)


@torch.no_grad()
def test_channels_last_weights_keep_values_and_state_dict():
    vae = randomize(VAE(VAE_SMALL), seed=0)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    z = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(2))
    decoded = vae.decoder(vae.post_quant_conv(z))  # contiguous weights and activations
    store_channels_last(vae)
    after = vae.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    conv = vae.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert (vae.decode(z) - decoded).abs().max() <= 1e-5  # the same numbers, summed in another order


# --------------------------------------------------------------------------------------------------
# Tiled decoding

def rows_and_columns_jump(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean |difference| between neighbouring rows (and columns) of an image, one value per boundary."""
    return ((image[..., 1:, :] - image[..., :-1, :]).abs().mean(dim=(0, 1, 3)),
            (image[..., :, 1:] - image[..., :, :-1]).abs().mean(dim=(0, 1, 2)))


def seam_score(tiled: torch.Tensor, untiled: torch.Tensor) -> float:
    """How much the tiling error jumps from one row (column) to the next, at its worst, relative to the
    typical jump. A seam is a row or column where the error of one tile gives way to another's at once."""
    rows, columns = rows_and_columns_jump(tiled - untiled)
    jumps = torch.cat([rows, columns])
    return (jumps.max() / jumps.median()).item()


def test_tiles_cover_the_side_with_the_overlap_asked_for():
    assert tile_starts(40, 16, 4) == [0, 12, 24]
    assert tile_starts(16, 16, 4) == [0] and tile_starts(10, 16, 4) == [0]
    for size in range(17, 200):
        starts = tile_starts(size, 16, 4)
        assert starts[0] == 0 and starts[-1] == size - 16
        assert all(16 - (b - a) >= 4 for a, b in zip(starts, starts[1:]))
    assert ramp(6, True, False, 2).tolist() == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])
    assert ramp(6, False, True, 2).tolist() == pytest.approx([1, 1, 1, 1, 2 / 3, 1 / 3])


@torch.no_grad()
def test_tiles_are_blended_exactly_where_the_decoder_is_local():
    """With a decoder in which every pixel depends on its own latent only, each tile decodes to exactly
    its crop of the whole: whatever the tiles and cross-fades, the tiled decode must equal the plain one."""
    vae = VAE(VAE_SMALL)

    def local_decode(z):  # 8 x 8 pixels per latent, as the VAE's three upsamplings
        return torch.nn.functional.interpolate(torch.tanh(2 * z[:, :3] - z[:, 3:]), scale_factor=8, mode="nearest")

    vae.decode = local_decode
    z = torch.randn(2, 4, 41, 30, generator=torch.Generator().manual_seed(1))
    for tile, overlap in [(16, 4), (16, 8), (12, 0), (20, 3)]:
        assert torch.allclose(decode_tiled(vae, z, tile, overlap), local_decode(z), atol=1e-6)


@torch.no_grad()
def test_tiled_decode_is_close_to_untiled_without_seams():
    vae = randomize(VAE(VAE_SMALL), seed=0)
    z = torch.randn(1, 4, 56, 48, generator=torch.Generator().manual_seed(2))  # 3 x 3 tiles, non-square
    untiled = vae.decode(z)
    tiled = decode_tiled(vae, z, tile=24, overlap=8)
    assert tiled.shape == untiled.shape == (1, 3, 448, 384)
    error = (tiled - untiled).abs()
    # Tiles differ from the whole: near its edges a tile's convolutions see zero padding, and the middle
    # block's attention covers one tile, not the image. This random network is far less local than a
    # trained VAE (the benchmark's full-size one differs by less), hence the loose bound.
    assert untiled.std() > 0.3
    assert error.mean() <= 0.12 * untiled.std()
    # No seams: the error changes from row to row about as smoothly at the tile boundaries as elsewhere.
    # The same tiles put side by side without cross-fading (ramp width 0, overlaps averaged) show seams.
    blended, hard = seam_score(tiled, untiled), seam_score(decode_tiled(vae, z, tile=24, overlap=0), untiled)
    assert blended <= 2.5
    assert hard > 2 * blended


@torch.no_grad()
def test_tiled_decode_of_a_single_tile_is_the_plain_decode():
    vae = randomize(VAE(VAE_SMALL), seed=0)
    z = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(decode_tiled(vae, z, tile=16, overlap=4), vae.decode(z), atol=1e-6)


def test_tiled_decode_refuses_an_overlap_over_half_a_tile():
    with pytest.raises(ValueError, match="overlap"):
        decode_tiled(VAE(VAE_SMALL), torch.zeros(1, 4, 32, 32), tile=16, overlap=9)


# --------------------------------------------------------------------------------------------------
# Through generate and the command line


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    from small_models import small_sd
    from sd_scratch.loading import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "small_sd.safetensors"
    save_checkpoint(path, *small_sd(1, seed=7), image_size=64)
    return path


def test_generate_with_slices_and_tiles_gives_the_same_images(small_checkpoint):
    from sd_scratch.loading import load_checkpoint
    from sd_scratch.sample import SpeedAndMemory, generate

    model = load_checkpoint(small_checkpoint)
    settings = dict(steps=3, seed=5, height=48, width=64, progress=False)
    plain = generate(model, ["a red circle", "a blue square"], **settings).images
    # 6 x 8 latents fit in one tile: the tiled decode is the plain one here (see the tests above for more tiles).
    options = generate(model, ["a red circle", "a blue square"], speed=SpeedAndMemory(attention_slices=3,
                                                                                       tiled_decode=True), **settings)
    assert (options.images - plain).abs().max() <= 1e-5
    assert torch.equal(generate(model, ["a red circle", "a blue square"], **settings).images, plain)  # slicing off


def test_command_line_takes_the_options(small_checkpoint, tmp_path):
    from sd_scratch.cli import main

    assert main(["--checkpoint", str(small_checkpoint), "--steps", "2", "--height", "32", "--width", "32",
                 "--attention-slices", "2", "--tiled-decode", "--outdir", str(tmp_path)]) == 0
    assert (tmp_path / "sample-00000.png").exists()
    assert main(["--attention-slices", "0", "--outdir", str(tmp_path)]) == 2


@pytest.mark.slow
def test_compiled_unet_gives_the_same_images(small_checkpoint):
    from sd_scratch.loading import load_checkpoint
    from sd_scratch.sample import SpeedAndMemory, generate

    model = load_checkpoint(small_checkpoint)
    settings = dict(steps=2, seed=5, height=32, width=32, progress=False)
    plain = generate(model, "a red circle", **settings).images
    compiled = generate(model, "a red circle", speed=SpeedAndMemory(compile_unet=True), **settings).images
    assert (compiled - plain).abs().max() <= 1e-4


# --------------------------------------------------------------------------------------------------
# The loop's freed tensors kept in malloc's heap (memory.freed_tensors_kept)

KEPT_PROBE = r"""
import json, resource, sys
import torch
from sd_scratch.memory import freed_tensors_kept

def faults_of_a_fresh_tensor():
    '''Page faults taken to fill a new 256 MB tensor, freed at once (as the loop's tensors are).'''
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

keep = sys.argv[1] == "keep"
out = {"before": [faults_of_a_fresh_tensor() for _ in range(2)]}
with freed_tensors_kept(torch.device("cpu"), keep=keep):
    out["inside"] = [faults_of_a_fresh_tensor() for _ in range(4)]
    with freed_tensors_kept(torch.device("cpu"), keep=keep):  # a second loop at once (another thread's)
        pass
    out["inside, after the second loop"] = [faults_of_a_fresh_tensor() for _ in range(2)]
    out["resident inside"] = resident()
out["resident after"] = resident()
out["after"] = [faults_of_a_fresh_tensor() for _ in range(2)]
print(json.dumps(out))
"""
PAGES_OF_256_MB = 256 * 2**20 // resource.getpagesize()


def kept_probe(keep: bool, **environment) -> dict:
    """KEPT_PROBE's findings, in a process of its own (its allocator's state is the probe's alone)."""
    out = subprocess.run([sys.executable, "-c", KEPT_PROBE, "keep" if keep else "no"], capture_output=True,
                         text=True, env={**os.environ, **environment}, check=True)
    return json.loads(out.stdout)


glibc_only = pytest.mark.skipif(glibc_malloc() is None, reason="a setting of glibc's malloc")


@glibc_only
def test_freed_tensors_kept_are_reused_without_page_faults_and_handed_back_after():
    probe = kept_probe(keep=True)
    # Outside: each 256 MB tensor is fresh pages from the OS, every one of them faulted in.
    assert min(probe["before"] + probe["after"]) >= 0.9 * PAGES_OF_256_MB
    # Inside: the first one or two come from the heap's new top (a block freed a moment ago can be a few bytes
    # short of the 64-byte aligned one asked for next), then they are reused; a second loop ending leaves it on.
    assert max(probe["inside"][2:] + probe["inside, after the second loop"]) <= 0.01 * PAGES_OF_256_MB
    # Leaving gives back what the heap kept.
    assert probe["resident inside"] - probe["resident after"] >= 0.9 * 256 * 2**20


@glibc_only
@pytest.mark.parametrize("how", ["keep=False", "MALLOC_MMAP_THRESHOLD_ set by the user"])
def test_freed_tensors_kept_does_nothing_when_told_or_when_malloc_was_tuned(how):
    probe = (kept_probe(keep=False) if how == "keep=False"
             else kept_probe(keep=True, MALLOC_MMAP_THRESHOLD_=str(128 * 1024)))
    assert min(probe["inside"] + probe["inside, after the second loop"]) >= 0.9 * PAGES_OF_256_MB


def test_keeping_freed_tensors_computes_the_same_images(small_checkpoint):
    from sd_scratch.loading import load_checkpoint
    from sd_scratch.sample import SpeedAndMemory, generate

    model = load_checkpoint(small_checkpoint)
    settings = dict(steps=3, seed=5, height=32, width=48, progress=False)
    kept = generate(model, ["a red circle", "a blue square"], **settings).images  # kept: the default
    not_kept = generate(model, ["a red circle", "a blue square"], speed=SpeedAndMemory(keep_freed_tensors=False),
                        **settings).images
    assert kept.std() > 0.05
    assert torch.equal(kept, not_kept)
