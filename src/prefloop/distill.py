"""Distilling a teacher into a student with preference pairs (`prefloop distill`).

Black-box distillation DPO (dDPO): for every prompt the teacher's answer is preferred to the
student's — y_w = a teacher sample, y_l = a student sample — and the student is trained by
DPO against itself (its SFT model) as the reference. daDPO (Zhang et al., 2025,
arXiv:2506.15717) also looks at the teacher's distribution; its exact loss is unverified
and prefloop implements the teacher-KL-regularised reading (`losses.dadpo_loss`):

    L = −log σ((β+γ)[lp(y_w) − lp(y_l)] − β[lr(y_w) − lr(y_l)] − γ[l_T(y_w) − l_T(y_l)])

with l_T the teacher's log-probs of the same tokens, so teacher and student must share a
tokenizer (checked). γ = 0 is dDPO; it is trained with the `dpo` loss, which skips the
teacher's scoring pass (`dadpo` at γ = 0 gives the same numbers bit for bit).

Phases of `distill`:
  1. check that teacher and student share a vocabulary; load the prompts
  2. sample K answers per prompt from the teacher, then from the student (seed + 1)
  3. pair teacher sample k with student sample k of the same prompt (identical answers
     dropped and counted); the pairs carry token ids, so training sees the sampled tokens
  4. train the student on the pairs with `train_preferences`
  5. one directory, renamed into place at the end: the HF model, pairs.jsonl,
     train_log.jsonl, train_summary.json, distill_summary.json, distill_config.yaml
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prefloop.config import (
    TRUNCATION,
    SamplingConfig,
    TrainingConfig,
    check_choice,
)
from prefloop.errors import PrefloopError
from prefloop.prompts import PromptsConfig

if TYPE_CHECKING:
    from prefloop.trainer import TrainResult

# ---------------------------------------------------------------- configuration


@dataclass
class DistillDataConfig:
    max_length: int = 1024
    max_prompt_length: int = 512
    truncation: str = "truncate"  # truncate | skip | error, as for preference data

    def validate(self, key: str = "data") -> None:
        check_choice(f"{key}.truncation", self.truncation, TRUNCATION)
        if self.max_prompt_length >= self.max_length:
            raise PrefloopError(f"{key}.max_prompt_length must be smaller than "
                                f"{key}.max_length")


@dataclass
class DistillConfig:
    """`prefloop distill`: teacher answers preferred to student answers, trained by daDPO."""

    student: str = ""  # the student's SFT model: the policy and the reference
    teacher: str = ""  # a model sharing the student's tokenizer
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_samples=1))
    beta: float = 0.1
    gamma: float = 0.5  # the teacher's weight; 0 = dDPO (unverified default, as in dadpo)
    output_dir: str = "runs/distill"
    trust_remote_code: bool = False
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    report_to: list[str] = field(default_factory=list)  # accelerate trackers

    @property
    def loss_name(self) -> str:
        return "dadpo" if self.gamma > 0 else "dpo"

    @property
    def objective(self) -> str:
        return f"daDPO (β={self.beta:g}, γ={self.gamma:g})" if self.gamma > 0 \
            else f"dDPO (β={self.beta:g}, γ=0)"

    def validate(self) -> None:
        if not self.student:
            raise PrefloopError("student: required (the student's SFT model)")
        if not self.teacher:
            raise PrefloopError("teacher: required (a model sharing the student's tokenizer)")
        if Path(self.teacher).resolve() == Path(self.student).resolve():
            raise PrefloopError("teacher: the same model as the student; nothing to distill")
        if not self.prompts.path:
            raise PrefloopError("prompts.path: required (jsonl/parquet/dataset dir/hub id)")
        if self.prompts.per_iteration:
            raise PrefloopError("prompts.per_iteration: applies to `prefloop run` only; use "
                                "prompts.limit to take fewer prompts")
        self.sampling.validate("sampling")
        if self.sampling.refine.rounds:
            raise PrefloopError("sampling.refine: applies to `prefloop run` only; distillation "
                                "pairs the models' own answers")
        if not self.beta > 0:
            raise PrefloopError(f"beta: must be > 0, got {self.beta}")
        if not self.gamma >= 0:
            raise PrefloopError(f"gamma: must be ≥ 0 (0 = dDPO), got {self.gamma}")
        check_choice("data.truncation", self.data.truncation, TRUNCATION)
        if self.data.max_prompt_length >= self.data.max_length:
            raise PrefloopError("data.max_prompt_length must be smaller than data.max_length")
        self.training.validate("training")
        out = Path(self.output_dir).resolve()
        if out in (Path(self.student).resolve(), Path(self.teacher).resolve()):
            raise PrefloopError(f"output_dir: {self.output_dir} is an input model; write "
                                "elsewhere")


# ---------------------------------------------------------------- the shared tokenizer


def check_same_vocabulary(student_tok, teacher_tok, student: str, teacher: str) -> None:
    """Teacher log-probs of the student's tokens need one vocabulary and one EOS token."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        differing = sorted(tok for tok in s_vocab.keys() | t_vocab.keys()
                           if s_vocab.get(tok) != t_vocab.get(tok))
        raise PrefloopError(
            f"{teacher}: the teacher's vocabulary ({len(t_vocab)} tokens) differs from the "
            f"student's {student} ({len(s_vocab)} tokens; {len(differing)} tokens differ, "
            f"e.g. {differing[0]!r}); distillation scores one token sequence under both "
            "models, so they need one tokenizer"
        )
    if student_tok.eos_token_id != teacher_tok.eos_token_id:
        raise PrefloopError(
            f"{teacher}: EOS token id {teacher_tok.eos_token_id} differs from the student's "
            f"{student_tok.eos_token_id} ({student})"
        )


