"""Instruction and chat data for causal LMs: render, mask the prompt, truncate openly, pack.

A row is either a prompt and a response (``{"prompt": ..., "response": ...}``)
or a conversation (``{"messages": [{"role": "user", "content": ...}, ...]}``);
a prompt/response row is the conversation of one user turn and one assistant
turn. Conversations are rendered with the tokenizer's chat template, or
:data:`SIMPLE_CHAT_TEMPLATE` when it has none, and the loss covers only the
assistant turns: every other token's label is -100.

Each assistant turn's text is what the template adds when that turn is
appended to the conversation rendered up to it with the generation prompt
(``add_generation_prompt=True``), so it includes the turn's end-of-turn
tokens (what teaches the model to stop). The segments are tokenized one by
one, as a prompt and a generated answer are at inference time.

>>> from transformers import ByT5Tokenizer
>>> tokenizer = ByT5Tokenizer(extra_ids=0)
>>> example = encode_conversation([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], tokenizer)
>>> tokenizer.decode(example["input_ids"])
'<|user|>\\n2+2?\\n<|assistant|>\\n4</s>'
>>> tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l != -100])
'4</s>'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import RecipeError

IGNORE = -100
#: The template for tokenizers without one: a role line, the content, and the
#: end-of-sequence token closing each assistant turn.
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "<|{{ message['role'] }}|>{{ '\\n' }}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|assistant|>\\n' }}{% endif %}"
)
Message = dict[str, str]


def chat_template(tokenizer: Any, template: str | None = None) -> str:
    """``template`` if given, else the tokenizer's own chat template, else :data:`SIMPLE_CHAT_TEMPLATE`."""
    return template or getattr(tokenizer, "chat_template", None) or SIMPLE_CHAT_TEMPLATE


def render(messages: Sequence[Message], tokenizer: Any, template: str | None = None, generation_prompt: bool = False) -> str:
    """The conversation as text, through the chat template."""
    return tokenizer.apply_chat_template(
        list(messages), chat_template=chat_template(tokenizer, template), tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def segments(messages: Sequence[Message], tokenizer: Any, template: str | None = None) -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, trained)`` pieces; assistant turns are trained."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], tokenizer, template, generation_prompt=True)
        full = render(messages[: i + 1], tokenizer, template)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise RecipeError(
                "the chat template does not render a conversation as an extension of its beginning (with the "
                "generation prompt), so the assistant turns cannot be told apart; set data.chat_template"
            )
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    rest = render(messages, tokenizer, template)[len(done) :]
    if rest:
        pieces.append((rest, False))
    return [(text, trained) for text, trained in pieces if text]


