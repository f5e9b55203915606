"""GPT-2 in one file: the model, its optimizer groups, weight and checkpoint I/O, and an inference engine.

Design choices:
- GPT-2 exactly: learned absolute position embeddings, pre-LayerNorm blocks, a 4x MLP with
  tanh-approximated GELU, final LayerNorm, LM head tied to the token embedding. nanoGPT's (and so
  Hugging Face's) parameter names, so GPT-2 weights map by name.
- Attention is torch's scaled_dot_product_attention with is_causal=True: no mask tensors in training
  (in fp32 when training in bf16 on a CPU at short sequences: `attention` says why).
- With targets, forward computes logits at every position (training); without, only at the last one.
- Dropout is functional (F.dropout with config.dropout), not nn.Dropout modules: at inference a
  module call that does nothing still costs Python time, 25 times per generated token.
- model.grad_checkpoint (activation checkpointing, off by default; train.py's setting) keeps only
  each Block's input during a training forward and recomputes the rest in the backward: less memory
  for a second forward of the blocks. Not part of GPTConfig: it changes memory, never results.
- Inference is beside the model, not inside it: one optional `kv_cache` argument to forward, one
  branch inside attention. The cache is preallocated keys/values plus a position. Sampling is one
  function on (B, V) logits; generation and beam search are plain loops around the model and it.
- Past block_size the context window slides and is re-prefilled: with absolute positions a cached
  key belongs to one position in one window, so reuse would change the result.
- Decoding one token reads every weight once, so on a CPU it runs at memory speed; quantize_int8
  swaps the matmul weights for int8 rows with bf16 scales (a quarter of fp32's bytes) for that;
  store_linear_weights_transposed lays fp32 weights out as a CPU's matrix-vector kernel reads fastest.
- Weight files are safetensors, or torch.load(weights_only=True); a file that needs pickle is refused.
- attention_weights recomputes each head's softmax(q kᵀ/√hs) from hooked q and k, for inspection
  only: SDPA, which training and inference use, never materialises them.
"""
import contextlib
import json
import math
import pickle  # only for the UnpicklingError of torch.load(weights_only=True)
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

