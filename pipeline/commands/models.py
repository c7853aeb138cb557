"""`mixer models` (the variant table with sizes and FLOPs) and `mixer import-weights` (official .npz or timm weights
to our safetensors)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the Mixer variants with their sizes and FLOPs")
    p.add_argument("--image-size", type=int, default=224, help="input resolution in pixels (default 224)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the head counted (default 1000)")
    p.set_defaults(func=list_models)

    p = sub.add_parser("import-weights", help="convert official .npz or timm weights to a safetensors file",
                       description="Read an official Flax .npz (current or older layout), a timm state dict "
                       "(.pth/.pt/.bin) or a safetensors file, and write our safetensors (weights plus model "
                       "configuration). SRC and OUT may be fsspec URLs (s3://...).")
    p.add_argument("src", help="weights to read: .npz, .pth/.pt/.bin or .safetensors")
    p.add_argument("out", help="safetensors file to write")
    p.add_argument("--num-classes", type=int, default=None,
                   help="replace the head by a fresh one with this many classes (0: no head); default keeps it")
    p.add_argument("--image-size", type=int, default=None,
                   help="a multiple of the native resolution: expand the token MLPs (paper Appendix C)")
    p.add_argument("--gelu", choices=["tanh", "exact"], default=None,
                   help="GELU form of the model (default: tanh for .npz, exact for timm weights)")
    p.set_defaults(func=import_weights)


def list_models(args: argparse.Namespace) -> int:
    from pipeline.model import VARIANTS, count_params, forward_flops, num_tokens

    header = ("variant", "layers", "patch", "hidden", "tokens", "D_S", "D_C", "params w/o head", "params w/ head",
              "GFLOPs/img")
    rows = []
    for name, cfg in VARIANTS.items():
        if args.image_size % cfg.patch_size:
            rows.append((name, cfg.num_blocks, cfg.patch_size, cfg.hidden_dim, "-", cfg.tokens_mlp_dim,
                         cfg.channels_mlp_dim, "-", "-", f"image size not a multiple of {cfg.patch_size}"))
            continue
        rows.append((
            name, cfg.num_blocks, cfg.patch_size, cfg.hidden_dim, num_tokens(cfg, args.image_size),
            cfg.tokens_mlp_dim, cfg.channels_mlp_dim,
            f"{count_params(cfg, args.image_size, 0):,}", f"{count_params(cfg, args.image_size, args.num_classes):,}",
            f"{forward_flops(cfg, args.image_size, args.num_classes) / 1e9:.2f}",
        ))
    cells = [tuple(str(c) for c in row) for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"Mixer variants at {args.image_size} px, head of {args.num_classes} classes "
          "(FLOPs: matmuls, 2 per multiply-add, one image forward)")
    for row in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    return 0


def import_weights(args: argparse.Namespace) -> int:
    from pipeline.convert import load_weights, save_safetensors, weights_format
    from pipeline.model import num_tokens, variant_name

    kwargs = {"gelu": args.gelu} if args.gelu else {}
    kind = weights_format(args.src)
    model = load_weights(args.src, num_classes=args.num_classes, image_size=args.image_size, **kwargs)
    save_safetensors(model, args.out, metadata={"source": args.src})
    cfg = model.config
    name = variant_name(cfg) or "custom"
    print(f"read {args.src} ({kind}): Mixer {name} (patch {cfg.patch_size}, hidden {cfg.hidden_dim}, "
          f"{cfg.num_blocks} blocks, D_S {cfg.tokens_mlp_dim}, D_C {cfg.channels_mlp_dim})")
    print(f"  {model.image_size} px, {num_tokens(cfg, model.image_size)} tokens, {model.num_classes} classes, "
          f"GELU {model.gelu}, {model.num_params():,} parameters")
    print(f"wrote {args.out}")
    return 0
