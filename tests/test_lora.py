"""LoRA files (kohya / AUTOMATIC1111 and diffusers / PEFT layouts): read strictly, merged into the weights,
removed bit for bit; the UNet, the text encoder and whole runs against diffusers' `load_lora_weights` +
`fuse_lora` on the same weights and files; kohya's per-layer alpha rule against the formula; prompt tags."""

import copy
import warnings

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from reference_pipeline import reference_scheduler
from sd_scratch import lora as lora_module
from sd_scratch.images import parse_parameters, read_parameters
from sd_scratch.lora import LoraError, apply_loras, load_lora
from sd_scratch.loading import load_checkpoint, save_checkpoint
from sd_scratch.prompts import lora_tags, prompt_schedule
from sd_scratch.sample import generate
from sd_scratch.tokenizer import PAD_ZERO
from small_models import small_sd
from twins import pipeline_components

PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
RANK, ALPHA = 4, 2.0  # one alpha for every layer: diffusers 0.42 reads per-layer alphas wrongly (the issue)


def build_pair(folder, version):
    text_encoder, unet, vae = small_sd(version, seed=11)
    path = folder / f"sd{version}.safetensors"
    save_checkpoint(path, text_encoder, unet, vae, image_size=64, **({"pad_token_id": PAD_ZERO} if version == 2 else {}))
    model = load_checkpoint(path)
    return model, pipeline_components(path, model)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    built = {}

    def pair(version):
        if version not in built:
            built[version] = build_pair(tmp_path_factory.mktemp("model"), version)
        return built[version]
    return pair


def target_layers(components):
    """diffusers' names of the layers a LoCon file of kohya's trainer changes: every linear layer of the
    transformers and the text encoder's attention and MLP, and the residual blocks' convolutions (3x3 and
    the 1x1 shortcut), the time projections, the down- and upsamplers. Named from diffusers' own module
    tree, so that the test does not lean on our renaming."""
    unet_layers = [(name, module) for name, module in components["unet"].named_modules()
                   if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "." in name
                   and not name.startswith(("time_embedding", "conv_in", "conv_out"))]
    text_layers = [(name, module) for name, module in components["text_encoder"].named_modules()
                   if isinstance(module, torch.nn.Linear) and ("self_attn" in name or "mlp" in name)]
    return unet_layers, text_layers


def random_factors(module, g, rank=RANK):
    if isinstance(module, torch.nn.Conv2d):
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g) * 0.3
        up = torch.randn(module.out_channels, rank, 1, 1, generator=g) * 0.3
    else:
        down = torch.randn(rank, module.in_features, generator=g) * 0.3
        up = torch.randn(module.out_features, rank, generator=g) * 0.3
    return down, up


def text_name(name):
    """transformers 5 drops the text_model level from CLIPTextModel's module names; the files keep it."""
    return name if name.startswith("text_model.") else "text_model." + name


