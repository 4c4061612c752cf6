"""What the diffusers-oracle tests share: which diffusers scheduler each ldmkit sampler mirrors,
and Stable Diffusion 1.5's scheduler config."""

DIFFUSERS_SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}

# Stable Diffusion 1.5's scheduler_config.json (PNDMScheduler), as swapped-in schedulers see it.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True,
    timestep_spacing="leading", prediction_type="epsilon",
)
