"""What turns latents into pictures, on the command line: --preview (vae, approx, taesd) for
--save-intermediates, --vae-decoder taesd for the final pictures, and the safety checker of a diffusers
folder (on by default, --safety-checker, --no-safety-checker). Each saved picture is compared with the
Python API's, and the safety checker's verdicts with diffusers' StableDiffusionSafetyChecker's."""

import shutil

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPConfig
from twins import write_diffusers_folder

from sd_scratch.cli import main, preview_dtype
from sd_scratch.images import read_parameters
from sd_scratch.loading import load_checkpoint
from sd_scratch.loading.safety_checker_file import load_safety_checker
from sd_scratch.loading.single_file import DEFAULT_CHECKPOINT
from sd_scratch.loading.taesd_file import TINY_TAESD, load_taesd, save_taesd
from sd_scratch.sample import generate
from sd_scratch.taesd import TAESD, TAESDConfig

try:  # transformers 5 names the PIL-based processor apart; 4.x has only the one
    from transformers import CLIPImageProcessorPil
except ImportError:
    from transformers import CLIPImageProcessor as CLIPImageProcessorPil

STEPS = 6


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def tiny():
    return load_checkpoint()


def test_approx_and_taesd_previews_are_the_python_api_s(tiny, tmp_path):
    """The strip of --save-intermediates K --preview KIND holds exactly the previews generate(preview=KIND) makes,
    and the final picture is the VAE's either way. (The command line's TAESD previews are in bfloat16 on a CPU
    that computes it natively: cli.preview_dtype.)"""
    taesd = load_taesd(TINY_TAESD, latent_channels=4, downsampling_factor=4,
                       dtype=preview_dtype(torch.device("cpu"), torch.float32))
    for kind, decoder in [("approx", "approx"), ("taesd", taesd)]:
        out = tmp_path / kind
        assert main(["--steps", str(STEPS), "--save-intermediates", "2", "--preview", kind, "--outdir", str(out)]) == 0
        python = generate(tiny, "a red circle on a blue background", steps=STEPS, guidance=3.0, seed=42,
                          preview_every=2, preview=decoder, progress=False)
        assert len(python.previews) == 3
        strip = pixels(out / "sample-00000-steps.png")
        size = python.images.shape[-1]
        for k, preview in enumerate(python.previews):
            expected = np.asarray(Image.fromarray((preview[0].permute(1, 2, 0).numpy() * 255).round()
                                                  .astype(np.uint8)))
            assert np.array_equal(strip[:, k * size:(k + 1) * size], expected), (kind, k)
        assert np.array_equal(pixels(out / "sample-00000.png"), np.asarray(python.pil_images[0]))
        assert read_parameters(out / "sample-00000-steps.png").endswith(
            f"Preview every: 2 steps, Preview: {'approx' if kind == 'approx' else 'tiny_taesd'}")


def test_previews_in_bfloat16_where_the_cpu_has_it_and_close_to_float32(tiny):
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert preview_dtype(torch.device("cpu"), torch.float32) == (torch.bfloat16 if native else torch.float32)
    assert preview_dtype(torch.device("cpu"), torch.float16) == torch.float16  # a half model: its own dtype
    assert preview_dtype(torch.device("cuda"), torch.float32) == torch.float32  # GPUs: no need
    previews = {dtype: generate(tiny, "a red circle on a blue background", steps=STEPS, guidance=3.0, seed=42,
                                preview_every=2, progress=False,
                                preview=load_taesd(TINY_TAESD, 4, 4, dtype=dtype)).previews
                for dtype in (torch.float32, torch.bfloat16)}
    difference = (torch.cat(previews[torch.float32]) - torch.cat(previews[torch.bfloat16])).abs()
    assert difference.max() < 0.04 and difference.mean() < 0.004  # measured: 0.018 and 0.0010


