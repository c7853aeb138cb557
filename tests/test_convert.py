"""Weights in and out: official .npz (both layouts) against an independent numpy forward, timm against timm itself,
safetensors round trips (local and S3), the loader dispatch and `mixer import-weights` / `mixer models`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import convert, storage
from pipeline.cli import main
from pipeline.model import expand_resolution

# Small official-layout dimensions: 16 px images, patch 4 -> 16 tokens.
P, IMAGE, C, D_S, D_C, BLOCKS, K = 4, 16, 8, 6, 12, 2, 5
S = (IMAGE // P) ** 2


def official_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"stem/kernel": (P, P, 3, C), "stem/bias": (C,), "pre_head_layer_norm/scale": (C,),
              "pre_head_layer_norm/bias": (C,), "head/kernel": (C, K), "head/bias": (K,)}
    for i in range(BLOCKS):
        b = f"MixerBlock_{i}"
        shapes |= {
            f"{b}/LayerNorm_0/scale": (C,), f"{b}/LayerNorm_0/bias": (C,),
            f"{b}/token_mixing/Dense_0/kernel": (S, D_S), f"{b}/token_mixing/Dense_0/bias": (D_S,),
            f"{b}/token_mixing/Dense_1/kernel": (D_S, S), f"{b}/token_mixing/Dense_1/bias": (S,),
            f"{b}/LayerNorm_1/scale": (C,), f"{b}/LayerNorm_1/bias": (C,),
            f"{b}/channel_mixing/Dense_0/kernel": (C, D_C), f"{b}/channel_mixing/Dense_0/bias": (D_C,),
            f"{b}/channel_mixing/Dense_1/kernel": (D_C, C), f"{b}/channel_mixing/Dense_1/bias": (C,),
        }
    # A small stem makes the first LayerNorm's input variance small (~1e-3), so the test sees its eps.
    scale = {"stem/kernel": 0.02, "stem/bias": 0.02}
    return {k: (rng.standard_normal(shape) * scale.get(k, 0.5)).astype(np.float32) for k, shape in shapes.items()}


def old_layout(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same weights under the older `Mixer/encoderblock_N` names, with pre-Linen LayerNorm numbering (0 and 2)
    and a singleton axis on one kernel."""
    out = {}
    for key, a in arrays.items():
        parts = key.split("/")
        if parts[0] == "stem":
            out["embedding/" + parts[1]] = a
        elif parts[0] == "pre_head_layer_norm":
            out["Mixer/encoder_norm/" + parts[1]] = a
        elif parts[0] == "head":
            out[key] = a
        else:
            block = "Mixer/encoderblock_" + parts[0].split("_")[1]
            if parts[1].startswith("LayerNorm"):
                out[f"{block}/LayerNorm_{2 * int(parts[1][-1])}/{parts[2]}"] = a
            else:
                layer = int(parts[2][-1]) + 1
                name = f"{block}/{parts[1]}_phase_0/{parts[3]}{layer}"
                out[name] = a[None] if parts[3] == "kernel" and layer == 1 else a
    return out


def save_npz(path, arrays: dict[str, np.ndarray]) -> str:
    np.savez(path, **arrays)
    return str(path)


