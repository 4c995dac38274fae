"""`python -m vtw_core`: the commands' output contracts and their error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vtw_core.cli import main
from vtw_core.engine import flops
from vtw_core.models.configs import shipped_config_path


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("images") / "red.png"
    Image.new("RGB", (64, 64), "red").save(path)
    return str(path)


def test_generate_json(capsys, tiny_model_path, image_file):
    model = str(tiny_model_path("llava"))
    code, out, _ = run_cli(
        capsys, "generate", "--model", model, "--image", image_file, "--prompt", "What colour?",
        "--max-new-tokens", "5", "--json",
    )  # fmt: skip
    assert code == 0
    result = last_json(out)
    assert set(result) == {"text", "token_ids", "stats"}
    assert len(result["token_ids"]) == result["stats"]["new_tokens"] <= 5
    assert result["stats"]["vision_tokens"] == 36 and result["stats"]["k"] is None
    code, out, _ = run_cli(
        capsys, "generate", "--model", model, "--image", image_file, "--prompt", "What colour?",
        "--max-new-tokens", "5", "--k", "2", "--json",
    )  # fmt: skip
    vtw = last_json(out)
    assert vtw["stats"]["k"] == 2 and vtw["stats"]["prefill_flops"] < result["stats"]["prefill_flops"]


def test_generate_streams_text(capsys, tiny_model_path, image_file):
    code, _, err = run_cli(
        capsys, "generate", "--model", str(tiny_model_path("qwen2_vl")), "--image", image_file,
        "--prompt", "Hi", "--max-new-tokens", "4", "--k", "1",
    )  # fmt: skip
    assert code == 0
    assert "VTW K=1" in err and "FLOPs" in err and "KV cache" in err


def test_flops_json_from_a_shipped_config(capsys):
    code, out, _ = run_cli(
        capsys, "flops", "--model", "llava-1.5-7b", "--vision-tokens", "576", "--text-tokens", "62",
        "--k", "16", "--new-tokens", "10", "--json",
    )  # fmt: skip
    assert code == 0
    result = last_json(out)
    assert result["baseline"]["prefill_flops"] / 1e12 == pytest.approx(8.48, rel=0.02)
    assert result["vtw"]["prefill_flops"] / 1e12 == pytest.approx(4.68, rel=0.02)
    assert result["vtw"]["decode_flops"] < result["baseline"]["decode_flops"]


def test_flops_from_a_folder_with_only_config(capsys, tmp_path):
    (tmp_path / "config.json").write_text((shipped_config_path("llava-1.5-13b") / "config.json").read_text())
    code, out, _ = run_cli(
        capsys, "flops", "--model", str(tmp_path), "--vision-tokens", "576", "--text-tokens", "62", "--k", "20",
        "--json",
    )  # fmt: skip
    assert code == 0
    assert last_json(out)["num_layers"] == 40
    code, out, _ = run_cli(capsys, "flops", "--model", str(tmp_path), "--vision-tokens", "576", "--text-tokens", "62",
                           "--k", "20")  # fmt: skip
    assert "VTW / baseline" in out


def test_bench_on_a_tiny_model(capsys, tiny_model_path, image_file):
    code, out, _ = run_cli(
        capsys, "bench", "--model", str(tiny_model_path("llava")), "--k", "1", "3", "--new-tokens", "4",
        "--repeats", "1", "--engine", "plain", "static", "--bandwidth-gb-s", "100", "--json",
    )  # fmt: skip
    assert code == 0
    assert "| static | VTW K=3 |" in out
    rows = last_json(out)["rows"]
    assert [(row["engine"], row["k"]) for row in rows] == [
        (engine, k) for engine in ("plain", "static") for k in (None, 1, 3)
    ]
    rows = rows[:3]
    assert rows[1]["prefill_flops"] < rows[2]["prefill_flops"] < rows[0]["prefill_flops"]
    assert all(row["new_tokens"] == 4 for row in rows)
    code, out, _ = run_cli(
        capsys, "bench", "--model", str(tiny_model_path("llava")), "--k", "2", "--new-tokens", "3",
        "--repeats", "1", "--image", image_file,
    )  # fmt: skip
    assert code == 0 and "| VTW K=2 |" in out


def test_bench_random_weights_from_a_shipped_config_shape(capsys, tiny_model_path):
    """--random-weights needs only config.json; the synthetic prompt has the family's real vision-token count."""
    code, out, _ = run_cli(
        capsys, "bench", "--model", str(tiny_model_path("llava_next")), "--random-weights", "--k", "2",
        "--new-tokens", "2", "--repeats", "1", "--json",
    )  # fmt: skip
    assert code == 0
    rows = last_json(out)["rows"]
    assert rows[0]["vision_tokens"] > 0 and rows[1]["prefill_flops"] < rows[0]["prefill_flops"]


