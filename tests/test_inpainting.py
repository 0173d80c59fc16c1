"""Inpainting and outpainting: 9-channel inpainting checkpoints and ordinary ones (the kept region put back
after every step), against diffusers' StableDiffusionInpaintPipeline on the same weights; the mask's
preprocessing against diffusers' VaeImageProcessor; the tiny model repainting a square as a circle; the
command line's options and one-line errors."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageDraw

from reference_pipeline import reference_scheduler
from sd_scratch import samplers
from sd_scratch.cli import main
from sd_scratch.images import binarise, extend_for_outpainting, from_pil, mask_from_pil, read_parameters
from sd_scratch.loading import load_checkpoint, save_checkpoint
from sd_scratch.sample import generate
from sd_scratch.tokenizer import PAD_ZERO
from small_models import UNET_SD1, UNET_SD2, randomize, small_sd
from sd_scratch.unet import UNet
from twins import pipeline_components

HEIGHT, WIDTH = 48, 64
PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
STEPS = 6


def picture(seed=5):
    """A blocky random picture, WIDTH x HEIGHT."""
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(HEIGHT // 8, WIDTH // 8, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels).resize((WIDTH, HEIGHT), Image.NEAREST)


def mask_picture(blur_edges=False):
    """White where to repaint: a rectangle and a disc; grey edges (values around 0.5) when asked."""
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    draw = ImageDraw.Draw(mask)
    draw.rectangle([10, 6, 33, 29], fill=255)
    draw.ellipse([40, 20, 60, 44], fill=200)
    if blur_edges:
        draw.rectangle([34, 6, 36, 29], fill=127)  # just under 0.5: kept
        draw.rectangle([37, 6, 38, 29], fill=128)  # just over: repainted
    return mask


def write_model(path, version, channels):
    text_encoder, unet, vae = small_sd(version, seed=3)
    if channels == 9:
        config = dataclasses.replace(UNET_SD1 if version == 1 else UNET_SD2, in_channels=9)
        unet = randomize(UNet(config), seed=4)
    extra = dict(pad_token_id=PAD_ZERO) if version == 2 else {}  # SD 2.x reads the last layer here too: epsilon
    save_checkpoint(path, text_encoder, unet, vae, image_size=64, **extra)


KINDS = {"SD 1.x, 9 channels": (1, 9), "SD 2.x, 9 channels": (2, 9), "SD 1.x, 4 channels": (1, 4)}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Built once for the module, by kind: our model and diffusers' pipeline components on the same weights."""
    built = {}

    def pair(kind):
        if kind not in built:
            built[kind] = build_pair(tmp_path_factory, *KINDS[kind])
        return built[kind]
    return pair


@pytest.fixture(params=list(KINDS))
def pair(request, pairs):
    return pairs(request.param)


@pytest.fixture
def inpainting_pair(pairs):
    return pairs("SD 1.x, 9 channels")


@pytest.fixture
def plain_pair(pairs):
    return pairs("SD 1.x, 4 channels")


def build_pair(tmp_path_factory, version, channels):
    path = tmp_path_factory.mktemp("model") / "inpainting.safetensors"
    write_model(path, version, channels)
    model = load_checkpoint(path)
    return model, pipeline_components(path, model)


def diffusers_inpaint(components, sampler):
    pipe = StableDiffusionInpaintPipeline(**components, scheduler=reference_scheduler(sampler), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_equals_diffusers_inpaint_pipeline(pair, sampler, strength):
    model, components = pair
    image, mask = picture(), mask_picture(blur_edges=True)
    ours = generate(model, PROMPT, NEGATIVE, steps=STEPS, guidance=6.0, sampler=sampler, seed=21,
                    init_image=from_pil(image, WIDTH, HEIGHT), mask=mask_from_pil(mask), strength=strength,
                    progress=False).images
    theirs = diffusers_inpaint(components, sampler)(
        PROMPT, image=image, mask_image=mask, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH,
        strength=strength, num_inference_steps=STEPS, guidance_scale=6.0,
        generator=[torch.Generator().manual_seed(21)], output_type="pt").images
    assert ours.shape == theirs.shape == (1, 3, HEIGHT, WIDTH)
    assert (ours - theirs).abs().max().item() <= 1e-3


def test_the_mask_is_read_as_diffusers_mask_processor_reads_it():
    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True)
    coloured = Image.merge("RGB", [mask_picture(True), mask_picture(False), Image.new("L", (WIDTH, HEIGHT), 90)])
    for mask in [mask_picture(False), mask_picture(True), coloured]:
        theirs = processor.preprocess(mask, height=HEIGHT, width=WIDTH)
        assert torch.equal(binarise(mask_from_pil(mask)), theirs)
    ours = binarise(mask_from_pil(mask_picture(True)))
    assert ours[0, 0, 10, 35].item() == 0 and ours[0, 0, 10, 37].item() == 1  # 127/255 kept, 128/255 repainted
    assert torch.equal(binarise(mask_from_pil(mask_picture(True), invert=True)), 1 - ours)
    # blurring moves the cut at 0.5: a blurred square is cut smaller at its corners
    square = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(square).rectangle([16, 8, 47, 39], fill=255)
    blurred = binarise(mask_from_pil(square, blur=4))
    assert blurred[0, 0, 8, 16].item() == 0 and blurred[0, 0, 24, 32].item() == 1
    assert blurred.sum() < binarise(mask_from_pil(square)).sum()


