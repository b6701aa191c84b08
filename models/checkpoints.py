"""Safe checkpoint reading shared by every loader.

Only safetensors and `torch.load(weights_only=True)` are used, so no code from a file ever runs.
Sharded diffusers folders (`*.safetensors.index.json`) are read shard by shard.
"""
import json
import os

import torch
from safetensors import safe_open

PICKLE_EXTENSIONS = (".pth", ".pt", ".ckpt", ".bin")


class CheckpointError(ValueError):
    """A file that cannot be used where it was given; the message says what was expected and found."""


def read_state_dict(path, device="cpu"):
    """All tensors of a checkpoint file (or a diffusers folder / index.json) as {name: tensor}."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_folder(path, device)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if path.endswith(".index.json"):
        return _read_index(path, device)
    if path.endswith(".safetensors"):
        return _read_safetensors(path, device)
    if path.endswith(PICKLE_EXTENSIONS):
        return _read_pickle(path, device)
    raise CheckpointError(
        f"{os.path.basename(path)!r} is not a tensor file: expected .safetensors, "
        f"{', '.join(PICKLE_EXTENSIONS)} or a diffusers *.index.json"
    )


def read_metadata(path):
    """The safetensors header metadata (e.g. diffusers config or ComfyUI markers), {} for other files."""
    if not os.fspath(path).endswith(".safetensors"):
        return {}
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{os.path.basename(path)!r} is not a readable safetensors file ({e})") from e


def _read_safetensors(path, device):
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(
            f"{os.path.basename(path)!r} could not be read as safetensors ({e}); "
            "the file may be truncated or not a tensor file — download it again"
        ) from e


def _read_pickle(path, device):
    try:
        obj = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except RuntimeError:
        # mmap needs the new zip format; older files load without it (still weights_only).
        try:
            obj = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:
            raise _pickle_error(path, e) from e
    except Exception as e:
        raise _pickle_error(path, e) from e
    return unwrap_state_dict(obj, os.path.basename(path))


def _pickle_error(path, e):
    return CheckpointError(
        f"{os.path.basename(path)!r} could not be loaded as a weights-only checkpoint ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); it may be truncated, not a checkpoint, or contain "
        "code (which is never run) — use a .safetensors version of it"
    )


def unwrap_state_dict(obj, name="checkpoint"):
    """Pickled checkpoints nest the tensors under 'state_dict', 'module' or 'model' at times."""
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("state_dict", "module", "model", "params_ema"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name!r} holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{name!r} holds no tensors")
    return tensors


def _read_index(path, device):
    with open(path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{os.path.basename(path)!r} has no 'weight_map'; is it a diffusers index file?")
    folder = os.path.dirname(path)
    state = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise CheckpointError(f"shard {shard!r} listed in {os.path.basename(path)!r} is missing")
        state.update(read_state_dict(shard_path, device))
    missing = set(weight_map) - set(state)
    if missing:
        raise CheckpointError(f"{len(missing)} tensors listed in the index are missing, e.g. {sorted(missing)[0]!r}")
    return state


def _read_folder(path, device):
    names = sorted(os.listdir(path))
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if index:
        return _read_index(os.path.join(path, index[0]), device)
    weights = [n for n in names if n.endswith(".safetensors")]
    if not weights:
        raise CheckpointError(f"folder {path!r} holds no .safetensors file")
    state = {}
    for n in weights:
        state.update(_read_safetensors(os.path.join(path, n), device))
    return state


def read_config(path):
    """The diffusers config.json next to a weights file or inside a folder, or None."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.fspath(path))
    config = os.path.join(folder, "config.json")
    if os.path.isfile(config):
        with open(config) as f:
            return json.load(f)
    return None


def strip_prefix(state, prefixes):
    """Remove the first prefix from `prefixes` that every key of some group carries.

    Keys that do not carry the prefix are dropped only when most keys do (ComfyUI files may store other
    models' tensors beside the one wanted); otherwise the dict is returned unchanged.
    """
    for prefix in prefixes:
        hits = [k for k in state if k.startswith(prefix)]
        if hits and len(hits) * 2 >= len(state):
            return {k[len(prefix):]: state[k] for k in hits}
    return state


def describe_mismatch(expected, found, what):
    """A short, readable account of how two {name: shape} sets differ."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} of the wrong shape (e.g. {k!r}: expected {list(expected[k])}, found {list(found[k])})")
    return f"not a {what}: " + "; ".join(parts) if parts else ""
