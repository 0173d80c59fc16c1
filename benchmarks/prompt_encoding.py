"""What long prompts cost: encoding a prompt and its negative prompt in 1 and in 4 chunks, interleaved.

    python benchmarks/prompt_encoding.py [--repeats 7]

Full SD 1.5 text encoder (CLIP ViT-L/14, 12 layers, width 768), float32, CPU, 2 threads, the weights
of /tmp/sd15_random.safetensors (make_full_size_checkpoint.py writes it). Each row is what `generate`
does before its loop, `conditioning.schedule_conditioning` for one image with guidance, against the
reference for one chunk: transformers' CLIPTextModel with the same weights, called as diffusers'
`encode_prompt` calls it (the prompt and the negative prompt, each tokenized to 77 and encoded).

Writes benchmarks/results/prompt_encoding.md.
"""

from __future__ import annotations

import argparse

from common import FP32_FILE, THREADS, WEIGHTS_DIR, ratio, summary, time_interleaved, write_table

ONE_CHUNK = "a photograph of an astronaut riding a horse on the moon, (detailed:1.2), [blurry]"
NEGATIVE = "lowres, bad anatomy, (worst quality:1.4)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sd_scratch.conditioning import schedule_conditioning
    from sd_scratch.loading import load_checkpoint
    from sd_scratch.prompts import parse_emphasis

    torch.set_num_threads(THREADS)
    if not FP32_FILE.exists():
        raise SystemExit(f"{FP32_FILE} is missing: run benchmarks/make_full_size_checkpoint.py first")
    model = load_checkpoint(FP32_FILE)
    model.text_encoder.requires_grad_(False)
    four_chunks = ", ".join(["a photograph of an astronaut riding a horse on the moon, (detailed:1.2)"] * 16)
    long_negative = ", ".join([NEGATIVE] * 28)
    for text in (four_chunks, long_negative):
        assert len(model.tokenizer.chunks(parse_emphasis(text)).input_ids) == 4

    c = model.text_encoder.config
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_width,
                                        num_hidden_layers=c.layers, num_attention_heads=c.heads,
                                        max_position_embeddings=c.max_positions, hidden_act=c.activation)).eval()
    clip.load_state_dict({k.removeprefix("text_model."): v for k, v in model.text_encoder.state_dict().items()})
    clip.requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(str(WEIGHTS_DIR), model_max_length=77)

    def ours(prompt, negative):
        with torch.inference_mode():
            return schedule_conditioning(model, [prompt], negative, 25, guided=True)

    def reference_one_chunk():
        with torch.inference_mode():
            for text in (ONE_CHUNK, NEGATIVE):
                ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
                clip(ids.input_ids)

    runs = {"ours, 1 chunk + 1 chunk": lambda: ours(ONE_CHUNK, NEGATIVE),
            "ours, 4 chunks + 4 chunks": lambda: ours(four_chunks, long_negative),
            "ours, 4 chunks + empty negative": lambda: ours(four_chunks, ""),
            "transformers CLIP, 1 chunk + 1 chunk": reference_one_chunk}
    times = time_interleaved(runs, args.repeats, warmup=2)
    one = times["ours, 1 chunk + 1 chunk"]
    reference = times["transformers CLIP, 1 chunk + 1 chunk"]
    rows = [[name, summary(values, "s", 3), ratio(values, one), ratio(values, reference)]
            for name, values in times.items()]
    write_table("prompt_encoding", "Encoding a prompt and its negative prompt, SD 1.5's text encoder, float32, CPU",
                ["what", "time (median, min-max)", "against ours at 1 chunk", "against transformers at 1 chunk"],
                rows, notes=f"""
{args.repeats} interleaved rounds after 2 untimed ones. A prompt of k chunks is k frames of 77 tokens encoded
in one batch of k; with guidance the prompt and the negative prompt are encoded separately (two calls of
the text encoder), and a shorter one is continued with the encoded empty prompt (a third call, once).
The emphasis weighting and the rescaling are a few element-wise operations on (k, 77, 768).
""")


if __name__ == "__main__":
    main()