def test_an_inpainting_unet_sees_the_mask_and_the_holed_picture(inpainting_pair, monkeypatch):
    model, _ = inpainting_pair
    seen, forward = [], model.unet.forward

    def watch(latents, *args):
        seen.append(latents[:, 4:].clone())
        return forward(latents, *args)

    monkeypatch.setattr(model.unet, "forward", watch)
    mask = mask_from_pil(mask_picture())
    generate(model, PROMPT, steps=2, guidance=1.0, seed=1, init_image=from_pil(picture(), WIDTH, HEIGHT),
             mask=mask, progress=False)
    latent_mask = torch.nn.functional.interpolate(binarise(mask), size=(HEIGHT // 8, WIDTH // 8))
    assert torch.equal(seen[0][:, :1], latent_mask) and torch.equal(seen[1], seen[0])


def test_an_ordinary_model_keeps_the_unmasked_latents_exactly(plain_pair, monkeypatch):
    model, _ = plain_pair
    from sd_scratch import sample
    kept = {}
    decode = sample.latents_to_images

    def remember(model_, latents, tiled=False):
        kept["latents"] = latents.clone()
        return decode(model_, latents, tiled)

    monkeypatch.setattr(sample, "latents_to_images", remember)
    init = from_pil(picture(), WIDTH, HEIGHT)
    generate(model, PROMPT, steps=3, guidance=4.0, seed=2, init_image=init, mask=mask_from_pil(mask_picture()),
             progress=False)
    clean = sample.images_to_latents(model, init, [torch.Generator().manual_seed(2)])
    keep = 1 - torch.nn.functional.interpolate(binarise(mask_from_pil(mask_picture())), size=clean.shape[-2:])
    assert torch.equal(kept["latents"] * keep, clean * keep)


def test_every_sampler_inpaints(pair):
    model, _ = pair
    init, mask = from_pil(picture(), WIDTH, HEIGHT), mask_from_pil(mask_picture())
    for sampler in samplers.SAMPLER_NAMES:
        guidance = 0.6 if sampler == "euler_cfgpp" else 4.0
        images = generate(model, PROMPT, steps=3, guidance=guidance, sampler=sampler, seed=3, init_image=init,
                          mask=mask, progress=False).images
        assert torch.isfinite(images).all() and images.shape == (1, 3, HEIGHT, WIDTH), sampler


def test_paste_back_keeps_every_pixel_outside_the_blurred_mask(pair):
    model, _ = pair
    init, soft = from_pil(picture(), WIDTH, HEIGHT), mask_from_pil(mask_picture(), blur=2)
    images = generate(model, PROMPT, steps=2, guidance=4.0, seed=4, init_image=init, mask=soft, paste_back=True,
                      progress=False).images
    original = (init + 1) / 2
    outside = soft == 0
    assert torch.allclose(images[outside.expand_as(images)], original[outside.expand_as(original)], atol=1e-6)
    inside = (soft == 1).expand_as(images)
    assert (images[inside] - original[inside]).abs().max() > 0.05


def test_a_black_mask_returns_the_image_with_a_warning(pair):
    model, _ = pair
    init = from_pil(picture(), WIDTH, HEIGHT)
    with pytest.warns(UserWarning, match="nothing to repaint"):
        result = generate(model, PROMPT, steps=2, init_image=init, mask=torch.zeros(1, 1, HEIGHT, WIDTH),
                          progress=False)
    assert torch.allclose(result.images, (init + 1) / 2)


def test_bad_calls_are_refused(pair):
    model, _ = pair
    init = from_pil(picture(), WIDTH, HEIGHT)
    with pytest.raises(ValueError, match="a mask needs an init image"):
        generate(model, PROMPT, steps=2, mask=torch.ones(1, 1, HEIGHT, WIDTH), height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match="the mask is 32x48 and the image 64x48"):
        generate(model, PROMPT, steps=2, init_image=init, mask=torch.ones(1, 1, 48, 32))



def test_an_inpainting_checkpoint_needs_a_mask(inpainting_pair):
    model, _ = inpainting_pair
    with pytest.raises(ValueError, match="inpainting checkpoint .* give it an init image and a mask"):
        generate(model, PROMPT, steps=2, height=HEIGHT, width=WIDTH)


# --- outpainting


def test_outpainting_extends_the_canvas_with_the_edge_colours_and_masks_the_border():
    image = picture()
    extended, mask = extend_for_outpainting(image, 8, 0, 16, 24)
    assert extended.size == (WIDTH + 24, HEIGHT + 24) and mask.size == extended.size
    e, m, o = np.asarray(extended), np.asarray(mask), np.asarray(image)
    assert np.array_equal(e[:HEIGHT, 8:8 + WIDTH], o) and not m[:HEIGHT, 8:8 + WIDTH].any()
    assert (m[HEIGHT:] == 255).all() and (m[:, :8] == 255).all() and (m[:, 8 + WIDTH:] == 255).all()
    assert np.array_equal(e[:HEIGHT, 0], o[:, 0]) and np.array_equal(e[HEIGHT + 10, 8:8 + WIDTH], o[-1])


# --- the tiny model repaints a square as a circle


def test_the_tiny_model_repaints_the_red_square_as_a_blue_circle():
    """weights/README.md: 50 seeds; the masked box takes a blue circle and the rest stays as it was."""
    from sd_scratch.tiny.evaluate import inpainting_score
    result = inpainting_score(load_checkpoint(), count=50)
    assert result.all_three >= 0.9
    assert result.outside_change <= 2 / 255


# --- the command line


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    write_model(root / "plain.safetensors", 1, 4)
    write_model(root / "inpainting.safetensors", 1, 9)
    picture().save(root / "picture.png")
    mask_picture().save(root / "mask.png")
    Image.new("L", (WIDTH, HEIGHT), 0).save(root / "black.png")
    Image.new("L", (32, 32), 255).save(root / "small.png")
    Image.new("RGBA", (WIDTH, HEIGHT), (255, 255, 255, 128)).save(root / "alpha.png")
    return root


def one_line_error(capsys, expected):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("error: ") and expected in err, err


@pytest.mark.parametrize("checkpoint", ["plain", "inpainting"])
def test_the_command_line_inpaints_and_records_it(files, tmp_path, checkpoint):
    common = ["--checkpoint", str(files / f"{checkpoint}.safetensors"), "--init-image", str(files / "picture.png"),
              "--mask", str(files / "mask.png"), "--steps", "3", "--seed", "8", "--prompt", PROMPT]
    assert main([*common, "--outdir", str(tmp_path / "a")]) == 0
    assert main([*common, "--paste-back", "--mask-blur", "2", "--outdir", str(tmp_path / "b")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "sample-00000.png"), dtype=np.int16) for d in "ab")
    assert a.shape == (HEIGHT, WIDTH, 3)  # the picture's own size
    untouched = mask_from_pil(mask_picture(), blur=2)[0, 0].numpy() == 0  # outside the blurred mask
    assert np.array_equal(b[untouched], np.asarray(picture(), dtype=np.int16)[untouched])
    assert "Denoising strength: 1.0, Paste back: True" in read_parameters(tmp_path / "b" / "sample-00000.png")


def test_the_command_line_outpaints(files, tmp_path):
    assert main(["--checkpoint", str(files / "plain.safetensors"), "--init-image", str(files / "picture.png"),
                 "--outpaint", "0,8,16,0", "--steps", "2", "--outdir", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "sample-00000.png").size == (WIDTH + 16, HEIGHT + 8)


def test_a_black_mask_writes_the_picture_back_with_a_warning(files, tmp_path):
    with pytest.warns(UserWarning, match="nothing to repaint"):
        assert main(["--checkpoint", str(files / "plain.safetensors"), "--init-image", str(files / "picture.png"),
                     "--mask", str(files / "black.png"), "--outdir", str(tmp_path)]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sample-00000.png")), np.asarray(picture()))


@pytest.mark.parametrize("arguments, expected", [
    (["--mask", "{mask}"], "--mask needs --init-image"),
    (["--init-image", "{picture}", "--mask", "{small}"], "is 32x32 and the init image 64x48"),
    (["--init-image", "{picture}", "--mask", "{alpha}"], "has an alpha channel"),
    (["--init-image", "{picture}", "--mask", "{picture}.missing"], "cannot read mask"),
    (["--init-image", "{picture}", "--outpaint", "0,4,0,0"], "multiples of 8"),
    (["--init-image", "{picture}", "--outpaint", "0,-8,0,0"], "multiples of 8, not negative"),
    (["--init-image", "{picture}", "--outpaint", "8,8"], "LEFT,TOP,RIGHT,BOTTOM"),
    (["--init-image", "{picture}", "--outpaint", "8,0,0,0", "--mask", "{mask}"], "not both"),
    (["--init-image", "{picture}", "--paste-back"], "--paste-back needs --mask or --outpaint"),
    (["--init-image", "{picture}", "--mask", "{mask}", "--mask-blur", "-1"], "--mask-blur must not be negative"),
])
def test_bad_inpainting_arguments_are_one_line_errors(files, tmp_path, capsys, arguments, expected):
    paths = {"mask": files / "mask.png", "picture": files / "picture.png", "small": files / "small.png",
             "alpha": files / "alpha.png"}
    arguments = [a.format(**paths) for a in arguments]
    assert main(["--checkpoint", str(files / "plain.safetensors"), *arguments, "--outdir", str(tmp_path)]) == 2
    one_line_error(capsys, expected)
    assert not any(tmp_path.iterdir())

