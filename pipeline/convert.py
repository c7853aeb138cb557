"""Weights in and out: official Flax `.npz` checkpoints (current and older key layouts), timm state dicts, and
safetensors files carrying the model configuration, and the consolidated weights of a run's checkpoint. Every path
may be an fsspec URL. Weights from outside a run come in as safetensors or the official .npz (or a timm state dict,
read with torch's weights_only loader); a run's own checkpoint is trusted like the run.

Every loader reads the dimensions from the weights, checks the keys and shapes strictly (a mismatch lists every
missing, unexpected and wrongly-shaped key), then adapts the model: `num_classes` different from the file's gives a
freshly initialised head (0: no head), `image_size` a multiple of the native one expands the token MLPs.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct

import numpy as np
import safetensors.torch
import torch

from pipeline import storage
from pipeline.checkpoint import CheckpointError, consolidated_state_dict
from pipeline.errors import MixerError
from pipeline.model import MlpMixer, expand_resolution

EXPORT_FORMATS = ("safetensors", "timm", "npz")


class WeightsError(MixerError, ValueError):
    """Weights that do not fit the model they are loaded into, or a file that holds none; the message lists what."""


# Our module names <-> the official Flax module names (path parts).
_OFFICIAL_PARTS = {
    "norm1": "LayerNorm_0",
    "norm2": "LayerNorm_1",
    "mlp_tokens": "token_mixing",
    "mlp_channels": "channel_mixing",
    "fc1": "Dense_0",
    "fc2": "Dense_1",
    "norm": "pre_head_layer_norm",
    "stem": "stem",
    "head": "head",
}
_OUR_PARTS = {official: ours for ours, official in _OFFICIAL_PARTS.items()}
_NORMS = ("norm1", "norm2", "norm")
SAFETENSORS_CONFIG_KEY = "mixer_config"
# What a model needs to be rebuilt; training-only settings (dropout, stochastic depth...) are the caller's.
_ARCH_KEYS = ("image_size", "patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim",
              "num_classes", "in_chans", "gelu")


# ---- names and layouts ----

def official_key(name: str) -> str:
    """`blocks.3.mlp_tokens.fc1.weight` -> `MixerBlock_3/token_mixing/Dense_0/kernel`."""
    parts = name.split(".")
    prefix = []
    if parts[0] == "blocks":
        prefix, parts = [f"MixerBlock_{parts[1]}"], parts[2:]
    *modules, leaf = parts
    if leaf == "weight":
        leaf = "scale" if modules[-1] in _NORMS else "kernel"
    return "/".join(prefix + [_OFFICIAL_PARTS[m] for m in modules] + [leaf])


def torch_name(key: str) -> str | None:
    """The inverse of `official_key`; None for a key that has no place in the model."""
    parts = key.split("/")
    prefix = []
    block = re.fullmatch(r"MixerBlock_(\d+)", parts[0])
    if block:
        prefix, parts = ["blocks", block.group(1)], parts[1:]
    *modules, leaf = parts
    if not modules or leaf not in ("kernel", "scale", "bias") or any(m not in _OUR_PARTS for m in modules):
        return None
    return ".".join(prefix + [_OUR_PARTS[m] for m in modules] + ["bias" if leaf == "bias" else "weight"])


def _to_official(t: torch.Tensor) -> np.ndarray:
    a = t.detach().to("cpu", torch.float32).numpy()
    if a.ndim == 4:  # Conv (out, in, h, w) -> HWIO
        return a.transpose(2, 3, 1, 0)
    return a.T if a.ndim == 2 else a  # Dense (out, in) -> (in, out)


def _from_official(a: np.ndarray) -> torch.Tensor:
    if a.ndim == 4:
        a = a.transpose(3, 2, 0, 1)
    elif a.ndim == 2:
        a = a.T
    return torch.from_numpy(np.ascontiguousarray(a))


def _official_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:
        return (shape[2], shape[3], shape[1], shape[0])
    return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


def check_keys(found: dict[str, tuple], expected: dict[str, tuple], source: str) -> None:
    """Raise a ValueError listing every missing, unexpected and wrongly-shaped key, with shapes."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    if not (missing or unexpected or wrong):
        return
    lines = [f"{source}: the weights do not match the Mixer they describe"]
    lines += [f"  missing     {k} {list(expected[k])}" for k in missing]
    lines += [f"  unexpected  {k} {list(found[k])}" for k in unexpected]
    lines += [f"  wrong shape {k}: file {list(found[k])}, expected {list(expected[k])}" for k in wrong]
    raise WeightsError("\n".join(lines))


