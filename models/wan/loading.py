"""Loading Wan2.1 DiT checkpoints in every released layout.

Layouts: original names (Wan-AI), ComfyUI repackaged (same names, optionally under
`model.diffusion_model.`), fp32/bf16/fp16/fp8_e4m3fn storage, "scaled fp8" (`<name>.scale_weight` per
weight + a `scaled_fp8` marker), and the diffusers layout (`WanTransformer3DModel`, single file or a
sharded folder with `*.safetensors.index.json`).

The model is built on the meta device and every tensor is assigned straight to its target device and
dtype, one tensor at a time (`load_state_dict(assign=True)`), so no second full-precision copy of the
model ever exists.
"""
import json
import os
import re

import torch
from safetensors import safe_open

from .. import checkpoints
from ..checkpoints import CheckpointError
from .dit import Linear, WanConfig, build_model, e4m3_weight

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")

# Original -> diffusers names (REFERENCE §5), applied in this order as plain string replacements.
_TO_DIFFUSERS = [
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
    (".modulation", ".scale_shift_table"),
    (".ffn.0.", ".ffn.net.0.proj."),
    (".ffn.2.", ".ffn.net.2."),
    (".norm3.", ".norm2."),
    (".self_attn.q.", ".attn1.to_q."),
    (".self_attn.k.", ".attn1.to_k."),
    (".self_attn.v.", ".attn1.to_v."),
    (".self_attn.o.", ".attn1.to_out.0."),
    (".self_attn.norm_q.", ".attn1.norm_q."),
    (".self_attn.norm_k.", ".attn1.norm_k."),
    (".cross_attn.q.", ".attn2.to_q."),
    (".cross_attn.k.", ".attn2.to_k."),
    (".cross_attn.v.", ".attn2.to_v."),
    (".cross_attn.o.", ".attn2.to_out.0."),
    (".cross_attn.norm_q.", ".attn2.norm_q."),
    (".cross_attn.norm_k.", ".attn2.norm_k."),
    (".cross_attn.k_img.", ".attn2.add_k_proj."),
    (".cross_attn.v_img.", ".attn2.add_v_proj."),
    (".cross_attn.norm_k_img.", ".attn2.norm_added_k."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
]
# diffusers tensors the model never uses (diffusers itself ignores them on load).
_DIFFUSERS_IGNORED = ("norm_added_q",)


def original_to_diffusers_name(name):
    for a, b in _TO_DIFFUSERS:
        name = name.replace(a, b)
    return name


def diffusers_to_original_name(name):
    for a, b in reversed(_TO_DIFFUSERS):
        name = name.replace(b, a)
    return name


def original_to_diffusers(state):
    return {original_to_diffusers_name(k): v for k, v in state.items()}


def diffusers_to_original(state):
    return {diffusers_to_original_name(k): v for k, v in state.items() if not any(s in k for s in _DIFFUSERS_IGNORED)}


def diffusers_config(cfg: WanConfig):
    """The `WanTransformer3DModel` config that matches a WanConfig (REFERENCE §5)."""
    out = dict(
        patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, rope_max_seq_len=1024,
    )
    if cfg.has_image:
        out.update(image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim)
    if cfg.model_type == "flf2v":
        out.update(pos_embed_seq_len=2 * cfg.image_tokens)
    return out


# ---------------------------------------------------------------------------------------------------------
# Layout and variant detection (works on {name: shape} so files need not be read first)


def _is_diffusers(names):
    return any(n.startswith("condition_embedder.") or ".attn1." in n for n in names)


def _what_is_it(names):
    """A phrase naming a known non-DiT file, or None."""
    ns = list(names)
    if any(n.startswith(("encoder.", "decoder.")) for n in ns) and any(n.startswith("conv1.") or n == "conv1.weight" for n in ns):
        return "this is a Wan VAE, not a diffusion model: load it with CVG Load VAE (folder 'vae')"
    if any(".down_blocks." in n or n.startswith(("encoder.down_blocks", "decoder.up_blocks")) for n in ns) and any("quant_conv" in n for n in ns):
        return "this is a VAE (diffusers layout), not a diffusion model: load it with CVG Load VAE"
    if any(n.startswith(("model.diffusion_model.input_blocks", "first_stage_model.", "cond_stage_model.", "conditioner.")) or n.startswith("input_blocks.") for n in ns):
        return "this is a Stable Diffusion checkpoint (UNet/VAE/CLIP), not a Wan2.1 diffusion model"
    if any(n.startswith(("encoder.block.", "shared.", "encoder.final_layer_norm")) for n in ns):
        return "this is a T5 text encoder, not a Wan2.1 diffusion model: load it with CLIPLoader(type='wan')"
    if any(n.startswith(("visual.", "vision_model.")) for n in ns):
        return "this is a CLIP vision model, not a Wan2.1 diffusion model: load it with CLIPVisionLoader"
    if any(".motion_modules." in n or n.startswith("down_blocks.0.motion_modules") for n in ns):
        return "this is an AnimateDiff motion module, not a Wan2.1 diffusion model"
    return None


def normalize_names(shapes):
    """{name: shape} of any layout -> (rename dict original_name -> file_name, layout description)."""
    names = list(shapes)
    layout = []
    prefix = ""
    for p in PREFIXES:
        hits = [n for n in names if n.startswith(p)]
        if hits and len(hits) * 2 >= len(names):
            prefix = p
            layout.append(f"prefix {p!r}")
            break
    core = {n[len(prefix):]: n for n in names if n.startswith(prefix)}
    if _is_diffusers(core):
        layout.append("diffusers")
        core = {diffusers_to_original_name(k): v for k, v in core.items() if not any(s in k for s in _DIFFUSERS_IGNORED)}
    else:
        layout.append("original")
    return core, ", ".join(layout)


def detect_config(shapes):
    """WanConfig from {original_name: shape} (REFERENCE §1.1)."""
    if "head.modulation" not in shapes or "patch_embedding.weight" not in shapes:
        raise CheckpointError("not a Wan2.1 diffusion model: 'head.modulation' / 'patch_embedding.weight' are missing")
    dim = int(shapes["head.modulation"][-1])
    pe = shapes["patch_embedding.weight"]
    in_dim = int(pe[1])
    patch = tuple(int(s) for s in pe[2:])
    layers = len({int(n.split(".")[1]) for n in shapes if n.startswith("blocks.") and n.split(".")[1].isdigit()})
    ffn_dim = int(shapes["blocks.0.ffn.0.weight"][0]) if "blocks.0.ffn.0.weight" in shapes else 4 * dim
    text_dim = int(shapes["text_embedding.0.weight"][1]) if "text_embedding.0.weight" in shapes else 4096
    freq_dim = int(shapes["time_embedding.0.weight"][1]) if "time_embedding.0.weight" in shapes else 256
    out_dim = int(shapes["head.head.weight"][0]) // max(1, patch[0] * patch[1] * patch[2]) if "head.head.weight" in shapes else 16
    model_type = "t2v"
    image_tokens = 257
    image_dim = 1280
    if "img_emb.proj.0.bias" in shapes or "img_emb.proj.0.weight" in shapes:
        model_type = "i2v"
        image_dim = int(shapes["img_emb.proj.1.weight"][1]) if "img_emb.proj.1.weight" in shapes else 1280
    if "img_emb.emb_pos" in shapes:
        model_type = "flf2v"
        image_tokens = int(shapes["img_emb.emb_pos"][1]) // 2
    head_dim = 128 if dim % 128 == 0 else 64 if dim % 64 == 0 else dim
    return WanConfig(
        model_type=model_type, dim=dim, ffn_dim=ffn_dim, heads=dim // head_dim, layers=layers, in_dim=in_dim,
        out_dim=out_dim, freq_dim=freq_dim, text_dim=text_dim, image_dim=image_dim, image_tokens=image_tokens,
        patch_size=patch,
    )


def expected_shapes(cfg: WanConfig):
    """{name: shape} of the model for a config, without allocating memory."""
    return {k: tuple(v.shape) for k, v in build_model(cfg, "meta").state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# Reading tensors one at a time


class _Source:
    """Lazy tensor access over a file, a diffusers folder or an index.json, keyed by file name."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._files = {}  # name -> safetensors file path
        self._tensors = None  # for pickles: a dict (mmap-loaded)
        self.metadata = {}
        files = self._safetensors_files(self.path)
        if files is None:
            self._tensors = checkpoints.read_state_dict(self.path)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
            self.dtypes = {k: v.dtype for k, v in self._tensors.items()}
            return
        self.shapes, self.dtypes = {}, {}
        for f in files:
            try:
                with safe_open(f, framework="pt") as h:
                    self.metadata.update(h.metadata() or {})
                    for k in h.keys():
                        sl = h.get_slice(k)
                        self.shapes[k] = tuple(sl.get_shape())
                        self.dtypes[k] = sl.get_dtype()
                        self._files[k] = f
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(
                    f"{os.path.basename(f)!r} could not be read as safetensors ({e}); the file may be "
                    "truncated or not a tensor file — download it again"
                ) from e
        if not self.shapes:
            raise CheckpointError(f"{os.path.basename(self.path)!r} holds no tensors")

    @staticmethod
    def _safetensors_files(path):
        if os.path.isdir(path):
            names = sorted(os.listdir(path))
            index = [n for n in names if n.endswith(".safetensors.index.json")]
            if index:
                return _Source._index_files(os.path.join(path, index[0]))
            files = [os.path.join(path, n) for n in names if n.endswith(".safetensors")]
            if not files:
                raise CheckpointError(f"folder {path!r} holds no .safetensors file")
            return files
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path!r} does not exist")
        if path.endswith(".index.json"):
            return _Source._index_files(path)
        if path.endswith(".safetensors"):
            return [path]
        return None

    @staticmethod
    def _index_files(index):
        try:
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
        except Exception as e:
            raise CheckpointError(f"{os.path.basename(index)!r} is not a readable index file ({e})") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{os.path.basename(index)!r} has no 'weight_map'; is it a diffusers index file?")
        folder = os.path.dirname(index)
        files = []
        for shard in sorted(set(weight_map.values())):
            p = os.path.join(folder, shard)
            if not os.path.isfile(p):
                raise CheckpointError(f"shard {shard!r} listed in {os.path.basename(index)!r} is missing")
            files.append(p)
        return files

    def get(self, name):
        if self._tensors is not None:
            return self._tensors[name]
        with safe_open(self._files[name], framework="pt") as h:
            return h.get_tensor(name)

    def items(self, names):
        """Yield (name, tensor), opening each shard once."""
        if self._tensors is not None:
            for n in names:
                yield n, self._tensors[n]
            return
        by_file = {}
        for n in names:
            by_file.setdefault(self._files[n], []).append(n)
        for f, ns in by_file.items():
            with safe_open(f, framework="pt") as h:
                for n in ns:
                    yield n, h.get_tensor(n)


# ---------------------------------------------------------------------------------------------------------
# Loading


WEIGHT_DTYPES = {
    "default": None,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
    "fp8_e5m2": getattr(torch, "float8_e5m2", None),
}
_FP8 = tuple(d for d in (WEIGHT_DTYPES["fp8_e4m3fn"], WEIGHT_DTYPES["fp8_e5m2"]) if d is not None)
# weight_dtype for fp8 matmuls: the block Linears as e4m3 with a per-tensor scale (quantized as they are read;
# e4m3 files kept as stored, with their scale_weight), run through torch._scaled_mm (dit.fp8_linear).
SCALED_MM = "fp8_e4m3fn_scaled_mm"


def _low_precision_ok(name, ndim):
    """Which tensors may be stored in a low-precision weight dtype: the 2-D weights of the linear layers
    inside the blocks (95% of the parameters); embeddings, norms, biases and modulations stay in the
    compute dtype."""
    return ndim == 2 and name.endswith(".weight") and name.startswith("blocks.")


_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


def _index_for_shard(path):
    """The *.index.json that lists `path` when it is one shard of a sharded model, else None."""
    path = os.fspath(path)
    if not _SHARD.search(path):
        return None
    folder = os.path.dirname(path)
    for name in sorted(os.listdir(folder or ".")):
        if name.endswith(".safetensors.index.json"):
            try:
                with open(os.path.join(folder, name)) as f:
                    if os.path.basename(path) in set((json.load(f).get("weight_map") or {}).values()):
                        return os.path.join(folder, name)
            except Exception:
                continue
    return None


def inspect(path):
    """(WanConfig, layout description, {original_name: file_name}, _Source) for a checkpoint, or a clear
    CheckpointError naming what the file is instead. One shard of a sharded model loads the whole model
    through its index."""
    path = _index_for_shard(path) or path
    src = _Source(path)
    names, layout = normalize_names(src.shapes)
    what = _what_is_it(src.shapes)
    if what is not None and "patch_embedding.weight" not in names:
        raise CheckpointError(f"{os.path.basename(os.fspath(path))!r}: {what}")
    if "head.modulation" not in names or "patch_embedding.weight" not in names:
        sample = ", ".join(sorted(src.shapes)[:3])
        raise CheckpointError(
            f"{os.path.basename(os.fspath(path))!r} is not a Wan2.1 diffusion model: it has no "
            f"'patch_embedding.weight' / 'head.modulation' (its tensors are named like {sample}, …)"
        )
    if "scaled_fp8" in names or any(n.endswith(".scale_weight") for n in names):
        layout += ", scaled fp8"
    cfg = detect_config({k: src.shapes[v] for k, v in names.items()})
    # the head count is not visible in the weights (q/k norms span all heads): released models use
    # head_dim 128; a diffusers config.json, where present, says it explicitly.
    try:
        dconf = checkpoints.read_config(os.fspath(path)) or {}
    except Exception:
        dconf = {}
    heads = dconf.get("num_attention_heads")
    if isinstance(heads, int) and heads > 0 and cfg.dim % heads == 0 and heads != cfg.heads:
        cfg = WanConfig(**{**cfg.to_dict(), "heads": heads})
    return cfg, layout, names, src


def load_wan_dit(path, device="cpu", dtype=torch.bfloat16, weight_dtype=None, attention_backend="sdpa",
                 expect=None):
    """Load a Wan2.1 DiT file of any layout.

    dtype: compute dtype (float32 / bfloat16 / float16). weight_dtype: storage dtype of the big weights —
    None keeps the file's dtype where it is fp8 and uses `dtype` otherwise; a torch dtype or one of
    WEIGHT_DTYPES' names forces it (fp8 storage is upcast layer by layer at compute time); SCALED_MM stores
    e4m3 with per-tensor scales and multiplies in fp8 (the caller checks the device: dit.scaled_mm_unsupported).
    expect: optional model_type ('t2v', 'i2v', 'flf2v') the caller needs.
    Returns a WanDiT in eval mode with `.load_info` (layout, storage) and `.source` (this call's arguments,
    from which worker processes load their own copy: models/wan/multi_device.py) set.
    """
    source = {"path": os.path.abspath(os.fspath(path)), "dtype": dtype, "weight_dtype": weight_dtype,
              "attention_backend": attention_backend}
    scaled_mm = weight_dtype == SCALED_MM
    if scaled_mm:
        weight_dtype = None
    if isinstance(weight_dtype, str):
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight dtype {weight_dtype!r} unknown; choose one of "
                             f"{', '.join([*WEIGHT_DTYPES, SCALED_MM])}")
        if weight_dtype.startswith("fp8") and WEIGHT_DTYPES[weight_dtype] is None:
            raise ValueError(f"this torch build has no {weight_dtype}")
        weight_dtype = WEIGHT_DTYPES[weight_dtype]
    cfg, layout, names, src = inspect(path)
    if expect is not None and cfg.model_type != expect:
        raise CheckpointError(
            f"{os.path.basename(os.fspath(path))!r} is a Wan {cfg.model_type} checkpoint where a {expect} "
            "model was expected; pick the matching file"
        )
    scaled = "scaled_fp8" in names or any(n.endswith(".scale_weight") for n in names)
    model_names = {n for n in names if n != "scaled_fp8" and not n.endswith((".scale_weight", ".scale_input"))}
    expected = expected_shapes(cfg)
    found = {n: src.shapes[names[n]] for n in model_names}
    problem = checkpoints.describe_mismatch(expected, found, f"Wan2.1 {cfg.model_type} diffusion model ({layout})")
    if problem:
        raise CheckpointError(f"{os.path.basename(os.fspath(path))!r} is {problem}")

    model = build_model(cfg, "meta", attention_backend)
    state = {}
    scales = {}
    file_names = {names[n]: n for n in names}
    # the scales first: in scaled-mm mode a weight is quantized as soon as it is read, from its real value
    scale_files = {f for f, n in file_names.items() if n.endswith(".scale_weight")}
    for fname, tensor in src.items(sorted(scale_files)):
        scales[file_names[fname][: -len(".scale_weight")]] = tensor.to(device, torch.float32).reshape(())
    for fname, tensor in src.items([f for f in file_names if f not in scale_files]):
        name = file_names[fname]
        if name == "scaled_fp8" or name.endswith(".scale_input"):
            continue
        if scaled_mm and _low_precision_ok(name, tensor.ndim):
            base = name[: -len(".weight")]
            state[name], scales[base] = e4m3_weight(tensor.to(device), scales.get(base))
            del tensor
            continue
        target = dtype
        if _low_precision_ok(name, tensor.ndim):
            if weight_dtype is not None:
                target = weight_dtype
            elif tensor.dtype in _FP8:
                target = tensor.dtype
        state[name] = _convert(tensor, target, device)
        del tensor
    # scaled fp8: weights whose storage stays fp8 keep their scale; the others are dequantised here.
    for base, scale in scales.items():
        wname = base + ".weight"
        if wname not in state:
            continue
        w = state[wname]
        if w.dtype in _FP8:
            continue
        state[wname] = (w.to(torch.float32) * scale).to(w.dtype) if w.dtype != torch.float32 else w * scale
    model.load_state_dict(state, strict=True, assign=True)
    for base, scale in scales.items():
        module = model.get_submodule(base)
        if module.weight.dtype in _FP8:
            module.register_buffer("scale_weight", scale, persistent=False)
    if scaled_mm:
        for block in model.blocks:
            for module in block.modules():
                if isinstance(module, Linear):
                    module.scaled_mm = True
    model.compute_dtype = dtype
    model.eval().requires_grad_(False)
    storage = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    model.load_info = {"layout": layout, "storage": storage, "scaled_fp8": scaled, "scaled_mm": scaled_mm,
                       "config": cfg.to_dict()}
    model.source = source
    return model


def _convert(tensor, dtype, device):
    if tensor.dtype in _FP8 and dtype not in _FP8:
        # fp8 -> float32 first: direct fp8 -> fp16 casts are not available on every device.
        tensor = tensor.to(torch.float32)
    return tensor.to(device=device, dtype=dtype)
