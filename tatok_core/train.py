"""Training a tokenizer: one loop for one CPU, many CPUs (gloo) or many GPUs (nccl) under torchrun.

A *recipe* is a TOML file with a ``[spec]`` table (a :class:`PipelineSpec`) and a ``[train]`` table
(:class:`TrainConfig`); :func:`train` runs it. Checkpoints hold model, optimizer, scheduler, RNG and
data-stream state and are written atomically, so a killed run resumes bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.nn.parallel import DistributedDataParallel

from tatok_core.data import ImageSource, RandomCrops, batches, fixed_crops
from tatok_core.errors import SpecError
from tatok_core.metrics import psnr
from tatok_core.spec import PipelineSpec
from tatok_core.tokenizer import Tokenizer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CHECKPOINT = "checkpoint.pt"
FINAL = "final"


@attrs.frozen
class TrainConfig:
    """Optimisation and bookkeeping settings (the ``[train]`` table of a recipe)."""

    steps: int = 2000
    batch_size: int = 16  # per process
    crop: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # cosine decays to lr · min_lr_ratio
    warmup: int = 200
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    reconstruction: str = attrs.field(default="mse", validator=attrs.validators.in_(("mse", "l1")))
    quantizer_weight: float = 1.0
    entropy_weight: float = 1.0
    globals_weight: float = 0.0
    bf16: bool = False
    eval_every: int = 500
    eval_crops: int = 64
    eval_data: str = "builtin:photos:heldout"  # "" disables held-out evaluation
    checkpoint_every: int = 250
    seed: int = 0
    threads: int = 0  # torch CPU threads per process, 0 = torch's default

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {a.name for a in attrs.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SpecError(f"unknown [train] settings {sorted(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**data)


@attrs.frozen
class Recipe:
    spec: PipelineSpec
    train: TrainConfig

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """A recipe (``[spec]`` + ``[train]``) or a bare spec file (default training settings)."""
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"recipe or spec file not found: {path}")
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            try:
                data = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise SpecError(f"{path}: invalid TOML: {exc}") from exc
        if "spec" in data or "train" in data:
            return cls(PipelineSpec.from_dict(data.get("spec", {})), TrainConfig.from_dict(data.get("train", {})))
        return cls(PipelineSpec.from_dict(data), TrainConfig())


@attrs.frozen
class World:
    """This process's place in a (possibly one-process) distributed run."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> World:
        """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: then join the process group (nccl on GPU, else gloo)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank=dist.get_rank(), size=dist.get_world_size(), device=device)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine from 1 to ``min_lr_ratio``."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: Tokenizer, images: torch.Tensor, taus: tuple[float, ...] = (0.9,), batch_size: int = 32) -> dict[str, float]:
    """Mean PSNR with every token kept and with DTF at each τ, plus mean tokens kept, on ``images``."""
    was_training = model.training
    model.eval()
    results: dict[str, list[torch.Tensor]] = {}
    for chunk in images.split(batch_size):
        for label, kwargs in [("all", {"filter": "all"}), *[(f"dtf@{t:g}", {"tau": t, "filter": "dtf"}) for t in taus]]:
            tokens = model.encode(chunk, **kwargs)
            results.setdefault(f"psnr_{label}", []).append(psnr(model.decode(tokens), chunk))
            results.setdefault(f"tokens_{label}", []).append(tokens.lengths.double())
    model.train(was_training)
    return {key: float(torch.cat(values).double().mean()) for key, values in results.items()}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomically(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@attrs.frozen
class TrainResult:
    run_dir: Path
    steps: int
    seconds: float
    final_eval: Mapping[str, float]
    history: list[dict[str, float]]


def train(
    spec: PipelineSpec,
    config: TrainConfig,
    data: str,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    world: World | None = None,
) -> TrainResult:
    """Train ``spec`` on ``data`` ("builtin:photos" or a folder) and write checkpoints to ``run_dir``.

    Under torchrun every rank draws its own crop stream (seeded by rank) and gradients are averaged
    by DistributedDataParallel; rank 0 alone logs, evaluates and writes files. Returns the run's
    summary; the trained model is saved with :meth:`Tokenizer.save_pretrained` in ``run_dir/final``.
    """
    world = world or World.from_environment()
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / CHECKPOINT
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume and checkpoint_path.exists():
            raise SpecError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed + world.rank)
    model = Tokenizer(spec).to(world.device).train()
    source = ImageSource(data)
    stream = RandomCrops(source.images, config.crop, seed=config.seed, rank=world.rank, world_size=world.size)
    eval_images = (
        fixed_crops(ImageSource(config.eval_data).images, config.crop, config.eval_crops, seed=config.seed)
        if config.eval_data and world.is_main else None
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    step, history = 0, []
    if resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=world.device, weights_only=False)
        if state["spec"] != spec.to_dict():
            raise SpecError(f"{checkpoint_path} was written for another spec; cannot resume it with this one")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["streams"][world.rank])
        _set_rng_state(state["rng"][world.rank])
        step, history = state["step"], state["history"]
    if world.is_main:
        spec.save(run_dir / "spec.toml")
        (run_dir / "train.json").write_text(json.dumps(attrs.asdict(config), indent=2))
    trainer = DistributedDataParallel(model) if world.size > 1 else model
    batch_iter = batches(stream, config.batch_size)
    autocast = (
        torch.autocast(world.device.type, dtype=torch.bfloat16) if config.bf16 else contextlib.nullcontext()
    )
    start = time.perf_counter()
    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not (progress and world.is_main), transient=False) as bar:
        task = bar.add_task("train", total=config.steps, completed=step, status="")
        while step < config.steps:
            images = next(batch_iter).to(world.device)
            with autocast:
                out = trainer(images)
            pixel_loss = out.losses[config.reconstruction]
            loss = (pixel_loss + config.quantizer_weight * out.losses["quantizer"]
                    + config.entropy_weight * out.losses["entropy"])
            if "globals" in out.losses:
                loss = loss + config.globals_weight * out.losses["globals"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if world.is_main:
                train_psnr = float(psnr(out.reconstruction.detach(), images).mean())
                bar.update(task, completed=step, status=(
                    f"loss {float(loss.detach()):.4f}  psnr {train_psnr:.2f}  tokens {out.metrics['tokens']:.0f}/"
                    f"{out.metrics['max_tokens']:.0f}  prior {float(out.losses['entropy'].detach()):.2f}b"))
            if world.is_main and eval_images is not None and (step % config.eval_every == 0 or step == config.steps):
                record = {"step": float(step), "seconds": time.perf_counter() - start,
                          **evaluate(model, eval_images.to(world.device))}
                history.append(record)
                bar.console.print("eval " + "  ".join(f"{k} {v:.2f}" for k, v in record.items()))
            if step % config.checkpoint_every == 0 or step == config.steps:
                _checkpoint(model, optimizer, scheduler, stream, spec, step, history, checkpoint_path, world)
    if world.size > 1:
        _check_replicas_agree(model, world)
    if world.is_main:
        model.save_pretrained(run_dir / FINAL)
        (run_dir / "history.json").write_text(json.dumps(history, indent=2))
    return TrainResult(run_dir, step, time.perf_counter() - start, history[-1] if history else {}, history)


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes: equal digests mean bit-identical replicas."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_replicas_agree(model: torch.nn.Module, world: World) -> None:
    """DDP must leave every rank with the same weights; fail loudly if it did not."""
    digests: list[Any] = [None] * world.size
    dist.all_gather_object(digests, parameter_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(f"replicas diverged: parameter digests per rank {digests}")
    if world.is_main:
        print(f"parameters agree across {world.size} ranks (sha256 {digests[0][:16]})", flush=True)


def _checkpoint(model: Tokenizer, optimizer: torch.optim.Optimizer, scheduler: Any, stream: RandomCrops,
                spec: PipelineSpec, step: int, history: list[dict[str, float]], path: Path, world: World) -> None:
    """Gather every rank's stream and RNG state, then rank 0 writes one checkpoint."""
    local = {"stream": stream.state_dict(), "rng": _rng_state()}
    if world.size > 1:
        gathered: list[Any] = [None] * world.size
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    if world.is_main:
        save_atomically({
            "step": step, "spec": spec.to_dict(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "streams": [g["stream"] for g in gathered], "rng": [g["rng"] for g in gathered],
            "history": history,
        }, path)
    if world.size > 1:
        dist.barrier()
