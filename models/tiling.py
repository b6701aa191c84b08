"""Spatial tiling around the streaming Wan VAE decoder, with linear feather blending.

Each spatial tile of the latent is decoded by its own `WanDecoderStream`, so every tile carries its own
temporal cache and stays exact in time; only the spatial seams are approximate (the decoder's
receptive field, incl. the per-frame attention, is cut at the tile edge). Overlapping tiles are blended
with separable linear ramps that sum to one at every pixel.

Two orders:
* `decode_tiled` (tile-major): one tile at a time through all frames, so only ONE tile's caches are
  alive; the output is accumulated in a buffer (put it on the CPU for the least GPU memory).
* `iter_decode_tiled` (time-major): all tiles advance one latent frame at a time and each blended chunk
  is yielded, so memory is flat in the number of frames (every tile's cache stays alive).

`auto` mode picks the tile from free memory and, on an out-of-memory error, retries with smaller tiles.
"""
import math

import torch

DEFAULT_OVERLAP = 8  # latent pixels (64 output pixels)
MIN_TILE = 8  # latent pixels


def _oom_types():
    types = [torch.cuda.OutOfMemoryError]
    if hasattr(torch, "OutOfMemoryError"):
        types.append(torch.OutOfMemoryError)
    return tuple(set(types))


def is_oom(error):
    return isinstance(error, _oom_types()) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def tile_spans(size, tile, overlap):
    """[(start, end)] along one axis (latent units) covering 0..size with tiles of `tile`, overlapping
    by at least `overlap`; the last tile is aligned to the end."""
    if tile >= size:
        return [(0, size)]
    if overlap >= tile:
        raise ValueError(f"tile overlap {overlap} must be smaller than the tile size {tile} (latent pixels)")
    stride = tile - overlap
    n = math.ceil((size - tile) / stride) + 1
    starts = [round(i * (size - tile) / (n - 1)) for i in range(n)]
    return [(s, s + tile) for s in starts]


def _ramps(spans, size, scale, device):
    """Per-span 1-D weights (output pixels) that are linear over overlaps and sum to 1 along the axis."""
    raw = []
    for i, (s, e) in enumerate(spans):
        n = (e - s) * scale
        w = torch.ones(n, dtype=torch.float64)
        if i > 0:
            ov = (spans[i - 1][1] - s) * scale
            if ov > 0:
                w[:ov] = torch.minimum(w[:ov], (torch.arange(ov, dtype=torch.float64) + 0.5) / ov)
        if i < len(spans) - 1:
            ov = (e - spans[i + 1][0]) * scale
            if ov > 0:
                w[n - ov:] = torch.minimum(w[n - ov:], (torch.arange(ov, 0, -1, dtype=torch.float64) - 0.5) / ov)
        raw.append(w)
    total = torch.zeros(size * scale, dtype=torch.float64)
    for (s, e), w in zip(spans, raw):
        total[s * scale:e * scale] += w
    return [(w / total[s * scale:e * scale]).to(device=device, dtype=torch.float32) for (s, e), w in zip(spans, raw)]


class TilePlan:
    """Tiles (latent coordinates) and their blend weights for an h×w latent."""

    def __init__(self, h, w, tile_h, tile_w, overlap, scale=8, device="cpu"):
        self.h, self.w, self.scale = h, w, scale
        self.tile_h, self.tile_w = min(tile_h, h), min(tile_w, w)
        self.overlap = overlap
        ov_h = min(overlap, self.tile_h - 1) if self.tile_h < h else 0
        ov_w = min(overlap, self.tile_w - 1) if self.tile_w < w else 0
        self.ys = tile_spans(h, self.tile_h, ov_h)
        self.xs = tile_spans(w, self.tile_w, ov_w)
        self.ry = _ramps(self.ys, h, scale, device)
        self.rx = _ramps(self.xs, w, scale, device)

    def __len__(self):
        return len(self.ys) * len(self.xs)

    @property
    def single(self):
        return len(self) == 1

    def tiles(self):
        """(y0, y1, x0, x1, weight [1,1,1,Ht,Wt] float32) for each tile, row-major."""
        for (y0, y1), ry in zip(self.ys, self.ry):
            for (x0, x1), rx in zip(self.xs, self.rx):
                yield y0, y1, x0, x1, (ry[:, None] * rx[None, :])[None, None, None]


def _blend_into(out, chunk, plan, y0, y1, x0, x1, weight, t0):
    s = plan.scale
    region = out[:, :, t0:t0 + chunk.shape[2], y0 * s:y1 * s, x0 * s:x1 * s]
    region.add_((chunk.to(torch.float32) * weight.to(chunk.device)).to(out.device, out.dtype))


