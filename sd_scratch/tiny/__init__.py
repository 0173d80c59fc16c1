"""The tiny Stable Diffusion that ships in weights/: its procedural dataset, training and evaluation.

    python -m sd_scratch.tiny.train       # trains weights/tiny_sd.safetensors from a fixed seed
    python -m sd_scratch.tiny.evaluate    # samples prompts and scores the colours and shapes from the pixels
    python -m sd_scratch.tiny.stiffness   # how stiff guidance makes the sampling ODE
    python -m sd_scratch.tiny.exact_model # the samplers on the exact denoiser of such data, no network
"""
