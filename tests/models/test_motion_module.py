"""AnimateDiff motion module: parity with diffusers, released key sets, insertion into an SD1.5-layout UNet."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.animatediff import motion_module as mm

from host.reference import manifest_dir

MANIFESTS = manifest_dir()


def randomise_(module, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module


def to_diffusers_keys(state):
    """The documented diffusers conversion: drop pos_encoder, norms.0/1 -> norm1/2, ff_norm -> norm3,
    attention_blocks.0/1 -> attn1/attn2, remove `temporal_transformer.`."""
    out = {}
    for k, v in state.items():
        if ".pos_encoder." in k:
            continue
        k = k.replace("temporal_transformer.", "")
        k = k.replace("norms.0", "norm1").replace("norms.1", "norm2").replace("ff_norm", "norm3")
        k = k.replace("attention_blocks.0", "attn1").replace("attention_blocks.1", "attn2")
        out[k] = v
    return out


def diffusers_module(dim, pe_length):
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    return AnimateDiffTransformer3D(
        num_attention_heads=8,
        attention_head_dim=dim // 8,
        in_channels=dim,
        norm_num_groups=32,
        cross_attention_dim=None,
        activation_fn="geglu",
        attention_bias=False,
        positional_embeddings="sinusoidal",
        num_positional_embeddings=pe_length,
        double_self_attention=True,
    ).eval()


class PerFrameGroupNorm(nn.Module):
    """Test-side patch: diffusers' norm sees [b, c, f, h, w]; normalise each frame on its own instead."""

    def __init__(self, norm):
        super().__init__()
        self.inner = norm

    def forward(self, x):
        b, c, f, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        y = F.group_norm(y, self.inner.num_groups, self.inner.weight, self.inner.bias, self.inner.eps)
        return y.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def frame_varying_input(b, f, c, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b * f, c, h, w, generator=g)
    # per-frame offsets and scales, so statistics pooled over frames differ from per-frame ones
    scale = 1.0 + 2.0 * torch.rand(b * f, 1, 1, 1, generator=g)
    shift = 3.0 * torch.randn(b * f, 1, 1, 1, generator=g)
    return x * scale + shift


@pytest.fixture(scope="module")
def pair():
    dim, pe_length, frames = 64, 32, 16
    ours = randomise_(mm.MotionModule(dim, pe_length)).eval()
    theirs = diffusers_module(dim, pe_length)
    state = to_diffusers_keys(ours.state_dict())
    # diffusers keeps one (persistent) pe buffer per block; both are the same sinusoid
    state["transformer_blocks.0.pos_embed.pe"] = theirs.transformer_blocks[0].pos_embed.pe.clone()
    theirs.load_state_dict(state, strict=True)
    # every parameter of the reference received a random value (proj_out included)
    assert not torch.all(theirs.proj_out.weight == 0)
    x = frame_varying_input(2, frames, dim, 3, 5)
    return ours, theirs, x, frames


def test_positional_encoding_matches_diffusers_formula():
    ours = mm.sinusoidal_encoding(32, 64)
    theirs = diffusers_module(64, 32).transformer_blocks[0].pos_embed.pe
    assert torch.allclose(ours, theirs, atol=1e-7)


def test_parity_with_diffusers_per_frame_norm(pair):
    ours, theirs, x, frames = pair
    theirs.norm = PerFrameGroupNorm(theirs.norm)
    try:
        with torch.no_grad():
            a = ours(x, frames)
            b = theirs(x, num_frames=frames)
    finally:
        theirs.norm = theirs.norm.inner
    diff = (a - b).abs().max().item()
    print(f"max |ours - diffusers(per-frame norm)| = {diff:.3g}")
    assert a.shape == x.shape
    assert diff <= 1e-5
    # the module did something: the comparison is not between two identities
    assert (a - x).abs().max().item() > 1e-2


