"""Loading checkpoints: our single-file writer and reader, diffusers' converters as the independent
check of the original layout, diffusers folders written by save_pretrained, and bad files."""

import ctypes
import json
import mmap
import os
import pickle
import sys
import threading
import time

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from sd_scratch.loading.tensor_file import TensorFile
from sd_scratch.loading import CheckpointError, load_checkpoint, release_weights, save_checkpoint
from sd_scratch.loading.single_file import DEFAULT_CHECKPOINT
from sd_scratch.loading.configs import infer_unet_config
from sd_scratch.tokenizer import WEIGHTS_DIR
from sd_scratch.unet import UNetConfig
from small_models import small_sd
from twins import diffusers_twins, transformers_clip_config, write_diffusers_folder


def sample_inputs(context_dim, vocab=49408, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        ids=torch.randint(0, vocab, (2, 77), generator=g),
        latents=torch.randn(2, 4, 6, 10, generator=g),
        context=torch.randn(2, 77, context_dim, generator=g),
        images=torch.rand(2, 3, 48, 80, generator=g) * 2 - 1,
    )


def outputs(text_encoder, unet, vae, x, skip=0):
    with torch.no_grad():
        return dict(
            text=text_encoder(x["ids"], skip_last_layers=skip).float(),
            unet=unet(x["latents"].to(unet.out[2].weight.dtype), 321, x["context"]).float(),
            decode=vae.decode(x["latents"].to(vae.post_quant_conv.weight.dtype)).float(),
            encode=vae.encode(x["images"].to(vae.quant_conv.weight.dtype))[0].float(),
        )


def assert_close(a: dict, b: dict, atol):
    for name in a:
        diff = (a[name] - b[name]).abs().max().item()
        assert diff <= atol, f"{name}: max abs difference {diff} > {atol}"


def strip_metadata(path, out):
    save_file(load_file(str(path)), str(out))  # the same tensors, no sd_scratch config: configs are inferred


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    text_encoder, unet, vae = small_sd(1)
    path = tmp_path_factory.mktemp("sd1") / "model.safetensors"
    save_checkpoint(path, text_encoder, unet, vae)
    return path, (text_encoder, unet, vae)


@pytest.mark.parametrize("with_metadata", [True, False])
def test_single_file_round_trip(sd1_file, tmp_path, with_metadata):
    path, networks = sd1_file
    if not with_metadata:
        strip_metadata(path, tmp_path / "plain.safetensors")
        path = tmp_path / "plain.safetensors"
    model = load_checkpoint(path)
    assert model.kind == "SD 1.x" and model.prediction_type == "epsilon" and model.skip_last_layers == 0
    assert model.unet.config == networks[1].config
    assert model.vae.config == networks[2].config
    assert model.text_encoder.config == networks[0].config
    x = sample_inputs(64)
    assert_close(outputs(*networks, x), outputs(model.text_encoder, model.unet, model.vae, x), atol=0)


def test_inferred_unet_config_of_full_size_layouts():
    for config in [UNetConfig(), UNetConfig(in_channels=9),
                   UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True)]:
        with torch.device("meta"):
            from sd_scratch.unet import UNet
            state = UNet(config).state_dict()
        assert infer_unet_config(state) == config


def test_original_layout_matches_diffusers_converters(sd1_file):
    """The independent check: diffusers' own converters read our file as an original checkpoint."""
    path, _ = sd1_file
    ours = load_checkpoint(path)
    twins = diffusers_twins(load_file(str(path)), ours.unet.config, ours.vae.config, ours.text_encoder.config,
                            sample_size=16)
    unet, vae, clip = twins.unet, twins.vae, twins.text_encoder

    x = sample_inputs(64)
    with torch.no_grad():
        theirs = dict(
            text=clip.final_layer_norm(clip(x["ids"], output_hidden_states=True).hidden_states[-1]),
            unet=unet(x["latents"], 321, encoder_hidden_states=x["context"]).sample,
            decode=vae.decode(x["latents"]).sample,
            encode=vae.encode(x["images"]).latent_dist.mean,
        )
    assert_close(outputs(ours.text_encoder, ours.unet, ours.vae, x), theirs, atol=1e-4)


