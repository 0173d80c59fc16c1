"""8-bit weights (sd_scratch/quantize.py, loading/int8_file.py): the rounding bound, the layers' arithmetic, the
file and the low-memory load equal to the model quantised in memory, the command's one-line refusals that write
nothing, and the tiny model drawing with 8-bit weights what it draws in float32."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from PIL import Image
from safetensors.torch import load_file, save_file
from small_models import (TEXT_SD1, UNET_SD1, openclip_layout, randomize, sdxl_single_file_tensors, small_sd,
                          small_sdxl)
from twins import write_diffusers_folder

import sd_scratch.quantize as quantizing
from sd_scratch.cli import main as sample_main
from sd_scratch.images import read_parameters
from sd_scratch.loading import CheckpointError, load_checkpoint, save_checkpoint
from sd_scratch.loading.diffusers_folder import load_diffusers_folder
from sd_scratch.loading.int8_file import INT8_METADATA_KEY
from sd_scratch.loading.single_file import DEFAULT_CHECKPOINT, load_single_file
from sd_scratch.lora import LoraError, apply_loras, load_lora
from sd_scratch.merge import main as merge_main
from sd_scratch.quantize import (Int8Conv2d, Int8Linear, dequantize_weight, is_quantized, main, quantize_network,
                                 quantize_weight)
from sd_scratch.sample import generate
from sd_scratch.text_encoder import TextEncoder
from sd_scratch.tokenizer import WEIGHTS_DIR
from sd_scratch.unet import UNet

NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")


def low_memory_load(path, dtype=torch.float32):
    """load_checkpoint's low_memory=True: each UNet and text encoder weight quantised as it is read."""
    path = Path(path)
    load = load_diffusers_folder if path.is_dir() else load_single_file
    return load(path, "cpu", dtype, None, low_memory=True)


def quantized_in_memory(path):
    """The float checkpoint loaded, then its UNet and text encoders quantised by quantize_network."""
    model = load_checkpoint(path)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(model, name) is not None:
            quantize_network(getattr(model, name))
    return model


def assert_same_model(a, b):
    """Every network's tensors equal, names, dtypes and values."""
    for name in NETWORKS:
        if getattr(a, name) is None:
            assert getattr(b, name) is None
            continue
        first, second = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert first.keys() == second.keys(), name
        for key in first:
            assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), f"{name}.{key}"
    for fact in ("kind", "prediction_type", "skip_last_layers", "image_size", "schedule", "defaults"):
        assert getattr(a, fact) == getattr(b, fact), fact
    for tokenizer in ("tokenizer", "tokenizer_2"):
        assert getattr(getattr(a, tokenizer), "pad_token_id", None) == getattr(getattr(b, tokenizer), "pad_token_id",
                                                                                 None)