def test_gap_to_unpatched_diffusers(pair):
    """diffusers pools GroupNorm statistics over all frames; the released weights use per-frame norms."""
    ours, theirs, x, frames = pair
    with torch.no_grad():
        a = ours(x, frames)
        b = theirs(x, num_frames=frames)
    diff = (a - b).abs().max().item()
    print(f"max |ours - diffusers(as-is)| = {diff:.3g}")
    assert diff > 1e-3


def test_zero_proj_out_is_identity():
    m = mm.zero_proj_out_(randomise_(mm.MotionModule(32, 24)))
    x = torch.randn(8, 32, 2, 2)
    assert torch.equal(m(x, 4), x)


def test_too_many_frames_for_the_positional_encoding():
    m = mm.MotionModule(32, 24)
    with pytest.raises(ValueError, match="positional encoding length 24"):
        m(torch.randn(25, 32, 1, 1), 25)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_training_betas_match_diffusers(schedule):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=schedule).betas
    ours = mm.training_betas(schedule)
    assert ours.shape == (1000,)
    assert torch.allclose(ours.float(), ref.float(), rtol=1e-6, atol=1e-9)


def load_manifest(version):
    with open(MANIFESTS / f"animatediff_mm_sd15_v{version}.json") as f:
        return json.load(f)


@pytest.mark.parametrize("version,has_mid,pe_length", [(1, False, 24), (2, True, 32), (3, False, 32)])
def test_key_set_matches_manifest(version, has_mid, pe_length):
    manifest = load_manifest(version)
    with torch.device("meta"):
        model = mm.MotionModuleSet(has_mid=has_mid, pe_length=pe_length)
    found = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert found == {k: list(v) for k, v in manifest["keys"].items()}
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters_excluding_buffers"]


# ---------------------------------------------------------------------------------------------------
# A tiny UNet with the LDM/ComfyUI SD1.5 block layout (12 input blocks, 3-layer middle, 12 output blocks).
# Unknown layers are called with x only, as ComfyUI's forward_timestep_embed does.


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.out_channels = cout
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.skip(x) + torch.tanh(self.conv(x))


class SpatialTransformer(nn.Module):
    """Per-frame spatial mixing (no cross-frame interaction)."""

    def __init__(self, c):
        super().__init__()
        self.in_channels = c
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.proj(x - x.mean(dim=(2, 3), keepdim=True))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.op = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Seq(nn.Sequential):
    pass


class TinyUNet(nn.Module):
    def __init__(self, widths=(32, 64, 64, 64)):
        super().__init__()
        w = widths
        ib = [Seq(nn.Conv2d(4, w[0], 3, padding=1))]
        skips = [w[0]]
        cin = w[0]
        for level, c in enumerate(w):
            for _ in range(2):
                layers = [ResBlock(cin, c)] + ([SpatialTransformer(c)] if level < 3 else [])
                ib.append(Seq(*layers))
                cin = c
                skips.append(c)
            if level < 3:
                ib.append(Seq(Downsample(c)))
                skips.append(c)
        self.input_blocks = nn.ModuleList(ib)
        self.middle_block = Seq(ResBlock(cin, cin), SpatialTransformer(cin), ResBlock(cin, cin))
        ob = []
        for level, c in reversed(list(enumerate(w))):
            for i in range(3):
                layers = [ResBlock(cin + skips.pop(), c)] + ([SpatialTransformer(c)] if level < 3 else [])
                cin = c
                if level > 0 and i == 2:
                    layers.append(Upsample(c))
                ob.append(Seq(*layers))
        self.output_blocks = nn.ModuleList(ob)
        self.out = nn.Conv2d(cin, 4, 3, padding=1)

    def forward(self, x):
        hs = []
        h = x
        for block in self.input_blocks:
            for layer in block:
                h = layer(h)
            hs.append(h)
        for layer in self.middle_block:
            h = layer(h)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            for layer in block:
                h = layer(h)
        return self.out(h)


def tiny_set(has_mid=True, zero=False, seed=3):
    s = mm.MotionModuleSet(down=(32, 64, 64, 64), up=(64, 64, 64, 32), mid=64, has_mid=has_mid, pe_length=16)
    randomise_(s, seed=seed, std=0.3)
    return mm.zero_proj_out_(s) if zero else s


