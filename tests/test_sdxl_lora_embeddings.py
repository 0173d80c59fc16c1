"""SDXL's LoRAs and textual-inversion embeddings against diffusers, on a small random SDXL.

LoRA files of kohya's layout (lora_unet_, lora_te1_, lora_te2_; the UNet after the original tree, as kohya's
SDXL trainer names it, or after diffusers') and of PEFT's (unet., text_encoder., text_encoder_2.) are merged by
us and by diffusers' `StableDiffusionXLPipeline.load_lora_weights` + `fuse_lora`, and the three networks (and a
whole run) compared; files for the other family, and the refiner's first text encoder, are refused. An SDXL
embedding (clip_l, clip_g) in a prompt gives the context diffusers gives after `load_textual_inversion` into
each text encoder, as diffusers' docs load SDXL embeddings.
"""

import copy

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from reference_pipeline import reference_scheduler
from sd_scratch.conditioning import FOURIER_FEATURES, encode_text
from sd_scratch.loading import load_checkpoint
from sd_scratch.loading.embeddings import EmbeddingError, load_embedding
from sd_scratch.lora import LoraError, apply_loras, load_lora, module_paths
from sd_scratch.sample import generate
from sd_scratch.unet import timestep_embedding
from small_models import small_sdxl, sdxl_single_file_tensors
from twins import sdxl_pipeline_components

RANK, ALPHA = 4, 2.0  # alpha != rank: the scale alpha / rank is 0.5
PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These networks are tiny: a second OpenMP thread gains nothing, and on a busy 2-core machine it made each
    forward pass up to 80 times slower (4 s against 0.05 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sdxl_components(path, model) -> dict:
    """diffusers' SDXL pipeline components holding the single file at `path` (`model` is our loading of it), each
    network through diffusers' own converters, loaded strictly."""
    return sdxl_pipeline_components(load_file(str(path)), model)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors"
    save_file(sdxl_single_file_tensors(*small_sdxl(seed=21)), str(path))
    model = load_checkpoint(path)
    return model, sdxl_components(path, model)


def sdxl_pipeline(components) -> StableDiffusionXLPipeline:
    components = {name: copy.deepcopy(part) for name, part in components.items()}  # fusing changes them in place
    pipe = StableDiffusionXLPipeline(**components, scheduler=reference_scheduler("euler"), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------------
# LoRA files, written from each implementation's own module tree


def linear_layers(network, text=False):
    """(name, module) of every linear and convolution layer; a text encoder's with transformers' text_model. level,
    which the files keep (transformers 5's CLIPTextModel drops it)."""
    layers = [(name, module) for name, module in network.named_modules()
              if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    if text:
        return [(name if name.startswith(("text_model.", "text_projection")) else "text_model." + name, module)
                for name, module in layers]
    return layers


def random_factors(module, g, rank=RANK):
    if isinstance(module, torch.nn.Conv2d):
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g) * 0.3
        up = torch.randn(module.out_channels, rank, 1, 1, generator=g) * 0.3
    else:
        down = torch.randn(rank, module.in_features, generator=g) * 0.3
        up = torch.randn(module.out_features, rank, generator=g) * 0.3
    return down, up


def lora_layers(model, components, unet_tree):
    """(network, name, module) of the layers the test files change: every linear and convolution layer of
    the UNet (named after our tree, which is the original's, or diffusers') and of both text encoders (their
    projection included)."""
    unet = linear_layers(model.unet if unet_tree == "original" else components["unet"])
    return [("unet", n, m) for n, m in unet] + \
           [("te1", n, m) for n, m in linear_layers(components["text_encoder"], text=True)] + \
           [("te2", n, m) for n, m in linear_layers(components["text_encoder_2"], text=True)]


def kohya_sdxl_file(path, model, components, seed, unet_tree="original"):
    g = torch.Generator().manual_seed(seed)
    prefixes = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}
    tensors = {}
    for network, name, module in lora_layers(model, components, unet_tree):
        if unet_tree == "diffusers" and name.startswith("add_embedding"):
            continue  # diffusers 0.42 reads lora_unet_add_embedding_linear_1 as add.embedding.linear: left out
        key = prefixes[network] + name.replace(".", "_")
        tensors[key + ".lora_down.weight"], tensors[key + ".lora_up.weight"] = random_factors(module, g)
        tensors[key + ".alpha"] = torch.tensor(ALPHA)
    save_file(tensors, str(path))
    return path


def peft_sdxl_file(path, model, components, seed):
    """diffusers' own layout: no alphas (alpha = rank)."""
    g = torch.Generator().manual_seed(seed)
    prefixes = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}
    tensors = {}
    for network, name, module in lora_layers(model, components, "diffusers"):
        key = prefixes[network] + name
        tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = random_factors(module, g)
    save_file(tensors, str(path))
    return path


