"""Several processes, one per GPU, started by torchrun: data parallelism (DDP), a frozen base sharded
with FSDP, and evaluation shared between the processes.

    torchrun --nproc_per_node 8 train.py --model Llama-2-70b-hf ... --fsdp

DDP (the default under torchrun) keeps a whole copy of the model in every process and averages the
adapters' gradients. FSDP (PyTorch's fully_shard, "FSDP2") keeps 1/N of every tensor in each of the N
processes: each transformer block, with its experts, is one unit whose weights are gathered just
before it runs and freed after, so each process holds 1/N of the base (a 70B base is 140 GB in bf16:
17.5 GB per process on 8) plus a unit or two gathered whole. A tensor of R rows is split as
torch.chunk splits it: process r holds rows [r·c, r·c + its length), c = ceil(R / N).

Loading without N copies: the model is built on the meta device (shapes, no memory), its experts are
added and initialised exactly as a single process does it (they are small), it is sharded, and only
then each process reads its own rows of every base tensor from the memory-mapped checkpoint files.
Adapters and optimizer state are gathered into whole tensors when saved, so the files are the ones
a single process writes, and a run can resume with a different number of processes (tests/test_parallel.py).
"""

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import omoe
from model import Transformer, load_config
from plumbing import adapters
from plumbing.base.errors import BadInput, TrainingDiverged
from plumbing.base.weights import checkpoint_names, open_weights


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python train.py` is rank 0 of 1. A process
    group that already exists (a script calling train.main more than once) is used as it is."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" not in os.environ \
            and not dist.is_initialized():
        raise BadInput("RANK and WORLD_SIZE are set, but this process was not started by torchrun: it "
                       "would wait for processes that never come. Unset them (unset RANK WORLD_SIZE "
                       "LOCAL_RANK MASTER_ADDR MASTER_PORT) or start it with torchrun")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def all_sum(x: float, device) -> float:
    """Sum a number over all processes (identity in a single process)."""
    if not dist.is_initialized():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


# ── wrapping ──────────────────────────────────────────────────────────────────────────────────

def ddp(model, device):
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                     else None)


def load_sharded(model_dir, dtype, device, seed: int, experts: dict) -> Transformer:
    """The model of `model_dir` with add_experts(**experts), sharded over all processes (FSDP2)."""
    args = load_config(model_dir)
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    with open_weights(model_dir) as reader:
        names = checkpoint_names(model.state_dict(), reader, model_dir, args.tie_embeddings)  # checked first
        torch.manual_seed(seed)  # the same initial experts as a single process draws (train.py)
        omoe.add_experts(model, **experts, device=device)
        # Each tensor is gathered in the dtype it is stored in: the frozen base in its own (bf16 on CUDA),
        # the adapters in float32, whose gradients are reduced in float32 (FSDP2's defaults, spelled
        # out: param_dtype=torch.bfloat16 would run the adapters in bf16). Autocast (train.py) makes
        # the two meet in the matmuls, as on one GPU.
        policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # on --device, not the default GPU
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)  # the root: embeddings, final norm, lm_head
        for module in model.modules():  # memory for this process's rows of the base, not yet loaded
            if any(p.is_meta for p in module.parameters(recurse=False)):
                module.to_empty(device=device, recurse=False)  # a tied lm_head follows embed_tokens
        # OMoELinear keeps the frozen layer as .base_layer (as PEFT does): the checkpoint's name has none.
        params = {name.replace(".base_layer.", "."): p for name, p in model.named_parameters()}
        for name, file_name in names:
            local, start = rows(params[name])
            reader.copy_into(file_name, local, start)
    return model.eval()


def rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This process's rows of a parameter (or of a tensor sharded like one) and the index of the first."""
    if not isinstance(t, DTensor):
        return t, 0
    assert t.placements == (Shard(0),), t.placements
    c = -(-t.shape[0] // t.device_mesh.size())  # ceil: torch.chunk's chunk length
    return t.to_local(), min(t.device_mesh.get_local_rank() * c, t.shape[0])


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def gradient_sync(model, train_model, sync: bool):
    """Accumulate gradients locally (no communication) unless `sync`, the last micro-batch of a step."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
        yield
    elif not sync and hasattr(train_model, "no_sync"):  # DDP, maybe compiled
        with train_model.no_sync():
            yield
    else:
        yield


# ── whole tensors for the files; shards back from them ────────────────────────────────────────

def full(state, keep: bool = True):
    """Every sharded tensor of a (nested) state gathered whole, on the CPU: a collective, every process
    calls it; those with keep=False (all but the one that writes the file) keep nothing."""
    if isinstance(state, dict):
        return {k: full(v, keep) for k, v in state.items()}
    if isinstance(state, list):
        return [full(v, keep) for v in state]
    if isinstance(state, DTensor):
        state = state.full_tensor()
    return (state.cpu() if keep else None) if isinstance(state, torch.Tensor) else state


def adapter_state(model, keep: bool = True) -> dict:
    """The adapters' weights, whole: what a single process's omoe.adapter_state_dict gives."""
    return full(omoe.adapter_state_dict(model), keep)


def optimizer_state(optimizer, keep: bool = True) -> dict:
    """The optimizer's state_dict with its (exp_avg, exp_avg_sq) shards gathered whole."""
    return full(optimizer.state_dict(), keep)


def rng_states(state: dict) -> list[dict]:
    """Every process's random-number state (dropout draws differ between processes), rank by rank."""
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def load_adapters(model, state: dict) -> None:
    """omoe.load_adapters for a sharded model: the whole tensors of `state` are checked, then each
    process copies its own rows."""
    if not is_sharded(model):
        return adapters.load_adapters(model, state)
    adapters.check_adapter_state(model, state)
    with torch.no_grad():
        for k, p in omoe.adapter_state_dict(model).items():
            local, start = rows(p)
            local.copy_(state[k][start:start + len(local)])


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """optimizer.load_state_dict, the whole tensors of a saved state sharded like their parameters."""
    if is_sharded(model):
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def shard_like(v, p):  # every process holds the whole tensor: it keeps its own rows, no communication
            return distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None) if v.dim() else v
        state = {**state, "state": {i: {k: shard_like(v, params[i]) for k, v in s.items()}
                                    for i, s in state["state"].items()}}
    optimizer.load_state_dict(state)


def check_finite_adapters(model, when: str, device) -> None:
    """Refuse to evaluate or save adapters holding NaN or infinity: their results would mean nothing."""
    state = omoe.adapter_state_dict(model)
    for name, ok in zip(state, all_finite(list(state.values()), device)):
        if not ok:
            raise TrainingDiverged(f"{when}: adapter weight {name} is not finite (NaN or infinity); "
                                   f"stopping without evaluating or saving it")


def all_finite(tensors: list[torch.Tensor], device) -> list[bool]:
    """For each tensor, whether all of it (all its shards) is finite; one exchange, not one per tensor."""
    local = torch.stack([torch.isfinite(rows(t)[0]).all() for t in tensors]).to(device, torch.float64)
    if dist.is_initialized():
        dist.all_reduce(local, op=dist.ReduceOp.MIN)
    return [bool(x) for x in local.tolist()]


def gather_diagnostics(recorder, device) -> None:
    """Sum a plumbing.diagnostics recorder's counts over all processes, so that its summary describes the
    tokens of every process, not only of this one."""
    if recorder is None or not dist.is_initialized():
        return
    for name in sorted(recorder.sums):  # the same layers, in the same order, in every process
        s = recorder.sums[name]
        counts = torch.tensor([s["tokens"], s["pairs"], s["entropy"], s["cos_before"], s["cos_after"]],
                              dtype=torch.float64)
        flat = torch.cat([counts, s["load"].double(), s["prob"].double()]).to(device)
        dist.all_reduce(flat)
        tokens, pairs, entropy, before, after = flat[:5].tolist()
        load, prob = flat[5:].float().cpu().chunk(2)
        s.update(tokens=int(tokens), pairs=int(pairs), entropy=entropy, cos_before=before, cos_after=after,
                 load=load, prob=prob)


# ── evaluation, shared ────────────────────────────────────────────────────────────────────────

def shared_answers(device):
    """A wrapper for data.score_candidates and data.generate_answers that deals their batches out:
    process r of N answers batches r, r + N, ... of the single process's, so every batch, and so
    every score and answer, is the one a single process computes; then all the answers are merged
    in every process. Pass it to data.evaluate_tasks as `shared`. One process: None."""
    if not dist.is_initialized():
        return None

    def deal(answer):
        def answer_share(model, tok, examples, *args):
            share = (dist.get_rank(), dist.get_world_size())
            with lockstep(model, device):
                mine = answer(model, tok, examples, *args, share=share)
            return merge(mine)  # after lockstep: every process has finished its forward passes
        return answer_share
    return deal


def merge(mine: list) -> list:
    """Each process's answers (None where another process answered) -> everyone's, in every process."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)

    def first(*xs):  # the one answer that is not None, elementwise through nested lists
        if isinstance(xs[0], list):
            return [first(*ys) for ys in zip(*xs)]
        return next(x for x in xs if x is not None)
    return [first(*answers) for answers in zip(*everyone)]


@contextmanager
def lockstep(model, device):
    """Under FSDP every forward pass is collective (each block gathers its weights from all processes),
    so every process must run as many as the others, though their examples differ in number and length.
    Each forward is announced; a process that has finished runs empty forwards for as long as another
    announces one (like DDP's Join). A model that is not sharded runs each process on its own."""
    if not is_sharded(model):
        yield
        return
    def announce(module, args):  # returns None: the forward's arguments are left as they are
        all_sum(1, device)

    handle = model.register_forward_pre_hook(announce, prepend=True)
    try:
        yield
    finally:
        handle.remove()
    dummy = torch.zeros(1, 1, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        while all_sum(0, device) > 0:
            model(dummy)
    model.train(was_training)


def teardown(code: int, ours: bool) -> None:
    """After a run: wait for the other processes, and close the process group this run made. After a
    failure the others may be waiting in a collective: torchrun stops them when this one exits, and
    a barrier would wait forever."""
    if dist.is_initialized():
        if code in (0, 130, 143):
            dist.barrier()
        if ours:
            dist.destroy_process_group()
