"""SDXL against diffusers and transformers on the same weights (issue 18's "What must hold").

A small random SDXL-shaped base (CLIP ViT-L-like and bigG-like text encoders, the second with a projection that is
not square; no attention at the first level, transformer depth 2 and 3 at the others and 3 in the middle) and
refiner (bigG alone, the aesthetic score in its vector), written in the original single-file layout. The
reference networks get our tensors through diffusers' own single-file converters, so the reading of that layout
is checked independently of ours. Then each network, the conditioning vector, the whole text-to-image run, the
base + refiner ensemble, the diffusers-folder and fp16 layouts, the Turbo models' trailing timesteps and the
fp16 VAE's NaN retry. All float32 on the CPU; pictures compared on the [0, 1] scale.
"""

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from safetensors.torch import load_file, save_file

from reference_pipeline import SD15, reference_scheduler
from sd_scratch import samplers
from sd_scratch.conditioning import SizeConditioning, size_vector
from sd_scratch.loading import load_checkpoint
from sd_scratch.loading.single_file import (REFINER_OPENCLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX,
                                            UNET_PREFIX, VAE_PREFIX)
from sd_scratch.sample import generate, latents_to_images
from small_models import sdxl_single_file_tensors, small_sdxl
from twins import diffusers_unet_config, diffusers_vae_config, sdxl_pipeline_components, transformers_clip_config

PROMPTS = ["a red circle on a blue background", "a photograph of an astronaut riding a horse"]
NEGATIVE = "blurry, low quality"
HEIGHT, WIDTH = 64, 96  # non-square (8 x 12 latents): a swapped (height, width) in the size conditioning would show
STEPS = 4
# The refiner's UNet downsamples three times: 8 x 8 latents. Switch 0.8 of 10 steps: the base takes the 8 steps at
# t >= 200, the refiner the last 2.
REFINER_SIZE, REFINER_STEPS = 64, 10
GUIDANCE = 5.0
SAMPLERS = ["euler", "euler_a", "dpmpp_2m"]
END = 49407  # CLIP's end-of-text token


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def written(root, name, refiner, seed):
    """A small SDXL base or refiner in the original single-file layout, our loading of it, and diffusers'
    pipeline components holding the same tensors (through diffusers' converters)."""
    networks = small_sdxl(seed=seed, refiner=refiner)
    tensors = sdxl_single_file_tensors(*networks)
    path = root / f"{name}.safetensors"
    save_file(tensors, str(path))
    model = load_checkpoint(path)
    return SimpleNamespace(path=path, tensors=load_file(str(path)), model=model,
                           components=sdxl_pipeline_components(load_file(str(path)), model))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return written(tmp_path_factory.mktemp("sdxl"), "sdxl_small", refiner=False, seed=0)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    return written(tmp_path_factory.mktemp("sdxl_refiner"), "sdxl_small_refiner", refiner=True, seed=20)


