"""Throughput benchmarks; each mode prints its figures (tests never assert speed).

    python bench.py decode    # tokens/s: KV-cache decode vs full recompute vs Hugging Face generate

Every figure is the median of --repeats timed runs after one untimed warm-up run; the methods
compared take turns (one run of each per round), so a load change on a shared machine hits all alike.
"""
import argparse
import statistics
import tempfile
import time

import torch

from gpt import GPT, GPTConfig, generate
from prepare import run_main


def median_seconds(fns, repeats):
    """{name: fn} -> ({name: median wall time of fn()}, {name: fn's last result}) over `repeats`
    rounds, each fn once per round, after one untimed round (allocator, caches, lazy init)."""
    times, results = {name: [] for name in fns}, {}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn()
            if round_ > 0:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, results


# ----------------------------------------------------------------------------------------------
# decode


@torch.inference_mode()
def recompute_decode(model, idx, max_new_tokens):
    """Greedy decoding without a cache, the baseline: each step runs the whole (cropped) context."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return idx[:, -max_new_tokens:]


def load_hf_copy(model, args):
    """(the same weights as a transformers GPT2LMHeadModel, None), or (None, why there is none)."""
    if args.no_hf:
        return None, "--no_hf"
    if args.prompt_tokens + args.new_tokens > args.block_size:
        return None, "the context passes block_size, and HF's GPT-2 cannot slide its window"
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        return None, "transformers is not importable"
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return GPT2LMHeadModel.from_pretrained(tmp).eval(), None


@torch.inference_mode()
def hf_greedy(hf, idx, max_new_tokens):
    """Hugging Face generate, greedy with its KV cache; exactly max_new_tokens new tokens."""
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=max_new_tokens,
                      min_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                      pad_token_id=0)
    return out[:, idx.size(1):]


def decode(args):
    torch.manual_seed(args.seed)
    config = GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (1, args.prompt_tokens))
    N = args.new_tokens
    print(f"decode: {model.num_params() / 1e6:.1f}M params, batch 1, {args.prompt_tokens}-token prompt, "
          f"{N} new tokens (greedy), float32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"median of {args.repeats}")
    methods = {  # each returns the new tokens as a list, so the outputs can be compared
        "kv-cache": lambda: generate(model, idx, N, temperature=0)[0],
        "recompute": lambda: recompute_decode(model, idx, N)[0].tolist(),
    }
    hf, hf_skipped = load_hf_copy(model, args)
    if hf is not None:
        methods["hf-generate"] = lambda: hf_greedy(hf, idx, N)[0].tolist()

    seconds, outputs = median_seconds(methods, args.repeats)
    for name, s in seconds.items():
        print(f"  {name:<12} {N / s:8.1f} tokens/s  ({1000 * s / N:.2f} ms/token)")
    print(f"  kv-cache vs recompute:   {seconds['recompute'] / seconds['kv-cache']:.2f}x")
    if hf is None:
        print(f"  hf-generate: skipped ({hf_skipped})")
    else:
        print(f"  kv-cache vs hf-generate: {seconds['hf-generate'] / seconds['kv-cache']:.2f}x")
    same = all(out == outputs["kv-cache"] for out in outputs.values())
    print(f"  same tokens from every method: {'yes' if same else 'NO'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)

    p = modes.add_parser("decode", help="generation tokens/s: KV cache vs recompute vs HF generate")
    p.add_argument("--n_layer", type=int, default=12, help="model shape; the default is GPT-2 small (124M)")
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--vocab_size", type=int, default=50257)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--prompt_tokens", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method; the median is shown")
    p.add_argument("--no_hf", action="store_true", help="skip the Hugging Face generate comparison")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=decode)

    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    run_main(main)
