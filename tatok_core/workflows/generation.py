"""Generation over TaTok tokens: build, train, evaluate, sample, save and load autoregressive priors.

A prior is a ``generator`` component (registry kind ``"generator"``; built-ins ``adaptive`` and
``raster`` in :mod:`tatok_plugins.generator`, ``context`` — local and causal, a code length for the
tokens of whole photos — in :mod:`tatok_plugins.context_prior`; third parties add theirs through the
same hook). Its negative log-likelihood in bits is what an arithmetic coder driven by it writes. It is
built from facts that describe the tokens it models (:func:`generator_facts`, :func:`dataset_facts`)
and trained on a :class:`~tatok_core.io.tokenfile.TokenDataset`::

    dataset = TokenDataset("tokens/")
    prior = build_generator("adaptive", dataset_facts(dataset), width=128, depth=4)
    train_prior(prior, dataset, steps=2000)
    save_prior(prior, "prior/")
    tokens = sample(load_prior("prior/"), 16, temperature=1.0, seed=0)
    images = Tokenizer.from_pretrained("tatok-tiny").decode(tokens)

A saved prior is a directory holding ``prior.safetensors`` (weights) and ``prior.json``: format and
version, the generator's name and options, its facts (including the tokenizer and spec digest of the
tokens it was trained on, so decoding with another tokenizer is caught) and a training summary.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from tatok_core import __version__
from tatok_core.contract.errors import GenerationError
from tatok_core.contract.interfaces import Facts, Generator, Grid
from tatok_core.contract.extras import require
from tatok_core.io.atomic import atomic_write
from tatok_core.io.persistence import (cpu_state, fit_state, hub_snapshot, is_repo_id, load_weights,
                                    push_folder, save_weights)
from tatok_core.contract.registry import Registry, get_registry
from tatok_core.contract.spec import ComponentSpec, instantiate
from tatok_core.io.tokenfile import StoredImageTokens, TokenDataset
from tatok_core.workflows.batching import index_groups
from tatok_core.workflows.inference import evaluating
from tatok_core.workflows.progress import progress_bar
from tatok_core.workflows.schedule import warmup_cosine
from tatok_core.contract.tokens import Tokens

PRIOR_FILE = "prior.json"
WEIGHTS_FILE = "prior.safetensors"
FORMAT = "tatok.prior"
FORMAT_VERSION = 1


def generator_facts(
    code_factors: Sequence[int],
    num_global: int,
    grid: Grid,
    patch_size: int,
    image_size: tuple[int, int] | None = None,
    *,
    tokenizer: str | None = None,
    spec_digest: str | None = None,
    source: str = "tokens",
) -> Facts:
    """The facts a generator is built with, for tokens of a tokenizer with these properties.

    ``grid`` is the patch grid the prior trains on (``max_positions`` = its N), ``image_size`` what
    its tokens decode to (default: the whole grid). ``tokenizer`` and ``spec_digest`` record where
    the tokens came from; ``source`` names the provider in composition errors.
    """
    factors, rows_cols = tuple(int(f) for f in code_factors), tuple(int(g) for g in grid)
    if not factors or min(factors) < 1 or len(rows_cols) != 2 or min(rows_cols) < 1 or num_global < 0 or patch_size < 1:
        raise GenerationError(
            f"invalid generator facts: code_factors={factors}, num_global={num_global}, grid={rows_cols}, "
            f"patch_size={patch_size}"
        )
    rows, cols = rows_cols
    values = {
        "code_factors": factors,
        "num_global": int(num_global),
        "grid": (rows, cols),
        "max_positions": rows * cols,
        "patch_size": int(patch_size),
        "image_size": tuple(image_size) if image_size is not None else (rows * patch_size, cols * patch_size),
        "tokenizer": tokenizer,
        "spec_digest": spec_digest,
    }
    return Facts(values, {fact: source for fact in values})


def dataset_facts(dataset: TokenDataset) -> Facts:
    """Generator facts for the tokens of ``dataset``; grid and image size from its first image."""
    if not len(dataset):
        raise GenerationError(f"{dataset.path}: the token set is empty")
    meta, first = dataset.metadata, dataset[0]
    factors = meta.get("code_factors") or [meta["codebook_size"]]
    if math.prod(factors) != meta["codebook_size"]:
        raise GenerationError(f"{dataset.path}: code_factors {factors} do not multiply to codebook_size {meta['codebook_size']}")
    return generator_facts(
        factors, meta["num_global"], first.grid, meta["patch_size"], first.image_size,
        tokenizer=meta["tokenizer"], spec_digest=meta["spec_digest"], source=f"token set {dataset.path}",
    )


def build_generator(name: str, facts: Facts, registry: Registry | None = None, **options: Any) -> Generator:
    """The generator registered as ``name``, built with ``facts`` and ``options`` (checked by name).

    The name and options are kept on the result as ``component_spec``, which :func:`save_prior` records.
    """
    spec = ComponentSpec(name, options)
    cls = (registry or get_registry()).get("generator", name)
    generator: Generator = instantiate(cls, facts, "generator", spec)  # type: ignore[assignment]
    generator.component_spec = spec
    return generator


def _device(generator: Generator) -> torch.device:
    return next(iter(generator.parameters()), torch.empty(0)).device


def _facts(generator: Generator) -> Mapping[str, Any]:
    return generator.facts_in.values


# -- data ------------------------------------------------------------------------------------------
def _load(generator: Generator, dataset: TokenDataset, labels: Tensor | None) -> list[StoredImageTokens]:
    """Every image of ``dataset`` in memory (token sets are small), after checking it fits ``generator``."""
    meta, facts = dataset.metadata, _facts(generator)
    expected = facts.get("spec_digest")
    if expected is not None and meta["spec_digest"] != expected:
        raise GenerationError(
            f"{dataset.path}: tokens of tokenizer {meta['tokenizer']!r} (spec {meta['spec_digest']}), but this "
            f"prior models tokens of {facts.get('tokenizer')!r} (spec {expected})"
        )
    if meta["codebook_size"] != math.prod(facts["code_factors"]) or meta["num_global"] != facts["num_global"]:
        raise GenerationError(
            f"{dataset.path}: {meta['codebook_size']} codes and {meta['num_global']} globals, but the prior models "
            f"{math.prod(facts['code_factors'])} codes and {facts['num_global']} globals"
        )
    if labels is not None and labels.shape != (len(dataset),):
        raise GenerationError(f"labels must have shape ({len(dataset)},), one per image, got {tuple(labels.shape)}")
    return list(dataset)


def _groups(images: Sequence[StoredImageTokens]) -> list[Tensor]:
    """Indices of the images sharing each (grid, image size): a batch packs one such group."""
    return [torch.tensor(indices) for indices in index_groups((image.grid, image.image_size) for image in images)]


def _batch(
    images: Sequence[StoredImageTokens], indices: Tensor, labels: Tensor | None, device: torch.device
) -> tuple[Tokens, Tensor | None]:
    tokens = Tokens.from_images([images[i] for i in indices.tolist()]).to(device)
    return tokens, None if labels is None else labels[indices].to(device)


# -- training and evaluation -----------------------------------------------------------------------
@attrs.frozen
class PriorTrainResult:
    steps: int
    seconds: float
    history: list[dict[str, float]]  # {"step", "bits_per_image"}: training NLL, mean of the last log_every steps
    #: With a validation set: {"step", "bits_per_image"} at every check, and the step whose weights were kept.
    validation: list[dict[str, float]] = attrs.field(factory=list)
    best_step: int | None = None

    @property
    def validation_bits(self) -> float | None:
        """Bits per validation image of the kept weights (None without a validation set)."""
        return min((check["bits_per_image"] for check in self.validation), default=None)


def train_prior(
    generator: Generator,
    dataset: TokenDataset,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-4,
    weight_decay: float = 0.01,
    warmup: int = 100,
    grad_clip: float = 1.0,
    labels: Tensor | None = None,
    seed: int = 0,
    log_every: int = 50,
    progress: bool = True,
    validation: TokenDataset | None = None,
    validate_every: int = 250,
) -> PriorTrainResult:
    """Maximum likelihood on random batches of ``dataset`` (with replacement, one (grid, size) per batch).

    The token set is held in memory: tokens are small. AdamW with linear warm-up then cosine decay
    (:func:`tatok_core.workflows.schedule.warmup_cosine`). The loss is nats per token slot (M + N), so its scale does
    not depend on the grid; progress and ``history`` report bits per image. ``labels`` (one class per
    image, data-set order) are for class-conditional priors (``num_classes`` > 0).

    With a ``validation`` token set (other images than ``dataset``'s, never those a result is reported
    on) its bits per image are measured every ``validate_every`` steps and at the end, and the prior
    keeps the weights that scored best: early stopping, for token sets small enough to memorise (a few
    dozen photos of a coarse grid are a few thousand codes).
    """
    if steps < 1 or batch_size < 1 or log_every < 1 or validate_every < 1:
        raise GenerationError(f"steps, batch_size, log_every and validate_every must be ≥ 1, "
                              f"got {steps}, {batch_size}, {log_every}, {validate_every}")
    if validation is not None and labels is not None:
        raise GenerationError("early stopping on a validation set is for unconditional priors: give no labels")
    device = _device(generator)
    images = _load(generator, dataset, labels)
    held = None if validation is None else _load(generator, validation, None)  # checked and read once, up front
    groups = _groups(images)
    sizes = torch.tensor([len(g) for g in groups], dtype=torch.float64)
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, steps=steps, warmup=min(warmup, steps)))
    history: list[dict[str, float]] = []
    recent: deque[float] = deque(maxlen=log_every)
    checks: list[dict[str, float]] = []
    best: tuple[int, float, dict[str, Tensor]] | None = None  # (step, validation bits, weights)
    generator.train()
    start = time.perf_counter()
    with progress_bar(progress, status=True) as bar:
        task = bar.add_task("train prior", total=steps, status="")
        for step in range(1, steps + 1):
            group = groups[int(torch.multinomial(sizes, 1, generator=rng))]
            indices = group[torch.randint(len(group), (batch_size,), generator=rng)]
            tokens, batch_labels = _batch(images, indices, labels, device)
            nats = -generator.log_likelihood(tokens, batch_labels)  # (B,)
            loss = nats.mean() / (_facts(generator)["num_global"] + tokens.num_patches)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(generator.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            recent.append(float(nats.detach().mean()) / math.log(2))
            bits = sum(recent) / len(recent)
            if step % log_every == 0 or step == steps:
                history.append({"step": float(step), "bits_per_image": bits})
            if validation is not None and (step % validate_every == 0 or step == steps):
                checked = _mean_bits(generator, held, None, batch_size=64)
                checks.append({"step": float(step), "bits_per_image": checked})
                if best is None or checked < best[1]:
                    best = (step, checked, {k: v.detach().clone() for k, v in generator.state_dict().items()})
            bar.update(task, completed=step, status=f"nll {bits:.1f} bits/image")
    if best is not None:
        generator.load_state_dict(best[2])
    generator.eval()
    return PriorTrainResult(steps, time.perf_counter() - start, history, checks, None if best is None else best[0])


@torch.no_grad()
def nll_bits_per_image(
    generator: Generator, dataset: TokenDataset, *, batch_size: int = 64, labels: Tensor | None = None
) -> float:
    """Mean negative log-likelihood of ``dataset``'s images in bits per image (exact, every image once)."""
    return _mean_bits(generator, _load(generator, dataset, labels), labels, batch_size=batch_size)