def fused_reference(components, path, scale):
    pipe = sdxl_pipeline(components)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # the fused weights stay; the adapter goes
    return pipe


# --------------------------------------------------------------------------------------------------
# The three networks' outputs, ours and diffusers', on the same inputs


def network_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, model.unet.config.context_dim, generator=g)
    pooled = torch.randn(2, model.text_encoder_2.config.projection_dim, generator=g)
    sizes = torch.tensor([[64.0, 64, 0, 0, 64, 64], [96, 80, 8, 4, 64, 64]])  # original, crop, target
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    ids[:, 0], ids[:, 12] = 49406, 49407  # start and end tokens: the pooled output reads the end
    return x, context, pooled, sizes, ids


def outputs_ours(model, seed=0):
    x, context, pooled, sizes, ids = network_inputs(model, seed)
    vector = torch.cat([pooled, timestep_embedding(sizes.flatten(), FOURIER_FEATURES).reshape(2, -1)], dim=1)
    with torch.no_grad():
        hidden_2, projected = model.text_encoder_2.encode(ids, pooled=True)
        return (model.unet(x, torch.tensor([500, 20]), context, vector), model.text_encoder(ids), hidden_2,
                projected)


def outputs_theirs(pipe, model, seed=0):
    x, context, pooled, sizes, ids = network_inputs(model, seed)
    with torch.no_grad():
        noise = pipe.unet(x, torch.tensor([500, 20]), context,
                          added_cond_kwargs=dict(text_embeds=pooled, time_ids=sizes)).sample
        second = pipe.text_encoder_2(ids)
        return noise, pipe.text_encoder(ids).last_hidden_state, second.last_hidden_state, second.text_embeds


def assert_close(ours, theirs, before, tolerance=1e-4):
    for a, b, old in zip(ours, theirs, before):
        difference, scale, change = ((a - b).abs().max().item(), max(1.0, b.abs().max().item()),
                                     (a - old).abs().max().item())
        assert difference <= tolerance * scale, (difference, scale)
        assert change > 1e-2  # the LoRA changed something worth comparing


# --------------------------------------------------------------------------------------------------
# The renaming


def test_sdxl_layers_have_diffusers_and_transformers_names(sdxl):
    model, components = sdxl
    paths = module_paths(model, "unet")
    assert set(paths.values()) == {name for name, _ in linear_layers(components["unet"])}
    for ours, theirs in paths.items():
        assert model.unet.get_submodule(ours).weight.shape == components["unet"].get_submodule(theirs).weight.shape
    assert paths["label_emb.0.0"] == "add_embedding.linear_1" and paths["label_emb.0.2"] == "add_embedding.linear_2"
    assert paths["time_embed.0"] == "time_embedding.linear_1"
    assert paths["input_blocks.4.1.transformer_blocks.1.attn2.to_k"] == \
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    for network, key in [("text_encoder", "text_encoder"), ("text_encoder_2", "text_encoder_2")]:
        assert set(module_paths(model, network)) == {name for name, _ in linear_layers(components[key], text=True)}
    assert "text_projection" in module_paths(model, "text_encoder_2")


# --------------------------------------------------------------------------------------------------
# Parity with diffusers


@pytest.fixture(scope="module")
def kohya_lora(sdxl, tmp_path_factory):
    """A kohya SDXL file (the UNet after the original tree, as kohya's SDXL trainer names it) and diffusers'
    pipeline with it fused at 0.7, shared by the networks' and the whole run's comparisons."""
    model, components = sdxl
    path = kohya_sdxl_file(tmp_path_factory.mktemp("lora") / "style.safetensors", model, components, seed=1)
    return path, fused_reference(components, path, 0.7)


