"""Train the embedded default model: a small LLaVA on easy-vqa's train split, from scratch, on a CPU.

    python scripts/train_default_model.py                        # writes assets/default-model/
    python scripts/train_default_model.py --steps 20 --out /tmp/m # a quick smoke run

The architecture is stock `LlavaForConditionalGeneration` (CLIP vision tower, two-layer projector, Llama
decoder), so vtw_core runs it like any LLaVA-1.5 checkpoint: 60x60 input in 6x6 patches = 100 vision
tokens per image, 12 decoder layers. The tokenizer is a Llama BPE (byte fallback, so any text encodes)
trained on the dataset's questions and reply sentences. The loss covers only the reply tokens. Everything
is seeded; with the same torch build and thread count the weights are reproducible.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vtw_core.easyvqa import answer_sentence, load_split  # noqa: E402
from vtw_core.tiny import LLAVA_CHAT_TEMPLATE, llava_tokenizer  # noqa: E402

IMAGE_SIZE, PATCH = 60, 6  # 100 patches
TRAINED_VOCAB = 384  # BPE pieces before <image> and <pad> (the corpus saturates at 395)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def build_config(layers: int, hidden: int, vision_layers: int) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=hidden,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=TRAINED_VOCAB + 2, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1,
        eos_token_id=2, pad_token_id=TRAINED_VOCAB + 1, tie_word_embeddings=False,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=TRAINED_VOCAB,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2, vision_feature_select_strategy="default",
        vision_feature_layer=-1, projector_hidden_act="gelu",
    )  # fmt: skip


def build_processor() -> LlavaProcessor:
    items = load_split("train")
    lines = sorted({item.question for item in items} | {answer_sentence(item.answer, "sentence") for item in items})
    corpus = (*lines, "USER: ASSISTANT: What is in the image? Describe the picture. What colour is it?")
    tokenizer = llava_tokenizer(corpus, TRAINED_VOCAB)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )  # fmt: skip


def encode_examples(processor: LlavaProcessor, items, style: str) -> list[tuple[list[int], int]]:
    """Token ids of prompt + reply + </s>, and where the reply starts (the loss covers only the reply)."""
    tokenizer = processor.tokenizer
    image_tokens = "<image>" * ((IMAGE_SIZE // PATCH) ** 2)
    cache: dict[tuple[str, str], tuple[list[int], int]] = {}
    encoded = []
    for item in items:
        key = (item.question, item.answer)
        if key not in cache:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt_ids = tokenizer(prompt.replace("<image>", image_tokens))["input_ids"]
            reply_ids = tokenizer(" " + answer_sentence(item.answer, style), add_special_tokens=False)["input_ids"]
            cache[key] = (prompt_ids + reply_ids + [tokenizer.eos_token_id], len(prompt_ids))
        encoded.append(cache[key])
    return encoded


def load_pixels(paths: list[str]) -> torch.Tensor:
    """All images once, resized and normalised as the processor does: (images, 3, 60, 60)."""
    mean, std = np.array(CLIP_MEAN, dtype=np.float32), np.array(CLIP_STD, dtype=np.float32)
    arrays = []
    for path in paths:
        image = Image.open(path).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        arrays.append(((np.asarray(image, dtype=np.float32) / 255 - mean) / std).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))


def batches(examples, image_index, pixels, batch_size, generator, pad_id):
    order = torch.randperm(len(examples), generator=generator).tolist()
    for start in range(0, len(order) - batch_size + 1, batch_size):
        chosen = order[start : start + batch_size]
        # One fixed width for every batch: new shapes make CPU kernels (oneDNN bf16) re-JIT at every step.
        width = max(len(ids) for ids, _ in examples)
        input_ids = torch.full((batch_size, width), pad_id)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros(batch_size, width, dtype=torch.long)
        for row, i in enumerate(chosen):
            ids, reply_start = examples[i]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, reply_start : len(ids)] = torch.tensor(ids[reply_start:])
            mask[row, : len(ids)] = 1
        images = pixels[[image_index[i] for i in chosen]]
        flip = (torch.rand(batch_size, generator=generator) < 0.5).to(pixels.device)  # mirrored: same answers
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        yield input_ids, mask, labels, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "assets" / "default-model"))
    parser.add_argument("--steps", type=int, default=7000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=6)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N questions only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 matmuls")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--init", help="continue from this saved model (same architecture) instead of from scratch")
    parser.add_argument("--reply-style", default="answer-first", choices=["answer-first", "sentence"])
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.time()
    # Continuing a saved model keeps its tokenizer, so its embeddings still mean the same pieces.
    processor = LlavaProcessor.from_pretrained(args.init) if args.init else build_processor()
    items = load_split("train")[: args.limit]
    paths = sorted({item.image for item in items})
    index_of = {path: i for i, path in enumerate(paths)}
    pixels = load_pixels(paths)
    examples = encode_examples(processor, items, args.reply_style)
    image_index = [index_of[item.image] for item in items]
    print(f"{len(items)} questions on {len(paths)} images, longest sequence {max(len(e[0]) for e in examples)}")

    config = build_config(args.layers, args.hidden, args.vision_layers)
    if args.init:
        model = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32).to(args.device)
    else:
        model = LlavaForConditionalGeneration(config).to(args.device)
    model.train()
    pixels = pixels.to(args.device)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = min(200, args.steps // 10 + 1)

    def learning_rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate)
    generator = torch.Generator().manual_seed(args.seed)
    pad_id = processor.tokenizer.pad_token_id
    step, smoothed = 0, None
    bar = tqdm(total=args.steps, desc="training", unit="step")
    while step < args.steps:
        for input_ids, mask, labels, images in batches(
            examples, image_index, pixels, args.batch_size, generator, pad_id
        ):
            # bf16 matmuls (AVX-512 BF16 / AMX CPUs run them about twice as fast); weights and optimizer stay fp32.
            input_ids, mask, labels = (t.to(args.device) for t in (input_ids, mask, labels))
            with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = model(input_ids=input_ids, attention_mask=mask, pixel_values=images, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.4f}")
            if step >= args.steps:
                break
    bar.close()

    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=pad_id, max_new_tokens=16, do_sample=False
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu", torch.float16).save_pretrained(out)  # half the bytes; vtw_core loads it in float32 on a CPU
    processor.save_pretrained(out)
    minutes = (time.time() - started) / 60
    print(f"saved to {out} after {step} steps in {minutes:.1f} min (final smoothed loss {smoothed:.4f})")


if __name__ == "__main__":
    main()
