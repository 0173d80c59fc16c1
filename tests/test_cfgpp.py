"""Euler CFG++ (Chung et al. 2024) against the paper's own form of the update, and through the loop and the
command line. diffusers has no CFG++, so the reference is the paper's DDIM-form step, written out here:

    x_prev = sqrt(a_prev) x0_lambda + sqrt(1 - a_prev) eps_u,   x0_lambda = (x_t - sqrt(1 - a) eps_lambda) / sqrt(a)

with eps_lambda = eps_u + lambda (eps_c - eps_u), in the alpha view (x_t = sqrt(a) x0 + sqrt(1 - a) eps), at
the noise levels a = 1 / (sigma^2 + 1) of our plan."""

import pytest
import torch

from sd_scratch import samplers
from sd_scratch.cli import main
from sd_scratch.images import read_parameters
from sd_scratch.loading import load_checkpoint
from sd_scratch.sample import classifier_free_guidance, generate
from test_samplers import STEP_COUNTS, start_noise


def unconditional_model(model_input, t):
    return 0.1 * model_input + 0.01 * t


def conditional_model(model_input, t):
    return 0.1 * model_input + 0.01 * t + 0.3 * torch.sin(model_input)


def run_ours(plan, x, guidance):
    trajectory, state = [], samplers.initial_state(plan)
    for i, t in enumerate(plan.timesteps):
        model_input = samplers.scale_model_input(plan, i, x)
        eps_u, eps_c = unconditional_model(model_input, t), conditional_model(model_input, t)
        x, state = samplers.step(plan, i, x, classifier_free_guidance(eps_u, eps_c, guidance), state,
                                 unconditional_output=eps_u)
        trajectory.append(x)
    return trajectory


def run_paper(plan, x_alpha, guidance):
    """The paper's update in the alpha view; returns each x in the sigma view (x_alpha / sqrt(a)) to compare."""
    trajectory = []
    for i, t in enumerate(plan.timesteps):
        a, a_prev = 1 / (plan.sigmas[i] ** 2 + 1), 1 / (plan.sigmas[i + 1] ** 2 + 1)
        eps_u, eps_c = unconditional_model(x_alpha, t), conditional_model(x_alpha, t)
        eps_lambda = eps_u + guidance * (eps_c - eps_u)
        x0_lambda = (x_alpha - (1 - a) ** 0.5 * eps_lambda) / a**0.5
        x_alpha = a_prev**0.5 * x0_lambda + (1 - a_prev) ** 0.5 * eps_u
        trajectory.append(x_alpha / a_prev**0.5)
    return trajectory


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize("guidance", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("schedule_type", ["spaced", "karras"])
def test_euler_cfgpp_is_the_papers_update(num_steps, guidance, schedule_type):
    plan = samplers.make_plan("euler_cfgpp", num_steps, schedule_type=schedule_type)
    x = start_noise() * plan.init_noise_sigma
    ours = run_ours(plan, x, guidance)
    theirs = run_paper(plan, x / (plan.sigmas[0] ** 2 + 1) ** 0.5, guidance)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5, f"call {i}"


def test_a_cfgpp_step_is_an_euler_step_with_guidance_lambda_sigma_over_the_step():
    plan = samplers.make_plan("euler_cfgpp", 25)
    euler = samplers.make_plan("euler", 25)
    x = start_noise() * plan.init_noise_sigma
    for i in (0, 10, 22):
        model_input = samplers.scale_model_input(plan, i, x)
        t = plan.timesteps[i]
        eps_u, eps_c = unconditional_model(model_input, t), conditional_model(model_input, t)
        cfgpp, _ = samplers.step(plan, i, x, classifier_free_guidance(eps_u, eps_c, 0.6), None,
                                 unconditional_output=eps_u)
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        w = 0.6 * sigma / (sigma - sigma_next)
        assert 1.2 < w < 5
        cfg, _ = samplers.step(euler, i, x, classifier_free_guidance(eps_u, eps_c, w), None)
        torch.testing.assert_close(cfgpp, cfg, rtol=1e-5, atol=1e-5)


def test_the_loop_runs_both_halves_even_at_lambda_1_and_the_picture_is_drawn():
    model = load_checkpoint()
    result = generate(model, "a red circle on a blue background", sampler="euler_cfgpp", guidance=1.0, steps=25,
                      seed=3, progress=False)
    unguided = generate(model, "a red circle on a blue background", sampler="euler", guidance=1.0, steps=25, seed=3,
                        progress=False)
    assert not torch.allclose(result.images, unguided.images, atol=1e-3)  # re-noised with eps_u, not eps_c
    with pytest.raises(ValueError, match="CFG\\+\\+'s guidance lambda, from 0 .* got 7.5"):
        generate(model, "x", sampler="euler_cfgpp", guidance=7.5, steps=2, progress=False)
    with pytest.raises(ValueError, match="needs the unconditional prediction"):
        samplers.step(samplers.make_plan("euler_cfgpp", 2), 0, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), None)


def test_the_command_line_takes_lambda_0_6_by_default_and_refuses_cfg_scales(tmp_path, capsys):
    assert main(["--sampler", "euler_cfgpp", "--steps", "5", "--outdir", str(tmp_path)]) == 0
    assert "Sampler: Euler CFG++, CFG scale: 0.6," in read_parameters(tmp_path / "sample-00000.png")
    capsys.readouterr()  # the run's progress bar
    assert main(["--sampler", "euler_cfgpp", "--guidance", "3", "--outdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --guidance: 'euler_cfgpp' takes CFG++'s guidance lambda") and err.count("\n") == 1
