"""Reading generation parameters back: our own PNGs' text and infotexts as the AUTOMATIC1111 web UI writes them.

The A1111 infotexts here are written out by hand in its format (settings on the last line, in its key order,
values with a comma, colon or newline in JSON quotes); the prompts are made up for these tests.
"""

from types import SimpleNamespace

import pytest
from PIL import Image

from sd_scratch.images import (Parameters, parameters_text, parse_parameters, quote_value, read_parameters,
                               save_png, settings_from_parameters)

# ---- writing: quote_value, and texts we wrote before stay byte for byte the same ---------------------------


@pytest.mark.parametrize("value, written", [
    ("seascape, v2", '"seascape, v2"'),  # a comma would end the value
    ("easynegative: c74b4e810b03", '"easynegative: c74b4e810b03"'),  # a colon would read as a key
    ("two\nlines", '"two\\nlines"'),  # a newline would break the settings line
    ('say "cheese", then', '"say \\"cheese\\", then"'),  # quotes inside are escaped once quoted
    ('my"model', 'my"model'),  # a quote alone needs no quoting
    ("café, crème", '"café, crème"'),  # not escaped to \\u00e9 (ensure_ascii=False)
    ("東京: 夜", '"東京: 夜"'),
    ("DPM++ 2M SDE", "DPM++ 2M SDE"),
    ("UniPC (order 3)", "UniPC (order 3)"),
    ("512x768", "512x768"),
    (7.5, "7.5"),
    (42, "42"),
    ("", ""),
])
def test_quote_value(value, written):
    assert quote_value(value) == written


def test_the_docstring_example_is_unchanged():
    settings = {"Steps": 25, "Sampler": "Euler", "CFG scale": 7.5, "Seed": 42, "Size": "64x64", "Model": "tiny_sd"}
    assert parameters_text("a red circle on a blue background", "blurry", settings) == (
        "a red circle on a blue background\n"
        "Negative prompt: blurry\n"
        "Steps: 25, Sampler: Euler, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: tiny_sd")


def describe_with(**options):
    """What sample.describe writes for a PNG (imported here: the reading tests need none of the loop)."""
    from sd_scratch.sample import describe

    model = SimpleNamespace(skip_last_layers=0, source="/checkpoints/small_sd.safetensors", loras=[], vae_file=None, unet=None)
    settings = dict(steps=4, guidance=5.0, sampler="dpmpp_2m", spacing=None, schedule_type="karras", eta=None,
                    height=24, width=40, skip_last_layers=None, strength=None) | options
    return describe(model, ["a green square on a white background"], "red", 123, **settings)[0]


def test_what_describe_writes_is_unchanged():
    # as tests/test_cli.py reads it from the PNG, and with every optional field
    assert describe_with() == ("a green square on a white background\nNegative prompt: red\n"
                               "Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.0, Seed: 123, "
                               "Size: 40x24, Model: small_sd")
    assert describe_with(sampler="unipc_3", schedule_type="spaced", spacing="trailing", eta=0.25, strength=0.5,
                         skip_last_layers=1).endswith(
        "Steps: 4, Sampler: UniPC (order 3), CFG scale: 5.0, Seed: 123, Size: 40x24, Model: small_sd, Clip skip: 2, "
        "Denoising strength: 0.5, Eta: 0.25, Spacing: trailing")


# ---- our own texts round trip ---------------------------------------------------------------------------------

OUR_SETTINGS = {"Steps": 25, "Sampler": "DPM++ 2M SDE", "Schedule type": "SGM Uniform", "CFG scale": 7.5,
                "Seed": 4294967296, "Size": "512x768", "Model": "seascape, v2: final", "Clip skip": 2,
                "Denoising strength": 0.75, "Eta": 0.5, "Spacing": "leading"}


@pytest.mark.parametrize("prompt, negative_prompt", [
    ("a red circle on a blue background", "blurry"),
    ("a harbour at dawn\nfishing boats\nsoft mist", "blurry\nlowres\ntext"),  # several lines each
    ("a harbour at dawn", ""),  # no negative prompt
    ("portrait: an old sailor, weathered face, (pipe:1.2)", "watermark: signature, jpeg artifacts"),
    ("Steps: 3, Sampler: Euler, Seed: 1\na harbour", "Seed: 2, Size: 8x8, Steps: 1"),  # settings-like lines
])
def test_our_texts_round_trip(prompt, negative_prompt):
    parsed = parse_parameters(parameters_text(prompt, negative_prompt, OUR_SETTINGS))
    assert parsed == Parameters(prompt, negative_prompt, {key: str(value) for key, value in OUR_SETTINGS.items()})


