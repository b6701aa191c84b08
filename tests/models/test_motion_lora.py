"""MotionLoRA parsing, merge as a patch (W + α·up@down), chaining, mid-key skipping and bad files."""
import pytest
import torch
from safetensors.torch import save_file

from models.animatediff import lora as ml
from models.animatediff import motion_module as mm
from models.checkpoints import CheckpointError

WIDTHS = dict(down=(32, 32, 64, 64), up=(64, 64, 32, 32), mid=64)


def tiny_set(has_mid, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = mm.MotionModuleSet(**WIDTHS, has_mid=has_mid, pe_length=16)
    with torch.no_grad():
        for p in s.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return s.eval()


def lora_state(modules_with_mid, rank, seed):
    """Keys for every attention projection of every module (mid included)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in modules_with_mid.named_motion_modules():
        c = m.dim
        for a in (0, 1):
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                base = f"{name}.temporal_transformer.transformer_blocks.0.attention_blocks.{a}.processor.{proj}_lora"
                out[f"{base}.down.weight"] = torch.randn(rank, c, generator=g)
                out[f"{base}.up.weight"] = torch.randn(c, rank, generator=g) * 0.1
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    ref = tiny_set(True)
    a, b = lora_state(ref, 4, 1), lora_state(ref, 2, 2)
    save_file(a, str(d / "zoom.safetensors"))
    torch.save({"state_dict": b}, str(d / "pan.ckpt"))
    return d, a, b


def reference_merge(base_state, loras):
    out = {}
    for state, alpha in loras:
        for k, down in state.items():
            if not k.endswith(".down.weight"):
                continue
            up = state[k.replace(".down.weight", ".up.weight")]
            target = k.replace(".processor.", ".").replace("_lora.down.weight", ".weight").replace(".to_out.weight", ".to_out.0.weight")
            if target not in base_state:
                continue
            w = out.get(target, base_state[target].double())
            out[target] = w + alpha * (up.double() @ down.double())
    return out


@pytest.mark.parametrize("has_mid", [True, False])
def test_merge_matches_reference_and_is_a_patch(files, has_mid):
    d, a, b = files
    base = tiny_set(has_mid)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    la, lb = ml.load_motion_lora(d / "zoom.safetensors"), ml.load_motion_lora(d / "pan.ckpt")
    assert la.rank == 4 and lb.rank == 2 and la.has_mid
    merged = ml.merged_weights(base, [(la, 0.8), (lb, -0.5)])
    ref = reference_merge(base.state_dict(), [(a, 0.8), (b, -0.5)])
    assert set(merged) == set(ref)
    n_modules = 21 if has_mid else 20
    assert len(merged) == n_modules * 2 * 4
    assert not has_mid or any(k.startswith("mid_block.") for k in merged)
    worst = max((merged[k].double() - ref[k]).abs().max().item() for k in ref)
    assert worst < 1e-5
    inst = ml.build_instance(base, merged)
    # the loaded module is untouched
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    # patched params are new tensors; others share storage with the loaded module (no copy)
    bs, ist = base.state_dict(), inst.state_dict()
    for k in bs:
        if k in merged:
            assert torch.equal(ist[k], merged[k]) and ist[k].data_ptr() != bs[k].data_ptr()
        elif not k.endswith(".pe"):
            assert ist[k].data_ptr() == bs[k].data_ptr(), k
    # and the instance computes with the merged weights
    x = torch.randn(2 * 4, 32, 2, 2)
    m0 = inst.down_blocks[0].motion_modules[0]
    assert not torch.allclose(m0(x, 4), base.down_blocks[0].motion_modules[0](x, 4))


def test_strength_zero_and_chain_order_independent(files):
    d, _, _ = files
    base = tiny_set(False)
    la, lb = ml.load_motion_lora(d / "zoom.safetensors"), ml.load_motion_lora(d / "pan.ckpt")
    assert ml.merged_weights(base, [(la, 0.0)]) == {}
    ab = ml.merged_weights(base, [(la, 1.0), (lb, 0.3)])
    ba = ml.merged_weights(base, [(lb, 0.3), (la, 1.0)])
    assert all(torch.allclose(ab[k], ba[k], atol=1e-6) for k in ab)


def test_dtype_conversion_copies_only_when_needed():
    base = tiny_set(False)
    inst = ml.build_instance(base, {}, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in inst.parameters())
    assert all(p.dtype == torch.float32 for p in base.parameters())


def test_bad_files(tmp_path):
    mm_state = {f"down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight": torch.zeros(4, 4)}
    with pytest.raises(CheckpointError, match="motion module; load it with CVG Load Motion Module"):
        ml.parse_motion_lora(mm_state, "mm.ckpt")
    adapter = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": torch.zeros(2, 4)}
    with pytest.raises(CheckpointError, match="LoraLoaderModelOnly"):
        ml.parse_motion_lora(adapter, "v3_sd15_adapter.ckpt")
    with pytest.raises(CheckpointError, match="Load Checkpoint"):
        ml.parse_motion_lora({"model.diffusion_model.out.2.weight": torch.zeros(1)}, "sd.ckpt")
    half = {"down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q_lora.down.weight": torch.zeros(2, 32)}
    with pytest.raises(CheckpointError, match="up half"):
        ml.parse_motion_lora(half, "half.ckpt")
    # a LoRA for wider modules does not fit
    wide = lora_state(mm.MotionModuleSet(down=(64, 64, 64, 64), up=(64, 64, 64, 64), mid=64, has_mid=False, pe_length=16), 2, 0)
    with pytest.raises(CheckpointError, match="does not fit"):
        ml.merged_weights(tiny_set(False), [(ml.parse_motion_lora(wide, "wide"), 1.0)])
    # truncated file
    good = tmp_path / "lora.safetensors"
    save_file(lora_state(tiny_set(False), 2, 0), str(good))
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        ml.load_motion_lora(tmp_path / "cut.safetensors")