def test_vision_token_count_matches_the_real_config():
    from transformers import AutoConfig

    from vtw_core.benchmarks.bench import llava_next_image_tokens

    config = AutoConfig.from_pretrained(shipped_config_path("llava-v1.6-vicuna-7b"))
    # The paper's LLaVA-NeXT shape: a 672x672 image is 4 tiles + base = 2880 vision tokens (with newlines: 2928).
    assert llava_next_image_tokens(config, 672, 672) == 576 + 48 * 48 + 48
    assert flops.vision_flops(config, num_crops=5) == 5 * flops.vision_flops(
        AutoConfig.from_pretrained(shipped_config_path("llava-1.5-7b")), num_crops=1
    )


def test_llava_next_token_count_matches_the_processor(tiny_model_path, sample_images):
    from vtw_core.benchmarks.bench import llava_next_image_tokens
    from vtw_core.generation.manager import ModelManager
    from vtw_core.models.prompts import build_model_inputs, user_message

    manager = ModelManager.load(str(tiny_model_path("llava_next")), device="cpu")
    for image in sample_images:
        inputs = build_model_inputs(manager.processor, [[user_message("Hi")]], [[image]], "cpu", manager.model.dtype)
        placeholders = int((inputs["input_ids"] == manager.model.config.image_token_id).sum())
        assert llava_next_image_tokens(manager.model.config, image.height, image.width) == placeholders


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--model", "MODEL", "--image", "/no/such.png", "--prompt", "Hi"], "image file not found"),
        (["generate", "--model", "MODEL", "--image", "CORRUPT", "--prompt", "Hi"], "corrupt or truncated"),
        (["generate", "--model", "MODEL", "--image", "TEXT", "--prompt", "Hi"], "not an image"),
        (["generate", "--model", "MODEL", "--prompt", "Hi", "--k", "9"], "K must be a whole number from 0 to 4"),
        (["generate", "--model", "MODEL", "--prompt", "  "], "question is empty"),
        (["flops", "--model", "/no/such/folder", "--vision-tokens", "1", "--text-tokens", "1", "--k", "1"],
         "cannot load a model config"),
        (["flops", "--model", "llava-1.5-7b", "--vision-tokens", "5", "--text-tokens", "5", "--k", "33"],
         "K must be a whole number from 0 to 32"),
    ],
)  # fmt: skip
def test_errors_are_clear_and_exit_2(capsys, tiny_model_path, image_file, tmp_path, argv, message):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(Path(image_file).read_bytes()[:60])
    text = tmp_path / "notes.png"
    text.write_text("just text")
    substitutions = {"MODEL": str(tiny_model_path("llava")), "CORRUPT": str(corrupt), "TEXT": str(text)}
    code, _, err = run_cli(capsys, *[substitutions.get(arg, arg) for arg in argv])
    assert code == 2
    assert any(line.startswith("error: ") and message in line for line in err.splitlines())


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "vtw_core", "flops", "--model", "llava-1.5-7b", "--vision-tokens", "576",
         "--text-tokens", "62", "--k", "16", "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert last_json(result.stdout)["k"] == 16


