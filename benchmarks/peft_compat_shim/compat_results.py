"""The pure parts of the PEFT-compatibility measure: which tests count, test keys, junit parsing, classification."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Test ids naming LoRA but belonging to another PEFT method (their own tuners, not LoRA options).
# LoraConfig options (DoRA, BD-LoRA, MonteCLoRA, ...) count as LoRA.
OTHER_LORA_METHODS = ("adalora", "vblora", "randlora", "tinylora", "unilora", "delora", "xlora", "gralora", "glora", "lorafa", "lora_fa",
                      "loraplus", "lora_plus")
NETWORK_ERRORS = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "huggingface.co", "ConnectionError",
                  "MaxRetryError", "outgoing traffic has been disabled", "HF_HUB_OFFLINE")
REFUSAL_TYPES = ("ValueError", "TypeError", "NotImplementedError", "TargetError", "AdapterFileError",
                 "UnknownAdapterError", "RecipeError", "CheckpointError")
REFUSAL_WORDS = ("repeft", "not supported", "does not take", "refuse", "not implemented")


def is_lora_test(key: str) -> bool:
    """A test of PEFT's LoRA (DoRA and other LoraConfig options included), not of a LoRA-derived method."""
    low = key.lower()
    return "lora" in low and not any(other in low for other in OTHER_LORA_METHODS)


def nodeid_key(nodeid: str) -> str:
    """``file.py::Class::test[id]`` -> ``file::Class::test[id]``, the form ``junit_key`` gives too."""
    parts = nodeid.split("::")
    return "::".join([Path(parts[0]).stem, *parts[1:]])


def junit_key(classname: str, name: str) -> str:
    """junit's ``tests.test_x.Class`` + ``test[id]`` -> ``test_x::Class::test[id]``."""
    dotted = classname.split(".")
    stems = [i for i, part in enumerate(dotted) if part.startswith("test_")]
    start = stems[-1] if stems else len(dotted) - 1
    return "::".join([*dotted[start:], name])


def normalise(key: str, renames: dict[str, str]) -> str:
    """A shimmed run's key in PEFT's spelling (class names printed in parametrised ids differ)."""
    for own, peft_name in renames.items():
        key = re.sub(rf"\b{re.escape(own)}\b", peft_name, key)
    return key


def spread(items: list, limit: int | None) -> list:
    """At most ``limit`` items, evenly spaced over the list (so every test class is sampled), in order."""
    if limit is None or len(items) <= limit:
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


@dataclass(frozen=True)
class Outcome:
    key: str
    status: str  # passed, failed, error, skipped
    kind: str = ""  # exception type
    message: str = ""


def read_junit(path: Path, renames: dict[str, str] | None = None) -> dict[str, Outcome]:
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        key = normalise(junit_key(case.get("classname", ""), case.get("name", "")), renames or {})
        status, kind, message = "passed", "", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status = "failed" if tag == "failure" else tag
                message = node.get("message") or ""
                kind = exception_type(message, node.text or "")
                break
        outcomes[key] = Outcome(key, status, kind, message)
    return outcomes


def exception_type(message: str, text: str) -> str:
    """The exception's class name, from junit's message ("ValueError: ...") or the traceback's ``E   X:`` line."""
    match = re.match(r"([\w.]+(?:Error|Exception|Warning|Timeout|Interrupt|Exit|Skipped)):", message)
    if match:
        return match.group(1).rsplit(".", 1)[-1]
    for line in text.splitlines():
        match = re.match(r"E\s+([\w.]+):", line)
        if match:
            return match.group(1).rsplit(".", 1)[-1]
    return "AssertionError" if message.startswith("assert") else "other"


def needs_network(outcome: Outcome) -> bool:
    return outcome.status != "passed" and any(word in outcome.message for word in NETWORK_ERRORS)


def classify(outcome: Outcome | None) -> str:
    """A test that passes under PEFT, as it ends under repeft."""
    if outcome is None:
        return "not collected"
    if outcome.status == "passed":
        return "passed"
    if outcome.status == "skipped":
        return "skipped"
    low = outcome.message.lower()
    if outcome.kind == "NotInRepeft" or "is not provided by repeft" in low:
        return "missing name"
    if outcome.kind == "TestTimeout":
        return "timeout"
    if outcome.kind in REFUSAL_TYPES and any(word in low for word in REFUSAL_WORDS):
        return "refused by name"
    if outcome.kind == "TypeError" and "unexpected keyword argument" in low:
        return "unexpected argument"  # a PEFT argument repeft neither takes nor refuses by name
    return "failed"


def reason(outcome: Outcome) -> str:
    """A failure's reason with numbers and quoted values blurred, so alike failures count together."""
    first = outcome.message.strip().splitlines()[0] if outcome.message.strip() else outcome.kind
    first = re.sub(r"0x[0-9a-f]+", "0x…", first)
    first = re.sub(r"\d+(\.\d+)?", "N", first)
    return first[:160]


def compare(baseline: dict[str, Outcome], shimmed: dict[str, Outcome], selected: list[str]) -> dict:
    """Per group (test file): tests passing under PEFT, how those end under repeft, and the top reasons."""
    groups: dict[str, dict] = {}
    for key in selected:
        group = groups.setdefault(key.split("::")[0], {"selected": 0, "needs_network": 0, "peft_passed": 0,
                                                         "outcomes": Counter(), "reasons": {}})
        group["selected"] += 1
        base = baseline.get(key)
        if base is None or base.status != "passed":
            group["needs_network"] += base is not None and needs_network(base)
            continue
        group["peft_passed"] += 1
        ours = shimmed.get(key)
        category = classify(ours)
        group["outcomes"][category] += 1
        if category not in ("passed", "not collected"):
            group["reasons"].setdefault(category, Counter())[reason(ours)] += 1
    return {name: _finish(group) for name, group in groups.items()}


def _finish(group: dict) -> dict:
    passed = group["outcomes"]["passed"]
    return {
        "selected": group["selected"],
        "needs_network": group["needs_network"],
        "peft_passed": group["peft_passed"],
        "repeft_passed": passed,
        "share": round(passed / group["peft_passed"], 4) if group["peft_passed"] else None,
        "outcomes": dict(group["outcomes"].most_common()),
        "top_reasons": {cat: reasons.most_common(8) for cat, reasons in group["reasons"].items()},
    }


def total(groups: dict[str, dict]) -> dict:
    peft_passed = sum(g["peft_passed"] for g in groups.values())
    outcomes: Counter = Counter()
    for g in groups.values():
        outcomes.update(g["outcomes"])
    passed = outcomes["passed"]
    return {"selected": sum(g["selected"] for g in groups.values()),
            "needs_network": sum(g["needs_network"] for g in groups.values()),
            "peft_passed": peft_passed, "repeft_passed": passed,
            "share": round(passed / peft_passed, 4) if peft_passed else None, "outcomes": dict(outcomes.most_common())}


def markdown(groups: dict[str, dict]) -> str:
    categories = ["passed", "refused by name", "missing name", "unexpected argument", "failed", "timeout", "skipped",
                  "not collected"]
    head = "| group | selected | PEFT passes | repeft passes | share | " + " | ".join(categories[1:]) + " |"
    rows = [head, "|" + "---|" * (5 + len(categories) - 1)]
    for name, g in [*groups.items(), ("total", total(groups))]:
        share = "–" if g["share"] is None else f"{100 * g['share']:.1f}%"
        cells = [str(g["outcomes"].get(c, 0)) for c in categories[1:]]
        rows.append(f"| {name} | {g.get('selected', '')} | {g['peft_passed']} | {g['repeft_passed']} | {share} | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
