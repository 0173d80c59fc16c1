"""sd_scratch: Stable Diffusion inference written out by hand, to read next to the walkthroughs."""
