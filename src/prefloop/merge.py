"""Merging fine-tuned models through their deltas to a shared base (`prefloop merge`).

PAFT (Pentyala et al., 2024, arXiv:2406.17923) trains SFT and preference optimisation in
parallel from the same base θ₀ and merges the results. Every model k contributes, per
tensor, its delta δ_k = θ_k − θ₀, and the merged model is θ = θ₀ + merge(δ_1, …, δ_K) with
weights w_k, densities ρ_k and a global scale λ:

  * `task_arithmetic` (Ilharco et al., 2023, arXiv:2212.04089): θ₀ + λ·Σ_k w_k δ_k;
  * `ties` (Yadav et al., 2023, arXiv:2306.01708): trim each δ_k to its top ⌊ρ_k·n⌋
    magnitudes, elect a sign per entry from the summed weighted deltas, average the entries
    that agree with it (disjoint mean), scale by λ;
  * `dare_linear` / `dare_ties` (Yu et al., 2024, arXiv:2311.03099): drop each entry of δ_k
    with probability p = 1 − ρ_k and rescale the survivors by 1/ρ_k, then combine by task
    arithmetic or by TIES' sign election and disjoint mean (DARE replaces the trim).

Everything is computed in float64 (so θ₀ + 1·(θ − θ₀) gives θ back bit for bit) and cast to
the base tensor's dtype. Models are read tensor by tensor from their safetensors files and
the output is written in shards as it is produced, so memory holds one tensor of each model
and at most one output shard. The output directory (weights, the base's config and
tokenizer, `merge_summary.json`, `merge_config.yaml`) appears atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from prefloop.errors import PrefloopError
from prefloop.models import PICKLE_SUFFIXES
from prefloop.workers import bar

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
SPARSITY_TOLERANCE = 1e-8  # |δ| at or below this counts as "≈ 0" in the sparsity report

# Files copied from the base directory besides the weights (those present).
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json")


# ---------------------------------------------------------------- configuration


@dataclass
class MergeConfig:
    """`prefloop merge`: combine fine-tuned models that share a base, through their deltas."""

    base: str = ""  # the base θ₀ the models were fine-tuned from (a local model directory)
    models: list[str] = field(default_factory=list)  # fine-tuned directories θ_k
    method: str = "task_arithmetic"  # task_arithmetic | ties | dare_linear | dare_ties
    weights: list[float] = field(default_factory=list)  # w_k; one per model (empty: all 1)
    # ρ_k in (0, 1], the share of each delta kept: one value for all models or one per model
    density: float | list[float] = field(default_factory=list)
    scale: float = 1.0  # λ
    seed: int = 0  # DARE's random drops
    output_dir: str = "runs/merge"
    shard_size_mb: int = 2048  # largest output safetensors file

    def validate(self) -> None:
        if not self.base:
            raise PrefloopError("base: required (the model directory the others were tuned from)")
        if not self.models:
            raise PrefloopError("models: give at least one fine-tuned model directory")
        if self.method not in METHODS:
            raise PrefloopError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        n = len(self.models)
        if self.weights and len(self.weights) != n:
            raise PrefloopError(f"weights: {len(self.weights)} values for {n} model(s); "
                                "give one weight per model")
        if not all(math.isfinite(w) for w in self.weights):
            raise PrefloopError(f"weights: must be finite numbers, got {self.weights}")
        if self.method in ("ties", "dare_ties") and any(w <= 0 for w in self.weights):
            raise PrefloopError(f"weights: {self.method} needs positive weights (its disjoint "
                                f"mean divides by them), got {self.weights}")
        densities = self._density_values()
        if self.method == "task_arithmetic":
            if densities:
                raise PrefloopError("density: task_arithmetic keeps every entry; use method "
                                    "ties, dare_linear or dare_ties to sparsify")
        elif not densities:
            raise PrefloopError(f"density: required by {self.method} (the share of each "
                                "delta kept, in (0, 1], e.g. 0.2)")
        if len(densities) not in (0, 1, n):
            raise PrefloopError(f"density: {len(densities)} values for {n} model(s); give "
                                "one value or one per model")
        if not all(0 < d <= 1 for d in densities):
            raise PrefloopError(f"density: every value must be in (0, 1], got {self.density}")
        if not math.isfinite(self.scale):
            raise PrefloopError(f"scale: must be a finite number, got {self.scale}")
        if self.shard_size_mb < 1:
            raise PrefloopError(f"shard_size_mb: must be ≥ 1, got {self.shard_size_mb}")
        out = Path(self.output_dir).resolve()
        for source in (self.base, *self.models):
            if Path(source).resolve() == out:
                raise PrefloopError(f"output_dir: {self.output_dir} is also an input model; "
                                    "write the merge elsewhere")

    def model_weights(self) -> list[float]:
        return list(self.weights) or [1.0] * len(self.models)

    def model_densities(self) -> list[float]:
        """ρ_k per model (1 for every model when no density is set)."""
        values = self._density_values() or [1.0]
        return values * len(self.models) if len(values) == 1 else values

    def _density_values(self) -> list[float]:
        return [float(self.density)] if isinstance(self.density, int | float) \
            else list(self.density)


# ---------------------------------------------------------------- merge methods (per tensor)


def task_arithmetic(deltas: Sequence[Tensor], weights: Sequence[float],
                    scale: float = 1.0) -> Tensor:
    """Task arithmetic: ``λ·Σ_k w_k δ_k``."""
    merged = torch.zeros_like(deltas[0])
    for delta, w in zip(deltas, weights, strict=True):
        merged += w * delta
    return scale * merged


def trim_to_density(delta: Tensor, density: float) -> Tensor:
    """TIES' trim: keep the top ``⌊ρ·n⌋`` entries of ``|δ|`` (n = δ.numel()), zero the rest.

    Exactly ⌊ρ·n⌋ entries are kept; among equal magnitudes at the threshold the choice is
    ``torch.topk``'s.
    """
    n = delta.numel()
    k = math.floor(density * n)
    if k >= n:
        return delta.clone()
    flat = delta.flatten()
    kept = torch.zeros_like(flat)
    if k > 0:
        idx = torch.topk(flat.abs(), k, sorted=False).indices
        kept[idx] = flat[idx]
    return kept.view_as(delta)


def elect_sign(contributions: Sequence[Tensor]) -> Tensor:
    """TIES' sign election: ``s = sign(Σ_k u_k)`` per entry, a zero sum counting as ``+1``."""
    total = torch.stack(list(contributions)).sum(0)
    return torch.where(total < 0, -1.0, 1.0).to(total.dtype)


