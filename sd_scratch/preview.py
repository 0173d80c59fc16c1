"""Cheap pictures of the latents along the way: a linear map from latent channels to RGB.

A full VAE decode of a 512x512 picture takes about 13 s on a 2-core CPU, longer than a step, so looking
inside the loop with it is slow. But SD's latent channels are not arbitrary: the VAE learned to keep
colour in them almost linearly, so a fixed 4x3 matrix and a bias, applied to each latent pixel, already
show the picture's colours and layout at 1/8 of its size (AUTOMATIC1111's "Approx cheap" preview).

    rgb[c] = bias[c] + sum_k latents[k] * matrix[k][c]        (latents as the UNet sees them, scaled)

The numbers are fitted by least squares: decode many latents with the model's own VAE, average each
decoded picture over the f x f pixels of every latent pixel (f: the VAE's downsampling factor), and solve
for the matrix and bias that map the latents onto those colours best (`fit_latent_to_rgb`). R^2, the share
of the decoded colours' variance the map explains, says how good a preview it makes.

The models' numbers:
    tiny model   fitted here, on its VAE, from 300 of its training pictures (R^2 0.73 on 100 others: its
                 VAE, 4 times smaller than SD's, packs colour less linearly)
    SD 1.x/2.x   AUTOMATIC1111's, from a Hugging Face forum post (discuss.huggingface.co, "Decoding latents
                 to RGB without upscaling", 2022): no bias (SD's VAE has none to speak of)
    SDXL         AUTOMATIC1111's for SDXL's VAE, with its bias
Anyone with the real weights can refit with `fit_latent_to_rgb(model.vae, latents)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LatentToRGB:
    """A linear map from the latent channels to RGB in [-1, 1], as the VAE decodes: matrix[k][c], bias[c]."""

    matrix: tuple[tuple[float, float, float], ...]  # one row per latent channel
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __call__(self, latents: torch.Tensor, factor: int = 1) -> torch.Tensor:
        """(B, C, h, w) latents as the UNet sees them -> (B, 3, h f, w f) images in [0, 1], each latent pixel
        drawn as an f x f block (nearest neighbour: the map has no finer detail to give)."""
        rgb = (self.linear(latents) / 2 + 0.5).clamp(0, 1)
        if factor > 1:  # last: the arithmetic above then touches h w pixels, not h w f^2 (0.35 ms at 512x512, not 8)
            rgb = F.interpolate(rgb, scale_factor=factor, mode="nearest")
        return rgb


    def linear(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, h, w) on the VAE's [-1, 1] scale, not clamped."""
        matrix = torch.tensor(self.matrix, dtype=torch.float32, device=latents.device)
        bias = torch.tensor(self.bias, dtype=torch.float32, device=latents.device)
        return torch.einsum("bkhw,kc->bchw", latents.float(), matrix) + bias[:, None, None]


# fit_latent_to_rgb(tiny model's VAE, latents of make_dataset(300, seed=101)): tests/test_preview.py refits it
TINY_LATENT_TO_RGB = LatentToRGB(((1.2015, 0.4256, -0.3592), (2.4939, 0.1939, -0.7683), (-0.4549, -0.3328, 0.3841),
                                  (0.2087, 0.1173, -1.9634)), (-0.3166, -0.0618, -0.5918))
SD_LATENT_TO_RGB = LatentToRGB(((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264),
                                (-0.184, -0.271, -0.473)))
SDXL_LATENT_TO_RGB = LatentToRGB(((0.4543, 0.5008, 0.5294), (-0.2868, 0.0952, 0.1625), (0.1566, 0.2155, -0.0624),
                                  (-0.4748, -0.3268, -0.3793)), (0.1375, 0.0144, -0.0675))


def fit_latent_to_rgb(vae, latents: torch.Tensor) -> tuple[LatentToRGB, float]:
    """Least squares fit of LatentToRGB to `vae`'s decodes of `latents` (N, C, h, w, scaled as the UNet sees
    them); also R^2 of the fit on these latents."""
    with torch.no_grad():
        decoded = vae.images_from_latents(latents.to(vae.post_quant_conv.weight.dtype)).float().clamp(-1, 1)
    factor = vae.config.downsampling_factor
    colours = F.avg_pool2d(decoded, factor)  # the mean colour of each latent pixel's f x f block
    x = latents.float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = colours.permute(0, 2, 3, 1).reshape(-1, 3)
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()  # the last column: the bias
    solution = torch.linalg.lstsq(design, y.double()).solution.float()  # (C + 1, 3)
    fit = LatentToRGB(tuple(tuple(row) for row in solution[:-1].tolist()), tuple(solution[-1].tolist()))
    return fit, r_squared(fit, latents, colours)


def r_squared(fit: LatentToRGB, latents: torch.Tensor, colours: torch.Tensor) -> float:
    """1 - (residual sum of squares) / (total sum of squares about each channel's mean) of `fit` against the
    colours (N, 3, h, w, in [-1, 1], one per latent pixel)."""
    predicted = fit.linear(latents)
    residual = ((colours - predicted) ** 2).sum()
    total = ((colours - colours.mean(dim=(0, 2, 3), keepdim=True)) ** 2).sum()
    return float(1 - residual / total)


def latent_to_rgb_for(model) -> LatentToRGB:
    """The model family's map: SDXL's, the tiny model's (its VAE shrinks 4 times, SD's 8), or SD 1.x/2.x's."""
    if model.is_sdxl:
        return SDXL_LATENT_TO_RGB
    return TINY_LATENT_TO_RGB if model.vae.config.downsampling_factor == 4 else SD_LATENT_TO_RGB
