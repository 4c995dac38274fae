"""scripts/gpu_check.py in its CPU dry run: the table has a row per shape, path and setting; the fast paths agree;
the decode steps are timed per engine."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def test_gpu_check_dry_run(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--dry-run", "--ks", "1", "2", "--repeats", "1", "--equivalence-tokens", "6", "--new-tokens", "3"])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| model |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| tiny ")]  # fmt: skip
    assert all(len(row) == len(columns) for row in rows)
    paths = ["plain/plain", "bucketed/plain", "plain/static", "bucketed/static"]
    expected = [(shape, path, setting) for shape in ("tiny llava", "tiny llava_next") for path in paths
                for setting in ("baseline", "VTW K=1", "VTW K=2")]  # fmt: skip
    assert [(row[0], row[1], row[2]) for row in rows] == expected  # no "(ran ...)": no path fell back
    column = {name: index for index, name in enumerate(columns)}
    for row in rows:
        flops_ratio = float(row[column["FLOPs ratio"]])
        assert (flops_ratio == 1.0) == (row[2] == "baseline") and 0 < flops_ratio <= 1
        assert re.fullmatch(r"[\d.]+ \[[\d.]+-[\d.]+\]", row[column["TTFT ms"]])
        assert row[column["peak MB"]] == "CPU"
    # Equivalence: each fast path against plain/plain, baseline and the middle K, per shape; float32 on CPU agrees.
    checks = re.findall(r"vs plain/plain, (baseline|VTW K=\d): max \|logit diff\| (\S+) .*greedy tokens (\d+)/6", out)
    assert len(checks) == 2 * 2 * 3
    assert all(float(diff) < 1e-4 and same == "6" for _, diff, same in checks)
    # Decode steps alone, per shape: plain and static (the dry run has no CUDA graph), baseline and the middle K.
    decode_header = (
        "| shape | prompt tokens | max new tokens | setting | plain ms/step | static ms/step | static / plain |"
    )
    assert out.count(decode_header) == 2
    decode_rows = [line for line in out.splitlines() if re.match(r"\| 64 wide, 4 layers \| \d+ \| 5 \| ", line)]
    assert [row.split("|")[4].strip() for row in decode_rows] == ["baseline", "VTW K=2"] * 2
    assert all(re.fullmatch(r"(?: [\d.]+ \[[\d.]+-[\d.]+\] \|){3}", row.split("|", 5)[5]) for row in decode_rows)
    for library in ("flash-attn 2", "flash-attn 4 (CUTE DSL)", "liger-kernel", "flashinfer"):
        assert re.search(rf"  {re.escape(library)}: (ok|missing \()", out)