def encode_conversation(
    messages: Sequence[Message], tokenizer: Any, template: str | None = None
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (-100 outside assistant turns) of one conversation, untruncated."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments(messages, tokenizer, template):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def conversation(row: dict[str, Any], fmt: str, columns: dict[str, str], source: str) -> list[Message]:
    """The messages of a row in ``fmt`` ("prompt_response" or "messages")."""
    if fmt == "prompt_response":
        prompt, response = (_field(row, columns[k], source) for k in ("prompt", "response"))
        for column, value in ((columns["prompt"], prompt), (columns["response"], response)):
            if not isinstance(value, str):  # null or a list would be trained as the text "None" or its repr
                raise RecipeError(f"{source}: an example has {column} {value!r:.60}; it must be a string")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    messages = _field(row, columns["messages"], source)
    if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
        raise RecipeError(f"{source}: column {columns['messages']!r} must hold a list of {{role, content}} messages")
    for message in messages:
        if not (isinstance(message["role"], str) and isinstance(message["content"], str)):
            raise RecipeError(
                f"{source}: a message has role {message['role']!r:.30} and content {message['content']!r:.60}; "
                "both must be strings"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise RecipeError(f"{source}: a conversation has no assistant message, so nothing to train on")
    return messages


def detect_format(row: dict[str, Any], columns: dict[str, str]) -> str:
    """``messages`` if the row has the messages column, ``prompt_response`` if it has both of those, else ``text``."""
    if columns["messages"] in row:
        return "messages"
    if columns["prompt"] in row and columns["response"] in row:
        return "prompt_response"
    return "text"


def _field(row: dict[str, Any], column: str, source: str) -> Any:
    try:
        return row[column]
    except KeyError:
        raise RecipeError(f"{source}: an example has no column {column!r} (columns: {sorted(row)})") from None


# -- truncation ------------------------------------------------------------------------------------


@dataclass
class Truncation:
    """What ``data.max_length`` did to a split: counted, never silent."""

    examples: int = 0
    overlong: int = 0  # longer than max_length
    cut_response: int = 0  # kept but cut, losing trained (response) tokens
    dropped: int = 0  # left out: by data.truncation=drop, or no response token left within max_length
    longest: int = 0

    def describe(self, source: str, max_length: int, policy: str) -> str | None:
        """One line for the log, or None when no example was too long."""
        if not self.overlong:
            return None
        what = (
            f"cut to {max_length} tokens ({self.cut_response} lost response tokens)"
            if policy == "cut"
            else "left out"
        )
        dropped = f"; {self.dropped} left out in all" if policy == "cut" and self.dropped else ""
        return (
            f"{source}: {self.overlong} of {self.examples} examples are longer than data.max_length={max_length} "
            f"tokens (longest {self.longest}): {what}{dropped}; raise data.max_length to keep them whole"
        )


def truncate(
    encoded: list[dict[str, list[int]]], max_length: int, policy: str, source: str
) -> tuple[list[dict[str, list[int]]], Truncation]:
    """Apply ``data.truncation`` (cut, drop or error) to encoded examples; count what it did."""
    report = Truncation(examples=len(encoded), longest=max((len(e["input_ids"]) for e in encoded), default=0))
    kept = []
    for example in encoded:
        ids, labels = example["input_ids"], example["labels"]
        cut = len(ids) > max_length
        if cut:
            report.overlong += 1
            if policy == "drop":
                report.dropped += 1
                continue
        if all(label == IGNORE for label in labels[:max_length]):
            report.dropped += 1  # the prompt alone fills max_length: nothing left to learn from
            continue
        if cut and any(label != IGNORE for label in labels[max_length:]):
            report.cut_response += 1
        kept.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    if policy == "error" and report.overlong:
        raise RecipeError(
            f"{source}: {report.overlong} of {report.examples} examples are longer than data.max_length={max_length} "
            f"tokens (longest {report.longest}); raise data.max_length, or set data.truncation to cut or drop"
        )
    if not kept:
        raise RecipeError(f"{source}: no example keeps a response token within data.max_length={max_length}")
    return kept, report


# -- packing ---------------------------------------------------------------------------------------


@dataclass
class _Row:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)


def pack(examples: list[dict[str, torch.Tensor]], max_length: int) -> list[dict[str, torch.Tensor]]:
    """Concatenate consecutive examples into rows of at most ``max_length`` tokens.

    Each example's ``position_ids`` restart at 0, which is how transformers'
    attention masks (``masking_utils``) tell packed examples apart and keep
    them from attending to each other; its first label is -100, so no example
    is trained to predict the start of the next. :func:`check_packing` tests a
    model for this before training.
    """
    rows: list[_Row] = []
    for example in examples:
        ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
        if not rows or len(rows[-1].input_ids) + len(ids) > max_length:
            rows.append(_Row())
        row = rows[-1]
        row.input_ids += ids
        row.labels += [IGNORE] + labels[1:]
        row.position_ids += list(range(len(ids)))
    return [
        {
            "input_ids": torch.tensor(r.input_ids),
            "labels": torch.tensor(r.labels),
            "position_ids": torch.tensor(r.position_ids),
        }
        for r in rows
    ]


@torch.no_grad()
def check_packing(model: torch.nn.Module, rows: list[dict[str, torch.Tensor]]) -> None:
    """Refuse packing on a model whose examples would see each other in a packed row.

    Runs the row holding the most examples packed (as the collator passes it:
    restarting ``position_ids``, no attention mask, no cache) and each of its
    examples alone, and compares the logits.
    """
    counts = [int((r["position_ids"] == 0).sum()) for r in rows]
    if not counts or max(counts) < 2:
        return
    row = rows[counts.index(max(counts))]
    starts = (row["position_ids"] == 0).nonzero().flatten().tolist()
    bounds = list(zip(starts, starts[1:] + [len(row["input_ids"])]))
    ids, positions = row["input_ids"], row["position_ids"]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    packed = model(input_ids=ids[None].to(device), position_ids=positions[None].to(device), use_cache=False)
    packed = packed.logits[0].float()
    alone = torch.cat([model(input_ids=ids[None, a:b].to(device)).logits[0].float() for a, b in bounds])
    model.train(was_training)
    scale = alone.abs().max().clamp_min(1.0)
    if not torch.allclose(packed, alone, atol=1e-3 * scale.item(), rtol=0):
        raise RecipeError(
            f"data.packing: in {type(model).__name__} packed examples attend to each other (its attention does not "
            "tell examples apart by restarting position_ids), so packing would leak between examples; "
            "set data.packing=false"
        )


# -- generation ------------------------------------------------------------------------------------


def answer_prompts(
    conversations: list[list[Message]], tokenizer: Any, template: str | None = None, max_length: int | None = None
) -> list[tuple[list[int], str]]:
    """(tokenized prompt, expected answer) per conversation: everything before its last assistant turn, and that turn.

    A prompt longer than ``max_length`` keeps its last ``max_length`` tokens
    (the end, where the question and the generation prompt are).
    """
    prompts = []
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        text = render(messages[:last], tokenizer, template, generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append((ids[-max_length:] if max_length else ids, str(messages[last]["content"])))
    return prompts


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
    synced: bool = False,
) -> list[str]:
    """Greedy answers to tokenized prompts (left-padded in batches), decoded without special tokens.

    ``synced``: keep decoding until every process is done (``generate``'s ``synced_gpus``), as a
    sharded model needs.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(map(len, batch))
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, prompt in enumerate(batch):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced,
        )
        answers += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return answers


def exact_match(answers: list[str], expected: list[str]) -> float:
    """The fraction of answers equal to the expected ones, surrounding whitespace ignored."""
    return sum(a.strip() == e.strip() for a, e in zip(answers, expected, strict=True)) / len(expected)
