"""Where and how each training process computes: its device and precision, and the DDP / FSDP plumbing.

setup_runtime makes every device, precision and process-group decision once, before the loop, into
a Runtime that the loop only reads: the autocast context, the GradScaler (a no-op unless fp16), the
rank. step_model gives the model the steps call: the model itself in one process, wrapped in DDP
under torchrun (each rank a full copy, gradients all-reduced), or, with fsdp, sharded in place by
FSDP2 (a unit per Block, each rank holding a share of the weights, gradients and AdamW state), and
compiled where asked. The checkpoint helpers gather a sharded model's and optimizer's state to rank
0 in one process's format, and spread it back on resume, so a checkpoint resumes with FSDP or
without, on any number of processes.
"""
import math
import os
from dataclasses import dataclass

import torch

from common import UserError, autocast_context, maybe_compile, print0, resolve_device, resolve_dtype, use_tf32


@dataclass
class Runtime:
    """Where and how this process computes: decided once, then only read."""
    rank: int
    local_rank: int
    world_size: int
    device: str
    dtype: torch.dtype
    ctx: object  # autocast, or a no-op in fp32
    scaler: torch.amp.GradScaler  # a no-op unless fp16
    fsdp: bool = False  # the model is sharded over the ranks (shard_model), not copied to each (DDP)
    in_process_group: bool = False  # started by torchrun (one process or more): the group to leave at the end

    @property
    def distributed(self):
        """More than one process (DDP or FSDP): losses, signals and timings are agreed by collectives."""
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0

    @property
    def build_device(self):
        """Where the whole model is built (and a checkpoint read): under FSDP the CPU, since
        shard_model moves only this rank's shards to the device."""
        return "cpu" if self.fsdp else self.device

    @property
    def device_type(self):
        return self.device.split(":")[0]


def setup_distributed(cfg):
    """Join the torchrun process group if there is one; returns (rank, local_rank, world_size, device)."""
    if "RANK" not in os.environ:
        if cfg["fsdp"]:
            raise UserError("fsdp=True shards the model over torchrun's processes: run "
                            "`torchrun --nproc_per_node=N train.py ...`, or pass --fsdp=False for one process")
        return 0, 0, 1, cfg["device"]
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    accum = cfg["gradient_accumulation_steps"]
    if accum % world_size:  # each process runs an equal share of the micro-steps
        raise UserError(f"gradient_accumulation_steps={accum} must be a multiple of the number of "
                        f"processes ({world_size}): pass --gradient_accumulation_steps="
                        f"{math.ceil(accum / world_size) * world_size}")
    device = cfg["device"]
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    backend = cfg["backend"]
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl" and not device.startswith("cuda"):  # NCCL only moves CUDA tensors
        raise UserError(f"backend nccl needs CUDA devices, not {device}; use --backend=gloo")
    torch.distributed.init_process_group(backend=backend)
    return rank, local_rank, world_size, device


def setup_runtime(cfg):
    rank, local_rank, world_size, device = setup_distributed(cfg)
    device = resolve_device(device)
    dtype = resolve_dtype(cfg["dtype"], device)
    if cfg["fsdp"] and dtype == torch.float16:  # GradScaler's skipped steps would have to agree across shards
        if cfg["dtype"] != "auto":
            raise UserError("fsdp trains in bfloat16 or float32, not float16: pass --dtype=bfloat16 (or float32)")
        dtype = torch.float32
        print0(f"dtype auto: {device} has no native bfloat16 and fsdp does not train in float16, so float32")
    if dtype == torch.float32 and cfg["tf32"] and use_tf32(device):
        print0(f"float32 matmuls on {device} run on TF32 tensor cores (--tf32=False: exact float32)")
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=(dtype == torch.float16))
    return Runtime(rank, local_rank, world_size, device, dtype, autocast_context(device, dtype), scaler,
                   fsdp=cfg["fsdp"], in_process_group=torch.distributed.is_initialized())


def step_model(raw_model, cfg, rt, batches):
    """The model the training steps call: in DDP under torchrun, then compiled if cfg says so; with
    fsdp, raw_model itself, sharded in place (so the optimizer is made after this, on the shards)."""
    raw_model.grad_checkpoint = cfg["grad_checkpoint"]
    if rt.fsdp:
        return shard_model(raw_model, cfg, rt)
    model = raw_model
    if rt.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    if cfg["compile"]:
        # DDP first: compiling DDP's module splits its graph at DDP's gradient buckets (dynamo's
        # DDPOptimizer), so each bucket's all-reduce overlaps the backward of the layers before it.
        # A model compiled before DDP wraps it has one backward graph, and every all-reduce after it.
        model = maybe_compile(model, rt.device, rt.ctx, batches.B, batches.T)
    return model


def shard_model(model, cfg, rt):
    """FSDP2, in place. Each Block is a unit: its weights are gathered from all ranks just before its
    forward and again for its backward, and freed after each. The root unit holds the rest: wte with
    lm_head (one tied matrix, so one unit owns both), wpe and ln_f. Where the run computes in bf16,
    the gathered weights are bf16 copies of fp32 shards and gradients are reduced in fp32; autocast
    stays on, so the loss is still computed in fp32. With compile, each Block is compiled before it
    is sharded (FSDP's gathers stay outside the compiled code), lazily: an error compiling stops
    the run at its first step, where maybe_compile would fall back to eager."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(rt.device_type, (rt.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        if cfg["compile"]:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_model_state(model, rt):
    """The model's state_dict as one process holds it, on rank 0 (None elsewhere). Under FSDP every
    rank must call it: the shards are gathered a tensor at a time into rank 0's CPU memory."""
    if not rt.fsdp:
        return model.state_dict() if rt.master else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not rt.master:
        return None
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied: one tensor in the file, as one process saves
    return state


def full_optimizer_state(model, optimizer, rt):
    """optimizer.state_dict() as one process holds it, on rank 0 (None elsewhere); under FSDP every
    rank must call it. get_optimizer_state_dict names each parameter's state by the parameter's
    name; it is keyed here by the parameter's index, as optimizer.state_dict() keys it, so that a
    checkpoint resumes with FSDP or without, on any number of processes."""
    # Before the first step the state is empty, and get_optimizer_state_dict would fill it by a
    # step with lr 0, which AdamW counts (its bias correction would be off by a step).
    if not rt.fsdp or not optimizer.state:
        return optimizer.state_dict() if rt.master else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not rt.master:
        return None
    index = {name: i for i, name in enumerate(name for group in state["param_groups"] for name in group["params"])}
    return dict(state={index[name]: s for name, s in state["state"].items()},
                param_groups=[group | {"params": [index[name] for name in group["params"]]}
                              for group in state["param_groups"]])


def load_optimizer_state(model, optimizer, state, rt):
    """optimizer.load_state_dict(state) for a state of full_optimizer_state's form; under FSDP each
    rank keeps its shards of it (every rank has read the checkpoint)."""
    if not rt.fsdp or not state["state"]:  # nothing to shard (and no lr-0 step: full_optimizer_state says why)
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {param: name for name, param in model.named_parameters()}
    name = [names[param] for group in optimizer.param_groups for param in group["params"]]  # by index
    by_name = dict(state={name[i]: s for i, s in state["state"].items()},
                   param_groups=[group | {"params": [name[i] for i in group["params"]]}
                                 for group in state["param_groups"]])
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
