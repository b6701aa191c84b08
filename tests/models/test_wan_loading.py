"""Wan DiT loading: manifest key sets on meta, variant detection, every file layout (small files written
here), storage dtypes, scaled fp8, the diffusers layout (sharded), and clear errors for wrong files."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from host.reference import manifest_dir
from host.random_weights import randomize_dit
from models.checkpoints import CheckpointError
from models.wan import loading
from models.wan.dit import WanConfig, WanDiT, build_model

FP8 = getattr(torch, "float8_e4m3fn", None)
_HERE = Path(__file__).resolve()
MANIFEST_DIRS = [manifest_dir()]


def manifest(name):
    """The released key set (REFERENCE manifests); a missing manifest fails the test, never skips it."""
    for folder in MANIFEST_DIRS:
        p = folder / f"wan2.1_{name}.json"
        if p.is_file():
            return json.loads(p.read_text())
    pytest.fail(f"manifest wan2.1_{name}.json not found in {[str(d) for d in MANIFEST_DIRS]} "
                "(set CVG_MANIFESTS to the reference manifests folder)")


def tiny(model_type="t2v", **kw):
    # head_dim 128 as every released model (the head count is inferred from it)
    base = dict(model_type=model_type, dim=256, ffn_dim=64, heads=2, layers=2,
                in_dim=16 if model_type == "t2v" else 36, text_dim=32, freq_dim=16, image_dim=24, image_tokens=5)
    base.update(kw)
    return WanConfig(**base)


def random_model(cfg, seed=0):
    return randomize_dit(WanDiT(cfg).eval(), seed)


def run(m, cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 5, cfg.text_dim, generator=g)
    kw = {}
    if cfg.has_image:
        kw["y"] = torch.randn(1, 20, 2, 4, 4, generator=g)
        kw["clip_fea"] = torch.randn(1, cfg.image_tokens * (2 if cfg.model_type == "flf2v" else 1), cfg.image_dim, generator=g)
    with torch.no_grad():
        return m(x, torch.tensor([700.0]), ctx, **kw)


def same(a, b):
    """Equal up to float32 summation order (SDPA / matmul kernels may pick different paths)."""
    return a.shape == b.shape and (a - b).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# Full-size key sets on the meta device


@pytest.mark.parametrize("name", ["t2v_1.3B", "t2v_14B", "i2v_14B", "flf2v_14B"])
def test_manifest_key_sets_on_meta(name):
    man = manifest(name)
    shapes = {k: tuple(v) for k, v in man["keys"].items()}
    cfg = loading.detect_config(shapes)
    want = man["config"]
    assert (cfg.model_type, cfg.dim, cfg.ffn_dim, cfg.heads, cfg.layers, cfg.in_dim) == (
        want["model_type"], want["dim"], want["ffn_dim"], want["num_heads"], want["num_layers"], want["in_dim"])
    model = build_model(cfg, "meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == shapes
    assert len(ours) == man["num_tensors"]
    assert sum(p.numel() for p in model.parameters()) == man["num_parameters_excluding_buffers"]
    # and the diffusers names of those tensors are exactly diffusers' own key set
    import diffusers

    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(**loading.diffusers_config(cfg))
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {loading.original_to_diffusers_name(k): v for k, v in shapes.items()} == theirs
    assert {loading.diffusers_to_original_name(k) for k in theirs} == set(shapes)


@pytest.mark.parametrize("name", ["t2v_14B", "i2v_14B"])
def test_detection_through_prefix_and_diffusers_names(name):
    shapes = {k: tuple(v) for k, v in manifest(name)["keys"].items()}
    for variant in (
        {"model.diffusion_model." + k: v for k, v in shapes.items()},
        {loading.original_to_diffusers_name(k): v for k, v in shapes.items()},
    ):
        names, layout = loading.normalize_names(variant)
        assert set(names) == set(shapes)
        cfg = loading.detect_config({k: variant[v] for k, v in names.items()})
        assert cfg.model_type == manifest(name)["config"]["model_type"] and cfg.layers == 40


# ---------------------------------------------------------------------------------------------------------
# File layouts


def state_of(m):
    return {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "flf2v"])
def test_original_layout_fp32(tmp_path, model_type):
    cfg = tiny(model_type)
    src = random_model(cfg)
    path = tmp_path / "wan.safetensors"
    save_file(state_of(src), str(path))
    m = loading.load_wan_dit(path, dtype=torch.float32)
    fields = ("model_type", "dim", "ffn_dim", "heads", "layers", "in_dim", "out_dim", "text_dim", "freq_dim")
    assert [getattr(m.config, f) for f in fields] == [getattr(cfg, f) for f in fields]
    if cfg.has_image:
        assert m.config.image_dim == cfg.image_dim
    if cfg.model_type == "flf2v":
        assert m.config.image_tokens == cfg.image_tokens
    assert "original" in m.load_info["layout"]
    assert same(run(m, cfg), run(src, cfg))


def test_comfy_prefixed_bf16(tmp_path):
    cfg = tiny()
    src = random_model(cfg, 2)
    sd = {"model.diffusion_model." + k: v.to(torch.bfloat16) for k, v in state_of(src).items()}
    save_file(sd, str(tmp_path / "wan2.1_t2v_tiny_bf16.safetensors"))
    m = loading.load_wan_dit(tmp_path / "wan2.1_t2v_tiny_bf16.safetensors", dtype=torch.bfloat16)
    assert "model.diffusion_model." in m.load_info["layout"]
    assert m.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert m.dtype == torch.bfloat16
    ref = WanDiT(cfg).eval()
    ref.load_state_dict({k: v.to(torch.bfloat16) for k, v in state_of(src).items()}, assign=True)
    ref.compute_dtype = torch.bfloat16
    assert same(run(m, cfg), run(ref, cfg))


def test_fp16_file_computed_in_fp32(tmp_path):
    cfg = tiny()
    src = random_model(cfg, 3)
    save_file({k: v.half() for k, v in state_of(src).items()}, str(tmp_path / "f16.safetensors"))
    m = loading.load_wan_dit(tmp_path / "f16.safetensors", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    ref = WanDiT(cfg).eval()
    ref.load_state_dict({k: v.half().float() for k, v in state_of(src).items()})
    assert same(run(m, cfg), run(ref, cfg))


@pytest.mark.skipif(FP8 is None, reason="torch without float8")
def test_fp8_file_keeps_fp8_storage_and_upcasts(tmp_path):
    cfg = tiny()
    src = random_model(cfg, 4)
    sd = state_of(src)
    stored = {k: (v.to(FP8) if v.ndim == 2 and k.startswith("blocks.") else v.half()) for k, v in sd.items()}
    save_file(stored, str(tmp_path / "wan2.1_t2v_tiny_fp8_e4m3fn.safetensors"))
    m = loading.load_wan_dit(tmp_path / "wan2.1_t2v_tiny_fp8_e4m3fn.safetensors", dtype=torch.float32)
    assert m.blocks[0].ffn[0].weight.dtype == FP8
    assert m.head.modulation.dtype == torch.float32
    ref = WanDiT(cfg).eval()
    ref.load_state_dict({k: v.float() for k, v in stored.items()})
    assert same(run(m, cfg), run(ref, cfg))


@pytest.mark.skipif(FP8 is None, reason="torch without float8")
def test_forced_fp8_storage_from_fp32_file(tmp_path):
    cfg = tiny()
    src = random_model(cfg, 5)
    save_file(state_of(src), str(tmp_path / "w.safetensors"))
    m = loading.load_wan_dit(tmp_path / "w.safetensors", dtype=torch.float32, weight_dtype="fp8_e4m3fn")
    assert m.blocks[1].self_attn.o.weight.dtype == FP8
    assert m.blocks[1].self_attn.o.bias.dtype == torch.float32
    assert m.blocks[1].norm3.weight.dtype == torch.float32
    out, ref = run(m, cfg), run(src, cfg)
    assert (out - ref).norm() / ref.norm() < 0.2  # fp8 rounding, still the same model
    assert not torch.equal(out, ref)


@pytest.mark.skipif(FP8 is None, reason="torch without float8")
@pytest.mark.parametrize("keep_fp8", [True, False])
def test_scaled_fp8(tmp_path, keep_fp8):
    cfg = tiny()
    src = random_model(cfg, 6)
    sd = state_of(src)
    stored, dequant = {}, {}
    for k, v in sd.items():
        base = k[: -len(".weight")]
        if v.ndim == 2 and k.startswith("blocks.") and k.endswith(".weight"):
            scale = v.abs().max() / 448.0
            q = (v / scale).to(FP8)
            stored[k] = q
            stored[base + ".scale_weight"] = scale.reshape(1)
            dequant[k] = q.float() * scale
        else:
            stored[k] = v
            dequant[k] = v
    stored["scaled_fp8"] = torch.zeros(2, dtype=FP8)
    stored = {"model.diffusion_model." + k if k != "scaled_fp8" else k: v for k, v in stored.items()}
    save_file(stored, str(tmp_path / "wan_fp8_scaled.safetensors"))
    m = loading.load_wan_dit(tmp_path / "wan_fp8_scaled.safetensors", dtype=torch.float32,
                             weight_dtype="fp8_e4m3fn" if keep_fp8 else "fp32")
    assert m.load_info["scaled_fp8"]
    w = m.blocks[0].self_attn.q
    if keep_fp8:
        assert w.weight.dtype == FP8 and w.scale_weight is not None
    else:
        assert w.weight.dtype == torch.float32 and w.scale_weight is None
    assert set(m.state_dict()) == set(sd)  # scales are not part of the model's key set
    ref = WanDiT(cfg).eval()
    ref.load_state_dict(dequant)
    a, b = run(m, cfg), run(ref, cfg)
    assert (a - b).abs().max().item() < 1e-5
    assert (b - run(src, cfg)).abs().max() > 0  # the quantisation really happened


def _scaled_mm_kernel():
    from models.wan.dit import scaled_mm_unsupported
    return FP8 is not None and scaled_mm_unsupported("cpu") is None


def _block_linears(m):
    return {n: mod for n, mod in m.named_modules() if n.startswith("blocks.") and hasattr(mod, "runs_scaled_mm")}


@pytest.mark.skipif(FP8 is None, reason="torch without float8")
def test_scaled_mm_mode_quantizes_each_block_linear(tmp_path):
    """weight_dtype fp8_e4m3fn_scaled_mm: every block Linear is e4m3 with scale amax/448 (the oracle is computed
    here from the file tensor), marked for torch._scaled_mm; everything else stays in the compute dtype."""
    cfg = tiny()
    src = random_model(cfg, 11)
    sd = state_of(src)
    save_file(sd, str(tmp_path / "w.safetensors"))
    m = loading.load_wan_dit(tmp_path / "w.safetensors", dtype=torch.float32, weight_dtype=loading.SCALED_MM)
    assert m.load_info["scaled_mm"] and set(m.state_dict()) == set(sd)
    linears = _block_linears(m)
    assert len(linears) == cfg.layers * 10  # self q k v o, cross q k v o, ffn 0 and 2
    for name, mod in linears.items():
        w = sd[name + ".weight"]
        scale = w.abs().max() / 448.0
        assert mod.runs_scaled_mm and mod.scale_weight.item() == pytest.approx(scale.item(), rel=1e-6)
        assert torch.equal(mod.weight.float(), (w / mod.scale_weight).to(FP8).float()), name
        assert mod.bias.dtype == torch.float32
    assert m.head.head.weight.dtype == torch.float32 and not m.head.head.runs_scaled_mm
    assert m.text_embedding[0].weight.dtype == torch.float32
    if _scaled_mm_kernel():
        out, ref = run(m, cfg), run(src, cfg)
        assert 0 < ((out - ref).norm() / ref.norm()).item() < 0.1


@pytest.mark.skipif(FP8 is None, reason="torch without float8")
@pytest.mark.parametrize("stored", ["scaled_e4m3", "e4m3", "e5m2"])
def test_scaled_mm_mode_on_fp8_files(tmp_path, stored):
    """fp8 files in scaled-mm mode: e4m3 weights are kept byte for byte with the file's scale_weight (1 without
    one); e5m2 weights are re-quantized to e4m3 from their real value. The forward stays within the activation
    quantization of the same model computed from the dequantized weights."""
    cfg = tiny()
    sd = state_of(random_model(cfg, 12))
    file, real = {}, {}
    for k, v in sd.items():
        if v.ndim == 2 and k.startswith("blocks.") and k.endswith(".weight"):
            scale = v.abs().max() / 448.0 if stored == "scaled_e4m3" else torch.tensor(1.0)
            q = (v / scale).to(FP8 if stored != "e5m2" else torch.float8_e5m2)
            file[k] = q
            real[k] = q.float() * scale
            if stored == "scaled_e4m3":
                file[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            file[k] = real[k] = v
    if stored == "scaled_e4m3":
        file["scaled_fp8"] = torch.zeros(2, dtype=FP8)
    save_file(file, str(tmp_path / "f.safetensors"))
    m = loading.load_wan_dit(tmp_path / "f.safetensors", dtype=torch.float32, weight_dtype=loading.SCALED_MM)
    for name, mod in _block_linears(m).items():
        assert mod.runs_scaled_mm, name
        dequant = mod.weight.float() * mod.scale_weight
        if stored == "e5m2":
            w = real[name + ".weight"]
            assert mod.scale_weight.item() == pytest.approx(w.abs().max().item() / 448.0, rel=1e-6)
            assert ((dequant - w).abs() <= w.abs() / 16 + mod.scale_weight * 2 ** -9).all(), name
        else:
            assert torch.equal(mod.weight.view(torch.uint8), file[name + ".weight"].view(torch.uint8)), name
            assert torch.equal(dequant, real[name + ".weight"]), name
    if _scaled_mm_kernel():
        ref = WanDiT(cfg).eval()
        ref.load_state_dict(real)
        out, want = run(m, cfg), run(ref, cfg)
        assert 0 < ((out - want).norm() / want.norm()).item() < 0.1


def test_scaled_mm_unsupported_names_the_device_and_reason(monkeypatch):
    from models.wan.dit import scaled_mm_unsupported

    def no_kernel(*args, **kwargs):  # what torch raises on a GPU before compute capability 8.9
        raise RuntimeError("torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0 or 8.9")
    monkeypatch.setattr(torch, "_scaled_mm", no_kernel)
    msg = scaled_mm_unsupported("cpu")
    assert "no fp8 (e4m3) scaled-matmul kernel for cpu" in msg and "compute capability >= 9.0 or 8.9" in msg
    with pytest.raises(ValueError, match="fp8_e4m3fn_scaled_mm"):
        loading.load_wan_dit("unused.safetensors", weight_dtype="fp8_e4m3fn_scaledmm")


@pytest.mark.parametrize("model_type", ["t2v", "flf2v"])
def test_diffusers_sharded_folder(tmp_path, model_type):
    cfg = tiny(model_type)
    src = random_model(cfg, 7)
    dsd = loading.original_to_diffusers(state_of(src))
    names = sorted(dsd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
    folder = tmp_path / "transformer"
    folder.mkdir()
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: dsd[k].to(torch.bfloat16) for k in keys}, str(folder / fname))
        weight_map.update({k: fname for k in keys})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(loading.diffusers_config(cfg)))
    ref = WanDiT(cfg).eval()
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in state_of(src).items()})
    for path in (folder, folder / "diffusion_pytorch_model.safetensors.index.json",
                 folder / "diffusion_pytorch_model-00002-of-00002.safetensors"):  # a shard loads the whole model
        m = loading.load_wan_dit(path, dtype=torch.float32)
        assert "diffusers" in m.load_info["layout"] and m.config.model_type == model_type
        assert m.config.heads == cfg.heads
        assert same(run(m, cfg), run(ref, cfg))


def test_pickle_checkpoint(tmp_path):
    cfg = tiny("i2v")
    src = random_model(cfg, 8)
    torch.save(state_of(src), tmp_path / "wan_i2v.pth")
    m = loading.load_wan_dit(tmp_path / "wan_i2v.pth", dtype=torch.float32, expect="i2v")
    assert same(run(m, cfg), run(src, cfg))
    with pytest.raises(CheckpointError, match="i2v checkpoint where a t2v"):
        loading.load_wan_dit(tmp_path / "wan_i2v.pth", expect="t2v")


# ---------------------------------------------------------------------------------------------------------
# Wrong files


def test_wan_vae_file_is_named(tmp_path):
    vae = manifest("vae")["keys"]
    save_file({k: torch.zeros(1) for k in vae}, str(tmp_path / "wan_2.1_vae.safetensors"))
    with pytest.raises(CheckpointError, match="this is a Wan VAE, not a diffusion model"):
        loading.load_wan_dit(tmp_path / "wan_2.1_vae.safetensors")


def test_sd_checkpoint_is_named(tmp_path):
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
          "model.diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3),
          "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3),
          "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 4)}
    save_file(sd, str(tmp_path / "v1-5.safetensors"))
    with pytest.raises(CheckpointError, match="Stable Diffusion checkpoint"):
        loading.load_wan_dit(tmp_path / "v1-5.safetensors")


def test_truncated_and_non_tensor_files(tmp_path):
    cfg = tiny()
    save_file(state_of(random_model(cfg)), str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        loading.load_wan_dit(tmp_path / "cut.safetensors")
    (tmp_path / "notes.safetensors").write_text("hello, this is not a tensor file")
    with pytest.raises(CheckpointError, match="could not be read"):
        loading.load_wan_dit(tmp_path / "notes.safetensors")
    (tmp_path / "x.pth").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError):
        loading.load_wan_dit(tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        loading.load_wan_dit(tmp_path / "missing.safetensors")


def test_incomplete_or_misshapen_model(tmp_path):
    cfg = tiny()
    sd = state_of(random_model(cfg))
    bad = dict(sd)
    del bad["blocks.1.ffn.2.bias"]
    save_file(bad, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="1 missing.*blocks.1.ffn.2.bias"):
        loading.load_wan_dit(tmp_path / "missing.safetensors")
    bad = dict(sd)
    bad["blocks.0.cross_attn.k.weight"] = torch.zeros(64, 48)
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match="wrong shape.*cross_attn.k.weight"):
        loading.load_wan_dit(tmp_path / "shape.safetensors")
    save_file({"foo.weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a Wan2.1 diffusion model"):
        loading.load_wan_dit(tmp_path / "other.safetensors")


def test_meta_build_then_assign_keeps_file_tensors(tmp_path):
    """Loading assigns the converted tensors (no init + copy): a file already in the target dtype keeps
    the values bit for bit and no parameter is left on the meta device."""
    cfg = tiny()
    src = random_model(cfg, 9)
    save_file(state_of(src), str(tmp_path / "w.safetensors"))
    m = loading.load_wan_dit(tmp_path / "w.safetensors", dtype=torch.float32)
    assert not any(p.is_meta for p in m.parameters())
    for k, v in m.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