def quantize(checkpoint, output) -> int:
    return main(["--checkpoint", str(checkpoint), "--output", str(output)])


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A small random SD 1.x single file (float32) and its 8-bit file, written by the command."""
    folder = tmp_path_factory.mktemp("sd1")
    save_checkpoint(folder / "float.safetensors", *small_sd(1))
    assert quantize(folder / "float.safetensors", folder / "int8.safetensors") == 0
    return folder / "float.safetensors", folder / "int8.safetensors"


# --------------------------------------------------------------------------------------------------
# The arithmetic


def test_quantized_weights_are_within_half_a_step_of_the_float_ones():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, 3, 3, generator=g) * torch.logspace(-4, 2, 6)[:, None, None, None]  # channels of all sizes
    weight[3] = 0  # an all-zero channel
    q, scale = quantize_weight(weight)
    assert q.dtype == torch.int8 and q.shape == weight.shape and scale.shape == (6,) and scale.dtype == torch.float32
    assert q.min() >= -127 and q.max() <= 127
    rows = q.flatten(1).abs().amax(dim=1)
    assert rows.tolist() == [127, 127, 127, 0, 127, 127]  # each channel's largest weight at the end of its grid
    assert torch.equal(scale[[0, 1, 2, 4, 5]], weight.flatten(1).abs().amax(dim=1)[[0, 1, 2, 4, 5]] / 127)
    assert scale[3] == 1
    error = (weight - dequantize_weight(q, scale)).abs()
    half_step = scale[:, None, None, None] / 2
    assert (error <= half_step * (1 + 1e-6)).all()
    assert (error > 0.4 * half_step).any()  # the bound is met by rounding, not by keeping the floats


def test_int8_layers_compute_with_the_dequantized_weight_exactly():
    g = torch.Generator().manual_seed(1)
    linear = randomize(torch.nn.Linear(24, 40), 2)
    conv = randomize(torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), 3)
    x, image = torch.randn(3, 7, 24, generator=g), torch.randn(2, 8, 9, 11, generator=g)
    for float_layer, int8_class, inputs, function in [(linear, Int8Linear, x, F.linear), (conv, Int8Conv2d, image, None)]:
        layer = int8_class(float_layer)
        q, scale = quantize_weight(float_layer.weight)
        assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight, q) and torch.equal(layer.weight_scale, scale)
        assert list(layer.state_dict()) == (["bias"] if float_layer.bias is not None else []) + ["weight", "weight_scale"]
        dequantized = q.float() * scale.view(-1, *[1] * (q.ndim - 1))
        if function is F.linear:
            expected = F.linear(inputs, dequantized, float_layer.bias)
        else:
            expected = F.conv2d(inputs, dequantized, None, stride=2, padding=1)
        assert torch.equal(layer(inputs), expected)
        assert not torch.equal(layer(inputs), float_layer(inputs))  # 8-bit: not the float layer's numbers


def test_quantize_network_keeps_every_name_and_leaves_the_small_layers_float():
    unet = randomize(UNet(UNET_SD1), 0)
    float_keys = set(unet.state_dict())
    layers = sum(isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) for module in unet.modules())
    quantize_network(unet)
    state = unet.state_dict()
    scales = {key.removesuffix("_scale") for key in state if key.endswith(".weight_scale")}
    assert set(state) == float_keys | {key + "_scale" for key in scales}
    assert all(state[key].dtype == torch.int8 for key in scales)
    assert len(scales) == layers - 4  # every Linear and Conv2d ...
    for kept in ("time_embed.0", "time_embed.2", "input_blocks.0.0", "out.2"):  # ... but these
        assert f"{kept}.weight" not in scales and state[f"{kept}.weight"].dtype == torch.float32
    assert all(state[key].dtype == torch.float32 for key in state if key.endswith((".bias", "norm.weight")))
    assert is_quantized(unet) and not is_quantized(randomize(TextEncoder(TEXT_SD1), 0))


# --------------------------------------------------------------------------------------------------
# The file, and the low-memory load


def test_the_file_loads_as_the_model_quantized_in_memory_and_close_to_float(sd1):
    float_file, int8_file = sd1
    with safe_open(str(int8_file), "pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
    assert json.loads(metadata[INT8_METADATA_KEY])["format"] == 1
    assert "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight_scale" in keys
    loaded, in_memory, floats = load_checkpoint(int8_file), quantized_in_memory(float_file), load_checkpoint(float_file)
    assert_same_model(loaded, in_memory)
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu" and loaded.source == str(int8_file)
    assert isinstance(loaded.unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q, Int8Linear)
    assert all(loaded.vae.state_dict()[k].dtype == torch.float32 for k in loaded.vae.state_dict())
    g = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        expected, got = floats.unet(latents, 500, context), loaded.unet(latents, 500, context)
    relative = ((got - expected).norm() / expected.norm()).item()
    print(f"small SD 1.x UNet, 8-bit against float32: relative error {relative:.2e}")
    assert 1e-3 < relative < 5e-2  # measured 2.8e-2 (random weights; the errors of ~30 layers in a row add up)


def test_the_low_memory_load_equals_the_file(sd1):
    float_file, int8_file = sd1
    assert_same_model(low_memory_load(float_file), load_checkpoint(int8_file))


def test_sd2_openclip_and_a_diffusers_folder_quantize_alike_by_either_route(tmp_path):
    save_file(_sd2_single_file(*small_sd(2)), str(tmp_path / "sd2.safetensors"))
    assert quantize(tmp_path / "sd2.safetensors", tmp_path / "sd2-int8.safetensors") == 0
    from_file = load_checkpoint(tmp_path / "sd2-int8.safetensors")
    assert from_file.kind == "SD 2.x" and from_file.prediction_type == "v_prediction" and from_file.skip_last_layers == 1
    assert_same_model(from_file, quantized_in_memory(tmp_path / "sd2.safetensors"))
    assert_same_model(from_file, low_memory_load(tmp_path / "sd2.safetensors"))

    save_checkpoint(tmp_path / "sd1.safetensors", *small_sd(1, seed=5))
    write_diffusers_folder(tmp_path / "sd1.safetensors", tmp_path / "folder")
    assert quantize(tmp_path / "folder", tmp_path / "folder-int8.safetensors") == 0
    assert_same_model(load_checkpoint(tmp_path / "folder-int8.safetensors"), quantized_in_memory(tmp_path / "folder"))
    assert_same_model(load_checkpoint(tmp_path / "folder-int8.safetensors"), low_memory_load(tmp_path / "folder"))


def _sd2_single_file(text_encoder, unet, vae):
    """An SD 2.x single file: the text encoder in OpenCLIP's layout (fused q, k, v) under its prefix."""
    tensors = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    tensors |= {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    tensors |= {"cond_stage_model.model." + k: v for k, v in openclip_layout(text_encoder).items()}
    return {k: v.contiguous() for k, v in tensors.items()}


def test_sdxl_base_quantizes_both_text_encoders(tmp_path):
    save_file(sdxl_single_file_tensors(*small_sdxl()), str(tmp_path / "sdxl.safetensors"))
    assert quantize(tmp_path / "sdxl.safetensors", tmp_path / "sdxl-int8.safetensors") == 0
    model = load_checkpoint(tmp_path / "sdxl-int8.safetensors")
    assert model.kind == "SDXL" and is_quantized(model.text_encoder) and is_quantized(model.text_encoder_2)
    assert isinstance(model.text_encoder_2.text_projection, Int8Linear)  # the pooled output's projection too
    assert model.unet.label_emb[0][0].weight.dtype == torch.float32
    assert_same_model(model, low_memory_load(tmp_path / "sdxl.safetensors"))


def test_loading_in_bfloat16_keeps_q_and_casts_the_rest(sd1):
    model = load_checkpoint(sd1[1], dtype=torch.bfloat16)
    layer = model.unet.input_blocks[1][0].in_layers[2]
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.bfloat16
    assert model.dtype == torch.bfloat16 and model.vae.post_quant_conv.weight.dtype == torch.bfloat16
    assert torch.equal(low_memory_load(sd1[0], torch.bfloat16).unet.state_dict()["out.2.weight"],
                       model.unet.state_dict()["out.2.weight"])


def resident_mapped_bytes(path: Path) -> int:
    """The bytes of `path`'s memory mapping that count against this process now (Linux's /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ")[0] and len(line.split()) >= 5:  # a mapping's first line: address range ... path
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_DONTNEED and /proc/self/smaps are Linux's")
def test_the_low_memory_load_hands_back_the_pages_of_each_float_weight(tmp_path, monkeypatch):
    """A float32 file loaded in float32 is viewed, not copied: the weights that become 8-bit are read (every page),
    quantised, and their pages handed back, so that the file's float weights are not left in memory beside q.
    Without the handing back, they would be."""
    import sd_scratch.loading.int8_file as int8_file

    text_encoder, unet, vae = small_sd(2)  # a 1024-wide text encoder: 18 MB of weights to quantise
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, text_encoder, unet, vae)
    quantized = {f"{layer}.weight" for layer in quantizing.layers_to_quantize(text_encoder)}
    quantized_bytes = sum(p.numel() * 4 for name, p in text_encoder.named_parameters() if name in quantized)
    model = low_memory_load(path)
    resident = resident_mapped_bytes(path)
    assert resident < 0.1 * quantized_bytes, (resident, quantized_bytes)
    del model
    monkeypatch.setattr(int8_file, "release_view", lambda tensor: None)
    _kept = low_memory_load(path)  # (held, so that its mapping stays while the pages are counted)
    assert resident_mapped_bytes(path) > quantized_bytes


def test_a_file_with_a_tensor_missing_or_one_too_many_is_refused_naming_it(sd1, tmp_path):
    tensors = load_file(str(sd1[1]))
    with safe_open(str(sd1[1]), "pt") as f:
        metadata = f.metadata()
    scale = "unet.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight_scale"
    cases = {
        "missing": ({k: v for k, v in tensors.items() if k != scale}, f"{scale.removeprefix('unet.')}"),
        "extra": (tensors | {"unet.extra": torch.zeros(1)}, "extra"),
        "stranger": (tensors | {"lora_unet_x.alpha": torch.zeros(1)}, "belong to no network"),
        "scale of a norm": (tensors | {"unet.out.0.weight_scale": torch.ones(4)}, "out.0 is not a Linear or Conv2d"),
    }
    for name, (changed, said) in cases.items():
        save_file(changed, str(tmp_path / "changed.safetensors"), metadata=metadata)
        with pytest.raises(CheckpointError, match=said) as error:
            load_checkpoint(tmp_path / "changed.safetensors")
        assert "\n" not in str(error.value), name


# --------------------------------------------------------------------------------------------------
# The command line


def refused(capsys, folder, checkpoint, output) -> str:
    before = sorted(p.name for p in folder.iterdir())
    assert quantize(checkpoint, output) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in folder.iterdir()) == before  # no output, no temporary file
    return err


def test_bad_inputs_and_outputs_are_refused_in_one_line_and_nothing_is_written(sd1, tmp_path, capsys):
    float_file, int8_file = sd1
    out = tmp_path / "out.safetensors"
    (tmp_path / "notes.safetensors").write_text("these are not weights\n")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
              str(tmp_path / "lora.safetensors"))
    (tmp_path / "empty folder").mkdir()
    assert "not found" in refused(capsys, tmp_path, tmp_path / "missing.safetensors", out)
    assert "not a readable safetensors file" in refused(capsys, tmp_path, tmp_path / "notes.safetensors", out)
    assert "a LoRA, not a full model" in refused(capsys, tmp_path, tmp_path / "lora.safetensors", out)
    assert "has no unet/" in refused(capsys, tmp_path, tmp_path / "empty folder", out)
    assert "already an 8-bit file" in refused(capsys, tmp_path, int8_file, out)
    assert ".safetensors name" in refused(capsys, tmp_path, float_file, tmp_path / "out.ckpt")
    assert "does not exist" in refused(capsys, tmp_path, float_file, tmp_path / "nowhere" / "out.safetensors")
    (tmp_path / "folder.safetensors").mkdir()
    assert "is a folder" in refused(capsys, tmp_path, float_file, tmp_path / "folder.safetensors")
    assert main(["--checkpoint", str(float_file)]) == 2
    err = capsys.readouterr().err
    assert "required: --output" in err and err.count("\n") == 1


def test_an_existing_output_is_never_replaced(sd1, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"mine")
    assert "exists" in refused(capsys, tmp_path, sd1[0], out)
    assert out.read_bytes() == b"mine"


def test_an_interrupted_write_leaves_nothing(sd1, tmp_path, capsys, monkeypatch):
    import sd_scratch.loading.int8_file as int8_file

    def interrupted(f, model, source):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(int8_file, "write_int8_file", interrupted)
    assert quantize(sd1[0], tmp_path / "out.safetensors") == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_module_runs_from_the_command_line(sd1, tmp_path):
    out = tmp_path / "out.safetensors"
    command = [sys.executable, "-m", "sd_scratch.quantize", "--checkpoint", str(sd1[0]), "--output", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "SD 1.x:" in result.stdout and out.read_bytes() == sd1[1].read_bytes()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)  # again: out exists
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


# --------------------------------------------------------------------------------------------------
# What uses an 8-bit model


def test_loras_and_merging_refuse_8_bit_weights_in_one_line(sd1, tmp_path, capsys):
    model = load_checkpoint(sd1[1])
    lora = WEIGHTS_DIR / "tiny_lora_diamond.safetensors"
    with pytest.raises(LoraError, match="8-bit") as error:
        load_lora(lora, model)
    assert "\n" not in str(error.value)
    apply_loras(model, []).remove()  # no LoRA: nothing to refuse (the command line applies the empty list)
    assert merge_main([str(sd1[1]), str(sd1[0]), "--alpha", "0.5", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "8-bit" in capsys.readouterr().err and not (tmp_path / "m.safetensors").exists()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two pictures in [0, 1], in dB."""
    return 10 * math.log10(1 / ((a - b) ** 2).mean().item())


def test_the_tiny_model_draws_with_8_bit_weights_what_it_draws_in_float32(tmp_path):
    assert quantize(DEFAULT_CHECKPOINT, tmp_path / "tiny-int8.safetensors") == 0
    prompts = ["a red circle on a blue background", "a yellow triangle on a purple background",
               "a white square on a black background", "a green circle on an orange background"]
    settings = dict(steps=25, guidance=3.0, seed=0, progress=False)
    expected = generate(load_checkpoint(), prompts, **settings).images
    got = generate(load_checkpoint(tmp_path / "tiny-int8.safetensors"), prompts, **settings).images
    difference = psnr(got, expected)
    print(f"tiny model, 8-bit against float32, 4 pictures: PSNR {difference:.1f} dB")
    assert 35 < difference < 80  # measured 42.8 dB; not identical: the weights are 8-bit


def test_the_command_line_s_low_memory_draws_what_the_python_api_s_does_and_says_so(tmp_path, capsys):
    """--low-memory: the tiny model quantised as it is read, its picture the one generate makes with the same
    8-bit model (not the float one's), and the PNG's parameters say the weights were 8-bit. A LoRA is refused."""
    out = tmp_path / "out"
    assert sample_main(["--low-memory", "--steps", "6", "--outdir", str(out)]) == 0
    settings = dict(steps=6, guidance=3.0, seed=42, progress=False)
    expected = generate(low_memory_load(DEFAULT_CHECKPOINT), "a red circle on a blue background", **settings)
    floats = generate(load_checkpoint(), "a red circle on a blue background", **settings)
    with Image.open(out / "sample-00000.png") as image:
        got = np.asarray(image.convert("RGB"))
    assert np.array_equal(got, np.asarray(expected.pil_images[0]))
    assert not np.array_equal(got, np.asarray(floats.pil_images[0]))
    assert read_parameters(out / "sample-00000.png").endswith("Weights: 8-bit")
    capsys.readouterr()
    lora = WEIGHTS_DIR / "tiny_lora_diamond.safetensors"
    assert sample_main(["--low-memory", "--lora", str(lora), "--outdir", str(tmp_path / "lora")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "8-bit" in err and "\n" not in err
    assert not (tmp_path / "lora").exists() or not any((tmp_path / "lora").iterdir())