def token_ids(seed=0):
    """Two rows of random tokens, each ended by the end token at its own place and padded with 0 ("!", OpenCLIP's
    padding), so that the pooled output is read at different positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, END - 1, (2, 77), generator=g)
    for row, end in enumerate((6, 31)):
        ids[row, end], ids[row, end + 1:] = END, 0
    return ids


def base_pipeline(components, sampler):
    pipe = StableDiffusionXLPipeline(**components, scheduler=reference_scheduler(sampler), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def refiner_pipeline(components, sampler):
    pipe = StableDiffusionXLImg2ImgPipeline(**components, scheduler=reference_scheduler(sampler),
                                            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                            add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seed, n):
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


# --------------------------------------------------------------------------------------------------
# 1. Each network, and the conditioning vector, against the reference

def test_base_networks_and_vector_equal_diffusers_and_transformers(base):
    model, theirs = base.model, base.components
    assert model.kind == "SDXL" and model.is_sdxl and model.skip_last_layers == 1 and model.image_size == 1024
    assert model.vae.config.scaling_factor == 0.13025 and model.defaults == {"guidance": 5.0}
    ids = token_ids()
    diffs = {}
    with torch.no_grad():
        # CLIP ViT-L: the penultimate layer, no final layer norm (diffusers' hidden_states[-2])
        ours_l = model.text_encoder(ids, skip_last_layers=1, final_layer_norm=False)
        diffs["clip-L penultimate"] = max_diff(ours_l, theirs["text_encoder"](ids, output_hidden_states=True)
                                               .hidden_states[-2])
        # bigG: the penultimate layer, and the pooled output (the last layer at the first end token, projected)
        ours_g, pooled = model.text_encoder_2.encode(ids, 1, final_layer_norm=False, pooled=True)
        out_g = theirs["text_encoder_2"](ids, output_hidden_states=True)
        diffs["bigG penultimate"] = max_diff(ours_g, out_g.hidden_states[-2])
        diffs["bigG pooled"] = max_diff(pooled, out_g.text_embeds)
        assert pooled.shape == out_g.text_embeds.shape == (2, 96)

        # The vector: pooled ++ Fourier features of (orig h, orig w, crop top, crop left, target h, target w), each
        # number distinct so that a swap would show; diffusers makes the same from text_embeds and time_ids.
        sizes = SizeConditioning(original_size=(96, 160), target_size=(64, 128), crop=(8, 24))
        vector = size_vector(model, pooled, sizes)
        time_ids = torch.tensor([[96.0, 160, 8, 24, 64, 128]] * 2)
        unet = theirs["unet"]
        their_vector = torch.cat([out_g.text_embeds, unet.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=1)
        diffs["vector"] = max_diff(vector, their_vector)
        diffs["label_emb vs add_embedding"] = max_diff(model.unet.label_emb(vector), unet.add_embedding(their_vector))

        # The UNet with the vector, against diffusers' with added_cond_kwargs
        g = torch.Generator().manual_seed(1)
        latents, context = torch.randn(2, 4, 8, 16, generator=g), torch.cat([ours_l, ours_g], dim=-1)
        for t in (999, 321):
            ours = model.unet(latents, t, context, vector)
            reference = unet(latents, t, encoder_hidden_states=context,
                             added_cond_kwargs=dict(text_embeds=out_g.text_embeds, time_ids=time_ids)).sample
            diffs[f"unet t={t}"] = max_diff(ours, reference)

        # The VAE, both ways
        vae = theirs["vae"]
        diffs["vae decode"] = max_diff(model.vae.decode(latents), vae.decode(latents).sample)
        images = torch.rand(2, 3, 48, 80, generator=g) * 2 - 1
        diffs["vae encode"] = max_diff(model.vae.encode(images)[0], vae.encode(images).latent_dist.mean)
    print("base, max abs differences:", diffs)
    assert max(diffs.values()) <= 1e-4, diffs


def test_refiner_networks_and_vector_equal_diffusers_and_transformers(refiner):
    """The refiner's layout: bigG alone under conditioner.embedders.0.model., its vector carrying the aesthetic
    score in the target size's place (diffusers: requires_aesthetics_score)."""
    model, theirs = refiner.model, refiner.components
    assert model.kind == "SDXL refiner" and model.text_encoder is None and model.tokenizer is None
    assert model.unet.config.adm_in_channels == 96 + 5 * 256 and model.unet.config.context_dim == 128
    ids = token_ids(seed=4)
    diffs = {}
    with torch.no_grad():
        ours_g, pooled = model.text_encoder_2.encode(ids, 1, final_layer_norm=False, pooled=True)
        out_g = theirs["text_encoder_2"](ids, output_hidden_states=True)
        diffs["bigG penultimate"] = max_diff(ours_g, out_g.hidden_states[-2])
        diffs["bigG pooled"] = max_diff(pooled, out_g.text_embeds)
        sizes = SizeConditioning(original_size=(96, 160), target_size=(64, 128), crop=(8, 24), aesthetic_score=7.5,
                                 negative_aesthetic_score=1.5)
        unet = theirs["unet"]
        for negative, score in [(False, 7.5), (True, 1.5)]:
            vector = size_vector(model, pooled, sizes, negative=negative)
            time_ids = torch.tensor([[96.0, 160, 8, 24, score]] * 2)
            their_vector = torch.cat([out_g.text_embeds, unet.add_time_proj(time_ids.flatten()).reshape(2, -1)], 1)
            diffs[f"vector (negative={negative})"] = max_diff(vector, their_vector)
            latents = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(2))
            ours = model.unet(latents, 450, ours_g, vector)
            reference = unet(latents, 450, encoder_hidden_states=ours_g,
                             added_cond_kwargs=dict(text_embeds=out_g.text_embeds, time_ids=time_ids)).sample
            diffs[f"unet (negative={negative})"] = max_diff(ours, reference)
        diffs["vae decode"] = max_diff(model.vae.decode(latents), theirs["vae"].decode(latents).sample)
    print("refiner, max abs differences:", diffs)
    assert max(diffs.values()) <= 1e-4, diffs


# --------------------------------------------------------------------------------------------------
# 2. The single-file layout, read by diffusers' converters alone