def kohya_file(path, components, seed, alpha=ALPHA):
    g = torch.Generator().manual_seed(seed)
    unet_layers, text_layers = target_layers(components)
    tensors = {}
    for prefix, layers, rename in (("lora_unet_", unet_layers, str), ("lora_te_", text_layers, text_name)):
        for name, module in layers:
            key = prefix + rename(name).replace(".", "_")
            tensors[key + ".lora_down.weight"], tensors[key + ".lora_up.weight"] = random_factors(module, g)
            tensors[key + ".alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def peft_file(path, components, seed):
    """diffusers' own format: unet.<path>.lora_A / lora_B, no alphas (alpha = rank)."""
    g = torch.Generator().manual_seed(seed)
    unet_layers, text_layers = target_layers(components)
    tensors = {}
    for prefix, layers, rename in (("unet.", unet_layers, str), ("text_encoder.", text_layers, text_name)):
        for name, module in layers:
            key = prefix + rename(name)
            tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = random_factors(module, g)
    save_file(tensors, str(path))
    return path


def diffusers_pipeline(components, sampler="euler"):
    components = {name: copy.deepcopy(part) for name, part in components.items()}  # fusing changes them in place
    pipe = StableDiffusionPipeline(**components, scheduler=reference_scheduler(sampler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fused_reference(components, files_and_scales):
    """diffusers' pipeline with the LoRA files loaded and fused at their scales (fused one at a time)."""
    pipe = diffusers_pipeline(components)
    for path, scale in files_and_scales:
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()  # the fused weights stay; the adapter goes
    return pipe


def unet_and_text_outputs_ours(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, model.unet.config.context_dim, generator=g)
    ids = torch.randint(0, 49407, (2, 77), generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([500, 20]), context), model.text_encoder(ids)


def unet_and_text_outputs_theirs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    ids = torch.randint(0, 49407, (2, 77), generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500, 20]), context).sample, pipe.text_encoder(ids).last_hidden_state


# --- the renaming


@pytest.mark.parametrize("version", [1, 2])
def test_every_layer_has_diffusers_name(pairs, version):
    """Our UNet's linear and convolution layers, named in diffusers' tree, are exactly diffusers' UNet's."""
    model, components = pairs(version)
    theirs = {name for name, module in components["unet"].named_modules()
              if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
    assert set(lora_module.module_paths(model, "unet").values()) == theirs
    for ours, diffusers_name in lora_module.module_paths(model, "unet").items():
        assert model.unet.get_submodule(ours).weight.shape == components["unet"].get_submodule(diffusers_name).weight.shape


# --- parity with diffusers


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_networks_with_a_lora_equal_diffusers_fused(pairs, tmp_path, version, layout):
    model, components = pairs(version)
    path = (kohya_file if layout == "kohya" else peft_file)(tmp_path / f"{layout}.safetensors", components, seed=1)
    lora = load_lora(path, model)
    assert len(lora.layers) == sum(len(layers) for layers in target_layers(components))
    before = unet_and_text_outputs_ours(model)
    with apply_loras(model, [(lora, 0.7)]):
        ours = unet_and_text_outputs_ours(model)
    theirs = unet_and_text_outputs_theirs(fused_reference(components, [(path, 0.7)]))
    for a, b, old in zip(ours, theirs, before):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())
        assert (a - old).abs().max() > 1e-2  # the LoRA changed something worth comparing


def test_two_loras_at_once_and_a_whole_run_equal_diffusers(pairs, tmp_path):
    model, components = pairs(1)
    first = kohya_file(tmp_path / "first.safetensors", components, seed=2)
    second = peft_file(tmp_path / "second.safetensors", components, seed=3)
    pipe = fused_reference(components, [(first, 0.7), (second, -0.4)])
    with apply_loras(model, [(load_lora(first, model), 0.7), (load_lora(second, model), -0.4)]):
        ours_nets = unet_and_text_outputs_ours(model)
        ours = generate(model, [PROMPT] * 2, NEGATIVE, steps=5, guidance=6.0, seed=7, height=64, width=64,
                        progress=False).images
    for a, b in zip(ours_nets, unet_and_text_outputs_theirs(pipe)):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())
    generators = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    theirs = pipe([PROMPT] * 2, negative_prompt=[NEGATIVE] * 2, num_inference_steps=5, guidance_scale=6.0,
                  generator=generators, height=64, width=64, output_type="pt").images
    assert (ours - theirs).abs().max() <= 1e-3


def test_remove_restores_the_weights_bit_for_bit(pairs, tmp_path):
    model, components = pairs(1)
    path = kohya_file(tmp_path / "k.safetensors", components, seed=4)
    before = {name: tensor.clone() for name, tensor in [*model.unet.state_dict().items(),
                                                        *model.text_encoder.state_dict().items()]}
    storages = {name: p.data_ptr() for name, p in model.unet.named_parameters()}
    applied = apply_loras(model, [(load_lora(path, model), 1.3)])
    changed = [name for name, p in model.unet.named_parameters() if not torch.equal(p, before[name])]
    assert changed and all(name.endswith("weight") for name in changed)  # biases and norms untouched
    with pytest.raises(ValueError, match="already has LoRAs applied"):
        apply_loras(model, [(load_lora(path, model), 1.0)])
    applied.remove()
    assert model.loras == []
    for name, tensor in [*model.unet.state_dict().items(), *model.text_encoder.state_dict().items()]:
        assert torch.equal(tensor, before[name]), name
    assert {name: p.data_ptr() for name, p in model.unet.named_parameters()} == storages  # the very same tensors


