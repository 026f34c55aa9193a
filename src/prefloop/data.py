"""Loading preference and prompt data, chat templating, and tokenisation with response masks.

Preference rows follow TRL's conventions: `prompt`, `chosen`, `rejected`, each either a
string or a list of chat messages (`{"role": ..., "content": ...}`). A row whose
`prompt` is absent but whose `chosen`/`rejected` conversations share a prefix has that
prefix taken as the prompt ("implicit prompt").
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefloop.errors import PrefloopError, where

Message = dict[str, str]
Text = str | list[Message]


# ---------------------------------------------------------------- loading rows


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a malformed line is reported with its line number."""
    rows = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise PrefloopError(f"{path}, line {lineno}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip("\r\n"))  # a position past the end: the end
                except json.JSONDecodeError as e:
                    what = e.msg.removesuffix(": ").removesuffix(" at")  # "…character at"
                    raise PrefloopError(
                        f"{path}, line {lineno}: not valid JSON ({what} at character {e.colno})"
                    ) from None
                if not isinstance(row, dict):
                    raise PrefloopError(
                        f"{path}, line {lineno}: expected a JSON object per line, got "
                        f"{type(row).__name__}"
                    )
                rows.append(row)
    except FileNotFoundError:
        raise PrefloopError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise PrefloopError(f"{path}: a directory, not a .jsonl file") from None
    except PermissionError:
        raise PrefloopError(f"{path}: cannot read (permission denied)") from None
    return rows


def load_rows(source: str | Path, split: str = "train") -> list[dict]:
    """Rows from a .jsonl/.json/.parquet file, a `save_to_disk` directory, or a hub dataset id."""
    path = Path(source)
    if path.suffix == ".jsonl" or (path.suffix == ".json" and path.is_file()):
        if not path.is_file():
            raise PrefloopError(f"{source}: file not found")
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise PrefloopError(
                    f"{source}, line {e.lineno}: not valid JSON ({e.msg} at character {e.colno})"
                ) from None
            except UnicodeDecodeError:
                raise PrefloopError(f"{source}: not UTF-8 text") from None
            if not isinstance(data, list):
                raise PrefloopError(f"{source}: expected a JSON list of objects")
            for i, row in enumerate(data):
                if not isinstance(row, dict):
                    raise PrefloopError(
                        f"{where(source, i)}: expected an object, got {type(row).__name__}"
                    )
            return data
        return read_jsonl(path)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise PrefloopError(f"{source}: file not found")
        import datasets

        return list(datasets.Dataset.from_parquet(str(path)))
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise PrefloopError(f"{source}: no split {split!r}; has {sorted(loaded)}")
            loaded = loaded[split]
        return list(loaded)
    if path.exists() or str(source).startswith((".", "/")) or "/" not in str(source):
        raise PrefloopError(f"{source}: not a .jsonl/.json/.parquet file or dataset directory")
    import datasets  # a hub id such as "org/name"

    return list(datasets.load_dataset(str(source), split=split))


# ---------------------------------------------------------------- preference records


@dataclass
class PreferenceExample:
    prompt: Text
    chosen: Text
    rejected: Text
    row: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


# Optional per-pair fields that some losses read (written by the loop's pairing stage).
EXTRA_FIELDS = {
    "chosen_target": float,  # SPPO: estimated win probability of y_w
    "rejected_target": float,
    "reference_sample": str,  # XPO: which response ("chosen"/"rejected") the reference sampled
}


def _extras(row: dict, source: str, i: int) -> dict[str, Any]:
    out = {}
    for name, kind in EXTRA_FIELDS.items():
        if row.get(name) is None:
            continue
        value = row[name]
        if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise PrefloopError(f"{where(source, i, name)}: expected a number, got {value!r}")
        if name == "reference_sample" and value not in ("chosen", "rejected"):
            raise PrefloopError(f"{where(source, i, name)}: must be 'chosen' or 'rejected'")
        out[name] = value
    return out


def check_text(value: Any, source: str, row: int, name: str) -> Text:
    """`value` if it is non-empty text or a list of `{role, content}` string messages."""
    if isinstance(value, str):
        if not value.strip():
            raise PrefloopError(f"{where(source, row, name)}: empty text")
        return value
    if isinstance(value, list) and value:
        for j, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise PrefloopError(
                    f"{where(source, row, name)}: message {j} is not a {{'role', 'content'}} "
                    f"mapping of strings: {m!r:.80}"
                )
        return value
    raise PrefloopError(
        f"{where(source, row, name)}: expected a non-empty string or a list of "
        f"{{'role', 'content'}} messages, got {type(value).__name__}"
    )


def _split_implicit_prompt(chosen: list[Message], rejected: list[Message]):
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def preference_examples(
    rows: Sequence[dict],
    source: str = "<data>",
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    row_numbers: Sequence[int] | None = None,
) -> list[PreferenceExample]:
    """Validate rows into examples; errors name the source, row and field.

    `row_numbers`: each row's number in `source` when `rows` is a subset of it.
    """
    if not rows:
        raise PrefloopError(f"{source}: no rows")
    examples, kinds = [], set()
    for n, row in enumerate(rows):
        i = row_numbers[n] if row_numbers is not None else n
        if not isinstance(row, dict):
            raise PrefloopError(f"{where(source, i)}: expected an object, got {type(row).__name__}")
        for col in (chosen_column, rejected_column):
            if col not in row:
                raise PrefloopError(
                    f"{where(source, i, col)}: missing column; row has {sorted(row)} "
                    f"(map columns with data.chosen_column/rejected_column/prompt_column)"
                )
        chosen = check_text(row[chosen_column], source, i, chosen_column)
        rejected = check_text(row[rejected_column], source, i, rejected_column)
        if prompt_column in row and row[prompt_column] is not None:
            prompt = check_text(row[prompt_column], source, i, prompt_column)
        elif isinstance(chosen, list) and isinstance(rejected, list):
            prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)
            if not prompt or not chosen or not rejected:
                raise PrefloopError(
                    f"{where(source, i, prompt_column)}: missing, and chosen/rejected share no "
                    "prompt prefix"
                )
        else:
            raise PrefloopError(f"{where(source, i, prompt_column)}: missing column")
        if isinstance(prompt, list):
            # a chat prompt with plain-string answers: the answers are assistant turns
            chosen, rejected = (
                [{"role": "assistant", "content": x}] if isinstance(x, str) else x
                for x in (chosen, rejected)
            )
        kind = tuple(isinstance(x, list) for x in (prompt, chosen, rejected))
        if kind[0] != kind[1] or kind[1] != kind[2]:
            raise PrefloopError(
                f"{where(source, i)}: prompt/chosen/rejected mix plain text and chat messages"
            )
        kinds.add(kind[0])
        if len(kinds) > 1:
            raise PrefloopError(
                f"{where(source, i)}: mixes plain-text and conversational rows; use one format"
            )
        examples.append(PreferenceExample(prompt, chosen, rejected, i, _extras(row, source, i)))
    return examples