class Patched:
    """Apply block replacements the way an object patch does (set the attribute), then restore."""

    def __init__(self, unet, patches):
        self.unet, self.patches, self.backup = unet, patches, {}

    def __enter__(self):
        for path, block in self.patches.items():
            parent, name = path.rsplit(".", 1) if "." in path else ("", path)
            obj = mm._get(self.unet, parent) if parent else self.unet
            self.backup[path] = (obj, name, getattr(obj, name))
            setattr(obj, name, block)
        return self.unet

    def __exit__(self, *exc):
        for obj, name, old in self.backup.values():
            setattr(obj, name, old)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return TinyUNet().eval()


def test_insertion_structure_and_no_weight_copy(unet):
    before = {k: v.data_ptr() for k, v in unet.state_dict().items()}
    modules = tiny_set()
    state = mm.FrameState()
    patches = mm.block_patches(unet, modules, state)
    assert len(patches) == 21
    # the UNet itself is untouched
    assert {k: v.data_ptr() for k, v in unet.state_dict().items()} == before
    assert not any(isinstance(m, mm.MotionLayer) for m in unet.modules())
    # same layer objects, original names kept, motion layer before the upsampler
    blk = patches["output_blocks.5"]
    names = [n for n, _ in blk.named_children()]
    assert names == ["0", "1", "motion", "2"]
    assert getattr(blk, "2") is unet.output_blocks[5][2] and isinstance(getattr(blk, "2"), Upsample)
    assert blk.motion.module is modules.up_blocks[1].motion_modules[2]
    assert [n for n, _ in patches["middle_block"].named_children()] == ["0", "1", "motion", "2"]
    assert [n for n, _ in patches["input_blocks.11"].named_children()] == ["0", "motion"]
    assert patches["input_blocks.1"][0] is unet.input_blocks[1][0]


def test_identity_at_init(unet):
    """Zero proj_out: each frame's output equals the plain UNet's output exactly."""
    frames = 6
    x = torch.randn(2 * frames, 4, 8, 8)
    state = mm.FrameState()
    patches = mm.block_patches(unet, tiny_set(zero=True), state)
    with torch.no_grad():
        plain = unet(x)
        state.frames = frames
        with Patched(unet, patches):
            animated = unet(x)
    assert torch.equal(animated, plain)


def test_frames_depend_on_each_other(unet):
    frames = 6
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2 * frames, 4, 8, 8, generator=g)
    y = x.clone()
    y[3] += torch.randn(4, 8, 8, generator=g)  # perturb frame 3 of the first clip
    state = mm.FrameState()
    patches = mm.block_patches(unet, tiny_set(), state)
    with torch.no_grad():
        plain_x, plain_y = unet(x), unet(y)
        state.frames = frames
        with Patched(unet, patches):
            ax, ay = unet(x), unet(y)
    # plain UNet: frame 0 does not see frame 3
    assert torch.equal(plain_x[0], plain_y[0])
    # animated: frame 0 of the same clip changes, the other clip (cond vs uncond) does not
    assert (ax[0] - ay[0]).abs().max().item() > 1e-4
    assert torch.allclose(ax[frames:], ay[frames:], atol=1e-6)
    # motion scale 0 switches the modules off
    patches0 = mm.block_patches(unet, tiny_set(), state, scale=0.0)
    with torch.no_grad(), Patched(unet, patches0):
        assert torch.equal(unet(x), plain_x)


def test_missing_frame_count_is_a_clear_error(unet):
    patches = mm.block_patches(unet, tiny_set(), mm.FrameState())
    with torch.no_grad(), Patched(unet, patches), pytest.raises(RuntimeError, match="frame count"):
        unet(torch.randn(2, 4, 8, 8))


