"""Instruction tuning of causal LMs: rendering, prompt masking token by token, truncation, packing, generation.

The byte tokenizer makes expected tokens computable by hand: each byte b is
token b + 3, and ``</s>`` (end of sequence) is token 1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import ByT5Tokenizer

from repeft import instruct
from repeft.dataio import collator
from repeft.recipe import RecipeError
from tiny_models import tiny_model

EOS = 1
USER = {"role": "user", "content": "is 7 prime?"}
ANSWER = {"role": "assistant", "content": "yes"}


@pytest.fixture(scope="module")
def tokenizer():
    return ByT5Tokenizer(extra_ids=0)


def ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]


def test_prompt_and_response_are_rendered_and_only_the_response_is_trained(tokenizer):
    example = instruct.encode_conversation([USER, ANSWER], tokenizer)
    prompt = ids("<|user|>\nis 7 prime?\n<|assistant|>\n")
    response = ids("yes") + [EOS]
    assert example["input_ids"] == prompt + response
    assert example["labels"] == [-100] * len(prompt) + response


def test_every_assistant_turn_of_a_conversation_is_trained_and_nothing_else(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, USER, ANSWER,
                {"role": "user", "content": "and 8?"}, {"role": "assistant", "content": "no"}]
    example = instruct.encode_conversation(messages, tokenizer)
    pieces = [("<|system|>\nbe brief\n<|user|>\nis 7 prime?\n<|assistant|>\n", False), ("yes", True),
              ("\n<|user|>\nand 8?\n<|assistant|>\n", False), ("no", True)]
    expected_ids, expected_labels = [], []
    for text, trained in pieces:
        tokens = ids(text) + ([EOS] if trained else [])
        expected_ids += tokens
        expected_labels += tokens if trained else [-100] * len(tokens)
    assert example["input_ids"] == expected_ids and example["labels"] == expected_labels


def test_a_tokenizers_own_template_is_used_and_its_end_of_turn_is_trained(tokenizer):
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    tokenizer = ByT5Tokenizer(extra_ids=0)
    tokenizer.chat_template = chatml
    example = instruct.encode_conversation([USER, ANSWER], tokenizer)
    prompt = ids("<|im_start|>user\nis 7 prime?<|im_end|>\n<|im_start|>assistant\n")
    response = ids("yes<|im_end|>\n")
    assert example["input_ids"] == prompt + response
    assert example["labels"] == [-100] * len(prompt) + response
    # A template given in the recipe (data.chat_template) wins over the tokenizer's.
    assert instruct.encode_conversation([USER, ANSWER], tokenizer, instruct.SIMPLE_CHAT_TEMPLATE)["input_ids"][-4:] == (
        ids("yes") + [EOS]
    )


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # Renders only the last message: the conversation so far is not a prefix of the whole.
    last_only = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(RecipeError, match="cannot be told apart; set data.chat_template"):
        instruct.encode_conversation([USER, ANSWER], tokenizer, last_only)


def test_truncation_is_counted_and_never_silent():
    def example(prompt, response):
        return {"input_ids": list(range(prompt + response)), "labels": [-100] * prompt + list(range(response))}

    encoded = [example(3, 2), example(4, 4), example(8, 2), example(2, 1)]  # lengths 5, 8, 10, 3
    kept, report = instruct.truncate(encoded, 6, "cut", "data.train")
    # 8 -> cut inside the response; 10 -> the prompt fills all 6 tokens: nothing to learn, left out.
    assert [len(e["input_ids"]) for e in kept] == [5, 6, 3]
    assert kept[1]["labels"] == [-100] * 4 + [0, 1]
    assert (report.overlong, report.cut_response, report.dropped, report.longest) == (2, 1, 1, 10)
    assert report.describe("data.train", 6, "cut") == (
        "data.train: 2 of 4 examples are longer than data.max_length=6 tokens (longest 10): cut to 6 tokens "
        "(1 lost response tokens); 1 left out in all; raise data.max_length to keep them whole"
    )
    kept, report = instruct.truncate(encoded, 6, "drop", "data.train")
    assert [len(e["input_ids"]) for e in kept] == [5, 3] and report.dropped == 2
    with pytest.raises(RecipeError, match="2 of 4 examples are longer than data.max_length=6 tokens"):
        instruct.truncate(encoded, 6, "error", "data.train")
    assert instruct.truncate(encoded, 10, "error", "data.train")[1].describe("data.train", 10, "error") is None


def as_tensors(examples):
    return [{k: torch.tensor(v) for k, v in e.items()} for e in examples]


def per_token_loss(model, batch):
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")


def test_packed_examples_train_exactly_as_they_would_alone(tokenizer):
    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                     for q, a in [("2+2", "4"), ("capital of France", "Paris"), ("hi", "hello"), ("7*6", "42")]]
    examples = as_tensors(instruct.encode_conversation(c, tokenizer) for c in conversations)
    rows = instruct.pack(examples, max_length=80)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples) and len(rows) < 4
    model = tiny_model("llama", vocab_size=260)
    instruct.check_packing(model, rows)  # does not raise: llama's masks read the restarting positions

    packed_batch = collator("causal_lm", pad_token_id=0)(rows)
    assert "attention_mask" not in packed_batch
    model.train()  # as in training (dropout is off in the tiny configs); a cache here would join the examples
    with torch.no_grad():
        packed = per_token_loss(model, packed_batch)[packed_batch["labels"][:, 1:] != -100]
        alone = torch.cat([per_token_loss(model, collator("causal_lm", 0)([e]))[0][e["labels"][1:] != -100]
                           for e in examples])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


class IgnoresPositions(torch.nn.Module):
    """A model whose examples would see each other in a packed row."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids=None, use_cache=None):
        return self.model(input_ids=input_ids)