def _require(found: dict[str, tuple], keys: list[str], source: str) -> None:
    missing = [k for k in keys if k not in found]
    if missing:
        raise WeightsError(f"{source}: not a Mixer checkpoint, missing keys needed to read its dimensions: "
                         + ", ".join(missing))


def _adapt(model: MlpMixer, num_classes: int | None, image_size: int | None, source: str) -> MlpMixer:
    """Give the loaded model the requested head and resolution."""
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_head(num_classes)
    if image_size is not None and image_size != model.image_size:
        if image_size % model.image_size:
            raise WeightsError(
                f"{source}: weights for {model.image_size} px images can only be expanded to a multiple of "
                f"{model.image_size} px (the token MLPs are tied to the number of tokens), got image_size={image_size}"
            )
        model = expand_resolution(model, image_size // model.image_size)
    return model


def _native_image_size(tokens: int, patch: int, source: str) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise WeightsError(f"{source}: the token MLP mixes {tokens} tokens, which is not a square grid of patches")
    return side * patch


# ---- official .npz ----

def _squeeze_to(a: np.ndarray, ndim: int) -> np.ndarray:
    """The older layout may keep singleton axes on Dense params; drop them."""
    return a.reshape([d for d in a.shape if d != 1]) if a.ndim > ndim else a


def _from_old_layout(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map the older `Mixer/encoderblock_N/...` layout to the current one; keys it does not know pass unchanged so
    the strict check reports them."""
    out: dict[str, np.ndarray] = {}
    # Pre-Linen Flax numbered submodules across classes, so a block's two LayerNorms need not be _0 and _1:
    # renumber them in order of appearance, as flax's convert_pre_linen does.
    norms: dict[str, list[int]] = {}
    for key in arrays:
        m = re.fullmatch(r"Mixer/encoderblock_(\d+)/LayerNorm_(\d+)/\w+", key)
        if m:
            norms.setdefault(m.group(1), [])
            if int(m.group(2)) not in norms[m.group(1)]:
                norms[m.group(1)].append(int(m.group(2)))
    for key, a in arrays.items():
        new = key
        if key.startswith("embedding/"):
            new = "stem/" + key[len("embedding/"):]
        elif key.startswith("Mixer/encoder_norm/"):
            new = "pre_head_layer_norm/" + key[len("Mixer/encoder_norm/"):]
        elif m := re.fullmatch(r"Mixer/encoderblock_(\d+)/LayerNorm_(\d+)/(\w+)", key):
            rank = sorted(norms[m.group(1)]).index(int(m.group(2)))
            new = f"MixerBlock_{m.group(1)}/LayerNorm_{rank}/{m.group(3)}"
        elif m := re.fullmatch(r"Mixer/encoderblock_(\d+)/(token|channel)_mixing_phase_0/(kernel|bias)([12])", key):
            block, kind, leaf, layer = m.groups()
            new = f"MixerBlock_{block}/{kind}_mixing/Dense_{int(layer) - 1}/{leaf}"
            a = _squeeze_to(a, 2 if leaf == "kernel" else 1)
        out[new] = a
    return out


def read_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of an official checkpoint under the current key layout (older layouts are mapped)."""
    fs, inner = storage.filesystem(path)
    with fs.open(inner, "rb") as f, np.load(f) as npz:
        arrays = {key: npz[key] for key in npz.files}
    if any(key.startswith("Mixer/") for key in arrays):
        arrays = _from_old_layout(arrays)
    return arrays


def _model_from_official(arrays: dict[str, np.ndarray], source: str, gelu: str, **model_kwargs) -> MlpMixer:
    found = {k: a.shape for k, a in arrays.items()}
    token_key, channel_key = "MixerBlock_0/token_mixing/Dense_0/kernel", "MixerBlock_0/channel_mixing/Dense_0/kernel"
    _require(found, ["stem/kernel", token_key, channel_key], source)
    patch, _, in_chans, hidden = found["stem/kernel"]
    tokens, tokens_mlp_dim = found[token_key]
    num_blocks = 1 + max(int(m.group(1)) for k in arrays if (m := re.match(r"MixerBlock_(\d+)/", k)))
    num_classes = found["head/kernel"][-1] if "head/kernel" in found else 0
    model = MlpMixer(_native_image_size(tokens, patch, source), patch, hidden, num_blocks, tokens_mlp_dim,
                     found[channel_key][1], num_classes, in_chans=in_chans, gelu=gelu, **model_kwargs)
    state = model.state_dict()
    check_keys(found, {official_key(n): _official_shape(tuple(t.shape)) for n, t in state.items()}, source)
    model.load_state_dict({n: _from_official(arrays[official_key(n)]) for n in state})
    return model


def from_npz(path: str, num_classes: int | None = None, image_size: int | None = None, gelu: str = "tanh",
             **model_kwargs) -> MlpMixer:
    """An official Flax checkpoint as an MlpMixer. All dimensions come from the file; `num_classes` None keeps the
    file's head; `image_size` None keeps the native resolution, a multiple of it expands the model (Appendix C)."""
    model = _model_from_official(read_npz(path), path, gelu, **model_kwargs)
    return _adapt(model, num_classes, image_size, path)


def load_npz_state_dict(path: str) -> dict[str, torch.Tensor]:
    """An official checkpoint's arrays as a state dict in our names and layouts (unchecked; see `from_npz`)."""
    state = {}
    for key, a in read_npz(path).items():
        name = torch_name(key)
        if name is None:
            raise WeightsError(f"{path}: key {key} {list(a.shape)} has no place in a Mixer")
        state[name] = _from_official(a)
    return state


def to_npz(model: MlpMixer, path: str) -> None:
    """Write the model in the current official layout, readable by the official code and by `from_npz`."""
    arrays = {official_key(n): _to_official(t) for n, t in model.state_dict().items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes_atomic(path, buf.getvalue())


# ---- torch state dicts (ours and timm's) ----

def _our_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {("stem.weight" if k == "stem.proj.weight" else "stem.bias" if k == "stem.proj.bias" else k): v
            for k, v in state_dict.items()}


def from_state_dict(state_dict: dict[str, torch.Tensor], num_classes: int | None = None,
                    image_size: int | None = None, gelu: str = "tanh", source: str = "state dict",
                    **model_kwargs) -> MlpMixer:
    """A model from a state dict in our names or timm's, dimensions read from the shapes."""
    state = _our_names(state_dict)
    found = {k: tuple(v.shape) for k, v in state.items()}
    token_key, channel_key = "blocks.0.mlp_tokens.fc1.weight", "blocks.0.mlp_channels.fc1.weight"
    _require(found, ["stem.weight", token_key, channel_key], source)
    hidden, in_chans, patch, _ = found["stem.weight"]
    tokens_mlp_dim, tokens = found[token_key]
    num_blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    file_classes = found["head.weight"][0] if "head.weight" in found else 0
    model = MlpMixer(_native_image_size(tokens, patch, source), patch, hidden, num_blocks, tokens_mlp_dim,
                     found[channel_key][0], file_classes, in_chans=in_chans, gelu=gelu, **model_kwargs)
    check_keys(found, {n: tuple(t.shape) for n, t in model.state_dict().items()}, source)
    model.load_state_dict(state)
    return _adapt(model, num_classes, image_size, source)


def from_timm(state_dict: dict[str, torch.Tensor], num_classes: int | None = None, image_size: int | None = None,
              gelu: str = "exact", **model_kwargs) -> MlpMixer:
    """A timm `MlpMixer` state dict as our model; timm's GELU is the exact (erf) form."""
    return from_state_dict(state_dict, num_classes, image_size, gelu=gelu, source="timm state dict", **model_kwargs)


def to_timm(model: MlpMixer) -> dict[str, torch.Tensor]:
    """The state dict timm's `MlpMixer` of the same dimensions expects."""
    return {("stem.proj." + k[len("stem."):] if k.startswith("stem.") else k): v
            for k, v in model.state_dict().items()}


# ---- safetensors ----

def save_safetensors(model: MlpMixer, path: str, metadata: dict[str, str] | None = None) -> None:
    """Weights plus the model configuration (metadata `mixer_config`), so `load_safetensors` needs nothing else."""
    arch = {k: v for k, v in model.init_kwargs().items() if k in _ARCH_KEYS}
    meta = {**(metadata or {}), "format": "pt", SAFETENSORS_CONFIG_KEY: json.dumps(arch)}
    tensors = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items()}
    storage.write_bytes_atomic(path, safetensors.torch.save(tensors, metadata=meta))


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # The format: an 8-byte little-endian header length, then a JSON header whose "__metadata__" holds strings.
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]).get("__metadata__") or {}


