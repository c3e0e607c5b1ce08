"""Training a tokenizer: one loop for one CPU, many CPUs (gloo) or many GPUs (nccl) under torchrun.

A *recipe* is a TOML file with a ``[spec]`` table (a :class:`PipelineSpec`) and a ``[train]`` table
(:class:`TrainConfig`); :func:`train` runs it. Checkpoints hold model, optimizer, scheduler, EMA,
discriminator, RNG and data-stream state and are written atomically, so a killed run resumes bit for
bit — also with loader workers and many processes.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tatok_core.io.atomic import atomic_file, atomic_write_text
from tatok_core.workflows.data import Augment, StreamLoader, evaluation_images, open_source
from tatok_core.contract.errors import SpecError, TatokError
from tatok_core.contract.interfaces import PIPELINE_KINDS
from tatok_core.workflows.losses import PatchDiscriminator, PerceptualLoss, discriminator_loss, generator_loss
from tatok_core.workflows.metrics import psnr
from tatok_core.workflows.quality import ReconstructionFID, inception_features, ssim
from tatok_core.contract.spec import PipelineSpec
from tatok_core.contract.tokens import Tokens
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_core.workflows.generation import load_prior
from tatok_core.workflows.inference import evaluating
from tatok_core.workflows.progress import progress_bar
from tatok_core.workflows.schedule import warmup_cosine

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CHECKPOINT = "checkpoint.pt"
FINAL = "final"


def _at_least(low: float, *, above: bool = False) -> Any:
    """attrs validator: a number ≥ ``low`` (or > with ``above``), refused with a message naming the setting."""
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise SpecError(f"train.{attribute.name} must be a number, got {value!r}")
        if (value <= low) if above else (value < low):
            raise SpecError(f"train.{attribute.name} must be {'>' if above else '≥'} {low:g}, got {value!r}")
    return check


def _choice(*options: str) -> Any:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in options:
            raise SpecError(f"train.{attribute.name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return check


RECONSTRUCTION_LOSSES = ("mse", "log_mse", "l1")  # the pixel losses train.reconstruction may name
_POSITIVE = _at_least(1)
_NON_NEGATIVE = _at_least(0)


@attrs.frozen
class TrainConfig:
    """Optimisation and bookkeeping settings (the ``[train]`` table of a recipe)."""

    steps: int = attrs.field(default=2000, validator=_POSITIVE)
    batch_size: int = attrs.field(default=16, validator=_POSITIVE)  # per process and micro-batch
    crop: int = attrs.field(default=32, validator=_POSITIVE)
    lr: float = attrs.field(default=1e-3, validator=_at_least(0, above=True))
    min_lr_ratio: float = attrs.field(default=0.05, validator=_NON_NEGATIVE)  # cosine decays to lr · min_lr_ratio
    warmup: int = attrs.field(default=200, validator=_NON_NEGATIVE)
    weight_decay: float = attrs.field(default=0.05, validator=_NON_NEGATIVE)
    grad_clip: float = attrs.field(default=1.0, validator=_at_least(0, above=True))
    reconstruction: str = attrs.field(default="mse", validator=_choice(*RECONSTRUCTION_LOSSES))
    quantizer_weight: float = attrs.field(default=1.0, validator=_NON_NEGATIVE)
    entropy_weight: float = attrs.field(default=1.0, validator=_NON_NEGATIVE)
    bf16: bool = False
    eval_every: int = attrs.field(default=500, validator=_POSITIVE)
    eval_crops: int = attrs.field(default=64, validator=_POSITIVE)
    eval_data: str = "builtin:photos:heldout"  # "" disables held-out evaluation
    checkpoint_every: int = attrs.field(default=250, validator=_POSITIVE)
    seed: int = 0
    threads: int = attrs.field(default=0, validator=_NON_NEGATIVE)  # torch CPU threads per process, 0 = idle cores / processes
    workers: int = attrs.field(default=0, validator=_NON_NEGATIVE)  # DataLoader worker processes per process
    augment: str = attrs.field(default="random", validator=_choice("random", "resized", "zoomed"))
    crop_scale_min: float = attrs.field(default=0.8, validator=_at_least(0, above=True))  # for augment = "resized"
    zoom_min: float = attrs.field(default=0.5, validator=_at_least(0, above=True))  # for augment = "zoomed"
    flip: bool = True
    accumulate: int = attrs.field(default=1, validator=_POSITIVE)  # micro-batches per optimizer step
    ema_decay: float = attrs.field(default=0.0, validator=_NON_NEGATIVE)  # 0 = no EMA weights
    log_every: int = attrs.field(default=10, validator=_POSITIVE)  # steps between host syncs for logging
    perceptual_weight: float = attrs.field(default=0.0, validator=_NON_NEGATIVE)
    adversarial_weight: float = attrs.field(default=0.0, validator=_NON_NEGATIVE)
    discriminator_start: int = attrs.field(default=0, validator=_NON_NEGATIVE)  # adversarial warm-up steps
    discriminator_lr: float = attrs.field(default=1e-4, validator=_at_least(0, above=True))
    eval_fid: bool = False  # rFID at every evaluation (needs the fid extra and cached Inception weights)
    globals_weight: float = 0.0
    init: str = ""  # a saved model (folder or shipped name) whose matching components start this run: fine-tuning
    # the component kinds this run trains, comma-separated ("decoder"); "" trains every one. The others keep
    # their weights, so a fine-tune of the decoder leaves the codes, and a coding prior fitted on them, valid
    trainable: str = ""
    # rate–distortion training: dB of PSNR one bpp under the coding prior ``rate_prior`` (a saved prior's folder,
    # frozen) is worth; the loss becomes mean(ln MSE) + rate_worth · ln(10)/10 · bpp — −PSNR + worth · bpp in nepers
    rate_worth: float = attrs.field(default=0.0, validator=_NON_NEGATIVE)
    rate_prior: str = ""

    def __attrs_post_init__(self) -> None:
        if self.ema_decay >= 1:
            raise SpecError(f"train.ema_decay must be < 1 (0 disables EMA), got {self.ema_decay!r}")
        if self.crop_scale_min > 1:
            raise SpecError(f"train.crop_scale_min must be ≤ 1, got {self.crop_scale_min!r}")
        if self.zoom_min > 1:
            raise SpecError(f"train.zoom_min must be ≤ 1, got {self.zoom_min!r}")
        if self.rate_worth > 0 and not self.rate_prior:
            raise SpecError(f"train.rate_worth = {self.rate_worth:g} needs train.rate_prior: the folder of the saved "
                            "prior whose bits it weighs (e.g. plugins/pretrained/tatok-small8-covered/context-prior)")
        unknown = [kind for kind in self.trainable_kinds if kind not in PIPELINE_KINDS]
        if unknown:
            hint = difflib.get_close_matches(unknown[0], PIPELINE_KINDS, n=1)
            raise SpecError(f"train.trainable: unknown component kind {unknown[0]!r} (known: "
                            f"{', '.join(PIPELINE_KINDS)})" + (f"; did you mean {hint[0]!r}?" if hint else ""))
        if self.rate_worth > 0 and self.reconstruction != "log_mse":
            raise SpecError(f"train.rate_worth = {self.rate_worth:g} needs train.reconstruction = \"log_mse\", not "
                            f"{self.reconstruction!r}: dB and bits per pixel trade in log units")

    @property
    def trainable_kinds(self) -> tuple[str, ...]:
        """The kinds ``trainable`` names, in its order; empty when every kind trains."""
        return tuple(kind.strip() for kind in self.trainable.split(",") if kind.strip())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Settings by name; unknown names and values of the wrong type are refused naming the setting."""
        fields = {a.name: a for a in attrs.fields(cls)}
        unknown = set(data) - set(fields)
        if unknown:
            hint = difflib.get_close_matches(sorted(unknown)[0], fields, n=1)
            raise SpecError(f"unknown [train] settings {sorted(unknown)} (known: {', '.join(sorted(fields))})"
                            + (f"; did you mean {hint[0]!r}?" if hint else ""))
        values = {}
        for key, value in data.items():
            kind = type(fields[key].default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise SpecError(f"train.{key} must be {kind.__name__}, got {value!r}")
            values[key] = value
        return cls(**values)


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
    local_rank: int = 0
    local_size: int = 1  # processes on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> World:
        """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK/LOCAL_WORLD_SIZE: then join the process group
        (nccl on GPU, else gloo). One node or many: torchrun's rendezvous does the rest."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank=dist.get_rank(), size=dist.get_world_size(), device=device,
                   local_rank=local_rank, local_size=local_size)


def lr_factor(step: int, config: TrainConfig) -> float:
    """The schedule (:func:`~tatok_core.workflows.schedule.warmup_cosine`) of this run's config."""
    return warmup_cosine(step, steps=config.steps, warmup=config.warmup, min_lr_ratio=config.min_lr_ratio)


@torch.no_grad()
def evaluate(model: Tokenizer, images: torch.Tensor, taus: tuple[float, ...] = (0.9,), batch_size: int = 32,
             fid: ReconstructionFID | None = None) -> dict[str, float]:
    """Mean PSNR with every token kept and with DTF at each τ, plus mean tokens kept, on ``images``;
    SSIM with every token kept, and rFID (every token kept) when ``fid`` is given. Batched on the device."""
    results: dict[str, list[torch.Tensor]] = {}
    keep_all, own = model.baseline_filter("keep-all"), model.tau_filter()  # the τs are per-image τ, whatever the spec's rule
    runs = [("all", keep_all, None), *[(f"{model.spec.filter.name}@{t:g}", own, t) for t in taus]]
    with evaluating(model):
        for chunk in images.split(batch_size):
            analysis = model.analyse(chunk)
            for label, token_filter, tau in runs:
                selection = token_filter.select(analysis.entropy.bits, tau)
                tokens = Tokens.from_selection(analysis.globals_.codes, analysis.patches.codes, selection, analysis.grid,
                                               analysis.image_size)
                reconstruction = model.decode(tokens)
                results.setdefault(f"psnr_{label}", []).append(psnr(reconstruction, chunk))
                results.setdefault(f"tokens_{label}", []).append(tokens.lengths.double())
                if token_filter is keep_all:
                    if min(chunk.shape[-2:]) > 10:
                        results.setdefault("ssim_all", []).append(ssim(reconstruction, chunk))
                    if fid is not None:
                        fid.update(reconstruction, chunk)
    summary = {key: float(torch.cat(values).double().mean()) for key, values in results.items()}
    if fid is not None:
        summary["rfid_all"] = fid.compute()
    return summary


def initialise_from(model: Tokenizer, source: str | Path) -> dict[str, str]:
    """Load into ``model`` the weights of every component of the saved model ``source`` that has the same
    plugin name; the others start fresh. This is how a fixed-rate model is fine-tuned into an adaptive one:
    the recipe names another filter, estimator or training selection, and the shared components carry over.

    Returns, per component kind, what happened ("loaded", "fresh" or "no weights"). A component of the same
    name whose weights do not fit (another width, depth, codebook) is an error naming it; so is a source
    from which nothing could be loaded.
    """
    try:
        donor = Tokenizer.from_pretrained(source)
    except TatokError as exc:  # a run that cannot start from its init stops here, saying which setting
        raise SpecError(f"train.init = {str(source)!r}: {exc}") from exc
    started: dict[str, str] = {}
    for kind in PIPELINE_KINDS:
        target, origin = getattr(model, kind), getattr(donor, kind)
        if not target.state_dict():
            started[kind] = "no weights"
        elif model.spec.component(kind).name != donor.spec.component(kind).name:
            started[kind] = "fresh"
        else:
            try:
                target.load_state_dict(origin.state_dict())
            except RuntimeError as exc:
                raise SpecError(f"train.init: {target.label} cannot start from {origin.label} of {source}: "
                                f"{str(exc).splitlines()[-1].strip()}") from exc
            started[kind] = "loaded"
    if "loaded" not in started.values():
        raise SpecError(f"train.init: no component with weights of {source} ({_names(donor.spec)}) is named as "
                        f"in this recipe ({_names(model.spec)})")
    return started


def freeze_all_but(model: Tokenizer, kinds: tuple[str, ...]) -> None:
    """Train only the components named in ``kinds``. Every other component with state (weights or
    buffers) gets no gradient and runs every forward in eval mode, so it keeps its state exactly (no EMA
    codebook update, no dead-code restart) and hands the trained ones what it hands them at inference
    (the encoder's windows unshifted): a frozen encoder and quantizer keep every code, and a coding prior
    fitted on them. Components without state (a filter, the chain estimator) still run as in training.
    Naming only kinds without weights trains nothing: an error naming them."""
    if not any(p.numel() for kind in kinds for p in getattr(model, kind).parameters()):
        raise SpecError(f"train.trainable = {','.join(kinds)!r}: nothing to train — "
                        + ", ".join(f"{getattr(model, kind).label} has no weights" for kind in kinds))
    for kind in PIPELINE_KINDS:
        component = getattr(model, kind)
        component.requires_grad_(kind in kinds)
        if kind not in kinds and component.state_dict():
            component.register_forward_pre_hook(_run_in_eval_mode)


def _run_in_eval_mode(module: torch.nn.Module, _: Any) -> None:
    """A frozen component's forward pre-hook: whatever ``train()`` set (evaluations restore it), eval mode."""
    if module.training:
        module.eval()


def with_rate_prior(model: Tokenizer, folder: str, device: torch.device) -> Tokenizer:
    """``model`` with the frozen coding prior saved in ``folder`` attached, so its training output reports
    the kept set's rate under it (``rate_bpp``); a prior that cannot code the model's tokens, or a quantizer
    or prior without relaxed bits, fails here, naming the setting."""
    try:
        prior = load_prior(folder, map_location=device).requires_grad_(False)
        model = model.with_coding_prior(prior)
        model.check_rate_terms("rate–distortion training (train.rate_worth)")
    except TatokError as exc:
        raise SpecError(f"train.rate_prior = {folder!r}: {exc}") from exc
    return model.train()


def _names(spec: PipelineSpec) -> str:
    return ", ".join(f"{kind} {spec.component(kind).name!r}" for kind in PIPELINE_KINDS)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


TEMPORARY_SUFFIX = ".tmp"


def save_atomically(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves a half-written checkpoint."""
    with atomic_file(path, tmp=path.with_name(path.name + TEMPORARY_SUFFIX)) as tmp:
        torch.save(obj, tmp)


def save_final(model: Tokenizer, run_dir: Path) -> Path:
    """save_pretrained into ``final.tmp``, then rename to ``final``: a kill never leaves it half written."""
    final, tmp = run_dir / FINAL, run_dir / (FINAL + TEMPORARY_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def remove_temporary_files(run_dir: Path) -> list[Path]:
    """Delete what an interrupted save left behind (``*.tmp`` files and folders); returns them."""
    stray = sorted([*run_dir.glob("*" + TEMPORARY_SUFFIX), *run_dir.glob("listings/*" + TEMPORARY_SUFFIX)])
    for path in stray:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return stray


def resumed_config(run_dir: str | Path, recipe_config: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """The plan of the run being resumed (its ``train.json``: steps, schedule, …) with only the explicit
    ``overrides`` applied; the recipe's own settings when the run never wrote one."""
    saved = Path(run_dir) / "train.json"
    base = attrs.asdict(recipe_config)
    if saved.is_file():
        try:
            base = {**base, **json.loads(saved.read_text())}
        except json.JSONDecodeError as exc:
            raise SpecError(f"{saved} is not valid JSON ({exc}); cannot resume its plan") from exc
    return TrainConfig.from_dict({**base, **overrides})


def choose_threads(config: TrainConfig, world: World) -> int:
    """``threads`` if set; else this process's share of the cores that are idle now.

    Share: the cores this process may use divided among the node's processes. Idle: cores minus the
    1-minute load average, so a run started next to another busy process does not oversubscribe the
    machine (which made training at torch's default 25× slower). A resumed run reuses the count of
    the run it continues (floating-point sums depend on it).
    """
    if config.threads:
        return config.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // world.local_size)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    idle = max(1, int(cores - load + 0.5) // world.local_size)
    return min(share, idle)


def available_memory(device: torch.device) -> int:
    """Bytes this process may still allocate: free GPU memory, or MemAvailable on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            line = next(line for line in f if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def estimate_activation_bytes(spec: PipelineSpec, config: TrainConfig, device: torch.device | None = None) -> int:
    """Activation memory of one training micro-batch, measured rather than guessed.

    Probe forwards of a fresh model (batch 1, RNG untouched) record the bytes autograd saves for
    backward: at the crop itself when it is at most 16 patches a side, else at 1, 8 and 16 patches a
    side, with a + b·N + c·N² through them (N = patches) extrapolated to the crop, so dense and
    windowed attention are both captured. The result is the batch times that, with a factor 2 for the
    backward's transients.
    """
    device = device or torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = Tokenizer(spec).to(device).train()
        patch = probe.patch_size
        side = math.ceil(config.crop / patch)
        if side <= 16:  # small enough to measure the crop itself
            return int(2 * config.batch_size * _saved_bytes(probe, config.crop, device))
        sizes = (1, 8, 16)
        measured = [_saved_bytes(probe, patch * k, device) for k in sizes]
    ns = [float(k * k) for k in sizes]
    (n0, n1, n2), (b0, b1, b2) = ns, measured
    c = ((b2 - b0) / (n2 - n0) - (b1 - b0) / (n1 - n0)) / (n2 - n1)
    b = (b1 - b0) / (n1 - n0) - c * (n1 + n0)
    a = b0 - b * n0 - c * n0 * n0
    n = side**2
    per_image = max(0.0, a) + max(0.0, b) * n + max(0.0, c) * n * n
    return int(2 * config.batch_size * per_image)


def _saved_bytes(model: Tokenizer, side: int, device: torch.device) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves in one forward at (1, 3, side, side)."""
    parameters = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.rand(1, 3, side, side, device=device))
    return sum(seen.values())


def check_memory(spec: PipelineSpec, config: TrainConfig, device: torch.device) -> int:
    """Refuse a configuration whose estimated activations exceed the memory available; returns the estimate."""
    estimate, available = estimate_activation_bytes(spec, config, device), available_memory(device)
    if estimate > available:
        raise SpecError(
            f"train.crop={config.crop} with train.batch_size={config.batch_size} needs an estimated "
            f"{_gib(estimate)} of activation memory, more than the {_gib(available)} available on {device.type}; "
            f"lower train.crop or train.batch_size (train.accumulate keeps the effective batch)")
    return estimate


def _gib(count: float) -> str:
    return f"{count / 2**30:.3g} GiB"


class ExponentialAverage:
    """EMA of a model's parameters (buffers copied), kept as a frozen twin module for evaluation."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        mine = list(self.model.parameters())
        torch._foreach_lerp_(mine, [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for average, buffer in zip(self.model.buffers(), model.buffers()):
            average.copy_(buffer)


@attrs.frozen
class TrainResult:
    run_dir: Path
    steps: int
    seconds: float  # wall time of the whole run, summed over resumes
    final_eval: Mapping[str, float]
    history: list[dict[str, float]]
    skipped: int = 0  # unreadable samples skipped by this process's loader


def train(
    spec: PipelineSpec,
    config: TrainConfig,
    data: str,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    world: World | None = None,
    perceptual: PerceptualLoss | None = None,
    fid_features: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``spec`` on ``data`` (built-in set, folder, glob or tar shards) and write ``run_dir``.

    Every process streams its own share of the data (:class:`StreamLoader`, ``config.workers``
    worker processes each); gradients are averaged by DistributedDataParallel; rank 0 alone logs,
    evaluates and writes files. The host syncs with the device only every ``log_every`` steps.
    ``perceptual`` and ``fid_features`` replace the pretrained networks — the test-only injection
    path (:mod:`tatok_core.workflows.losses`); by default they are loaded from the local caches, and a run that
    asks for them fails at start when they are missing. Returns the run's summary; the trained model
    (its EMA weights when ``ema_decay`` > 0) is saved with :meth:`Tokenizer.save_pretrained` in
    ``run_dir/final``.
    """
    world = world or World.from_environment()
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / CHECKPOINT
    if world.is_main:
        _open_run_dir(run_dir, resume)
    threads = choose_threads(config, world)
    torch.set_num_threads(threads)
    state = _load_checkpoint(checkpoint_path, world.device) if resume and checkpoint_path.exists() else None
    if state is not None and not config.threads and state.get("threads"):
        threads = int(state["threads"])
        torch.set_num_threads(threads)
    estimate = check_memory(spec, config, world.device)
    if perceptual is None and config.perceptual_weight > 0:
        perceptual = PerceptualLoss.pretrained()
    if config.eval_fid and fid_features is None:
        fid_features = inception_features()  # fails now, not at the first evaluation, when it is missing
    if isinstance(fid_features, torch.nn.Module):
        fid_features = fid_features.to(world.device)
    if world.is_main:
        print(f"threads {threads} per process ({world.local_size} process(es) on this node, {config.workers} "
              f"loader worker(s) each); estimated activations {_gib(estimate)} per process", file=sys.stderr, flush=True)
    torch.manual_seed(config.seed + world.rank)
    model = Tokenizer(spec).to(world.device).train()
    if config.init and state is None:  # a resumed run's checkpoint holds the weights already
        started = initialise_from(model, config.init)
        if world.is_main:
            print(f"started from {config.init}: " + ", ".join(f"{kind} {how}" for kind, how in started.items()),
                  file=sys.stderr, flush=True)
    if config.rate_worth > 0:
        model = with_rate_prior(model, config.rate_prior, world.device)
    if config.trainable_kinds:
        freeze_all_but(model, config.trainable_kinds)
    ema = ExponentialAverage(model, config.ema_decay) if config.ema_decay > 0 else None
    listings = run_dir / "listings"
    if world.is_main:  # rank 0 lists a folder and caches the listing; the others read that listing
        source = open_source(data, config.crop, listings / _listing_name(data))
    if world.size > 1:
        dist.barrier()
    if not world.is_main:
        source = open_source(data, config.crop, listings / _listing_name(data))
    skipped_names: set[str] = set()

    def report_skip(message: str) -> None:
        if message not in skipped_names:
            skipped_names.add(message)
            print(f"skipped (rank {world.rank}): {message}", file=sys.stderr, flush=True)

    augment = Augment(config.crop, mode=config.augment, scale_min=config.crop_scale_min, zoom_min=config.zoom_min,
                      flip=config.flip)
    loader = StreamLoader(source, augment, config.batch_size, seed=config.seed, rank=world.rank,
                          world_size=world.size, workers=config.workers, on_skip=report_skip,
                          pin_memory=world.device.type == "cuda")
    eval_images = (
        evaluation_images(config.eval_data, config.crop, config.eval_crops, seed=config.seed,
                          listing=listings / _listing_name(config.eval_data), on_skip=report_skip)
        if config.eval_data and world.is_main else None
    )
    if perceptual is not None:
        perceptual = perceptual.to(world.device)
    trained = [p for p in model.parameters() if p.requires_grad]  # all but the components train.trainable leaves out
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    discriminator = d_optimizer = None
    if config.adversarial_weight > 0:
        depth = min(3, max(1, int(math.log2(config.crop)) - 3))  # 3 strided layers at 64² and up, fewer below
        discriminator = PatchDiscriminator(layers=depth).to(world.device).train()
        d_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=config.discriminator_lr, betas=(0.5, 0.9),
                                        weight_decay=0.0)
    step, history, elapsed = 0, [], 0.0
    if state is not None:
        if state["spec"] != spec.to_dict():
            raise SpecError(f"{checkpoint_path} was written for another spec; cannot resume it with this one")
        _restore(state, world, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader, ema=ema,
                 discriminator=discriminator, d_optimizer=d_optimizer)
        step, history, elapsed = state["step"], state["history"], state.get("elapsed", 0.0)
    if world.is_main:
        spec.save(run_dir / "spec.toml")
        atomic_write_text(run_dir / "train.json", json.dumps(attrs.asdict(config), indent=2))
    trainer = DistributedDataParallel(model) if world.size > 1 else model
    critic = DistributedDataParallel(discriminator) if discriminator is not None and world.size > 1 else discriminator
    autocast = (
        torch.autocast(world.device.type, dtype=torch.bfloat16) if config.bf16 else contextlib.nullcontext()
    )
    parts = ("loss", "pixel", "perceptual", "adversarial", "rate_bpp", "discriminator")
    reported = reported_terms(config)
    running = torch.zeros(len(parts), device=world.device)  # summed on the device between log steps
    start = time.perf_counter()
    batch_iter = iter(loader)
    try:
        with progress_bar(progress and world.is_main, status=True) as bar:
            task = bar.add_task("train", total=config.steps, completed=step, status="")
            while step < config.steps:
                adversarial_on = discriminator is not None and step >= config.discriminator_start
                optimizer.zero_grad(set_to_none=True)
                if d_optimizer is not None:
                    d_optimizer.zero_grad(set_to_none=True)
                for micro in range(config.accumulate):
                    images = next(batch_iter).to(world.device, non_blocking=True)  # (B, 3, crop, crop)
                    sync = micro == config.accumulate - 1
                    with (contextlib.nullcontext() if sync or world.size == 1 else trainer.no_sync()):
                        with autocast:
                            out = trainer(images)
                            terms = _generator_terms(out, images, config, perceptual,
                                                     discriminator if adversarial_on else None)
                        (terms[0] / config.accumulate).backward()
                    if adversarial_on:
                        with (contextlib.nullcontext() if sync or world.size == 1 else critic.no_sync()):
                            with autocast:  # one forward over real and fake: DDP expects one per backward
                                logits = critic(torch.cat([images, out.reconstruction.detach()]))
                                d_loss = discriminator_loss(*logits.chunk(2))
                            (d_loss / config.accumulate).backward()
                        terms.append(d_loss.detach())
                    running += torch.stack([t.detach().float() for t in terms]
                                           + [running.new_zeros(())] * (len(parts) - len(terms)))
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                scheduler.step()
                if adversarial_on:
                    d_optimizer.step()
                if ema is not None:
                    ema.update(model)
                step += 1
                record: dict[str, float] = {}  # this step's line of history.json, if it has one
                if step % config.log_every == 0 or step == config.steps:
                    means = (running / (config.log_every * config.accumulate)).tolist()  # the one host sync
                    running.zero_()
                    if not math.isfinite(means[0]):
                        raise SpecError(f"training diverged at step {step}: the loss is {means[0]}; "
                                        f"lower train.lr (now {config.lr:g}) or check the data")
                    if world.is_main:
                        record.update((f"train_{name}", value) for name, value in zip(parts, means) if name in reported)
                        shown = "  ".join(f"{name} {value:.4f}" for name, value in zip(parts, means) if value)
                        bar.update(task, completed=step, status=(
                            f"{shown}  psnr {float(psnr(out.reconstruction.detach(), images).mean()):.2f}"
                            + (f"  skipped {loader.skipped}" if loader.skipped else "")))
                if world.is_main and eval_images is not None and (step % config.eval_every == 0 or step == config.steps):
                    evaluation = evaluate(ema.model if ema is not None else model, eval_images.to(world.device),
                                          fid=ReconstructionFID(fid_features) if config.eval_fid else None)
                    record.update(evaluation)
                    bar.console.print(f"eval step {step}  " + "  ".join(f"{k} {v:.2f}" for k, v in evaluation.items()))
                if record:
                    history.append({"step": float(step), "seconds": elapsed + time.perf_counter() - start, **record})
                    atomic_write_text(run_dir / "history.json", json.dumps(history, indent=2))
                if step % config.checkpoint_every == 0 or step == config.steps:
                    _checkpoint({
                        "step": step, "spec": spec.to_dict(), "config": attrs.asdict(config), "threads": threads,
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "history": history,
                        "elapsed": elapsed + time.perf_counter() - start,
                        "ema": ema.model.state_dict() if ema is not None else None,
                        "discriminator": discriminator.state_dict() if discriminator is not None else None,
                        "d_optimizer": d_optimizer.state_dict() if d_optimizer is not None else None,
                    }, loader, checkpoint_path, world)
    finally:
        batch_iter.close()  # stops the loader's worker processes
    if world.size > 1:
        _check_replicas_agree(model, world)
    if world.is_main:
        save_final(ema.model if ema is not None else model, run_dir)
        atomic_write_text(run_dir / "history.json", json.dumps(history, indent=2))
    seconds = elapsed + time.perf_counter() - start
    return TrainResult(run_dir, step, seconds, last_evaluation(history), history, loader.skipped)


