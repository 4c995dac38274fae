"""Time to first token of the baseline and of VTW over N turns through a running VTW Chat app; print a table.

    python app.py --port 7860 &
    python scripts/app_ttft.py --url http://127.0.0.1:7860/ --turns 10

Each turn is one `/compare` call (the app's API: one greedy question about one image, baseline then VTW at K,
through the same model manager as the chat) on the app's example images for the loaded model, in turn, with
their example questions. TTFT is what the app measured for each side (its stats), not the client's round trip.
K defaults to the K the app starts with (the model's shipped K).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.media import example_files  # noqa: E402  (examples only: this script touches no tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--k", type=int, default=None, help="default: the K the app starts with")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--photos", action="store_true", help="use the photo examples (real checkpoints)")
    args = parser.parse_args()

    from gradio_client import Client, handle_file

    client = Client(args.url, verbose=False)
    k = args.k
    if k is None:
        k = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/compare"]["parameters"][2][
            "parameter_default"
        ]
    examples = example_files(default=not args.photos)
    rows = []
    print(f"{args.turns} turns through {args.url} /compare, VTW at K = {k}, {args.max_new_tokens} max new tokens")
    print("| turn | image | question | baseline TTFT ms | VTW TTFT ms | ratio | VTW faster | same answer |")
    print("|---|---|---|---|---|---|---|---|")
    for turn in range(1, args.turns + 1):
        image, question = examples[(turn - 1) % len(examples)]
        result = client.predict(handle_file(str(image)), question, k, args.max_new_tokens, api_name="/compare")
        base, vtw = result["baseline"]["stats"]["ttft_s"], result["vtw"]["stats"]["ttft_s"]
        same = result["baseline"]["text"] == result["vtw"]["text"]
        rows.append((base, vtw, same))
        print(f"| {turn} | {image.name} | {question} | {base * 1e3:.1f} | {vtw * 1e3:.1f} | {vtw / base:.2f} "
              f"| {'yes' if vtw < base else 'no'} | {'yes' if same else 'no'} |")  # fmt: skip
    ratios = [vtw / base for base, vtw, _ in rows]
    faster = sum(vtw < base for base, vtw, _ in rows)
    print(
        f"\nVTW's TTFT lower in {faster} of {len(rows)} turns; ratio median {statistics.median(ratios):.2f} "
        f"[{min(ratios):.2f}-{max(ratios):.2f}]; same answer in {sum(same for *_, same in rows)} of {len(rows)}"
    )


if __name__ == "__main__":
    main()