# ---------------------------------------------------------------- pairs


@dataclass
class DistillPairStats:
    prompts: int = 0
    pairs: int = 0
    identical_dropped: int = 0
    teacher_mean_tokens: float = 0.0
    student_mean_tokens: float = 0.0
    teacher_mean_chars: float = 0.0
    student_mean_chars: float = 0.0

    def as_dict(self) -> dict:
        return dict(vars(self))


def distill_pairs(teacher_rows: Sequence[dict], student_rows: Sequence[dict]
                  ) -> tuple[list[dict], DistillPairStats]:
    """Pair rows (token ids included) with teacher sample k as chosen and student sample k of
    the same prompt as rejected; pairs whose two answers are the same tokens are dropped."""
    student = {(r["prompt_id"], r["sample_index"]): r for r in student_rows}
    pairs: list[dict] = []
    identical = 0
    for t in teacher_rows:
        s = student.get((t["prompt_id"], t["sample_index"]))
        if s is None:
            continue
        if t["prompt_ids"] != s["prompt_ids"]:
            raise PrefloopError(
                f"prompt {t['prompt_id']!r}: the teacher and the student encode the prompt "
                "differently (different chat templates?); give them the same tokenizer files"
            )
        if t["response_ids"] == s["response_ids"]:
            identical += 1
            continue
        pairs.append(_pair_row(t, s))
    n_t, n_s = max(len(teacher_rows), 1), max(len(student_rows), 1)
    stats = DistillPairStats(
        prompts=len({r["prompt_id"] for r in teacher_rows}), pairs=len(pairs),
        identical_dropped=identical,
        teacher_mean_tokens=sum(r["num_tokens"] for r in teacher_rows) / n_t,
        student_mean_tokens=sum(r["num_tokens"] for r in student_rows) / n_s,
        teacher_mean_chars=sum(r["num_chars"] for r in teacher_rows) / n_t,
        student_mean_chars=sum(r["num_chars"] for r in student_rows) / n_s,
    )
    return pairs, stats


def _pair_row(teacher: dict, student: dict) -> dict:
    return {
        "prompt_id": teacher["prompt_id"], "prompt": teacher["prompt"],
        "prompt_ids": teacher["prompt_ids"],
        "chosen": teacher["response"], "rejected": student["response"],
        "chosen_ids": teacher["response_ids"], "rejected_ids": student["response_ids"],
        "chosen_tokens": teacher["num_tokens"], "rejected_tokens": student["num_tokens"],
        "chosen_chars": teacher["num_chars"], "rejected_chars": student["num_chars"],
        "chosen_index": teacher["sample_index"], "rejected_index": student["sample_index"],
        "chosen_finish": teacher["finish_reason"], "rejected_finish": student["finish_reason"],
        "source": "distill",
    }


# ---------------------------------------------------------------- the run


