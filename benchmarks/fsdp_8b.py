"""Benchmark: FSDP2 through torchrun on one machine with 2 GPUs - LoRA and QLoRA on the Llama-3-8B shape (1 GPU against
2 GPUs: tokens/s, per-GPU peak memory, the same losses), and QLoRA on the Llama-3-70B shape on the 2 GPUs beside the
memory estimator's `--gpus 2` prediction.

    python benchmarks/fsdp_8b.py                  # 2 H200s: everything in one call (aim: < 9 min)
    python benchmarks/fsdp_8b.py --only lora --rows-per-gpu 1,4 --reshard true,false   # more rows, kept gathers
    python benchmarks/fsdp_8b.py --cpu            # CPU smoke test of the same path: tiny shapes, gloo, 2 processes

8B: a random bf16 checkpoint of the shape (normal(0, 0.02) matrices, unit norms; `qlora_8b.write_random_checkpoint`,
written once to --workdir) is fine-tuned by the real command: for R rows per GPU (`--rows-per-gpu`, default 1)
`slimtune finetune` on one GPU (batch_size=R, grad_accum=2) against `torchrun --standalone --nproc-per-node 2 -m
slimtune finetune` (batch_size=2R, grad_accum=1: R rows per GPU), so both see the same global batches of 2R x 2048
tokens: LoRA r=16 alpha=16 on q,k,v,o,gate,up,down (QLoRA: NF4 + double quantization), bf16-mixed, gradient
checkpointing, AdamW lr 1e-4 constant, 20 steps, eager steps with the full-logits loss on both sides (as FSDP2 runs
them; --fast-baseline: the 1-GPU defaults); one 2-GPU run per `--reshard` value (`fsdp_reshard`; false: each block's
gathered weights kept from its forward to its backward). Data: random ASCII words in `text` format, byte-level
built-in tokenizer, packed rows of 2048. tokens/s is over steps 4-20 (the first three warm up), peak memory is rank
0's `max_memory_allocated` over the steps.

70B: no 140 GB checkpoint is written. Each rank generates the rows of its own shards directly on its GPU (normal(0,
0.02) from a generator seeded by the tensor name and row range) and quantizes them to NF4 there
(`slimtune.train.sharded.build_sharded` with a generating source), then 10 steps as above, `--rows-per-gpu-70b` (1)
rows per GPU.

Prints one JSON line per run and a table at the end; NCCL runs with NVLink multicast off (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1), as the machine requires.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TARGETS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def write_text_data(path: Path, rows: int, seq: int, seed: int = 0) -> Path:
    """`rows` text records of about `seq` bytes of random lowercase words (one token per byte)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            words, n = [], 0
            while n < seq - 40:
                w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                words.append(w)
                n += len(w) + 1
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path


def run_keys(a, method: str, model: str, data: Path, out: Path, gpus: int, steps: int, rows: int,
             reshard: str = "true") -> list[str]:
    """The `slimtune finetune` keys of one run: the same global batch of 2 x `rows` rows on 1 GPU (micro-batches of
    `rows`, accumulated twice) or on `gpus` GPUs (`rows` rows each, one micro-batch; `fsdp_reshard=reshard`)."""
    per_micro, accum = (rows * gpus, 1) if gpus > 1 else (rows, 2)
    return [f"model={model}", "tokenizer=builtin", f"data={data}", "data_format=text", f"method={method}",
            f"rank={a.rank}", f"alpha={a.rank}", f"targets={TARGETS}", f"max_length={a.seq}", "packing=true",
            f"batch_size={per_micro}", f"grad_accum={accum}", f"max_steps={steps}", "lr=1e-4",
            f"fsdp_reshard={reshard}", "schedule=constant", "warmup_steps=0", "grad_ckpt=true", f"out_dir={out}",
            "progress=false", "plot=false", "save_final=false", "save_every=0", "eval_every=0", f"device={a.device}",
            "seed=0", f"precision={a.precision or ('bf16-mixed' if a.device == 'cuda' else 'fp32')}",
            # like for like: FSDP2 steps are eager with the full-logits loss (see slimtune.train.dist_run)
            *([] if a.fast_baseline and gpus == 1 else ["chunked_loss=false", "cuda_graph=off"])]


def summarise(name: str, out: Path, gpus: int, t0: float, warm: int = 3, extra: dict | None = None) -> dict:
    """One result line from a run's metrics.jsonl: tokens/s over the steps after `warm` (every step has the same
    tokens, so the harmonic mean of the steps' tokens/s is total tokens / total time), rank 0's peak memory."""
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in steps if "loss" in r]
    timed = steps[warm:] or steps
    tok_s = len(timed) / sum(1 / r["tokens_per_s"] for r in timed)
    res = {"run": name, "gpus": gpus, "steps": len(steps), "tokens_per_s": round(tok_s, 1),
           "peak_gib": max(r["peak_mem_gib"] for r in steps), "losses": [round(r["loss"], 5) for r in steps],
           "wall_s": round(time.perf_counter() - t0, 1)}
    res.update(extra or {})
    return res


