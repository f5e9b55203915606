"""Muon for the Blocks' weight matrices, AdamW for the rest, as one optimizer.

Muon (K. Jordan et al., https://kellerjordan.github.io/posts/muon/) keeps SGD's Nesterov momentum
and replaces each matrix's update by the nearest semi-orthogonal matrix, found by five
Newton-Schulz iterations: every direction of the update moves the weights by about as much, so the
rare directions the raw gradient barely touches learn as fast as the common ones. It suits the 2-D
hidden matrices (attention's c_attn and c_proj, the MLP's c_fc and c_proj); the embeddings (wte,
tied to the head, and wpe), biases and LayerNorm gains stay with AdamW, so the model is GPT-2's.

- Muon's arithmetic is torch.optim.Muon's (torch >= 2.9): the same Newton-Schulz coefficients,
  momentum, decoupled weight decay and LR adjustment, sqrt(max(1, rows / cols)). It differs in two
  ways: the iterations run in `ns_dtype` (torch's always run in bf16, which CPUs without native bf16
  compute several times slower than fp32), and the momentum may warm up from 0.85, as modded-nanogpt's.
- MuonAdamW holds the two and is what the training loop, the GradScaler and the checkpoint see:
  one param_groups list, step(), zero_grad(), state_dict() / load_state_dict().
- Each Muon group carries `lr_scale`, its LR over AdamW's peak LR; the loop sets every group's LR
  to the schedule's LR times its lr_scale (1 where a group has none), so one schedule drives both.
"""
import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # a quintic tuned for the steepest slope at 0 (torch's, Muon's)
NS_STEPS = 5
NS_EPS = 1e-7
MOMENTUM_START = 0.85  # modded-nanogpt's: the momentum warm-up rises from here


def orthogonalize(update, dtype=torch.bfloat16, steps=NS_STEPS):
    """Newton-Schulz iterations that map a matrix U S V^T to about U V^T (its singular values land
    in ~[0.7, 1.2], which trains as well as exactly 1), computed in `dtype`. `update` is one matrix
    or a stack of same-shape ones, each orthogonalized on its own. For one matrix in bf16 these are
    torch.optim.Muon's operations in its order, so both give the same bits."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = update.size(-2) > update.size(-1)
    if tall:  # iterate on the wide form: its Gram matrix x @ x.T is the smaller one
        x = x.mT
    # Frobenius norm >= spectral norm: the singular values start <= 1
    x = x / (x.norm() if x.dim() == 2 else torch.linalg.matrix_norm(x, keepdim=True)).clamp(min=NS_EPS)
    addmm = torch.addmm if x.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        poly = addmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = addmm(x, poly, x, beta=a)  # a x + (b G + c G^2) x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum orthogonalized by Newton-Schulz, for 2-D parameters only.

    lr: the peak LR (0.02 is Muon's usual); weight_decay: decoupled, scaled by lr as AdamW's;
    momentum: Nesterov momentum, reached after momentum_warmup_iters steps that rise linearly from
    MOMENTUM_START (0: from the first step); ns_dtype: the dtype of the Newton-Schulz matmuls
    (bf16 where the hardware has native bf16, float32 elsewhere)."""

    def __init__(self, params, lr=0.02, momentum=0.95, momentum_warmup_iters=0, weight_decay=0.0,
                 nesterov=True, ns_dtype=torch.bfloat16):
        defaults = dict(lr=lr, momentum=momentum, momentum_warmup_iters=momentum_warmup_iters,
                        weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype  # the machine's, not the run's state: a resume elsewhere takes its own
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got one of shape {tuple(p.shape)}")

    @staticmethod
    def momentum_at(group, step):
        """The momentum of a parameter's step number `step` (0 for its first)."""
        warmup = group["momentum_warmup_iters"]
        frac = min(step / warmup, 1.0) if warmup else 1.0
        return (1 - frac) * MOMENTUM_START + frac * group["momentum"]

    def momentum_update(self, group, p):
        """Advance p's momentum buffer by its gradient; the (Nesterov) update to orthogonalize."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        momentum = self.momentum_at(group, state["step"])
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - momentum)  # an average of the gradients; momentum 0.95 ~ the last 20
        state["step"] += 1
        return p.grad.lerp(buf, momentum) if group["nesterov"] else buf

    @staticmethod
    def apply_update(group, p, update):
        """Decoupled weight decay, then the orthogonalized update at the group's LR."""
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        # a tall matrix's update has unit singular values over fewer rows per column: scale it up
        p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = [self.momentum_update(group, p) for p in params]
            # one batched Newton-Schulz per shape: fewer, larger matmuls (BENCHMARKS.md, "Muon's
            # cost per step"); a batched matmul may round differently from one matrix's, so a
            # matrix alone in its shape takes torch.optim.Muon's own operations
            by_shape = {}
            for p, update in zip(params, updates):
                by_shape.setdefault(update.shape, []).append((p, update))
            for pairs in by_shape.values():
                if len(pairs) == 1:
                    stack = orthogonalize(pairs[0][1], self.ns_dtype)[None]
                else:
                    stack = orthogonalize(torch.stack([update for _, update in pairs]), self.ns_dtype)
                for (p, _), update in zip(pairs, stack):
                    self.apply_update(group, p, update)
        return loss


class MuonAdamW:
    """A Muon and an AdamW stepped together: param_groups lists AdamW's groups, then Muon's (the
    same dicts, so setting a group's lr reaches its optimizer), and the state is both states."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self):
        return self.adamw.param_groups + self.muon.param_groups

    @property
    def state(self):
        return {**self.adamw.state, **self.muon.state}

    def step(self, closure=None):
        loss = self.adamw.step(closure)
        self.muon.step()
        return loss

    def zero_grad(self, set_to_none=True):
        self.adamw.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)

    def state_dict(self):
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state):
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])