def disjoint_mean(contributions: Sequence[Tensor], weights: Sequence[float],
                  sign: Tensor) -> Tensor:
    """TIES' disjoint merge: ``Σ_k a_k u_k / Σ_k a_k w_k`` where ``a_k = [u_k ≠ 0 and
    sign(u_k) = s]``; entries where no model agrees with ``s`` are 0."""
    numerator = torch.zeros_like(sign)
    denominator = torch.zeros_like(sign)
    for u, w in zip(contributions, weights, strict=True):
        agrees = (u != 0) & (torch.sign(u) == sign)
        numerator += torch.where(agrees, u, 0.0)
        denominator += agrees * w
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), 0.0)


def ties(deltas: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
         scale: float = 1.0, trim: bool = True) -> Tensor:
    """TIES-merging: ``λ · Σ_k a_k u_k / Σ_k a_k w_k`` with ``u_k = w_k · trim_{ρ_k}(δ_k)``,
    ``s = sign(Σ_k u_k)`` (0 → +) and ``a_k = [u_k ≠ 0, sign(u_k) = s]``.

    `trim=False` skips the trim (DARE-TIES, whose deltas were already sparsified by DARE).
    """
    trimmed = [trim_to_density(d, rho) if trim else d
               for d, rho in zip(deltas, densities, strict=True)]
    contributions = [w * d for d, w in zip(trimmed, weights, strict=True)]
    sign = elect_sign(contributions)
    return scale * disjoint_mean(contributions, weights, sign)


