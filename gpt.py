"""GPT-2 in one file: the model, its optimizer groups, and weight and checkpoint I/O.

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
- Inference is beside the model, not inside it (engine.py): one optional `kv_cache` argument to
  forward, which says where each row's new tokens sit (one position for all rows, or one per row)
  and gives attention the cached keys and values with their mask.
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
from optim import Muon, MuonAdamW


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
    """scaled_dot_product_attention, with two CPU exceptions, both in fp32 where PyTorch's 16-bit
    CPU kernels are slow. Keys from a KV cache in fp32 (engine.KVCache: one query's attention runs
    5-10x faster in fp32 than in bf16 or fp16) take q in fp32 too. Training in bf16 on short
    sequences (<= 128 keys), the flash-attention backward is slower in bf16 than in fp32 (bf16
    wins from T = 256), so there attention alone runs in fp32 and the matmuls around it keep
    bf16's speed (`python bench.py train --shapes baby` measures such a step)."""
    if k.dtype != q.dtype:  # 16-bit queries, cached keys and values in fp32
        # autocast would cast them back to 16 bits; entered only when on (it costs 5 us per layer)
        on = torch.is_autocast_enabled(q.device.type)
        with torch.autocast(q.device.type, enabled=False) if on else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=is_causal)
        return y.to(q.dtype)
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
        if kv_cache is not None:  # keys/values of the cached tokens too, masked to each row's own
            k, v, mask, is_causal = kv_cache.update(self.layer_idx, k, v)  # (B, nh, cached + T, hs)
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

    def forward(self, idx, targets=None, kv_cache=None, all_logits=False):
        B, T = idx.size()
        # Where these T tokens sit: an int when every row continues at one position, else (B, 1).
        start = 0 if kv_cache is None else kv_cache.prepare(T)
        end = (start if isinstance(start, int) else kv_cache.longest) + T
        if end > self.config.block_size:
            raise ValueError(
                f"sequence of {end} tokens is longer than block_size {self.config.block_size}; "
                f"crop the context to its last {self.config.block_size} tokens"
            )
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        if isinstance(start, int):
            pos_emb = self.transformer.wpe.weight[start:start + T]  # (T, C): positions within the window
        else:
            pos_emb = self.transformer.wpe(start + torch.arange(T, device=idx.device))  # (B, T, C): each row's own
        x = F.dropout(tok_emb + pos_emb, self.config.dropout, self.training)
        recompute = self.grad_checkpoint and kv_cache is None and torch.is_grad_enabled()
        for block in self.transformer.h:
            if recompute:  # the backward reruns the block on its saved input, with the same dropout masks
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        if targets is None:  # generation needs only the next token's logits; scoring a prompt, all
            return self.lm_head(x if all_logits else x[:, -1:, :]), None  # (B, T or 1, V)
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

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, muon=None):
        """AdamW with weight decay on the matmul weights and embeddings (>= 2-D), none on biases and
        LayerNorm gains (1-D): decaying those only pulls the activations' scale toward zero.
        muon: optim.Muon's settings (lr, momentum, ...). The Blocks' weight matrices then train with
        Muon, the rest with this AdamW, as one optim.MuonAdamW whose Muon group has lr_scale =
        muon["lr"] / learning_rate (the loop scales each group's LR by it)."""
        params = [p for p in self.parameters() if p.requires_grad]  # the tied matrix appears once
        matrices = [p for p in self.transformer.h.parameters() if p.requires_grad and p.dim() == 2] if muon else []
        params = [p for p in params if all(p is not m for m in matrices)]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # Fused AdamW updates every tensor in one kernel: on CUDA, and on CPU since torch 2.4, where
        # it is several times faster than foreach with the same numbers to 1 ulp (BENCHMARKS.md).
        cpu_fused = tuple(int(n) for n in torch.__version__.split(".")[:2]) >= (2, 4)
        fused = device_type == "cuda" or (device_type == "cpu" and cpu_fused)
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None)
        if not muon:
            return adamw
        muon_groups = [{"params": matrices, "lr_scale": muon["lr"] / learning_rate}]
        return MuonAdamW(Muon(muon_groups, **muon), adamw)

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


def load_checkpoint(path, device="cpu", mmap=True):
    """Load a checkpoint written by save_checkpoint; never unpickles arbitrary objects. mmap=True
    maps the file and reads a tensor only when it is touched: a resume checkpoint's AdamW moments
    (twice the weights) cost nothing until the optimizer takes them, its settings nothing more.
    Leave `device` at the CPU and let model_from_checkpoint move the weights: a GPU there would
    receive every tensor of the file."""
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
    """Build the GPT a checkpoint describes on `device` and copy its weights in (from a checkpoint
    on the CPU: no second copy of the model there)."""
    try:
        with torch.device(device):
            model = GPT(GPTConfig(**{**ckpt["model_args"], "dropout": dropout}))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:  # unknown field, size mismatch, missing key
        raise UserError(f"checkpoint's weights do not match its model_args: {str(e).splitlines()[0]}") from None
    return model


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off while generating or inspecting (say, mid-training), and the mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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
        with eval_mode(model):
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