def test_our_png_round_trips_to_the_options_that_made_it(tmp_path):
    text = describe_with(sampler="euler_a", schedule_type="exponential", spacing="trailing", eta=0.25,
                         skip_last_layers=1, strength=0.5)
    with Image.new("RGB", (40, 24)) as image:
        path = save_png(image, tmp_path / "sample-00000.png", text)
    parsed = parse_parameters(read_parameters(path))
    assert (parsed.prompt, parsed.negative_prompt) == ("a green square on a white background", "red")
    assert settings_from_parameters(parsed) == (
        dict(steps=4, sampler="euler_a", schedule_type="exponential", guidance=5.0, seed=123, width=40, height=24,
             skip_last_layers=1, strength=0.5, eta=0.25, spacing="trailing"), [])


@pytest.mark.parametrize("sampler, schedule_type", [("euler", "spaced"), ("ddim", "spaced"), ("heun", "karras"),
                                                    ("dpmpp_3m_sde", "ays"), ("euler_cfgpp", "beta")])
def test_describe_round_trips_sampler_and_schedule(sampler, schedule_type):
    options, not_understood = settings_from_parameters(parse_parameters(
        describe_with(sampler=sampler, schedule_type=schedule_type)))
    assert options["sampler"] == sampler and not_understood == []
    assert options.get("schedule_type", "spaced") == schedule_type  # "spaced" is written as no schedule type
    assert "skip_last_layers" not in options  # no "Clip skip": the model's own layer (here the last)


def test_a_strip_of_steps_says_nothing_more():
    parsed = parse_parameters(describe_with() + ", Preview every: 2 steps")  # as cli.py writes the strip's PNG
    assert parsed.settings["Preview every"] == "2 steps"
    assert settings_from_parameters(parsed)[1] == []


# ---- AUTOMATIC1111's infotexts ----------------------------------------------------------------------------------

