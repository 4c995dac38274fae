"""Train the embedded default model: a small LLaVA, from scratch, on easy-vqa's train split.

    python -m vtw_core.training.train_default --out assets/default-model

trains v3 from scratch (seeded; see docs/default-model.md for the time it took and on which hardware). The
shipped v4 is v3 fine-tuned for conversations by two more runs of this command (`--init`, `--conversation-share`;
the exact commands are in docs/default-model.md). Only the train split is read; the test split is never seen here.

The model is a stock `LlavaForConditionalGeneration` with LLaVA-1.5's proportions: a CLIP vision tower over 72x72
images (easy-vqa's 64x64 images are resized by the CLIP image processor) cut into 3x3 patches, so 576 vision
tokens per image (a 24x24 grid; CLS dropped by the "default" feature strategy), a two-layer GELU projector and a
16-layer Llama decoder of width 256. The tower and projector cost about 2% of the baseline's prefill FLOPs.
The tokenizer is a Llama-layout BPE (byte fallback, so any text encodes) trained in code on the train questions
and answers, and the chat template is LLaVA-1.5's ("USER: <image>\n{question} ASSISTANT: {answer}</s>").

Replies open with a word read off the image (`vtw_core.training.easyvqa.answer_sentence`): "Circle.", "Blue.",
"Green. Is it red? No.". So the next token at the last prompt position depends on the image, and the paper's K
criterion (KL there) measures whether the image has reached the text. Scoring reads the last answer word.

Stages, all on the train split only:
1. `pretrain_vision(per_token=True)`: every vision token alone must state the whole image's shape and colour
   (a linear probe, thrown away), each image labelled by its own train answers (`image_attributes`). A decoder
   can then read the image from any token, which is what lets stage 2 start on a sparse sample of them.
   (`--vision-epochs` adds the older mean-pooled probe first; the shipped model does not use it.)
2. End to end on the questions, one cosine schedule over two parts: first on a random sparse subset of
   SAMPLED_VISION_TOKENS vision tokens per image, at their true position ids (a row costs ~250 tokens instead
   of ~780), then on all 576, as at inference. Half of the steps withdraw the vision tokens at a K drawn from
   WITHDRAW_LAYERS, exactly as VTW does at inference (`packed_loss`): the decoder learns to move what the
   text needs out of the vision tokens in its first layers, which is what VTW assumes of LLaVA.
   Yes/no questions are rebalanced (`rebalance_yes_no`) so that 30% of them name the image's own shape or colour.
Both stages see randomly flipped and shifted images (`augment`).
3. (v4) `--init FOLDER` starts stage 2 from saved weights instead (stage 1 skipped), and `--conversation-share S`
   asks that share of the rows as chats (`encode_image_conversations`): an image's questions in one conversation
   of up to `--max-turns` turns, rendered with the model's chat template exactly as the app sends a chat (the
   image in the first user message, the earlier replies as plain assistant text), so that follow-up questions
   are answered as well as a first one. The other rows keep the blind packing below.

Training packs all questions of one image into one row (`encode_image_questions`): the image's vision tokens are
shared by its ~10 questions, and a block attention mask with per-segment positions (`segment_mask`) makes every
question + answer exactly the single-turn prompt used at inference, blind to the other questions. A conversation
(stage 3) is one segment, causal over itself: each turn sees the earlier questions and replies, as in the app.
The question order is shuffled every epoch; the loss is taken on the answer tokens (and their </s>) only. AdamW,
cosine schedule with warm-up, seeded. `--vision-cache FILE` saves stage 1 (or reloads it when the settings match,
with the random streams as they were), so stage 2 can be re-run alone with the same result.

This module is the command; the recipe lives beside it: `model` (the architecture), `data` (tokenizer, processor,
question sampling, augmentation, packing), `loss` (`segment_mask`, `packed_loss`), `vision` (stage 1) and `loop`
(`train`: stage 2, checkpoints, summary).
"""

