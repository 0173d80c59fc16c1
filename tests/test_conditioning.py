"""The conditioning value the text side hands the loop, and the [uncond, cond] batch of guidance."""

import pytest
import torch

from sd_scratch.conditioning import Conditioning, encode_prompts, guidance_batch
from sd_scratch.loading import load_checkpoint


@pytest.fixture(scope="module")
def tiny_model():
    return load_checkpoint()


def test_encode_prompts_gives_the_text_encoders_output_as_the_context(tiny_model):
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    conditioning = encode_prompts(tiny_model, prompts)
    ids = tiny_model.tokenizer(prompts).input_ids
    assert conditioning.context.shape == (2, 77, tiny_model.text_encoder.config.width)
    assert torch.equal(conditioning.context, tiny_model.text_encoder(ids))
    assert conditioning.vector is None  # SD 1.x/2.x condition on the text alone
    # CLIP skip: one layer fewer is another context; the model's own default (0 here) is the full one.
    assert not torch.allclose(encode_prompts(tiny_model, prompts, skip_last_layers=1).context, conditioning.context)


def test_the_guidance_batch_puts_uncond_first_and_each_half_keeps_its_rows():
    g = torch.Generator().manual_seed(0)
    uncond = Conditioning(torch.randn(2, 154, 8, generator=g), torch.randn(2, 5, generator=g))
    cond = Conditioning(torch.randn(2, 154, 8, generator=g), torch.randn(2, 5, generator=g))
    batch = guidance_batch(uncond, cond)
    assert torch.equal(batch.context, torch.cat([uncond.context, cond.context]))
    assert torch.equal(batch.vector, torch.cat([uncond.vector, cond.vector]))
    assert guidance_batch(Conditioning(uncond.context), Conditioning(cond.context)).vector is None
    half = batch.to(torch.float16)
    assert half.context.dtype == torch.float16 and half.vector.dtype == torch.float16


def test_shapes_the_unet_cannot_take_are_refused():
    with pytest.raises(ValueError, match="a context of 76 tokens: it must be a multiple of 77"):
        Conditioning(torch.zeros(1, 76, 8))
    with pytest.raises(ValueError, match="a vector for 2 images and a context for 1"):
        Conditioning(torch.zeros(1, 77, 8), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="negative prompt's context is \\(154, 8\\) and the prompt's \\(77, 8\\)"):
        guidance_batch(Conditioning(torch.zeros(1, 154, 8)), Conditioning(torch.zeros(1, 77, 8)))
    with pytest.raises(ValueError, match="one half of the guidance batch has a vector"):
        guidance_batch(Conditioning(torch.zeros(1, 77, 8)), Conditioning(torch.zeros(1, 77, 8), torch.zeros(1, 5)))