def load_preferences(
    source: str | Path,
    split: str = "train",
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
) -> list[PreferenceExample]:
    rows = load_rows(source, split)
    return preference_examples(rows, str(source), prompt_column, chosen_column, rejected_column)


# ---------------------------------------------------------------- tokenisation


def _as_messages(response: Text) -> list[Message]:
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else response


def render_prompt_response(tokenizer, prompt: Text, response: Text) -> tuple[str, str]:
    """Split one conversation into (prompt text, response text) at the generation boundary.

    Plain text: the prompt as is, the response followed by EOS. Messages: the tokenizer's
    chat template, with the response being what the template adds after the generation
    prompt.
    """
    if isinstance(prompt, str):
        if isinstance(response, list):
            response = "".join(m["content"] for m in response)
        return prompt, response + (tokenizer.eos_token or "")
    if not getattr(tokenizer, "chat_template", None):
        raise PrefloopError(
            "conversational data needs a tokenizer with a chat template; this tokenizer has "
            "none (set tokenizer.chat_template or use plain-text columns)"
        )
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        list(prompt) + _as_messages(response), tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise PrefloopError(
            "the chat template renders the prompt differently with and without the response; "
            "cannot locate the response tokens"
        )
    return prompt_text, full_text[len(prompt_text):]


def encode_prompt(tokenizer, prompt: Text) -> list[int]:
    return encode_prompts(tokenizer, [prompt])[0]


