"""Answer parsing on the outputs a model actually produces, including the tricky ones."""

import pytest

from mmcoconut.text.answers import ParsedAnswer, direct_answer_from, normalize_choice_text, parse_answer

CHOICES = ["hat", "umbrella", "coat", "bag"]


def letter_of(text, choices=CHOICES):
    return parse_answer(text, choices).letter


@pytest.mark.parametrize(
    "text",
    [
        "Answer: B. umbrella",
        "Answer: B. umbrella<|im_end|>",
        "Answer: B",
        "Answer: B.",
        "Answer: (B)",
        "Answer: B)",
        "Answer: (B) umbrella",
        "Answer: B) umbrella",
        "Answer: B umbrella",
        "Answer:B.umbrella",
        "Answer: b. umbrella",
        "Answer: b",
        "Answer: (b)",
        "Answer: B.  UMBRELLA.",
        "answer: B. umbrella",
        "  Answer: B. umbrella  \n",
    ],
)
def test_accepted_letter_forms(text):
    assert parse_answer(text, CHOICES) == ParsedAnswer(letter="B", choice_text="umbrella")


def test_reasoning_that_mentions_letters_and_choice_words_is_ignored():
    text = (
        "A man stands in the street.\n"
        "A hat, a coat and an umbrella are visible; option A looks plausible.\n"
        "The answer: A is wrong because it rains.\n"
        "Answer: B. umbrella<|im_end|>"
    )
    assert letter_of(text) == "B"


def test_last_answer_line_wins():
    assert letter_of("Answer: A. hat\nOn second thought.\nAnswer: C. coat") == "C"


def test_malformed_last_answer_does_not_fall_back_to_an_earlier_one():
    parsed = parse_answer("Answer: A. hat\nAnswer: E", CHOICES)
    assert parsed.letter is None and parsed.choice_text is None
    assert "E" in parsed.reason


def test_text_after_end_of_turn_is_ignored():
    # Padding of a batched generate, or a continuation past the end of the turn.
    assert letter_of("Answer: D. bag<|im_end|>\nAnswer: A. hat") == "D"
    assert letter_of("Answer: D. bag<|endoftext|><|endoftext|>") == "D"


def test_trailing_lines_after_the_answer_are_ignored():
    assert letter_of("Answer: B. umbrella\nIt keeps the man dry.") == "B"


def test_answer_right_after_latents():
    text = "<|start-latent|><|latent|><|latent|><|end-latent|>Answer: D. bag<|im_end|>"
    assert letter_of(text) == "D"


@pytest.mark.parametrize(
    ("text", "letter", "choice"),
    [
        ("Answer: umbrella", "B", "umbrella"),
        ("Answer: Umbrella.", "B", "umbrella"),
        # A word starting with a choice letter is a word, not that letter.
        ("Answer: Bag", "D", "bag"),
        ("Answer: coat<|im_end|>", "C", "coat"),
    ],
)
def test_choice_text_without_letter(text, letter, choice):
    assert parse_answer(text, CHOICES) == ParsedAnswer(letter=letter, choice_text=choice)


def test_text_that_starts_like_a_letter_is_read_as_text():
    choices = ["car", "train", "a red bus", "bike"]
    assert letter_of("Answer: a red bus", choices) == "C"
    assert letter_of("Answer: A. car", choices) == "A"


def test_single_letter_choices_prefer_the_letter():
    choices = ["d", "c", "b", "a"]
    assert parse_answer("Answer: B", choices) == ParsedAnswer(letter="B", choice_text="c")
    assert letter_of("Answer: A. d", choices) == "A"
    assert letter_of("Answer: A. a", choices) is None


def test_prediction_is_the_dataset_choice_verbatim():
    choices = ["Hat", "Umbrella", "Coat", "Bag"]
    assert parse_answer("Answer: b. umbrella", choices).choice_text == "Umbrella"


@pytest.mark.parametrize(
    ("text", "reason_part"),
    [
        ("Answer: A. umbrella", "letter A is 'hat'"),
        ("Answer: A umbrella", "letter A is 'hat'"),
        ("Answer: E", "not among A-D"),
        ("Answer: E. umbrella", "not among A-D"),
        ("The man holds an umbrella, so B.", "no 'Answer:'"),
        ("B. umbrella", "no 'Answer:'"),
        ("", "no 'Answer:'"),
        ("Answer:", "empty answer"),
        ("Answer:   <|im_end|>", "empty answer"),
        ("Answer:\nB. umbrella", "empty answer"),
        ("Answer: raincoat", "matches no single choice"),
        ("Answer: I think B", "not among A-D"),
        ("Answer: B, umbrella", "matches no single choice"),
    ],
)
def test_unparseable(text, reason_part):
    parsed = parse_answer(text, CHOICES)
    assert parsed.letter is None and parsed.choice_text is None and parsed.index is None
    assert not parsed.is_parsed
    assert reason_part in parsed.reason


def test_text_matching_two_choices_is_unparseable():
    parsed = parse_answer("Answer: Coat", ["coat", "hat", "COAT ", "bag"])
    assert parsed.letter is None and "no single choice" in parsed.reason


def test_letter_beyond_fewer_choices():
    assert parse_answer("Answer: C", ["yes", "no"]).reason == "letter C is not among A-B"


@pytest.mark.parametrize("choices", [[], ["x"] * 27, ["a", None]])
def test_invalid_choices_raise(choices):
    with pytest.raises(ValueError, match="choices must be"):
        parse_answer("Answer: A", choices)


def test_parsed_answer_properties():
    parsed = parse_answer("Answer: C. coat", CHOICES)
    assert parsed.index == 2 and parsed.is_parsed and parsed.reason is None


def test_direct_answer_is_the_chosen_choice_text():
    assert direct_answer_from(parse_answer("Answer: B", ["Hat", "umbrella", "c", "d"])) == "umbrella"
    assert direct_answer_from(parse_answer("no answer", CHOICES)) is None


def test_normalize_choice_text():
    assert normalize_choice_text("  Fire  Hydrant. ") == "fire hydrant"
    assert normalize_choice_text("U.S.") == "u.s"
