"""VQA evaluation: scoring rules, the eval command on a tiny model, and the train-only calibration."""

from __future__ import annotations

import json
import re

import pytest

from vtw_core.benchmarks import evaluate
from vtw_core.benchmarks.evaluate import (
    conversations_of,
    evaluate_side,
    evaluate_turns,
    load_items,
    train_calibration,
)
from vtw_core.cli import main
from vtw_core.generation.manager import ModelManager
from vtw_core.training.data import load_split as load_train_images
from vtw_core.training.easyvqa import (
    answer_sentence,
    answers,
    image_attributes,
    is_correct,
    load_split,
    normalise,
    predicted_answer,
)


def test_easy_vqa_is_available_offline():
    train, test = load_split("train"), load_split("test")
    assert (len(train), len(test)) == (38575, 9673)
    assert len({item.image for item in test}) == 1000
    assert set(answers()) == {item.answer for item in test}
    assert len(answers()) == 13


def test_scoring_rules():
    vocabulary = answers()
    assert normalise("It is a Circle!") == ["it", "is", "a", "circle"]
    assert predicted_answer("It is a circle.", vocabulary) == "circle"
    assert is_correct("It is a circle.", "circle", vocabulary)
    assert is_correct("Green. Is it red? No.", "no", vocabulary)  # the last answer word is the conclusion
    assert not is_correct("Green. Is it red? No.", "green", vocabulary)
    assert not is_correct("No, it is a red circle.", "no", vocabulary)
    assert is_correct("Yes.", "yes", vocabulary) and not is_correct("No.", "yes", vocabulary)
    assert not is_correct("I cannot tell.", "blue", vocabulary)
    assert is_correct("There are 2 cats.", "2 cats", [])  # free-form answers: words in order
    assert not is_correct("There are 22 cats.", "2 cats", [])
    for answer in vocabulary:  # every reply the default model is taught scores as its answer
        assert is_correct(answer_sentence(answer), answer, vocabulary)
        assert is_correct(answer_sentence(answer, "is there a red shape?", ("triangle", "teal")), answer, vocabulary)


def test_replies_open_with_what_the_image_shows():
    """The first reply word is read off the image (so the paper's last-prompt-position KL can see whether the
    image has reached the text); yes/no replies then restate the question and answer it."""
    assert answer_sentence("circle") == "Circle." and answer_sentence("blue") == "Blue."
    assert answer_sentence("no", "is there a red shape?", ("circle", "green")) == "Green. Is it red? No."
    assert (
        answer_sentence("yes", "does the image not contain a circle?", ("triangle", "red"))
        == "Triangle. Is it not a circle? Yes."
    )
    assert answer_sentence("yes", "is there a red shape?", ("circle", None)) == "Yes."  # colour unknown
    # Over the whole train split, each yes/no reply opens with the image's own attribute of the asked kind, is
    # self-consistent (its conclusion follows from the seen word, the negation and the asked word) and agrees
    # with the dataset's answer.
    pattern = re.compile(r"(\w+)\. Is it (not )?(?:a )?(\w+)\? (Yes|No)\.")
    restated = 0
    for _path, pairs in load_train_images("train"):
        attributes = image_attributes(pairs)
        for question, answer in pairs:
            match = pattern.fullmatch(answer_sentence(answer, question, attributes))
            if match:
                seen, negated, asked, conclusion = match.groups()
                assert seen.lower() in attributes, question
                assert conclusion.lower() == answer == ("yes" if (asked == seen.lower()) != bool(negated) else "no")
                restated += 1
    assert restated > 25000  # nearly all of the split's 28,407 yes/no questions


def test_calibration_comes_from_the_train_split():
    samples = train_calibration(20)
    train_questions = {item.question for item in load_split("train")}
    assert len(samples) == 20 and all(sample.question in train_questions for sample in samples)
    test_images = {item.image for item in load_split("test")}
    assert not any(
        sample.images[0].filename in test_images for sample in samples if hasattr(sample.images[0], "filename")
    )


def test_evaluate_counts_and_flops(tiny_model_path):
    manager = ModelManager.load(str(tiny_model_path("llava", 8)), device="cpu")
    items = load_items("easy-vqa", "test", limit=10)
    seen = []
    base = evaluate_side(manager.model, manager.processor, items, None, batch_size=4,
                         progress=lambda done, total: seen.append(done))  # fmt: skip
    vtw = evaluate_side(manager.model, manager.processor, items, 2, batch_size=4)
    assert seen == [4, 8, 10] and base.questions == 10 and 0 <= base.correct <= 10
    assert vtw.prefill_flops < base.prefill_flops and vtw.k == 2
    # Batching doesn't change the answers: one by one gives the same score.
    assert evaluate_side(manager.model, manager.processor, items, 2, batch_size=1).correct == vtw.correct


def test_eval_command_json(capsys, tiny_model_path, tmp_path, sample_images):
    sample_images[0].save(tmp_path / "red.png")
    rows = [{"image": "red.png", "question": "What colour?", "answer": "red"}] * 3
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    model = str(tiny_model_path("llava", 8))
    plot = tmp_path / "k.png"
    argv = ["eval", "--model", model, "--data", str(tmp_path / "set.jsonl"), "--k", "3", "--all-k", "--json"]
    code = main([*argv, "--plot-k", str(plot)])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out.strip().splitlines()[-1])
    assert report["num_layers"] == 8 and report["questions"] == 3
    assert report["vtw"]["k"] == 3 and {"accuracy", "time_s", "prefill_flops"} <= set(report["baseline"])
    assert [row["k"] for row in report["accuracy_per_k"]] == list(range(8))
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert main([*argv[:-2], "--plot-k", str(plot)]) == 2 and "--plot-k needs --all-k" in capsys.readouterr().err
    code = main(["eval", "--model", model, "--data", "easy-vqa", "--limit", "4", "--k", "auto", "--eta", "100",
                 "--json"])  # fmt: skip
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["vtw"]["k"] == 5 and [p["k"] for p in report["kl_curve"]] == [5, 6, 7]
    assert main(["eval", "--model", model, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "--model", model, "--limit", "2", "--k", "auto", "--eta", "0"]) == 2
    assert "no K meets eta" in capsys.readouterr().err


