"""Block swap (models/wan/block_swap.py) on the CPU ("cpu" as both devices: the same code path as CUDA,
synchronous, with real copies). Oracle: the same model without block swap (bit-identical output)."""

import pytest
import torch

from models.wan import pipeline
from models.wan.block_swap import BlockSwap, resident_bytes
from host.random_weights import randomize_dit
from models.wan.dit import WanConfig, WanDiT


def tiny_model(seed=0, layers=3):
    cfg = WanConfig(model_type="t2v", dim=32, ffn_dim=48, heads=2, layers=layers, text_dim=16, freq_dim=16)
    return randomize_dit(WanDiT(cfg).eval(), seed)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 2, 4, 6, generator=g), torch.tensor([900, 400]), torch.randn(2, 5, 16, generator=g)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_output_identical_and_blocks_back_on_offload(n):
    m = tiny_model()
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = m(x, t, ctx)
    swap = BlockSwap(m, n, offload_device="cpu")
    assert swap.swapped == list(range(3 - n, 3))
    masters = {i: [p for p in m.blocks[i].parameters()] for i in swap.swapped}
    seen = {}

    def spy(i):
        def hook(module, args):  # registered after BlockSwap's hook: sees what the block runs with
            seen[i] = [(p.data_ptr(), p.device.type) for p in module.parameters()]
        return hook
    spies = [m.blocks[i].register_forward_pre_hook(spy(i)) for i in swap.swapped]
    with torch.no_grad():
        out = m(x, t, ctx)
        out2 = m(x, t, ctx)
    assert torch.equal(out, ref) and torch.equal(out2, ref)
    assert swap.loads == 2 * n
    # the first swapped block is prefetched at block 0 (unless it is block 0), each next one by its predecessor
    assert swap.prefetched == 2 * (n if swap.swapped[0] != 0 else n - 1)
    for i in swap.swapped:
        # ran with copies (other storage than the masters), on the load device
        assert all(dev == "cpu" for _, dev in seen[i])
        assert not {ptr for ptr, _ in seen[i]} & {p.data_ptr() for p in masters[i]}
        # and the masters are back in the block afterwards, on the offload device
        now = list(m.blocks[i].parameters())
        assert all(a is b for a, b in zip(now, masters[i])) and all(p.device.type == "cpu" for p in now)
        assert all(s.copies is None for s in swap.slots.values())
    for h in spies:
        h.remove()
    swap.remove()
    with torch.no_grad():
        assert torch.equal(m(x, t, ctx), ref)


def test_fused_qkv_runs_the_swapped_copies():
    """Fused QKV concatenates whatever q / k / v hold when the block runs: the block-swap copies, bit-identical
    to the resident model with fused QKV."""
    m = tiny_model(seed=3)
    m.fused_qkv = True
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = m(x, t, ctx)
        swap = BlockSwap(m, 2, offload_device="cpu")
        out = m(x, t, ctx)
    assert swap.loads == 2 and torch.equal(out, ref)
    swap.remove()


def test_swapped_blocks_ignore_device_moves_and_sizes():
    m = tiny_model()
    total = sum(p.numel() * p.element_size() for p in m.parameters())
    swapped = sum(p.numel() * p.element_size() for i in (1, 2) for p in m.blocks[i].parameters())
    swap = BlockSwap(m, 2)
    assert swap.swapped_bytes() == swapped
    assert resident_bytes(m) == total - swapped
    m.to("meta")  # what ComfyUI's ModelPatcher does with the load device: only the resident part moves
    assert m.head.head.weight.device.type == "meta" and m.blocks[0].ffn[0].weight.device.type == "meta"
    assert all(p.device.type == "cpu" for i in (1, 2) for p in m.blocks[i].parameters())
    m.blocks[2].ffn[0].to("meta")  # a leaf move (current ComfyUI moves leaf modules one by one)
    assert m.blocks[2].ffn[0].weight.device.type == "cpu"
    swap.remove()
    m.blocks[2].ffn[0].to("meta")
    assert m.blocks[2].ffn[0].weight.device.type == "meta"


def test_sampling_with_swap_and_step_cache_equals_plain():
    m = tiny_model(seed=2)
    _, _, ctx = inputs(3)
    neg = torch.zeros(1, 1, 16)
    z = torch.zeros(1, 16, 2, 4, 6)
    kw = dict(seed=4, steps=6, cfg=3.0, solver="euler")
    ref = pipeline.sample_video(m, ctx[:1], neg, z, **kw)
    ref_cached = pipeline.sample_video(m, ctx[:1], neg, z, step_cache=0.4, **kw)
    swap = BlockSwap(m, 2)
    assert torch.equal(pipeline.sample_video(m, ctx[:1], neg, z, **kw), ref)
    assert torch.equal(pipeline.sample_video(m, ctx[:1], neg, z, step_cache=0.4, **kw), ref_cached)
    swap.remove()


def test_errors():
    m = tiny_model()
    with pytest.raises(ValueError, match="between 0 and the model's 3 blocks"):
        BlockSwap(m, 4)
    BlockSwap(m, 1)
    with pytest.raises(ValueError, match="already"):
        BlockSwap(m, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the asynchronous side-stream prefetch needs CUDA")
def test_cuda_async_prefetch_equals_resident():
    m = tiny_model(layers=4)
    x, t, ctx = inputs()
    m.cuda()
    with torch.no_grad():
        ref = m(x.cuda(), t.cuda(), ctx.cuda())
    m.cpu()
    swap = BlockSwap(m, 3)
    m.cuda()
    assert all(p.device.type == "cpu" and p.is_pinned() for i in swap.swapped for p in m.blocks[i].parameters())
    with torch.no_grad():
        out = m(x.cuda(), t.cuda(), ctx.cuda())
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
    assert all(p.device.type == "cpu" for i in swap.swapped for p in m.blocks[i].parameters())