def dare(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: ``m ⊙ δ / ρ`` with ``m_i ~ Bernoulli(ρ)`` — each entry dropped with probability
    ``p = 1 − ρ`` and the survivors rescaled by ``1/(1 − p)``, so E[DARE(δ)] = δ."""
    if density >= 1:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
    return torch.where(keep, delta / density, 0.0).to(delta.dtype)


def dare_seed(seed: int, model_index: int, tensor_name: str) -> int:
    """The DARE draw's seed for one tensor of one model: fixed by (seed, model, name), so a
    merge is reproducible whatever order tensors are read in."""
    digest = hashlib.sha256(f"{seed}:{model_index}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def merge_tensor(deltas: Sequence[Tensor], cfg: MergeConfig, name: str = "") -> Tensor:
    """The merged delta of one tensor by `cfg.method`; `name` seeds DARE's draws."""
    weights, densities = cfg.model_weights(), cfg.model_densities()
    if cfg.method.startswith("dare_"):
        deltas = [dare(d, rho, torch.Generator().manual_seed(dare_seed(cfg.seed, k, name)))
                  for k, (d, rho) in enumerate(zip(deltas, densities, strict=True))]
    if cfg.method in ("task_arithmetic", "dare_linear"):
        return task_arithmetic(deltas, weights, cfg.scale)
    return ties(deltas, weights, densities, cfg.scale, trim=cfg.method == "ties")


# ---------------------------------------------------------------- sparsity of deltas


@dataclass
class DeltaSparsity:
    """How much of a delta is zero: exactly, and within `SPARSITY_TOLERANCE`."""

    elements: int = 0
    exact_zero: int = 0
    near_zero: int = 0
    l1: float = 0.0

    def add(self, delta: Tensor) -> None:
        magnitude = delta.abs()
        self.elements += delta.numel()
        self.exact_zero += int((magnitude == 0).sum())
        self.near_zero += int((magnitude <= SPARSITY_TOLERANCE).sum())
        self.l1 += float(magnitude.sum())

    @property
    def zero_share(self) -> float:
        return self.exact_zero / max(self.elements, 1)

    @property
    def near_zero_share(self) -> float:
        return self.near_zero / max(self.elements, 1)

    def as_dict(self) -> dict:
        return {"elements": self.elements, "exact_zero": self.zero_share,
                "near_zero": self.near_zero_share, "tolerance": SPARSITY_TOLERANCE,
                "mean_abs": self.l1 / max(self.elements, 1)}


# ---------------------------------------------------------------- reading and writing weights


class SafetensorsWeights:
    """The tensors of a model directory, read one at a time from its safetensors file(s)."""

    def __init__(self, directory: str | Path, stack: ExitStack):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.files = _weight_files(self.directory)  # tensor name → file
        handles = {f: stack.enter_context(safe_open(f, framework="pt"))
                   for f in sorted(set(self.files.values()))}
        self._handle = {name: handles[f] for name, f in self.files.items()}

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle[name].get_slice(name).get_shape())

    def get(self, name: str) -> Tensor:
        return self._handle[name].get_tensor(name)


