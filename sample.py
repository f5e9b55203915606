"""Use a trained checkpoint: generate, chat, analyse the next token, evaluate perplexity, benchmark.

    python sample.py --start "Once upon a time"             # newest out*/ checkpoint, streamed
    python sample.py --out_dir out-small --start FILE:prompt.txt --num_samples 3 --temperature 0.8
    python sample.py --chat                                  # /help lists the commands
    python sample.py --analyze "Hello, how are you"          # next-token table and surprisal
    python sample.py --eval some.txt --stride 128            # loss, perplexity, accuracy
    python sample.py --benchmark                             # prefill and decode tokens/s
    python sample.py --weights int8 --benchmark              # the same with int8 weights (CPU)
    python sample.py --attention "To be, or not to be" --plot attn.png   # each head's attention

Design choices:
- The checkpoint is all it needs: the tokenizer travels inside it (tokenizer.load_tokenizer).
  The model is gpt.py's; loading it, decoding (the KV cache, sampling, beam search) and cutting
  the text at stop strings engine.py's, as for serve.py; device and precision common.py's. This
  file only drives them.
- stdout carries only model text (or the tables asked for); what was loaded, notices and errors
  go to stderr, so `python sample.py ... > out.txt` keeps a clean file.
- Streaming prints text once it is final (engine.TextStream): never half a UTF-8 character (a
  byte-level token can stop inside one) nor the start of --stop. Decoding only the tokens not yet
  printed keeps a long run (a huge --max_new_tokens: until --stop, end-of-text or Ctrl-C) linear.
- A chat's context is the text shown: a reply cut by --stop or Ctrl-C keeps only what was printed.
- A flag that does not apply to the chosen mode is an error, not silently ignored.
- --eval scores every token once with windows of block_size that end `stride` tokens apart. The
  default stride = block_size gives train.py's val loss (context 0..block_size-1 per token);
  a smaller stride gives each token at least block_size - stride tokens of context (lower loss).
"""
import argparse
import math
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from common import ArgumentParser, UserError, pyplot, run_main, save_figure, sync
from engine import (INT4_GROUP_SIZE, INT4_GROUP_SIZES, WEIGHT_FORMATS, TextStream, beam_search, check_compile,
                    check_weight_settings, generate_stream, load_model)
from gpt import attention_weights
from tokenizer import END, render_chat

SEPARATOR = "---------------"

# -----------------------------------------------------------------------------
# Settings: each parser is both an argparse `type` and the parser of a chat command's value.


def setting(name, kind, ok, rule):
    """A parser of `name` from text: kind(text) that satisfies `ok`, else a UserError saying `rule`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise UserError(f"{name} must be {rule}, got {text!r}")
        return value
    parse.__name__ = name
    return parse


parse_temperature = setting("temperature", float, lambda v: 0 <= v < math.inf, "a number >= 0 (0 = greedy)")
parse_tokens = setting("max_new_tokens", int, lambda v: v >= 1, "an integer >= 1")
parse_top_k = setting("top_k", int, lambda v: v >= 0, "an integer >= 0 (0 = off)")
parse_top_p = setting("top_p", float, lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)")
parse_penalty = setting("repetition_penalty", float, lambda v: 0 < v < math.inf, "a number > 0 (1 = off)")
parse_seed = setting("seed", int, lambda v: 0 <= v < 2**63, "an integer >= 0")
parse_positive = lambda name: setting(name, int, lambda v: v >= 1, "an integer >= 1")
parse_index = lambda name: setting(name, int, lambda v: v >= 0, "an integer >= 0 (the first is 0)")

CHAT_COMMANDS = {  # command -> (setting, parser)
    "/temp": ("temperature", parse_temperature),
    "/tokens": ("max_new_tokens", parse_tokens),
    "/topk": ("top_k", parse_top_k),
    "/topp": ("top_p", parse_top_p),
    "/penalty": ("repetition_penalty", parse_penalty),
    "/seed": ("seed", parse_seed),
}
CHAT_HELP = """commands:
  /temp X      sampling temperature (0 = greedy)
  /tokens N    new tokens per reply
  /topk K      keep the K most likely tokens (0 = off)
  /topp P      keep the smallest set of tokens with probability >= P (1 = off)
  /penalty R   repetition penalty (1 = off)
  /seed S      restart the random generator from seed S
  /system TEXT a chat-tuned model's system prompt (no TEXT: none); /reset keeps it
  /reset       forget the conversation so far
  /help        this list
  quit, exit   leave (so does end of input, or Ctrl-C at the prompt)
