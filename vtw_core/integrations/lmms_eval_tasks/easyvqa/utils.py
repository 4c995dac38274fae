"""easy-vqa as lmms-eval tasks: the questions of vtw_core.training.easyvqa, in its order, scored by its rule.

The documents come from the easy-vqa package on disk (no dataset hub): the task classes build them instead
of downloading. Each document is one question; images stay paths until a request needs them.

`easyvqa` generates a reply and scores it as `python -m vtw_core eval` does. `easyvqa_mc` is the multiple-
choice form (loglikelihood requests) of its shape and colour questions: the choices are the replies the
default model is trained to give ("It is a circle.", "The shape is red."), one per possible answer.
"""

from __future__ import annotations

from typing import Any

import datasets
from lmms_eval.api.task import ConfigurableTask
from PIL import Image

from vtw_core.models.images import load_image
from vtw_core.training.easyvqa import COLOURS, SHAPES, answer_sentence, answers, is_correct, load_split


class EasyVQATask(ConfigurableTask):
    def __init__(self, *args: Any, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        config = {key: value for key, value in (config or {}).items() if key != "class"}
        super().__init__(*args, config=config, **kwargs)

    def download(self, dataset_kwargs: dict[str, Any] | None = None) -> None:
        split = self.config.test_split
        rows = [
            {"question_id": index, "image": item.image, "question": item.question, "answer": item.answer}
            for index, item in enumerate(load_split(split))
            if self.keeps(item.answer)
        ]
        self.dataset = datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
        self.dataset_no_image = self.dataset  # no image column: the paths are plain strings

    def keeps(self, answer: str) -> bool:
        return True


class EasyVQAChoiceTask(EasyVQATask):
    def keeps(self, answer: str) -> bool:
        return answer in SHAPES or answer in COLOURS


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [load_image(doc["image"])]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"accuracy": float(is_correct(results[0], doc["answer"], answers()))}


def _candidates(doc: dict[str, Any]) -> tuple[str, ...]:
    return SHAPES if doc["answer"] in SHAPES else COLOURS


def doc_to_choice(doc: dict[str, Any]) -> list[str]:
    return [answer_sentence(answer) for answer in _candidates(doc)]


def doc_to_target(doc: dict[str, Any]) -> int:
    return _candidates(doc).index(doc["answer"])
