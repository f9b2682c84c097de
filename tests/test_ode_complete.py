import pytest
import torch

from align_diffusion.sampling.loop import ode_complete, sample


def test_ode_complete_from_step_zero_is_the_full_ode_sample(tiny_adapter):
    kwargs = dict(num_inference_steps=5, guidance_scale=3.0, height=32, width=32, decode=False)
    ode = sample(tiny_adapter, ["a red circle", "a blue square"], **kwargs)
    completed = ode_complete(tiny_adapter, ode.latents[:, 0], 0, ode.embeds, ode.schedule, ode.guidance_scale)
    assert torch.equal(completed, ode.final_latents)


def test_ode_complete_from_a_midpoint_of_an_ode_run_lands_on_its_end(tiny_adapter):
    ode = sample(tiny_adapter, ["a red circle"], num_inference_steps=5, height=32, width=32, decode=False)
    for step_index in (2, 5):
        completed = ode_complete(tiny_adapter, ode.latents[:, step_index], step_index, ode.embeds, ode.schedule,
                                 ode.guidance_scale)
        assert torch.equal(completed, ode.final_latents)


def test_ode_complete_of_an_sde_state_is_deterministic_and_differs_from_the_sde_end(tiny_pipes):
    from align_diffusion.models import adapter_for

    adapter = adapter_for(tiny_pipes["sd3"])
    sde = sample(adapter, ["a red circle"], num_inference_steps=6, sampler="flow-sde", height=32, width=32,
                 decode=False)
    args = (sde.latents[:, 3], 3, sde.embeds, sde.schedule, sde.guidance_scale)
    first, second = ode_complete(adapter, *args), ode_complete(adapter, *args)
    assert torch.equal(first, second)
    assert not torch.allclose(first, sde.final_latents)
    with pytest.raises(ValueError, match="step_index"):
        ode_complete(adapter, sde.latents[:, 0], 7, sde.embeds, sde.schedule, sde.guidance_scale)
    # Embeddings encoded without CFG (guidance 1) completed at guidance 5 gave the unguided completion, silently.
    unguided = sample(adapter, ["a red circle"], num_inference_steps=6, guidance_scale=1.0, height=32, width=32,
                      decode=False)
    with pytest.raises(ValueError, match="guidance_scale 5.0 runs classifier-free guidance, but the prompt embeddings "
                                         "hold no unconditional branch"):
        ode_complete(adapter, sde.latents[:, 3], 3, unguided.embeds, sde.schedule, 5.0)