def encode_prompts(tokenizer, prompts: Sequence[Text]) -> list[list[int]]:
    """Token ids of each prompt as the model sees it before its answer: plain text with the
    tokenizer's special tokens, chat messages through the chat template with the generation
    prompt. One batched tokenizer call per kind (a call per prompt costs more than the
    encoding itself for short prompts)."""
    plain = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    chat = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if chat and not getattr(tokenizer, "chat_template", None):
        raise PrefloopError(
            "chat-message prompts need a tokenizer with a chat template; this tokenizer has "
            "none (set tokenizer.chat_template or use plain-text prompts)"
        )
    ids: list[list[int]] = [[] for _ in prompts]
    if plain:
        encoded = tokenizer([prompts[i] for i in plain], add_special_tokens=True)["input_ids"]
        for i, row in zip(plain, encoded, strict=True):
            ids[i] = row
    if chat:
        texts = tokenizer.apply_chat_template([prompts[i] for i in chat], tokenize=False,
                                              add_generation_prompt=True)
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for i, row in zip(chat, encoded, strict=True):
            ids[i] = row
    return ids


@dataclass
class TruncationStats:
    """How many rows had their prompt or a response cut, or were skipped, and why."""

    prompts_truncated: int = 0
    responses_truncated: int = 0
    skipped: int = 0
    skipped_rows: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "prompts_truncated": self.prompts_truncated,
            "responses_truncated": self.responses_truncated,
            "skipped": self.skipped,
            "skipped_rows": self.skipped_rows[:100],
        }


