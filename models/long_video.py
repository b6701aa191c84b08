"""Long-video algorithms (REFERENCE.md §7, LVDM's techniques on the Wan backbone). Pure PyTorch.

Pieces, each usable alone:

* **Segment plans** (:class:`Segment`, :func:`plan_extension`, :func:`plan_interpolation`): every segment is a
  4k+1-frame clip placed on one global pixel-frame timeline, with the local frames that are *known*
  (conditioned) and the local range it contributes to the output. Stitching is by construction: the kept
  ranges tile the timeline exactly once (:func:`check_plan`).
* **Conditional latent perturbation** (:func:`perturb`): z_s = (1 − s)·z + s·ε, ε seeded, s in σ units, done
  once per segment; the sampler then holds z_s fixed as the condition. (LVDM also feeds s to the model
  through a label embedding; the released Wan checkpoints have none, so s only acts through the data.)
* **Known frames for plain T2V models** (:class:`FrameSubstitution`): before every model evaluation the
  known latent frames of the model input are replaced by the condition at noise level ℓ = max(σ, s):
  for σ ≤ s they are z_s itself; for σ > s, z_s is noised further to σ:
  a·z_s + b·ε with a = (1 − σ)/(1 − s), b = sqrt(σ² − (a·s)²) (so the marginal is (1 − σ)·z + σ·noise).
  At the end the known frames are set to the condition z_s (:meth:`FrameSubstitution.finalize`).
  Because the model only ever sees substituted known frames, substituting the model input is the same
  as in-painting the solver state, for every solver.
* **Frame guidance** (:func:`guided_velocity_fn`): v = v_tu + g·(v_c − v_tu) + w·(v_c − v_fu), with v_c the
  full condition (text + frames), v_tu text-unconditional (negative prompt, frames kept), v_fu
  frame-unconditional (positive text, no frame condition: mask zeros, no condition latent, no
  substitution). w = 0 skips the v_fu pass, g = 1 skips the v_tu pass. An optional batched callable runs
  the needed passes in one call.
* **Colour anchoring** (:func:`color_anchor`): per-channel mean/std matching of new frames to the
  condition frames in CIE LAB (kornia), off by default.
* **Causal-VAE condition rule** (:func:`encode_tail`): the Wan VAE is causal and its first latent frame
  stands for 1 pixel frame while later ones stand for 4, so latent frames cut from the end of a clip are
  not valid first latents of a new clip. A new segment is conditioned on the last m = 4k+1 *pixel*
  frames, re-encoded as the start of a clip: the first (m − 1)/4 + 1 latent frames of the new segment are
  then exactly encode(last m frames) (causality: encode(x[:5]) == encode(x)[:2]), and the segment's own
  frames 0..m−1 overlap the previous output. For I2V/FLF2V models the same m frames go through the mask +
  condition-latent mechanism (``models.conditioning.build_condition`` with known frames 0..m−1).
* **Driver** (:func:`generate_long`): runs a plan with caller-supplied callables (sample a segment, decode),
  emitting each segment's new frames as soon as they exist and keeping only the frames later segments
  condition on, so memory is flat in the number of segments; a per-segment metrics hook receives seam and
  colour statistics for drift measurements.
"""
import math
from dataclasses import dataclass, field

import torch

from . import sampling
from .wan import latent as wan_latent


# ------------------------------------------------------------------------------------------ plans

@dataclass(frozen=True)
class Segment:
    index: int
    start: int            # global pixel index of local frame 0
    length: int           # pixel frames, 4k+1
    known: tuple          # local indices of conditioned frames
    keep: tuple           # (from, to) local range this segment contributes to the output
    kind: str = "extend"  # "unconditional" | "extend" | "interpolate"

    @property
    def known_global(self):
        return tuple(self.start + k for k in self.known)

    @property
    def kept_global(self):
        return (self.start + self.keep[0], self.start + self.keep[1])


def _check_4k1(n, what):
    wan_latent.check_frame_count(int(n), what)