def decode_tiled(vae, z, tile, overlap=DEFAULT_OVERLAP, out_device=None, out_dtype=torch.float32, progress=None):
    """Tile-major tiled decode: video [B,3,T,H,W] in -1..1 (in `out_dtype` on `out_device`).

    tile: (h, w) in latent pixels. `progress(n)` is called after each latent frame of each tile.
    """
    vae.check_latent(z)
    b, _, t, h, w = z.shape
    plan = TilePlan(h, w, tile[0], tile[1], overlap, vae.spatial_stride, device=vae.device)
    out_device = out_device or vae.device
    if plan.single:
        out = torch.empty((b, 3, vae.pixel_frames(t), h * plan.scale, w * plan.scale), dtype=out_dtype, device=out_device)
        pos = 0
        stream = vae.decoder_stream()
        for i in range(t):
            chunk = stream.push(z[:, :, i:i + 1])
            out[:, :, pos:pos + chunk.shape[2]] = chunk.to(out_device, out_dtype)
            pos += chunk.shape[2]
            if progress:
                progress(1)
        return out
    out = torch.zeros((b, 3, vae.pixel_frames(t), h * plan.scale, w * plan.scale), dtype=out_dtype, device=out_device)
    for y0, y1, x0, x1, weight in plan.tiles():
        stream = vae.decoder_stream()
        pos = 0
        for i in range(t):
            chunk = stream.push(z[:, :, i:i + 1, y0:y1, x0:x1])
            _blend_into(out, chunk, plan, y0, y1, x0, x1, weight, pos)
            pos += chunk.shape[2]
            del chunk
            if progress:
                progress(1)
        del stream
    return out.clamp_(-1.0, 1.0)  # the blend weights sum to 1 only up to rounding


def iter_decode_tiled(vae, z, tile, overlap=DEFAULT_OVERLAP, out_device=None, out_dtype=torch.float32):
    """Time-major tiled decode: yields blended chunks [B,3,n,H,W] (1 frame, then 4 per latent frame)."""
    vae.check_latent(z)
    b, _, t, h, w = z.shape
    plan = TilePlan(h, w, tile[0], tile[1], overlap, vae.spatial_stride, device=vae.device)
    out_device = out_device or vae.device
    tiles = list(plan.tiles())
    streams = [vae.decoder_stream() for _ in tiles]
    for i in range(t):
        n = 1 if i == 0 else vae.temporal_stride
        if plan.single:
            yield streams[0].push(z[:, :, i:i + 1]).to(out_device, out_dtype)
            continue
        out = torch.zeros((b, 3, n, h * plan.scale, w * plan.scale), dtype=out_dtype, device=out_device)
        for (y0, y1, x0, x1, weight), stream in zip(tiles, streams):
            chunk = stream.push(z[:, :, i:i + 1, y0:y1, x0:x1])
            _blend_into(out, chunk, plan, y0, y1, x0, x1, weight, 0)
            del chunk
        yield out.clamp_(-1.0, 1.0)


# ---- automatic tile choice ---------------------------------------------------------------------------
def decode_bytes_per_pixel(vae, frames=1):
    """A rough estimate of decoder memory per OUTPUT pixel: the carried caches (CACHE_T frames of every
    causal conv's input) plus the working set of the full-resolution stage."""
    c = vae.config
    el = torch.empty((), dtype=vae.dtype).element_size()
    n = len(c.dim_mult)
    dims = [c.dim * u for u in [c.dim_mult[-1]] + list(c.dim_mult)[::-1]]
    total = 0.0
    for i in range(n):
        area = 4.0 ** -(n - 1 - i)
        slots = 2 * (c.num_res_blocks + 1) + (1 if i == n - 1 else 0) + (4 if i == 0 else 0)
        total += area * dims[i + 1] * 2 * slots
    total += 10 * dims[-1] * frames  # working tensors at the last stage
    return total * el


def free_memory(device):
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        reserved_free = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + reserved_free
    return 1 << 62  # CPU: no practical limit, let the OS decide


def auto_tile(vae, h, w, free_bytes=None, safety=0.7):
    """(tile_h, tile_w) in latent pixels, or None when the whole frame fits."""
    free_bytes = free_memory(vae.device) if free_bytes is None else free_bytes
    budget = free_bytes * safety
    s = vae.spatial_stride
    per_px = decode_bytes_per_pixel(vae)
    if per_px * h * w * s * s <= budget:
        return None
    side = int(math.sqrt(max(budget, 0) / per_px) / s)
    side = max(MIN_TILE, side)
    return (min(h, side), min(w, side))


