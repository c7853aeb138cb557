"""The Mixer itself: variant sizes against the paper, FLOPs, init, stochastic depth, checkpointing, token mixing and
the resolution expansion of Appendix C."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.model import VARIANTS, MlpMixer, TokenLinear, build, count_params, expand_resolution, forward_flops

# Paper Table 1, parameters without the head at 224 px.
PARAMS_NO_HEAD = {
    "S/32": 18_591_624, "S/16": 18_015_264, "B/32": 59_524_428, "B/16": 59_111_472,
    "L/32": 205_914_264, "L/16": 207_171_168, "H/14": 431_069_952,
}
# With a 1000-class head: the first three are asserted by the official vit_jax tests; the rest add 1000 * C + 1000.
PARAMS_HEAD = {
    "B/16": 59_880_472, "B/32": 60_293_428, "L/16": 208_196_168,
    "S/32": 19_104_624, "S/16": 18_528_264, "L/32": 206_939_264, "H/14": 432_350_952,
}
GMACS_224 = {"S/16": 3.78, "B/16": 12.60, "L/16": 44.55, "H/14": 120.99}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter (the official init has a zero head, which would hide head bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def test_variant_table_is_the_papers():
    assert set(VARIANTS) == {"S/32", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14", "tiny"}
    for name, params in PARAMS_NO_HEAD.items():
        assert count_params(VARIANTS[name], 224, num_classes=0) == params, name
    for name, params in PARAMS_HEAD.items():
        assert count_params(VARIANTS[name], 224, num_classes=1000) == params, name


@pytest.fixture(scope="module")
def s32() -> MlpMixer:
    torch.manual_seed(0)
    return build("S/32", num_classes=1000, head_bias=-6.9)


@pytest.mark.parametrize("name", ["S/32", "B/32", "L/32"])
def test_count_helper_matches_a_built_model(name, s32):
    if name == "S/32":
        model = s32
    else:
        with torch.device("meta"):  # real shapes, no memory or init time
            model = build(name, num_classes=1000)
    assert model.num_params(with_head=False) == PARAMS_NO_HEAD[name]
    assert model.num_params() == PARAMS_HEAD[name] == count_params(model.config, 224, 1000)


def test_count_helper_at_other_sizes():
    model = build("tiny", num_classes=10, image_size=32, in_chans=1)
    assert model.num_params() == count_params(model.config, 32, 10, in_chans=1)
    assert build("tiny", num_classes=0, image_size=64).num_params() == count_params(VARIANTS["tiny"], 64, 0)


def test_forward_flops_match_the_reference():
    for name, gmacs in GMACS_224.items():
        assert forward_flops(VARIANTS[name], 224, 1000) / 2e9 == pytest.approx(gmacs, rel=5e-3), name
    model = build("tiny", num_classes=10, image_size=32)
    assert model.forward_flops() == forward_flops(VARIANTS["tiny"], 32, 10)


def test_build_rejects_bad_names_and_sizes():
    with pytest.raises(ValueError, match=r"unknown Mixer variant 'B/8'.*S/32, S/16, B/32, B/16, L/32, L/16, H/14"):
        build("B/8")
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        build("B/16", image_size=200)
    with pytest.raises(ValueError, match="gelu"):
        build("tiny", image_size=32, gelu="relu")


def test_forward_shapes_and_features():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert build("tiny", num_classes=7, image_size=32)(x).shape == (2, 7)
    features = build("tiny", num_classes=0, image_size=32)
    assert features(x).shape == (2, 64)
    assert not any(name.startswith("head") for name in features.state_dict())


def test_parameter_names_are_timm_like():
    names = set(build("tiny", num_classes=10, image_size=32).state_dict())
    for name in ["stem.weight", "stem.bias", "blocks.0.norm1.weight", "blocks.0.mlp_tokens.fc1.weight",
                 "blocks.0.mlp_tokens.fc2.bias", "blocks.3.norm2.bias", "blocks.3.mlp_channels.fc1.weight",
                 "blocks.3.mlp_channels.fc2.weight", "norm.weight", "head.weight", "head.bias"]:
        assert name in names
    model = build("tiny", num_classes=10, image_size=32)
    assert model.blocks[0].mlp_tokens.fc1.weight.shape == (32, 64)  # (out = D_S, in = tokens)


def test_official_init(s32):
    model = s32
    assert torch.all(model.head.weight == 0) and torch.all(model.head.bias == -6.9)
    assert torch.all(model.blocks[3].mlp_channels.fc1.bias == 0) and torch.all(model.stem.bias == 0)
    assert torch.all(model.blocks[3].norm1.weight == 1) and torch.all(model.norm.bias == 0)
    for weight, fan_in in [(model.blocks[3].mlp_channels.fc1.weight, 512), (model.stem.weight, 32 * 32 * 3),
                           (model.blocks[0].mlp_tokens.fc1.weight, 49)]:
        std = 1 / math.sqrt(fan_in)
        assert weight.std().item() == pytest.approx(std, rel=0.03)  # lecun: variance 1/fan_in after truncation
        assert weight.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-6  # truncated at 2 (raw) std
        assert weight.abs().max().item() > 1.9 * std  # but not a plain uniform or a narrower normal


def test_token_linear_is_a_linear_over_tokens():
    torch.manual_seed(0)
    layer = TokenLinear(9, 5)
    x = torch.randn(9, 3, 4)  # token-major: (tokens, batch, channels)
    expected = torch.einsum("os,sbc->obc", layer.weight, x) + layer.bias[:, None, None]
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x.transpose(1, 2).contiguous().transpose(1, 2)), expected)  # strided input
    torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(x), expected)


def test_stochastic_depth_ramp_and_behaviour():
    model = build("tiny", num_classes=10, image_size=32, stoch_depth=0.3)
    assert model.drop_rates() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    single = MlpMixer(32, 4, 16, 1, 8, 32, 10, stoch_depth=0.5)
    assert single.drop_rates() == [0.0]  # i / max(L - 1, 1)

    randomize_(model)
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(x), model(x))

    # Per example: a branch is either dropped (0) or kept and rescaled by 1 / (1 - p).
    block = model.blocks[3]
    out = block.drop_path(torch.ones(4, 2000, 5))  # (tokens, batch, channels)
    assert out.unique().tolist() == pytest.approx([0.0, 1 / 0.7])
    assert torch.all(out == out[:1, :, :1])
    assert (out[0, :, 0] == 0).float().mean().item() == pytest.approx(0.3, abs=0.05)
    block.eval()
    assert torch.equal(block.drop_path(torch.ones(4, 2, 2)), torch.ones(4, 2, 2))


def test_activation_checkpointing_gives_the_same_gradients():
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    grads = []
    for flag in (False, True):
        model = randomize_(build("tiny", num_classes=10, image_size=32, activation_checkpointing=flag))
        model.train()
        model(x).square().sum().backward()
        grads.append(model.blocks[1].mlp_tokens.fc1.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_compiled_with_activation_checkpointing_gives_the_same_gradients():
    """What model.compile with activation checkpointing hands torch.compile traces through the non-reentrant
    checkpoint (aot_eager: the graphs without inductor's code generation, which the GPU specs add)."""
    import torch._dynamo

    x = torch.rand(4, 3, 32, 32) * 2 - 1
    grads = []
    for flag, compiled in ((False, False), (True, True)):
        torch.manual_seed(0)
        model = randomize_(build("tiny", num_classes=10, image_size=32, activation_checkpointing=flag))
        model.train()
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        run(x).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    torch._dynamo.reset()
    for eager, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(eager, compiled)


def test_expanded_model_averages_the_tiles():
    k = 2
    model = randomize_(build("tiny", num_classes=10, image_size=32)).double().eval()
    big = expand_resolution(model, k).eval()
    assert big.image_size == 64 and big.config.tokens_mlp_dim == 32 * k * k
    assert big.blocks[0].mlp_tokens.fc1.weight.shape == (32 * 4, 64 * 4)

    gen = torch.Generator().manual_seed(1)
    tiles = torch.rand(k * k, 3, 3, 32, 32, generator=gen, dtype=torch.float64) * 2 - 1  # (tile, batch, C, H, W)
    rows = [torch.cat([tiles[i * k + j] for j in range(k)], dim=-1) for i in range(k)]
    image = torch.cat(rows, dim=-2)
    with torch.no_grad():
        expected = torch.stack([model(t) for t in tiles]).mean(0)
        got = big(image)
        # The tiles give different logits, so matching their mean is no coincidence of identical tiles.
        assert (model(tiles[0]) - expected).norm() / expected.norm() > 1e-2
    assert (got - expected).norm() / expected.norm() < 1e-5


def test_expand_rejects_non_integer_factors():
    model = build("tiny", num_classes=10, image_size=32)
    with pytest.raises(ValueError, match="positive integer"):
        expand_resolution(model, 1.5)
    assert expand_resolution(model, 1) is model


def test_reset_head():
    model = randomize_(build("tiny", num_classes=10, image_size=32, head_bias=-6.9))
    model.reset_head()
    assert model.num_classes == 10 and torch.all(model.head.weight == 0) and torch.all(model.head.bias == -6.9)
    model.reset_head(3)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="num_classes must be an integer"):
        model.reset_head(-6.9)