def test_help_needs_neither_torch_nor_transformers():
    """The parser of every subcommand builds without the heavy libraries: they load inside each command's run."""
    code = (
        "import sys; from vtw_core.cli import build_parser; build_parser(); "
        "print(sorted(name for name in ('torch', 'transformers', 'tqdm', 'matplotlib') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_search_k_json_and_plot(capsys, tiny_model_path, tmp_path):
    plot = tmp_path / "kl.png"
    code, out, _ = run_cli(
        capsys, "search-k", "--model", str(tiny_model_path("llava", 8)), "--data", "default", "--limit", "3",
        "--start", "2", "--eta", "100", "--plot", str(plot), "--json",
    )  # fmt: skip
    assert code == 0
    result = last_json(out)
    assert set(result) == {"k", "eta", "eta_source", "curve"} and result["k"] == 2 and result["eta"] == 100
    assert result["eta_source"] == "--eta"
    assert [point["k"] for point in result["curve"]] == list(range(2, 8))
    assert plot.stat().st_size > 10_000 and Image.open(plot).size[0] > 500
    code, out, _ = run_cli(
        capsys, "search-k", "--model", str(tiny_model_path("llava", 8)), "--limit", "2", "--eta", "0", "--json",
    )  # fmt: skip
    assert last_json(out)["k"] is None
    code, out, _ = run_cli(
        capsys, "search-k", "--model", str(tiny_model_path("llava", 8)), "--data", "easy-vqa", "--limit", "2",
        "--start", "0", "--json",
    )  # fmt: skip
    assert code == 0 and [point["k"] for point in last_json(out)["curve"]] == list(range(8))


def test_attention_json_and_plot(capsys, tiny_model_path, image_file, tmp_path):
    plot = tmp_path / "attention.png"
    code, out, _ = run_cli(
        capsys, "attention", "--model", str(tiny_model_path("llava")), "--image", image_file, "--prompt", "What?",
        "--max-new-tokens", "3", "--plot", str(plot), "--json",
    )  # fmt: skip
    assert code == 0
    report = last_json(out)
    assert len(report["prompt"]) == 4 and report["segments"] == ["system", "vision", "instruction", "output"]
    assert all(sum(shares.values()) == pytest.approx(1, abs=1e-4) for shares in report["prompt"])
    assert plot.stat().st_size > 10_000
    code, out, _ = run_cli(capsys, "attention", "--model", str(tiny_model_path("llava")), "--image", image_file,
                           "--prompt", "What?", "--k", "2")  # fmt: skip
    assert code == 0 and "last prompt token" in out


def test_missing_default_model_is_a_clear_error(capsys, monkeypatch, tmp_path):
    import vtw_core.models.defaults

    monkeypatch.setattr(vtw_core.models.defaults, "DEFAULT_MODEL_DIR", tmp_path / "nothing-here")
    code, _, err = run_cli(capsys, "generate", "--prompt", "Hi")
    assert code == 2 and "no --model given and the embedded default model is missing" in err


def test_methods_through_the_cli(capsys, tiny_model_path, image_file, tmp_path):
    model = str(tiny_model_path("llava", 8))
    schedule = tmp_path / "schedule.json"
    code, out, _ = run_cli(capsys, "schedule-search", "--model", model, "--samples", "2", "--tolerance", "0.001",
                           "--out", str(schedule), "--json")  # fmt: skip
    assert code == 0 and len(last_json(out)["schedule"]) == 8 and schedule.is_file()
    code, out, _ = run_cli(capsys, "generate", "--model", model, "--image", image_file, "--prompt", "Hi",
                           "--method", "fastv:2:0.5", "--max-new-tokens", "3", "--json")  # fmt: skip
    fastv = last_json(out)["stats"]
    code, out, _ = run_cli(capsys, "generate", "--model", model, "--image", image_file, "--prompt", "Hi",
                           "--max-new-tokens", "3", "--json")  # fmt: skip
    assert code == 0 and fastv["prefill_flops"] < last_json(out)["stats"]["prefill_flops"]
    plot = tmp_path / "tradeoff.png"
    code, out, _ = run_cli(capsys, "eval", "--model", model, "--limit", "4", "--method", "fastv:2:0.5",
                           "--method", f"schedule:{schedule}", "--plot", str(plot), "--json")  # fmt: skip
    report = last_json(out)
    assert code == 0 and [row["spec"] for row in report["methods"]] == ["fastv:2:0.5", f"schedule:{schedule}"]
    assert plot.stat().st_size > 10_000
    code, out, _ = run_cli(capsys, "bench", "--model", model, "--k", "4", "--method", "fastv:2:0.5", "--new-tokens",
                           "2", "--repeats", "1", "--json")  # fmt: skip
    assert code == 0 and [row["label"] for row in last_json(out)["rows"]] == ["baseline", "VTW K=4", "FastV K=2 R=0.5"]
    code, _, err = run_cli(capsys, "generate", "--model", model, "--prompt", "Hi", "--method", "magic")
    assert code == 2 and "unknown method" in err


def test_serve_and_bench_offer_the_tuned_engine():
    from vtw_core.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "--prefill-engine", "tuned"]).prefill_engine == "tuned"
    bench = parser.parse_args(["bench", "--prefill-engine", "compiled", "tuned", "--engine", "tuned"])
    assert (bench.prefill_engine, bench.engine) == (["compiled", "tuned"], ["tuned"])