A1111_TEXTS = {
    "v1.10 txt2img, hashes and a LoRA": (
        "watercolor of a fox in a birch forest, autumn, (golden light:1.1), <lora:inkwash_v3:0.7>\n"
        "Negative prompt: easynegative, badhands, photo, 3d render\n"
        "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 512x768, "
        "Model hash: abcdef1234, Model: dreamy_mix_v4, Clip skip: 2, "
        'TI hashes: "easynegative: c74b4e810b03, badhands: 123456789abc", '
        'Lora hashes: "inkwash_v3: 0f1e2d3c4b5a", Version: v1.10.1',
        Parameters(
            "watercolor of a fox in a birch forest, autumn, (golden light:1.1), <lora:inkwash_v3:0.7>",
            "easynegative, badhands, photo, 3d render",
            {"Steps": "28", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "6.5", "Seed": "3141592653",
             "Size": "512x768", "Model hash": "abcdef1234", "Model": "dreamy_mix_v4", "Clip skip": "2",
             "TI hashes": "easynegative: c74b4e810b03, badhands: 123456789abc",
             "Lora hashes": "inkwash_v3: 0f1e2d3c4b5a", "Version": "v1.10.1"}),
        dict(steps=28, sampler="dpmpp_2m", schedule_type="karras", guidance=6.5, seed=3141592653, width=512,
             height=768, skip_last_layers=1),
        []),
    "before v1.9: the schedule inside the sampler's name": (
        "cozy cabin interior, fireplace, snow outside the window, highly detailed\n"
        "Negative prompt: lowres, blurry\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1984, Size: 768x512, Model hash: 7f96a1a9ca, "
        "Model: cabin_realism, Batch size: 4, Batch pos: 2, ENSD: 31337, Version: v1.6.0",
        Parameters(
            "cozy cabin interior, fireplace, snow outside the window, highly detailed", "lowres, blurry",
            {"Steps": "20", "Sampler": "DPM++ 2M Karras", "CFG scale": "7", "Seed": "1984", "Size": "768x512",
             "Model hash": "7f96a1a9ca", "Model": "cabin_realism", "Batch size": "4", "Batch pos": "2",
             "ENSD": "31337", "Version": "v1.6.0"}),
        dict(steps=20, sampler="dpmpp_2m", schedule_type="karras", guidance=7.0, seed=1984, width=768, height=512),
        ["ENSD"]),
    "hires fix, several prompt lines": (
        "a knight resting under an oak tree\n"
        "BREAK\n"
        "dappled sunlight, bokeh\n"
        "Negative prompt: extra fingers\n"
        "cropped, out of frame\n"
        "Steps: 25, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5.5, Seed: 77, Size: 512x512, "
        "Model hash: 0123456789, Model: knights_v1, Denoising strength: 0.45, Hires upscale: 2, Hires steps: 12, "
        "Hires upscaler: R-ESRGAN 4x+, Version: v1.10.1",
        Parameters(
            "a knight resting under an oak tree\nBREAK\ndappled sunlight, bokeh",
            "extra fingers\ncropped, out of frame",
            {"Steps": "25", "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": "5.5", "Seed": "77",
             "Size": "512x512", "Model hash": "0123456789", "Model": "knights_v1", "Denoising strength": "0.45",
             "Hires upscale": "2", "Hires steps": "12", "Hires upscaler": "R-ESRGAN 4x+", "Version": "v1.10.1"}),
        dict(steps=25, sampler="euler_a", guidance=5.5, seed=77, width=512, height=512, strength=0.45),
        ["Hires upscale", "Hires steps", "Hires upscaler"]),
    "img2img with a variation seed, CPU noise and an eta": (
        "the same street at night, neon signs, rain\n"
        "Negative prompt: daylight\n"
        "Steps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 8, Seed: 5, Size: 640x448, "
        "Model hash: fedcba9876, Model: city_scapes, VAE hash: 235745af8d, VAE: vae-ft-mse-840000-ema-pruned.ckpt, "
        "Denoising strength: 0.6, Eta: 0.8, Variation seed: 99, Variation seed strength: 0.3, RNG: CPU, "
        "Init image hash: 1a2b3c4d5e6f, Version: v1.9.4",
        Parameters(
            "the same street at night, neon signs, rain", "daylight",
            {"Steps": "30", "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": "8", "Seed": "5",
             "Size": "640x448", "Model hash": "fedcba9876", "Model": "city_scapes", "VAE hash": "235745af8d",
             "VAE": "vae-ft-mse-840000-ema-pruned.ckpt", "Denoising strength": "0.6", "Eta": "0.8",
             "Variation seed": "99", "Variation seed strength": "0.3", "RNG": "CPU", "Init image hash": "1a2b3c4d5e6f",
             "Version": "v1.9.4"}),
        dict(steps=30, sampler="euler_a", guidance=8.0, seed=5, width=640, height=448, strength=0.6, eta=0.8),
        ["Variation seed", "Variation seed strength", "RNG"]),
    "sigma overrides, no negative prompt": (
        "macro photo of a dewdrop on a leaf\n"
        "Steps: 40, Sampler: DPM++ SDE Karras, CFG scale: 4.5, Seed: 2024, Size: 576x576, Model hash: 1122334455, "
        "Schedule max sigma: 10, Schedule min sigma: 0.05, Clip skip: 1",
        Parameters(
            "macro photo of a dewdrop on a leaf", "",
            {"Steps": "40", "Sampler": "DPM++ SDE Karras", "CFG scale": "4.5", "Seed": "2024", "Size": "576x576",
             "Model hash": "1122334455", "Schedule max sigma": "10", "Schedule min sigma": "0.05", "Clip skip": "1"}),
        dict(steps=40, sampler="dpmpp_sde", schedule_type="karras", guidance=4.5, seed=2024, width=576, height=576,
             skip_last_layers=0),
        ["Schedule max sigma", "Schedule min sigma"]),
    "SDXL size, exponential schedule, face restoration": (
        "full body portrait of an astronaut gardener, greenhouse on mars\n"
        "Negative prompt: deformed hands\n"
        "Steps: 35, Sampler: DPM++ 2M SDE, Schedule type: Exponential, CFG scale: 5, Seed: 8, "
        "Face restoration: CodeFormer, Size: 832x1216, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, "
        "TI hashes: \"deformed hands: 6e8a9c0d1b2f\", Version: v1.10.1",
        Parameters(
            "full body portrait of an astronaut gardener, greenhouse on mars", "deformed hands",
            {"Steps": "35", "Sampler": "DPM++ 2M SDE", "Schedule type": "Exponential", "CFG scale": "5", "Seed": "8",
             "Face restoration": "CodeFormer", "Size": "832x1216", "Model hash": "31e35c80fc",
             "Model": "sd_xl_base_1.0", "TI hashes": "deformed hands: 6e8a9c0d1b2f", "Version": "v1.10.1"}),
        dict(steps=35, sampler="dpmpp_2m_sde", schedule_type="exponential", guidance=5.0, seed=8, width=832,
             height=1216),
        ["Face restoration"]),
    "DDIM with its eta, Align Your Steps elsewhere": (
        "an ink sketch of a lighthouse\n"
        "Steps: 50, Sampler: DDIM, Schedule type: Automatic, CFG scale: 9, Seed: 0, Size: 512x512, "
        "Eta DDIM: 0.5, Model: sd_v15",
        Parameters(
            "an ink sketch of a lighthouse", "",
            {"Steps": "50", "Sampler": "DDIM", "Schedule type": "Automatic", "CFG scale": "9", "Seed": "0",
             "Size": "512x512", "Eta DDIM": "0.5", "Model": "sd_v15"}),
        dict(steps=50, sampler="ddim", guidance=9.0, seed=0, width=512, height=512, eta=0.5),
        []),
    "Align Your Steps, keys with - and /": (
        "isometric tiny island, low poly\n"
        "Negative prompt: text, logo\n"
        "Steps: 10, Sampler: Euler, Schedule type: Align Your Steps, CFG scale: 3.5, Seed: 17, Size: 1024x1024, "
        "Noise multiplier: 1.02, SD-XL refiner/switch: 0.8, Version: v1.10.0",
        Parameters(
            "isometric tiny island, low poly", "text, logo",
            {"Steps": "10", "Sampler": "Euler", "Schedule type": "Align Your Steps", "CFG scale": "3.5", "Seed": "17",
             "Size": "1024x1024", "Noise multiplier": "1.02", "SD-XL refiner/switch": "0.8", "Version": "v1.10.0"}),
        dict(steps=10, sampler="euler", schedule_type="ays", guidance=3.5, seed=17, width=1024, height=1024),
        ["Noise multiplier", "SD-XL refiner/switch"]),
}