def launch(cmd: list[str], gpus: int, a) -> None:
    """Run one benchmark process, or a torchrun job of `gpus` processes; stop on failure with its output."""
    env = {**os.environ, **NCCL_ENV}
    if a.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    else:
        env["OMP_NUM_THREADS"] = "1"  # the smoke test: no CPU oversubscription against the other process
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"] if gpus > 1 \
        else [sys.executable]
    r = subprocess.run(head + cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode:
        sys.stdout.write(r.stdout[-6000:])
        raise SystemExit(f"failed ({r.returncode}): {' '.join(head + cmd)}")


def predicted_gib(shape: str, method: str, a, gpus: int, rows: int, reshard: str = "true") -> float:
    """The estimator's per-GPU peak for one run of `rows` rows per micro-batch and GPU, as `slimtune memory --gpus`
    predicts it (FSDP2 with `fsdp_reshard=reshard`)."""
    from slimtune.memory.estimate import EstimateInput, estimate
    from slimtune.models.shapes import get_shape

    e = EstimateInput(get_shape(shape), method, "bf16-mixed" if a.device == "cuda" else "fp32", "adamw", rows, a.seq,
                      True, lora_rank=a.rank, gpus=gpus, chunked_loss=a.fast_baseline and gpus == 1,  # as the run
                      fsdp_reshard=reshard == "true")
    return round(estimate(e)["total_bytes"] / 2**30, 2)


# ---- the 70B run: weights generated per shard --------------------------------------------------------------------
def worker_generated(a) -> None:
    """In a torchrun process: fine-tune the `a.huge` shape with weights generated on each rank for its own shards."""
    import torch
    import torch.distributed as dist

    from slimtune.models.decoder import Decoder
    from slimtune.models.shapes import get_shape
    from slimtune.precision.policy import resolve_precision
    from slimtune.train.config import load_config
    from slimtune.train.dist_run import DistRun
    from slimtune.train.loop import train
    from slimtune.train.sharded import TensorSource, build_sharded

    mc = get_shape(a.huge)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Decoder(mc).state_dict().items()}

    class Generated(TensorSource):
        """normal(0, 0.02) rows (norms: ones) in bf16, made on the rank's device from (tensor name, first row)."""

        def __init__(self, device) -> None:
            super().__init__(f"generated {a.huge}", tensors={})
            self.device = device

        def shapes(self):
            return shapes

        def rows(self, name, r0, r1):
            shape = (r1 - r0, *shapes[name][1:])
            if "norm" in name:
                return torch.ones(shape, dtype=torch.bfloat16, device=self.device)
            g = torch.Generator(device=self.device).manual_seed(zlib.crc32(name.encode()) * 1_000_003 + r0)
            return (torch.randn(shape, generator=g, device=self.device) * 0.02).to(torch.bfloat16)

    class GeneratedRun(DistRun):
        def build(self):
            prec = resolve_precision(self.cfg.precision, self.device, self.cfg.base_dtype)
            model, counts = build_sharded(self.cfg, prec, self.device, self.mesh, self.env,
                                          source=(mc, Generated(self.device)))
            return model, prec, counts

    keys = run_keys(a, "qlora", f"generated-{a.huge}", Path(a.data), Path(a.out), int(os.environ["WORLD_SIZE"]),
                    a.steps, a.rows_per_gpu_70b, a.reshard_70b)
    try:
        train(load_config(None, keys), log=print if os.environ.get("RANK") == "0" else (lambda s: None),
              run_cls=GeneratedRun)
    finally:
        dist.destroy_process_group()