def write_lora(layout, path, model, components):
    if layout == "peft":
        return peft_sdxl_file(path, model, components, seed=1)
    return kohya_sdxl_file(path, model, components, seed=1, unet_tree=layout.split()[1])


@pytest.mark.parametrize("layout", ["kohya original tree", "kohya diffusers tree", "peft"])
def test_sdxl_loras_equal_diffusers_fused(sdxl, kohya_lora, tmp_path, layout):
    model, components = sdxl
    if layout == "kohya original tree":
        path, pipe = kohya_lora
    else:
        path = write_lora(layout, tmp_path / "lora.safetensors", model, components)
        pipe = fused_reference(components, path, 0.7)
    lora = load_lora(path, model)
    assert {layer.network for layer in lora.layers} == {"unet", "text_encoder", "text_encoder_2"}
    assert len(lora.layers) == len(load_file(str(path))) // (3 if layout.startswith("kohya") else 2)
    before = outputs_ours(model)
    with apply_loras(model, [(lora, 0.7)]):
        ours = outputs_ours(model)
    assert_close(ours, outputs_theirs(pipe, model), before)


def test_a_whole_sdxl_run_with_a_lora_equals_diffusers(sdxl, kohya_lora):
    model, _ = sdxl
    path, pipe = kohya_lora
    settings = dict(steps=3, guidance=6.0, seed=7, height=64, width=64, progress=False)
    with apply_loras(model, [(load_lora(path, model), 0.7)]):
        ours = generate(model, PROMPT, NEGATIVE, **settings).images
    without = generate(model, PROMPT, NEGATIVE, **settings).images
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=6.0,
                  generator=torch.Generator().manual_seed(7), height=64, width=64, output_type="pt").images
    assert (ours - theirs).abs().max() <= 1e-3
    assert (ours - without).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------
# Files for the other family, and the refiner


def lora_tensors(layers: dict[str, tuple[int, int]], rank=RANK, alpha=None) -> dict[str, torch.Tensor]:
    """kohya-named factors for {layer: (out, in)} of linear layers, seeded."""
    g = torch.Generator().manual_seed(len(layers))
    tensors = {}
    for layer, (out, inner) in layers.items():
        tensors[layer + ".lora_down.weight"] = torch.randn(rank, inner, generator=g)
        tensors[layer + ".lora_up.weight"] = torch.randn(out, rank, generator=g)
        if alpha is not None:
            tensors[layer + ".alpha"] = torch.tensor(alpha)
    return tensors


def refused(model, tmp_path, tensors) -> str:
    save_file(tensors, str(tmp_path / "other.safetensors"))
    with pytest.raises(LoraError) as error:
        load_lora(tmp_path / "other.safetensors", model)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_loras_for_sd_1_and_2_are_refused_by_sdxl(sdxl, tmp_path):
    model, _ = sdxl
    sd1 = lora_tensors({"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (64, 64),
                        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (64, 64)})
    assert refused(model, tmp_path, sd1) == ("other.safetensors is a LoRA for SD 1.x or 2.x (it changes one text "
                                             "encoder, lora_te_), and this model is SDXL: use a LoRA made for SDXL")
    # A UNet-only file tells its family by the width of the context its cross-attention reads: SD 1.x's 768
    unet_only = lora_tensors({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (128, 768)})
    assert refused(model, tmp_path, unet_only) == (
        "other.safetensors: layer lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k is up (128, 4) "
        "@ down (4, 768), but SDXL's weight there is (128, 192) (a LoRA for another kind of model: its "
        "cross-attention reads a context 768 wide, as SD 1.x's does)")


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    path = tmp_path_factory.mktemp("refiner") / "refiner.safetensors"
    save_file(sdxl_single_file_tensors(*small_sdxl(seed=23, refiner=True)), str(path))
    return load_checkpoint(path)


