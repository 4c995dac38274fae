"""The easy-vqa dataset (PyPI `easy-vqa`, MIT): 64x64 images of one coloured shape, with questions.

Answers are one of 13 words (3 shapes, 8 colours, yes/no). The default model answers in a short sentence
("Circle.", "Red.", "Green. Is it red? No."); scoring reads the answer word back
out of the reply:

    normalise(reply) = lower case, punctuation removed, split on spaces
    predicted answer = the last word of the normalised reply that is one of the 13 answers (its conclusion)
    correct          = predicted answer == the dataset's answer

Answers outside that vocabulary (a user's JSONL file) count as correct when their normalised words appear,
in order, in the normalised reply.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from vtw_core.errors import InputError

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
YES_NO = ("yes", "no")


@dataclass(frozen=True)
class VQAItem:
    image: str  # path
    question: str
    answer: str


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as error:
        raise InputError("the easy-vqa dataset needs its package: pip install easy-vqa") from error
    return easy_vqa


def answers() -> list[str]:
    return list(_easy_vqa().get_answers())


def load_split(split: str = "test") -> list[VQAItem]:
    """Every question of a split, in the package's order."""
    dataset = _easy_vqa()
    if split == "train":
        questions, labels, image_ids = dataset.get_train_questions()
        paths = dataset.get_train_image_paths()
    elif split == "test":
        questions, labels, image_ids = dataset.get_test_questions()
        paths = dataset.get_test_image_paths()
    else:
        raise InputError(f"easy-vqa has the splits train and test, not {split!r}")
    return [VQAItem(paths[i], q, a) for q, a, i in zip(questions, labels, image_ids, strict=True)]


def load_jsonl(path: str | Path) -> list[VQAItem]:
    """Rows of {"image": path relative to the file, "question": ..., "answer": ...}."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"evaluation file not found: {path}")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
                items.append(VQAItem(str(path.parent / row["image"]), row["question"], str(row["answer"])))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise InputError(f"{path.name}, line {number}: expected image, question and answer") from error
    return items


def answer_sentence(answer: str, question: str = "", attributes: tuple[str | None, str | None] = (None, None)) -> str:
    """The short reply the default model is trained to give for easy-vqa's one-word answer.

    Its first word is always read off the image, so that the paper's K criterion (KL at the last prompt
    position, where the model is about to say that word) measures whether the image has reached the text:
    shape and colour questions are answered by the word itself ("Circle.", "Blue."); a yes/no question that
    names one shape or colour, when the image's one of that kind is known, opens with what the image shows,
    then restates the question and answers it: "Green. Is it red? No.", "Triangle. Is it not a circle? Yes."
    The final word then follows from words of the reply itself (seen word, asked word, "not").
    Otherwise yes/no answers are "Yes." / "No.".
    """
    answer = answer.strip().lower()
    if answer in YES_NO:
        named, negated = yes_no_subject(question)
        shape, colour = attributes
        seen = shape if named in SHAPES else colour
        if named is None or seen is None:
            return answer.capitalize() + "."
        article = "a " if named in SHAPES else ""
        return f"{seen.capitalize()}. Is it {'not ' if negated else ''}{article}{named}? {answer.capitalize()}."
    return f"{answer.capitalize()}."


def image_attributes(pairs: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """(shape, colour) of an image as its questions and answers state them; None where none of them says.

    "what shape ...?" and "what color ...?" answer directly; a yes/no question names one shape or colour and
    asserts it unless negated ("is there not a ...", "does the image not contain ...", "is no ... present").
    """
    found: dict[str, str] = {}
    for question, answer in pairs:
        if answer in SHAPES or answer in COLOURS:
            found["shape" if answer in SHAPES else "colour"] = answer
            continue
        named, negated = yes_no_subject(question)
        if answer in YES_NO and named is not None and (answer == "yes") != negated:
            found["shape" if named in SHAPES else "colour"] = named
    return found.get("shape"), found.get("colour")


def yes_no_subject(question: str) -> tuple[str | None, bool]:
    """The one shape or colour a yes/no question names (None if not exactly one), and whether it is negated."""
    words = normalise(question)
    named = [word for word in words if word in SHAPES or word in COLOURS]
    return (named[0] if len(named) == 1 else None), ("not" in words or "no" in words)


def normalise(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split()


def predicted_answer(reply: str, vocabulary: list[str] | tuple[str, ...]) -> str | None:
    """The reply's last word from the answer vocabulary: its conclusion ("Is it red? It is green, so no." -> no)."""
    words = set(vocabulary)
    return next((word for word in reversed(normalise(reply)) if word in words), None)


def is_correct(reply: str, answer: str, vocabulary: list[str] | tuple[str, ...]) -> bool:
    """Normalised match: the last answer word in the reply equals the expected answer (any answer vocabulary)."""
    expected = " ".join(normalise(answer))
    if expected not in vocabulary:  # free-form answers (JSONL): the answer's words, in order, in the reply
        return f" {expected} " in f" {' '.join(normalise(reply))} "
    return predicted_answer(reply, vocabulary) == expected
