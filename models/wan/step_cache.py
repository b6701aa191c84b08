"""First-block step cache for the Wan DiT: skip blocks 1..N-1 on sampling steps where they would change little.

Why first-block caching (and not TeaCache / MagCache): TeaCache decides from the change of the timestep-
modulated input through a polynomial whose coefficients were fitted on the released Wan weights; MagCache
from a per-model magnitude-ratio curve calibrated on them. Both are model-specific calibrations that do not
carry over to other checkpoints (the bundled demo models, fine-tunes, fp8 files, random test weights).
First-block caching measures the change directly on the model being run: every step runs the embeddings
and the FIRST block; the first block's residual r1 = block0(x) − x is compared with r1 of the last step
on which all blocks ran,

    d = mean|r1 − r1_prev| / mean|r1_prev|        (per batch row)

and when d < threshold the remaining blocks are not run: their residual R = x_out − block0(x) from that
last full step is reused, x_out = block0(x) + R, and the head runs as usual. d ≥ threshold (or the first
`warmup` calls of a stream, or `max_skips` consecutive skips) runs every block and refreshes r1_prev and R.
A skipped step costs one block of L (1/30 of a forward for T2V-1.3B, 1/40 for 14B).

Streams: the cache keeps one state per named stream ("cond", "uncond", ...), so CFG's conditional and
unconditional passes are cached and decided separately; inside a stream the decision is per batch row, so a
batched-CFG call ([cond rows; uncond rows] in one batch) also decides cond and uncond separately and runs the
remaining blocks only on the rows that need them. threshold <= 0 is the plain forward (bit for bit).

Memory: two float32 tensors of the residual-stream size [B, L, D] per stream (r1_prev and R).
"""
import torch


class _Stream:
    def __init__(self):
        self.key = None      # (shape of the residual stream, device) the state belongs to
        self.prev = None     # r1 at the last full step, per row [B, L, D]
        self.rest = None     # residual of blocks 1..L-1 at the last full step [B, L, D]
        self.calls = 0
        self.skips = None    # consecutive skips per row [B] (CPU int64)


