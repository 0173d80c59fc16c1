"""The text encoder against transformers' CLIPTextModel and diffusers' checkpoint converters.

Both networks get the same random weights. transformers 5's CLIPTextModel has no `text_model.`
level in its state dict (`embeddings.token_embedding.weight`), the SD 1.x checkpoint and ours do:
the tests add or strip that prefix.
"""

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel

from sd_scratch.loading.configs import infer_text_encoder_config
from sd_scratch.loading.single_file import openclip_to_clip_keys
from sd_scratch.text_encoder import SD1_TEXT_ENCODER, TextEncoder, TextEncoderConfig
from sd_scratch.tokenizer import PAD_ZERO, Tokenizer

SMALL = TextEncoderConfig(width=128, layers=3, heads=2, mlp_width=512)  # heads of 64 channels, as in SD
PROMPTS = ["a photo of an astronaut riding a horse on mars, highly detailed", "dog in batman costume"]


def reference_model(config: TextEncoderConfig, seed: int = 0) -> CLIPTextModel:
    """transformers' CLIPTextModel of the same size, its default init jittered so that biases and
    layer norms are not 0 and 1 (a swapped or dropped bias would go unnoticed otherwise)."""
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=config.vocab_size, max_position_embeddings=config.max_positions,
        hidden_size=config.width, num_hidden_layers=config.layers, num_attention_heads=config.heads,
        intermediate_size=config.mlp_width, hidden_act=config.activation, layer_norm_eps=config.layer_norm_eps,
    ))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model.eval()


def reference_output(model: CLIPTextModel, ids: torch.Tensor, skip_last_layers: int) -> torch.Tensor:
    """What diffusers computes with clip_skip: hidden_states[-(k + 1)], then the final layer norm."""
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        if skip_last_layers == 0:
            return out.last_hidden_state
        return model.final_layer_norm(out.hidden_states[-(skip_last_layers + 1)])


def ours_from(reference: CLIPTextModel, config: TextEncoderConfig) -> TextEncoder:
    model = TextEncoder(config)
    model.load_state_dict({"text_model." + k: v for k, v in reference.state_dict().items()}, strict=True)
    return model.eval()


def run(model: TextEncoder, ids: torch.Tensor, skip_last_layers: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, skip_last_layers=skip_last_layers)


def to_openclip(hf_state: dict[str, torch.Tensor], layers: int, width: int) -> dict[str, torch.Tensor]:
    """The reverse of openclip_to_clip_keys, written independently: transformers names -> OpenCLIP's."""
    state = {
        "token_embedding.weight": hf_state["embeddings.token_embedding.weight"],
        "positional_embedding": hf_state["embeddings.position_embedding.weight"],
        "ln_final.weight": hf_state["final_layer_norm.weight"],
        "ln_final.bias": hf_state["final_layer_norm.bias"],
        "text_projection": torch.randn(width, 32),  # unused by SD; must be dropped
        "logit_scale": torch.tensor(4.6052),
    }
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(layers):
        hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [hf_state[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            state[f"{oc}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            for hf_name, oc_name in renames.items():
                state[f"{oc}{oc_name}.{kind}"] = hf_state[f"{hf}{hf_name}.{kind}"]
    return state


@pytest.fixture(scope="module")
def ids():
    tokens = Tokenizer()(PROMPTS)
    return tokens.input_ids  # (2, 77)


def test_state_dict_keys_are_the_sd1_checkpoint_keys():
    keys = list(TextEncoder(SMALL).state_dict())
    assert keys[:2] == ["text_model.embeddings.token_embedding.weight",
                        "text_model.embeddings.position_embedding.weight"]
    assert keys[-2:] == ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]
    layer = {k.removeprefix("text_model.encoder.layers.2.") for k in keys if k.startswith("text_model.encoder.layers.2.")}
    assert layer == {f"{m}.{p}" for p in ("weight", "bias") for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
        "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")}
    assert not any("position_ids" in k for k in keys)
    assert set(keys) == {"text_model." + k for k in reference_model(SMALL).state_dict()}


@pytest.mark.parametrize("skip_last_layers", [0, 1, 2])
def test_matches_transformers(ids, skip_last_layers):
    reference = reference_model(SMALL)
    expected = reference_output(reference, ids, skip_last_layers)
    got = run(ours_from(reference, SMALL), ids, skip_last_layers)
    assert got.shape == (2, 77, 128)
    assert 0.5 < expected.std() < 2  # after the final layer norm the values are of order 1
    # Observed: 0.0, bitwise equal (transformers runs the same ops, sdpa included, in the same order).
    assert (got - expected).abs().max() <= 1e-4


def test_diffusers_converter_reads_our_state_dict(ids):
    """diffusers' own SD 1.x single-file converter, fed our state dict, fills CLIPTextModel strictly."""
    ours = ours_from(reference_model(SMALL, seed=1), SMALL)
    checkpoint = {"cond_stage_model.transformer." + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_clip_checkpoint(checkpoint)
    theirs = reference_model(SMALL, seed=2)
    theirs.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()}, strict=True)
    for skip in (0, 1):
        assert (run(ours, ids, skip) - reference_output(theirs, ids, skip)).abs().max() <= 1e-4


