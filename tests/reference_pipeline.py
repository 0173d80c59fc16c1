"""diffusers' schedulers and pipelines configured as sd_scratch's samplers (test-only helper)."""

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)

# The v1.5 scheduler_config.json
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, timestep_spacing="leading")


def diffusers_scheduler(name: str, karras: bool = False, prediction_type: str = "epsilon"):
    config = dict(SD15_SCHEDULER, prediction_type=prediction_type)
    if karras:
        config["use_karras_sigmas"] = True
    if name == "euler":
        return EulerDiscreteScheduler(**config)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler(**config)
    if name == "lms":
        return LMSDiscreteScheduler(**config)
    if name == "heun":
        return HeunDiscreteScheduler(**config)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2)
    config.pop("use_karras_sigmas", None)
    if name == "ddim":
        return DDIMScheduler(**config, clip_sample=False, set_alpha_to_one=False)
    if name == "pndm":
        return PNDMScheduler(**config, skip_prk_steps=True, set_alpha_to_one=False)
    raise ValueError(name)