def test_vae_decoder_taesd_decodes_the_final_picture_and_says_so(tiny, tmp_path):
    assert main(["--steps", str(STEPS), "--vae-decoder", "taesd", "--outdir", str(tmp_path)]) == 0
    taesd = load_taesd(TINY_TAESD, latent_channels=4, downsampling_factor=4)
    by_taesd = generate(tiny, "a red circle on a blue background", steps=STEPS, guidance=3.0, seed=42, decoder=taesd,
                        progress=False)
    by_vae = generate(tiny, "a red circle on a blue background", steps=STEPS, guidance=3.0, seed=42, progress=False)
    saved = pixels(tmp_path / "sample-00000.png")
    assert np.array_equal(saved, np.asarray(by_taesd.pil_images[0]))
    # Not the VAE's picture, but close to it: TAESD was distilled from this VAE (33 dB on held-out pictures)
    error = ((by_taesd.images - by_vae.images) ** 2).mean()
    assert 0 < error and 10 * torch.log10(1 / error) > 22
    assert read_parameters(tmp_path / "sample-00000.png").endswith("Model: tiny_sd, Decoder: tiny_taesd")


def test_preview_and_decoder_refusals_are_one_line(capsys, tmp_path):
    out = ["--outdir", str(tmp_path)]
    assert "give --save-intermediates too" in one_line_error(capsys, ["--preview", "approx", *out])
    assert "takes vae or taesd, not 'approx'" in one_line_error(capsys, ["--vae-decoder", "approx", *out])
    assert "takes no path" in one_line_error(capsys, ["--save-intermediates", "2", "--preview", "vae", "x", *out])
    assert "TAESD not found: nowhere.safetensors" in one_line_error(
        capsys, ["--vae-decoder", "taesd", "nowhere.safetensors", *out])
    # A TAESD of 16-channel latents (SD3's, Flux's) for the tiny model's 4
    save_taesd(tmp_path / "taesd3_decoder.safetensors", TAESD(TAESDConfig(latent_channels=16, width=8)))
    err = one_line_error(capsys, ["--save-intermediates", "2", "--preview", "taesd",
                                  str(tmp_path / "taesd3_decoder.safetensors"), *out])
    assert "16-channel latents" in err and "4 channels" in err
    # TAESD without a path is the shipped tiny model's own: another model must name its TAESD
    shutil.copy(DEFAULT_CHECKPOINT, tmp_path / "other.safetensors")
    err = one_line_error(capsys, ["--checkpoint", str(tmp_path / "other.safetensors"), "--vae-decoder", "taesd", *out])
    assert "--vae-decoder taesd needs the TAESD file for other.safetensors" in err
    assert not list(tmp_path.glob("*.png"))


# --- the safety checker of a diffusers folder ---

def place_concepts(checker: StableDiffusionSafetyChecker, embeds: torch.Tensor, flag: int) -> None:
    """Concept 0 fires on picture `flag` alone: its direction is that picture's row of the dual basis of the
    pictures' embeddings (cosine c > 0 with it, 0 with the others), its threshold c / 2 (c is 0.035 here: the
    pictures are alike, so their dual vectors are long). The other concepts and
    the special-care ones point where no picture is (cosine 0) and never fire."""
    embeds = torch.nn.functional.normalize(embeds.double())
    dual = torch.linalg.pinv(embeds)  # (D, N): embeds @ dual = identity
    null = torch.eye(embeds.shape[1], dtype=torch.float64) - embeds.T @ dual.T
    never = torch.nn.functional.normalize(null @ torch.randn(embeds.shape[1], 20, dtype=torch.float64), dim=0).T
    concepts = never[:17].clone()
    concepts[0] = dual[:, flag]
    thresholds = torch.full((17,), 0.3, dtype=torch.float64)
    thresholds[0] = 0.5 / dual[:, flag].norm()  # a score of c / 2 on its picture, -c / 2 + 0 elsewhere
    with torch.no_grad():
        checker.concept_embeds.copy_(concepts)
        checker.concept_embeds_weights.copy_(thresholds)
        checker.special_care_embeds.copy_(never[17:])
        checker.special_care_embeds_weights.copy_(torch.full((3,), 0.2))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny):
    """The tiny model as a diffusers folder with a small random safety checker that flags the first of the two
    pictures of seeds 42 and 43 (and not the second), and the reference checker it was saved from."""
    root = tmp_path_factory.mktemp("tiny_folder")
    write_diffusers_folder(DEFAULT_CHECKPOINT, root, sample_size=16)  # 64x64 pictures, as the single file's
    torch.manual_seed(0)
    config = CLIPConfig(vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, patch_size=14, image_size=224),
                        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2), projection_dim=48)
    reference = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        for name, parameter in reference.vision_model.named_parameters():
            parameter.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.2)
        reference.visual_projection.weight.normal_(0, 0.2)
    processor = CLIPImageProcessorPil()
    pictures = generate(tiny, ["a red circle on a blue background"] * 2, steps=STEPS, guidance=3.0, seed=42,
                        progress=False).pil_images
    clip_input = processor(pictures, return_tensors="pt").pixel_values
    with torch.no_grad():
        place_concepts(reference, reference.visual_projection(reference.vision_model(clip_input)[1]), flag=0)
        _, flags = reference(clip_input=clip_input, images=torch.zeros(2, 3, 8, 8))
    assert list(flags) == [True, False]  # diffusers' verdicts, which ours must give
    reference.save_pretrained(root / "safety_checker")
    processor.save_pretrained(root / "feature_extractor")
    return root