def student_sampling(sampling: SamplingConfig) -> SamplingConfig:
    """The student samples with seed + 1: with the teacher's seed both models would consume
    the same random draws and give needlessly similar answers."""
    return dataclasses.replace(sampling, seed=sampling.seed + 1)


@dataclass
class DistillResult:
    output_dir: Path
    pairs: DistillPairStats
    train: TrainResult
    is_main_process: bool = True


def train_config(cfg: DistillConfig, output_dir: str | Path, pairs_path: str | Path):
    """The `TrainConfig` of phase 4: the student, its own reference, daDPO or DPO."""
    from prefloop.config import DataConfig, LossConfig, TrainConfig

    params = {"beta": cfg.beta, "gamma": cfg.gamma} if cfg.gamma > 0 else {"beta": cfg.beta}
    return TrainConfig(
        model=cfg.student, reference="", teacher=cfg.teacher if cfg.gamma > 0 else "",
        output_dir=str(output_dir), trust_remote_code=cfg.trust_remote_code,
        data=DataConfig(path=str(pairs_path), max_length=cfg.data.max_length,
                        max_prompt_length=cfg.data.max_prompt_length,
                        truncation=cfg.data.truncation),
        loss=LossConfig(name=cfg.loss_name, params=params),
        training=cfg.training, report_to=list(cfg.report_to),
    )


def distill(cfg: DistillConfig, progress: bool = True) -> DistillResult:
    """Sample teacher and student, pair them, train the student; writes `cfg.output_dir`."""
    from prefloop import harness, io
    from prefloop.config import dump_yaml
    from prefloop.data import pairs_from_rows
    from prefloop.models import load_tokenizer
    from prefloop.prompts import load_prompts
    from prefloop.trainer import train_preferences
    from prefloop.workers import Processes, sample_prompts

    cfg.validate()
    procs = Processes()
    # 1. one vocabulary, the prompts ------------------------------------------------------------
    student_tok = load_tokenizer(cfg.student, cfg.trust_remote_code)
    teacher_tok = load_tokenizer(cfg.teacher, cfg.trust_remote_code)
    check_same_vocabulary(student_tok, teacher_tok, cfg.student, cfg.teacher)
    prompts = load_prompts(cfg.prompts)

    # 2. teacher and student answers ------------------------------------------------------------
    teacher_rows = sample_prompts(cfg.teacher, prompts, cfg.sampling, procs,
                                  cfg.trust_remote_code, progress, "teacher")
    student_rows = sample_prompts(cfg.student, prompts, student_sampling(cfg.sampling), procs,
                                  cfg.trust_remote_code, progress, "student")

    # 3. pairs ----------------------------------------------------------------------------------
    rows, stats = distill_pairs(teacher_rows, student_rows)
    if not rows:
        raise PrefloopError(f"{cfg.prompts.path}: no pairs: on all {stats.prompts} prompts the "
                            "teacher and the student gave the same answers")
    final = Path(cfg.output_dir)
    pairs, truncation = pairs_from_rows(rows, student_tok, cfg.data.max_length,
                                        cfg.data.max_prompt_length, cfg.data.truncation,
                                        str(final / "pairs.jsonl"))

    # 4. training into a staging directory -------------------------------------------------------
    staging = harness.prepare_output(final, procs.is_main)
    try:
        if procs.is_main:
            io.write_jsonl(staging / "pairs.jsonl", rows)
        procs.barrier()
        result = train_preferences(train_config(cfg, staging / "model", final / "pairs.jsonl"),
                                   pairs=pairs, progress=progress)
        # 5. everything in one directory, renamed into place ------------------------------------
        if result.is_main_process:
            model_dir = staging / "model"
            (staging / "pairs.jsonl").rename(model_dir / "pairs.jsonl")
            summary = {"objective": cfg.objective, "loss": cfg.loss_name, "beta": cfg.beta,
                       "gamma": cfg.gamma, "student": cfg.student, "teacher": cfg.teacher,
                       "pairs": stats.as_dict(), "truncation": truncation.as_dict(),
                       "steps": result.steps, "final_loss": result.log[-1]["loss"],
                       "final_accuracy": result.log[-1]["accuracy"]}
            (model_dir / "distill_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            (model_dir / "distill_config.yaml").write_text(dump_yaml(cfg))
            harness.finish_output(model_dir, final)
            shutil.rmtree(staging)
    except BaseException:
        if procs.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return DistillResult(final, stats, result, result.is_main_process)