@pytest.mark.parametrize("which", ["base", "refiner"])
def test_diffusers_converters_use_every_tensor_of_our_file_and_fill_every_parameter(base, refiner, which):
    found = base if which == "base" else refiner
    tensors, model = found.tensors, found.model
    under = lambda prefix: {k: v for k, v in tensors.items() if k.startswith(prefix)}
    used = set()

    def check(name, converted, mine, reference):
        """Every tensor of `mine` is one of `converted`'s (by storage: the converters hand our tensors on), and
        `converted` fills every parameter of `reference` (loaded strictly)."""
        pointers = {t.data_ptr() for t in converted.values()}
        assert all(t.data_ptr() in pointers for t in mine.values()), f"{name}: tensors of our file left unused"
        assert set(converted) == set(reference.state_dict()), f"{name}: parameters left unfilled"
        reference.load_state_dict(converted, strict=True)
        used.update(mine)

    unet_config = diffusers_unet_config(model.unet.config, 8)
    converted = convert_ldm_unet_checkpoint(tensors, unet_config)
    assert len(converted) == len(under(UNET_PREFIX))
    check("UNet", converted, under(UNET_PREFIX), UNet2DConditionModel(**unet_config))
    assert any(k.startswith("add_embedding.") for k in converted)  # SDXL's label_emb reached diffusers' name

    vae_config = diffusers_vae_config(model.vae.config)
    check("VAE", convert_ldm_vae_checkpoint(tensors, vae_config), under(VAE_PREFIX), AutoencoderKL(**vae_config))

    if which == "base":
        from transformers import CLIPTextModel
        clip = CLIPTextModel(transformers_clip_config(model.text_encoder.config))
        converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(tensors).items()}
        assert len(converted) == len(under(SDXL_CLIP_PREFIX)) == len(clip.state_dict())
        check("CLIP ViT-L", converted, under(SDXL_CLIP_PREFIX), clip)

    # OpenCLIP bigG: the fused q, k, v are cut in three (new tensors), so count; logit_scale is CLIP's
    # contrastive temperature, which neither diffusers nor we read.
    from transformers import CLIPTextModelWithProjection
    prefix = SDXL_OPENCLIP_PREFIX if which == "base" else REFINER_OPENCLIP_PREFIX
    config = transformers_clip_config(model.text_encoder_2.config)
    config.projection_dim = model.text_encoder_2.config.projection_dim
    bigg = CLIPTextModelWithProjection(config)
    converted = convert_open_clip_checkpoint(bigg, tensors, prefix=prefix)
    mine = under(prefix)
    layers = model.text_encoder_2.config.layers
    assert len(converted) == (len(mine) - 1) - 2 * layers + 6 * layers  # in_proj weight and bias -> q, k, v each
    assert set(converted) == set(bigg.state_dict())
    bigg.load_state_dict(converted, strict=True)
    torch.testing.assert_close(bigg.text_projection.weight, mine[prefix + "text_projection"].t(), rtol=0, atol=0)
    used.update(k for k in mine if not k.endswith("logit_scale"))

    assert set(tensors) - used == {prefix + "logit_scale"}, "tensors of our file no converter reads"


# --------------------------------------------------------------------------------------------------
# 3. Text to image against StableDiffusionXLPipeline

@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("negative", ["", NEGATIVE], ids=["empty negative (zeros)", "negative prompt"])
def test_text_to_image_equals_diffusers_sdxl_pipeline(base, sampler, negative):
    prompts = PROMPTS if not negative else PROMPTS[:1]  # two images (a generator each) once per sampler
    ours = generate(base.model, prompts, negative, steps=STEPS, guidance=GUIDANCE, sampler=sampler, seed=7,
                    height=HEIGHT, width=WIDTH, progress=False).images
    # The base's empty negative prompt is zeros in diffusers only when it is None (force_zeros_for_empty_prompt)
    theirs = base_pipeline(base.components, sampler)(
        prompts, negative_prompt=[negative] * len(prompts) if negative else None, num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, height=HEIGHT, width=WIDTH, generator=generators(7, len(prompts)),
        output_type="pt").images
    assert ours.shape == theirs.shape == (len(prompts), 3, HEIGHT, WIDTH)
    assert theirs.std() > 0.02, "random weights should still give images with some structure"
    diff = max_diff(ours, theirs)
    print(f"text to image, {sampler}, negative {negative!r}: {diff:.2e}")
    assert diff <= 1e-3