from common import UserError, atomic_write


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context (GPT-2's n_positions)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64: faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in the Linear and LayerNorm layers, as GPT-2 has

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")


def attention(q, k, v, mask, is_causal, dropout_p):
    """scaled_dot_product_attention, with one CPU exception. Training in bf16 on short sequences
    (<= 128 keys), PyTorch's CPU flash-attention backward is slower in bf16 than in fp32 (bf16
    wins from T = 256), so there attention alone runs in fp32 and the matmuls around it keep
    bf16's speed (`python bench.py train --shapes baby` measures such a step)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad and k.size(-2) <= 128:
        with torch.autocast("cpu", enabled=False):  # autocast would cast q, k, v back to bf16
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
            )
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


def split_heads(qkv, n_head):
    """c_attn's output (B, T, 3C) -> q, k, v, each (B, nh, T, hs): views only, no copy."""
    B, T, C3 = qkv.shape
    return qkv.view(B, T, 3, n_head, C3 // (3 * n_head)).permute(2, 0, 3, 1, 4).unbind(0)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx  # which layer's slot of a KVCache this attention uses
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()
        q, k, v = split_heads(self.c_attn(x), self.n_head)  # each (B, nh, T, hs)
        is_causal, mask = True, None
        if kv_cache is not None:
            pos = kv_cache.pos  # tokens already cached before these T
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, pos + T, hs)
            if pos > 0:
                # SDPA's is_causal aligns the mask top-left, wrong when there are fewer queries
                # than keys. One new token sees everything; several see the cache and their past.
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
        y = attention(q, k, v, mask, is_causal, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU ("gelu_new" in Hugging Face)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x):
        return F.dropout(self.c_proj(self.gelu(self.c_fc(x))), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)  # pre-LN: normalise the branch input, not the sum
        x = x + self.mlp(self.ln_2(x))
        return x


# Hugging Face stores these as Conv1D weights, (in, out): the transpose of nn.Linear's (out, in).
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: one matrix embeds tokens and scores them (GPT-2 does; saves 38M params at 124M).
        self.lm_head.weight = self.transformer.wte.weight
        self.grad_checkpoint = False  # recompute each Block in the backward (see the docstring above)
        self.apply(self._init_weights)
        # GPT-2: scale the projections into the residual stream by 1/sqrt(number of residual adds),
        # so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, kv_cache=None):
        B, T = idx.size()
        pos = 0 if kv_cache is None else kv_cache.pos
        if pos + T > self.config.block_size:
            raise ValueError(
                f"sequence of {pos + T} tokens is longer than block_size {self.config.block_size}; "
                f"crop the context to its last {self.config.block_size} tokens"
            )
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe.weight[pos:pos + T]  # (T, C): positions within the window
        x = F.dropout(tok_emb + pos_emb, self.config.dropout, self.training)
        recompute = self.grad_checkpoint and kv_cache is None and torch.is_grad_enabled()
        for block in self.transformer.h:
            if recompute:  # the backward reruns the block on its saved input, with the same dropout masks
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.pos += T
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None  # (B, 1, V): generation needs only the next token
        logits = self.lm_head(x)  # (B, T, V)
        # The mean over the targets that are not -1 (chat data masks all but the replies); a batch
        # with none gives 0, not the 0/0 = nan of reduction="mean".
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction="sum") / (targets != -1).sum().clamp(min=1)
        return logits, loss

    @torch.no_grad()
    def grow_vocab(self, vocab_size):
        """Add rows to the tied embedding / LM head up to vocab_size (new special tokens such as
        the chat markers), each the mean of the existing rows: a new token enters as an average
        input and gets an average logit, where a random row could start it far too likely or not
        at all (Hewitt, "Initializing New Word Embeddings for Pretrained Language Models")."""
        old = self.transformer.wte.weight  # (V, C)
        V, C = old.shape
        if vocab_size <= V:
            return
        wte = nn.Embedding(vocab_size, C, device=old.device, dtype=old.dtype)
        wte.weight[:V] = old
        wte.weight[V:] = old.mean(dim=0)
        self.transformer.wte = wte
        self.lm_head = nn.Linear(C, vocab_size, bias=False, device=old.device, dtype=old.dtype)
        self.lm_head.weight = wte.weight  # tied again
        self.config.vocab_size = vocab_size

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on the matmul weights and embeddings (>= 2-D), none on biases and
        LayerNorm gains (1-D): decaying those only pulls the activations' scale toward zero."""
        params = [p for p in self.parameters() if p.requires_grad]  # the tied matrix appears once
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # Fused AdamW updates every tensor in one kernel: on CUDA, and on CPU since torch 2.4, where
        # it is several times faster than foreach with the same numbers to 1 ulp (BENCHMARKS.md).
        cpu_fused = tuple(int(n) for n in torch.__version__.split(".")[:2]) >= (2, 4)
        fused = device_type == "cuda" or (device_type == "cpu" and cpu_fused)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None)

    def num_params(self, non_embedding=True):
        """Parameter count. non_embedding leaves out the position embeddings; the token embeddings
        stay in, because they are the LM head's weights too."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self):
        """Training FLOPs (forward + backward) per token at T = block_size, for MFU: 6 per weight
        (2 forward, 4 backward) plus attention's scores and weighted sum, 12·n_layer·T·n_embd
        (PaLM paper, appendix B; as nanoGPT's estimate_mfu)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd

    def save_pretrained(self, save_dir):
        """Write a Hugging Face GPT-2 directory (config.json + weights) that
        transformers.GPT2LMHeadModel.from_pretrained loads as the same function."""
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        state = {}
        for name, t in self.state_dict().items():
            if name == "lm_head.weight":
                continue  # tied to wte; transformers re-ties it on load
            state[name] = (t.t() if name.endswith(HF_CONV1D) else t).detach().cpu().contiguous()
        # HF's GPT-2 always has biases; zero biases make a bias=False model the same function there.
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is None and name != "lm_head":
                state[f"{name}.bias"] = torch.zeros(m.weight.shape[0], dtype=m.weight.dtype)
        try:
            from safetensors.torch import save_file
        except ImportError:
            save_file = None
        if save_file is not None:
            meta = {"format": "pt"}  # transformers' loader checks it
            atomic_write(save_dir / "model.safetensors", lambda tmp: save_file(state, tmp, metadata=meta))
        else:
            atomic_write(save_dir / "pytorch_model.bin", lambda tmp: torch.save(state, tmp))
        text = json.dumps(hf_config(self.config), indent=2) + "\n"
        atomic_write(save_dir / "config.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    @classmethod
    def from_pretrained(cls, model_dir, dropout=0.0):
        """Load a Hugging Face GPT-2: a local directory, or a Hub model id (gpt2, gpt2-xl, OWNER/NAME)
        fetched by hub_model_dir. A local directory wins over a Hub id of the same name."""
        model_dir = hub_model_dir(str(model_dir)) if is_hub_model_id(model_dir) else Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{model_dir}: no config.json here; expected a Hugging Face GPT-2 directory")
        config = config_from_hf(json.loads(config_path.read_text(encoding="utf-8")), dropout, model_dir)
        model = cls(config)
        model.load_state_dict(state_from_hf(load_hf_weights(model_dir), model, model_dir))
        return model


GPT2_MODEL_IDS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's, on the Hub without an owner


def is_hub_model_id(name) -> bool:
    """A Hugging Face model id rather than a path: GPT-2's own names, or OWNER/NAME, when no such path
    exists (a local folder of the same name wins), OWNER is no local folder (out-small/best is a
    mistyped path) and it does not name a checkpoint file."""
    name = str(name)
    owner, _, repo = name.partition("/")
    if Path(name).exists() or (repo and Path(owner).exists()) or name.endswith((".pt", ".bin", ".safetensors", "/")):
        return False
    word = re.compile(r"[A-Za-z0-9][\w.-]*")
    return name in GPT2_MODEL_IDS or bool(repo and word.fullmatch(owner) and word.fullmatch(repo))


def hub_model_dir(repo: str) -> Path:
    """The local folder of Hub model `repo` with its config.json and weights only (model.safetensors,
    else pytorch_model.bin), fetched by huggingface_hub into its cache on first use; offline
    (HF_HUB_OFFLINE=1) read from the cache. config.json comes first: a model of another
    architecture is refused before its weights are downloaded."""
    try:
        import huggingface_hub as hub  # only when a Hub id is asked for: no network at import
    except ImportError:
        raise ValueError(f"{repo} is a Hugging Face model id; loading it needs: pip install huggingface_hub") from None
    try:
        config = json.loads(Path(hub.hf_hub_download(repo, "config.json")).read_text(encoding="utf-8"))
        if config.get("model_type") != "gpt2":
            raise ValueError(f"model_type is {config.get('model_type')!r}, this loads only 'gpt2'")
        for weights in ("model.safetensors", "pytorch_model.bin"):
            folder = Path(hub.snapshot_download(repo, allow_patterns=["config.json", weights]))
            if (folder / weights).is_file():
                return folder
        raise ValueError("the repository has neither model.safetensors nor pytorch_model.bin")
    except ValueError as e:
        raise ValueError(f"{repo}: {e}") from None
    except Exception as e:  # the Hub's HTTP errors, a missing cache entry offline, the network library's own
        first = (str(e) or type(e).__name__).splitlines()[0]
        raise ValueError(f"{repo}: no such file or folder, and not on the Hugging Face Hub ({first})") from None


def hf_config(config):
    """GPTConfig -> the config.json of a Hugging Face GPT-2 model."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,  # older name of n_positions, still read by some tools
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        # The tokenizer, not the model, knows the end-of-text id (GPT-2's is 50256; a char vocab has none).
        "bos_token_id": None,
        "eos_token_id": None,
    }


def config_from_hf(hf, dropout, model_dir):
    """A Hugging Face GPT-2 config.json (dict) -> GPTConfig; anything this model cannot be is an error."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{model_dir}: model_type is {hf.get('model_type')!r}, this loads only 'gpt2'")
    absent = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions") if k not in hf]
    if absent == ["n_positions"] and "n_ctx" in hf:
        absent = []  # older configs name the context length n_ctx
    if absent:
        raise ValueError(f"{model_dir}: config.json lacks {absent}")
    n_embd = hf["n_embd"]
    required = {  # field: (value when absent, the values GPT-2 as built here can have)
        "activation_function": ("gelu_new", {"gelu_new", "gelu_pytorch_tanh"}),
        "layer_norm_epsilon": (1e-5, {1e-5}),
        "n_inner": (None, {None, 4 * n_embd}),
        "scale_attn_weights": (True, {True}),
        "scale_attn_by_inverse_layer_idx": (False, {False}),
        "add_cross_attention": (False, {False}),
        "tie_word_embeddings": (True, {True}),
    }
    for field, (default, allowed) in required.items():
        if hf.get(field, default) not in allowed:
            raise ValueError(f"{model_dir}: config.json has {field}={hf[field]!r}; "
                             f"this GPT-2 supports {sorted(map(str, allowed))}")
    return GPTConfig(
        block_size=hf.get("n_positions", hf.get("n_ctx")), vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd, dropout=dropout, bias=True,
    )


def load_hf_weights(model_dir):
    """The tensors of model.safetensors, else of pytorch_model.bin (plain tensors only, no pickle)."""
    st_path, bin_path = model_dir / "model.safetensors", model_dir / "pytorch_model.bin"
    if st_path.is_file():
        try:
            from safetensors.torch import load_file  # only when the file needs it
        except ImportError:
            raise ValueError(f"{st_path} needs the safetensors package: pip install safetensors") from None
        return load_file(st_path)
    if not bin_path.is_file():
        raise ValueError(f"{model_dir}: neither model.safetensors nor pytorch_model.bin is there")
    try:
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{bin_path} needs pickle to load, and unpickling can run code: refused. "
            f"Only files of plain tensors load (convert it to model.safetensors where you trust it)"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{bin_path} is not a dict of tensors (name -> weight)")
    return state


def state_from_hf(hf_state, model, model_dir):
    """Hugging Face GPT-2 tensors -> our state_dict: add the `transformer.` prefix if the file lacks
    it, drop the old causal-mask buffers, transpose Conv1D weights, tie the LM head."""
    state = {}
    for key, t in hf_state.items():
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # masks (not weights) in older files; the head is wte (tie_word_embeddings)
        state[name] = t.t() if name.endswith(HF_CONV1D) else t
    expected = {name: t.shape for name, t in model.state_dict().items() if name != "lm_head.weight"}
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"{model_dir}: the weights do not match config.json; "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise ValueError(f"{model_dir}: {name} has shape {tuple(state[name].shape)}, "
                             f"config.json implies {tuple(shape)}")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


# ----------------------------------------------------------------------------------------------
# Checkpoints of this project: the weights, their shape (model_args), the tokenizer, and for a
# training run everything needed to resume it.

def save_checkpoint(obj, path):
    """torch.save, atomically: a kill at any instant leaves the old checkpoint or the new one."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path, device="cpu", mmap=False):
    """Load a checkpoint written by save_checkpoint; never unpickles arbitrary objects. mmap=True
    reads tensors only when touched (for a checkpoint's settings without its weights)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its end is read first
        raise UserError(f"cannot read checkpoint {path}: not a torch.save archive (truncated, or another kind of file)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError on bad files
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"{path} contains pickled Python objects; refusing to load it "
                            "(only tensors, numbers, strings, lists and dicts are allowed)") from None
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (no 'model' / 'model_args')")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu", dropout=0.0):
    """Build the GPT a checkpoint describes and load its weights."""
    try:
        model = GPT(GPTConfig(**{**ckpt["model_args"], "dropout": dropout}))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:  # unknown field, size mismatch, missing key
        raise UserError(f"checkpoint's weights do not match its model_args: {str(e).splitlines()[0]}") from None
    return model.to(device)


# ----------------------------------------------------------------------------------------------
# Inference engine: KV cache, sampling, generation, beam search

class KVCache:
    """Keys and values of every layer for the tokens seen so far, and the position after them.

    k, v: (n_layer, B, n_head, max_len, head_size), allocated once at the first write (in the
    dtype attention runs in, so autocast works); slots [:pos] hold the current window.
    """

    def __init__(self, n_layer, max_len):
        self.n_layer, self.max_len = n_layer, max_len
        self.k = self.v = None
        self.pos = 0

    def update(self, layer, k, v):
        """Store one layer's new (B, nh, T, hs) keys/values at pos; return the layer's (B, nh, pos+T, hs)."""
        B, nh, T, hs = k.shape
        if self.k is None:
            self.k = k.new_empty(self.n_layer, B, nh, self.max_len, hs)  # slots past pos are never read
            self.v = v.new_empty(self.n_layer, B, nh, self.max_len, hs)
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.pos} + {T} do not fit")
        # narrow + copy_ rather than k[layer, :, :, pos:end] = ...: the same views without Python's
        # slice-tuple indexing, which costs more than the copy (`python bench.py decode` measures it)
        k_all, v_all = self.k[layer], self.v[layer]
        k_all.narrow(2, self.pos, T).copy_(k)
        v_all.narrow(2, self.pos, T).copy_(v)
        return k_all.narrow(2, 0, self.pos + T), v_all.narrow(2, 0, self.pos + T)

    def reorder(self, rows):
        """Keep batch rows `rows` (beam search: each new beam continues some old beam)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]


class Int8Linear(nn.Module):
    """A Linear for decoding with int8 weights and one bf16 scale per output row (weight-only
    quantisation). Decoding one token reads every weight once, so on a CPU a large model decodes
    at the speed of memory, and a quarter of fp32's bytes is faster (`python bench.py decode
    --int8` measures it; a tiny model, bound by overheads, decodes slower). torch's int8 kernel
    wants bf16 activations, so a quantised model runs in bf16."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float().contiguous()  # (out, in) rows, whatever its memory layout
        # (out,): the row's largest |w| maps to 127; rounded to bf16 first, so that the int8 values
        # are chosen for the scale the kernel will multiply by
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
        self.register_buffer("weight", torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x):
        y = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)), self.weight, self.scale)  # (B*T, out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)


@torch.no_grad()
def quantize_int8(model):
    """Inference only, in place: every block's Linear and the LM head become Int8Linear, the rest
    bf16. The head gets its own int8 copy of the tied embedding; wte stays for the lookup."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        raise RuntimeError("int8 decoding needs torch >= 2.4 (torch._weight_int8pack_mm)")
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    model.lm_head = Int8Linear(model.lm_head)
    return model.to(torch.bfloat16).eval()


@torch.no_grad()
def store_linear_weights_transposed(model):
    """Inference on a CPU, in place: keep every Linear weight in memory as (in, out), Hugging Face's
    Conv1D layout, seen through a transposed view, so shapes, names and values do not change.
    Decoding one token multiplies a vector by each weight; MKL streams x @ W from a row-major
    (in, out) matrix faster than from nn.Linear's (out, in) one (BENCHMARKS.md, Decoding). The
    tied embedding follows the head; a lookup then gathers a strided row.
    Not for training: fused AdamW and DDP expect contiguous parameters."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.data = m.weight.data.t().contiguous().t()  # .data keeps the parameter (and its tie)
    return model


def next_logits(model, tokens, n, kv_cache):
    """(B, V) logits for the token after tokens[:, :n], feeding the model only what the cache lacks.

    An empty cache is prefilled with the last block_size tokens in one forward; then each call
    feeds the one newest token. When the cache is full (the context would pass block_size), the
    window slides: its last block_size-1 tokens plus the new one are re-prefilled, so every step
    past block_size costs one full forward but gives exactly the logits of cropping the context.
    """
    block_size = model.config.block_size
    if kv_cache.pos in (0, block_size):
        kv_cache.pos = 0
        window = tokens[:, max(0, n - block_size):n]
    else:
        window = tokens[:, n - 1:n]
    logits, _ = model(window, kv_cache=kv_cache)
    return logits[:, -1, :]


def sample_next_token(logits, *, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                      seen=None, frequency_penalty=0.0, presence_penalty=0.0, generated=None, generator=None):
    """Choose one next token per row of (B, V) logits; returns (B,) token ids.

    In order: repetition penalty on the tokens in `seen` (CTRL: a positive logit is divided by the
    penalty, a negative one multiplied, so either way the token gets less likely); OpenAI's additive
    penalties on the tokens in `generated` (B, S), the completion so far: a token generated c times
    loses c * frequency_penalty + (c > 0) * presence_penalty from its logit; temperature
    (0 = argmax, nothing else random); top-k; top-p (nucleus: the fewest most-likely tokens whose
    probability reaches top_p; the most likely always survives); a draw with `generator`.
    Ties: a token with the same logit as the k-th largest is kept too (so top-k may keep more than
    k), and likewise at the top-p boundary: the result never depends on how equal values sort.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        scores = logits.gather(1, seen)  # (B, S): logits of the tokens already in the context
        scores = torch.where(scores > 0, scores / repetition_penalty, scores * repetition_penalty)
        logits = logits.scatter(1, seen, scores)
    if (frequency_penalty or presence_penalty) and generated is not None and generated.size(1):
        counts = torch.zeros_like(logits).scatter_add_(1, generated, torch.ones_like(generated, dtype=logits.dtype))
        logits = logits - counts * frequency_penalty - (counts > 0) * presence_penalty
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs = F.softmax(logits, dim=-1)
        sorted_probs = probs.sort(dim=-1, descending=True).values
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of all likelier tokens
        n_keep = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)
        smallest_kept = sorted_probs.gather(-1, n_keep - 1)  # (B, 1)
        logits = logits.masked_fill(probs < smallest_kept, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@contextlib.contextmanager
def _eval_mode(model):
    """Dropout off while generating (say, mid-training samples), and the mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.inference_mode()
def generate_stream(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None,
                    repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, stop_tokens=(),
                    generator=None):
    """Continue each row of idx (B, T); yield the (B,) new tokens step by step.

    Ends after max_new_tokens, or earlier once every row has produced a stop token; a row that
    has stopped keeps yielding its stop token. Prompts longer than block_size keep their end.
    """
    B, T = idx.shape
    if T == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. end-of-text)")
    # The whole context, filled as tokens come. It starts with room for one block of new tokens and
    # doubles when full: a huge max_new_tokens (a user's "until a stop token") allocates nothing.
    tokens = idx.new_empty(B, T + min(max_new_tokens, model.config.block_size))
    tokens[:, :T] = idx
    kv_cache = KVCache(model.config.n_layer, min(model.config.block_size, T + max_new_tokens))
    stop = torch.tensor(list(stop_tokens), dtype=idx.dtype, device=idx.device)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    with _eval_mode(model):
        for n in range(T, T + max_new_tokens):
            if n == tokens.size(1):
                tokens = torch.cat([tokens, torch.empty_like(tokens)], dim=1)
            logits = next_logits(model, tokens, n, kv_cache)
            token = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                      repetition_penalty=repetition_penalty, seen=tokens[:, :n],
                                      frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                                      generated=tokens[:, T:n], generator=generator)
            if len(stop_tokens):
                token = torch.where(done, tokens[:, n - 1], token)  # a stopped row repeats its stop token
                done |= torch.isin(token, stop)
            tokens[:, n] = token
            yield token
            if len(stop_tokens) and done.all():  # the one host sync per step, only with stop tokens
                return


def generate(model, idx, max_new_tokens, **kwargs):
    """generate_stream collected: the new tokens of each row, each cut before its first stop token."""
    steps = list(generate_stream(model, idx, max_new_tokens, **kwargs))
    if not steps:
        return [[] for _ in range(idx.size(0))]
    stop = set(kwargs.get("stop_tokens", ()))
    rows = torch.stack(steps, dim=1).tolist()  # (B, steps)
    return [next((row[:i] for i, t in enumerate(row) if t in stop), row) for row in rows]


@torch.inference_mode()
def beam_search(model, idx, max_new_tokens, num_beams, *, stop_tokens=(), length_penalty=1.0):
    """Beam search's best continuation of one prompt idx (1, T): its new tokens, stop token excluded.

    A hypothesis scores sum(log-probs of its new tokens) / (number of new tokens) ** length_penalty;
    a stop token counts as a token (ending has a probability too). Each step keeps the num_beams
    best running hypotheses; one that ends in a stop token is set aside as finished. The search
    ends at max_new_tokens, or once num_beams hypotheses are finished and no running one scores
    better than the worst of them so far. No randomness: the same input gives the same output.
    """
    if idx.size(0) != 1 or idx.size(1) == 0 or num_beams < 1:
        raise ValueError(f"beam_search takes one non-empty prompt (1, T) and num_beams >= 1; "
                         f"got {tuple(idx.shape)} and {num_beams}")
    T = idx.size(1)
    stop = set(stop_tokens)
    tokens = idx.repeat(num_beams, 1)  # (beams, n): every beam starts as the prompt ...
    scores = torch.full((num_beams,), float("-inf"), device=idx.device)
    scores[0] = 0.0  # ... but only beam 0 is live, so the first step does not pick duplicates
    kv_cache = KVCache(model.config.n_layer, min(model.config.block_size, T + max_new_tokens))
    finished = []  # (score, new tokens without the stop token)
    with _eval_mode(model):
        for n in range(T, T + max_new_tokens):
            logprobs = F.log_softmax(next_logits(model, tokens, n, kv_cache).float(), dim=-1)  # (beams, V)
            V = logprobs.size(-1)
            totals = (scores[:, None] + logprobs).view(-1)
            # Enough candidates that num_beams survive even if every beam's best ones are stop tokens.
            top, flat = totals.topk(min(num_beams * (1 + len(stop)), totals.numel()))
            length_norm = (n + 1 - T) ** length_penalty
            rows, new_tokens, new_scores = [], [], []
            for total, i in zip(top.tolist(), flat.tolist()):
                row, token = divmod(i, V)
                if token in stop:
                    if total > float("-inf"):
                        finished.append((total / length_norm, tokens[row, T:n].tolist()))
                elif len(rows) < num_beams:
                    rows.append(row)
                    new_tokens.append(token)
                    new_scores.append(total)
            rows = torch.tensor(rows, device=idx.device)
            # Each step copies the kept beams anyway, so they grow by one column as they go: nothing
            # is allocated for max_new_tokens up front (a huge one means "until a stop token").
            tokens = torch.cat([tokens[rows], torch.tensor(new_tokens, device=idx.device)[:, None]], dim=1)
            scores = torch.tensor(new_scores, device=idx.device)
            kv_cache.reorder(rows)
            if len(finished) >= num_beams:
                worst_kept = sorted(s for s, _ in finished)[-num_beams]
                if scores.max().item() / length_norm < worst_kept:
                    break
        else:
            length_norm = max(max_new_tokens, 1) ** length_penalty
            finished += [(s / length_norm, tokens[i, T:].tolist()) for i, s in enumerate(scores.tolist())]
    if not finished:
        return []
    return max(finished, key=lambda f: f[0])[1]  # max keeps the first of equal scores: deterministic


# ----------------------------------------------------------------------------------------------
# Looking inside: attention weights

@torch.no_grad()
def attention_weights(model, idx):
    """Every head's attention weights over one sequence idx (1, T): (n_layer, n_head, T, T) fp32,
    row i the distribution of token i's attention over tokens 0..i.

    SDPA never materialises these weights, so they are recomputed here from the model's own q and
    k: a forward hook keeps each layer's c_attn output, and softmax(q kᵀ / √hs + causal mask) is
    taken explicitly. The model's forward stays as it is (the hooks are removed afterwards);
    weights @ v equals SDPA's output of the layer (tests/test_inspect.py).
    """
    if idx.dim() != 2 or idx.size(0) != 1:
        raise ValueError(f"attention_weights takes one sequence (1, T), got {tuple(idx.shape)}")
    outputs = []  # each layer's c_attn output, (1, T, 3C), in layer order
    hooks = [block.attn.c_attn.register_forward_hook(lambda module, args, out: outputs.append(out))
             for block in model.transformer.h]
    try:
        with _eval_mode(model):
            model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    T = idx.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    maps = []
    for qkv in outputs:
        q, k, _ = split_heads(qkv.float(), model.config.n_head)  # (1, nh, T, hs)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (1, nh, T, T)
        maps.append(scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)[0])
    return torch.stack(maps)