# ---- the driver ----------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="smoke test on the CPU: tiny shapes, gloo")
    ap.add_argument("--workdir", default="/tmp/slimtune_fsdp")
    ap.add_argument("--model", help="an existing bf16 checkpoint of the 8B shape instead of writing one")
    ap.add_argument("--only", default="lora,qlora,70b", help="which runs: lora, qlora, 70b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--steps-70b", type=int, default=10)
    ap.add_argument("--seq", type=int, default=None, help="default 2048 (--cpu: 128)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rows-per-gpu", default="1", help="rows per GPU and step, or a list (1,2,4: one pair of runs "
                    "each); the 1-GPU run accumulates 2 micro-batches of as many rows")
    ap.add_argument("--rows-per-gpu-70b", type=int, default=1)
    ap.add_argument("--reshard", default="true", help="fsdp_reshard of the 2-GPU runs, or a list (true,false: one "
                    "2-GPU run each); false: gathered weights kept from forward to backward")
    ap.add_argument("--reshard-70b", choices=("true", "false"), default="true")
    ap.add_argument("--fast-baseline", action="store_true", help="the 1-GPU runs with the defaults (chunked loss, "
                    "CUDA graphs), which FSDP2 runs do not have")
    ap.add_argument("--worker-generated", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--huge", default="llama3-70b", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help="the 1- and 2-GPU runs' shape instead (e.g. tiny on CUDA: a quick numerics check)")
    ap.add_argument("--precision", help="instead of bf16-mixed on CUDA / fp32 on the CPU (fp32: 1 and 2 GPUs exact)")
    a = ap.parse_args()
    a.device = "cpu" if a.cpu else "cuda"
    a.seq = a.seq or (128 if a.cpu else 2048)
    if a.worker_generated:
        return worker_generated(a)
    big, a.huge = ("tiny", "tiny") if a.cpu else ("llama3-8b", "llama3-70b")
    big = a.shape or big
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = [int(r) for r in a.rows_per_gpu.split(",")]
    data = write_text_data(work / "data.jsonl", rows=2 * max(rows + [a.rows_per_gpu_70b]) *
                           (max(a.steps, a.steps_70b) + 2), seq=a.seq)
    t_all = time.perf_counter()
    only = set(a.only.split(","))
    results = run_8b(a, big, data, work, only, rows) if only & {"lora", "qlora"} else []
    if "70b" in only:
        out, t0 = work / "qlora-70b", time.perf_counter()
        launch([str(Path(__file__).resolve()), "--worker-generated", f"--data={data}", f"--out={out}",
                f"--seq={a.seq}", f"--rank={a.rank}", f"--steps={a.steps_70b}", f"--huge={a.huge}",
                f"--rows-per-gpu-70b={a.rows_per_gpu_70b}", f"--reshard-70b={a.reshard_70b}",
                *(["--cpu"] if a.cpu else [])], 2, a)
        res = summarise(f"{a.huge} qlora (generated) x{a.rows_per_gpu_70b}", out, 2, t0, warm=2,
                        extra={"predicted_gib": predicted_gib(a.huge, "qlora", a, 2, a.rows_per_gpu_70b,
                                                              a.reshard_70b), "reshard": a.reshard_70b})
        results.append(res)
        print(json.dumps(res), flush=True)
    table(results)
    print(f"total {time.perf_counter() - t_all:.0f} s")


def run_8b(a, big: str, data: Path, work: Path, only: set[str], rows: list[int]) -> list[dict]:
    """The 8B-shape runs: for each method and each rows-per-GPU value, 1 GPU then 2 GPUs on the same batches."""
    sys.path.insert(0, str(HERE))
    from qlora_8b import write_random_checkpoint

    from slimtune.models.shapes import get_shape

    t0 = time.perf_counter()
    model = Path(a.model) if a.model else write_random_checkpoint(get_shape(big), work / big, a.device)
    print(json.dumps({"run": "checkpoint", "path": str(model), "wall_s": round(time.perf_counter() - t0, 1)}),
          flush=True)
    results = []
    for method in [m for m in ("lora", "qlora") if m in only]:
        for r in rows:
            for gpus, reshard in [(1, "-")] + [(2, x) for x in a.reshard.split(",")]:
                out, t0 = work / f"{method}-{gpus}-x{r}-{reshard}", time.perf_counter()
                keys = run_keys(a, method, str(model), data, out, gpus, a.steps, r, reshard if gpus > 1 else "true")
                launch(["-m", "slimtune", "finetune", *keys], gpus, a)
                res = summarise(f"{big} {method} x{r}", out, gpus, t0,
                                extra={"predicted_gib": predicted_gib(big, method, a, gpus, r, reshard),
                                       "reshard": reshard})
                results.append(res)
                print(json.dumps(res), flush=True)
    return results


def table(results: list[dict]) -> None:
    """The runs side by side: 2-GPU speedup and the largest loss difference against the 1-GPU run of the same kind
    (run names carry the rows per GPU: `x4`)."""
    print("| run | GPUs | fsdp_reshard | tokens/s | speedup | peak GiB per GPU | predicted | vs prediction "
          "| max abs loss diff vs 1 GPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    one = {r["run"]: r for r in results if r["gpus"] == 1}
    for r in results:
        base = one.get(r["run"]) if r["gpus"] > 1 else None
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        diff = f"{max(abs(x - y) for x, y in zip(r['losses'], base['losses'])):.2e}" if base else "-"
        vs = f"{100 * (r['peak_gib'] / r['predicted_gib'] - 1):+.1f}%" if r["predicted_gib"] else "-"
        print(f"| {r['run']} | {r['gpus']} | {r.get('reshard', '-')} | {r['tokens_per_s']:,.0f} | {speed} | "
              f"{r['peak_gib']:.2f} | "
              f"{r['predicted_gib']:.2f} | {vs} | {diff} |")


if __name__ == "__main__":
    main()
