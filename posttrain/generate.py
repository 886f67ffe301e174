"""Generate text from the command line, streaming tokens as they come.

    python -m posttrain.generate --model gemma3-270m --prompt "The capital of France is"
    python -m posttrain.generate --model /path/to/hf_dir --chat --prompt "Write a haiku" --temperature 0.7

--chat wraps the prompt in the Gemma 3 chat template (for instruction-tuned models); without it
the text is continued as is, after <bos>. Greedy by default (--temperature 0).
"""

from __future__ import annotations

import argparse
import sys

import torch

from .checkpoint import load_model
from .errors import UserError
from .sampler import Sampler
from .tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m posttrain.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m", help="HF directory, .gguf file or gemma3-270m")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--chat", action="store_true", help="apply the Gemma 3 chat template")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--min-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args(argv)
    try:
        tok = load_tokenizer(args.model)
        model = load_model(args.model, dtype=getattr(torch, args.dtype))
        if args.chat:
            ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True).ids
        else:
            ids = tok.encode(args.prompt, add_bos=True)
        emitted: list[int] = []
        printed = ""

        def stream(row: int, token: int) -> None:
            # Decode the whole continuation each time: a piece can be half of a multi-byte character.
            nonlocal printed
            emitted.append(token)
            text = tok.decode(emitted, skip_special_tokens=True)
            if text.startswith(printed):
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text

        if not args.chat:
            sys.stdout.write(args.prompt)
        out = Sampler(model).generate(
            [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, min_p=args.min_p, seed=args.seed, on_token=stream)
        sys.stdout.write(f"\n[{len(out[0][0].tokens)} tokens, finish: {out[0][0].finish_reason}]\n")
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
