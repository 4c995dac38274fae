"""The `vtw` model inside lmms-eval: registration, the easy-vqa task against `vtw_core eval` (1 and 2
processes), bad model args, loglikelihood against the stock forward, k=auto on the task's own samples.

Skipped when lmms-eval (the `eval` extra) is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance

from vtw_core.analysis.k_search import CalibrationSample, search_k
from vtw_core.engine.decoder import Withdrawal, prefill
from vtw_core.engine.embed import embed_prompt
from vtw_core.errors import InputError
from vtw_core.integrations.lmms_eval import VTW
from vtw_core.integrations.lmms_eval_tasks import TASKS_DIR
from vtw_core.models.images import load_image
from vtw_core.training.easyvqa import COLOURS, SHAPES, answer_sentence, load_split

REPO = Path(__file__).resolve().parent.parent
LOW_K = 2  # the default model loses questions there (81% on 500), so equal accuracies say something
LIMIT = 16  # questions per run: enough for the two tools to differ if they disagreed, cheap enough for CI
QUIET_ACCELERATE = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # defaults, said


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


def _lmms_eval(method: str, output: Path, processes: int = 1, task: str = "easyvqa", limit: int = LIMIT) -> dict:
    """Run an easy-vqa task through lmms-eval on the default model; return the results JSON."""
    launcher = [sys.executable, "-m", "lmms_eval"]
    if processes > 1:
        launch = ["-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes), *QUIET_ACCELERATE]
        launcher = [sys.executable, *launch, "-m", "lmms_eval"]
    arguments = f"--model vtw --model_args method={method} --tasks {task} --limit {limit} --batch_size 64"
    paths = ["--include_path", str(TASKS_DIR), "--output_path", str(output), "--log_samples"]
    result = _run([*launcher, *arguments.split(), *paths])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = output.rglob("*_results.json")
    return json.loads(path.read_text())


def _samples(output: Path) -> list[dict]:
    (path,) = output.rglob("*_samples_easyvqa.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference() -> dict:
    """`python -m vtw_core eval` on the same questions: baseline and a low K, every prefill in full, as the plug-in
    runs them (shared image prefills agree to float32 rounding: tests/test_shared_prefill.py)."""
    arguments = f"-m vtw_core eval --limit {LIMIT} --k {LOW_K} --json --no-shared-prefill"
    result = _run([sys.executable, *arguments.split()])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {"baseline": report["baseline"], f"vtw:{LOW_K}": report["vtw"]}


def test_entry_point_registers_vtw():
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model

    (entry,) = [entry for entry in entry_points(group="lmms_eval.models") if entry.name == "vtw"]
    assert entry.load()().model_id == "vtw"
    assert get_model("vtw") is VTW


# Baseline and VTW at a K where the default model loses questions; the shipped K's path is the same code (its
# accuracy equals the baseline's, so it would say less).
@pytest.mark.parametrize("method", ["baseline", f"vtw:{LOW_K}"])
def test_easyvqa_equals_vtw_core_eval(method, reference, tmp_path):
    results = _lmms_eval(method, tmp_path)
    expected = reference[method]
    assert results["n-samples"]["easyvqa"]["effective"] == LIMIT
    assert results["results"]["easyvqa"]["accuracy,none"] == pytest.approx(expected["accuracy"], abs=1e-12)
    cost = results["throughput"]
    # FLOPs are analytic, so both tools count the same numbers for the same replies.
    assert cost["avg_prefill_flops_mean"] == pytest.approx(expected["prefill_flops"], rel=1e-12)
    assert cost["avg_decode_flops_mean"] == pytest.approx(expected["decode_flops"], rel=1e-12)
    baseline = reference["baseline"]
    assert cost["avg_baseline_prefill_flops_mean"] == pytest.approx(baseline["prefill_flops"], rel=1e-12)
    assert cost["avg_prefill_flops_ratio"] == pytest.approx(expected["prefill_flops"] / baseline["prefill_flops"])
    samples = _samples(tmp_path)
    assert len(samples) == LIMIT
    for sample in samples:
        (counts,) = sample["token_counts"]
        assert counts["prefill_flops"] > 0 and counts["ttft_s"] > 0
        assert counts["vision_tokens"] == 576  # the default model's tokens per image (24x24)
        if method == "baseline":
            assert counts["prefill_flops"] == counts["baseline_prefill_flops"]
            assert counts["decode_flops"] == counts["baseline_decode_flops"]
        else:
            assert counts["prefill_flops"] < counts["baseline_prefill_flops"]


def test_two_processes_shard_and_gather(reference, tmp_path):
    results = _lmms_eval(f"vtw:{LOW_K}", tmp_path, processes=2)
    expected = reference[f"vtw:{LOW_K}"]
    assert results["results"]["easyvqa"]["accuracy,none"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert results["throughput"]["avg_samples"] == LIMIT  # both processes' costs in the summary
    assert results["throughput"]["avg_prefill_flops_mean"] == pytest.approx(expected["prefill_flops"], rel=1e-12)
    assert sorted(sample["doc_id"] for sample in _samples(tmp_path)) == list(range(LIMIT))


def test_bad_model_args_fail_early_with_a_message(tiny_model_path):
    path = str(tiny_model_path("llava"))
    with pytest.raises(InputError, match="unknown method"):
        VTW(pretrained=path, method="vtw9")
    with pytest.raises(InputError, match="K must be a whole number from 0 to 4"):
        VTW(pretrained=path, method="vtw:9", device="cpu")
    with pytest.raises(InputError, match="unknown model arg"):
        VTW(pretrained=path, temprature=0.5)
    with pytest.raises(InputError, match="either method or k"):
        VTW(pretrained=path, method="vtw:2", k=3)
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        VTW(pretrained=path, batch_size="auto")
    with pytest.raises(InputError, match="dtype must be one of"):
        VTW(pretrained=path, dtype="float8")
    with pytest.raises(InputError, match="schedule file not found"):
        VTW(pretrained=path, method="schedule:/no/such/file.json")


def test_bad_model_args_on_the_command_line(tmp_path):
    arguments = "-m lmms_eval --model vtw --model_args method=fastv:x --tasks easyvqa --limit 1"
    paths = ["--include_path", str(TASKS_DIR), "--output_path", str(tmp_path)]
    result = _run([sys.executable, *arguments.split(), *paths])
    # lmms-eval logs a failed run's error and exits 0 all the same; nothing is written.
    assert "InputError: cannot read the method 'fastv:x'" in result.stdout + result.stderr
    assert not list(tmp_path.rglob("*_results.json"))


def _requests(model: VTW, request_type: str, rows: list[tuple[str, object]], images, task: str = "t") -> list[Instance]:
    """Instances as lmms-eval builds them, over a one-split task of one document per row."""
    model.task_dict[task] = {"test": [{"image": image} for image in images]}
    requests = []
    for doc_id, (context, second) in enumerate(rows):
        arguments = (context, second, lambda doc: [doc["image"]], doc_id, task, "test")
        requests.append(Instance(request_type, arguments, 0, {"task": task, "doc_id": doc_id, "repeats": 1}))
    return requests


def _stock_logprob(model: VTW, question: str, continuation: str, image) -> float:
    """log P(continuation | prompt) from the stock transformers forward, prompt and continuation tokenised whole."""
    processor = model.manager.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_length = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(text=[prompt + continuation], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model.model(**inputs).logits[0].float()
    targets = inputs["input_ids"][0, prompt_length:]
    log_probs = torch.log_softmax(logits[prompt_length - 1 : -1], -1)
    return float(log_probs[torch.arange(len(targets)), targets].sum())


def _vtw_logprob_by_prefixes(model: VTW, question: str, continuation: str, image, k: int) -> float:
    """log P(continuation | prompt) under VTW at K, one engine prefill per prefix (no decode steps, no split)."""
    processor = model.manager.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_length = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(text=[prompt + continuation], images=[image], return_tensors="pt")
    total = 0.0
    for end in range(prompt_length, inputs["input_ids"].shape[1]):
        prefix = {**inputs, **{name: inputs[name][:, :end] for name in ("input_ids", "attention_mask")}}
        logits, _ = prefill(model.model, embed_prompt(model.model, prefix), Withdrawal(k))
        total += float(torch.log_softmax(logits[0], -1)[inputs["input_ids"][0, end]])
    return total


def test_multiple_choice_task_picks_the_most_likely_reply(tmp_path):
    k, limit = 2, 12  # at K = 2 the default model misses some, so the choice matters
    results = _lmms_eval(f"vtw:{k}", tmp_path, task="easyvqa_mc", limit=limit)
    model = VTW(device="cpu")
    items = [item for item in load_split("test") if item.answer in SHAPES + COLOURS][:limit]
    correct = 0
    for item in items:
        candidates = SHAPES if item.answer in SHAPES else COLOURS
        image = load_image(item.image)
        replies = [" " + answer_sentence(candidate) for candidate in candidates]
        scores = [_vtw_logprob_by_prefixes(model, item.question, reply, image, k) for reply in replies]
        correct += candidates[scores.index(max(scores))] == item.answer
    assert results["results"]["easyvqa_mc"]["acc,none"] == pytest.approx(correct / limit, abs=1e-12)


def test_loglikelihood_equals_the_stock_forward(tiny_model_path, sample_images):
    model = VTW(pretrained=str(tiny_model_path("llava")), device="cpu", attention="eager", batch_size=2)
    rows = [("What shape is it?", " It is a circle."), ("What colour?", " red"), ("Is it blue?", " No")]
    results = model.loglikelihood(_requests(model, "loglikelihood", rows, sample_images))
    for (question, continuation), image, result in zip(rows, sample_images, results, strict=True):
        negative_logprob, greedy = result.text
        assert negative_logprob == pytest.approx(-_stock_logprob(model, question, continuation, image), abs=1e-4)
        assert isinstance(greedy, bool)
        cost = result.token_counts.to_dict()
        assert cost["prefill_flops"] == cost["baseline_prefill_flops"] > 0
    withdrawn = VTW(pretrained=str(tiny_model_path("llava")), method="vtw:1", device="cpu", attention="eager")
    first = withdrawn.loglikelihood(_requests(withdrawn, "loglikelihood", rows[:1], sample_images[:1]))[0]
    assert first.text[0] != pytest.approx(results[0].text[0], abs=1e-6)
    assert first.token_counts.to_dict()["prefill_flops"] < cost["baseline_prefill_flops"]


def test_k_auto_searches_each_tasks_first_samples(tiny_model_path, sample_images):
    from lmms_eval.models.model_utils.gen_metrics import get_logged_metrics_history, reset_logged_metrics

    path = str(tiny_model_path("llava", 8))
    questions = ["What is it?", "What colour is the shape?", "Is there a circle?", "Where is the shape?"]
    images = [*sample_images, sample_images[0]]
    probe = VTW(pretrained=path, device="cpu")

    def search(rows: list[int], eta: float):
        samples = [CalibrationSample(questions[row], [images[row]]) for row in rows]
        return search_k(probe.model, probe.manager.processor, samples, eta=eta)

    # An eta between the curve's values, so the chosen K depends on the samples searched.
    curve = sorted(kl for _, kl in search([0, 1, 2], eta=0.0).curve)
    eta = curve[len(curve) // 2] * 1.0001
    model = VTW(pretrained=path, k="auto", eta=eta, search_samples=3, device="cpu", max_new_tokens=2)
    rows = [(question, {"max_new_tokens": 2, "until": []}) for question in questions]
    first = _requests(model, "generate_until", rows, images, task="t")
    second = _requests(model, "generate_until", rows[::-1], images[::-1], task="u")  # other documents first
    reset_logged_metrics()
    model.generate_until(first[::-1] + second)  # the search takes each task's first documents, not requests
    assert model.method_for("t").k == search([0, 1, 2], eta).k
    assert model.method_for("u").k == search([3, 2, 1], eta).k
    (logged,) = get_logged_metrics_history()
    assert logged["samples"] == 8 and logged["t:samples"] == logged["u:samples"] == 4
    assert logged["t:vtw_k"] == model.method_for("t").k