def reported_terms(config: TrainConfig) -> tuple[str, ...]:
    """The loss terms a run's history records (as ``train_<term>``): its total and reconstruction loss, and
    each optional term it trains with — every line the same keys, a term that is off never shows as 0."""
    adversarial = config.adversarial_weight > 0
    return tuple(name for name, used in (("loss", True), ("pixel", True), ("perceptual", config.perceptual_weight > 0),
                                         ("adversarial", adversarial), ("rate_bpp", config.rate_worth > 0),
                                         ("discriminator", adversarial)) if used)


def last_evaluation(history: list[dict[str, float]]) -> dict[str, float]:
    """The held-out metrics of the latest history line that has them (with its step and seconds), without
    the training terms; {} when the run evaluated nothing."""
    for line in reversed(history):
        evaluation = {k: v for k, v in line.items() if not k.startswith("train_")}
        if evaluation.keys() - {"step", "seconds"}:
            return evaluation
    return {}


def _open_run_dir(run_dir: Path, resume: bool) -> None:
    """Create ``run_dir``; refuse a finished or running one unless resuming; sweep a killed save's leftovers."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and (run_dir / CHECKPOINT).exists():
        raise SpecError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    for stray in remove_temporary_files(run_dir):
        print(f"removed {stray.name} left by an interrupted save", file=sys.stderr, flush=True)


def _restore(state: Mapping[str, Any], world: World, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, loader: StreamLoader, ema: ExponentialAverage | None,
             discriminator: torch.nn.Module | None, d_optimizer: torch.optim.Optimizer | None) -> None:
    """Every piece of a checkpoint back in place: weights, optimizers, this rank's loader and RNG, EMA, critic."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["loaders"][world.rank])
    _set_rng_state(state["rng"][world.rank])
    if ema is not None and state.get("ema") is not None:
        ema.model.load_state_dict(state["ema"])
    if discriminator is not None and state.get("discriminator") is not None:
        discriminator.load_state_dict(state["discriminator"])
        d_optimizer.load_state_dict(state["d_optimizer"])