any other line is continued by the model (a chat-tuned model answers it as a message);
Ctrl-C stops a reply (what was shown of it stays)"""

# Filled in after parsing: argparse's default is None, so a flag the user gave can be told apart.
DEFAULTS = dict(num_samples=1, max_new_tokens=500, temperature=0.8, top_k=0, top_p=1.0,
                repetition_penalty=1.0, num_beams=1)
# The modes each flag applies to ("generate": no mode flag). Given to another mode it is an error:
# ignoring it would let the user believe it had an effect.
SAMPLING = ("generate", "chat")
APPLIES_TO = {"num_samples": ("generate",), "num_beams": ("generate",), "max_new_tokens": SAMPLING,
              "temperature": SAMPLING, "top_k": SAMPLING + ("analyze",), "top_p": SAMPLING,
              "repetition_penalty": SAMPLING, "seed": SAMPLING, "stop": SAMPLING, "stride": ("eval",),
              "plot": ("attention",), "layer": ("attention",), "head": ("attention",), "system": ("chat",),
              "weights": SAMPLING + ("benchmark", "eval", "analyze"), "group_size": SAMPLING + ("benchmark", "eval", "analyze"),
              "compile": SAMPLING + ("benchmark",)}
MODE_NAMES = {"generate": "plain generation", "chat": "--chat", "analyze": "--analyze", "eval": "--eval",
              "benchmark": "--benchmark", "attention": "--attention"}


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", help="use best.pt (else ckpt.pt) of this training run")
    p.add_argument("--ckpt", help="use this checkpoint file, a Hugging Face GPT-2 folder or Hub id (gpt2, OWNER/NAME)")
    p.add_argument("--start", default="", metavar="TEXT",
                   help="the prompt, or FILE:path to read it from a file (default empty: start from "
                   "end-of-text; a char model starts from a newline, and one whose characters "
                   "include none needs --start TEXT)")
    p.add_argument("--num_samples", type=parse_positive("num_samples"), metavar="N",
                   help=f"samples to draw (default {DEFAULTS['num_samples']})")
    p.add_argument("--max_new_tokens", type=parse_tokens, metavar="N",
                   help=f"new tokens per sample or chat reply (default {DEFAULTS['max_new_tokens']}); "
                   "a huge number means until --stop, end-of-text or Ctrl-C")
    p.add_argument("--temperature", type=parse_temperature, metavar="T",
                   help=f"sampling temperature, 0 = greedy (default {DEFAULTS['temperature']})")
    p.add_argument("--top_k", type=parse_top_k, metavar="K",
                   help=f"sample from the K most likely tokens, 0 = off (default {DEFAULTS['top_k']}); "
                   "with --analyze: the number of candidates shown (default 10)")
    p.add_argument("--top_p", type=parse_top_p, metavar="P",
                   help="sample from the fewest most likely tokens whose probability reaches P, "
                   f"1 = off (default {DEFAULTS['top_p']})")
    p.add_argument("--repetition_penalty", type=parse_penalty, metavar="R",
                   help=f"make tokens already in the context less likely, 1 = off "
                   f"(default {DEFAULTS['repetition_penalty']})")
    p.add_argument("--num_beams", type=parse_positive("num_beams"), metavar="N",
                   help="beam search with N > 1 beams (deterministic: ignores the sampling settings; "
                   f"not with --chat) (default {DEFAULTS['num_beams']})")
    p.add_argument("--seed", type=parse_seed, metavar="S",
                   help="default: a fresh random seed (printed when sampling)")
    p.add_argument("--stop", metavar="TEXT", help="stop when the generated text contains this")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--weights", choices=["auto", *WEIGHT_FORMATS], metavar="FORMAT",
                   help="the format the weights are stored in: auto | fp32 | bf16 | fp16 | int8 | int4 "
                   "(int8, int4: CPU). auto: generating, the fastest format whose loss stays within 0.01 "
                   "of fp32's, measured once per machine (on a GPU bf16); scoring (--eval, --analyze), fp32. "
                   "int4 is explicit only (its loss is up to 0.1 higher). BENCHMARKS.md has speed and quality")
    p.add_argument("--group_size", type=int, choices=INT4_GROUP_SIZES, metavar="G",
                   help=f"--weights int4: weights per scale along a row, {'|'.join(map(str, INT4_GROUP_SIZES))} "
                   f"(default {INT4_GROUP_SIZE}; smaller is more exact and larger)")
    p.add_argument("--dtype", default="auto", help="the precision fp32 weights compute in (autocast, as in "
                   "training): auto (bf16 where native, else fp32) | float32 | bfloat16 | float16. "
                   "Given, it means fp32 weights (--weights fp32 or auto) (default auto)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="decode steps through torch.compile: up to ~20%% faster per token on a CPU, "
                   "after seconds to half a minute of compiling at the first token (BENCHMARKS.md, Decode "
                   "step); not with --num_beams")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", action="store_true", help="interactive: continue each line typed (a chat-"
                      "tuned model answers it as a message); Ctrl-C stops a reply (what was shown of it "
                      "stays in the context), at the prompt it quits")
    p.add_argument("--system", metavar="TEXT", help="--chat with a chat-tuned model: the system prompt")
    mode.add_argument("--analyze", metavar="TEXT", help="next-token candidates and surprisal of TEXT")
    mode.add_argument("--eval", metavar="FILE", help="loss, perplexity and accuracy on a text file")
    mode.add_argument("--benchmark", action="store_true", help="prefill and decode tokens/s")
    mode.add_argument("--attention", metavar="TEXT", help="each layer's and head's attention over the "
                      "tokens of TEXT: for each token the one it attends to most, or heatmaps with --plot")
    p.add_argument("--stride", type=parse_positive("stride"), metavar="N",
                   help="--eval: tokens between window ends (default block_size)")
    p.add_argument("--plot", metavar="PNG", help="--attention: draw the maps into this image file "
                   "(a grid of layer x head, or one large map with --layer and --head; needs matplotlib)")
    p.add_argument("--layer", type=parse_index("layer"), metavar="L",
                   help="--attention: only layer L (counted from 0)")
    p.add_argument("--head", type=parse_index("head"), metavar="H",
                   help="--attention: only head H (counted from 0)")
    args = p.parse_args(argv)
    given = {"chat": args.chat, "analyze": args.analyze is not None, "eval": args.eval is not None,
             "benchmark": args.benchmark, "attention": args.attention is not None}
    args.mode = next((mode for mode, on in given.items() if on), "generate")
    check_flags_apply(args)
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.num_beams > 1 and args.num_samples > 1:
        raise UserError("beam search is deterministic: use --num_samples 1 with --num_beams")
    if args.num_beams > 1 and args.compile:
        raise UserError("--compile compiles the sampling decode step; beam search runs eagerly: drop one of them")
    args.compile = bool(args.compile)
    if args.stop == "":
        raise UserError("--stop needs a non-empty string")
    args.weights = args.weights or "auto"
    check_weight_settings(args.weights, args.dtype, args.group_size)
    return args


def check_flags_apply(args):
    """A UserError for the first flag given that does not apply to args.mode (APPLIES_TO)."""
    for name, modes in APPLIES_TO.items():
        if getattr(args, name) is not None and args.mode not in modes:
            raise UserError(f"--{name} does not apply to {MODE_NAMES[args.mode]} "
                            f"(only to {' and '.join(MODE_NAMES[m] for m in modes)})")


# -----------------------------------------------------------------------------
# Loading.

def load(args):
    """engine.load_model for the flags given: --eval and --analyze score whole windows, --attention
    inspects one; the other modes decode token by token."""
    return load_model(args.ckpt, args.out_dir, args.device, args.dtype, args.weights, args.group_size,
                      scoring=args.mode in ("eval", "analyze"), decoding=args.mode in ("generate", "chat", "benchmark"))


def make_generator(device, seed):
    """A random generator from `seed`; without one, a fresh seed, reported so a run can be repeated.
    Deterministic modes (greedy, beam search) make none, so they print no seed."""
    if seed is None:
        seed = random.randrange(2**31)
        print(f"seed {seed} (--seed {seed} repeats this run)", file=sys.stderr)
    return torch.Generator(device=device).manual_seed(seed)


def turn_separator(tokenizer):
    """What joins a typed line to the conversation before it: a newline, or, for a char model
    whose characters include none, a space (or nothing), which it can encode."""
    if tokenizer.kind != "char" or "\n" in tokenizer.chars:
        return "\n"
    return " " if " " in tokenizer.chars else ""


def start_ids(tokenizer, fix="pass --start TEXT"):
    """What an empty prompt starts from (Tokenizer.start_ids): end-of-text, or a newline for a char
    model. A corpus without newlines gives a vocabulary without one: then an error saying `fix`."""
    ids = tokenizer.start_ids()
    if not ids:
        raise UserError(f"an empty prompt starts from a newline, and this model's characters include "
                        f"none: {fix}")
    return ids


def crop(ids, block_size, what):
    if len(ids) > block_size:
        print(f"notice: {what} is {len(ids)} tokens; keeping its last {block_size} (block_size)",
              file=sys.stderr)
        return ids[-block_size:]
    return ids


def user_text(args):
    """The text the chosen mode works on (prompt, text to analyse, file to evaluate), or None."""
    if args.mode in ("chat", "benchmark"):
        return None
    if args.mode == "eval":
        return read_text("FILE:" + args.eval, "--eval")
    if args.mode == "analyze":
        if not args.analyze:
            raise UserError("--analyze needs some text")
        return read_text(args.analyze, "--analyze")
    if args.mode == "attention":
        if not args.attention:
            raise UserError("--attention needs some text")
        return read_text(args.attention, "--attention")
    return read_text(args.start, "--start")


def read_text(arg, flag):
    """The text of `arg`, or of the file it names after FILE:."""
    if not arg.startswith("FILE:"):
        return arg
    path = Path(arg[len("FILE:"):])
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag}: cannot read {path}: {e}") from None


# -----------------------------------------------------------------------------
# Generation.

def stream(model, tokenizer, ids, s, generator, stop, interruptible=False, end_tokens=(), compile=False):
    """Sample up to s["max_new_tokens"] tokens after `ids`, printing text as it is produced.

    Stops at end-of-text or one of `end_tokens` (a chat model's <|end|>), or once the text
    contains `stop`, none of which is printed; if `interruptible` (a chat reply), at Ctrl-C too,
    instead of ending the program. Returns the tokens of the text printed, not those of `stop`
    or anything after it.
    """
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    stop_tokens = tuple(end_tokens) + (() if tokenizer.eot_id is None else (tokenizer.eot_id,))
    steps = generate_stream(model, idx, s["max_new_tokens"], temperature=s["temperature"],
                            top_k=s["top_k"] or None, top_p=s["top_p"] if s["top_p"] < 1 else None,
                            repetition_penalty=s["repetition_penalty"], stop_tokens=stop_tokens,
                            generator=generator, compile=compile)
    text = TextStream(tokenizer, [stop] if stop else [])  # holds back half characters and a stop's start
    try:
        for token in steps:
            token = token.item()
            if token in stop_tokens:
                break
            emit(text.add(token))
            if text.stopped:
                break
    except KeyboardInterrupt:
        if not interruptible:
            raise
    finally:
        steps.close()
    emit(text.finish())  # the rest, including anything held back
    return text.shown_tokens()


def emit(text):
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def sample(model, tokenizer, args, text, ids):
    """num_samples continuations of the prompt `text` (tokens `ids`), each after the prompt."""
    ids = crop(ids, model.config.block_size, "the prompt")
    s = vars(args)
    deterministic = args.num_beams > 1 or args.temperature == 0
    generator = None if deterministic else make_generator(next(model.parameters()).device, args.seed)
    for i in range(args.num_samples):
        if i:
            print(SEPARATOR)
        sys.stdout.write(text)
        if args.num_beams > 1:
            idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
            stop_tokens = () if tokenizer.eot_id is None else (tokenizer.eot_id,)
            out = tokenizer.decode(beam_search(model, idx, args.max_new_tokens, args.num_beams,
                                               stop_tokens=stop_tokens))
            sys.stdout.write(out[:out.index(args.stop)] if args.stop and args.stop in out else out)
        else:
            stream(model, tokenizer, ids, s, generator, args.stop, compile=args.compile)
        print(flush=True)


def chat(model, tokenizer, args):
    """Continue each line typed; the conversation so far is the context of the next reply.

    A chat-tuned model (its tokenizer has the chat markers) gets each line as a user message: the
    system prompt and the messages so far are rendered by render_chat, the template it was tuned
    on, and its reply ends at <|end|>. Any other model continues the text typed, as it is."""
    if sys.stdin.isatty():
        import readline  # noqa: F401  (gives input() line editing and history)
    prompt = "> " if sys.stdin.isatty() else ""
    s = {name: getattr(args, name) for name, _ in CHAT_COMMANDS.values()}
    device = next(model.parameters()).device
    generator = None  # made for the first sampled reply: a greedy chat prints no seed
    context, messages, system = [], [], args.system or ""  # context: tokens; messages: a chat model's turns
    what = "a message for the chat model" if tokenizer.is_chat else "a line for the model to continue"
    print(f"chat: type {what}; /help lists the commands; quit leaves", file=sys.stderr)
    while True:
        try:
            line = input(prompt)
        except EOFError:
            return
        word, _, value = line.strip().partition(" ")
        if word in ("quit", "exit"):
            return
        try:
            if word in CHAT_COMMANDS:
                name, parse = CHAT_COMMANDS[word]
                s[name] = parse(value.strip())
                if name == "seed":
                    generator = make_generator(device, s["seed"])
                print(f"{name} = {s[name]}", flush=True)
            elif word == "/system":
                if not tokenizer.is_chat:
                    raise UserError("/system needs a chat-tuned model (its tokenizer has the chat markers)")
                system = value.strip()
                print(f"system prompt: {system}" if system else "no system prompt", flush=True)
            elif word == "/reset":
                context, messages = [], []
                print("context cleared" + (" (the system prompt stays)" if system else ""), flush=True)
            elif word == "/help":
                print(CHAT_HELP, flush=True)
            elif word.startswith("/"):
                raise UserError(f"unknown command {word}; /help lists the commands")
            elif tokenizer.is_chat:
                messages.append({"role": "user", "content": line})
                turns = [{"role": "system", "content": system}] * bool(system) + messages
                ids, _ = render_chat(tokenizer, turns, add_generation_prompt=True)
                if generator is None and s["temperature"] > 0:
                    generator = make_generator(device, s["seed"])
                # Ctrl-C ends the reply, not the chat; the conversation keeps what was shown of it.
                reply = stream(model, tokenizer, ids[-model.config.block_size:], s, generator, args.stop,
                               interruptible=True, end_tokens=(tokenizer.specials[END],), compile=args.compile)
                messages.append({"role": "assistant", "content": tokenizer.decode(reply)})
                print(flush=True)
            else:
                ids = tokenizer.encode((turn_separator(tokenizer) if context else "") + line)
                context = (context + ids)[-model.config.block_size:] or start_ids(tokenizer, "type some text")
                if generator is None and s["temperature"] > 0:
                    generator = make_generator(device, s["seed"])
                # Ctrl-C ends the reply, not the chat; the context keeps what was shown of it.
                context += stream(model, tokenizer, context, s, generator, args.stop, interruptible=True,
                                  compile=args.compile)
                print(flush=True)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Analysis, evaluation, benchmark.

@torch.inference_mode()
def analyze(model, tokenizer, ids, top_k):
    """Print the top-k next tokens after the text `ids`, then the surprisal of each of its tokens."""
    T = model.config.block_size
    given_eot = tokenizer.eot_id is not None and len(ids) < T
    seq = [tokenizer.eot_id] + ids if given_eot else crop(ids, T, "the text")
    idx = torch.tensor([seq], dtype=torch.long, device=next(model.parameters()).device)
    targets = torch.tensor([seq[1:] + [-1]], dtype=torch.long, device=idx.device)
    logits, _ = model(idx, targets)  # with targets: the logits of every position, (1, T, V)
    logp = F.log_softmax(logits[0].float(), dim=-1)  # (T, V)

    k = min(top_k or 10, logp.size(-1))
    probs, best = logp[-1].exp().topk(k)
    print(f"next-token candidates after the text (top {k}):")
    print(f"{'rank':>5} {'prob':>9} {'id':>7}  token")
    for rank, (p, i) in enumerate(zip(probs.tolist(), best.tolist()), 1):
        print(f"{rank:>5} {p:>9.6f} {i:>7}  {token_text(tokenizer, i)}")

    first = "is given end-of-text" if given_eot else "has no context and is not scored"
    print(f"\nsurprisal -log p of each token given the ones before it (the first token {first}):")
    print(f"{'pos':>5} {'id':>7} {'p':>9} {'nats':>7} {'bits':>7}  token")
    surprisals = []
    for pos in range(int(given_eot), len(seq)):
        token, shown = seq[pos], token_text(tokenizer, seq[pos])
        if pos == 0:
            print(f"{pos:>5} {token:>7} {'-':>9} {'-':>7} {'-':>7}  {shown}")
            continue
        nats = -logp[pos - 1, token].item()
        surprisals.append(nats)
        print(f"{pos - given_eot:>5} {token:>7} {math.exp(-nats):>9.6f} {nats:>7.3f} "
              f"{nats / math.log(2):>7.3f}  {shown}")
    if surprisals:
        mean = sum(surprisals) / len(surprisals)
        print(f"total {sum(surprisals):.3f} nats over {len(surprisals)} tokens; mean {mean:.4f} nats "
              f"({mean / math.log(2):.4f} bits), perplexity {math.exp(mean):.3f}")


def token_text(tokenizer, i):
    """repr of token i's text. A byte-level BPE token that is not whole UTF-8 characters shows its
    bytes (b'\\xf0\\x9f'): as text every piece of a split character would be the same '\\ufffd'."""
    if tokenizer.kind != "char" and 0 <= i < tokenizer.base_vocab_size:
        data = tokenizer.enc.decode_single_token_bytes(i)
        try:
            return repr(data.decode("utf-8"))
        except UnicodeDecodeError:
            return repr(data)
    return repr(tokenizer.decode([i]))


# -----------------------------------------------------------------------------
# Attention maps.

def check_attention_args(model, args, ids):
    """--layer and --head within the model, some tokens to look at, and matplotlib for --plot."""
    if not ids:
        raise UserError("--attention needs some text")
    for name, count in (("layer", model.config.n_layer), ("head", model.config.n_head)):
        value = getattr(args, name)
        if value is not None and value >= count:
            raise UserError(f"--{name} {value} does not exist: this model has {count} {name}s, 0 to {count - 1}")
    if args.plot:
        pyplot()


def show_attention(model, tokenizer, ids, args):
    """Each chosen layer's and head's attention over the tokens `ids`: the token each one attends
    to most, or, with --plot, heatmaps (one per layer and head) drawn into that file."""
    ids = crop(ids, model.config.block_size, "the text")
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    weights = attention_weights(model, idx).cpu()  # (n_layer, n_head, T, T)
    layers = range(model.config.n_layer) if args.layer is None else [args.layer]
    heads = range(model.config.n_head) if args.head is None else [args.head]
    labels = [token_text(tokenizer, i) for i in ids]
    if args.plot:
        plot_attention(weights, labels, layers, heads, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
        return
    width = min(max(map(len, labels)), 24)
    print(f"for each of the {len(ids)} tokens, the token it attends to most (itself included) and the "
          f"weight it gives it; token 0 sees only itself")
    for layer in layers:
        for head in heads:
            print(f"\nlayer {layer} head {head}")
            best_weight, best = weights[layer, head].max(dim=-1)  # (T,) each
            for i in range(1, len(ids)):
                j = best[i].item()
                print(f"{i:>5} {labels[i]:<{width}} -> {j:>5} {labels[j]:<{width}} {best_weight[i].item():.3f}")


HANGUL_FONTS = ("Noto Sans CJK KR", "Noto Sans KR", "NanumGothic", "NanumBarunGothic", "Baekmuk Gulim",
                "Baekmuk Dotum", "UnDotum", "Malgun Gothic", "Apple SD Gothic Neo", "AppleGothic")


def has_hangul(text):
    return any("\uac00" <= c <= "\ud7a3" or "\u1100" <= c <= "\u11ff" or "\u3130" <= c <= "\u318f" for c in text)


def font_with_hangul():
    """The family name of an installed font that draws Hangul (a known Korean font first), or None.
    matplotlib's default, DejaVu Sans, has none: Korean text would be boxes."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    fonts = sorted(font_manager.fontManager.ttflist, key=lambda f: f.name not in HANGUL_FONTS)
    for font in fonts:
        if font.name.startswith("Last Resort"):  # matplotlib's: a placeholder box for every character
            continue
        try:
            if ord("\ud55c") in FT2Font(font.fname).get_charmap():  # 한
                return font.name
        except (OSError, RuntimeError):  # a font file matplotlib lists but FreeType cannot read
            continue
    return None


def plot_attention(weights, labels, layers, heads, path):
    """Heatmaps of weights (n_layer, n_head, T, T), a grid of `layers` x `heads`, into `path`.
    Rows are the tokens attending (queries), columns the tokens attended to (keys)."""
    plt = pyplot()
    family = plt.rcParams["font.family"]
    if any(has_hangul(label) for label in labels):
        font = font_with_hangul()
        if font:
            family = [font, *family]  # matplotlib falls back glyph by glyph along the list
        else:
            print("notice: no installed font has Hangul (install fonts-noto-cjk or fonts-nanum); Korean "
                  "tokens are drawn as boxes", file=sys.stderr)
    T = len(labels)
    single = len(layers) == len(heads) == 1
    size = min(max(0.22 * T + 1.5, 3.0), 14.0 if single else 5.0)  # inches per map
    ticks = range(0, T, math.ceil(T / (10 * size)))  # at most 10 labels per inch: every k-th token
    font_size = min(0.7 * 72 * size / len(ticks), 10.0)  # points: the labels fit beside each other
    upper = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)  # the future: masked, drawn blank
    with warnings.catch_warnings(), plt.rc_context({"font.family": family}):
        warnings.filterwarnings("ignore", message="Glyph .* missing from")  # said once above
        fig, axes = plt.subplots(len(layers), len(heads), figsize=(len(heads) * size + 1.5, len(layers) * size),
                                 sharex=True, sharey=True, squeeze=False, layout="constrained")
        for r, layer in enumerate(layers):
            for c, head in enumerate(heads):
                ax = axes[r][c]
                image = ax.imshow(weights[layer, head].masked_fill(upper, float("nan")).numpy(),
                                  vmin=0.0, vmax=1.0, cmap="viridis")
                ax.set_title(f"layer {layer} head {head}", fontsize=10 if single else 8)
                ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=font_size)
                ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=font_size)
        fig.colorbar(image, ax=axes, shrink=0.8 if single else 0.5, label="attention weight")
        fig.supxlabel("attended to (key)")
        fig.supylabel("attending token (query)")
        save_figure(fig, path)