def test_infer_config_from_sd1_layout():
    state = TextEncoder(SMALL).state_dict()
    assert infer_text_encoder_config(state, activation="quick_gelu") == SMALL


def test_openclip_layout_sd2(ids):
    """SD 2.x: OpenCLIP names, fused q/k/v, gelu, zero padding, read at the penultimate layer."""
    config = TextEncoderConfig(width=128, layers=4, heads=2, mlp_width=512, activation="gelu")
    reference = reference_model(config, seed=3)
    openclip = to_openclip(reference.state_dict(), config.layers, config.width)

    state = openclip_to_clip_keys(openclip)
    inferred = infer_text_encoder_config(state, activation="gelu")
    assert inferred == config
    ours = TextEncoder(inferred)
    ours.load_state_dict(state, strict=True)  # text_projection and logit_scale were dropped
    sd2_ids = Tokenizer(pad_token_id=PAD_ZERO)(PROMPTS).input_ids
    for skip in (0, 1):
        assert (run(ours, sd2_ids, skip) - reference_output(reference, sd2_ids, skip)).abs().max() <= 1e-4

    # diffusers' SD 2.x converter agrees on the same file.
    converted = convert_open_clip_checkpoint(
        reference, {"cond_stage_model.model." + k: v for k, v in openclip.items()}
    )
    assert "text_projection.weight" not in converted  # diffusers drops it too
    theirs = reference_model(config, seed=4)
    theirs.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()}, strict=True)
    assert (run(ours, sd2_ids, 1) - reference_output(theirs, sd2_ids, 1)).abs().max() <= 1e-4


# Half precision: the same weights cast to fp16 / bf16, compared with fp32, on outputs of std 1.
# Measured on CPU (torch 2.13, this file's jittered init), max abs difference (mean in brackets):
#            small (3 layers, 128 wide)    SD 1.5 size (12 layers, 768 wide)
#   fp16     5.2e-3 (7.9e-4)               8.5e-3 (1.2e-3)
#   bf16     4.1e-2 (6.0e-3)               6.4e-2 (9.3e-3)
# bf16 keeps 8 bits of mantissa against fp16's 11, hence about 8x the error. The tolerances leave 2x room.
HALF_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 1.5e-1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(ids, dtype):
    ours = ours_from(reference_model(SMALL), SMALL)
    expected = run(ours, ids)
    got = run(ours.to(dtype), ids)
    assert got.dtype == dtype
    assert (got.float() - expected).abs().max() <= HALF_TOLERANCE[dtype]


def test_skip_out_of_range(ids):
    with pytest.raises(ValueError, match="skip_last_layers"):
        TextEncoder(SMALL)(ids, skip_last_layers=3)


@pytest.mark.slow
def test_full_size_sd15(ids):
    reference = reference_model(SD1_TEXT_ENCODER)
    ours = ours_from(reference, SD1_TEXT_ENCODER)
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480
    for skip in (0, 1):
        assert (run(ours, ids, skip) - reference_output(reference, ids, skip)).abs().max() <= 1e-4
    expected = run(ours, ids)
    for dtype, tolerance in HALF_TOLERANCE.items():
        assert (run(ours.to(dtype), ids).float() - expected).abs().max() <= tolerance
