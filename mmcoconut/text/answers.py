"""Parse the multiple-choice answer out of a generated A-OKVQA completion.

The model is trained to end its turn with an answer line naming a letter and the choice text::

    The man holds something over his head.
    It is raining.
    Answer: B. umbrella<|im_end|>

Reasoning steps may mention letters and choice words, so only the last ``Answer:`` is read. An
output that cannot be read unambiguously is unparseable (``ParsedAnswer.letter is None``, with the
reason) and scores as wrong; it is never mapped to a default choice.
"""

import re
from dataclasses import dataclass
from typing import Optional, Sequence

# Generation stops at the end of the assistant turn; anything decoded after it (padding of a
# batched generate, or a runaway continuation) is not part of the answer.
_END_OF_TURN = re.compile(r"<\|im_end\|>|<\|endoftext\|>")
# Anywhere on a line, not only at its start: in Coconut mode the answer follows the latents
# directly (`<|end-latent|>Answer: B. umbrella`).
_ANSWER_KEY = re.compile(r"\banswer\s*:", re.IGNORECASE)
# `(B) text`, `B) text`, `B. text` or a bare `B text`; the letter must stand alone, so `Bus` is a
# word, not the letter B.
_LETTER = re.compile(r"\((?P<paren>[A-Za-z])\)|(?P<delim>[A-Za-z])[.)]|(?P<bare>[A-Za-z])(?=\s|$)")


@dataclass(frozen=True)
class ParsedAnswer:
    """The choice read from a completion.

    Attributes:
        letter: `"A"`, `"B"`, ... or `None` when the output is unparseable.
        choice_text: the chosen entry of `choices`, verbatim (so it compares equal to the dataset's
            choice), or `None` when unparseable.
        reason: why the output is unparseable; `None` when it was parsed.
    """

    letter: Optional[str]
    choice_text: Optional[str]
    reason: Optional[str] = None

    @property
    def index(self) -> Optional[int]:
        """Index of the chosen choice, or `None` when unparseable."""
        return None if self.letter is None else ord(self.letter) - ord("A")

    @property
    def is_parsed(self) -> bool:
        """Whether a choice was read."""
        return self.letter is not None


def normalize_choice_text(text: str) -> str:
    """Case- and spacing-insensitive form used to compare a written choice with the choices.

    Casefolds, collapses whitespace and drops a sentence-final period (`"Umbrella."` matches
    `"umbrella"`). Used only to *recognise* a choice; the prediction is always the dataset's own
    choice string.
    """
    return " ".join(text.casefold().split()).rstrip(".").rstrip()


def _unparseable(reason: str) -> ParsedAnswer:
    return ParsedAnswer(letter=None, choice_text=None, reason=reason)


def _choice(index: int, choices: Sequence[str]) -> ParsedAnswer:
    return ParsedAnswer(letter=chr(ord("A") + index), choice_text=choices[index])


def _match_text(text: str, choices: Sequence[str]) -> Optional[int]:
    target = normalize_choice_text(text)
    matches = [i for i, c in enumerate(choices) if normalize_choice_text(c) == target]
    return matches[0] if len(matches) == 1 else None


def read_answer_line(text: str):
    """`(answer, None)`: the text of the last `Answer:` line (rules 1-2 of `parse_answer`), or `(None, reason)`.

    The answer of a question without choices (free text), and the first step of `parse_answer`.

    Example:
        >>> read_answer_line("It rains.\\nAnswer: an umbrella<|im_end|>")
        ('an umbrella', None)
    """
    text = _END_OF_TURN.split(text, maxsplit=1)[0]
    keys = list(_ANSWER_KEY.finditer(text))
    if not keys:
        return None, "no 'Answer:' in the output"
    body = text[keys[-1].end() :].split("\n", 1)[0].split("<|", 1)[0].strip()
    if not body:
        return None, "empty answer after the last 'Answer:'"
    return body, None


def parse_answer(text: str, choices: Sequence[str]) -> ParsedAnswer:
    """Read the multiple-choice answer from a generated completion.

    Rules, in order:

    1. The text is cut at the first end-of-turn token (`<|im_end|>`, `<|endoftext|>`).
    2. Only the last `Answer:` (case-insensitive) counts; its answer is the rest of that line, up
       to the next special token `<|...|>`. Earlier `Answer:` lines and reasoning are ignored.
    3. A letter written `B`, `B.`, `B)` or `(B)` (either case), optionally followed by the choice
       text, picks that choice if the text names that same choice (case- and
       spacing-insensitive).
    4. Otherwise an answer equal to exactly one choice's text (case- and spacing-insensitive)
       picks it; this covers plain texts (`umbrella`) and texts that merely start like a letter
       (`a red bus`).
    5. Anything else is unparseable: no `Answer:`, an empty answer, a letter beyond the choices
       (`Answer: E` with four choices), a letter whose following text names another choice (the
       model contradicted itself), or a text that matches no choice or several.

    Args:
        text: the decoded completion (special tokens may be kept).
        choices: the question's choices, in letter order.

    Returns:
        A `ParsedAnswer`; when unparseable, `letter` and `choice_text` are `None` and `reason`
        says why.

    Example:
        >>> choices = ["hat", "umbrella", "coat", "bag"]
        >>> parse_answer("It rains.\\nAnswer: B. umbrella<|im_end|>", choices)
        ParsedAnswer(letter='B', choice_text='umbrella', reason=None)
    """
    if not 1 <= len(choices) <= 26 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"choices must be 1 to 26 strings, got {choices!r}")

    body, reason = read_answer_line(text)
    if body is None:
        return _unparseable(reason)

    letter_match = _LETTER.match(body)
    if letter_match is not None:
        letter = next(g for g in letter_match.groups() if g is not None).upper()
        index = ord(letter) - ord("A")
        rest = body[letter_match.end() :].strip()
        names_letter_choice = index < len(choices) and (
            not rest or normalize_choice_text(rest) == normalize_choice_text(choices[index])
        )
        if names_letter_choice:
            return _choice(index, choices)
    # A body such as `a red bus` or `U.S. army` starts like a letter but is a choice's whole text.
    text_index = _match_text(body, choices)
    if text_index is not None:
        return _choice(text_index, choices)
    if letter_match is None:
        return _unparseable(f"answer text {body!r} matches no single choice of {list(choices)}")
    if index >= len(choices):
        return _unparseable(f"letter {letter} is not among A-{chr(ord('A') + len(choices) - 1)}")
    return _unparseable(f"letter {letter} is {choices[index]!r} but the text says {rest!r}")


def direct_answer_from(parsed: ParsedAnswer) -> Optional[str]:
    """The direct-answer (DA) prediction for a multiple-choice model: the chosen choice's text.

    A-OKVQA practice for models that answer multiple choice: the DA prediction is the text of the
    selected choice, scored against the ten free-form human answers (choices are drawn from the
    same answer vocabulary, so an exact match is possible). An unparseable answer has no DA
    prediction (`None`), which scores as wrong.
    """
    return parsed.choice_text


__all__ = ["ParsedAnswer", "parse_answer", "read_answer_line", "direct_answer_from", "normalize_choice_text"]