def windows(n, block_size, stride):
    """(begin, end, first scored) of the windows that score tokens 1..n-1 exactly once.

    Window j ends at min(block_size + j * stride, n - 1), is block_size inputs long (or starts at
    0), and scores only the targets after the previous window's end.
    """
    out, scored = [], 0
    while scored < n - 1:
        end = min(block_size + len(out) * stride, n - 1)
        out.append((max(0, end - block_size), end, scored))
        scored = end
    return out


@torch.inference_mode()
def evaluate(model, tokens, stride):
    """(mean cross-entropy, accuracy, tokens scored) of the model on a token list, by windows."""
    T = model.config.block_size
    device = next(model.parameters()).device
    data = torch.tensor(tokens, dtype=torch.long)
    spans = windows(len(tokens), T, stride)
    L = spans[0][1] - spans[0][0]  # every window has this length: min(T, n - 1)
    # Logits are (B, L, vocab) floats: keep a batch's to ~256 MB.
    batch_size = max(1, min(64, 2**26 // (L * model.config.vocab_size)))
    loss_sum, correct, count = 0.0, 0, 0
    for b in range(0, len(spans), batch_size):
        x = torch.stack([data[begin:end] for begin, end, _ in spans[b:b + batch_size]])
        y = torch.stack([data[begin + 1:end + 1] for begin, end, _ in spans[b:b + batch_size]])
        for row, (begin, _, scored) in enumerate(spans[b:b + batch_size]):
            y[row, :scored - begin] = -1  # already scored by the previous window
        x, y = x.to(device), y.to(device)
        logits, _ = model(x, y)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1),
                                    ignore_index=-1, reduction="sum").item()
        correct += ((logits.argmax(-1) == y) & (y != -1)).sum().item()
        count += (y != -1).sum().item()
    return loss_sum / count, correct / count, count


