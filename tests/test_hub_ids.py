"""Hugging Face ids as checkpoints (OWNER/NAME, OWNER/NAME/FILE.safetensors), read offline from a cache laid out
as huggingface_hub lays it out: models--OWNER--NAME/refs/main naming a commit, snapshots/<commit>/ its files."""

import re
import shutil

import huggingface_hub
import pytest
import torch
from small_models import small_sd
from twins import write_diffusers_folder

from sd_scratch.cli import main
from sd_scratch.images import read_parameters
from sd_scratch.loading import CheckpointError, load_checkpoint, save_checkpoint
from sd_scratch.loading.hub import from_hub, is_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_snapshot(cache, repo):
    """An empty snapshot folder of `repo` in the hub's cache layout, its main branch at COMMIT."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    snapshot = storage / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two small models as single files (`x`, `y`), `x` as a diffusers folder; a cache holding owner/sd (`x`'s
    folder and its single file), owner/half (`x`'s folder in fp16 only), owner/both (`x` in fp32 and `y` in fp16)."""
    root = tmp_path_factory.mktemp("hub_models")
    for name, seed in [("x", 7), ("y", 8)]:
        save_checkpoint(root / f"{name}.safetensors", *small_sd(1, seed=seed), image_size=32)
    write_diffusers_folder(root / "x.safetensors", root / "x_folder")
    cache = root / "cache"
    snapshot = cached_snapshot(cache, "owner/sd")
    shutil.copytree(root / "x_folder", snapshot, dirs_exist_ok=True)
    shutil.copy(root / "x.safetensors", snapshot / "model.safetensors")
    write_diffusers_folder(root / "x.safetensors", cached_snapshot(cache, "owner/half"), fp16=True)
    both = cached_snapshot(cache, "owner/both")
    shutil.copytree(root / "x_folder", both, dirs_exist_ok=True)
    write_diffusers_folder(root / "y.safetensors", root / "y_half", fp16=True)
    shutil.copytree(root / "y_half", both, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.json", "tokenizer"))
    return root


@pytest.fixture
def offline_cache(models, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(models / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return models / "cache"


def same_weights(a, b, dtype=None):
    for network in ("unet", "vae", "text_encoder"):
        theirs = getattr(b, network).state_dict()
        for name, tensor in getattr(a, network).state_dict().items():
            assert torch.equal(tensor, theirs[name] if dtype is None else theirs[name].to(dtype)), f"{network} {name}"


def test_a_repository_id_loads_its_diffusers_folder_from_the_cache(models, offline_cache):
    model = load_checkpoint("owner/sd")
    same_weights(model, load_checkpoint(models / "x_folder"))
    assert model.kind == "SD 1.x" and model.source == "owner/sd"  # the PNG's "Model: sd", not the commit


def test_a_file_id_loads_that_file_from_the_cache(models, offline_cache):
    model = load_checkpoint("owner/sd/model.safetensors")
    same_weights(model, load_checkpoint(models / "x.safetensors"))
    assert model.source == "owner/sd/model.safetensors"


def test_fp16_takes_the_fp16_variant_where_there_is_one(models, offline_cache):
    half = load_checkpoint("owner/half", dtype=torch.float16)
    same_weights(half, load_checkpoint(models / "x_folder"), dtype=torch.float16)
    assert half.dtype == torch.float16
    # a repository with both variants: fp16 reads the fp16 files (here y's, to tell them apart), fp32 the others
    same_weights(load_checkpoint("owner/both", dtype=torch.float16), load_checkpoint(models / "y.safetensors"),
                 dtype=torch.float16)
    same_weights(load_checkpoint("owner/both"), load_checkpoint(models / "x.safetensors"))
    # without an fp16 variant, fp16 falls back on the full-precision files
    same_weights(load_checkpoint("owner/sd", dtype=torch.float16), half)
    with pytest.raises(CheckpointError, match="the cache lacks unet/diffusion_pytorch_model.safetensors"):
        load_checkpoint("owner/half", dtype=torch.float32)


def test_only_what_loading_reads_is_asked_for_and_fp16_first(monkeypatch, tmp_path):
    """Online (here the hub's snapshot_download stood in for): the patterns name the configs, the tokenizer and
    the weights of one variant; a repository without the fp16 variant is asked again for the full-precision one."""
    asked = []

    def snapshot_download(repo, allow_patterns, cache_dir, local_files_only):
        asked.append(allow_patterns)
        for pattern in allow_patterns:
            if not pattern.endswith(".fp16.safetensors") and "*" not in pattern:
                (tmp_path / pattern).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / pattern).touch()
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert from_hub("owner/sd", fp16=True) == tmp_path
    configs = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer/*",
               "text_encoder_2/config.json", "tokenizer_2/*", "scheduler/scheduler_config.json"]
    weights = ["unet/diffusion_pytorch_model{}.safetensors", "vae/diffusion_pytorch_model{}.safetensors",
               "text_encoder/model{}.safetensors", "text_encoder_2/model{}.safetensors"]  # SDXL's second, if any
    assert asked == [configs + [w.format(".fp16") for w in weights], configs + [w.format("") for w in weights]]


def test_an_sdxl_refiner_repository_without_text_encoder_is_complete(monkeypatch, tmp_path):
    """SDXL's refiner has text_encoder_2/ alone: its snapshot is complete without text_encoder/; a repository
    with neither is not."""
    def snapshot_download(repo, allow_patterns, cache_dir, local_files_only):
        for pattern in allow_patterns:
            if "*" not in pattern and not pattern.startswith("text_encoder/") and (repo == "owner/refiner" or
                                                                                 "text_encoder_2" not in pattern):
                (tmp_path / repo / pattern).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / repo / pattern).touch()
        return str(tmp_path / repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert from_hub("owner/refiner") == tmp_path / "owner/refiner"
    with pytest.raises(CheckpointError, match="gives no text_encoder/model.safetensors"):
        from_hub("owner/broken")


def test_a_path_on_disk_wins_over_an_id(models, offline_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    shutil.copy(models / "y.safetensors", tmp_path / "owner" / "sd")  # a file named like the cached repository
    same_weights(load_checkpoint("owner/sd"), load_checkpoint(models / "y.safetensors"))


def test_hf_home_is_read_when_hf_hub_cache_is_not_set(models, tmp_path, monkeypatch):
    shutil.copytree(models / "cache" / "models--owner--sd", tmp_path / "hub" / "models--owner--sd")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_checkpoint("owner/sd/model.safetensors").kind == "SD 1.x"


@pytest.mark.parametrize("name, is_id", [
    ("owner/name", True), ("stable-diffusion-v1-5/stable-diffusion-v1-5", True), ("owner/name.v2", True),
    ("owner/name/v1-5-pruned-emaonly.safetensors", True), ("owner/name/sub/model.ckpt", True),
    ("weights/model.safetensors", False),  # a missing local file, not the repository "model.safetensors"
    ("owner/name/subfolder", False), ("model.safetensors", False), ("/abs/owner/name", False),
    ("./owner/name", False), ("~/owner/name", False), ("owner/", False),
])
def test_what_reads_as_an_id(name, is_id):
    assert is_hub_id(name) == is_id


def test_the_command_line_takes_an_id(offline_cache, tmp_path):
    assert main(["--checkpoint", "owner/sd", "--steps", "2", "--height", "32", "--width", "32",
                 "--outdir", str(tmp_path)]) == 0
    assert "Model: sd" in read_parameters(tmp_path / "sample-00000.png")


@pytest.mark.parametrize("name", ["owner/missing", "owner/missing/model.safetensors", "owner/sd/other.safetensors"])
def test_an_id_missing_from_the_cache_offline_is_one_line_exit_2(offline_cache, tmp_path, capsys, name):
    out = tmp_path / "out"
    assert main(["--checkpoint", name, "--steps", "1", "--outdir", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(f"{name} is no file or folder here, and as a Hugging Face id it is not found locally and the "
                     r"hub cannot be reached \(HF_HUB_OFFLINE is set\)", err), err
    assert not out.exists() or not any(out.iterdir())
