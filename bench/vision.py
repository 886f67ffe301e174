"""The vision path at the released shape: SigLIP so400m/14 tower + projector, ours vs transformers.

    python bench/vision.py [--images 1] [--layers 27] [--repeats 3] [--dtype float32 bfloat16]

Random weights (no real Gemma 3 vision weights exist offline), the same in both models: transformers'
SiglipVisionModel + Gemma3MultiModalProjector (SDPA attention) against posttrain.vision, 896 x 896
images, projected to the 4B's width (2560). Prints the median wall time of each side, images per
second, the ratio transformers / ours, and the largest difference of the outputs. One image through
all 27 layers is about 5 TFLOP: on a 2-core CPU pass --layers 2 (same shapes per layer, fewer layers)
unless you have minutes to spare; a GPU runs the whole tower.
"""

from __future__ import annotations

import argparse

import torch

from posttrain.vision import Projector, VisionConfig, VisionTower
from timing import median_seconds


def build(layers: int, dtype: torch.dtype, device: str):
    from transformers import Gemma3Config, SiglipVisionConfig, SiglipVisionModel  # the peer; never in the library
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    cfg = VisionConfig(num_layers=layers)
    hf_cfg = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=layers,
                                num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False,
                                attn_implementation="sdpa")
    with torch.device(device):
        hf_tower = SiglipVisionModel(hf_cfg).to(dtype).eval()
        mm = Gemma3Config(vision_config=hf_cfg.to_dict(), text_config={"hidden_size": 2560})
        hf_proj = Gemma3MultiModalProjector(mm).to(dtype).eval()
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for p in [*hf_tower.parameters(), *hf_proj.parameters()]:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).to(dtype) * 0.02)
        tower, proj = VisionTower(cfg).to(dtype).eval(), Projector(cfg, 2560).to(dtype).eval()
    tower.load_state_dict({k.removeprefix("vision_model."): v for k, v in hf_tower.state_dict().items()})
    proj.load_state_dict(hf_proj.state_dict())
    return (lambda x: proj(tower(x))), (lambda x: hf_proj(hf_tower(pixel_values=x).last_hidden_state))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--layers", type=int, default=27, help="tower depth (27 = so400m)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"SigLIP so400m/14 tower ({args.layers} of 27 layers) + projector to 2560, {args.images} image(s) of "
          f"896x896, {device}, median of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"{'dtype':10s} {'ours s':>9s} {'transformers s':>15s} {'ours img/s':>11s} {'transformers / ours':>20s} "
          f"{'max |diff|':>11s}")
    for name in args.dtype:
        dtype = getattr(torch, name)
        ours, theirs = build(args.layers, dtype, device)
        x = torch.randn(args.images, 3, 896, 896, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        with torch.inference_mode():
            diff = (ours(x).float() - theirs(x).float()).abs().max().item()  # also the warm-up
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            t_ours = median_seconds(lambda: (ours(x), sync()), args.repeats)
            t_theirs = median_seconds(lambda: (theirs(x), sync()), args.repeats)
        print(f"{name:10s} {t_ours:9.3f} {t_theirs:15.3f} {args.images / t_ours:11.2f} {t_theirs / t_ours:19.2f}x "
              f"{diff:11.2e}")


if __name__ == "__main__":
    main()
