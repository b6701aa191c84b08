"""Wan-VAE: parity with diffusers AutoencoderKLWan (identical random weights), causality, exact
streaming, the released key set, and loading every file layout incl. the error paths."""
import json
import os

import pytest
import torch

from models import checkpoints
from models.wan import vae as wv
from models.wan import vae_loading as vl

from host.random_weights import randomize_vae
from host.reference import manifest

MANIFEST = manifest("wan2.1_vae.json")

# Released pattern (4 stages, temporal downsample in the last two) and a 2-stage stride-2 variant.
CFG_A = dict(dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
CFG_B = dict(dim=6, z_dim=3, dim_mult=[1, 2], num_res_blocks=2, temperal_downsample=[True])


randomize = randomize_vae  # RMS gammas, biases and the attention proj the reference zeroes: all random


def tiny(cfg=CFG_A, seed=0):
    return randomize(wv.WanVAE(**cfg).eval().requires_grad_(False), seed)


def diffusers_twin(model):
    from diffusers import AutoencoderKLWan

    c = model.config
    ref = AutoencoderKLWan(base_dim=c.dim, z_dim=c.z_dim, dim_mult=c.dim_mult, num_res_blocks=c.num_res_blocks,
                           temperal_downsample=c.temperal_downsample).eval()
    ref.load_state_dict(vl.wan_to_diffusers(model.state_dict(), c.num_res_blocks), strict=True)
    return ref


def video(t=9, h=16, w=24, b=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


# ---- parity with diffusers ---------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [CFG_A, CFG_B], ids=["released_pattern", "two_stage"])
def test_encode_decode_match_diffusers(cfg):
    model = tiny(cfg)
    ref = diffusers_twin(model)
    x = video(9, 16, 24, b=2)
    with torch.inference_mode():
        z = model.encode(x)
        z_ref = ref.encode(x).latent_dist.mode()
        assert z.shape == z_ref.shape
        assert (z - z_ref).abs().max().item() <= 1e-5
        zin = z_ref + 0.5 * torch.randn_like(z_ref)
        y = model.decode(zin)
        y_ref = ref.decode(zin).sample
    assert y.shape == y_ref.shape == (2, 3, model.pixel_frames(z.shape[2]), 16, 24)
    assert (y - y_ref).abs().max().item() <= 1e-4
    # the comparison means something only if the output is not saturated by the clamp
    assert (y.abs() < 0.999).float().mean().item() > 0.5
    assert y.std().item() > 0.05


def test_key_conversion_both_ways_and_full_size_diffusers_names():
    model = tiny(CFG_A)
    ref = diffusers_twin(model)
    sd = model.state_dict()
    back = vl.diffusers_to_wan(ref.state_dict())
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # full size: our names -> diffusers names equals the diffusers model's key set and shapes
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        full = wv.WanVAE()
        dref = AutoencoderKLWan()
    conv = vl.wan_to_diffusers({k: v for k, v in full.state_dict().items()}, 2)
    assert {k: tuple(v.shape) for k, v in conv.items()} == {k: tuple(v.shape) for k, v in dref.state_dict().items()}


def test_full_size_key_set_equals_manifest_on_meta():
    manifest = json.loads(MANIFEST.read_text())
    model = wv.build_wan_vae(device="meta")
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == manifest["keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters_excluding_buffers"] == 126_892_531
    enc = sum(isinstance(m, wv.CausalConv3d) for m in model.encoder.modules())
    dec = sum(isinstance(m, wv.CausalConv3d) for m in model.decoder.modules())
    assert (enc, dec) == (26, 33)
    assert vl.infer_config(model.state_dict()).to_dict() == wv.WanVAEConfig().to_dict()


# ---- causality and exact streaming -------------------------------------------------------------------
def test_causal_prefix_invariants_bit_exact():
    model = tiny(CFG_A)
    x = video(13)
    with torch.inference_mode():
        z = model.encode(x)
        assert z.shape[2] == 4
        assert torch.equal(model.encode(x[:, :, :5]), z[:, :, :2])
        assert torch.equal(model.encode(x[:, :, :1]), z[:, :, :1])
        y = model.decode(z)
        assert torch.equal(model.decode(z[:, :, :2]), y[:, :, :5])
        assert torch.equal(model.decode(z[:, :, :1]), y[:, :, :1])
        # and not trivially: a later frame changes only later latents
        x2 = x.clone()
        x2[:, :, 9:] += 0.5
        z2 = model.encode(x2)
        assert torch.equal(z2[:, :, :3], z[:, :, :3]) and not torch.equal(z2[:, :, 3], z[:, :, 3])


@pytest.mark.parametrize("pieces", [[1] * 13, [2, 3, 1, 7], [5, 8], [13]])
def test_encoder_stream_any_pieces_equals_whole_clip(pieces):
    model = tiny(CFG_A)
    x = video(13)
    with torch.inference_mode():
        whole = model.encode(x)
        splits = torch.split(x, pieces, dim=2)
        got = torch.cat(list(model.encode_stream(splits)), 2)
    assert torch.equal(got, whole)


def test_decoder_stream_chunks_equal_whole_clip():
    model = tiny(CFG_A)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 4, 5, 2, 3, generator=g)
    with torch.inference_mode():
        whole = model.decode(z)
        chunks = list(model.decode_stream(z))
        assert [c.shape[2] for c in chunks] == [1, 4, 4, 4, 4]
        assert torch.equal(torch.cat(chunks, 2), whole)
        stream = model.decoder_stream()
        parts = [stream.push(z[:, :, :2]), stream.push(z[:, :, 2:3]), stream.push(z[:, :, 3:])]
        assert torch.equal(torch.cat(parts, 2), whole)
    assert whole.shape == (1, 3, 17, 16, 24)
    assert whole.abs().max() <= 1.0


def test_time_split_pieces_match_unsplit():
    """Residual blocks/heads split their chunk along time at high resolution; the carried cache makes
    that exact up to float rounding, and the split run itself still streams bit-exactly."""
    model = tiny(CFG_A)
    x = video(9)
    with torch.inference_mode():
        z = model.encode(x)
        y = model.decode(z)
        model.set_max_piece_elems(1)
        z_s = model.encode(x)
        y_s = model.decode(z)
        assert (z_s - z).abs().max() <= 1e-5
        assert (y_s - y).abs().max() <= 1e-5
        assert torch.equal(torch.cat(list(model.encode_stream(torch.split(x, [3, 6], 2))), 2), z_s)


def test_bf16_compute_close_to_fp32():
    model = tiny(CFG_A)
    x = video(5)
    with torch.inference_mode():
        z = model.encode(x)
        y = model.decode(z)
        m16 = tiny(CFG_A).to(torch.bfloat16)
        z16 = m16.encode(x)
        y16 = m16.decode(z)
    assert z16.dtype == torch.bfloat16
    assert (z16.float() - z).abs().mean() < 0.05 * z.abs().mean() + 1e-3
    assert (y16.float() - y).abs().mean() < 0.05


# ---- input errors --------------------------------------------------------------------------------------
def test_bad_frame_count_and_size_errors_name_valid_values():
    model = tiny(CFG_A)
    with pytest.raises(ValueError, match=r"6 is not of the form 4k\+1.*Use 5 or 9"):
        model.encode(video(6))
    with pytest.raises(ValueError, match=r"not a multiple of 8.*width 24 or 32.*height 16"):
        model.encode(video(5, 16, 26))
    with pytest.raises(ValueError, match=r"\[B,3,T,H,W\]"):
        model.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(ValueError, match=r"latent \[B,4,T,H,W\]"):
        model.decode(torch.zeros(1, 16, 2, 2, 2))
    stream = model.encoder_stream()
    with torch.inference_mode():
        assert stream.push(video(3)) is not None  # frame 0 done, 2 pending
        with pytest.raises(ValueError, match=r"3 is not of the form 4k\+1"):
            stream.close()


# ---- loading -------------------------------------------------------------------------------------------
def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_load_original_safetensors_and_pth_with_and_without_prefix(tmp_path):
    from safetensors.torch import save_file

    model = tiny(CFG_A)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "wan_2.1_vae.safetensors")
    torch.save(sd, tmp_path / "Wan2.1_VAE.pth")
    save_file({"vae." + k: v for k, v in sd.items()}, tmp_path / "prefixed.safetensors")
    full = {"first_stage_model." + k: v for k, v in sd.items()}
    full.update({f"model.diffusion_model.blocks.{i}.self_attn.q.weight": torch.zeros(4, 4) for i in range(300)})
    save_file(full, tmp_path / "full_checkpoint.safetensors")
    torch.save({"state_dict": sd}, tmp_path / "nested.ckpt")
    for name in ["wan_2.1_vae.safetensors", "Wan2.1_VAE.pth", "prefixed.safetensors", "full_checkpoint.safetensors",
                 "nested.ckpt"]:
        loaded = vl.load_wan_vae(tmp_path / name)
        assert _same_weights(loaded, model), name
        assert loaded.config.to_dict() == model.config.to_dict()