@dataclass
class TokenizedPair:
    """One preference pair as token ids; the prompt is shared by both responses."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_chars: int
    rejected_chars: int
    row: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def fit_to_length(
    prompt_ids: list[int],
    responses: list[list[int]],
    max_length: int,
    max_prompt_length: int,
    policy: str,
    stats: TruncationStats,
    row: int,
    source: str = "<data>",
) -> tuple[list[int], list[list[int]]] | None:
    """Apply the truncation policy to a prompt and its responses, counting every cut.

    `truncate` cuts the prompt's start, then the responses' ends; `skip` returns None and
    records the row; `error` raises naming `source` and `row`.
    """
    longest = max(len(r) for r in responses)
    fits = len(prompt_ids) <= max_prompt_length and len(prompt_ids) + longest <= max_length
    if fits:
        return prompt_ids, responses
    if policy == "skip":
        stats.skipped += 1
        stats.skipped_rows.append(row)
        return None
    if policy == "error":
        raise PrefloopError(
            f"{where(source, row)}: {len(prompt_ids)} prompt + {longest} response tokens exceed "
            f"max_prompt_length={max_prompt_length}/max_length={max_length} "
            "(set data.truncation to 'truncate' or 'skip')"
        )
    if len(prompt_ids) > max_prompt_length:
        # keep the end of the prompt: the question usually comes last
        prompt_ids = prompt_ids[-max_prompt_length:]
        stats.prompts_truncated += 1
    room = max_length - len(prompt_ids)
    if any(len(r) > room for r in responses):
        stats.responses_truncated += 1
        responses = [r[:room] for r in responses]
    return prompt_ids, responses


def tokenize_pairs(
    examples: Sequence[PreferenceExample],
    tokenizer,
    max_length: int = 1024,
    max_prompt_length: int = 512,
    truncation: str = "truncate",
    source: str = "<data>",
) -> tuple[list[TokenizedPair], TruncationStats]:
    """Tokenise prompt and both responses; responses carry EOS; truncation is counted.

    truncation: `truncate` (cut the prompt's start, then the responses' ends), `skip`
    (drop the pair, recording its row) or `error`. Errors name `source` and the row.
    """
    if truncation not in ("truncate", "skip", "error"):
        raise PrefloopError(f"truncation must be truncate, skip or error, not {truncation!r}")
    stats = TruncationStats()
    pairs = []
    for ex in examples:
        try:
            prompt_text, chosen_text = render_prompt_response(tokenizer, ex.prompt, ex.chosen)
            _, rejected_text = render_prompt_response(tokenizer, ex.prompt, ex.rejected)
        except PrefloopError as e:
            raise PrefloopError(f"{where(source, ex.row, 'prompt')}: {e}") from None
        prompt_ids = tokenizer(prompt_text, add_special_tokens=isinstance(ex.prompt, str))[
            "input_ids"
        ]
        chosen_ids = tokenizer(chosen_text, add_special_tokens=False)["input_ids"]
        rejected_ids = tokenizer(rejected_text, add_special_tokens=False)["input_ids"]
        fitted = fit_to_length(
            prompt_ids, [chosen_ids, rejected_ids], max_length, max_prompt_length, truncation,
            stats, ex.row, source,
        )
        if fitted is None:
            continue
        prompt_ids, (chosen_ids, rejected_ids) = fitted
        pairs.append(
            TokenizedPair(
                prompt_ids, chosen_ids, rejected_ids,
                chosen_chars=len(response_text(ex.chosen)),
                rejected_chars=len(response_text(ex.rejected)),
                row=ex.row,
                extras=ex.extras,
            )
        )
    if not pairs:
        raise PrefloopError(
            f"{source}: no preference pairs left after truncation (all {stats.skipped} were "
            "skipped; raise data.max_length or set data.truncation=truncate)"
        )
    return pairs, stats


def response_text(response: Text) -> str:
    """The visible text of a response (message contents joined), for character lengths."""
    if isinstance(response, str):
        return response
    return "".join(m["content"] for m in response if m.get("role") == "assistant") or "".join(
        m["content"] for m in response
    )


def pairs_from_rows(
    rows: Sequence[dict],
    tokenizer,
    max_length: int = 1024,
    max_prompt_length: int = 512,
    truncation: str = "truncate",
    source: str = "<pairs>",
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
) -> tuple[list[TokenizedPair], TruncationStats]:
    """Training pairs from pair rows that may already carry token ids.

    Rows with `prompt_ids`/`chosen_ids`/`rejected_ids` (the loop's on-policy pairs) are
    trained on exactly the sampled tokens; other rows (e.g. replayed offline pairs) are
    tokenised. Sampling-time log-probs (`chosen_ref_logps`, `rejected_ref_logps`) ride along
    as extras unless truncation cut the pair, which would make them stale.
    """
    if not rows:
        raise PrefloopError(f"{source}: no rows")
    stats = TruncationStats()
    pairs: list[TokenizedPair] = []
    plain = [i for i, r in enumerate(rows) if not isinstance(r, dict) or not all(
        k in r for k in ("prompt_ids", "chosen_ids", "rejected_ids"))]
    if plain:
        examples = preference_examples([rows[i] for i in plain], source, prompt_column,
                                       chosen_column, rejected_column, row_numbers=plain)
        tokenized, tstats = tokenize_pairs(examples, tokenizer, max_length, max_prompt_length,
                                           truncation, source)
        pairs += tokenized
        stats = tstats
    plain_rows = set(plain)
    vocab = len(tokenizer)
    for i, row in enumerate(rows):
        if i in plain_rows:
            continue
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            ids = row[key]
            if not (isinstance(ids, list) and ids and all(
                    isinstance(x, int) and not isinstance(x, bool) and 0 <= x < vocab
                    for x in ids)):
                raise PrefloopError(
                    f"{where(source, i, key)}: expected a non-empty list of token ids in "
                    f"[0, {vocab}) (the tokenizer's vocabulary)"
                )
        for key in ("chosen_ref_logps", "rejected_ref_logps"):
            value = row.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value)):
                raise PrefloopError(f"{where(source, i, key)}: expected a finite number, "
                                    f"got {value!r}")
        before = (len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"]))
        fitted = fit_to_length(
            list(row["prompt_ids"]), [list(row["chosen_ids"]), list(row["rejected_ids"])],
            max_length, max_prompt_length, truncation, stats, i, source,
        )
        if fitted is None:
            continue
        prompt_ids, (chosen_ids, rejected_ids) = fitted
        extras = {k: row[k] for k in EXTRA_FIELDS if row.get(k) is not None}
        cut = before != (len(prompt_ids), len(chosen_ids), len(rejected_ids))
        if not cut and row.get("chosen_ref_logps") is not None:
            extras["chosen_ref_logps"] = float(row["chosen_ref_logps"])
            extras["rejected_ref_logps"] = float(row["rejected_ref_logps"])
        pairs.append(TokenizedPair(
            prompt_ids, chosen_ids, rejected_ids,
            chosen_chars=len(row.get("chosen", "")), rejected_chars=len(row.get("rejected", "")),
            row=i, extras=extras,
        ))
    if not pairs:
        raise PrefloopError(
            f"{source}: no preference pairs left after truncation (all {stats.skipped} were "
            "skipped; raise data.max_length or set data.truncation=truncate)"
        )
    pairs.sort(key=lambda p: p.row)
    return pairs, stats
