"""Sliding context windows over frames, so clips longer than a motion module's positional encoding (or
than fits in memory) run window by window and are fused with per-frame blend weights.

Plain PyTorch. The UNet batch is `chunks × frames` (ComfyUI stacks cond / uncond chunks, each holding every
frame); a window takes the same frames from every chunk.
"""
import math

import torch

FUSE_METHODS = ("pyramid", "linear", "flat")


def windows(num_frames, context_length, overlap, closed_loop=False):
    """Lists of frame indices; every frame is in at least one window, each window has context_length frames.

    Windows start every (context_length − overlap) frames. Without closed_loop the last window is aligned to
    the end of the clip; with closed_loop windows wrap around (the last frames are seen next to the first)."""
    if context_length < 1:
        raise ValueError(f"context_length must be at least 1, got {context_length}")
    if not 0 <= overlap < context_length:
        raise ValueError(f"context_overlap must be in [0, context_length), got {overlap} for length {context_length}")
    if num_frames <= context_length:
        return [list(range(num_frames))]
    stride = context_length - overlap
    if closed_loop:
        out = [[(s + i) % num_frames for i in range(context_length)] for s in range(0, num_frames, stride)]
        return out
    starts = list(range(0, num_frames - context_length + 1, stride))
    if starts[-1] + context_length < num_frames:
        starts.append(num_frames - context_length)
    return [list(range(s, s + context_length)) for s in starts]


def window_weights(window, num_frames, method="pyramid", overlap=0, closed_loop=False):
    """Blend weights (> 0) for the frames of one window, before per-frame normalisation.

    pyramid: triangular, highest in the window's middle; linear: 1 inside, ramping linearly over `overlap`
    frames at edges that meet another window (the clip's own first/last frame keep weight 1 unless the loop
    is closed); flat: all ones."""
    n = len(window)
    if method == "flat" or n == num_frames:
        return torch.ones(n)
    if method == "pyramid":
        i = torch.arange(n, dtype=torch.float32)
        return torch.minimum(i + 1, n - i) / math.ceil(n / 2)
    if method == "linear":
        w = torch.ones(n)
        o = min(overlap, n // 2)
        if o > 0:
            ramp = torch.arange(1, o + 1, dtype=torch.float32) / (o + 1)
            if closed_loop or window[0] != 0:
                w[:o] = ramp
            if closed_loop or window[-1] != num_frames - 1:
                w[n - o:] = torch.minimum(w[n - o:], ramp.flip(0))
        return w
    raise ValueError(f"unknown fuse method {method!r}; expected one of {', '.join(FUSE_METHODS)}")


def plan(num_frames, context_length, overlap, closed_loop=False, method="pyramid"):
    """[(frame indices, normalised weights)] such that for every frame the weights over windows sum to 1."""
    wins = windows(num_frames, context_length, overlap, closed_loop)
    raw = [window_weights(w, num_frames, method, overlap, closed_loop) for w in wins]
    total = torch.zeros(num_frames)
    for w, r in zip(wins, raw):
        total.index_add_(0, torch.tensor(w), r)
    if bool((total <= 0).any()):
        missing = torch.nonzero(total <= 0).flatten().tolist()
        raise AssertionError(f"frames {missing} are in no context window")  # cannot happen: windows cover all
    return [(w, r / total[torch.tensor(w)]) for w, r in zip(wins, raw)]


def slice_batch(obj, index, batch):
    """`obj` with every tensor whose first dimension is `batch` indexed by `index` (dicts, lists, tuples are
    walked; anything else is passed through unchanged)."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() > 0 and obj.shape[0] == batch:
            return obj[index.to(obj.device)]
        return obj
    if isinstance(obj, dict):
        return {k: slice_batch(v, index, batch) for k, v in obj.items()}
    if isinstance(obj, list):
        return [slice_batch(v, index, batch) for v in obj]
    if isinstance(obj, tuple):
        return tuple(slice_batch(v, index, batch) for v in obj)
    return obj


def slice_model_kwargs(c, index, batch):
    """Slice ComfyUI's `c` dict of apply_model keyword arguments (c_crossattn, c_concat, control, y, …) to a
    window. transformer_options is copied shallowly with only its per-sample `sigmas` sliced."""
    out = {}
    for k, v in c.items():
        if k == "transformer_options" and isinstance(v, dict):
            to = dict(v)
            if isinstance(to.get("sigmas"), torch.Tensor):
                to["sigmas"] = slice_batch(to["sigmas"], index, batch)
            out[k] = to
        else:
            out[k] = slice_batch(v, index, batch)
    return out


def run(call, x, t, c, chunks, state, context_length=0, overlap=0, closed_loop=False, method="pyramid",
        pe_length=None, check=None):
    """Run `call(x, t, c)` (the UNet) over the clip, in context windows when it is longer than
    context_length, setting state.frames for the motion modules. x is [chunks·frames, …]."""
    batch = x.shape[0]
    if batch % chunks:
        raise ValueError(f"a UNet batch of {batch} is not {chunks} equal cond/uncond chunks of frames")
    frames = batch // chunks
    limit = context_length if context_length > 0 else frames
    if pe_length is not None and min(limit, frames) > pe_length:
        raise ValueError(
            f"{frames} frames at once exceed the motion module's positional encoding length {pe_length}; "
            f"set context_length to at most {pe_length} so the clip runs in sliding windows"
        )
    previous = state.frames
    try:
        if frames <= limit:
            state.frames = frames
            return call(x, t, c)
        out = None
        for window, weights in plan(frames, limit, overlap, closed_loop, method):
            if check is not None:
                check()
            idx = torch.tensor([k * frames + f for k in range(chunks) for f in window], dtype=torch.long)
            state.frames = len(window)
            y = call(x[idx.to(x.device)], slice_batch(t, idx, batch), slice_model_kwargs(c, idx, batch))
            if out is None:
                out = torch.zeros((batch,) + tuple(y.shape[1:]), dtype=y.dtype, device=y.device)
            w = weights.repeat(chunks).to(device=y.device, dtype=y.dtype).reshape(-1, *([1] * (y.dim() - 1)))
            out.index_add_(0, idx.to(y.device), y * w)
        return out
    finally:
        state.frames = previous
