"""The tiny Stable Diffusion that ships in weights/: its procedural dataset, training and evaluation.

    python -m sd_scratch.tiny.train       # trains weights/tiny_sd.safetensors from a fixed seed
    python -m sd_scratch.tiny.evaluate    # samples prompts and scores the colours and shapes from the pixels
    python -m sd_scratch.tiny.train_lora  # trains weights/tiny_lora_diamond.safetensors, a LoRA teaching "diamond"

Why LMS and PNDM fail at guidance 7.5 on this model is a study of its own, outside the package:
experiments/lms_and_pndm/.
"""