def test_size_conditioning_reaches_the_unet_as_diffusers_time_ids(base):
    """Sizes other than the default: diffusers' original_size, crops_coords_top_left and target_size (its negative
    half gets the same, as diffusers' negative_* default to them)."""
    sizes = SizeConditioning(original_size=(1024, 768), target_size=(512, 640), crop=(16, 48))
    ours = generate(base.model, PROMPTS[:1], NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler="euler", seed=2,
                    height=HEIGHT, width=WIDTH, sizes=sizes, progress=False).images
    theirs = base_pipeline(base.components, "euler")(
        PROMPTS[:1], negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=HEIGHT,
        width=WIDTH, original_size=(1024, 768), crops_coords_top_left=(16, 48), target_size=(512, 640),
        generator=generators(2, 1), output_type="pt").images
    default = generate(base.model, PROMPTS[:1], NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler="euler", seed=2,
                       height=HEIGHT, width=WIDTH, progress=False).images
    assert max_diff(default, theirs) > 1e-2, "the sizes should change the picture"
    diff = max_diff(ours, theirs)
    print(f"text to image with explicit sizes: {diff:.2e}")
    assert diff <= 1e-3


# --------------------------------------------------------------------------------------------------
# 4. Base + refiner against the base pipeline (denoising_end) then the img2img pipeline (denoising_start)

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_base_then_refiner_equals_diffusers_ensemble_of_experts(base, refiner, sampler):
    size = REFINER_SIZE
    prompts = PROMPTS if sampler == "euler_a" else PROMPTS[:1]  # two images where the refiner draws noise
    ours = generate(base.model, prompts, "", steps=REFINER_STEPS, guidance=GUIDANCE, sampler=sampler, seed=3,
                    height=size, width=size, refiner=refiner.model, refiner_switch=0.8, progress=False).images
    gens = generators(3, len(prompts))  # one generator per image, continued by the refiner (euler_a's noise)
    latents = base_pipeline(base.components, sampler)(
        prompts, num_inference_steps=REFINER_STEPS, denoising_end=0.8, guidance_scale=GUIDANCE, height=size,
        width=size, generator=gens, output_type="latent").images
    theirs = refiner_pipeline(refiner.components, sampler)(
        prompts, image=latents, num_inference_steps=REFINER_STEPS, denoising_start=0.8, guidance_scale=GUIDANCE,
        generator=gens, output_type="pt").images
    assert ours.shape == theirs.shape == (len(prompts), 3, size, size)
    assert theirs.std() > 0.02
    # the split is not trivial: each expert takes several steps
    base_plan, refiner_plan = samplers.split_plan(samplers.make_plan(sampler, REFINER_STEPS), 0.8)
    assert len(base_plan.timesteps) == 8 and len(refiner_plan.timesteps) == 2
    diff = max_diff(ours, theirs)
    print(f"base + refiner, {sampler}: {diff:.2e}")
    assert diff <= 1e-3


# --------------------------------------------------------------------------------------------------
# 5. Other layouts: a diffusers folder, an fp16 single file, an fp16 variant folder

def save_folder(components, folder, variant=None):
    """diffusers' own save_pretrained of the pipeline: unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/."""
    pipe = StableDiffusionXLPipeline(**components, scheduler=reference_scheduler("euler"), add_watermarker=False)
    pipe.save_pretrained(folder, variant=variant)
    return folder


def picture(model, sampler="euler_a"):
    return generate(model, PROMPTS[:1], NEGATIVE, steps=2, guidance=GUIDANCE, sampler=sampler, seed=5, height=HEIGHT,
                    width=WIDTH, progress=False).images


def test_diffusers_folder_gives_the_single_files_picture(base, tmp_path):
    folder = save_folder(base.components, tmp_path / "sdxl_folder")
    assert (folder / "text_encoder_2" / "model.safetensors").exists() and (folder / "tokenizer_2").is_dir()
    model = load_checkpoint(folder)
    assert model.kind == "SDXL" and model.skip_last_layers == 1 and model.image_size == 8 * 8
    assert model.unet.config == base.model.unet.config
    assert model.text_encoder.config == base.model.text_encoder.config
    assert model.text_encoder_2.config == base.model.text_encoder_2.config
    assert model.vae.config == base.model.vae.config and model.defaults == {"guidance": 5.0}
    assert model.tokenizer_2.pad_token_id == 0 and model.tokenizer.pad_token_id == END  # "!" and <|endoftext|>
    diff = max_diff(picture(model), picture(base.model))
    print(f"diffusers folder vs single file: {diff:.2e}")
    assert diff <= 1e-5


