"""How long merging a LoRA into full-size SD 1.5 takes, and removing it again.

    python benchmarks/lora_apply.py [--repeats 5] [--rank 32]

A rank-32 LoRA of kohya's layout over the layers such files usually change (every linear layer of the UNet's
transformers, their proj_in / proj_out, and the text encoder's attention and MLP: 256 layers, 38 MB at
float16) is written to /tmp, then read (`lora.load_lora`), merged (`lora.apply_loras`) and removed
(`AppliedLoras.remove`) on the random full-size SD 1.5 file (float32, CPU, 2 threads). Reading and merging
are timed apart; the first merge also pages in the touched weights from the checkpoint file. Interleaved with
ours, diffusers does the same on its twins of the same weights: `load_lora_weights` + `fuse_lora`, then
`unfuse_lora` + `unload_lora_weights`. Writes benchmarks/results/lora_apply.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import FP32_FILE, THREADS, WEIGHTS_DIR, diffusers_models, ratio, summary, write_table

LORA_FILE = Path("/tmp/sd15_rank32_lora.safetensors")


def write_lora(model, rank: int) -> None:
    import torch
    from safetensors.torch import save_file

    from sd_scratch.lora import module_paths
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for network, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for ours, theirs in module_paths(model, network).items():
            layer = getattr(model, network).get_submodule(ours)
            wanted = ("transformer_blocks" in ours or ours.endswith(("proj_in", "proj_out"))) if network == "unet" \
                else ("self_attn" in ours or "mlp" in ours)
            if not wanted:
                continue
            shape = layer.weight.shape
            key = prefix + theirs.replace(".", "_")
            tensors[key + ".lora_down.weight"] = (torch.randn(rank, *shape[1:], generator=g) * 0.01).half()
            tensors[key + ".lora_up.weight"] = (torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []),
                                                            generator=g) * 0.01).half()
            tensors[key + ".alpha"] = torch.tensor(float(rank) / 2).half()
    save_file(tensors, str(LORA_FILE))


def diffusers_pipeline():
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    unet, vae, clip = diffusers_models(FP32_FILE)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=clip, scheduler=EulerDiscreteScheduler(),
                                   tokenizer=CLIPTokenizer.from_pretrained(str(WEIGHTS_DIR), model_max_length=77),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    if not FP32_FILE.exists():
        raise SystemExit(f"{FP32_FILE} is missing: run benchmarks/make_full_size_checkpoint.py first")
    import torch
    torch.set_num_threads(THREADS)
    from sd_scratch.loading import load_checkpoint
    from sd_scratch.lora import apply_loras, load_lora
    model = load_checkpoint(FP32_FILE)
    write_lora(model, args.rank)
    alone = []  # first ours alone, as a run of the command line does it (no second model in memory)
    for _ in range(args.repeats):
        start = time.perf_counter()
        applied = apply_loras(model, [(load_lora(LORA_FILE, model), 0.8)])
        alone.append(time.perf_counter() - start)
        applied.remove()
    pipe = diffusers_pipeline()
    reads, merges, removes, theirs_apply, theirs_remove = [], [], [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        pipe.load_lora_weights(str(LORA_FILE))
        pipe.fuse_lora(lora_scale=0.8)
        theirs_apply.append(time.perf_counter() - start)
        start = time.perf_counter()
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        theirs_remove.append(time.perf_counter() - start)
        start = time.perf_counter()
        lora = load_lora(LORA_FILE, model)
        reads.append(time.perf_counter() - start)
        start = time.perf_counter()
        applied = apply_loras(model, [(lora, 0.8)])
        merges.append(time.perf_counter() - start)
        start = time.perf_counter()
        applied.remove()
        removes.append(time.perf_counter() - start)
    ours_apply = [a + b for a, b in zip(reads, merges)]
    layers = len(lora.layers)
    size = LORA_FILE.stat().st_size / 1e6
    write_table("lora_apply", f"A rank-{args.rank} LoRA ({layers} layers, {size:.0f} MB) on full-size SD 1.5, "
                "float32, CPU", ["step", f"sd_scratch (median, min-max of {args.repeats})",
                                 "diffusers: load_lora_weights + fuse_lora; unfuse + unload", "ratio"],
                [["read + merge, alone (before diffusers' models are built)", summary(alone), "", ""],
                 ["read the file (load_lora)", summary(reads), "", ""],
                 ["merge (apply_loras)", summary(merges), "", ""],
                 ["read + merge", summary(ours_apply), summary(theirs_apply), ratio(ours_apply, theirs_apply)],
                 ["remove (put the originals back)", summary(removes, "s", 3), summary(theirs_remove, "s", 3),
                  ratio(removes, theirs_remove)]],
                notes="""
The first merge also reads the touched weights from the checkpoint's pages (its maximum). The rows after the
first are interleaved with diffusers, whose twin models (another 4.3 GB) and their allocations sit between our
merges: each of our merges then also pays for fresh pages of its 1.4 GB of copies, hence the slower times there.
""")


if __name__ == "__main__":
    main()
