"""The online methods, one row each: what a method needs from the loop's stages and what its
pairs carry to the loss (METHODS.md, "Online / iterative methods").

Every method is a configuration of the same loop, selected by ``pairing.strategy``; this
table is the one place that knows which strategy is which method. The loop, the pairing stage
and the config checks read a method's needs from its row and never compare strategy names.

| strategy        | method             | scored | samples per prompt  | pairs                  |
|-----------------|--------------------|--------|---------------------|------------------------|
| best_vs_worst   | iterative (LR-)DPO | yes    | K ≥ 2               | best vs worst          |
| random          | iterative DPO      | yes    | K ≥ 2               | two drawn per prompt   |
| all_pairs       | iterative DPO      | yes    | K ≥ 2               | every i < j            |
| sppo            | SPPO               | yes    | K ≥ 2               | best vs worst, P̂      |
| xpo             | XPO                | yes    | K ≥ 1, + 1 from ref | each sample vs ỹ       |
| spin            | SPIN               | no     | K ≥ 1, + SFT target | target vs each sample  |

Three modifiers combine with the scored rows (they are options, not strategies): DICE is
``reward.type: implicit`` (the policy's own implicit reward scores), RSO is
``pairing.rejection_sampling`` (a candidate filter before pairing; ``rejection_sampling``
below says where it applies), self-refinement is ``sampling.refine``.

Adding an online method: a row here; a candidate rule in ``prefloop.pairing`` if its pairs
are formed differently; a loss in ``prefloop.losses`` if it trains differently (``loss``
ties the two together); its extra pair columns in ``prefloop.data.EXTRA_FIELDS``.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefloop.errors import PrefloopError

# How a method forms its candidate pairs from one prompt's samples (prefloop.pairing):
CANDIDATE_RULES = ("extremes", "random_two", "all_pairs", "vs_reference", "vs_target")
# Extra fields a method's pairs carry to its loss, and what they are:
PAIR_FIELDS = {"win_probabilities": "win-probability targets (chosen_target, rejected_target)",
               "reference_side": "the reference's side (reference_sample)"}


@dataclass(frozen=True)
class Method:
    """One online method's needs.

    Attributes:
        strategy: its ``pairing.strategy`` value.
        name: what papers call it.
        candidates: one of CANDIDATE_RULES.
        scored: pairs by score (a scoring stage runs); False pairs without any reward.
        min_samples: policy samples per prompt it needs (``sampling.num_samples``).
        reference_samples: extra samples per prompt the sample stage draws from the
            reference model (XPO's ỹ).
        targets: needs each prompt's SFT answer (``prompts.target_column``).
        pair_fields: extra fields its pairs carry (keys of PAIR_FIELDS).
        loss: the loss that reads those fields: the method needs it and the loss needs the
            method ("" = any preference loss).
        rejection_sampling: RSO's filter applies (several candidates per prompt).
        reference: where it comes from.
    """

    strategy: str
    name: str
    candidates: str
    scored: bool = True
    min_samples: int = 2
    reference_samples: int = 0
    targets: bool = False
    pair_fields: tuple[str, ...] = ()
    loss: str = ""
    rejection_sampling: bool = True
    reference: str = ""


METHODS: dict[str, Method] = {m.strategy: m for m in (
    Method("best_vs_worst", "iterative DPO (best vs worst; iLR-DPO with lr_dpo)", "extremes",
           reference="Xu et al. 2024, arXiv:2406.11817"),
    Method("random", "iterative DPO (a random pair)", "random_two"),
    Method("all_pairs", "iterative DPO (all pairs)", "all_pairs"),
    Method("sppo", "SPPO", "extremes", pair_fields=("win_probabilities",), loss="sppo",
           reference="Wu et al. 2024, arXiv:2405.00675"),
    Method("xpo", "XPO", "vs_reference", min_samples=1, reference_samples=1,
           pair_fields=("reference_side",), loss="xpo", rejection_sampling=False,
           reference="Xie et al. 2024, arXiv:2405.21046"),
    Method("spin", "SPIN", "vs_target", scored=False, min_samples=1, targets=True,
           rejection_sampling=False, reference="Chen et al. 2024, arXiv:2401.01335"),
)}
STRATEGIES = tuple(METHODS)
# losses that belong to one method (they read the fields only its pairs carry)
METHOD_LOSSES = {m.loss: m for m in METHODS.values() if m.loss}


def method(strategy: str) -> Method:
    """The row of `strategy`; an unknown one names the valid values."""
    try:
        return METHODS[strategy]
    except KeyError:
        raise PrefloopError(f"pairing.strategy: unknown {strategy!r}; valid values: "
                            f"{', '.join(STRATEGIES)}") from None


def describe_fields(m: Method) -> str:
    """What the method's pairs carry beyond a plain pair, in words."""
    return ", ".join(PAIR_FIELDS[f] for f in m.pair_fields)