@torch.no_grad()
def _mean_bits(generator: Generator, images: Sequence[StoredImageTokens], labels: Tensor | None, *,
               batch_size: int) -> float:
    device = _device(generator)
    total = 0.0
    with evaluating(generator):
        for group in _groups(images):
            for indices in group.split(batch_size):
                tokens, batch_labels = _batch(images, indices, labels, device)
                total -= float(generator.log_likelihood(tokens, batch_labels).double().sum())
    return total / len(images) / math.log(2)


# -- sampling --------------------------------------------------------------------------------------
@torch.no_grad()
def sample(
    generator: Generator,
    n: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    grid: Grid | None = None,
    seed: int = 0,
    labels: Tensor | None = None,
    batch_size: int | None = None,
) -> Tokens:
    """``n`` images' tokens drawn from ``generator`` (incremental decoding with a KV cache).

    ``temperature`` > 0 divides every logit; ``top_k`` > 0 samples among the k most likely values of
    every choice (for the built-ins: each position step and each code digit). ``grid`` defaults to the
    training grid. The same seed on the same device gives the same tokens. ``batch_size`` bounds how
    many images are decoded together (default: all ``n``).
    """
    if n < 1 or not (temperature > 0 and math.isfinite(temperature)) or top_k < 0:
        raise GenerationError(f"need n ≥ 1, a finite temperature > 0 and top_k ≥ 0; got {n}, {temperature}, {top_k}")
    grid = tuple(grid) if grid is not None else tuple(_facts(generator)["grid"])  # type: ignore[assignment]
    if len(grid) != 2 or min(grid) < 1:
        raise GenerationError(f"grid must be (rows, cols) ≥ 1, got {grid}")
    if labels is not None and labels.shape != (n,):
        raise GenerationError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    device = _device(generator)
    rng = torch.Generator(device=device).manual_seed(seed)
    chunks = []
    step = batch_size or n
    with evaluating(generator):
        for start in range(0, n, step):
            count = min(step, n - start)
            chunk_labels = None if labels is None else labels[start : start + count].to(device)
            chunks.append(generator.sample(count, grid=grid, temperature=temperature, top_k=top_k, labels=chunk_labels,
                                           rng=rng))
    return chunks[0] if len(chunks) == 1 else Tokens.from_images([image for c in chunks for image in c.per_image()])


