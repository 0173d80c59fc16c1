"""Checkpoint merging (python -m sd_scratch.merge): the two recipes bit for bit, dtypes, what happens to
tensors in one file only, the recipe in the metadata, and one-line refusals that write nothing."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from small_models import small_sd

import sd_scratch.merge as merging
from sd_scratch.loading import load_checkpoint, save_checkpoint
from sd_scratch.merge import main

ALPHA = 0.3  # not a binary fraction: the rounding of (1 - alpha) and of each product shows


def random_tensors(seed, dtype=torch.float32):
    """A few tensors under SD-like names: one spanning several slices when CHUNK_ELEMENTS is made small."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model.diffusion_model.conv.weight": torch.randn(8, 4, 3, 3, generator=g).to(dtype),
        "model.diffusion_model.conv.bias": torch.randn(8, generator=g).to(dtype),
        "first_stage_model.decoder.norm.weight": (1 + torch.randn(37, generator=g)).to(dtype),
        "model.diffusion_model.empty": torch.zeros(0, 5, dtype=dtype),
    }


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(merging, "CHUNK_ELEMENTS", 16)  # every tensor but the smallest in several slices


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, seed in [("a", 0), ("b", 1), ("c", 2)]:
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(random_tensors(seed), str(paths[name]))
    return paths


def run(*args):
    return main([str(arg) for arg in args])


def test_weighted_sum_is_the_formula_bit_for_bit(files, tmp_path, small_slices):
    out = tmp_path / "m.safetensors"
    assert run(files["a"], files["b"], "--alpha", ALPHA, "--out", out) == 0
    a, b, m = load_file(files["a"]), load_file(files["b"]), load_file(out)
    assert m.keys() == a.keys()
    for key in a:
        expected = (1 - ALPHA) * a[key] + ALPHA * b[key]
        assert m[key].dtype == torch.float32 and m[key].shape == a[key].shape
        assert torch.equal(m[key], expected), key
    assert not torch.equal(m["model.diffusion_model.conv.weight"], a["model.diffusion_model.conv.weight"])


def test_add_difference_is_the_formula_bit_for_bit(files, tmp_path, small_slices):
    out = tmp_path / "m.safetensors"
    assert run(files["a"], files["b"], "--add-difference", files["c"], "--alpha", 0.7, "--out", out) == 0
    (a, b, c), m = (load_file(files[name]) for name in "abc"), load_file(out)
    for key in a:
        assert torch.equal(m[key], a[key] + 0.7 * (b[key] - c[key])), key


def test_alpha_0_and_1_give_a_and_b_and_any_finite_alpha_is_taken(files, tmp_path):
    a, b = load_file(files["a"]), load_file(files["b"])
    for alpha, expected in [(0, a), (1, b)]:
        out = tmp_path / f"m{alpha}.safetensors"
        assert run(files["a"], files["b"], "--alpha", alpha, "--out", out) == 0
        assert all(torch.equal(load_file(out)[key], expected[key]) for key in a)
    assert run(files["a"], files["b"], "--alpha", "-1.5", "--out", tmp_path / "far.safetensors") == 0