def plan_extension(num_segments, segment_frames=81, overlap_frames=5, first_frames=None, initial_frames=0):
    """Autoregressive extension plan.

    Without ``initial_frames``: segment 0 is unconditional (``first_frames`` long, default
    ``segment_frames``); each later segment conditions on the last ``overlap_frames`` frames of the output
    and adds ``segment_frames − overlap_frames`` new ones. With ``initial_frames`` = n (an existing video of n
    frames at global 0..n−1), every segment is conditioned, the first on the video's last m frames, and only
    new frames are kept (the caller prepends the existing video if it wants it in the output).
    Output length: first + (N−1)·(L − m) (or N·(L − m) new frames after an existing video).
    """
    if num_segments < 1:
        raise ValueError(f"num_segments must be at least 1, got {num_segments}")
    L, m = int(segment_frames), int(overlap_frames)
    _check_4k1(L, "segment length")
    _check_4k1(m, "overlap (condition frames)")
    if m >= L:
        raise ValueError(f"overlap {m} must be shorter than the segment length {L}")
    segs = []
    if initial_frames:
        if initial_frames < m:
            raise ValueError(f"the input video has {initial_frames} frames but the overlap needs {m}; lower the "
                             f"overlap or give a longer video")
        start = initial_frames - m
        for i in range(num_segments):
            segs.append(Segment(i, start, L, tuple(range(m)), (m, L), "extend"))
            start += L - m
        return segs
    first = L if first_frames is None else int(first_frames)
    _check_4k1(first, "first segment length")
    if first < m:
        raise ValueError(f"first segment ({first} frames) is shorter than the overlap {m}")
    segs.append(Segment(0, 0, first, (), (0, first), "unconditional"))
    start = first - m
    for i in range(1, num_segments):
        segs.append(Segment(i, start, L, tuple(range(m)), (m, L), "extend"))
        start += L - m
    return segs


def interpolation_keys_per_segment(frames_between):
    """Keyframes spanned by one segment so that its length j·(g+1)+1 is 4k+1: j = 4 / gcd(g+1, 4)."""
    step = int(frames_between) + 1
    return 4 // math.gcd(step, 4)


def plan_interpolation(num_keyframes, frames_between=3, keys_per_segment=None):
    """Plan to fill ``frames_between`` frames between each pair of consecutive keyframes.

    Keyframe j sits at global frame j·(g+1); total = (K−1)·(g+1) + 1. A segment spans ``keys_per_segment``
    gaps (default: the fewest making its length 4k+1, e.g. 1 gap for g = 3 (×4), 2 gaps for g = 1 (×2)),
    with every keyframe inside it known. Consecutive segments share their boundary keyframe, which only the
    earlier one keeps; if the last segment would be short it starts earlier and keeps only its new part, so
    every keyframe appears once and in place."""
    K, g = int(num_keyframes), int(frames_between)
    if K < 2:
        raise ValueError(f"interpolation needs at least 2 keyframes, got {K}")
    if g < 1:
        raise ValueError(f"frames_between must be at least 1, got {g}")
    step = g + 1
    j = interpolation_keys_per_segment(g) if keys_per_segment is None else int(keys_per_segment)
    L = j * step + 1
    _check_4k1(L, f"segment length for {j} gap(s) of {g} frames")
    gaps = K - 1
    if gaps < j:
        raise ValueError(f"{K} keyframes give {gaps} gap(s) but one segment spans {j}; with {g} frames between "
                         f"keyframes give at least {j + 1} keyframes")
    total = gaps * step + 1
    known = tuple(range(0, L, step))
    segs = []
    done = 0  # global frames already covered: [0, done)
    gap = 0
    i = 0
    while done < total:
        start_gap = min(gap, gaps - j)
        start = start_gap * step
        end = start + L
        keep_to = L if end == total else L - 1
        segs.append(Segment(i, start, L, known, (done - start, keep_to), "interpolate"))
        done = start + keep_to
        gap = start_gap + j
        i += 1
    return segs


def plan_total_frames(plan):
    return max(s.kept_global[1] for s in plan)