def test_a_folder_s_safety_checker_runs_by_default_and_blacks_out_what_it_flags(folder, tmp_path, capsys):
    argv = ["--checkpoint", str(folder), "--steps", str(STEPS), "--n-samples", "2", "--seed", "42", "--guidance", "3",
            "--save-intermediates", "3", "--preview", "approx"]
    assert main([*argv, "--outdir", str(tmp_path / "checked")]) == 0
    err = capsys.readouterr().err
    assert "the safety checker flagged sample-00000.png as potential NSFW content: it was saved black" in err
    assert "sample-00001" not in err and "image 1 of 2" not in err  # said once, naming the file
    assert main([*argv, "--outdir", str(tmp_path / "unchecked"), "--no-safety-checker"]) == 0
    checked, unchecked = tmp_path / "checked", tmp_path / "unchecked"
    assert not pixels(checked / "sample-00000.png").any()  # black
    assert not pixels(checked / "sample-00000-steps.png").any()  # and so are the steps that led to it
    assert pixels(unchecked / "sample-00000.png").any()
    for name in ("sample-00001.png", "sample-00001-steps.png"):  # the clean picture is untouched
        assert np.array_equal(pixels(checked / name), pixels(unchecked / name))
    assert read_parameters(checked / "sample-00000.png").endswith("Seed: 42, Size: 64x64, Model: " + folder.name
                                                                  + ", Safety checker: blacked out")
    assert "Safety checker" not in read_parameters(checked / "sample-00001.png")
    assert read_parameters(unchecked / "sample-00000.png") == read_parameters(checked / "sample-00001.png").replace(
        "Seed: 43", "Seed: 42")


def test_the_python_api_takes_the_checker_explicitly(folder, tiny):
    checker = load_safety_checker(folder)
    with pytest.warns(UserWarning, match="found potential NSFW content in image 1 of 2 and blacked it out"):
        checked = generate(tiny, ["a red circle on a blue background"] * 2, steps=STEPS, guidance=3.0, seed=42,
                           safety_checker=checker, progress=False)
    unchecked = generate(tiny, ["a red circle on a blue background"] * 2, steps=STEPS, guidance=3.0, seed=42,
                         progress=False)
    assert checked.flagged == [0] and unchecked.flagged == []
    assert not checked.images[0].any() and torch.equal(checked.images[1], unchecked.images[1])


def test_safety_checker_flags_give_one_line_errors(folder, tmp_path, capsys):
    out = ["--outdir", str(tmp_path / "out"), "--steps", "2", "--guidance", "3"]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "feature_extractor")
    err = one_line_error(capsys, ["--checkpoint", str(broken), *out])
    assert "no feature_extractor/preprocessor_config.json" in err and "--no-safety-checker" in err
    assert main(["--checkpoint", str(broken), "--no-safety-checker", *out]) == 0  # the way out works
    capsys.readouterr()
    assert "not both" in one_line_error(capsys, ["--safety-checker", str(folder), "--no-safety-checker", *out])
    assert "is not a folder" in one_line_error(capsys, ["--safety-checker", str(DEFAULT_CHECKPOINT), *out])
    # A folder's checker given to the shipped single file (the same weights): the same verdicts
    for seed, black in [(42, True), (43, False)]:
        outdir = tmp_path / f"seed{seed}"
        assert main(["--safety-checker", str(folder), "--seed", str(seed), "--steps", str(STEPS), "--outdir",
                     str(outdir)]) == 0
        assert pixels(outdir / "sample-00000.png").any() != black