def _shrink(tile, h, w):
    th, tw = tile if tile is not None else (h, w)
    if th >= tw:
        th = max(MIN_TILE, th // 2)
    else:
        tw = max(MIN_TILE, tw // 2)
    return th, tw


def _smaller_tile_after(error, tile, h, w, device, on_retry):
    """The next tile to try after `error`: re-raises anything but an out-of-memory error, and an OOM
    that happened at the smallest tile already."""
    if not is_oom(error):
        raise error
    current = tile or (h, w)
    if current[0] <= MIN_TILE and current[1] <= MIN_TILE:
        raise error
    tile = _shrink(tile, h, w)
    _empty_cache(device)
    if on_retry:
        on_retry(tile)
    return tile


def _empty_cache(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def decode_auto(vae, z, tile=None, overlap=DEFAULT_OVERLAP, out_device=None, out_dtype=torch.float32,
                progress=None, free_bytes=None, on_retry=None):
    """Tile-major decode with the tile picked from free memory (`tile` None) and an OOM fallback: on an
    out-of-memory error the tile is halved and the decode restarts, down to MIN_TILE latent pixels."""
    vae.check_latent(z)
    h, w = z.shape[3:]
    if tile is None:
        tile = auto_tile(vae, h, w, free_bytes)
    while True:
        try:
            return decode_tiled(vae, z, tile or (h, w), overlap, out_device, out_dtype, progress)
        except Exception as e:  # noqa: BLE001 - only OOM is handled
            tile = _smaller_tile_after(e, tile, h, w, vae.device, on_retry)


def iter_decode_auto(vae, z, tile=None, overlap=DEFAULT_OVERLAP, out_device=None, out_dtype=torch.float32,
                     free_bytes=None, on_retry=None):
    """Time-major tiled streaming with an OOM fallback: on out-of-memory the decode restarts with smaller
    tiles and the frames already yielded are recomputed but not yielded again."""
    vae.check_latent(z)
    h, w = z.shape[3:]
    if tile is None:
        tile = auto_tile(vae, h, w, free_bytes)
    done = 0
    while True:
        seen = 0
        try:
            for chunk in iter_decode_tiled(vae, z, tile or (h, w), overlap, out_device, out_dtype):
                n = chunk.shape[2]
                if seen >= done:
                    yield chunk
                    done += n
                seen += n
            return
        except Exception as e:  # noqa: BLE001 - only OOM is handled
            tile = _smaller_tile_after(e, tile, h, w, vae.device, on_retry)


# ---- encoding ----------------------------------------------------------------------------------------
def encode_tiled(vae, frames, tile, overlap=DEFAULT_OVERLAP, shape=None, progress=None):
    """Tile-major tiled encode -> raw latent [B,z,t,h,w] float32 on the model's device.

    frames: a video tensor [B,3,T,H,W] in -1..1, or a callable `frames(s, e, y0, y1, x0, x1)` returning
    frames s:e of pixel rows y0:y1 / columns x0:x1 as such a tensor (so the source can stay on the CPU;
    then `shape` = (B, T, H, W)). tile/overlap are latent pixels. Each tile is streamed through time
    (chunks 1, 4, 4, …) with its own carried cache; the latents are blended with linear ramps.
    """
    if isinstance(frames, torch.Tensor):
        video = frames
        vae.check_video(video)
        shape = (video.shape[0],) + tuple(video.shape[2:])

        def frames(s, e, y0, y1, x0, x1):  # noqa: F811 - the tensor as a callable
            return video[:, :, s:e, y0:y1, x0:x1]
    b, t_pix, hp, wp = shape
    s = vae.spatial_stride
    h, w = hp // s, wp // s
    plan = TilePlan(h, w, tile[0], tile[1], overlap, scale=1, device=vae.device)
    chunks = [(0, 1)] + [(i, i + 4) for i in range(1, t_pix, 4)]
    out = None
    for y0, y1, x0, x1, weight in plan.tiles():
        stream = vae.encoder_stream()
        pos = 0
        for c0, c1 in chunks:
            z = stream.push(frames(c0, c1, y0 * s, y1 * s, x0 * s, x1 * s))
            if out is None:
                out = torch.zeros((b, z.shape[1], vae.latent_frames(t_pix), h, w), dtype=torch.float32,
                                  device=vae.device)
            if plan.single:
                out[:, :, pos:pos + z.shape[2]] = z.float()
            else:
                out[:, :, pos:pos + z.shape[2], y0:y1, x0:x1] += z.float() * weight[0, 0, 0].to(z.device)
            pos += z.shape[2]
            del z
            if progress:
                progress(1)
        stream.close()
    return out


def encode_auto(vae, frames, shape=None, tile=None, overlap=DEFAULT_OVERLAP, progress=None, free_bytes=None,
                on_retry=None):
    """encode_tiled with the tile picked from free memory (`tile` None: whole frames when they fit) and
    the same out-of-memory fallback as decode_auto (the encode restarts with halved tiles)."""
    if shape is None:
        shape = (frames.shape[0],) + tuple(frames.shape[2:])
    s = vae.spatial_stride
    h, w = shape[2] // s, shape[3] // s
    if tile is None:
        tile = auto_tile(vae, h, w, free_bytes)
    while True:
        try:
            return encode_tiled(vae, frames, tile or (h, w), overlap, shape, progress)
        except Exception as e:  # noqa: BLE001 - only OOM is handled
            tile = _smaller_tile_after(e, tile, h, w, vae.device, on_retry)