def test_refiner_diffusers_folder_loads_as_the_refiner(refiner, tmp_path):
    folder = tmp_path / "refiner_folder"
    StableDiffusionXLImg2ImgPipeline(**refiner.components, scheduler=reference_scheduler("euler"),
                                     requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                     add_watermarker=False).save_pretrained(folder)
    assert not (folder / "text_encoder").exists()
    model = load_checkpoint(folder)
    assert model.kind == "SDXL refiner" and model.text_encoder is None and model.tokenizer is None
    assert model.unet.config == refiner.model.unet.config
    ids = token_ids(seed=9)
    with torch.no_grad():
        ours = model.text_encoder_2.encode(ids, 1, final_layer_norm=False)
        reference = refiner.model.text_encoder_2.encode(ids, 1, final_layer_norm=False)
        latents = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(0))
        vector = torch.randn(1, model.unet.config.adm_in_channels, generator=torch.Generator().manual_seed(1))
        unets = [m.unet(latents, 300, ours[0][:1], vector) for m in (model, refiner.model)]
    assert max_diff(ours[0], reference[0]) <= 1e-6 and max_diff(ours[1], reference[1]) <= 1e-6
    assert max_diff(*unets) <= 1e-5


@pytest.fixture(scope="module")
def rounded(base, tmp_path_factory):
    """Our SDXL file with every tensor rounded to float16, saved in float32: what an fp16 file holds."""
    path = tmp_path_factory.mktemp("rounded") / "rounded.safetensors"
    save_file({k: v.half().float() for k, v in base.tensors.items()}, str(path))
    return load_checkpoint(path)


def assert_same_weights(model, reference):
    """Every weight of the four networks equal, bit for bit (float16 values are exact in float32)."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(model, name).state_dict(), getattr(reference, name).state_dict()
        assert set(ours) == set(theirs), name
        for key, tensor in ours.items():
            assert tensor.dtype == torch.float32 and torch.equal(tensor, theirs[key]), f"{name}: {key}"


def test_fp16_single_file_loads_into_fp32(base, rounded, tmp_path):
    path = tmp_path / "sdxl_fp16.safetensors"
    save_file({k: v.half() for k, v in base.tensors.items()}, str(path))
    model = load_checkpoint(path, dtype=torch.float32)
    assert model.kind == "SDXL" and model.dtype == torch.float32
    for network in (model.unet, model.vae, model.text_encoder, model.text_encoder_2):
        assert all(p.dtype == torch.float32 for p in network.parameters())
    assert_same_weights(model, rounded)


def test_fp16_variant_folder_loads(base, rounded, tmp_path):
    half = {name: copy.deepcopy(part).half() if isinstance(part, torch.nn.Module) else part
            for name, part in base.components.items()}
    folder = save_folder(half, tmp_path / "sdxl_fp16_folder", variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert (folder / "text_encoder_2" / "model.fp16.safetensors").exists()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    model = load_checkpoint(folder, dtype=torch.float32)
    assert model.kind == "SDXL" and model.dtype == torch.float32
    assert_same_weights(model, rounded)


# --------------------------------------------------------------------------------------------------
# 6. SD-Turbo / SDXL-Turbo: trailing timesteps

@pytest.mark.parametrize("steps, expected", [(1, [999]), (2, [999, 499]), (4, [999, 749, 499, 249])])
def test_trailing_timesteps_of_turbo_models_equal_diffusers(steps, expected):
    ours = samplers.make_plan("euler", steps, spacing="trailing").timesteps
    reference = EulerDiscreteScheduler(**dict(SD15, timestep_spacing="trailing"))
    reference.set_timesteps(steps)
    assert ours.tolist() == reference.timesteps.tolist() == expected


# --------------------------------------------------------------------------------------------------
# 7. The fp16 VAE's NaN retry

def test_fp16_vae_that_overflows_is_retried_in_fp32(base):
    model = load_checkpoint(base.path, dtype=torch.float16)
    with torch.no_grad():
        model.vae.decoder.conv_in.weight.mul_(2000)  # activations past float16's 65504: inf, then NaN in the norms
    reference = copy.deepcopy(model.vae).float()  # the same (fp16-valued) weights, in float32
    latents = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.isfinite(model.vae.decode((latents / 0.13025).half())).all(), "the test VAE must overflow"
        expected = (reference.decode(latents / 0.13025) / 2 + 0.5).clamp(0, 1)
    assert torch.isfinite(expected).all()
    with pytest.warns(UserWarning, match="NaN or inf"):
        images = latents_to_images(model, latents)
    assert torch.isfinite(images).all() and images.dtype == torch.float32
    assert model.vae.post_quant_conv.weight.dtype == torch.float32  # it stays in float32 from now on
    assert expected.std() > 0.02
    diff = max_diff(images, expected)
    print(f"fp16 VAE retried in fp32 vs fp32 decode: {diff:.2e}")
    assert diff <= 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the next decode needs no retry
        latents_to_images(model, latents)