# --- kohya's alpha rule, against the formula


def test_per_layer_alpha_and_missing_alpha_follow_kohya(pairs, tmp_path):
    """W' = W + m (alpha / rank) up @ down, alpha per layer; no alpha stored means alpha = rank. diffusers 0.42
    gets both wrong (the issue), so the formula itself is the reference here."""
    model, _ = pairs(1)
    g = torch.Generator().manual_seed(5)
    q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # our names; kohya's from diffusers' tree
    conv = "input_blocks.1.0.in_layers.2"
    kohya = {q: "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
             conv: "lora_unet_down_blocks_0_resnets_0_conv1"}
    weight_q, weight_conv = (model.unet.get_submodule(n).weight.detach().clone() for n in (q, conv))
    down_q, up_q = torch.randn(8, weight_q.shape[1], generator=g), torch.randn(weight_q.shape[0], 8, generator=g)
    down_c = torch.randn(2, weight_conv.shape[1], 3, 3, generator=g)
    up_c = torch.randn(weight_conv.shape[0], 2, 1, 1, generator=g)
    save_file({kohya[q] + ".lora_down.weight": down_q, kohya[q] + ".lora_up.weight": up_q,
               kohya[q] + ".alpha": torch.tensor(2.0),
               kohya[conv] + ".lora_down.weight": down_c, kohya[conv] + ".lora_up.weight": up_c},  # no alpha
              str(tmp_path / "alphas.safetensors"))
    with apply_loras(model, [(load_lora(tmp_path / "alphas.safetensors", model), 0.5)]):
        expected_q = weight_q + 0.5 * (2.0 / 8) * up_q @ down_q
        expected_conv = weight_conv + 0.5 * (2 / 2) * (up_c.flatten(1) @ down_c.flatten(1)).reshape(weight_conv.shape)
        assert torch.allclose(model.unet.get_submodule(q).weight, expected_q, rtol=0, atol=1e-5)
        assert torch.allclose(model.unet.get_submodule(conv).weight, expected_conv, rtol=0, atol=1e-5)


def test_original_tree_names_are_read_too(pairs, tmp_path):
    """Some LyCORIS files name the UNet's layers after the original tree (lora_unet_input_blocks_1_1_...)."""
    model, components = pairs(1)
    diffusers_file = kohya_file(tmp_path / "d.safetensors", components, seed=6)
    to_original = {theirs: ours for ours, theirs in lora_module.module_paths(model, "unet").items()}
    renamed = {}
    for key, tensor in load_file(str(diffusers_file)).items():
        layer, part = key.split(".", 1)
        for theirs, ours in to_original.items():
            if layer == "lora_unet_" + theirs.replace(".", "_"):
                layer = "lora_unet_" + ours.replace(".", "_")
                break
        renamed[f"{layer}.{part}"] = tensor
    save_file(renamed, str(tmp_path / "o.safetensors"))
    with apply_loras(model, [(load_lora(diffusers_file, model), 1.0)]):
        a = unet_and_text_outputs_ours(model)
    with apply_loras(model, [(load_lora(tmp_path / "o.safetensors", model), 1.0)]):
        b = unet_and_text_outputs_ours(model)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# --- refusals