def _weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name → safetensors file, from the shard index or the file(s) themselves."""
    from safetensors import safe_open

    if not directory.is_dir():
        raise PrefloopError(f"{directory}: not a directory (merge reads local model directories)")
    if not (directory / "config.json").is_file():
        raise PrefloopError(f"{directory}: not a model directory (no config.json)")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise PrefloopError(f"{index}: not a safetensors index (no weight_map)") from None
        files = {name: directory / file for name, file in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise PrefloopError(f"{index}: lists {f.name}, which does not exist")
        return files
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f" (found {', '.join(pickled)}; prefloop reads no pickle)" if pickled else ""
        raise PrefloopError(f"{directory}: no safetensors weights{found}; re-save the model "
                            "with save_pretrained(..., safe_serialization=True)")
    files: dict[str, Path] = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name in files:
                    raise PrefloopError(f"{shard}: tensor {name} is also in {files[name].name}")
                files[name] = shard
    return files


class ShardWriter:
    """Writes tensors to safetensors shards of at most `max_bytes` as they arrive; `close`
    names them as `from_pretrained` expects (one `model.safetensors`, or numbered shards
    with `model.safetensors.index.json`)."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.directory / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, rename the shards, write the index when there are several; returns names."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            self.shards[0][0].rename(self.directory / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (path, tensors) in enumerate(self.shards, start=1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.directory / name)
            names.append(name)
            weight_map.update(dict.fromkeys(tensors, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


# ---------------------------------------------------------------- checks


def check_compatible(base: SafetensorsWeights, models: Sequence[SafetensorsWeights]) -> None:
    """Same architecture, same tensor names, same shapes; errors name the file and tensor."""
    base_type = _model_type(base.directory)
    for m in models:
        model_type = _model_type(m.directory)
        if model_type != base_type:
            raise PrefloopError(f"{m.directory / 'config.json'}: model_type {model_type!r} "
                                f"differs from the base's {base_type!r}")
        missing = [n for n in base.names if n not in m.files]
        if missing:
            raise PrefloopError(f"{m.directory}: missing tensor {missing[0]} (present in base "
                                f"{base.directory}); {len(missing)} missing in all")
        extra = [n for n in m.names if n not in base.files]
        if extra:
            raise PrefloopError(f"{m.files[extra[0]]}: tensor {extra[0]} is not in base "
                                f"{base.directory}; {len(extra)} such tensor(s)")
        for name in base.names:
            if m.shape(name) != base.shape(name):
                raise PrefloopError(f"{m.files[name]}: tensor {name} has shape "
                                    f"{list(m.shape(name))}, the base's has "
                                    f"{list(base.shape(name))}")


def _model_type(directory: Path) -> str | None:
    try:
        return json.loads((directory / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError:
        raise PrefloopError(f"{directory / 'config.json'}: not valid JSON") from None


def _copy_config_and_tokenizer(base: Path, models: Sequence[Path], out: Path) -> str:
    """Copy config and tokenizer files; the tokenizer comes from the base, or else from the
    first model that has one. Returns where the tokenizer came from ("" if nowhere)."""
    for name in CONFIG_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
    for source in (base, *models):
        present = [n for n in TOKENIZER_FILES if (source / n).is_file()]
        if any(n.startswith("tokenizer") for n in present):
            for name in present:
                shutil.copy2(source / name, out / name)
            return str(source)
    return ""


# ---------------------------------------------------------------- the merge


@dataclass
class MergeResult:
    output_dir: Path
    method: str
    tensors: int
    parameters: int
    seconds: float
    deltas: list[DeltaSparsity]  # per input model, before sparsification
    merged: DeltaSparsity  # the merged model's delta to the base
    weight_files: list[str] = field(default_factory=list)
    tokenizer_from: str = ""

    def summary(self, cfg: MergeConfig) -> dict:
        return {
            "method": self.method, "base": cfg.base, "models": list(cfg.models),
            "weights": cfg.model_weights(),
            "density": None if cfg.method == "task_arithmetic" else cfg.model_densities(),
            "scale": cfg.scale, "seed": cfg.seed, "tensors": self.tensors,
            "parameters": self.parameters, "seconds": self.seconds,
            "deltas": [d.as_dict() for d in self.deltas], "merged_delta": self.merged.as_dict(),
            "weight_files": self.weight_files, "tokenizer_from": self.tokenizer_from,
        }


def merge_models(cfg: MergeConfig, progress: bool = False) -> MergeResult:
    """Merge `cfg.models` into `cfg.base` by `cfg.method`, writing `cfg.output_dir`."""
    from prefloop import harness
    from prefloop.config import dump_yaml
    from prefloop.io import write_error

    cfg.validate()
    start = time.perf_counter()
    with ExitStack() as stack:
        base = SafetensorsWeights(cfg.base, stack)
        models = [SafetensorsWeights(m, stack) for m in cfg.models]
        check_compatible(base, models)
        partial = harness.prepare_output(cfg.output_dir, main=True)
        try:
            writer = ShardWriter(partial, cfg.shard_size_mb * 2**20)
            deltas = [DeltaSparsity() for _ in models]
            merged = DeltaSparsity()
            parameters = 0
            for name in bar(base.names, progress, "merge", unit="tensor"):
                base_tensor = base.get(name)
                parameters += base_tensor.numel()
                writer.add(name, _merge_one(name, base_tensor, models, cfg, deltas, merged))
            weight_files = writer.close()
            tokenizer_from = _copy_config_and_tokenizer(base.directory,
                                                        [m.directory for m in models], partial)
            result = MergeResult(Path(cfg.output_dir), cfg.method, len(base.names), parameters,
                                 time.perf_counter() - start, deltas, merged, weight_files,
                                 tokenizer_from)
            (partial / "merge_summary.json").write_text(
                json.dumps(result.summary(cfg), indent=2) + "\n")
            (partial / "merge_config.yaml").write_text(dump_yaml(cfg))
        except OSError as e:
            shutil.rmtree(partial, ignore_errors=True)
            raise write_error(cfg.output_dir, e) from None
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    harness.finish_output(partial, cfg.output_dir)
    return result


def _merge_one(name: str, base_tensor: Tensor, models: Sequence[SafetensorsWeights],
               cfg: MergeConfig, deltas: list[DeltaSparsity], merged: DeltaSparsity) -> Tensor:
    """One output tensor: θ₀ + merged delta in float64, cast to the base's dtype. A
    non-floating tensor (an integer buffer) must be equal in every model and is copied."""
    tensors = [m.get(name) for m in models]
    if not base_tensor.is_floating_point():
        for m, t in zip(models, tensors, strict=True):
            if not torch.equal(t, base_tensor):
                raise PrefloopError(f"{m.files[name]}: tensor {name} ({base_tensor.dtype}) "
                                    "differs from the base's and cannot be merged")
        return base_tensor
    theta0 = base_tensor.double()
    task_deltas = [t.double() - theta0 for t in tensors]
    for stats, d in zip(deltas, task_deltas, strict=True):
        stats.add(d)
    out = (theta0 + merge_tensor(task_deltas, cfg, name)).to(base_tensor.dtype)
    merged.add(out.double() - theta0)
    return out

