"""diffusers' schedulers configured as sd_scratch's samplers (test-only helper)."""

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

# The v1.5 scheduler_config.json (it names no timestep_spacing; the PNDM scheduler it was written for
# spaces its steps "leading").
SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


# sd_scratch's schedule types and the flags diffusers' schedulers name them by.
SCHEDULE_FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}


def reference_scheduler(name: str, spacing: str = "leading", karras: bool = False, prediction_type: str = "epsilon",
                        schedule_type: str = "spaced"):
    config = dict(SD15, timestep_spacing=spacing, prediction_type=prediction_type)
    if karras:
        schedule_type = "karras"
    if schedule_type != "spaced":
        config[SCHEDULE_FLAGS[schedule_type]] = True
    if name == "ddim":
        return DDIMScheduler(**config, clip_sample=False, set_alpha_to_one=False)
    if name == "ddpm":
        return DDPMScheduler(**config, clip_sample=False)  # SD's configs set it false (DDPM's own default: true)
    if name in ("unipc", "unipc_3"):
        return UniPCMultistepScheduler(**config, solver_order=3 if name == "unipc_3" else 2, solver_type="bh2")
    if name == "pndm":
        return PNDMScheduler(**config, skip_prk_steps=True, set_alpha_to_one=False)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2)
    if name in ("dpmpp_2m_sde", "dpmpp_2m_sde_heun"):
        return DPMSolverMultistepScheduler(**config, algorithm_type="sde-dpmsolver++", solver_order=2,
                                           solver_type="heun" if name.endswith("heun") else "midpoint")
    if name == "lcm":  # as LCM-LoRA's users make it: LCMScheduler.from_config(SD's scheduler config)
        return LCMScheduler(**config, clip_sample=False, set_alpha_to_one=False)
    return CLASSES[name](**config)


CLASSES = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler, "lms": LMSDiscreteScheduler,
           "heun": HeunDiscreteScheduler, "ddim": DDIMScheduler, "pndm": PNDMScheduler,
           "dpmpp_2m": DPMSolverMultistepScheduler, "dpmpp_2m_sde": DPMSolverMultistepScheduler,
           "dpmpp_2m_sde_heun": DPMSolverMultistepScheduler, "dpm2": KDPM2DiscreteScheduler,
           "dpm2_a": KDPM2AncestralDiscreteScheduler, "dpmpp_sde": DPMSolverSDEScheduler, "ddpm": DDPMScheduler,
           "unipc": UniPCMultistepScheduler, "unipc_3": UniPCMultistepScheduler, "lcm": LCMScheduler}


def scheduler_from_config(name: str, config: dict):
    """diffusers' scheduler for sampler `name` from a folder's scheduler_config.json, as a diffusers
    user swaps schedulers (`Scheduler.from_config(pipe.scheduler.config)`), run the way we run ours."""
    how = {"pndm": dict(skip_prk_steps=True), "ddpm": dict(clip_sample=False), "unipc": dict(solver_order=2),
           "unipc_3": dict(solver_order=3), "dpmpp_2m": dict(algorithm_type="dpmsolver++", solver_order=2),
           "dpmpp_2m_sde": dict(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="midpoint"),
           "dpmpp_2m_sde_heun": dict(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="heun")}
    return CLASSES[name].from_config({**config, **how.get(name, {})})