def load_safetensors(path: str, num_classes: int | None = None, image_size: int | None = None,
                     **model_kwargs) -> MlpMixer:
    """A model from a safetensors file: ours (configuration in the metadata) or a timm one (read from shapes)."""
    data = storage.read_bytes(path)
    state = safetensors.torch.load(data)
    meta = _safetensors_metadata(data)
    if SAFETENSORS_CONFIG_KEY not in meta:
        gelu = model_kwargs.pop("gelu", "exact" if "stem.proj.weight" in state else "tanh")
        return from_state_dict(state, num_classes, image_size, gelu=gelu, source=path, **model_kwargs)
    arch = json.loads(meta[SAFETENSORS_CONFIG_KEY])
    model = MlpMixer(**{**arch, **model_kwargs})
    check_keys({k: tuple(v.shape) for k, v in state.items()},
               {n: tuple(t.shape) for n, t in model.state_dict().items()}, path)
    model.load_state_dict(state)
    return _adapt(model, num_classes, image_size, path)


# ---- any of the above ----

WEIGHT_FORMATS = {".npz": "official Flax .npz", ".safetensors": "safetensors", ".pth": "torch state dict",
                  ".pt": "torch state dict", ".bin": "torch state dict"}


def weights_format(src: str) -> str:
    for suffix, kind in WEIGHT_FORMATS.items():
        if src.endswith(suffix):
            return kind
    raise WeightsError(f"{src}: unknown weights format; expected a file ending in {', '.join(WEIGHT_FORMATS)}")