@pytest.mark.parametrize("text, parameters, options, not_understood", A1111_TEXTS.values(), ids=A1111_TEXTS)
def test_a1111_infotexts(text, parameters, options, not_understood):
    parsed = parse_parameters(text)
    assert parsed == parameters
    assert list(parsed.settings) == list(parameters.settings)  # in the text's order
    assert settings_from_parameters(parsed) == (options, not_understood)


def test_a_last_line_with_fewer_than_three_pairs_is_prompt():
    text = "a bowl of ramen\nstyle: ukiyo-e, mood: calm"
    assert parse_parameters(text) == Parameters(text, "", {})
    assert settings_from_parameters(parse_parameters(text)) == ({}, [])  # a prompt alone sets nothing
    with_negative = "a bowl of ramen\nNegative prompt: steam\nStyle: flat, Seed: 3"
    assert parse_parameters(with_negative) == Parameters("a bowl of ramen", "steam\nStyle: flat, Seed: 3", {})
    three = parse_parameters("a bowl of ramen\nstyle: ukiyo-e, mood: calm, Seed: 3")
    assert three == Parameters("a bowl of ramen", "", {"style": "ukiyo-e", "mood": "calm", "Seed": "3"})


def test_a1111s_reading_rules_for_odd_text():
    text = ("\n\n  a tea house  \n\n  by the river\nNegative prompt:\nfog\nNegative prompt: haze\n"
            'Steps: 20 , Sampler: Euler, Seed: , CFG scale: "7", Size: 512x512, x: 1, Tiling, Model: "broken\\q"\n')
    parsed = parse_parameters(text)
    assert parsed.prompt == "a tea house\n\nby the river"  # lines stripped, leading empty lines dropped
    assert parsed.negative_prompt == "fog\nhaze"  # an empty first line dropped; a repeated prefix too
    # "Seed: " has no value and is left out; "x" is one letter, not a key; "Tiling" has no colon; a quoted
    # value that is no JSON string stays as written
    assert parsed.settings == {"Steps": "20 ", "Sampler": "Euler", "CFG scale": "7", "Size": "512x512",
                               "Model": '"broken\\q"'}
    assert settings_from_parameters(parsed)[0]["steps"] == 20