def check_plan(plan, first_global=None):
    """Kept ranges tile [first, total) exactly once; known frames precede what a segment keeps or are
    keyframes; every segment is 4k+1. Returns the total frame count."""
    pos = plan[0].kept_global[0] if first_global is None else first_global
    for s in plan:
        _check_4k1(s.length, "segment length")
        a, b = s.kept_global
        if a != pos:
            raise ValueError(f"segment {s.index} keeps frames from {a}, expected {pos} (gap or overlap)")
        if not (0 <= s.keep[0] < s.keep[1] <= s.length):
            raise ValueError(f"segment {s.index} keep range {s.keep} is outside 0..{s.length}")
        pos = b
    return pos


# --------------------------------------------------------------------------------- perturbation

def perturb(z, s, seed):
    """Conditional latent perturbation z_s = (1 − s)·z + s·ε, ε = seeded_noise(z.shape, seed) (CPU generator)."""
    s = float(s)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"perturbation level s must be in [0, 1) (σ units; LVDM used ≈ 0.1 at sampling), got {s}")
    if s == 0.0:
        return z.clone()
    eps = sampling.seeded_noise(z.shape, seed).to(z.device, z.dtype)
    return (1.0 - s) * z + s * eps


def substitution_value(cond, s, sigma, noise):
    """Known-frame value at the current step: z_s if σ ≤ s, else z_s noised from level s up to σ."""
    sigma, s = float(sigma), float(s)
    if sigma <= s:
        return cond
    a = (1.0 - sigma) / (1.0 - s)
    b = math.sqrt(max(sigma * sigma - (a * s) ** 2, 0.0))
    return a * cond + b * noise


class FrameSubstitution:
    """In-painting style known frames for models without mask channels (T2V).

    ``cond`` [B,C,T,h,w] in the sampler's (normalised) space, of which the latent frames ``known``
    (indices along dim 2) are the condition z_s (already perturbed to level ``level``, see :func:`perturb`);
    ``noise`` the same shape (fixed for the whole segment; default: seeded from ``seed``)."""

    def __init__(self, cond, known, level=0.0, noise=None, seed=0):
        self.known = sorted(int(k) for k in known)
        if not self.known:
            raise ValueError("FrameSubstitution needs at least one known latent frame")
        if self.known[-1] >= cond.shape[2] or self.known[0] < 0:
            raise ValueError(f"known latent frames {self.known} outside 0..{cond.shape[2] - 1}")
        if not 0.0 <= level < 1.0:
            raise ValueError(f"level must be in [0, 1), got {level}")
        self.level = float(level)
        idx = torch.tensor(self.known, device=cond.device)
        self.idx = idx
        self.cond = cond.index_select(2, idx)
        if noise is None:
            noise = sampling.seeded_noise(cond.shape, seed).to(cond.device, cond.dtype)
        self.noise = noise.index_select(2, idx.to(noise.device)).to(cond.device, cond.dtype)

    def value(self, sigma):
        return substitution_value(self.cond, self.level, sigma, self.noise)

    def apply(self, x, sigma):
        x = x.clone()
        x[:, :, self.idx.to(x.device)] = self.value(sigma).to(x.device, x.dtype)
        return x

    def wrap(self, velocity_fn):
        def fn(x, sigma):
            return velocity_fn(self.apply(x, sigma), sigma)
        return fn

    def finalize(self, x):
        x = x.clone()
        x[:, :, self.idx.to(x.device)] = self.cond.to(x.device, x.dtype)
        return x


