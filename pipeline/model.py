"""MLP-Mixer (Tolstikhin et al. 2021), exactly the official architecture, plus the variant table, parameter and FLOP
counts, and the resolution expansion of the paper's Appendix C.

Parameter names follow timm (`blocks.{i}.mlp_tokens.fc1`, ...) with the stem conv as `stem`; Linear weights are
stored (out, in). Inputs are NCHW floats in [-1, 1]. Between stem and pooling the activations are token-major,
(tokens, batch, channels), so that token mixing is a single plain GEMM (TokenLinear).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

LAYER_NORM_EPS = 1e-6
GELU_FORMS = {"tanh": "tanh", "exact": "none"}  # our name -> torch's `approximate` argument


@dataclass(frozen=True)
class MixerConfig:
    patch_size: int
    hidden_dim: int
    num_blocks: int
    tokens_mlp_dim: int
    channels_mlp_dim: int


VARIANTS: dict[str, MixerConfig] = {
    "S/32": MixerConfig(32, 512, 8, 256, 2048),
    "S/16": MixerConfig(16, 512, 8, 256, 2048),
    "B/32": MixerConfig(32, 768, 12, 384, 3072),
    "B/16": MixerConfig(16, 768, 12, 384, 3072),
    "L/32": MixerConfig(32, 1024, 24, 512, 4096),
    "L/16": MixerConfig(16, 1024, 24, 512, 4096),
    "H/14": MixerConfig(14, 1280, 32, 640, 5120),
    "tiny": MixerConfig(4, 64, 4, 32, 128),
}


def num_tokens(cfg: MixerConfig, image_size: int) -> int:
    """Tokens of an `image_size` image: the one place that checks the size is a multiple of the patch."""
    if image_size % cfg.patch_size:
        raise ValueError(f"image size {image_size} is not divisible by the patch size {cfg.patch_size}")
    return (image_size // cfg.patch_size) ** 2


def count_params(cfg: MixerConfig, image_size: int = 224, num_classes: int = 1000, in_chans: int = 3) -> int:
    """Parameters of the model `cfg` would build, without building it. `num_classes=0` counts no head."""
    s, c = num_tokens(cfg, image_size), cfg.hidden_dim
    stem = cfg.patch_size**2 * in_chans * c + c
    block = (
        2 * c  # LayerNorm 0
        + s * cfg.tokens_mlp_dim + cfg.tokens_mlp_dim + cfg.tokens_mlp_dim * s + s
        + 2 * c  # LayerNorm 1
        + c * cfg.channels_mlp_dim + cfg.channels_mlp_dim + cfg.channels_mlp_dim * c + c
    )
    head = c * num_classes + num_classes
    return stem + cfg.num_blocks * block + 2 * c + head


def forward_flops(cfg: MixerConfig, image_size: int = 224, num_classes: int = 1000, in_chans: int = 3) -> int:
    """Matmul FLOPs (2 x multiply-accumulates) of one image's forward pass: stem, both MLPs of every block, head.
    Norms, GELUs and residual adds are left out, as in the paper's and the usual FLOP counts."""
    s, c = num_tokens(cfg, image_size), cfg.hidden_dim
    stem = s * cfg.patch_size**2 * in_chans * c
    block = 2 * s * cfg.tokens_mlp_dim * c + 2 * s * c * cfg.channels_mlp_dim
    return 2 * (stem + cfg.num_blocks * block + c * num_classes)


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Flax's lecun_normal: a normal truncated at 2 std whose std is corrected so the variance is 1/fan_in."""
    fan_in = weight[0].numel()  # (out, in, ...) for both Linear and Conv weights
    # 0.8796... is the std of a standard normal truncated to [-2, 2].
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class TokenLinear(nn.Linear):
    """A Linear layer over the token axis of token-major (S, B, C) activations, giving (out, B, C). Its weight is
    (out, in) like any Linear, so names, shapes and init stay the usual.

    Token-major, token mixing is one GEMM, weight (out, S) times the activations viewed as (S, B*C): no transposed
    copy, no batched GEMM, and every other layer (norms, channel MLP, residuals) acts on the last axis as before.
    The bias is added after the GEMM rather than through `addmm`: compiled, the add fuses into the GELU or the
    residual add that follows, where `addmm` with a per-row bias first materialises it at the output's full size
    (an L/16 training step on an H200: 4 ms of its 86 in those copies)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight @ x.flatten(1) + self.bias[:, None]).view(-1, *x.shape[1:])


class Mlp(nn.Module):
    """Dense, GELU, Dense, over channels (`nn.Linear`) or over tokens (`TokenLinear`)."""

    def __init__(self, dim: int, hidden_dim: int, gelu: str, linear: type[nn.Linear]):
        super().__init__()
        self.fc1 = linear(dim, hidden_dim)
        self.act = nn.GELU(approximate=GELU_FORMS[gelu])
        self.fc2 = linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, hidden_dim: int, tokens_mlp_dim: int, channels_mlp_dim: int, gelu: str,
                 drop_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)
        self.mlp_tokens = Mlp(tokens, tokens_mlp_dim, gelu, TokenLinear)
        self.norm2 = nn.LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)
        self.mlp_channels = Mlp(hidden_dim, channels_mlp_dim, gelu, nn.Linear)
        self.drop_rate = drop_rate

    def drop_path(self, branch: torch.Tensor) -> torch.Tensor:
        """Stochastic depth: drop the whole branch for a random subset of examples, rescale the kept ones.

        big_vision leaves the kept examples unscaled; scaling by 1 / (1 - p) keeps the expected branch equal to the
        eval-mode one, so the network sees the same activation scale in training and evaluation."""
        if not self.training or self.drop_rate == 0.0:
            return branch
        keep = 1.0 - self.drop_rate
        mask = branch.new_empty((1, branch.shape[1], 1)).bernoulli_(keep)  # (S, B, C): one draw per example
        return branch * mask.div_(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x)))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class MlpMixer(nn.Module):
    """NCHW images in [-1, 1] -> logits (B, num_classes), or pooled features (B, hidden_dim) with num_classes=0.

    `gelu`: "tanh" (the official Flax form) or "exact" (timm's). `stoch_depth`: the rate of the last block, ramped
    linearly from 0 at the first. `head_bias`: the head bias at init (-6.9 for a sigmoid loss, as big_vision).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        hidden_dim: int,
        num_blocks: int,
        tokens_mlp_dim: int,
        channels_mlp_dim: int,
        num_classes: int = 1000,
        *,
        in_chans: int = 3,
        dropout: float = 0.0,
        stoch_depth: float = 0.0,
        head_bias: float = 0.0,
        gelu: str = "tanh",
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        if gelu not in GELU_FORMS:
            raise ValueError(f"gelu must be one of {sorted(GELU_FORMS)}, got {gelu!r}")
        if not 0.0 <= stoch_depth < 1.0:
            raise ValueError(f"stoch_depth must be in [0, 1), got {stoch_depth}")
        self.config = MixerConfig(patch_size, hidden_dim, num_blocks, tokens_mlp_dim, channels_mlp_dim)
        tokens = num_tokens(self.config, image_size)
        self.image_size = image_size
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.gelu = gelu
        self.dropout = dropout
        self.stoch_depth = stoch_depth
        self.head_bias = head_bias
        self.activation_checkpointing = activation_checkpointing

        self.stem = nn.Conv2d(in_chans, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(
            MixerBlock(tokens, hidden_dim, tokens_mlp_dim, channels_mlp_dim, gelu,
                       drop_rate=i / max(num_blocks - 1, 1) * stoch_depth)
            for i in range(num_blocks)
        )
        self.norm = nn.LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init: lecun-normal kernels, zero biases, zero head kernel, head bias `head_bias`."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                lecun_normal_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if isinstance(self.head, nn.Linear):
            init_head_(self.head, self.head_bias)

    def reset_head(self, num_classes: int | None = None) -> None:
        """Replace the head by a freshly initialised one (official init, bias `head_bias`) for `num_classes` classes;
        None keeps the current number, 0 removes the head (features out)."""
        if num_classes is None:
            num_classes = self.num_classes
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"reset_head: num_classes must be an integer >= 0 (or None), got {num_classes!r}")
        self.num_classes = num_classes
        if num_classes == 0:
            self.head = nn.Identity()
            return
        like = self.norm.weight
        self.head = nn.Linear(self.config.hidden_dim, num_classes, device=like.device, dtype=like.dtype)
        init_head_(self.head, self.head_bias)

    def drop_rates(self) -> list[float]:
        return [block.drop_rate for block in self.blocks]

    def init_kwargs(self) -> dict:
        """The constructor arguments that rebuild this model (without its weights)."""
        cfg = self.config
        return dict(
            image_size=self.image_size, patch_size=cfg.patch_size, hidden_dim=cfg.hidden_dim,
            num_blocks=cfg.num_blocks, tokens_mlp_dim=cfg.tokens_mlp_dim, channels_mlp_dim=cfg.channels_mlp_dim,
            num_classes=self.num_classes, in_chans=self.in_chans, dropout=self.dropout,
            stoch_depth=self.stoch_depth, head_bias=self.head_bias, gelu=self.gelu,
            activation_checkpointing=self.activation_checkpointing,
        )

    def num_params(self, with_head: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total if with_head else total - sum(p.numel() for p in self.head.parameters())

    def forward_flops(self) -> int:
        return forward_flops(self.config, self.image_size, self.num_classes, self.in_chans)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits features, (B, hidden_dim)."""
        # n c h w -> (h w) n c: token-major, tokens in raster order (see TokenLinear)
        x = self.stem(x).flatten(2).permute(2, 0, 1).contiguous()
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x)))


def init_head_(head: nn.Linear, bias: float = 0.0) -> None:
    nn.init.zeros_(head.weight)
    nn.init.constant_(head.bias, bias)


def build(name: str, num_classes: int = 1000, image_size: int = 224, **kwargs) -> MlpMixer:
    """The variant `name` ("B/16", ...) for `image_size` images; kwargs go to MlpMixer (dropout, stoch_depth...)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown Mixer variant {name!r}; known variants: {', '.join(VARIANTS)}")
    cfg = VARIANTS[name]
    return MlpMixer(image_size, cfg.patch_size, cfg.hidden_dim, cfg.num_blocks, cfg.tokens_mlp_dim,
                    cfg.channels_mlp_dim, num_classes, **kwargs)


def variant_name(cfg: MixerConfig) -> str | None:
    """The name of the variant with this configuration, or None for a custom one."""
    return next((name for name, known in VARIANTS.items() if known == cfg), None)


def tile_token_order(grid: int, k: int) -> torch.Tensor:
    """For a (k*grid)^2 raster of tokens, the position of each token when tokens are grouped by k x k spatial tile
    (tiles in raster order, each tile's grid^2 tokens contiguous and in raster order inside the tile)."""
    rows = torch.arange(k * grid)[:, None]
    cols = torch.arange(k * grid)[None, :]
    tile = (rows // grid) * k + cols // grid
    inside = (rows % grid) * grid + cols % grid
    return (tile * grid * grid + inside).flatten()


@torch.no_grad()
def expand_resolution(model: MlpMixer, k: int) -> MlpMixer:
    """The model for k-times larger images (paper Appendix C): the token MLPs become block-diagonal with k^2 copies of
    the originals, biases tiled, each block acting on one k x k spatial tile of the large image.

    Rather than reordering tokens in the forward pass, the token permutation is folded into the token-MLP weights
    (columns of fc1, rows of fc2), so the result is a plain MlpMixer with the usual raster order: it saves, exports
    and resumes like any other. On an image made of k x k tiles it gives the mean of the original model's logits on
    the tiles, because everything but the token MLP acts per token and the head averages over tokens.
    """
    if k < 1 or int(k) != k:
        raise ValueError(f"the resolution factor must be a positive integer, got {k}")
    if k == 1:
        return model
    kwargs = model.init_kwargs()
    kwargs["image_size"] = model.image_size * k
    kwargs["tokens_mlp_dim"] = model.config.tokens_mlp_dim * k * k
    like = model.norm.weight
    big = MlpMixer(**kwargs).to(like.device, like.dtype)
    grid = model.image_size // model.config.patch_size
    order = tile_token_order(grid, k)
    big_state = big.state_dict()
    for name, value in model.state_dict().items():
        if ".mlp_tokens.fc1.weight" in name:
            value = torch.block_diag(*[value] * (k * k))[:, order]
        elif ".mlp_tokens.fc1.bias" in name:
            value = value.repeat(k * k)
        elif ".mlp_tokens.fc2.weight" in name:
            value = torch.block_diag(*[value] * (k * k))[order, :]
        elif ".mlp_tokens.fc2.bias" in name:
            value = value.repeat(k * k)[order]
        big_state[name].copy_(value)
    return big