def test_files_for_other_models_and_other_adapters_are_refused(pairs, tmp_path):
    model, components = pairs(1)
    good = load_file(str(kohya_file(tmp_path / "k.safetensors", components, seed=8)))
    cases = {
        "sdxl": ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 64),
                  "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(64, 4)},
                 ("is a LoRA for SDXL \\(it changes two text encoders\\), and this model is SD 1.x: use a LoRA made "
                  "for SD 1.x")),
        "sdxl unet only": ({"lora_unet_label_emb_0_0.lora_down.weight": torch.zeros(4, 2816),
                            "lora_unet_label_emb_0_0.lora_up.weight": torch.zeros(1280, 4)},
                           "is a LoRA for SDXL \\(it changes the label_emb"),
        "missing layer": ({**good, "lora_unet_down_blocks_5_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                           "lora_unet_down_blocks_5_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
                          "does not have"),
        "wrong shape": ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
                         torch.zeros(4, 1024),
                         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
                         torch.zeros(32, 4)}, ("another kind of model: its cross-attention reads a context 1024 "
                                               "wide, as SD 2.x's does")),
        "dora": ({**good, "lora_unet_down_blocks_0_resnets_0_conv1.dora_scale": torch.ones(32, 1, 1, 1)}, "DoRA"),
        "loha": ({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.ones(32, 4)}, "LoHa"),
        "stray key": ({**good, "something_else": torch.ones(1)}, "not parts of a LoRA layer"),
        "no up": ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(4, 32, 3, 3)}, "no up weight"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(LoraError, match=message):
            load_lora(tmp_path / f"{name}.safetensors", model)
    (tmp_path / "truncated.safetensors").write_bytes((tmp_path / "k.safetensors").read_bytes()[:300])
    with pytest.raises(LoraError, match="truncated.safetensors"):
        load_lora(tmp_path / "truncated.safetensors", model)


def test_a_pickled_lora_is_read_weights_only(pairs, tmp_path):
    model, components = pairs(1)
    tensors = load_file(str(kohya_file(tmp_path / "k.safetensors", components, seed=9)))
    torch.save(tensors, tmp_path / "k.pt")
    a, b = load_lora(tmp_path / "k.safetensors", model), load_lora(tmp_path / "k.pt", model)
    assert [(x.module, torch.equal(x.down, y.down), x.alpha) for x, y in zip(a.layers, b.layers)] == \
           [(x.module, True, x.alpha) for x in a.layers]

    class Payload:  # a pickle that would run code if unpickled without weights_only
        def __reduce__(self):
            return (print, ("ran",))
    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(LoraError):
        load_lora(tmp_path / "evil.pt", model)


# --- prompt tags and the PNG


def test_lora_tags():
    assert lora_tags("a cat <lora:pink:0.6>, <LORA:star> and <lyco:x:-1>") == [("pink", 0.6), ("star", 1.0), ("x", -1.0)]
    assert prompt_schedule("a <lora:pink:0.6>cat", 10) == [(10, "a cat")]
    for bad in ["<lora:pink:abc>", "<lora:pink:nan>", "<lora::1>", "<lora:pink:0.5:0.7>"]:
        with pytest.raises(ValueError):
            lora_tags(bad)


def test_tags_leave_the_text_and_the_png_lists_the_loras(pairs, tmp_path):
    model, components = pairs(1)
    path = kohya_file(tmp_path / "pink.safetensors", components, seed=10)
    with apply_loras(model, [(load_lora(path, model), 0.5)]):
        tagged = generate(model, PROMPT + " <lora:pink:0.5>", steps=3, seed=1, height=32, width=32, progress=False)
        plain = generate(model, PROMPT, steps=3, seed=1, height=32, width=32, progress=False)
    assert torch.equal(tagged.images, plain.images)  # the encoder never sees the tag
    text = read_parameters(tagged.save(0, tmp_path / "tagged.png"))
    assert text.startswith(PROMPT + " <lora:pink:0.5>\n")
    assert f'Lora hashes: "pink: {load_lora(path, model).short_hash}"' in text
    assert parse_parameters(text).settings["Lora hashes"] == f"pink: {load_lora(path, model).short_hash}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(model, PROMPT + " <lora:pink:0.5>", steps=1, seed=1, height=32, width=32, progress=False)
    assert any("<lora:pink:0.5>" in str(w.message) and "not applied" in str(w.message) for w in caught)


# --- the command line


def pixels(image):
    return torch.from_numpy(np.asarray(image, dtype=np.int16))


def one_line_error(capsys, expected):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("error: ") and expected in err, err


@pytest.fixture(scope="module")
def lora_files(pairs, tmp_path_factory):
    model, components = pairs(1)
    folder = tmp_path_factory.mktemp("loras")
    kohya_file(folder / "pink.safetensors", components, seed=12)
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 64),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(64, 4)},
              str(folder / "sdxl.safetensors"))
    return model, folder