def test_load_diffusers_folder(tmp_path):
    model = tiny(CFG_B)
    ref = diffusers_twin(model)
    ref.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").exists()
    loaded = vl.load_wan_vae(tmp_path / "vae")
    assert _same_weights(loaded, model)
    loaded2 = vl.load_wan_vae(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    assert _same_weights(loaded2, model)
    x = video(5, 16, 16)
    with torch.inference_mode():
        assert torch.equal(loaded.encode(x), model.encode(x))


@pytest.mark.parametrize("store", [torch.float32, torch.bfloat16, torch.float16])
def test_storage_and_compute_dtypes(tmp_path, store):
    model = tiny(CFG_A)
    vl.save_wan_vae(model, tmp_path / "v.safetensors", dtype=store)
    kept = vl.load_wan_vae(tmp_path / "v.safetensors")
    assert kept.dtype == store
    as32 = vl.load_wan_vae(tmp_path / "v.safetensors", dtype=torch.float32)
    assert as32.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in as32.parameters())
    err = max((a - b).abs().max().item() for a, b in zip(as32.parameters(), model.parameters()))
    assert err <= (0 if store == torch.float32 else 0.02)


def test_loader_errors_are_clear(tmp_path):
    from safetensors.torch import save_file

    model = tiny(CFG_A)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}

    dit = {"patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": torch.zeros(8, 8),
           "head.head.weight": torch.zeros(4, 8)}
    save_file(dit, tmp_path / "dit.safetensors")
    with pytest.raises(checkpoints.CheckpointError, match=r"not a Wan2.1 VAE.*diffusion model"):
        vl.load_wan_vae(tmp_path / "dit.safetensors")

    sdvae = {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
             "encoder.down.0.block.0.norm1.weight": torch.zeros(8)}
    save_file(sdvae, tmp_path / "sd_vae.safetensors")
    with pytest.raises(checkpoints.CheckpointError, match=r"image VAE"):
        vl.load_wan_vae(tmp_path / "sd_vae.safetensors")

    bad_shape = dict(sd)
    bad_shape["decoder.head.2.weight"] = torch.zeros(3, 9, 3, 3, 3)
    save_file(bad_shape, tmp_path / "bad_shape.safetensors")
    with pytest.raises(checkpoints.CheckpointError, match=r"wrong shape.*decoder.head.2.weight"):
        vl.load_wan_vae(tmp_path / "bad_shape.safetensors")

    missing = {k: v for k, v in sd.items() if not k.startswith("decoder.middle.1.")}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(checkpoints.CheckpointError, match=r"missing.*decoder.middle.1"):
        vl.load_wan_vae(tmp_path / "missing.safetensors")

    save_file(sd, tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoints.CheckpointError, match=r"truncated"):
        vl.load_wan_vae(tmp_path / "truncated.safetensors")

    torch.save(sd, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoints.CheckpointError, match=r"truncated"):
        vl.load_wan_vae(tmp_path / "truncated.pth")

    wan22 = dict(sd)
    wan22["encoder.conv1.weight"] = torch.zeros(8, 12, 3, 3, 3)
    save_file(wan22, tmp_path / "wan2.2_vae.safetensors")
    with pytest.raises(checkpoints.CheckpointError, match=r"Wan2.2 VAE"):
        vl.load_wan_vae(tmp_path / "wan2.2_vae.safetensors")

    (tmp_path / "notes.safetensors").write_text("this is not a tensor file\n" * 10)
    with pytest.raises(checkpoints.CheckpointError):
        vl.load_wan_vae(tmp_path / "notes.safetensors")

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(checkpoints.CheckpointError, match=r"not a dict of tensors"):
        vl.load_wan_vae(tmp_path / "list.pth")

    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(checkpoints.CheckpointError, match=r"not a tensor file"):
        vl.load_wan_vae(tmp_path / "readme.txt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/cvg_vae_pwned",))