# -- persistence -----------------------------------------------------------------------------------
def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def save_prior(generator: Generator, directory: str | Path, training: Mapping[str, Any] | None = None) -> Path:
    """Write ``prior.safetensors`` and ``prior.json`` into ``directory``, each file replaced atomically.

    ``prior.json`` is written last and records the weights' size, sha256 and digest, which
    :func:`load_prior` verifies (a damaged or foreign weights file is a :class:`WeightsFileError`).
    """
    spec: ComponentSpec | None = getattr(generator, "component_spec", None)
    if spec is None:
        raise GenerationError("only a generator made by build_generator() records its name and options to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "generator": spec.to_dict(),
        "facts": {k: _json_value(v) for k, v in _facts(generator).items()},
        "training": dict(training or {}),
    }
    record["weights"] = save_weights(directory / WEIGHTS_FILE, cpu_state(generator), {"format": FORMAT})
    atomic_write(directory / PRIOR_FILE, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())  # last: it vouches for the weights
    return directory


def push_prior_to_hub(generator: Generator, repo_id: str, *, training: Mapping[str, Any] | None = None,
                      commit_message: str = "Upload TaTok prior", **hub: Any) -> Any:
    """Save the prior into a temporary folder and upload it to Hub repository ``repo_id`` (``tatok[hub]``).

    ``hub`` takes huggingface_hub's ``private``, ``token``, ``branch`` and ``create_pr``; returns its
    ``CommitInfo``. :func:`load_prior` loads it back by repository id.
    """
    require("huggingface_hub", "push_prior_to_hub")  # fail before saving anything
    with tempfile.TemporaryDirectory() as folder:
        save_prior(generator, folder, training)
        return push_folder(Path(folder), repo_id, commit_message=commit_message, **hub)