def test_sd2_openclip_single_file(tmp_path):
    """SD 2.x: OpenCLIP text tower under cond_stage_model.model.* (fused q/k/v), linear projections, 64-wide heads."""
    text_encoder, unet, vae = small_sd(2)
    tensors = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    tensors.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    # Write the text tower the way OpenCLIP stores it: the inverse of our renaming, q/k/v stacked.
    text = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    openclip = {"token_embedding.weight": text["embeddings.token_embedding.weight"],
                "positional_embedding": text["embeddings.position_embedding.weight"],
                "ln_final.weight": text["final_layer_norm.weight"], "ln_final.bias": text["final_layer_norm.bias"],
                "text_projection": torch.randn(1024, 1024), "logit_scale": torch.tensor(4.6)}
    for i in range(text_encoder.config.layers):
        layer = f"encoder.layers.{i}."
        block = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            openclip[block + f"attn.in_proj_{kind}"] = torch.cat(
                [text[layer + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for theirs, mine in [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:
                openclip[block + f"{theirs}.{kind}"] = text[layer + f"{mine}.{kind}"]
    tensors.update({"cond_stage_model.model." + k: v.contiguous() for k, v in openclip.items()})
    save_file(tensors, str(tmp_path / "sd2.safetensors"))

    model = load_checkpoint(tmp_path / "sd2.safetensors")
    assert model.kind == "SD 2.x" and model.prediction_type == "v_prediction" and model.skip_last_layers == 1
    assert model.tokenizer.pad_token_id == 0
    assert model.unet.config.head_dim == 64 and model.unet.config.use_linear_projection
    x = sample_inputs(1024)
    assert_close(outputs(text_encoder, unet.float(), vae, x, skip=1),
                 outputs(model.text_encoder, model.unet, model.vae, x, skip=1), atol=0)
    # and diffusers' OpenCLIP converter agrees with our renaming
    clip = CLIPTextModel(transformers_clip_config(text_encoder.config)).eval()
    converted = convert_open_clip_checkpoint(clip, tensors)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items() if "position_ids" not in k}
    clip.load_state_dict(converted, strict=True)
    with torch.no_grad():
        hidden = clip(x["ids"], output_hidden_states=True).hidden_states[-2]
        assert_close({"text": clip.final_layer_norm(hidden)},
                     {"text": model.text_encoder(x["ids"], skip_last_layers=1)}, atol=1e-4)
    assert model.unet(x["latents"], 5, x["context"]).shape == x["latents"].shape


def test_diffusers_folder_from_save_pretrained(sd1_file, tmp_path):
    """A folder written by diffusers/transformers' own save_pretrained loads and computes the same."""
    path, _ = sd1_file
    reference = load_checkpoint(path)
    twins = diffusers_twins(load_file(str(path)), reference.unet.config, reference.vae.config,
                            reference.text_encoder.config, sample_size=16)
    unet, vae, clip = twins.unet, twins.vae, twins.text_encoder
    folder = tmp_path / "folder"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    clip.save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    from transformers import CLIPTokenizer
    CLIPTokenizer.from_pretrained(str(WEIGHTS_DIR)).save_pretrained(folder / "tokenizer")

    model = load_checkpoint(folder)
    assert model.kind == "SD 1.x" and model.unet.config.num_heads == 8
    x = sample_inputs(64)
    ours = outputs(model.text_encoder, model.unet, model.vae, x)
    assert_close(ours, outputs(reference.text_encoder, reference.unet, reference.vae, x), atol=1e-6)
    assert model.tokenizer("a red circle").input_ids[0, :3].tolist() == [49406, 320, 736]


def test_a_folder_reads_what_no_shape_tells_from_its_configs(tmp_path):
    """The shipped tiny model as a diffusers folder: 2 and 1 group-norm groups, a text encoder of 2 heads of 32
    channels, none of which its tensors' shapes tell (SD's 32 groups and CLIP's heads of 64 would not even build):
    the folder's config.json files say them, and the folder computes what the single file computes."""
    write_diffusers_folder(DEFAULT_CHECKPOINT, tmp_path / "tiny", sample_size=16)
    folder, single = load_checkpoint(tmp_path / "tiny"), load_checkpoint(DEFAULT_CHECKPOINT)
    assert (folder.unet.config.norm_groups, folder.vae.config.norm_groups, folder.text_encoder.config.heads) == (2, 1, 2)
    assert (folder.unet.config, folder.vae.config, folder.text_encoder.config) == \
           (single.unet.config, single.vae.config, single.text_encoder.config)
    x = sample_inputs(64)
    assert_close(outputs(folder.text_encoder, folder.unet, folder.vae, x),
                 outputs(single.text_encoder, single.unet, single.vae, x), atol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_half_precision_loading(sd1_file, dtype, atol):
    # Measured on the small model (outputs up to about 3.4 in size): fp16 differs from fp32 by at most
    # 6.2e-3 (VAE decode), bf16 by at most 5.4e-2 (VAE decode); the bounds leave about 2x headroom.
    path, networks = sd1_file
    model = load_checkpoint(path, dtype=dtype)
    assert model.unet.out[2].weight.dtype == dtype and model.text_encoder.text_model.final_layer_norm.weight.dtype == dtype
    assert model.dtype == dtype and model.device == torch.device("cpu")
    x = sample_inputs(64)
    x["context"] = x["context"].to(dtype)
    assert_close(outputs(*networks, x), outputs(model.text_encoder, model.unet, model.vae, x), atol=atol)


def test_fp16_file_loads_into_fp32(sd1_file, tmp_path):
    path, networks = sd1_file
    half = {k: v.half() for k, v in load_file(str(path)).items()}
    save_file(half, str(tmp_path / "half.safetensors"), metadata={"sd_scratch": json.dumps(_metadata(path))})
    model = load_checkpoint(tmp_path / "half.safetensors", dtype=torch.float32)
    assert model.unet.out[2].weight.dtype == torch.float32
    assert torch.equal(model.unet.out[2].weight, half["model.diffusion_model.out.2.weight"].float())


def resident_file_bytes() -> int:
    status = open("/proc/self/status").read()
    return int(status.split("RssFile:")[1].split()[0]) * 1024


def cached_file_bytes(path) -> int:
    """How much of the file the OS's file cache holds (mincore on a fresh mapping, which touches nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    pages = -(-len(mapping) // mmap.PAGESIZE)
    resident = (ctypes.c_ubyte * pages)()
    start = ctypes.c_char.from_buffer(mapping)
    assert libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(len(mapping)), resident) == 0
    del start
    mapping.close()
    return sum(byte & 1 for byte in resident) * mmap.PAGESIZE


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/pagemap and /proc/self/status are Linux's")
def test_release_weights_hands_back_file_pages_and_keeps_every_value(tmp_path):
    """An fp32 file loaded in fp32 is viewed, not copied. After release_weights the text encoder's
    pages no longer count against the process, yet stay in the OS's file cache for the next run, and the
    weights read back exactly as they were, including one written in place after loading (its page is no
    longer the file's, so it stays)."""
    text_encoder, unet, vae = small_sd(2)  # a 1024-wide text encoder: its token embedding is 202 MB
    save_checkpoint(tmp_path / "model.safetensors", text_encoder, unet, vae)
    with open(tmp_path / "model.safetensors", "rb") as f:
        os.fsync(f.fileno())  # on disk: its cached pages are clean, the kind the OS may evict
    model = load_checkpoint(tmp_path / "model.safetensors", dtype=torch.float32)
    ids = sample_inputs(1024)["ids"]
    embedding = model.text_encoder.text_model.embeddings.token_embedding.weight
    written = model.text_encoder.text_model.final_layer_norm.weight
    with torch.no_grad():
        written.add_(1.0)  # copy-on-write: this page of the mapping is now the process's own
        expected_written = written.clone()
        embedding_sum = embedding.sum()  # reads every page; a forward pass reads only its tokens' rows
        before = model.text_encoder(ids)
        resident_before = resident_file_bytes()
        release_weights(model.text_encoder)
        assert resident_before - resident_file_bytes() > 0.9 * embedding.numel() * 4
        assert cached_file_bytes(tmp_path / "model.safetensors") > embedding.numel() * 4  # (MADV_PAGEOUT evicted it)
        assert torch.equal(written, expected_written)
        assert torch.equal(embedding.sum(), embedding_sum)
        assert torch.equal(model.text_encoder(ids), before)


@pytest.mark.skipif(sys.platform != "linux", reason="posix_fadvise and mincore as Linux has them")
def test_prefetch_reads_the_file_into_the_os_cache_without_mapping_it(tmp_path):
    """load_single_file asks for the text encoders' and the UNet's bytes ahead of their use (TensorFile.prefetch): on
    a background thread, the file ends up in the OS's cache, and the process's resident memory does not grow."""
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, *small_sd(2))
    size = path.stat().st_size
    descriptor = os.open(path, os.O_RDONLY)
    os.fsync(descriptor)
    os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)  # as after a reboot
    os.close(descriptor)
    assert cached_file_bytes(path) < 0.1 * size
    file = TensorFile(path)
    resident_before = resident_file_bytes()
    file.prefetch(file.keys[:3], file.keys[3:])
    for thread in threading.enumerate():
        if thread.name == "sd_scratch prefetch":
            thread.join(timeout=60)
    for _ in range(100):  # the thread has asked for every byte; the reads themselves may still be under way
        if cached_file_bytes(path) > 0.9 * size:
            break
        time.sleep(0.1)
    assert cached_file_bytes(path) > 0.9 * size
    assert resident_file_bytes() - resident_before < 0.05 * size


def _metadata(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["sd_scratch"])


def test_ignored_keys_are_ignored_and_unknown_ones_named(sd1_file, tmp_path):
    path, _ = sd1_file
    tensors = load_file(str(path))
    tensors["betas"] = torch.zeros(1000)
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None]
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    load_checkpoint(tmp_path / "extra.safetensors")

    tensors["lora_unet_down.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(CheckpointError, match="lora_unet_down.alpha"):
        load_checkpoint(tmp_path / "unknown.safetensors")


def test_missing_tensor_is_named(sd1_file, tmp_path):
    path, _ = sd1_file
    tensors = load_file(str(path))
    del tensors["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"]
    save_file(tensors, str(tmp_path / "missing.safetensors"))
    named = r"1 missing \(input_blocks\.1\.1\.transformer_blocks\.0\.attn2\.to_v\.weight\)"
    with pytest.raises(CheckpointError, match="UNet .*" + named):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_every_missing_tensor_is_named_up_to_twenty(sd1_file, tmp_path):
    path, _ = sd1_file
    tensors = load_file(str(path))
    gone = sorted(k for k in tensors if k.startswith("model.diffusion_model.output_blocks."))[:25]
    for key in gone:
        del tensors[key]
    save_file(tensors, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path / "missing.safetensors")
    message = str(error.value)
    named = sorted(key.removeprefix("model.diffusion_model.") for key in gone)
    assert f"25 missing ({', '.join(named[:20])} and 5 more), 0 unexpected (none)" in message
    assert "\n" not in message


@pytest.mark.parametrize("setting, message", [
    ({"rescale_betas_zero_snr": True}, "sets rescale_betas_zero_snr = True, which sd_scratch does not implement"),
    ({"trained_betas": [0.1] * 1000}, "sets trained_betas"),
    ({"beta_schedule": "squaredcos_cap_v2"},
     "names beta_schedule 'squaredcos_cap_v2'; sd_scratch knows scaled_linear, linear"),
    ({"timestep_spacing": "evenly"}, "names timestep_spacing 'evenly'"),
    ({"prediction_type": "sample"}, "names prediction_type 'sample'; sd_scratch knows epsilon, v_prediction"),
])
def test_a_scheduler_config_asking_for_what_we_do_not_do_is_refused(sd1_file, tmp_path, setting, message):
    folder = tmp_path / "folder"
    (folder / "scheduler").mkdir(parents=True)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({"beta_schedule": "scaled_linear", **setting}))
    from sd_scratch.loading.diffusers_folder import read_scheduler_config
    with pytest.raises(CheckpointError, match=message) as error:
        read_scheduler_config(path)
    assert "\n" not in str(error.value)


def test_pickled_ckpt_is_read_weights_only(sd1_file, tmp_path):
    path, networks = sd1_file
    torch.save({"state_dict": load_file(str(path)), "global_step": 1}, tmp_path / "model.ckpt")
    model = load_checkpoint(tmp_path / "model.ckpt")
    x = sample_inputs(64)
    assert torch.equal(outputs(model.text_encoder, model.unet, model.vae, x)["text"], outputs(*networks, x)["text"])


class RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": RunsCode()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("missing", "checkpoint not found: .*weights/"),
    ("text", "not a readable safetensors file"),
    ("truncated", "not a readable safetensors file|damaged"),
    ("vae_only", "looks like a VAE on its own"),
    ("other_model", "unknown model"),
    ("empty_folder", "has no unet/"),
])
def test_bad_checkpoints_get_one_line_errors(sd1_file, tmp_path, case, message):
    path, (_, _, vae) = sd1_file
    target = tmp_path / "bad.safetensors"
    if case == "text":
        target.write_text("hello, I am not a checkpoint\n")
    elif case == "truncated":
        target.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "vae_only":
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(target))
    elif case == "other_model":
        save_file({"classifier.weight": torch.zeros(3, 3)}, str(target))
    elif case == "empty_folder":
        target = tmp_path / "folder"
        target.mkdir()
    elif case == "missing":
        target = tmp_path / "nowhere.safetensors"
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(target)
    assert "\n" not in str(error.value)