def test_the_refiner_takes_the_second_text_encoders_layers_alone(refiner, tmp_path):
    """On the refiner (bigG alone) lora_te2_ changes its one text encoder, text_projection included; the UNet's
    layers as on the base. Against the formula W' = W + m (alpha / rank) up @ down, no alpha meaning alpha = rank."""
    assert refiner.kind == "SDXL refiner" and refiner.text_encoder is None
    targets = {"lora_te2_text_model_encoder_layers_1_self_attn_k_proj":
               ("text_encoder_2", "text_model.encoder.layers.1.self_attn.k_proj"),
               "lora_te2_text_projection": ("text_encoder_2", "text_projection"),
               "lora_unet_input_blocks_1_0_in_layers_2": ("unet", "input_blocks.1.0.in_layers.2")}  # a convolution
    g = torch.Generator().manual_seed(3)
    tensors, originals = {}, {}
    for key, (network, module) in targets.items():
        weight = getattr(refiner, network).get_submodule(module).weight
        tensors[key + ".lora_down.weight"], tensors[key + ".lora_up.weight"] = random_factors(
            getattr(refiner, network).get_submodule(module), g)
        originals[(network, module)] = weight.detach().clone()
    tensors["lora_te2_text_projection.alpha"] = torch.tensor(ALPHA)
    save_file(tensors, str(tmp_path / "refiner-lora.safetensors"))
    lora = load_lora(tmp_path / "refiner-lora.safetensors", refiner)
    assert {(layer.network, layer.module) for layer in lora.layers} == set(targets.values())
    with apply_loras(refiner, [(lora, 0.6)]):
        for key, (network, module) in targets.items():
            weight = getattr(refiner, network).get_submodule(module).weight
            scale = 0.6 * (ALPHA if key == "lora_te2_text_projection" else RANK) / RANK
            up, down = tensors[key + ".lora_up.weight"], tensors[key + ".lora_down.weight"]
            expected = originals[(network, module)] + scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            assert (weight - expected).abs().max() <= 1e-5
    first_encoder = lora_tensors({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (64, 64)})
    assert refused(refiner, tmp_path, first_encoder) == (
        "other.safetensors changes SDXL's first text encoder (lora_te1_ / text_encoder.), which SDXL refiner does "
        "not have (it has the second alone): use a LoRA made for the refiner")


# --------------------------------------------------------------------------------------------------
# Textual inversion: an SDXL embedding (clip_l, clip_g) in a prompt


def test_an_sdxl_embedding_gives_the_context_diffusers_gives(sdxl, tmp_path):
    model, components = sdxl
    g = torch.Generator().manual_seed(4)
    widths = tuple(encoder.config.width for _, encoder in model.text_encoders)  # as the command line passes them
    assert widths == (64, 128)  # the small model's ViT-L and bigG
    stored = {"clip_l": torch.randn(3, 64, generator=g) * 0.1, "clip_g": torch.randn(3, 128, generator=g) * 0.1}
    path = tmp_path / "sparkles.safetensors"
    save_file(stored, str(path))
    embedding = load_embedding(path, widths)

    pipe = sdxl_pipeline(components)  # as diffusers' docs load an SDXL embedding: each set into its encoder
    pipe.load_textual_inversion(stored["clip_l"], token="sparkles", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(stored["clip_g"], token="sparkles", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for prompt in ["a cat, sparkles", "sparkles"]:
        ours = encode_text(model, prompt, 1, [embedding])
        with torch.no_grad():
            context, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        assert ours.embeddings_used == {"sparkles"}
        assert (ours.context - context[0]).abs().max() <= 1e-4 * max(1.0, context.abs().max().item())
        assert (ours.pooled - pooled[0]).abs().max() <= 1e-4 * max(1.0, pooled.abs().max().item())
        plain = encode_text(model, prompt, 1, [])  # the word itself, not the embedding
        assert (ours.context - plain.context).abs().max() > 1e-2

    # The refiner (bigG alone) takes clip_g
    with pytest.raises(EmbeddingError, match="this model has one text encoder, 64 wide"):
        load_embedding(path, (64,))
    assert torch.equal(load_embedding(path, (128,)).vectors, stored["clip_g"])