def substitution_condition(encode, frames_by_index, num_frames):
    """Known latent frames for a T2V model from known pixel frames of a ``num_frames`` clip.

    ``encode(images [n,H,W,C] 0..1) -> raw latent [1,16,t,h,w]`` of those frames as a clip start.
    Exact part: the known prefix 0..m−1 (m = 4k+1) → latent frames 0..(m−1)/4 = encode(prefix).
    Approximate part: a known *last* frame (interpolation end keyframe) → the last latent frame of
    encode(video) where that frame is held over the last latent's 4 frames and the unknown frames hold
    the previous known frame; the exact keyframe is pasted back in pixels when stitching.
    Returns (raw latent [1,16,T_lat,h,w] with the known frames filled (zeros elsewhere), known latent list).
    """
    wan_latent.check_frame_count(num_frames, "segment length")
    idx = sorted(frames_by_index)
    prefix = 0
    while prefix in frames_by_index:
        prefix += 1
    exact_m = ((prefix - 1) // 4) * 4 + 1 if prefix else 0  # longest 4k+1 prefix
    t_lat = wan_latent.latent_frames(num_frames)
    known = []
    parts = {}
    if exact_m:
        frames = torch.stack([frames_by_index[k] for k in range(exact_m)])
        z = encode(frames)
        for k in range(z.shape[2]):
            parts[k] = z[:, :, k]
            known.append(k)
    last = num_frames - 1
    if last in frames_by_index and (t_lat - 1) not in parts:
        hold = []
        cur = frames_by_index[idx[0]]
        group_start = num_frames - 4 if num_frames > 1 else 0
        for p in range(num_frames):
            if p >= group_start:
                cur = frames_by_index[last]
            elif p in frames_by_index:
                cur = frames_by_index[p]
            hold.append(cur)
        z = encode(torch.stack(hold))
        parts[t_lat - 1] = z[:, :, -1]
        known.append(t_lat - 1)
    if not parts:
        raise ValueError(f"no known latent frame can be built from known pixel frames {idx}; a T2V model needs "
                         f"frame 0 (and 4k+1 leading frames) known")
    ref = next(iter(parts.values()))
    out = torch.zeros(ref.shape[0], ref.shape[1], t_lat, *ref.shape[-2:], dtype=ref.dtype, device=ref.device)
    for k, v in parts.items():
        out[:, :, k] = v
    return out, sorted(known)


# ----------------------------------------------------------------------------------------- guidance

def guided_velocity_fn(v_cond, v_text_uncond=None, v_frame_uncond=None, g=5.0, w=0.0, batched=None):
    """v = v_tu + g·(v_c − v_tu) + w·(v_c − v_fu) as a velocity_fn(x, σ).

    Each argument is a velocity_fn. Passes not needed are never called: v_tu when g == 1, v_fu when w == 0.
    ``batched(x, sigma, names) -> dict name -> v`` (names from 'cond', 'text_uncond', 'frame_uncond')
    replaces the separate calls with one batched call when memory allows."""
    need_tu = g != 1.0
    need_fu = w != 0.0
    if need_tu and v_text_uncond is None and batched is None:
        raise ValueError("text CFG scale != 1 needs an unconditional (negative) velocity function")
    if need_fu and v_frame_uncond is None and batched is None:
        raise ValueError("frame guidance w != 0 needs a frame-unconditional velocity function")
    names = ["cond"] + (["text_uncond"] if need_tu else []) + (["frame_uncond"] if need_fu else [])

    def fn(x, sigma):
        if batched is not None:
            out = batched(x, sigma, names)
        else:
            out = {"cond": v_cond(x, sigma)}
            if need_tu:
                out["text_uncond"] = v_text_uncond(x, sigma)
            if need_fu:
                out["frame_uncond"] = v_frame_uncond(x, sigma)
        vc = out["cond"]
        v = out["text_uncond"] + g * (vc - out["text_uncond"]) if need_tu else vc
        if need_fu:
            v = v + w * (vc - out["frame_uncond"])
        return v

    fn.passes = tuple(names)
    return fn


def frame_unconditional_y(y):
    """The frame-unconditional I2V input: mask all zeros and no condition latent (zeros)."""
    return torch.zeros_like(y)


# -------------------------------------------------------------------------------------------- colour

def _lab(images):
    import kornia
    x = images[..., :3].permute(0, 3, 1, 2).clamp(0, 1)
    return kornia.color.rgb_to_lab(x)


def lab_stats(images):
    """Per-channel mean and std of IMAGE frames [T,H,W,C] (0..1) in CIE LAB: two [3] tensors."""
    lab = _lab(images.to(torch.float32))
    return lab.mean(dim=(0, 2, 3)), lab.std(dim=(0, 2, 3))


def color_anchor(images, reference, strength=1.0, eps=1e-5):
    """Match the LAB per-channel mean/std of ``images`` [T,H,W,C] to ``reference`` frames, blend by strength."""
    import kornia
    if strength == 0:
        return images
    imgs = images.to(torch.float32)
    lab = _lab(imgs)
    mu, sd = lab.mean(dim=(0, 2, 3), keepdim=True), lab.std(dim=(0, 2, 3), keepdim=True)
    rmu, rsd = lab_stats(reference)
    rmu, rsd = rmu.view(1, 3, 1, 1).to(lab), rsd.view(1, 3, 1, 1).to(lab)
    matched = (lab - mu) / (sd + eps) * rsd + rmu
    lab = lab + float(strength) * (matched - lab)
    rgb = kornia.color.lab_to_rgb(lab, clip=True).permute(0, 2, 3, 1)
    out = imgs.clone()
    out[..., :3] = rgb
    return out.to(images.dtype)


# ------------------------------------------------------------------------------------------- driver

def encode_tail(encode, frames, m):
    """Raw latent of the last ``m`` (4k+1) pixel frames of ``frames`` [T,H,W,C], encoded as a clip start."""
    _check_4k1(m, "condition frames")
    if frames.shape[0] < m:
        raise ValueError(f"need {m} condition frames, the video has {frames.shape[0]}")
    return encode(frames[-m:])


@dataclass
class SegmentResult:
    index: int
    frames_emitted: int
    seam_error: float = float("nan")
    lab_mean: list = field(default_factory=list)
    lab_std: list = field(default_factory=list)


def generate_long(plan, sample_segment, decode, emit, given_frames=None, color_anchoring=0.0,
                  paste_known=False, metrics_hook=None, progress=None):
    """Run a segment plan with flat memory.

    * ``sample_segment(segment, known) -> latent``: ``known`` maps local frame index → IMAGE frame [H,W,C]
      (0..1) for ``segment.known``; the callable builds the condition (mask + condition latent, or
      substitution), samples, and returns what ``decode`` accepts.
    * ``decode(latent) -> IMAGE [segment.length, H, W, C]`` (an iterator of chunks is also accepted).
    * ``emit(frames, segment)`` receives each segment's kept frames, in timeline order, once.
    * ``given_frames``: global index → frame for frames that exist before sampling (an input video's tail,
      keyframes).
    * ``color_anchoring``: strength of LAB mean/std matching of new frames to the segment's known frames.
    * ``paste_known``: replace decoded known frames by the exact given frames in what is emitted.
    * ``metrics_hook(result: SegmentResult, frames)`` after every segment (seam_error = mean |decoded known
      frames − condition frames|, LAB statistics of the emitted frames).

    Only frames that a later segment conditions on are retained (cloned, on the device the decoder used),
    each dropped once its last user has run. Returns a list of SegmentResult.
    """
    check_plan(plan)
    store = dict(given_frames or {})
    last_use = {}
    for s in plan:
        for gidx in s.known_global:
            last_use[gidx] = s.index
    results = []
    for s in plan:
        known = {}
        for k, gidx in zip(s.known, s.known_global):
            if gidx not in store:
                raise ValueError(f"segment {s.index} needs frame {gidx}, which is neither given nor generated "
                                 f"before it; check the plan")
            known[k] = store[gidx]
        latent = sample_segment(s, known)
        frames = decode(latent)
        if not torch.is_tensor(frames):
            frames = torch.cat(list(frames), dim=0)
        del latent
        if frames.shape[0] != s.length:
            raise ValueError(f"decode returned {frames.shape[0]} frames for segment {s.index}, expected {s.length}")
        seam = float("nan")
        ref = None
        if known:
            ks = sorted(known)
            ref = torch.stack([known[k] for k in ks]).to(frames.device, frames.dtype)
            seam = float((frames[ks] - ref).abs().mean())
        a, b = s.keep
        kept = frames[a:b]
        if known and color_anchoring:
            ref = torch.stack([known[k] for k in sorted(known)]).to(kept.device, kept.dtype)
            kept = color_anchor(kept, ref, color_anchoring)
        if paste_known:
            kept = kept.clone()
            for k, f in known.items():
                if a <= k < b:
                    kept[k - a] = f.to(kept.device, kept.dtype)
        # retain only frames that later segments condition on
        for local in range(s.length):
            gidx = s.start + local
            if last_use.get(gidx, -1) > s.index and gidx not in store:
                src = kept[local - a] if a <= local < b else frames[local]
                store[gidx] = src.clone()
        for gidx in list(store):
            if last_use.get(gidx, -1) <= s.index:
                del store[gidx]
        del frames, known, ref
        emit(kept, s)
        res = SegmentResult(s.index, int(kept.shape[0]), seam)
        if metrics_hook is not None:
            mu, sd = lab_stats(kept)
            res.lab_mean, res.lab_std = mu.tolist(), sd.tolist()
            metrics_hook(res, kept)
        results.append(res)
        del kept
        if progress is not None:
            progress(s.index + 1, len(plan))
    return results


# ------------------------------------------------------------------------- Wan velocity functions

def _pad_rows(ctxs):
    rows = max(c.shape[1] for c in ctxs)
    out = []
    for c in ctxs:
        if c.shape[1] < rows:
            c = torch.cat([c, c.new_zeros(c.shape[0], rows - c.shape[1], c.shape[2])], dim=1)
        out.append(c)
    return torch.cat(out, dim=0)


def wan_velocity_fn(model, context, neg_context=None, cfg_scale=5.0, y=None, clip_fea=None, image_strength=1.0,
                    frame_guidance=0.0, substitution=None, batched=False):
    """velocity_fn(x, σ) for a Wan DiT with text CFG, frame guidance and either conditioning mechanism.

    ``model(x, t, context, clip_fea=None, y=None, image_strength=1.0) -> v`` (``WanDiT.forward``); ``t`` is
    the integer timestep of σ (:func:`models.sampling.timestep`). Passes:
      cond         = model(sub(x), ctx+,  y)        text and frames
      text_uncond  = model(sub(x), ctx−,  y)        negative prompt, frames kept (the usual CFG pass)
      frame_uncond = model(x,      ctx+,  zeros(y)) frames dropped: mask 0, no condition latent,
                                                    no substitution (CLIP image tokens are kept)
    combined as v = v_tu + g·(v_c − v_tu) + w·(v_c − v_fu) (:func:`guided_velocity_fn`); w = 0 skips the
    frame_uncond pass, g = 1 the text_uncond pass. ``batched`` stacks the needed passes in one forward
    (context rows zero-padded to a common length, which the DiT pads to 512 with zeros anyway)."""
    if frame_guidance and y is None and substitution is None:
        raise ValueError("frame guidance needs a frame condition (an I2V condition or known frames to substitute)")
    y_unc = frame_unconditional_y(y) if y is not None else None

    def t_of(x, sigma):
        return torch.full((x.shape[0],), sampling.timestep(sigma), dtype=torch.int64)

    def inputs(name, x, sigma):
        if name == "frame_uncond":
            return x, context, y_unc
        xin = substitution.apply(x, sigma) if substitution is not None else x
        return xin, (context if name == "cond" else neg_context), y

    def single(name):
        def fn(x, sigma):
            xin, ctx, yy = inputs(name, x, sigma)
            return model(xin, t_of(x, sigma), ctx, clip_fea=clip_fea, y=yy, image_strength=image_strength).float()
        return fn

    def run_batched(x, sigma, names):
        parts = [inputs(n, x, sigma) for n in names]
        xb = torch.cat([p[0] for p in parts], dim=0)
        ctx = _pad_rows([p[1] for p in parts])
        yb = torch.cat([p[2] for p in parts], dim=0) if y is not None else None
        cf = None
        if clip_fea is not None:
            cf = clip_fea.repeat(len(names), 1, 1) if clip_fea.shape[0] == x.shape[0] else clip_fea
        v = model(xb, t_of(xb, sigma), ctx, clip_fea=cf, y=yb, image_strength=image_strength).float()
        return dict(zip(names, v.chunk(len(names), dim=0)))

    need_tu = cfg_scale != 1.0
    if need_tu and neg_context is None:
        raise ValueError("cfg != 1 needs a negative conditioning")
    return guided_velocity_fn(single("cond"), single("text_uncond") if need_tu else None,
                              single("frame_uncond") if frame_guidance else None,
                              g=cfg_scale, w=frame_guidance, batched=run_batched if batched else None)
