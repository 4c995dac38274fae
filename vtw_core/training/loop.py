"""The default model's training run (`train`): stage 1 (`vtw_core.training.vision`), then stage 2 end to end on
the packed questions, with checkpoints and a summary saved beside the weights."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor

from vtw_core.models.checkpoint import save_in_hub_layout
from vtw_core.testing.tokenizers import LLAVA_IMAGE_TOKEN
from vtw_core.training.data import (
    MAX_TURNS,
    _batch,
    _pixel_values,
    augment,
    build_processor,
    encode_image_conversations,
    load_split,
    rebalance_yes_no,
    split_conversations,
    training_replies,
)
from vtw_core.training.easyvqa import image_attributes
from vtw_core.training.loss import packed_loss
from vtw_core.training.model import (
    HIDDEN,
    LAYERS,
    VISION_HEADS,
    VISION_HIDDEN,
    VISION_LAYERS,
    VISION_TOKENS,
    build_config,
)
from vtw_core.training.vision import _vision_stage

SAMPLED_VISION_TOKENS = 48  # vision tokens per row in the first, cheap part of end-to-end training
WITHDRAW_LAYERS = (7, 8)  # withdrawal-aware steps withdraw the vision tokens at a K drawn from this range


def train(
    out: str | Path,
    *,
    epochs: float = 4.0,
    full_epochs: float = 1.0,
    sampled_vision_tokens: int = SAMPLED_VISION_TOKENS,
    withdraw_share: float = 0.5,
    withdraw_layers: tuple[int, int] = WITHDRAW_LAYERS,
    batch_images: int = 8,
    lr: float = 1e-3,
    warmup: int = 60,
    vision_epochs: float = 0.0,
    token_epochs: float = 8.0,
    vision_lr_scale: float = 0.3,
    yes_no_match_share: float | None = 0.3,
    vision_cache: str | Path | None = None,
    seed: int = 0,
    limit_images: int | None = None,
    max_steps: int | None = None,
    layers: int = LAYERS,
    hidden: int = HIDDEN,
    vision_hidden: int = VISION_HIDDEN,
    vision_layers: int = VISION_LAYERS,
    vision_heads: int = VISION_HEADS,
    threads: int | None = 2,
    log_every: int = 20,
    checkpoint_every: int | None = None,
    init: str | Path | None = None,
    conversation_share: float = 0.0,
    max_turns: int = MAX_TURNS,
) -> dict:
    """Train from scratch (or fine-tune the model in `init`) and save the model + processor to `out` (fp16
    weights). Returns a summary dict.

    `init`: start stage 2 from these weights (a model this module saved, e.g. the shipped one); stage 1 is
    skipped, the tower keeps `vision_lr_scale`, and the architecture options are the saved model's.
    `conversation_share`: the share of rows whose questions are asked as conversations of up to `max_turns`
    turns (`encode_image_conversations`: each reply sees the earlier questions and replies, as in a chat)
    instead of one blind segment per question (`encode_image_questions`). 0 draws nothing from the random
    streams, so the recipe without conversations is unchanged.
    """
    started = time.time()
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
    processor = build_processor()
    tokenizer = processor.tokenizer
    data = load_split("train")
    if limit_images is not None:
        data = data[:limit_images]
    pixels = _pixel_values(processor, [path for path, _pairs in data])
    init_summary = None
    if init is not None:
        model = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
        saved_vocabulary = LlavaProcessor.from_pretrained(init).tokenizer.get_vocab()
        if saved_vocabulary != tokenizer.get_vocab():
            raise RuntimeError(f"{init}: its tokenizer is not the one this module trains")
        text_config, vision_config = model.config.text_config, model.config.vision_config
        layers, hidden = text_config.num_hidden_layers, text_config.hidden_size
        vision_hidden, vision_layers = vision_config.hidden_size, vision_config.num_hidden_layers
        vision_heads = vision_config.num_attention_heads
        vision_epochs = token_epochs = 0.0
        summary_file = Path(init) / "training.json"
        init_summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    else:
        config = build_config(
            tokenizer,
            layers=layers,
            hidden=hidden,
            vision_hidden=vision_hidden,
            vision_layers=vision_layers,
            vision_heads=vision_heads,
        )
        model = LlavaForConditionalGeneration(config).float()
    model.config._attn_implementation = "sdpa"
    model.train()
    generator = torch.Generator().manual_seed(seed)
    labels = [image_attributes(pairs) for _path, pairs in data]
    vision_cached = False
    if vision_epochs > 0 or token_epochs > 0:
        torch.manual_seed(seed)  # stage 1 (probe init) must not depend on the decoder's vocabulary size
        stage_key = {"seed": seed, "epochs": vision_epochs, "token_epochs": token_epochs, "lr": lr,
                     "images": len(data), "vision": model.config.vision_config.to_dict()}  # fmt: skip
        vision_cached = _vision_stage(
            model, pixels, labels, epochs=vision_epochs, token_epochs=token_epochs, lr=lr, generator=generator,
            cache=vision_cache, key=stage_key,
        )  # fmt: skip
    vision_started = time.time()
    # Stage 2, end to end. The pretrained tower moves more slowly (vision_lr_scale) so that the randomly
    # initialised projector and decoder cannot wash out its shape features in the first steps.
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    pretrained = vision_epochs > 0 or token_epochs > 0 or init is not None
    for name, parameter in model.named_parameters():
        in_tower = name.startswith("model.vision_tower.") and pretrained
        decays = parameter.ndim >= 2 and "embed" not in name
        groups.setdefault((in_tower, decays), []).append(parameter)
    optimizer = torch.optim.AdamW(
        [
            {"params": params, "weight_decay": 0.05 if decays else 0.0, "lr": lr * (vision_lr_scale if in_tower else 1)}
            for (in_tower, decays), params in groups.items()
        ],
        lr=lr,
        betas=(0.9, 0.98),
    )
    usable = [index for index, (_path, pairs) in enumerate(data) if training_replies(pairs, labels[index])]
    steps_per_epoch = math.ceil(len(usable) / batch_images)
    sampled_steps = int(epochs * steps_per_epoch)
    total_steps = max_steps if max_steps is not None else sampled_steps + int(full_epochs * steps_per_epoch)
    rng = random.Random(seed)
    image_id = tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step, order, running = 0, [], []
    while step < total_steps:
        if not order:
            order = list(usable)
            rng.shuffle(order)
        chosen, order = order[:batch_images], order[batch_images:]
        samples = []
        augmented = augment(pixels[chosen], generator)
        for row, index in enumerate(chosen):
            pairs = list(data[index][1])
            if yes_no_match_share is not None:
                pairs = rebalance_yes_no(pairs, labels[index], rng, yes_no_match_share)
            replies = training_replies(pairs, labels[index])
            rng.shuffle(replies)
            if conversation_share > 0 and rng.random() < conversation_share:
                conversations = split_conversations(replies, max_turns)  # a chat: each turn sees the earlier ones
            else:
                conversations = [[reply] for reply in replies]  # each question blind to the others
            samples.append((augmented[row], *encode_image_conversations(processor, conversations)))
        batch = _batch(samples, tokenizer.pad_token_id)
        image_start = int((batch["input_ids"][0] == image_id).nonzero()[0])  # the same prefix in every row
        # Curriculum: a sparse random subset of the vision tokens first (cheap: each carries the whole image
        # after stage 1), then every token, as at inference.
        vision_tokens = None
        if step < sampled_steps and sampled_vision_tokens < VISION_TOKENS:
            vision_tokens = torch.stack(
                [torch.randperm(VISION_TOKENS, generator=generator)[:sampled_vision_tokens].sort().values
                 for _ in chosen]
            )  # fmt: skip
        withdraw_at = rng.randint(*withdraw_layers) if rng.random() < withdraw_share else None
        loss = packed_loss(model, batch, image_start=image_start, vision_tokens=vision_tokens, withdraw_at=withdraw_at)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running.append(loss.item())
        step += 1
        if step % log_every == 0 or step == total_steps:
            mean = sum(running) / len(running)
            running = []
            print(
                f"step {step}/{total_steps} loss {mean:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                f"{time.time() - started:.0f}s",
                flush=True,
            )
        if checkpoint_every and step % checkpoint_every == 0 and step < total_steps:
            _save(model, processor, Path(out) / f"checkpoint-{step}", {"step": step})
    summary = {
        "steps": total_steps,
        "sampled_steps": min(sampled_steps, total_steps),
        "sampled_vision_tokens": sampled_vision_tokens,
        "withdraw_share": withdraw_share,
        "withdraw_layers": list(withdraw_layers),
        "batch_images": batch_images,
        "lr": lr,
        "seed": seed,
        "hidden": hidden,
        "vision_hidden": vision_hidden,
        "vision_layers": vision_layers,
        "vision_heads": vision_heads,
        "vision_epochs": vision_epochs,
        "token_epochs": token_epochs,
        "vision_lr_scale": vision_lr_scale,
        "vision_stage_s": round(vision_started - started, 1),
        "vision_stage_cached": vision_cached,
        "yes_no_match_share": yes_no_match_share,
        "conversation_share": conversation_share,
        "max_turns": max_turns,
        "warmup": warmup,
        "init": None if init is None else str(init),
        "train_images": len(data),
        "parameters": sum(p.numel() for p in model.parameters()),
        "wall_s": round(time.time() - started, 1),
        "threads": torch.get_num_threads(),
    }
    if init_summary is not None:
        summary["init_training"] = init_summary  # how the starting weights were trained
    _save(model, processor, Path(out), summary)
    return summary


def _save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: Path, summary: dict) -> None:
    """Save an fp16 copy of the weights (the training model stays fp32) under the hub's names, the processor and a
    summary."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = processor.tokenizer
    with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the training's random stream
        copy = LlavaForConditionalGeneration(model.config)
    copy.load_state_dict(model.state_dict())
    copy.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=16,
        do_sample=False,
    )
    copy.half().save_pretrained(out)
    save_in_hub_layout(out)  # the hub's tensor names, which vLLM loads too
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