def test_pickle_with_code_is_refused_and_never_run(tmp_path):
    if os.path.exists("/tmp/cvg_vae_pwned"):
        os.remove("/tmp/cvg_vae_pwned")
    torch.save({"encoder.conv1.weight": torch.zeros(1), "x": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(checkpoints.CheckpointError, match=r"weights-only"):
        vl.load_wan_vae(tmp_path / "evil.pth")
    assert not os.path.exists("/tmp/cvg_vae_pwned")


def test_channels_last_activations_match():
    model = tiny(CFG_A)
    x = video(5)
    with torch.inference_mode():
        z = model.encode(x)
        y = model.decode(z)
        model.set_channels_last(True)
        z_cl = model.encode(x)
        y_cl = model.decode(z)
    assert (z_cl - z).abs().max() <= 1e-5 and (y_cl - y).abs().max() <= 1e-5


def _state_bytes(state):
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


def test_stream_state_is_flat_in_the_number_of_frames():
    """The carried cache holds CACHE_T frames per conv whatever the clip length (memory stays flat)."""
    model = tiny(CFG_A)
    g = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        dec = model.decoder_stream()
        sizes = []
        for _ in range(6):
            dec.push(torch.randn(1, 4, 1, 2, 3, generator=g))
            sizes.append(_state_bytes(dec.state))
        enc = model.encoder_stream()
        esizes = []
        for _ in range(5):
            enc.push(video(4, seed=len(esizes)))
            esizes.append(_state_bytes(enc.state))
    assert sizes[1] > 0 and len(set(sizes[2:])) == 1
    assert esizes[1] > 0 and len(set(esizes[1:])) == 1


def test_device_assignment_by_a_model_patcher_is_harmless():
    """Current ComfyUI's ModelPatcher sets `model.device` after loading; the weights stay the truth."""
    vae = tiny()
    vae.device = torch.device("cuda")  # what the patcher writes; nothing moves
    assert vae.device == vae.conv2.weight.device == torch.device("cpu")
