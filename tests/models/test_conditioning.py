"""I2V / FLF2V conditioning against diffusers' WanImageToVideoPipeline.prepare_latents and REFERENCE §2."""

import pytest
import torch

from models import conditioning as C
from models.wan import latent as wan_latent

diffusers = pytest.importorskip("diffusers")

H, W = 32, 48


@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in vae.parameters():  # every parameter random, including zero-initialised ones
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return vae


def _encode(vae):
    def encode(video):
        with torch.no_grad():
            return vae.encode(video).latent_dist.mode()
    return encode


def _pipeline(vae):
    from diffusers import WanImageToVideoPipeline
    return WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=None)


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, H, W, generator=g) * 2 - 1


@pytest.mark.parametrize("num_frames", [9, 13])
def test_i2v_y_equals_diffusers_prepare_latents(tiny_vae, num_frames):
    img = _images(1, 3)
    pipe = _pipeline(tiny_vae)
    with torch.no_grad():
        _, y_ref = pipe.prepare_latents(img, 1, 16, H, W, num_frames, torch.float32, torch.device("cpu"),
                                        torch.Generator().manual_seed(0))
    y = C.build_condition(_encode(tiny_vae), {0: img[0]}, num_frames, H, W)
    assert y.shape == (1, 20, wan_latent.latent_frames(num_frames), H // 8, W // 8)
    assert torch.equal(y, y_ref)


def test_flf2v_y_equals_diffusers_prepare_latents(tiny_vae):
    imgs = _images(2, 4)
    pipe = _pipeline(tiny_vae)
    with torch.no_grad():
        _, y_ref = pipe.prepare_latents(imgs[:1], 1, 16, H, W, 9, torch.float32, torch.device("cpu"),
                                        torch.Generator().manual_seed(0), last_image=imgs[1:])
    y = C.build_condition(_encode(tiny_vae), {0: imgs[0], 8: imgs[1]}, 9, H, W)
    assert torch.equal(y, y_ref)
    # The condition latent really depends on the end frame.
    y_i2v = C.build_condition(_encode(tiny_vae), {0: imgs[0]}, 9, H, W)
    assert not torch.allclose(y_i2v[:, 4:, -1], y[:, 4:, -1])


def test_mask_values_i2v_flf2v_per_reference():
    i2v = C.frame_mask(81, [0], 2, 3)
    assert i2v.shape == (4, 21, 2, 3)
    assert torch.all(i2v[:, 0] == 1) and torch.all(i2v[:, 1:] == 0)
    flf = C.frame_mask(81, [0, 80], 2, 3)
    assert torch.all(flf[:, 0] == 1) and torch.all(flf[:, 1:20] == 0)
    assert flf[:, 20, 0, 0].tolist() == [0.0, 0.0, 0.0, 1.0]
    # General rule: pixel frame p >= 1 -> latent (p+3)//4, channel (p+3)%4.
    m = C.frame_mask(13, [5, 6], 1, 1)
    ones = [(c, k) for c in range(4) for k in range(4) if m[c, k, 0, 0] == 1]
    assert sorted(ones) == sorted([((5 + 3) % 4, (5 + 3) // 4), ((6 + 3) % 4, (6 + 3) // 4)])
    assert C.known_latent_frames(m) == [2]
    with pytest.raises(ValueError, match="4k\\+1"):
        C.frame_mask(80, [0], 1, 1)
    with pytest.raises(ValueError, match="outside"):
        C.frame_mask(9, [9], 1, 1)


def _native_i2v(vae, start_images_01, length):
    """What ComfyUI's WanImageToVideo stores (rebuilt here): grey 0.5 video with the start frames, encoded raw;
    concat_mask 1 everywhere except the latent frames of the start images."""
    video01 = torch.ones(length, H, W, 3) * 0.5
    video01[:start_images_01.shape[0]] = start_images_01
    z = _encode(vae)(video01.permute(3, 0, 1, 2)[None] * 2 - 1)
    mask = torch.ones(1, 1, z.shape[2], z.shape[-2], z.shape[-1])
    mask[:, :, :((start_images_01.shape[0] - 1) // 4) + 1] = 0.0
    return z, mask


def _native_flf(vae, start01, end01, length):
    video01 = torch.ones(length, H, W, 3) * 0.5
    video01[:1] = start01
    video01[-1:] = end01
    z = _encode(vae)(video01.permute(3, 0, 1, 2)[None] * 2 - 1)
    t = z.shape[2]
    mask = torch.ones(1, 1, t * 4, z.shape[-2], z.shape[-1])
    mask[:, :, :1 + 3] = 0.0
    mask[:, :, -1:] = 0.0
    mask = mask.view(1, t, 4, z.shape[-2], z.shape[-1]).transpose(1, 2)
    return z, mask


def test_native_i2v_interop_gives_the_same_sampler_input(tiny_vae):
    img01 = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(5))
    z, mask = _native_i2v(tiny_vae, img01, 9)
    y_native = C.y_from_native(z, mask, noise_shape=(1, 16, 3, H // 8, W // 8))
    y_cvg = C.build_condition(_encode(tiny_vae), {0: C.images_to_model(img01)[0]}, 9, H, W)
    assert torch.equal(y_native, y_cvg)
    res = C.resolve_condition({"samples": torch.zeros(1, 16, 3, H // 8, W // 8)},
                              {"concat_latent_image": z, "concat_mask": mask})
    assert res["source"] == "native" and torch.equal(res["y"], y_cvg)
    with pytest.raises(ValueError, match="latent being sampled"):
        C.y_from_native(z, mask, noise_shape=(1, 16, 5, H // 8, W // 8))


def test_native_flf2v_interop_gives_the_same_sampler_input(tiny_vae):
    g = torch.Generator().manual_seed(6)
    a, b = torch.rand(1, H, W, 3, generator=g), torch.rand(1, H, W, 3, generator=g)
    z, mask = _native_flf(tiny_vae, a, b, 9)
    y_native = C.y_from_native(z, mask)
    y_cvg = C.build_condition(_encode(tiny_vae), {0: C.images_to_model(a)[0], 8: C.images_to_model(b)[0]},
                              9, H, W)
    assert torch.equal(y_native, y_cvg)


def test_cvg_entry_resolves_and_checks_shape():
    y = torch.randn(1, 20, 3, 4, 6)
    entry = C.make_condition_entry(y, clip_fea=torch.randn(1, 257, 1280), image_strength=0.5,
                                   known_pixel_frames=[0], num_frames=9)
    res = C.resolve_condition({"samples": torch.zeros(1, 16, 3, 4, 6), C.COND_KEY: entry})
    assert res["source"] == "cvg" and res["image_strength"] == 0.5 and torch.equal(res["y"], y)
    with pytest.raises(ValueError, match="do not resize"):
        C.resolve_condition({"samples": torch.zeros(1, 16, 5, 4, 6), C.COND_KEY: entry})
    assert C.resolve_condition({"samples": torch.zeros(1, 16, 3, 4, 6)}, {}) is None
    with pytest.raises(ValueError, match="image-to-video model"):
        C.check_model_condition(36, None)
    with pytest.raises(ValueError, match="text-to-video model"):
        C.check_model_condition(16, res)
    C.check_model_condition(36, res)


def test_latent_size_rule_and_resize():
    import numpy as np
    for (h, w, area) in [(480, 832, 480 * 832), (720, 1280, 480 * 832), (832, 480, 480 * 832), (600, 800, 720 * 1280)]:
        ar = h / w
        ref = (round(np.sqrt(area * ar) // 8 // 2 * 2), round(np.sqrt(area / ar) // 8 // 2 * 2))
        assert C.latent_size_for_area(h, w, area) == ref
    # The reference's float arithmetic: sqrt(480·832·480/832) = 479.99999999999994, so an exactly 480×832
    # image gets 58 latent rows, not 60 (kept on purpose: it is what the released pipeline does).
    assert C.latent_size_for_area(480, 832, 480 * 832) == (58, 104)
    assert C.latent_size_for_area(832, 480, 480 * 832) == (104, 60)
    x = torch.rand(1, 3, 10, 14) * 2 - 1
    r = C.resize_image_bicubic(x, 16, 32)
    assert torch.equal(r, torch.nn.functional.interpolate(x, size=(16, 32), mode="bicubic", align_corners=False))
    img = torch.rand(2, 5, 7, 4)
    m = C.images_to_model(img)
    assert m.shape == (2, 3, 5, 7) and torch.allclose(m, img[..., :3].permute(0, 3, 1, 2) * 2 - 1)
    with pytest.raises(ValueError, match="resize"):
        C.condition_video({0: torch.zeros(3, 8, 8)}, 5, 16, 16)


def test_clip_features_and_perturbation():
    a, b = torch.randn(1, 257, 1280), torch.randn(1, 257, 1280)
    f = C.clip_features(a, b)
    assert f.shape == (1, 514, 1280) and torch.equal(f[:, :257], a) and torch.equal(f[:, 257:], b)
    with pytest.raises(ValueError, match="clip_vision_h"):
        C.clip_features(torch.randn(1, 257, 768))
    both = torch.cat([a, b])  # one CLIPVisionEncode over a batch of the two frames
    assert torch.equal(C.clip_features(both), f)
    with pytest.raises(ValueError, match="257 tokens"):
        C.clip_features(torch.randn(3, 257, 1280))
    y = torch.cat([C.frame_mask(9, [0], 2, 2)[None], torch.randn(1, 16, 3, 2, 2)], dim=1)
    p = C.perturb_condition(y, 0.2, seed=7)
    from models.sampling import seeded_noise
    eps = seeded_noise((1, 16, 3, 2, 2), 7)
    assert torch.equal(p[:, :4], y[:, :4])
    assert torch.allclose(p[:, 4:, 0], 0.8 * y[:, 4:, 0] + 0.2 * eps[:, :, 0])
    assert torch.equal(p[:, 4:, 1:], y[:, 4:, 1:])
