"""The command line's prompt features: --parameters-from, --embedding and --embeddings-dir, and their
one-line errors."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from sd_scratch.cli import main
from sd_scratch.images import read_parameters
from sd_scratch.loading import save_checkpoint
from sd_scratch.tokenizer import PAD_ZERO
from small_models import small_sd

WIDTH = 64  # the small SD 1.x text encoder's


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small_sd.safetensors"
    save_checkpoint(path, *small_sd(1, seed=7), image_size=32)
    return path


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def one_line_error(capsys, expected):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("error: ") and expected in err, err


def test_parameters_from_our_png_gives_the_same_pixels(checkpoint, tmp_path):
    first = tmp_path / "first"
    assert main(["--checkpoint", str(checkpoint), "--prompt", "a (red:1.3) circle, [blue] BREAK on [white:black:2]",
                 "--negative-prompt", "green, " * 30 + "blurry", "--steps", "5", "--guidance", "4.5",
                 "--sampler", "DPM++ 2M SDE", "--schedule", "karras", "--seed", "77", "--height", "24", "--width", "40",
                 "--clip-skip", "1", "--outdir", str(first)]) == 0
    again = tmp_path / "again"
    assert main(["--checkpoint", str(checkpoint), "--parameters-from", str(first / "sample-00000.png"),
                 "--outdir", str(again)]) == 0
    assert read_parameters(again / "sample-00000.png") == read_parameters(first / "sample-00000.png")
    assert np.array_equal(pixels(again / "sample-00000.png"), pixels(first / "sample-00000.png"))


def test_flags_given_win_over_the_pngs_parameters(checkpoint, tmp_path):
    first = tmp_path / "first"
    assert main(["--checkpoint", str(checkpoint), "--prompt", "a cat", "--steps", "4", "--seed", "3",
                 "--outdir", str(first)]) == 0
    second = tmp_path / "second"
    assert main(["--checkpoint", str(checkpoint), "--parameters-from", str(first / "sample-00000.png"),
                 "--seed", "9", "--steps", "3", "--outdir", str(second)]) == 0
    text = read_parameters(second / "sample-00000.png")
    assert text == "a cat\nSteps: 3, Sampler: Euler, CFG scale: 7.5, Seed: 9, Size: 32x32, Model: small_sd"


def write_png(path, parameters):
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_an_a1111_png_is_read_and_what_is_not_used_is_said_in_one_warning(checkpoint, tmp_path, recwarn):
    png = write_png(tmp_path / "a1111.png", "a red circle\nNegative prompt: blurry\n"
                    "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6, Seed: 12, Size: 40x24, "
                    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Hires upscale: 2, "
                    'TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1')
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "--parameters-from", str(png), "--outdir", str(out)]) == 0
    assert [str(w.message) for w in recwarn] == [f"{png}: these settings are not used here: Hires upscale"]
    assert read_parameters(out / "sample-00000.png") == (
        "a red circle\nNegative prompt: blurry\n"
        "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.0, Seed: 12, Size: 40x24, "
        "Model: small_sd, Clip skip: 2")


def test_the_warning_names_the_settings_not_used(checkpoint, tmp_path):
    png = write_png(tmp_path / "a1111.png", "a cat\nSteps: 2, Sampler: Euler, CFG scale: 3, Seed: 1, Size: 32x32, "
                                            "Hires upscale: 2, ENSD: 31337")
    with pytest.warns(UserWarning, match="these settings are not used here: Hires upscale, ENSD"):
        assert main(["--checkpoint", str(checkpoint), "--parameters-from", str(png),
                     "--outdir", str(tmp_path / "out")]) == 0


def test_bad_parameter_sources_are_one_line_errors(checkpoint, tmp_path, capsys):
    bare = write_png(tmp_path / "bare.png", None)
    assert main(["--checkpoint", str(checkpoint), "--parameters-from", str(bare), "--outdir", str(tmp_path)]) == 2
    one_line_error(capsys, "bare.png carries no generation parameters")
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    assert main(["--checkpoint", str(checkpoint), "--parameters-from", str(text), "--outdir", str(tmp_path)]) == 2
    one_line_error(capsys, "cannot read")
    missing = tmp_path / "missing.png"
    assert main(["--checkpoint", str(checkpoint), "--parameters-from", str(missing), "--outdir", str(tmp_path)]) == 2
    one_line_error(capsys, "missing.png")
    restart = write_png(tmp_path / "restart.png", "a cat\nSteps: 4, Sampler: Restart, CFG scale: 1, Seed: 1, Size: 32x32")
    assert main(["--checkpoint", str(checkpoint), "--parameters-from", str(restart), "--outdir", str(tmp_path)]) == 2
    one_line_error(capsys, "Restart")
    assert not list(tmp_path.glob("sample-*.png"))


def test_a_malformed_weight_is_text_and_a_number_that_is_none_is_an_error(checkpoint, tmp_path, capsys):
    assert main(["--checkpoint", str(checkpoint), "--prompt", "a (word:abc) cat", "--steps", "1",
                 "--outdir", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    assert main(["--checkpoint", str(checkpoint), "--prompt", "a (word:1.2.3) cat", "--outdir", str(tmp_path)]) == 2
    one_line_error(capsys, "the emphasis weight '1.2.3'")


def test_embeddings_by_file_and_by_folder_and_their_hashes_in_the_png(checkpoint, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    vectors = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(0))
    save_file({"emb_params": vectors}, str(folder / "glowstyle.safetensors"))
    torch.save({"string_to_param": {"*": vectors[:1]}}, folder / "unused.pt")
    common = ["--checkpoint", str(checkpoint), "--prompt", "a cat, glowstyle", "--steps", "2"]
    assert main([*common, "--embeddings-dir", str(folder), "--outdir", str(tmp_path / "a")]) == 0
    assert main([*common, "--embedding", str(folder / "glowstyle.safetensors"), "--outdir", str(tmp_path / "b")]) == 0
    assert main([*common, "--outdir", str(tmp_path / "c")]) == 0
    import hashlib
    short = hashlib.sha256((folder / "glowstyle.safetensors").read_bytes()).hexdigest()[:12]
    text = read_parameters(tmp_path / "a" / "sample-00000.png")
    assert text.endswith(f'TI hashes: "glowstyle: {short}"')  # only the embedding the prompt used
    assert np.array_equal(pixels(tmp_path / "a" / "sample-00000.png"), pixels(tmp_path / "b" / "sample-00000.png"))
    assert not np.array_equal(pixels(tmp_path / "a" / "sample-00000.png"), pixels(tmp_path / "c" / "sample-00000.png"))


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_bad_embedding_files_are_one_line_errors_and_a_pickle_never_runs(checkpoint, tmp_path, capsys):
    marker = tmp_path / "the pickle ran"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as file:
        pickle.dump({"string_to_param": {"*": RunsCode(marker)}}, file, protocol=2)
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.zeros(1, 1024)}, str(wide))
    common = ["--checkpoint", str(checkpoint), "--outdir", str(tmp_path / "out")]
    for arguments, expected in [(["--embedding", str(evil)], "not loaded, for safety"),
                                (["--embedding", str(wide)], "width 1024"),
                                (["--embedding", str(tmp_path / "absent.pt")], "embedding file not found"),
                                (["--embeddings-dir", str(tmp_path / "nowhere")], "embeddings folder not found")]:
        assert main([*common, *arguments]) == 2
        one_line_error(capsys, expected)
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_sd2_pads_its_chunks_with_zeros(tmp_path):
    """The command line on an SD 2.x-like file: a 2-chunk prompt runs, and its chunks carry OpenCLIP's padding."""
    from sd_scratch.loading import load_checkpoint
    from sd_scratch.prompts import parse_emphasis
    path = tmp_path / "sd2.safetensors"
    save_checkpoint(path, *small_sd(2, seed=1), image_size=32, pad_token_id=PAD_ZERO, skip_last_layers=1)
    chunks = load_checkpoint(path).tokenizer.chunks(parse_emphasis(" ".join(["cat"] * 80)))
    assert chunks.input_ids[1, 6:].tolist() == [49407] + [0] * 70
    assert main(["--checkpoint", str(path), "--prompt", " ".join(["cat"] * 80), "--steps", "1",
                 "--outdir", str(tmp_path / "out")]) == 0
    assert "Clip skip: 2" in read_parameters(tmp_path / "out" / "sample-00000.png")
