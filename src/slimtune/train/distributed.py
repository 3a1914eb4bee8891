"""Several processes under torchrun: the environment (RANK, WORLD_SIZE, LOCAL_RANK), the checks made before anything
is loaded or written, the process group and device mesh (nccl on CUDA, gloo on the CPU), FSDP2 wrapping with the run's
precision policy, each rank's share of a global batch, and the collectives the loop needs.

Data: every rank iterates the same global micro-batches (`DataIterator` is a pure function of (seed, epoch)) and keeps
rows [rank * k, (rank + 1) * k), k = ceil(rows / world), of each; a short last batch is filled up with rows whose labels
are all ignored (no loss, no gradient). With each rank's summed token loss divided by the token count of the whole
global step and FSDP2 summing (not averaging) the gradients, a step on N processes computes the gradient of the same
mean as one process.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from slimtune.data.tokenize import IGNORE_INDEX
from slimtune.errors import ConfigError, SlimtuneError
from slimtune.precision.policy import Precision
from slimtune.quant.codecs.fourbit import FORMATS_4BIT
from slimtune.train.config import TrainConfig

SUPPORTED_METHODS = ("full", "lora", "qlora")
T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a torchrun job."""

    rank: int
    world: int
    local_rank: int
    local_world: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def torchrun_env() -> DistEnv | None:
    """The torchrun environment of this process (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), or None outside."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    world = int(env["WORLD_SIZE"])
    return DistEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", world)))


def device_type(cfg: TrainConfig) -> str:
    """'cuda' or 'cpu' for a run on several processes.

    Raises:
        ConfigError: a CUDA device asked for where none is visible, or one GPU named (cuda:N).
    """
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda:"):
        raise ConfigError(f"device={cfg.device} names one GPU, but under torchrun each process takes "
                          "cuda:LOCAL_RANK; fix: device=cuda (or auto)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; fix: device=cpu (gloo) or run on a GPU machine")
    if cfg.device not in ("cpu", "cuda"):
        raise ConfigError(f"device={cfg.device!r} is not one of auto, cpu, cuda for a run on several processes")
    return cfg.device


def check_distributed(cfg: TrainConfig, world: int, local_world: int) -> str:
    """Refuse, in one line and before anything is loaded or written, what a run on `world` processes cannot do.

    Returns:
        the device type ('cuda' or 'cpu').
    Raises:
        ConfigError: a batch size that `world` does not divide, a method / optimizer / precision / option without a
            sharded form here, CUDA asked for without GPUs, fewer GPUs than processes, NCCL or gloo missing.
    """
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} is not a multiple of the {world} processes; fix: "
                          f"batch_size={-(-cfg.batch_size // world) * world} (each process takes batch_size / "
                          f"{world} rows of every micro-batch)")
    no = {"method": (cfg.method, cfg.method not in SUPPORTED_METHODS, ", ".join(SUPPORTED_METHODS)),
          "quant": (cfg.quant, cfg.method == "qlora" and cfg.quant not in FORMATS_4BIT, " or ".join(FORMATS_4BIT)),
          "precision": (cfg.precision, cfg.precision == "fp16-mixed", "bf16-mixed, bf16-true or fp32"),
          "optimizer": (cfg.optimizer, cfg.optimizer not in ("adamw", "sgd"), "adamw or sgd"),
          "offload_optimizer": (cfg.offload_optimizer, cfg.offload_optimizer, "false"),
          "offload_activations": (cfg.offload_activations, cfg.offload_activations, "false"),
          "grad_ckpt": (cfg.grad_ckpt, cfg.grad_ckpt == "offload", "true or false"),
          "host_embedding": (cfg.host_embedding, cfg.host_embedding, "false"),
          "ckpt_blocks": (cfg.ckpt_blocks, cfg.ckpt_blocks == "auto", "a number of blocks"),
          "use_dora": (cfg.use_dora, bool(cfg.use_dora or cfg.method_args.get("use_dora")), "false"),
          "modules_to_save": (cfg.method_args.get("modules_to_save"), bool(cfg.method_args.get("modules_to_save")),
                              "none")}
    for key, (value, refused, fix) in no.items():
        if refused:
            raise ConfigError(f"{key}={value} is not supported on several processes (torchrun) yet; fix: {key}="
                              f"{fix}, or run on one process")
    kind = device_type(cfg)
    if not torch.distributed.is_available():
        raise ConfigError("this torch build has no torch.distributed; fix: install a torch build with it")
    if kind == "cuda":
        if not torch.distributed.is_nccl_available():
            raise ConfigError("device=cuda on several processes needs NCCL, which this torch build lacks; fix: a "
                              "CUDA build of torch with NCCL, or device=cpu (gloo)")
        if local_world > torch.cuda.device_count():
            raise ConfigError(f"{local_world} processes per node but {torch.cuda.device_count()} GPU(s) visible; "
                              "fix: --nproc-per-node at most the number of GPUs (one process per GPU)")
    elif not torch.distributed.is_gloo_available():
        raise ConfigError("device=cpu on several processes needs the gloo backend, which this torch build lacks")
    return kind


def init_distributed(cfg: TrainConfig, env: DistEnv):
    """Check the run (`check_distributed`), then join the process group and build the 1-D device mesh.

    Returns:
        (this rank's device, the DeviceMesh).
    Raises:
        ConfigError: as `check_distributed`.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    kind = check_distributed(cfg, env.world, env.local_world)
    device = torch.device("cuda", env.local_rank) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", device_id=device if kind == "cuda" else None)
    return device, init_device_mesh(kind, (env.world,))


def gather_dtype(prec: Precision, quantized: bool = False) -> torch.dtype | None:
    """The dtype FSDP2 gathers floating parameters in (`MixedPrecisionPolicy.param_dtype`): the compute dtype under
    an autocast policy, else None (each parameter's own).

    A model with 4-bit layers (`quantized`) gets None under every policy: its frozen base is already in the compute
    dtype and the adapters' fp32 masters are cast by the forward's autocast, as on one GPU. Gathering in bf16 would
    copy the stored bytes through CUDA's foreach copy, which computes in fp32 and rounds back, turning every byte pair
    that reads as a bf16 NaN into the canonical NaN (about 1 pair in 256 of random 4-bit codes: measured as a 4.6e-2
    loss shift on the 8B shape). With each parameter's own dtype a group of mixed dtypes is gathered as raw bytes
    (uint8), and fp32 copies move bits unchanged.
    """
    return prec.compute_dtype if prec.autocast and not quantized else None


def wrap_fsdp(model: nn.Module, prec: Precision, mesh, reshard: bool = True) -> None:
    """`fully_shard` each decoder block, the embeddings and the head (each its own group unless tied; a tied pair
    stays in the root's group), then the root; in place.

    Mixed precision matches the single-process policy: under bf16-mixed the gathered weights are cast to bf16
    (`param_dtype`; frozen bf16 weights are left alone; with 4-bit layers nothing is cast, see `gather_dtype`) and the
    forward keeps its autocast context; the gradients are reduced in fp32. Gradients are summed over ranks (divide
    factor 1): the loss is already divided by the global token count. Each block prefetches the next one's all-gather
    in forward.

    Args:
        reshard: free each group's gathered weights after its forward (gathered again for the backward) - the
            least memory; False keeps them from the forward to the end of its backward: one all-gather per group and
            micro-batch instead of two (with gradient checkpointing the recomputation uses them too), for up to the
            whole model's gathered weights per GPU at the end of the forward (`memory.fsdp` counts it).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from slimtune.quant.shard import StoredQuantLinear

    quantized = any(isinstance(m, StoredQuantLinear) for m in model.modules())
    mp = MixedPrecisionPolicy(param_dtype=gather_dtype(prec, quantized), reduce_dtype=torch.float32)
    blocks = list(model.model.layers)
    for b in blocks:
        fully_shard(b, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    if not model.config.tie_word_embeddings:
        fully_shard(model.model.embed_tokens, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        fully_shard(model.lm_head, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for a, b in zip(blocks, blocks[1:]):
        a.set_modules_to_forward_prefetch([b])
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # SUM on gloo too (no PREMUL_SUM / AVG there)


def reshard_all(model: nn.Module) -> None:
    """Free every group's gathered weights: after a forward without backward (evaluation) the root's stay gathered,
    and with `reshard=False` every group's."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# ---- data -----------------------------------------------------------------------------------------------------------
def shard_batch(batch: dict[str, Tensor], rank: int, world: int) -> dict[str, Tensor]:
    """Rows [rank * k, (rank + 1) * k) of a global batch, k = ceil(rows / world); missing rows (a short last batch)
    are copies of row 0 with every label ignored, so they add neither loss nor gradient."""
    rows = batch["input_ids"].shape[0]
    k = -(-rows // world)
    s, e = min(rank * k, rows), min((rank + 1) * k, rows)
    out = {key: v[s:e] for key, v in batch.items()}
    if e - s < k:
        fill = {key: v[:1].expand(k - (e - s), *v.shape[1:]) for key, v in batch.items()}
        fill["labels"] = torch.full_like(fill["labels"], IGNORE_INDEX)
        out = {key: torch.cat([out[key], fill[key]]) for key in out}
    return out


class RankRows:
    """A dataset seen by one rank: `collate(indices)` is this rank's share of the global batch (`shard_batch`)."""

    def __init__(self, dataset, rank: int, world: int) -> None:
        self.dataset, self.rank, self.world = dataset, rank, world

    def __len__(self) -> int:
        return len(self.dataset)

    def collate(self, indices) -> dict[str, Tensor]:
        return shard_batch(self.dataset.collate(indices), self.rank, self.world)


# ---- collectives ----------------------------------------------------------------------------------------------------
def all_sum(t: Tensor) -> Tensor:
    """The sum of `t` over ranks (a new tensor; float64 on the CPU for exact counts)."""
    import torch.distributed as dist

    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def gather_pieces(piece: Tensor, counts: list[int]) -> Tensor:
    """Every rank's 1-D `piece` (rank r's has counts[r] elements) concatenated in rank order, on every rank."""
    import torch.distributed as dist

    m = max(counts)
    padded = torch.zeros(m, dtype=piece.dtype, device=piece.device)
    padded[:piece.numel()] = piece
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def agreed(fn: Callable[[], T], rank: int, world: int) -> T:
    """Run `fn` on every rank; if it raised a SlimtuneError on any rank, raise on all of them, the lowest failing rank
    with its own message (reported) and the others quietly, so that the user sees one line and no rank hangs."""
    import torch.distributed as dist

    err = None
    try:
        result = fn()
    except SlimtuneError as e:
        err = e
    first = torch.tensor([rank if err is not None else world], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        first = first.cuda()
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    first = int(first)
    if first < world:
        if err is None:
            err = SlimtuneError(f"rank {first} failed")
        err.report = rank == first  # read by slimtune.cli: only this rank prints the line
        raise err
    return result
