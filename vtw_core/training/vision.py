"""Stage 1 of the default model's training: the vision tower learns shape and colour before it meets the decoder
(`pretrain_vision`), and that stage's cache (`_vision_stage`), so stage 2 can be re-run alone."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from vtw_core.training.data import augment
from vtw_core.training.easyvqa import COLOURS, SHAPES


def pretrain_vision(
    model: LlavaForConditionalGeneration,
    pixels: torch.Tensor,
    labels: list[tuple[str | None, str | None]],
    *,
    epochs: float,
    batch_images: int = 32,
    lr: float = 1e-3,
    generator: torch.Generator,
    per_token: bool = False,
    log_every: int = 50,
) -> None:
    """Stage 1: teach the vision tower shape and colour before it meets the decoder.

    From scratch, the VQA loss alone learns colour quickly but barely learns shape in CPU-affordable time
    (the 3-epoch end-to-end model answered shape questions at chance). Here a linear probe on the mean of the
    very features LLaVA hands the projector (last layer, CLS dropped) classifies each train image's shape and
    colour, as its own questions state them (`image_attributes`), under `augment`. The probe is thrown away.

    `per_token=True` (stage 1b) instead asks every vision token on its own to state the whole image's shape
    and colour. With the mean-pooled probe only, the decoder read rectangle-vs-circle from the vision tokens
    in its last layers (withdrawing vision before layer 9 of 12 cost 2.6 points); a decoder that can read the
    image from any one token in any layer need not keep looking late.
    """
    tower = model.model.vision_tower
    width = tower.config.hidden_size
    probe = torch.nn.Linear(width, len(SHAPES) + len(COLOURS))
    shape_ids = torch.tensor([SHAPES.index(shape) if shape else -100 for shape, _ in labels])
    colour_ids = torch.tensor([COLOURS.index(colour) if colour else -100 for _, colour in labels])
    parameters = [*tower.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    total_steps = max(1, int(epochs * len(labels) / batch_images))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=total_steps, pct_start=0.05)
    started, running = time.time(), []
    for step in range(1, total_steps + 1):
        chosen = torch.randint(0, len(labels), (batch_images,), generator=generator)
        features = tower(pixel_values=augment(pixels[chosen], generator), output_hidden_states=True)
        patches = features.hidden_states[-1][:, 1:]  # (batch, VISION_TOKENS, width)
        logits = probe(patches if per_token else patches.mean(dim=1, keepdim=True))  # (batch, tokens, classes)
        tokens = logits.shape[1]
        shapes, colours = shape_ids[chosen].repeat_interleave(tokens), colour_ids[chosen].repeat_interleave(tokens)
        # Summed over the known labels, per image: a batch may lack one kind of label altogether.
        loss = (
            torch.nn.functional.cross_entropy(logits[..., : len(SHAPES)].flatten(0, 1), shapes, reduction="sum")
            + torch.nn.functional.cross_entropy(logits[..., len(SHAPES) :].flatten(0, 1), colours, reduction="sum")
        ) / (batch_images * tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        running.append(loss.item())
        if step % log_every == 0 or step == total_steps:
            print(
                f"vision{' 1b' if per_token else ''} step {step}/{total_steps} "
                f"loss {sum(running) / len(running):.4f} {time.time() - started:.0f}s",
                flush=True,
            )
            running = []


def _vision_stage(
    model: LlavaForConditionalGeneration,
    pixels: torch.Tensor,
    labels: list[tuple[str | None, str | None]],
    *,
    epochs: float,
    token_epochs: float,
    lr: float,
    generator: torch.Generator,
    cache: str | Path | None,
    key: dict,
) -> bool:
    """`pretrain_vision`, or its saved result: the tower and both random streams as stage 1 left them, so that
    stage 2 runs the same either way (stage 1 is the slow half; the cache lets stage 2 be re-run alone).
    Returns whether the cache was used."""
    tower = model.model.vision_tower
    if cache is not None and Path(cache).is_file():
        saved = torch.load(cache, weights_only=True)
        if saved["key"] == json.dumps(key, sort_keys=True):
            tower.load_state_dict(saved["tower"])
            generator.set_state(saved["generator"])
            torch.set_rng_state(saved["torch_rng"])
            print(f"vision stage loaded from {cache}", flush=True)
            return True
    if epochs > 0:
        pretrain_vision(model, pixels, labels, epochs=epochs, lr=lr, generator=generator)
    if token_epochs > 0:
        pretrain_vision(model, pixels, labels, epochs=token_epochs, lr=lr, generator=generator, per_token=True)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        state = {"key": json.dumps(key, sort_keys=True), "tower": tower.state_dict(),
                 "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}  # fmt: skip
        torch.save(state, cache)
    return False
