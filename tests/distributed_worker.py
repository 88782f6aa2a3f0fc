"""One rank of the distributed tests (tests/test_distributed.py starts two): DDP or FSDP2 training of
an injected model with gloo on the CPU. Writes what the test checks to ``<out>/rank<r>.json``.

python tests/distributed_worker.py {ddp,fsdp2} RANK WORLD_SIZE PORT OUT_DIR
"""
from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lrtensor_kernels as lk  # noqa: E402

STEPS = 3
BATCH = 4  # per rank


def build_model(seed: int = 0, norm: bool = True) -> nn.Module:
    """A 1x1 conv 64->128 with FLoRA (the core whose gradient strides DDP warned about), LieRA on a
    3x3 conv, SSB on a linear, and a head (and a BatchNorm with ``norm``) trained in full."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 1),
                          nn.BatchNorm2d(128) if norm else nn.Identity(), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 5))
    lk.inject(model, "liera", target_modules=["0"], rank=4)
    lk.inject(model, "flora", target_modules=["2"])
    lk.inject(model, "ssb", target_modules=["7"], trainable_modules=["3", "9"] if norm else ["9"])
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lk.adapter_layers(model):
            for p in layer.adapter_parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 3, 6, 6, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def full_batch(world: int, step: int):
    parts = [batch(r, step) for r in range(world)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def gathered(tensor, world):
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor.contiguous())
    return out


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def run_ddp(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = build_model().train()
    single = build_model().train()  # the same model trained in one process on the whole batch
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    single_opt = torch.optim.SGD([p for p in single.parameters() if p.requires_grad], lr=0.1)
    report = dict(grad_rank_spread=[], grad_vs_single=[], grad_scale=[], layout_mismatches=[])
    for step in range(STEPS):
        x, y = batch(rank, step)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        grads = flat_grads(model)
        report["grad_rank_spread"].append(max(max_diff(g, grads) for g in gathered(grads, world)))
        # DDP averages the ranks' gradients of their mean losses: the gradient of the whole batch's mean loss
        # (BatchNorm aside, which normalises per rank: the single model sees the ranks' batches one by one)
        single_opt.zero_grad(set_to_none=True)
        loss = sum(F.cross_entropy(single(batch(r, step)[0]), batch(r, step)[1]) for r in range(world)) / world
        loss.backward()
        report["grad_vs_single"].append(max_diff(grads, flat_grads(single)))
        report["grad_scale"].append(grads.abs().max().item())
        report["layout_mismatches"] += [n for n, p in model.named_parameters()
                                        if p.grad is not None and p.grad.stride() != p.stride()]
        opt.step()
        single_opt.step()
    # parameters only: each rank's BatchNorm statistics follow its own last batch (DDP broadcasts rank 0's
    # buffers at the start of every forward)
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    report["replica_spread"] = max(max_diff(q, params) for q in gathered(params, world))
    report["params_vs_single"] = max(max_diff(p, q) for p, q in zip(model.parameters(), single.parameters()))
    report["base_unchanged"] = all(torch.equal(a, b) for (n, a), (_, b) in zip(
        build_model().named_parameters(), model.named_parameters()) if not a.requires_grad)
    return report


def run_fsdp2(rank: int, world: int) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = build_model(norm=False).train()
    reference = build_model(norm=False).train()
    for layer in [model[0], model[2], model[7]]:
        fully_shard(layer)
    fully_shard(model)
    report = dict(sharded={}, local_rows={})
    for name, p in model.named_parameters():
        report["sharded"][name] = isinstance(p, DTensor)
        report["local_rows"][name] = p.to_local().shape[0] if isinstance(p, DTensor) else None
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1)
    x, _ = full_batch(world, 0)
    # FSDP runs the same math on each rank's share of the batch; the reference on each share in turn
    xr, yr = batch(rank, 0)
    opt.zero_grad()
    F.cross_entropy(model(xr), yr).backward()
    opt.step()
    ref_opt.zero_grad()
    (sum(F.cross_entropy(reference(batch(r, 0)[0]), batch(r, 0)[1]) for r in range(world)) / world).backward()
    ref_opt.step()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ref_state = reference.state_dict()
    trained = {n for n, p in reference.named_parameters() if p.requires_grad}
    report["state_keys_match"] = set(full) == set(ref_state) if rank == 0 else None
    report["trained_vs_reference"] = (max(max_diff(full[n], ref_state[n]) for n in trained) if rank == 0 else None)
    report["trained_moved"] = (max(max_diff(full[n], build_model(norm=False).state_dict()[n]) for n in trained)
                               if rank == 0 else None)
    model.eval()
    with torch.no_grad():
        sharded_out = model(x)
        if rank == 0:  # the full state dict in a plain (unsharded) model
            plain = build_model(seed=5, norm=False)
            plain.load_state_dict(full)
            report["plain_vs_sharded"] = max_diff(plain.eval()(x), sharded_out)
    # round trip: the full state dict into a fresh sharded model (set_model_state_dict may change the dict)
    fresh = build_model(seed=5, norm=False)
    for layer in [fresh[0], fresh[2], fresh[7]]:
        fully_shard(layer)
    fully_shard(fresh)
    set_model_state_dict(fresh, full if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        report["round_trip_diff"] = max_diff(fresh.eval()(x), sharded_out)
    return report


def main():
    scenario, rank, world, port, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = {"ddp": run_ddp, "fsdp2": run_fsdp2}[scenario](rank, world)
    report["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)
    # the report is written: skip the interpreter's teardown. A rank once aborted on a loaded machine
    # with no Python traceback ("terminate called without an active exception": a C++ thread
    # destroyed while joinable, as torch's TCP store and gloo keep), most likely there
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
