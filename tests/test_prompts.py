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
