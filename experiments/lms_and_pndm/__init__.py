"""Why LMS and PNDM fail at guidance 7.5 on the tiny model: README.md, and the tools behind it.

    stiffness.py     how stiff guidance makes the sampling ODE, measured along Euler's path
    exact_model.py   the samplers on the exact denoiser of such data, with no network in the loop
"""