@pytest.mark.parametrize("per_row", [1, 2, 3, 12])
def test_packing_is_accepted_where_examples_cannot_see_each_other_however_many_share_a_row(per_row, tokenizer):
    # The check once compared examples 2..n as one unpacked sequence, refusing every row of 3 or more.
    examples = as_tensors([instruct.encode_conversation([USER, ANSWER], tokenizer)] * per_row)
    rows = instruct.pack(examples, len(examples[0]["input_ids"]) * per_row)
    assert len(rows) == 1
    instruct.check_packing(tiny_model("llama", vocab_size=260), rows)


@pytest.mark.parametrize("per_row", [2, 3, 12])
def test_packing_is_refused_where_examples_would_attend_to_each_other(per_row, tokenizer):
    examples = as_tensors([instruct.encode_conversation([USER, ANSWER], tokenizer)] * per_row)
    rows = instruct.pack(examples, len(examples[0]["input_ids"]) * per_row)
    with pytest.raises(RecipeError, match="packed examples attend to each other"):
        instruct.check_packing(IgnoresPositions(tiny_model("llama", vocab_size=260)), rows)


def test_generation_is_greedy_decoding_and_batching_does_not_change_it(tokenizer):
    model = tiny_model("llama", vocab_size=260)
    prompts = [p for p, _ in instruct.answer_prompts([[USER, ANSWER], [{"role": "user", "content": "hi"}, ANSWER]],
                                                     tokenizer)]
    assert tokenizer.decode(prompts[1]) == "<|user|>\nhi\n<|assistant|>\n"
    (cut, expected), = instruct.answer_prompts([[USER, ANSWER]], tokenizer, max_length=5)
    assert cut == ids("nt|>\n") and expected == "yes"  # a long prompt keeps its end

    def greedy(prompt, steps=6):  # the reference: argmax of the full forward, one token at a time, no cache
        tokens = list(prompt)
        for _ in range(steps):
            with torch.no_grad():
                nxt = model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax().item()
            if nxt == EOS:
                break
            tokens.append(nxt)
        return tokenizer.decode(tokens[len(prompt):], skip_special_tokens=True)

    batched = instruct.generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert batched == [greedy(p) for p in prompts]
    assert instruct.exact_match(["spam ", "ham"], ["spam", "spam"]) == 0.5


def test_the_generation_log_shows_the_end_of_a_prompt_in_whole_words():
    # It printed prompt[-60:] as a repr: cut mid-word, with raw \n escapes (issue 27 item 5).
    from repeft.train.evaluation import prompt_tail

    prompt = "<|user|>\nIs this SMS message spam or ham?\nFree entry in 2 a wkly comp to win FA Cup final tkts\n<|assistant|>\n"
    shown = prompt_tail(prompt, width=60)
    assert shown.startswith("… ") and shown.endswith("tkts ⏎ <|assistant|>") and "\\n" not in shown
    assert shown.removeprefix("… ").split(" ")[0] in prompt.split()  # a whole word, not its end
    assert prompt_tail("<|user|>\nhi\n<|assistant|>\n") == "<|user|> ⏎ hi ⏎ <|assistant|>"