def test_wrong_layout_is_rejected(unet):
    with torch.device("meta"):
        sd15 = mm.MotionModuleSet(has_mid=False, pe_length=16)
    with pytest.raises(ValueError, match="channels"):
        mm.block_patches(unet, sd15, mm.FrameState())

    class NotAUNet(nn.Module):
        pass

    with pytest.raises(ValueError, match="SD1.5"):
        mm.block_patches(NotAUNet(), tiny_set(), mm.FrameState())


def test_dtype_and_device_casting():
    m = randomise_(mm.MotionModule(32, 16)).to(torch.float64)
    x = torch.randn(4, 32, 2, 2)
    out = m(x, 4)
    assert out.dtype == torch.float32
    ref = m.to(torch.float32)(x, 4)
    assert torch.allclose(out, ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Loading: version detection on manifest-shaped files (one-element storages expanded to the real shapes,
# so a full-size file takes a few hundred kB), nested state_dict, and the errors for other files.

from models.animatediff import loading  # noqa: E402
from models.checkpoints import CheckpointError  # noqa: E402


def manifest_state(version, drop_pe=False):
    one = torch.zeros(1, dtype=torch.float16)
    out = {}
    for k, shape in load_manifest(version)["keys"].items():
        if drop_pe and k.endswith(".pe"):
            continue
        out[k] = one.expand(*shape)
    return out


@pytest.mark.parametrize("version,expected,has_mid,pe", [(1, "v1", False, 24), (2, "v2", True, 32), (3, "v3", False, 32)])
def test_version_detection_from_files(tmp_path, version, expected, has_mid, pe):
    path = tmp_path / f"mm_v{version}.ckpt"
    torch.save({"state_dict": manifest_state(version), "global_step": 0}, str(path))
    assert path.stat().st_size < 5_000_000
    f = loading.load_motion_module(path)
    assert (f.version, f.has_mid, f.pe_length) == (expected, has_mid, pe)
    assert len(list(f.modules.named_motion_modules())) == (21 if has_mid else 20)


def test_animatelcm_style_rebuilds_the_sinusoid():
    f = loading.build_from_state_dict(manifest_state(3, drop_pe=True), "AnimateLCM_sd15_t2v.ckpt")
    assert f.version.startswith("AnimateLCM") and f.pe_length == 32 and not f.has_mid
    pe = f.modules.down_blocks[1].motion_modules[0].temporal_transformer.transformer_blocks[0].attention_blocks[1].pos_encoder.pe
    assert pe.device.type == "cpu" and torch.equal(pe, mm.sinusoidal_encoding(32, 640))


def test_loading_errors(tmp_path):
    # MotionLoRA picked in the wrong loader
    lora = {"down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q_lora.down.weight": torch.zeros(2, 320),
            "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q_lora.up.weight": torch.zeros(320, 2)}
    with pytest.raises(CheckpointError, match="this is a MotionLoRA, use CVG Load MotionLoRA"):
        loading.build_from_state_dict(lora, "v2_lora_ZoomIn.ckpt")
    # an SD checkpoint
    with pytest.raises(CheckpointError, match="Stable Diffusion checkpoint"):
        loading.build_from_state_dict({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "sd15.safetensors")
    # HotShot-XL
    hs = {"down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.positional_encoding": torch.zeros(1, 24, 320)}
    with pytest.raises(CheckpointError, match="SDXL motion module"):
        loading.build_from_state_dict(hs, "hsxl_temporal_layers.safetensors")
    # unrelated tensors
    with pytest.raises(CheckpointError, match="no 'down_blocks.N.motion_modules.M.' keys"):
        loading.build_from_state_dict({"foo.weight": torch.zeros(1)}, "foo.ckpt")
    # a module with a key missing (truncated state)
    state = manifest_state(2)
    state.pop("up_blocks.3.motion_modules.2.temporal_transformer.proj_out.bias")
    with pytest.raises(CheckpointError, match="1 missing"):
        loading.build_from_state_dict(state, "cut.ckpt")
    # a truncated file on disk
    path = tmp_path / "mm.ckpt"
    torch.save(manifest_state(1), str(path))
    (tmp_path / "cut.ckpt").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        loading.load_motion_module(tmp_path / "cut.ckpt")