def test_eval_shares_each_images_prefill_unless_told_not_to(capsys, tiny_model_path, tmp_path, sample_images):
    """Questions about one image share its prefill by default; the report (replies scored, FLOPs per question
    alone) is the one of every prefill in full, and `--no-shared-prefill` runs those."""
    for index, image in enumerate(sample_images[:2]):
        image.save(tmp_path / f"{index}.png")
    questions = ["What colour?", "Is there a circle in it?", "Shape?"]
    rows = [{"image": f"{i}.png", "question": q, "answer": "red"} for i in range(2) for q in questions]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["eval", "--model", str(tiny_model_path("llava", 8)), "--data", str(tmp_path / "set.jsonl"), "--k", "3",
            "--json"]  # fmt: skip
    reports = []
    for extra in ([], ["--no-shared-prefill"]):
        assert main([*argv, *extra]) == 0
        reports.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    for side in ("baseline", "vtw"):
        shared, full = (report[side] for report in reports)
        assert (shared["correct"], shared["questions"]) == (full["correct"], full["questions"])
        assert shared["prefill_flops"] == full["prefill_flops"] and shared["decode_flops"] == full["decode_flops"]
        assert (shared["prefill"], full["prefill"]) == ("shared", "plain")


def test_conversations_of_groups_each_images_questions_in_order():
    items = load_items("easy-vqa", "test", limit=25)  # image 0: 11 questions, image 1: 7, image 2: the first 7
    chats = conversations_of(items, 3)
    assert [len(chat) for chat in chats] == [3] * 7
    assert [chat[0].image for chat in chats] == [items[0].image] * 3 + [items[11].image] * 2 + [items[18].image] * 2
    assert [item for chat in chats[:3] for item in chat] == items[:9]  # consecutive, the last 2 of 11 left out
    assert conversations_of(items, 1) == [[item] for item in items]
    with pytest.raises(Exception, match="positive"):
        conversations_of(items, 0)


def test_evaluate_turns_sends_the_chat_with_the_models_own_replies(tiny_model_path, monkeypatch):
    """Turn t's prompt is the chat so far as the app builds it: the image in the first user message only and the
    model's own earlier replies, verbatim, as assistant messages. Turn 1 is the single-question evaluation."""
    manager = ModelManager.load(str(tiny_model_path("llava", 8)), device="cpu")
    chats = conversations_of(load_items("easy-vqa", "test", limit=18), 3)  # 3 + 2 chats about two images
    sent = []
    real = evaluate.generate_batch

    def recording(model, processor, conversations, images, **options):
        outputs = real(model, processor, conversations, images, **options)
        sent.append((conversations, outputs, options["prefill_engine"]))
        return outputs

    monkeypatch.setattr(evaluate, "generate_batch", recording)
    results = evaluate_turns(manager.model, manager.processor, chats, 2)
    assert [result.questions for result in results] == [5, 5, 5] and all(result.k == 2 for result in results)
    assert len(sent) == 6 and {engine for *_, engine in sent} == {"shared"}  # 2 images x 3 turns
    tokenizer = manager.processor.tokenizer
    conversations = sent[2][0]  # the first image's third turn
    for chat, conversation in zip(chats[:3], conversations, strict=True):
        assert [message["role"] for message in conversation] == ["user", "assistant"] * 2 + ["user"]
        assert [item["type"] for item in conversation[0]["content"]] == ["image", "text"]
        assert all(item["type"] == "text" for message in conversation[1:] for item in message["content"])
        assert [message["content"][-1]["text"] for message in conversation[::2]] == [i.question for i in chat]
    for turn in (0, 1):
        replies = [tokenizer.decode(ids, skip_special_tokens=True) for ids in sent[turn][1]]
        assert [conversation[2 * turn + 1]["content"][0]["text"] for conversation in conversations] == replies
    assert results[1].prefill_flops > results[0].prefill_flops  # a longer prompt each turn
    single = evaluate_side(manager.model, manager.processor, [chat[0] for chat in chats], 2)
    assert (single.correct, single.prefill_flops) == (results[0].correct, results[0].prefill_flops)
    plain = evaluate_turns(manager.model, manager.processor, chats, 2, share_image_prefill=False, batch_size=4)
    assert [result.correct for result in plain] == [result.correct for result in results]
    assert {result.prefill for result in plain} == {"plain"}


def test_eval_command_turns(capsys, tiny_model_path):
    model = str(tiny_model_path("llava", 8))
    argv = ["eval", "--model", model, "--limit", "18", "--turns", "3", "--k", "3"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["turns"], report["conversations"], report["questions"]) == (3, 5, 18)
    for side, k in (("baseline", None), ("vtw", 3)):
        assert [row["turn"] for row in report[side]] == [1, 2, 3]
        assert all(row["questions"] == 5 and row["k"] == k for row in report[side])
    assert report["vtw"][0]["prefill_flops"] < report["baseline"][0]["prefill_flops"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "5 conversations of 3 turns" in table and "| VTW K=3 | 3 |" in table
    assert main([*argv, "--method", "vtw:2"]) == 2 and "--turns takes neither" in capsys.readouterr().err
    assert main([*argv[:-4], "--limit", "2", "--turns", "5"]) == 2
    assert "no image has 5 questions" in capsys.readouterr().err