class StepCache:
    """First-block cache; call it in place of the model: `cache(model, stream, x, t, context, **forward_kwargs)`.

    threshold: relative-L1 change of the first block's residual below which the other blocks are skipped
    (0 = off; 0.05–0.15 is the useful range on Wan); warmup: calls of each stream that always run fully;
    max_skips: at most this many consecutive skips per row (0 = no limit).
    Counters: `calls` (rows given), `full` (rows that ran every block), `skipped` = calls − full.
    """

    def __init__(self, threshold=0.0, warmup=1, max_skips=0):
        threshold = float(threshold)
        if threshold < 0 or threshold != threshold:
            raise ValueError(f"step cache threshold must be >= 0 (0 turns the cache off), got {threshold}")
        if int(warmup) < 1:
            raise ValueError(f"step cache warmup must be >= 1 (the first call has nothing to reuse), got {warmup}")
        self.threshold = threshold
        self.warmup = int(warmup)
        self.max_skips = int(max_skips)
        self.streams = {}
        self.calls = 0
        self.full = 0
        self.history = []  # per call: (stream, [d per row] or None, [ran fully per row])

    @property
    def skipped(self):
        return self.calls - self.full

    def reset(self):
        self.streams.clear()
        self.calls = self.full = 0
        self.history = []

    @staticmethod
    def distance(r1, prev):
        """Relative L1 change per batch row: mean|r1 − prev| / mean|prev| -> [B] (float32, CPU)."""
        num = (r1 - prev).abs().flatten(1).mean(1)
        den = prev.abs().flatten(1).mean(1).clamp_min(1e-12)
        return (num / den).float().cpu()

    def decide(self, stream_state, r1):
        """Which rows run every block: a bool CPU tensor [B], and the distances (None when forced)."""
        b = r1.shape[0]
        st = stream_state
        if st.prev is None or st.calls < self.warmup:
            return torch.ones(b, dtype=torch.bool), None
        d = self.distance(r1, st.prev)
        need = d >= self.threshold
        if self.max_skips > 0:
            need |= st.skips >= self.max_skips
        return need, d

    def __call__(self, model, stream, x, t, context, **kwargs):
        inp = model.embed(x, t, context, **kwargs)
        if self.threshold <= 0:
            return model.finish(inp, model.run_blocks(inp, inp.x))
        if inp.sp is not None:
            raise ValueError("the step cache does not support sequence-parallel forwards; set its threshold to 0")
        h1 = model.run_blocks(inp, inp.x, 0, 1)
        r1 = h1 - inp.x
        st = self.streams.setdefault(stream, _Stream())
        key = (tuple(h1.shape), str(h1.device))
        if st.key != key:  # a new run / another shape: nothing to reuse
            st.__init__()
            st.key = key
        need, d = self.decide(st, r1)
        b = h1.shape[0]
        if bool(need.all()):
            out = model.run_blocks(inp, h1, 1)
            st.prev, st.rest = r1, out - h1
            st.skips = torch.zeros(b, dtype=torch.int64)
        elif not bool(need.any()):
            out = h1 + st.rest
            st.skips += 1
        else:
            idx = need.nonzero().flatten()
            dev_idx = idx.to(h1.device)
            sub = model.run_blocks(inp.rows(idx), h1.index_select(0, dev_idx), 1)
            out = h1 + st.rest
            out.index_copy_(0, dev_idx, sub)
            rest = st.rest.clone()
            rest.index_copy_(0, dev_idx, sub - h1.index_select(0, dev_idx))
            prev = st.prev.clone()
            prev.index_copy_(0, dev_idx, r1.index_select(0, dev_idx))
            st.prev, st.rest = prev, rest
            st.skips = torch.where(need, torch.zeros_like(st.skips), st.skips + 1)
        st.calls += 1
        self.calls += b
        self.full += int(need.sum())
        self.history.append((stream, None if d is None else d.tolist(), need.tolist()))
        return model.finish(inp, out)

    def summary(self):
        return (f"step cache threshold {self.threshold}: {self.full} of {self.calls} row-forwards ran every block "
                f"({self.skipped} reused)")


def as_step_cache(step_cache):
    """None / a threshold (float) / a StepCache -> a StepCache or None (None when off)."""
    if step_cache is None:
        return None
    if isinstance(step_cache, StepCache):
        return step_cache
    threshold = float(step_cache)
    if threshold < 0:
        raise ValueError(f"step cache threshold must be >= 0 (0 turns the cache off), got {threshold}")
    return StepCache(threshold) if threshold > 0 else None


class CachedModel:
    """A model callable `(x, t, context, **kw) -> v` that runs through a StepCache, for velocity functions
    that call the model directly (models/long_video.wan_velocity_fn). The stream of a call is named by
    `stream_of(x, context, y)`: by default the identity (storage) of its context and y tensors — the same
    tensors on every step of such a velocity function — so its passes (cond / text-uncond / frame-uncond)
    are cached separately; use `stream_of=lambda *a: "batch"` for a velocity function that makes one batched
    call per step (its rows keep their order, so the per-row decisions stay per pass)."""

    def __init__(self, model, cache, stream_of=None):
        self.model, self.cache = model, cache
        self.stream_of = stream_of or _storage_key

    def __call__(self, x, t, context, clip_fea=None, y=None, image_strength=1.0, **kw):
        stream = self.stream_of(x, context, y)
        return self.cache(self.model, stream, x, t, context, clip_fea=clip_fea, y=y, image_strength=image_strength,
                          **kw)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _storage_key(x, context, y):
    def ptr(v):
        return None if v is None else (v.data_ptr(), tuple(v.shape))
    return ("tensors", ptr(context), ptr(y), tuple(x.shape))