def run_eval(model, tokens, path, stride):
    loss, acc, count = evaluate(model, tokens, stride)
    print(f"eval {path}: {count} tokens scored ({len(tokens)} tokens; windows of "
          f"{model.config.block_size}, stride {stride})")
    print(f"loss {loss:.6f} nats/token ({loss / math.log(2):.4f} bits), "
          f"perplexity {math.exp(min(loss, 700)):.4f}, accuracy {acc:.4f}")


def benchmark(model, device, runs=5, compile=False):
    """Median prefill and decode tokens/s for one sequence: half a block of prompt, then the rest
    (`compile`: decode steps compiled, in the untimed first run)."""
    T = model.config.block_size
    P = max(1, T // 2)
    N = max(2, T - P)
    generator = make_generator(device, 0)
    idx = torch.randint(model.config.vocab_size, (1, P), generator=generator, device=device)
    prefill, decode = [], []
    for i in range(runs + 1):  # the first run warms up allocators and kernels
        sync(device)
        t0 = time.perf_counter()
        steps = generate_stream(model, idx, N, generator=generator, compile=compile)
        next(steps)
        sync(device)
        t1 = time.perf_counter()
        for _ in steps:
            pass
        sync(device)
        t2 = time.perf_counter()
        if i:
            prefill.append(P / (t1 - t0))
            decode.append((N - 1) / (t2 - t1))
    print(f"benchmark on {device}: batch 1, {P} prompt tokens then {N} new tokens, median of {runs} runs")
    print(f"prefill {statistics.median(prefill):,.0f} tokens/s")
    print(f"decode {statistics.median(decode):,.0f} tokens/s "
          f"({1000 / statistics.median(decode):.2f} ms/token)")


def main():
    args = parse_args(sys.argv[1:])
    text = user_text(args)
    model, tokenizer, device, ctx, loaded = load(args)
    # Check the user's input before printing anything: a mistake is then the only line on stderr.
    ids = tokenizer.encode(text) if text else []
    if args.mode == "generate" and not ids:
        ids = start_ids(tokenizer)
    T = model.config.block_size
    stride = args.stride or T
    if args.mode == "eval" and stride > T:
        raise UserError(f"--stride {stride} is larger than block_size {T}: tokens would be skipped")
    if args.mode == "eval" and len(ids) < 2:
        raise UserError(f"{args.eval} holds {len(ids)} token(s); evaluation needs at least 2")
    if args.system is not None and not tokenizer.is_chat:
        raise UserError("--system needs a chat-tuned model (prepare.py --format chat, then train.py); this "
                        "model's tokenizer has no chat markers")
    if args.mode == "attention":
        check_attention_args(model, args, ids)
    if args.compile:
        check_compile(device)
    print(loaded, file=sys.stderr)
    with ctx:
        if args.mode == "chat":
            chat(model, tokenizer, args)
        elif args.mode == "analyze":
            analyze(model, tokenizer, ids, args.top_k)
        elif args.mode == "eval":
            run_eval(model, ids, args.eval, stride)
        elif args.mode == "benchmark":
            benchmark(model, device, compile=args.compile)
        elif args.mode == "attention":
            show_attention(model, tokenizer, ids, args)
        else:
            sample(model, tokenizer, args, text, ids)


if __name__ == "__main__":
    run_main(main)
