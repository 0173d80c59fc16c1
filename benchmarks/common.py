"""What the benchmark scripts share: the machine's description, interleaved timing, Markdown tables,
and diffusers' twins of our networks built from the same single file.

Both sides always get the same weights: the original single-file checkpoint, read by sd_scratch as
it is and by diffusers through its own `convert_ldm_*_checkpoint` functions (or, for the loading and
whole-run benchmarks, from the diffusers folder that `write_diffusers_folder` saves once with
diffusers' own `save_pretrained`).
"""

from __future__ import annotations

import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# torch, diffusers and transformers are imported inside the functions that need them: the scripts that
# measure memory start each run in a fresh process, and a child's ru_maxrss starts from its parent's
# peak (Linux carries it over fork and exec), so the parent must stay small.

THREADS = 2
RESULTS_DIR = Path(__file__).parent / "results"
FP32_FILE = Path("/tmp/sd15_random.safetensors")
FP16_FILE = Path("/tmp/sd15_random_fp16.safetensors")
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"  # the CLIP vocabulary, for diffusers' tokenizer
TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"  # twins.py: diffusers' twins of a single file


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    import diffusers
    import torch
    import transformers
    return (f"{cpu_model()}, {THREADS} threads (torch.set_num_threads), torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
            f"{datetime.date.today().isoformat()}")


def time_interleaved(runs: dict[str, callable], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn (a, b, a, b, ...) so that whatever else the
    machine is doing slows both sides alike. `warmup` untimed rounds first."""
    times = {name: [] for name in runs}
    for round_ in range(warmup + repeats):
        for name, run in runs.items():
            gc.collect()
            start = time.perf_counter()
            run()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def summary(values: list[float], unit: str = "s", digits: int = 2) -> str:
    """'median (min-max)'."""
    return (f"{statistics.median(values):.{digits}f} {unit} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def ratio(ours: list[float], theirs: list[float]) -> str:
    return f"{statistics.median(ours) / statistics.median(theirs):.2f}"


def write_table(name: str, title: str, header: list[str], rows: list[list[str]], notes: str = "") -> Path:
    """benchmarks/results/<name>.md: a title, the machine, a table, notes. Also printed."""
    lines = [f"## {title}", "", machine_line(), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if notes:
        lines += ["", notes.strip()]
    text = "\n".join(lines) + "\n"
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(text)
    print(text)
    return path


# --------------------------------------------------------------------------------------------------
# diffusers' side


def diffusers_models(single_file: Path, dtype=None):
    """diffusers' UNet2DConditionModel, AutoencoderKL and transformers' CLIPTextModel holding the
    single file's weights, converted by diffusers' own functions and loaded strictly (tests/twins.py)."""
    import torch
    from safetensors.torch import load_file

    from sd_scratch.text_encoder import TextEncoderConfig
    from sd_scratch.unet import UNetConfig
    from sd_scratch.vae import VAEConfig

    sys.path.insert(0, str(TESTS_DIR))
    from twins import diffusers_twins

    original = load_file(str(single_file))
    twins = diffusers_twins(original, UNetConfig(), VAEConfig(), TextEncoderConfig())
    del original
    return [m.to(dtype or torch.float32).eval().requires_grad_(False) for m in (twins.unet, twins.vae, twins.text_encoder)]


def diffusers_folder(single_file: Path, folder: Path, dtype: str = "float16") -> Path:
    """The single file's weights as a diffusers model folder, written once (in a child process, see above)."""
    if not (folder / "model_index.json").exists():
        code = f"from common import *; write_diffusers_folder(Path({str(single_file)!r}), Path({str(folder)!r}), {dtype!r})"
        subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, check=True)
    return folder


def write_diffusers_folder(single_file: Path, folder: Path, dtype: str) -> None:
    """Save the single file's weights as a diffusers model folder with diffusers' own save_pretrained."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    unet, vae, clip = diffusers_models(single_file, getattr(torch, dtype))
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    tokenizer = CLIPTokenizer.from_pretrained(str(WEIGHTS_DIR), model_max_length=77)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=clip, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def run_in_fresh_process(code: str, *args: str) -> dict:
    """Run `code` in a new Python process (its own ru_maxrss, nothing cached) with `args` as sys.argv[1:],
    and return the JSON object its last line of output prints."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])
