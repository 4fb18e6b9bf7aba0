import pytest
import torch

from shared.latents import (image_ids, joint_attention_mask, latent_size, pack_latents, scale_latents, text_ids,
                            unpack_latents, unscale_latents)


def test_pack_unpack_round_trip_and_patch_layout():
    x = torch.randn(2, 16, 6, 8)
    packed = pack_latents(x)
    assert packed.shape == (2, 12, 64)
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    # Patch (row 1, col 2) holds channel c's 2x2 block at latent rows 2-3, cols 4-5, channel-major.
    patch = packed[0, 1 * 4 + 2].view(16, 2, 2)
    assert torch.equal(patch, x[0, :, 2:4, 4:6])


def test_pack_matches_diffusers_flux_pipeline():
    from diffusers import FluxPipeline
    x = torch.randn(1, 16, 4, 6)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 1, 16, 4, 6))
    # diffusers' unpack takes pixel sizes and the VAE factor
    assert torch.equal(unpack_latents(pack_latents(x), 4, 6), FluxPipeline._unpack_latents(pack_latents(x), 32, 48, 8))


def test_ids_match_diffusers():
    from diffusers import FluxPipeline
    ids = image_ids(6, 8)
    ref = FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32)
    assert torch.equal(ids, ref)
    assert ids[5].tolist() == [0.0, 1.0, 1.0]
    assert torch.count_nonzero(text_ids(7)) == 0 and text_ids(7).shape == (7, 3)


def test_odd_latent_refused():
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 5, 4))


def test_scale_shift_inverse_and_values():
    mean = torch.randn(3, 16, 4, 4)
    x0 = scale_latents(mean)
    assert torch.allclose(x0, (mean - 0.1159) * 0.3611)
    assert torch.allclose(unscale_latents(x0), mean, atol=1e-6)


def test_latent_size_checks_multiples_of_16():
    assert latent_size(256, 512) == (32, 64)
    with pytest.raises(ValueError, match="multiples of 16"):
        latent_size(250, 256)


def test_joint_attention_mask_puts_text_first_then_image():
    m = joint_attention_mask(torch.tensor([[True, False], [True, True]]), 3)
    assert m.shape == (2, 1, 1, 5) and m.dtype == torch.bool
    assert m[0].flatten().tolist() == [True, False, True, True, True]
    assert m[1].all()
    assert joint_attention_mask(None, 3) is None