def reference_forward(w: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """The official Flax Mixer in float64 numpy, straight from the npz arrays (NCHW images in [-1, 1])."""
    w = {k: v.astype(np.float64) for k, v in w.items()}

    def layer_norm(x, prefix):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-6) * w[prefix + "/scale"] + w[prefix + "/bias"]

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    def mlp(x, prefix):
        h = gelu(x @ w[prefix + "/Dense_0/kernel"] + w[prefix + "/Dense_0/bias"])
        return h @ w[prefix + "/Dense_1/kernel"] + w[prefix + "/Dense_1/bias"]

    x = images.astype(np.float64).transpose(0, 2, 3, 1)  # NHWC
    n, hh, ww, c = x.shape
    patches = x.reshape(n, hh // P, P, ww // P, P, c).transpose(0, 1, 3, 2, 4, 5)
    x = np.einsum("nhwijc,ijco->nhwo", patches, w["stem/kernel"]) + w["stem/bias"]
    x = x.reshape(n, -1, x.shape[-1])
    for i in range(BLOCKS):
        b = f"MixerBlock_{i}"
        y = layer_norm(x, f"{b}/LayerNorm_0").transpose(0, 2, 1)
        x = x + mlp(y, f"{b}/token_mixing").transpose(0, 2, 1)
        x = x + mlp(layer_norm(x, f"{b}/LayerNorm_1"), f"{b}/channel_mixing")
    x = layer_norm(x, "pre_head_layer_norm").mean(1)
    return x @ w["head/kernel"] + w["head/bias"]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    return official_arrays()


@pytest.fixture(scope="module")
def npz_path(arrays, tmp_path_factory) -> str:
    return save_npz(tmp_path_factory.mktemp("npz") / "mixer.npz", arrays)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return (np.random.default_rng(1).random((3, 3, IMAGE, IMAGE)) * 2 - 1).astype(np.float32)


def logits(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(images)).numpy()


def test_npz_matches_the_reference_forward(arrays, npz_path, images):
    model = convert.from_npz(npz_path)
    assert (model.image_size, model.config.patch_size, model.config.hidden_dim, model.config.num_blocks) == (
        IMAGE, P, C, BLOCKS)
    assert (model.config.tokens_mlp_dim, model.config.channels_mlp_dim, model.num_classes) == (D_S, D_C, K)
    expected = reference_forward(arrays, images)
    assert rel_err(logits(model, images), expected) < 1e-5
    # The exact GELU is a different function: the check above is sharp enough to see it.
    assert rel_err(logits(convert.from_npz(npz_path, gelu="exact"), images), expected) > 1e-5


def test_older_layout_loads_to_the_same_model(arrays, npz_path, tmp_path):
    old = convert.from_npz(save_npz(tmp_path / "old.npz", old_layout(arrays)))
    new = convert.from_npz(npz_path)
    for name, value in new.state_dict().items():
        assert torch.equal(old.state_dict()[name], value), name


def test_mismatched_npz_lists_every_bad_key(arrays, tmp_path):
    bad = dict(arrays)
    del bad["MixerBlock_1/LayerNorm_0/scale"]
    bad["MixerBlock_1/channel_mixing/Dense_1/kernel"] = np.zeros((D_C + 1, C), np.float32)
    bad["MixerBlock_0/extra/kernel"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError) as err:
        convert.from_npz(save_npz(tmp_path / "bad.npz", bad))
    message = str(err.value)
    assert "bad.npz" in message
    assert f"missing     MixerBlock_1/LayerNorm_0/scale [{C}]" in message
    assert "unexpected  MixerBlock_0/extra/kernel [2, 2]" in message
    assert f"wrong shape MixerBlock_1/channel_mixing/Dense_1/kernel: file [{D_C + 1}, {C}], expected [{D_C}, {C}]" \
        in message

    with pytest.raises(ValueError, match="missing keys needed to read its dimensions: stem/kernel"):
        convert.from_npz(save_npz(tmp_path / "nostem.npz", {k: v for k, v in arrays.items() if k != "stem/kernel"}))


def test_npz_head_and_resolution_options(npz_path, arrays, images):
    fresh = convert.from_npz(npz_path, num_classes=3, head_bias=-6.9)
    assert fresh.head.weight.shape == (3, C) and torch.all(fresh.head.weight == 0)
    assert torch.all(fresh.head.bias == -6.9)
    torch.testing.assert_close(fresh.blocks[1].mlp_channels.fc2.weight,
                               torch.from_numpy(arrays["MixerBlock_1/channel_mixing/Dense_1/kernel"].T))
    features = convert.from_npz(npz_path, num_classes=0)
    assert logits(features, images).shape == (3, C)

    big = convert.from_npz(npz_path, image_size=2 * IMAGE)
    assert big.image_size == 2 * IMAGE and big.config.tokens_mlp_dim == 4 * D_S
    for name, value in expand_resolution(convert.from_npz(npz_path), 2).state_dict().items():
        assert torch.equal(big.state_dict()[name], value), name
    with pytest.raises(ValueError, match="multiple of 16 px"):
        convert.from_npz(npz_path, image_size=24)


def test_to_npz_writes_the_official_layout(arrays, npz_path, tmp_path):
    out = tmp_path / "out.npz"
    convert.to_npz(convert.from_npz(npz_path), str(out))
    with np.load(out) as written:
        assert sorted(written.files) == sorted(arrays)
        for key, value in arrays.items():
            np.testing.assert_array_equal(written[key], value, err_msg=key)
    state = convert.load_npz_state_dict(str(out))
    assert torch.equal(state["blocks.0.mlp_tokens.fc1.weight"],
                       torch.from_numpy(arrays["MixerBlock_0/token_mixing/Dense_0/kernel"].T))


@pytest.fixture(scope="module")
def timm_model():
    from timm.models.mlp_mixer import MlpMixer as TimmMixer

    model = TimmMixer(num_classes=K, img_size=IMAGE, patch_size=P, num_blocks=BLOCKS, embed_dim=C,
                      mlp_ratio=(0.5, 4.0))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():  # every parameter random, the zero-initialised head included
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


def test_timm_weights_give_timms_logits(timm_model, images):
    ours = convert.from_timm(timm_model.state_dict())
    assert ours.gelu == "exact"
    expected = logits(timm_model, images)
    assert np.abs(expected).mean() > 0.1
    assert rel_err(logits(ours, images), expected) < 1e-5


def test_to_timm_gives_timms_state_dict(timm_model):
    theirs = timm_model.state_dict()
    mine = convert.to_timm(convert.from_timm(theirs))
    assert list(mine) == list(theirs)
    for key, value in theirs.items():
        assert mine[key].shape == value.shape and torch.equal(mine[key], value), key


def test_safetensors_round_trip(npz_path, images, tmp_path):
    model = convert.from_npz(npz_path, image_size=2 * IMAGE)
    path = str(tmp_path / "m.safetensors")
    convert.save_safetensors(model, path, metadata={"note": "kept"})
    back = convert.load_safetensors(path)
    assert back.init_kwargs() == model.init_kwargs()
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    with open(path, "rb") as f:
        assert convert._safetensors_metadata(f.read())["note"] == "kept"


def test_weights_on_s3(npz_path, bucket, images):
    url = f"{bucket}/weights/m.npz"
    with open(npz_path, "rb") as f:
        storage.write_bytes_atomic(url, f.read())
    model = convert.load_weights(url)
    convert.save_safetensors(model, f"{bucket}/exports/m.safetensors")
    back = convert.load_weights(f"{bucket}/exports/m.safetensors")
    np.testing.assert_array_equal(logits(back, images), logits(model, images))


def test_load_weights_dispatches_on_the_file(npz_path, timm_model, images, tmp_path):
    pth = str(tmp_path / "timm.pth")
    torch.save({"state_dict": timm_model.state_dict()}, pth)
    from_pth = convert.load_weights(pth)
    assert from_pth.gelu == "exact"
    assert rel_err(logits(from_pth, images), logits(timm_model, images)) < 1e-5
    assert convert.load_weights(npz_path, num_classes=2).num_classes == 2
    with pytest.raises(ValueError, match="unknown weights format"):
        convert.load_weights(str(tmp_path / "weights.h5"))


def test_models_command_prints_the_exact_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for count in ["18,591,624", "18,015,264", "59,524,428", "59,111,472", "205,914,264", "207,171,168",
                  "431,069,952", "59,880,472", "60,293,428", "208,196,168"]:
        assert count in out
    b16 = next(line for line in out.splitlines() if line.startswith("B/16"))
    assert b16.split() == ["B/16", "12", "16", "768", "196", "384", "3072", "59,111,472", "59,880,472", "25.20"]


def test_import_weights_command(npz_path, images, tmp_path, capsys):
    out = str(tmp_path / "imported.safetensors")
    assert main(["import-weights", npz_path, out, "--num-classes", "3"]) == 0
    printed = capsys.readouterr().out
    assert "official Flax .npz" in printed and "3 classes" in printed and out in printed
    model = convert.load_safetensors(out)
    assert model.num_classes == 3 and model.gelu == "tanh"
    torch.testing.assert_close(model.stem.weight, convert.from_npz(npz_path).stem.weight)

    assert main(["import-weights", str(tmp_path / "missing.npz"), out]) == 2
    assert "missing.npz" in capsys.readouterr().err
