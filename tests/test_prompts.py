from __future__ import annotations

from selfreward.stages.prompts import DuplicateIndex, extract_instruction, few_shot_prompt
from selfreward.templates import load_template


def test_exact_and_near_duplicates_are_caught():
    index = DuplicateIndex(threshold=0.6)
    index.add("Write a short poem about the sea at night.")
    assert index.is_duplicate("write a short poem about the SEA at night!")
    assert index.is_duplicate("Write a short poem about the sea at night, please.")
    assert not index.is_duplicate("Explain how a refrigerator keeps food cold.")


def test_extract_instruction_stops_at_the_next_task():
    assert extract_instruction(" Name three rivers in Asia.\nTask 10: something else") == "Name three rivers in Asia."
    assert extract_instruction("Task 9: Describe rain.") == "Describe rain."


def test_few_shot_prompt_numbers_the_examples_and_asks_for_the_next():
    template = load_template(None, "self_instruct.txt", ("examples", "next"))
    prompt = few_shot_prompt(template, ["First\ntask", "Second task"])
    assert "Task 1: First task\nTask 2: Second task\n" in prompt
    assert prompt.rstrip().endswith("Task 3:")


def test_samples_per_prompt_draws_several_candidates_from_each_few_shot_prompt(tmp_path):
    from selfreward.backends.base import Backend, Completion
    from selfreward.recipe import PromptsSection
    from selfreward.run.jsonl import read_jsonl
    from selfreward.stages.prompts import run_prompts

    class Writer(Backend):
        tokenizer = None
        calls: list[tuple[int, int]] = []

        def text_prompt(self, text):
            return text

        def generate(self, prompts, n, sampling):
            self.calls.append((len(prompts), n))
            return [[Completion(f"Describe animal number {i * n + j} in one line.", 8, True) for j in range(n)]
                    for i, _ in enumerate(prompts)]

        def next_token_probs(self, prompts, token_ids):
            raise NotImplementedError

    writer = Writer()
    config = PromptsSection(count=30, round_size=10, samples_per_prompt=4, shots=2)
    result = run_prompts(writer, ["Name a river.", "Write a poem.", "Explain tides."], config, tmp_path / "prompts.jsonl", 1,
                         lambda number: number)
    assert writer.calls[0] == (3, 4)  # ceil(10 / 4) few-shot prompts, 4 candidates each
    rounds = read_jsonl(tmp_path / "prompts.rounds.jsonl")
    assert [r["generated"] for r in rounds] == [10] * len(rounds)  # the 2 extra samples of a round are not used
    assert result["prompts"] == len(read_jsonl(tmp_path / "prompts.jsonl")) > 0