def load_prior(directory: str | Path, registry: Registry | None = None, map_location: str | torch.device = "cpu",
               **hub: Any) -> Generator:
    """A prior saved by :func:`save_prior` (a folder, or an ``owner/name`` Hub repository id), in eval mode
    on ``map_location``. ``hub`` takes huggingface_hub's ``revision``, ``cache_dir``, ``token`` and
    ``local_files_only`` for repository ids; local folders never touch the network."""
    if is_repo_id(str(directory)):
        directory = hub_snapshot(str(directory), [PRIOR_FILE, WEIGHTS_FILE], **hub)
    directory = Path(directory)
    try:
        record = json.loads((directory / PRIOR_FILE).read_text())
        facts = record["facts"]
        name, options = record["generator"]["name"], record["generator"]["options"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GenerationError(f"{directory}: not a saved prior ({PRIOR_FILE}: {exc})") from exc
    if record.get("format") != FORMAT or record.get("format_version") != FORMAT_VERSION:
        raise GenerationError(
            f"{directory}: prior format {record.get('format')!r} version {record.get('format_version')!r}; "
            f"this tatok reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    built = generator_facts(
        facts["code_factors"], facts["num_global"], facts["grid"], facts["patch_size"], facts["image_size"],
        tokenizer=facts.get("tokenizer"), spec_digest=facts.get("spec_digest"), source=f"prior {directory}",
    )
    generator = build_generator(name, built, registry, **options)
    state = load_weights(directory / WEIGHTS_FILE, record.get("weights"))  # checksum verified when recorded
    fit_state(generator, state, directory / WEIGHTS_FILE, f"generator {name!r} of {directory / PRIOR_FILE}")
    return generator.to(map_location).eval()