def load_torch_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save, unwrapped from a {"state_dict"|"model"|"module": ...} container."""
    obj = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict (names -> tensors), found {type(obj).__name__}")
    return obj


def from_checkpoint(src: str, num_classes: int | None = None, image_size: int | None = None,
                    **model_kwargs) -> MlpMixer:
    """The model a run trained, from its newest committed step (`src` a run URL) or a given step folder."""
    state, record = consolidated_state_dict(src)
    if not record.model_config:
        raise WeightsError(f"{src}: the checkpoint records no model_config; it cannot rebuild the model")
    arch = {k: v for k, v in record.model_config.items() if k in _ARCH_KEYS}
    model = MlpMixer(**{**arch, **model_kwargs})
    model.load_state_dict(state)
    return _adapt(model, num_classes, image_size, src)


def export_weights(src: str, out: str, format: str = "safetensors") -> str:
    """Write a checkpoint's fp32 weights to `out` as safetensors (with the model configuration), a timm state dict
    (.pth) or an official-layout .npz. Returns `out`."""
    if format not in EXPORT_FORMATS:
        raise WeightsError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    model = from_checkpoint(src)
    if format == "safetensors":
        save_safetensors(model, out, metadata={"checkpoint": src})
    elif format == "npz":
        to_npz(model, out)
    else:
        buf = io.BytesIO()
        torch.save(to_timm(model), buf)
        storage.write_bytes_atomic(out, buf.getvalue())
    return out


def is_weights_file(src: str) -> bool:
    return src.endswith(tuple(WEIGHT_FORMATS))


def load_weights(src: str, num_classes: int | None = None, image_size: int | None = None,
                 **model_kwargs) -> MlpMixer:
    """Load `src` whatever it is: official .npz, our or timm's .safetensors, timm .pth/.pt/.bin, or a run or step
    URL (its checkpoint's weights, consolidated in memory)."""
    if not is_weights_file(src):
        try:
            return from_checkpoint(src, num_classes, image_size, **model_kwargs)
        except CheckpointError as e:
            raise WeightsError(f"{src}: unknown weights format: neither a file ending in {', '.join(WEIGHT_FORMATS)} "
                               f"nor a checkpoint ({e})") from e
    kind = weights_format(src)
    if kind == "official Flax .npz":
        return from_npz(src, num_classes, image_size, **model_kwargs)
    if kind == "safetensors":
        return load_safetensors(src, num_classes, image_size, **model_kwargs)
    state = load_torch_state_dict(src)
    gelu = model_kwargs.pop("gelu", "exact" if "stem.proj.weight" in state else "tanh")
    return from_state_dict(state, num_classes, image_size, gelu=gelu, source=src, **model_kwargs)