def _listing_name(data: str) -> str:
    return hashlib.sha256(data.encode()).hexdigest()[:16] + ".txt"


def _generator_terms(out: Any, images: torch.Tensor, config: TrainConfig, perceptual: PerceptualLoss | None,
                     discriminator: torch.nn.Module | None) -> list[torch.Tensor]:
    """[total, pixel, perceptual, adversarial, rate_bpp] terms of the tokenizer's loss for one micro-batch."""
    pixel = out.losses[config.reconstruction]
    loss = pixel + config.quantizer_weight * out.losses["quantizer"] + config.entropy_weight * out.losses["entropy"]
    if "globals" in out.losses:  # in the pixel loss's units: log MSE when that trains the full decode
        loss = loss + config.globals_weight * out.losses["globals_log_mse" if config.reconstruction == "log_mse" else "globals"]
    rate = out.losses["rate_bpp"] if config.rate_worth > 0 else pixel.new_zeros(())
    loss = loss + config.rate_worth * math.log(10) / 10 * rate  # −PSNR + worth · bpp in the nepers of log MSE
    zero = pixel.new_zeros(())
    perceptual_term = perceptual(out.reconstruction.float(), images.float()) if perceptual is not None else zero
    # the generator's adversarial term flows into the reconstruction only, not into the critic's weights
    adversarial_term = (generator_loss(torch.func.functional_call(
        discriminator, {k: v.detach() for k, v in discriminator.named_parameters()}, (out.reconstruction,)))
        if discriminator is not None else zero)
    loss = loss + config.perceptual_weight * perceptual_term + config.adversarial_weight * adversarial_term
    return [loss, pixel, perceptual_term, adversarial_term, rate]


def _load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # torch.load raises many types for a damaged file
        raise SpecError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                        f"delete it to start over") from exc
    if not isinstance(state, dict) or "loaders" not in state:
        raise SpecError(f"checkpoint {path} is not a checkpoint of this version of tatok train")
    return state


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


def _checkpoint(state: dict[str, Any], loader: StreamLoader, path: Path, world: World) -> None:
    """Gather every rank's loader and RNG state, then rank 0 writes one checkpoint."""
    local = {"loader": loader.state_dict(), "rng": _rng_state()}
    if world.size > 1:
        gathered: list[Any] = [None] * world.size
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    if world.is_main:
        save_atomically({**state, "loaders": [g["loader"] for g in gathered], "rng": [g["rng"] for g in gathered]},
                        path)
    if world.size > 1:
        dist.barrier()