def test_fp16_inputs_are_computed_in_float32_and_stored_as_a_is(tmp_path, small_slices):
    paths = [tmp_path / "a16.safetensors", tmp_path / "b32.safetensors"]
    save_file(random_tensors(0, torch.float16), str(paths[0]))
    save_file(random_tensors(1, torch.float32), str(paths[1]))
    a, b = load_file(paths[0]), load_file(paths[1])
    for dtype, expected_dtype in [(None, torch.float16), ("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        out = tmp_path / f"m{dtype}.safetensors"
        assert run(*paths, "--alpha", ALPHA, "--out", out, *(["--dtype", dtype] if dtype else [])) == 0
        m = load_file(out)
        for key in a:
            expected = ((1 - ALPHA) * a[key].float() + ALPHA * b[key]).to(expected_dtype)
            assert m[key].dtype == expected_dtype and torch.equal(m[key], expected), (dtype, key)


def test_integer_tensors_constants_and_keys_in_one_file_only(tmp_path, capsys):
    a, b = random_tensors(0), random_tensors(1)
    position_ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    a |= {"step": torch.tensor([3, 4]), position_ids: torch.arange(77.0)[None], "model_ema.decay": torch.tensor(0.9),
          "betas": torch.linspace(0, 1, 10)}
    b |= {"step": torch.tensor([5, 6]), position_ids: torch.arange(77.0)[None] + 0.5, "model_ema.num_updates":
          torch.tensor(7), "betas": torch.linspace(0, 2, 10)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    out = tmp_path / "m.safetensors"
    assert run(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--alpha", ALPHA, "--out", out) == 0
    m = load_file(out)
    assert m.keys() == a.keys()  # B's model_ema.num_updates is left out: the output has A's tensors
    for key in ["step", position_ids, "model_ema.decay", "betas"]:  # integers, constants, in A only: A's
        assert torch.equal(m[key], a[key]) and m[key].dtype == a[key].dtype, key
    key = "model.diffusion_model.conv.weight"
    assert torch.equal(m[key], (1 - ALPHA) * a[key] + ALPHA * b[key])
    said = capsys.readouterr().out
    assert "merged 4 tensors" in said and "copied 4 from A" in said and "left out 1 that A lacks" in said


def test_the_recipe_and_a_s_metadata_are_in_the_output(tmp_path):
    a, b, c = (tmp_path / f"{name}.safetensors" for name in "abc")
    save_file(random_tensors(0), str(a), metadata={"sd_scratch": '{"x": 1}', "modelspec.title": "A"})
    save_file(random_tensors(1), str(b), metadata={
        "sd_merge_recipe": json.dumps({"type": "webui", "multiplier": 0.5}),
        "sd_merge_models": json.dumps({"f" * 64: {"name": "older.safetensors", "legacy_hash": "12345678"}})})
    save_file(random_tensors(2), str(c))
    out = tmp_path / "m.safetensors"
    assert run(a, b, "--add-difference", c, "--alpha", 0.5, "--dtype", "fp16", "--out", out) == 0
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    sha = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in (a, b, c)}
    assert metadata["sd_scratch"] == '{"x": 1}' and metadata["modelspec.title"] == "A"  # A's, kept
    assert metadata["format"] == "pt"
    recipe = json.loads(metadata["sd_merge_recipe"])
    assert recipe["interp_method"] == "Add difference" and recipe["multiplier"] == 0.5
    assert recipe["save_as_half"] is True and recipe["formula"] == "A + 0.5 * (B - C)"
    assert (recipe["primary_model_hash"], recipe["secondary_model_hash"], recipe["tertiary_model_hash"]) == (
        sha[a], sha[b], sha[c])
    assert recipe["models"]["B"] == {"name": "b.safetensors", "bytes": b.stat().st_size, "sha256": sha[b]}
    models = json.loads(metadata["sd_merge_models"])
    assert models[sha[a]]["name"] == "a.safetensors" and models[sha[c]]["sd_merge_recipe"] is None
    assert models[sha[b]]["sd_merge_recipe"] == {"type": "webui", "multiplier": 0.5}  # B's own recipe, nested
    assert models["f" * 64]["name"] == "older.safetensors"  # and the models B was merged from
    assert len(models[sha[a]]["legacy_hash"]) == 8


def test_weighted_sum_recipe_names_two_models(files, tmp_path):
    out = tmp_path / "m.safetensors"
    assert run(files["a"], files["b"], "--alpha", ALPHA, "--out", out) == 0
    with safe_open(str(out), "pt") as f:
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert recipe["interp_method"] == "Weighted sum" and recipe["multiplier"] == ALPHA
    assert recipe["tertiary_model_hash"] is None and recipe["save_as_half"] is False
    assert recipe["formula"] == "(1 - 0.3) * A + 0.3 * B"


def test_no_hash_records_sizes_and_names(files, tmp_path):
    out = tmp_path / "m.safetensors"
    assert run(files["a"], files["b"], "--alpha", ALPHA, "--out", out, "--no-hash") == 0
    with safe_open(str(out), "pt") as f:
        recipe, models = (json.loads(f.metadata()[key]) for key in ("sd_merge_recipe", "sd_merge_models"))
    assert recipe["primary_model_hash"] is None and recipe["models"]["A"]["bytes"] == files["a"].stat().st_size
    assert sorted(models) == ["a.safetensors", "b.safetensors"]


def test_a_pickled_checkpoint_is_read_weights_only(files, tmp_path):
    ckpt = tmp_path / "b.ckpt"
    torch.save({"state_dict": load_file(files["b"]), "global_step": 10}, ckpt)
    from_pickle, from_safetensors = tmp_path / "p.safetensors", tmp_path / "s.safetensors"
    assert run(files["a"], ckpt, "--alpha", ALPHA, "--out", from_pickle) == 0
    assert run(files["a"], files["b"], "--alpha", ALPHA, "--out", from_safetensors) == 0
    assert load_file(from_pickle).keys() == load_file(from_safetensors).keys()
    assert all(torch.equal(load_file(from_pickle)[k], v) for k, v in load_file(from_safetensors).items())


def test_merged_small_checkpoints_load_and_hold_the_formula(tmp_path):
    a, b = tmp_path / "small_a.safetensors", tmp_path / "small_b.safetensors"
    save_checkpoint(a, *small_sd(1, seed=1), image_size=32)
    save_checkpoint(b, *small_sd(1, seed=5), image_size=32)
    out = tmp_path / "merged.safetensors"
    assert run(a, b, "--alpha", 0.5, "--out", out) == 0
    model, model_a, model_b = load_checkpoint(out), load_checkpoint(a), load_checkpoint(b)
    assert model.kind == "SD 1.x" and model.image_size == 32
    for name, tensor in model.unet.state_dict().items():
        assert torch.equal(tensor, 0.5 * model_a.unet.state_dict()[name] + 0.5 * model_b.unet.state_dict()[name])


# --------------------------------------------------------------------------------------------------
# Refusals: one line on stderr, exit code 2, nothing written


def refused(capsys, folder, *args) -> str:
    before = sorted(p.name for p in folder.iterdir())
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in folder.iterdir()) == before  # no output, no temporary file
    return err


def test_bad_inputs_are_refused_in_one_line_and_nothing_is_written(files, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(files["b"].read_bytes()[:-10])
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights\n")
    assert "not found" in refused(capsys, tmp_path, files["a"], tmp_path / "missing.safetensors", "--alpha", 0.5,
                                  "--out", out)
    assert "truncated" in refused(capsys, tmp_path, files["a"], truncated, "--alpha", 0.5, "--out", out)
    assert "not a readable safetensors file" in refused(capsys, tmp_path, text, files["b"], "--alpha", 0.5,
                                                        "--out", out)
    assert "'half' is not a finite number" in refused(capsys, tmp_path, files["a"], files["b"], "--alpha", "half",
                                                       "--out", out)
    assert "finite" in refused(capsys, tmp_path, files["a"], files["b"], "--alpha", "nan", "--out", out)
    assert "--alpha" in refused(capsys, tmp_path, files["a"], files["b"], "--out", out)
    assert ".safetensors name" in refused(capsys, tmp_path, files["a"], files["b"], "--alpha", 0.5,
                                          "--out", tmp_path / "m.ckpt")
    assert "is not a file" in refused(capsys, tmp_path, files["a"], tmp_path, "--alpha", 0.5, "--out", out)


def test_an_existing_output_is_kept_unless_forced(files, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"mine")
    assert "exists" in refused(capsys, tmp_path, files["a"], files["b"], "--alpha", 0.5, "--out", out)
    assert out.read_bytes() == b"mine"
    assert run(files["a"], files["b"], "--alpha", 0.5, "--out", out, "--force") == 0
    assert load_file(out).keys() == load_file(files["a"]).keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors",
                                                          "m.safetensors"]


def test_different_architectures_are_refused_naming_the_tensors(files, tmp_path, capsys):
    other = random_tensors(1)
    other["model.diffusion_model.conv.weight"] = torch.zeros(8, 9, 3, 3)  # an inpainting UNet's first conv
    del other["model.diffusion_model.conv.bias"]
    other["model.diffusion_model.extra"] = torch.zeros(3)
    save_file(other, str(tmp_path / "other.safetensors"))
    err = refused(capsys, tmp_path, files["a"], tmp_path / "other.safetensors", "--alpha", 0.5,
                  "--out", tmp_path / "m.safetensors")
    assert "3 tensors differ" in err
    assert "model.diffusion_model.conv.weight (A [8, 4, 3, 3], B [8, 9, 3, 3])" in err
    assert "model.diffusion_model.conv.bias (only in A)" in err and "model.diffusion_model.extra (only in B)" in err
    err = refused(capsys, tmp_path, files["a"], files["b"], "--add-difference", tmp_path / "other.safetensors",
                  "--alpha", 0.5, "--out", tmp_path / "m.safetensors")
    assert "A (a.safetensors) and C (other.safetensors)" in err


def test_sd1_with_sd2_is_refused_naming_both(tmp_path, capsys):
    sd1, sd2 = tmp_path / "sd1.safetensors", tmp_path / "sd2.safetensors"
    save_checkpoint(sd1, *small_sd(1))
    save_checkpoint(sd2, *small_sd(2))  # SD 2.x's networks; its text encoder moved to OpenCLIP's prefix
    tensors = {k.replace("cond_stage_model.transformer.", "cond_stage_model.model."): v
               for k, v in load_file(sd2).items()}
    save_file(tensors, str(sd2))
    err = refused(capsys, tmp_path, sd1, sd2, "--alpha", 0.5, "--out", tmp_path / "m.safetensors")
    assert "(SD 1.x and SD 2.x)" in err and "and " in err.split("tensors differ: ")[1]


def test_a_pickle_holding_code_is_refused(files, tmp_path, capsys):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": load_file(files["b"]), "callback": subprocess.Popen}, evil)
    err = refused(capsys, tmp_path, files["a"], evil, "--alpha", 0.5, "--out", tmp_path / "m.safetensors")
    assert "weights-only" in err


def test_an_interrupted_merge_leaves_nothing(files, tmp_path, capsys, monkeypatch, small_slices):
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return combine(*args)

    combine = merging.combine
    monkeypatch.setattr(merging, "combine", interrupted)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run(files["a"], files["b"], "--alpha", 0.5, "--out", tmp_path / "m.safetensors") == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_the_module_runs_from_the_command_line(files, tmp_path):
    out = tmp_path / "m.safetensors"
    command = [sys.executable, "-m", "sd_scratch.merge", files["a"], files["b"], "--alpha", "0.25", "--out", out]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "merged 4 tensors" in result.stdout and out.exists()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)  # again: out exists
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