from __future__ import annotations

import argparse
import json

from vtw_core.training.data import MAX_TURNS
from vtw_core.training.loop import SAMPLED_VISION_TOKENS, WITHDRAW_LAYERS, train
from vtw_core.training.model import HIDDEN, LAYERS, VISION_HEADS, VISION_HIDDEN, VISION_LAYERS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vtw_core.training.train_default", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default="assets/default-model", help="folder to save the model into")
    parser.add_argument("--epochs", type=float, default=4.0, help="end to end on sampled vision tokens")
    parser.add_argument("--full-epochs", type=float, default=1.0, help="then end to end on every vision token")
    parser.add_argument(
        "--sampled-vision-tokens", type=int, default=SAMPLED_VISION_TOKENS, help="vision tokens per row, first part"
    )
    parser.add_argument("--withdraw-share", type=float, default=0.5, help="share of steps that withdraw vision")
    parser.add_argument(
        "--withdraw-layers", type=int, nargs=2, default=WITHDRAW_LAYERS, help="K range of withdrawal-aware steps"
    )
    parser.add_argument("--batch-images", type=int, default=8, help="images (conversations) per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vision-epochs", type=float, default=0.0, help="stage 1: mean-pooled shape/colour probe")
    parser.add_argument(
        "--token-epochs", type=float, default=8.0, help="stage 1b: every vision token states shape/colour"
    )
    parser.add_argument("--vision-lr-scale", type=float, default=0.3, help="stage 2: tower lr / lr")
    parser.add_argument(
        "--yes-no-match-share", type=float, default=0.3, help="share of yes/no questions about the image's own"
    )
    parser.add_argument("--keep-questions", action="store_true", help="train on the questions as they are")
    parser.add_argument("--vision-cache", default=None, help="save stage 1 here, or load it if it matches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-images", type=int, default=None, help="train on the first N images only (smoke)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N steps (smoke)")
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="decoder width (MLP: 4x)")
    parser.add_argument("--vision-hidden", type=int, default=VISION_HIDDEN, help="CLIP tower width (MLP: 4x)")
    parser.add_argument("--vision-layers", type=int, default=VISION_LAYERS)
    parser.add_argument("--vision-heads", type=int, default=VISION_HEADS)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the result depends on it)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="also save every N steps")
    parser.add_argument(
        "--init", default=None, help="fine-tune the model in this folder (skips stage 1; its architecture is kept)"
    )
    parser.add_argument(
        "--conversation-share", type=float, default=0.0, help="share of rows asked as conversations (chats)"
    )
    parser.add_argument("--max-turns", type=int, default=MAX_TURNS, help="turns per training conversation")
    parser.add_argument("--warmup", type=int, default=60, help="warm-up steps of the stage-2 schedule")
    args = parser.parse_args(argv)
    summary = train(
        args.out,
        epochs=args.epochs,
        full_epochs=args.full_epochs,
        sampled_vision_tokens=args.sampled_vision_tokens,
        withdraw_share=args.withdraw_share,
        withdraw_layers=tuple(args.withdraw_layers),
        batch_images=args.batch_images,
        lr=args.lr,
        vision_epochs=args.vision_epochs,
        token_epochs=args.token_epochs,
        vision_lr_scale=args.vision_lr_scale,
        yes_no_match_share=None if args.keep_questions else args.yes_no_match_share,
        vision_cache=args.vision_cache,
        seed=args.seed,
        limit_images=args.limit_images,
        max_steps=args.max_steps,
        layers=args.layers,
        hidden=args.hidden,
        vision_hidden=args.vision_hidden,
        vision_layers=args.vision_layers,
        vision_heads=args.vision_heads,
        threads=args.threads,
        checkpoint_every=args.checkpoint_every,
        init=args.init,
        conversation_share=args.conversation_share,
        max_turns=args.max_turns,
        warmup=args.warmup,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