def test_the_command_line_applies_loras_by_flag_and_by_tag(lora_files, tmp_path):
    from sd_scratch.cli import main
    model, folder = lora_files
    common = ["--checkpoint", model.source, "--steps", "3", "--seed", "4", "--height", "32", "--width", "32"]
    assert main([*common, "--prompt", PROMPT, "--lora", f"{folder / 'pink.safetensors'}:0.6",
                 "--outdir", str(tmp_path / "flag")]) == 0
    assert main([*common, "--prompt", PROMPT + " <lora:pink:0.6>", "--lora-dir", str(folder),
                 "--outdir", str(tmp_path / "tag")]) == 0
    assert main([*common, "--prompt", PROMPT, "--outdir", str(tmp_path / "none")]) == 0
    pictures = {d: pixels(Image.open(tmp_path / d / "sample-00000.png")) for d in ("flag", "tag", "none")}
    assert torch.equal(pictures["flag"], pictures["tag"]) and not torch.equal(pictures["flag"], pictures["none"])
    with apply_loras(model, [(load_lora(folder / "pink.safetensors", model), 0.6)]):
        expected = generate(model, PROMPT, steps=3, seed=4, height=32, width=32, guidance=7.5, progress=False)
    assert torch.equal(pictures["flag"], pixels(expected.pil_images[0]))
    assert "Lora hashes: \"pink: " in read_parameters(tmp_path / "tag" / "sample-00000.png")
    assert model.loras == []


@pytest.mark.parametrize("arguments, expected", [
    (["--lora", "{folder}/pink.safetensors:abc"], "is not a number"),
    (["--lora", "{folder}/missing.safetensors"], "LoRA file not found"),
    (["--prompt", "a <lora:pink:0.5> cat"], "--lora-dir"),
    (["--prompt", "a <lora:missing:0.5> cat", "--lora-dir", "{folder}"], "has no missing.safetensors"),
    (["--prompt", "a <lora:pink:zero> cat", "--lora-dir", "{folder}"], "is not a number"),
    (["--lora", "{folder}/sdxl.safetensors"], "LoRA for SDXL"),
])
def test_bad_lora_arguments_are_one_line_errors(lora_files, tmp_path, capsys, arguments, expected):
    from sd_scratch.cli import main
    model, folder = lora_files
    arguments = [a.format(folder=folder) for a in arguments]
    assert main(["--checkpoint", model.source, "--steps", "1", *arguments, "--outdir", str(tmp_path)]) == 2
    one_line_error(capsys, expected)
    assert not any(tmp_path.iterdir())


# --- LCM-LoRA: a LoRA of the real LCM-LoRA's layout, then 4 LCM steps at guidance 1


def lcm_lora_file(path, components, seed):
    """Laid out as latent-consistency/lcm-lora-sdv1-5 is: kohya names over the UNet only, every layer the LCM
    distillation trained (attention, feed-forward, projections, residual convolutions and shortcuts, time
    projections, down- and upsamplers), each with its alpha."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in target_layers(components)[0]:
        key = "lora_unet_" + name.replace(".", "_")
        down, up = random_factors(module, g, rank=8)
        tensors[key + ".lora_down.weight"], tensors[key + ".lora_up.weight"] = down * 0.5, up * 0.5
        tensors[key + ".alpha"] = torch.tensor(8.0)
    save_file(tensors, str(path))
    return path


def test_an_lcm_lora_runs_four_lcm_steps_at_guidance_1_as_diffusers(pairs, tmp_path):
    model, components = pairs(1)
    path = lcm_lora_file(tmp_path / "pytorch_lora_weights.safetensors", components, seed=13)
    pipe = fused_reference(components, [(path, 1.0)])
    pipe.scheduler = reference_scheduler("lcm")
    with apply_loras(model, [(load_lora(path, model), 1.0)]):
        ours = generate(model, [PROMPT] * 2, steps=4, guidance=1.0, sampler="lcm", seed=3, height=64, width=64,
                        progress=False)
    generators = [torch.Generator().manual_seed(3 + i) for i in range(2)]
    theirs = pipe([PROMPT] * 2, num_inference_steps=4, guidance_scale=1.0, generator=generators, height=64,
                  width=64, output_type="pt").images
    assert (ours.images - theirs).abs().max() <= 1e-3
    assert "Sampler: LCM" in ours.parameters[0] and "Lora hashes" in ours.parameters[0]