@pytest.mark.parametrize("sampler, name, schedule_type", [
    ("dpm++ 2m sde", "dpmpp_2m_sde", None),  # any case
    ("dpmpp_2m_sde", "dpmpp_2m_sde", None),  # our own name
    ("DPM++ 2M SDE Karras", "dpmpp_2m_sde", "karras"),
    ("DPM++ 2M SDE Exponential", "dpmpp_2m_sde", "exponential"),
    ("DPM++ 2M SDE Heun Karras", "dpmpp_2m_sde_heun", "karras"),
    ("DPM2 a Karras", "dpm2_a", "karras"),
    ("LMS Karras", "lms", "karras"),
    ("Euler a", "euler_a", None),
    ("UniPC (order 3)", "unipc_3", None),
    ("Euler CFG++", "euler_cfgpp", None),
])
def test_sampler_labels(sampler, name, schedule_type):
    options, _ = settings_from_parameters(Parameters("", "", {"Sampler": sampler, "Steps": "2", "Seed": "1"}))
    assert (options["sampler"], options.get("schedule_type")) == (name, schedule_type)


def test_the_schedule_in_the_samplers_label_wins_over_the_field():
    # as A1111 reads it; either order
    for settings in ({"Sampler": "DPM++ 2M Karras", "Schedule type": "Exponential"},
                     {"Schedule type": "Exponential", "Sampler": "DPM++ 2M Karras"}):
        assert settings_from_parameters(Parameters("", "", settings))[0]["schedule_type"] == "karras"
    assert "schedule_type" not in settings_from_parameters(Parameters("", "", {"Schedule type": "Uniform"}))[0]


@pytest.mark.parametrize("key, value, message", [
    ("Sampler", "Restart", "sampler 'Restart' in the parameters is none of ours: Euler, Euler a, "),
    ("Sampler", "DPM adaptive", "sampler 'DPM adaptive' in the parameters is none of ours: "),
    ("Sampler", "DPM++ 2M Polyexponential", "sampler 'DPM++ 2M Polyexponential' in the parameters is none of ours: "),
    ("Schedule type", "KL Optimal", "schedule type 'KL Optimal' in the parameters is none of ours: Automatic, "),
    ("Steps", "twenty", "Steps 'twenty' in the parameters is not a whole number"),
    ("Seed", "12.5", "Seed '12.5' in the parameters is not a whole number"),
    ("CFG scale", "high", "CFG scale 'high' in the parameters is not a number"),
    ("CFG scale", "nan", "CFG scale in the parameters must be a finite number, got nan"),
    ("Denoising strength", "0,5", "Denoising strength '0,5' in the parameters is not a number"),
    ("Eta", "", None),  # empty: taken as absent, like A1111 (no error)
    ("Size", "512 by 768", "Size '512 by 768' in the parameters is not WIDTHxHEIGHT, such as 512x768"),
    ("Clip skip", "0", "Clip skip '0' in the parameters is below 1, the last layer"),
    ("Clip skip", "two", "Clip skip 'two' in the parameters is not a whole number"),
    ("Spacing", "quad", "Spacing 'quad' in the parameters is none of ours: leading, linspace, trailing"),
])
def test_errors_are_one_line_naming_field_and_value(key, value, message):
    text = f"a prompt\nSteps: 20, Seed: 1, Size: 64x64, {key}: {quote_value(value)}"
    if message is None:
        assert "eta" not in settings_from_parameters(parse_parameters(text))[0]
        return
    with pytest.raises(ValueError) as raised:
        settings_from_parameters(parse_parameters(text))
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_a_model_that_skips_a_layer_by_itself_writes_clip_skip_always_and_reads_it_back():
    """SD 2.x reads its text encoder's penultimate layer unless told otherwise: its PNGs say which layer was read,
    also when it was the last, so that --parameters-from restores it; an SD 1.x PNG without the field reads as
    the model's own."""
    from sd_scratch.sample import describe

    sd2 = SimpleNamespace(skip_last_layers=1, source="sd2.safetensors", loras=[], vae_file=None, unet=None)
    settings = dict(steps=4, guidance=5.0, sampler="euler", spacing=None, schedule_type="spaced", eta=None,
                    height=24, width=40, strength=None)
    for asked, written in [(None, "Clip skip: 2"), (0, "Clip skip: 1"), (2, "Clip skip: 3")]:
        text = describe(sd2, ["a"], "", 1, skip_last_layers=asked, **settings)[0]
        assert written in text
        read_back = settings_from_parameters(parse_parameters(text))[0]["skip_last_layers"]
        assert read_back == (1 if asked is None else asked)
