"""Train the embedded default model: a small LLaVA, from scratch, on easy-vqa's train split.

    python -m vtw_core.training.train_default --out assets/default-model

reproduces the shipped weights (seeded; see docs/default-model.md for the time it took and on which hardware).
Only the train split is read; the test split is never seen here.

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

Training packs all questions of one image into one row (`encode_image_questions`): the image's vision tokens are
shared by its ~10 questions, and a block attention mask with per-segment positions (`segment_mask`) makes every
question + answer exactly the single-turn prompt used at inference, blind to the other questions. The question
order is shuffled every epoch; the loss is taken on the answer tokens (and their </s>) only. AdamW, cosine
schedule with warm-up, seeded. `--vision-cache FILE` saves stage 1 (or reloads it when the settings match, with
the random streams as they were), so stage 2 can be re-run alone with the same result.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vtw_core.testing.tiny import (
    LLAVA_CHAT_TEMPLATE,
    LLAVA_IMAGE_TOKEN,
    llava_tokenizer,
)
from vtw_core.training import easyvqa
from vtw_core.training.easyvqa import COLOURS, SHAPES, YES_NO, answer_sentence, image_attributes, yes_no_subject

IMAGE_SIZE = 72
PATCH_SIZE = 3
VISION_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576, a 24x24 grid as in LLaVA-1.5

# Sizes of the shipped model (v3): LLaVA-1.5's proportions, so that VTW's saving shows on a CPU. The decoder is
# wide enough that a layer's arithmetic outweighs the fixed cost of calling it (v2, 128 wide, was not).
HIDDEN = 256
LAYERS = 16
HEADS = 4
VISION_HEADS = 2  # heads of 32: 16-wide heads ran the tower at half the decoder's FLOP rate on CPU
VISION_HIDDEN = 64
VISION_LAYERS = 3
BPE_PIECES = 640  # upper bound for the trained BPE (specials + 256 bytes + merges); it stops earlier
MAX_SHIFT = 4  # pixels (of 72) an augmented image moves in each direction
SAMPLED_VISION_TOKENS = 48  # vision tokens per row in the first, cheap part of end-to-end training
WITHDRAW_LAYERS = (7, 8)  # withdrawal-aware steps withdraw the vision tokens at a K drawn from this range


def load_split(split: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(image path, [(question, answer), ...]), ...] for easy-vqa's "train" or "test" split, by image."""
    grouped: dict[str, list[tuple[str, str]]] = {}
    for item in easyvqa.load_split(split):
        grouped.setdefault(item.image, []).append((item.question, item.answer))
    return sorted(grouped.items(), key=lambda entry: int(Path(entry[0]).stem))  # by image id


def _corpus() -> list[str]:
    lines = ["USER: ASSISTANT:", "USER:", "ASSISTANT:"]
    for _path, pairs in load_split("train"):
        attributes = image_attributes(pairs)
        for question, answer in pairs:
            lines.append(f"USER: {question} ASSISTANT: {answer_sentence(answer, question, attributes)}")
    return lines


def training_replies(pairs: list[tuple[str, str]], attributes: tuple[str | None, str | None]) -> list[tuple[str, str]]:
    """(question, reply sentence) for one image. Yes/no questions whose reply cannot say what the image shows
    (the asked kind of attribute is stated by none of the image's answers) are left out (`answer_sentence`)."""
    replies = [(question, answer_sentence(answer, question, attributes)) for question, answer in pairs]
    return [(question, reply) for question, reply in replies if reply not in ("Yes.", "No.")]


def build_tokenizer() -> LlamaTokenizer:
    """Llama-layout BPE (<unk>/<s>/</s>, 256 byte pieces, merges, then <image>, <pad>) over the train corpus."""
    return llava_tokenizer(tuple(_corpus()), BPE_PIECES, exact=False)


def build_processor() -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_config(
    tokenizer: LlamaTokenizer,
    *,
    layers: int = LAYERS,
    hidden: int = HIDDEN,
    vision_hidden: int = VISION_HIDDEN,
    vision_layers: int = VISION_LAYERS,
    vision_heads: int = VISION_HEADS,
) -> LlavaConfig:
    image_id = tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN)
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=4 * vision_hidden,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=vision_hidden,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        ),
        image_token_id=image_id,
        image_seq_length=VISION_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def encode_image_questions(
    processor: LlavaProcessor, pairs: list[tuple[str, str]]
) -> tuple[list[int], list[int], list[int], list[int]]:
    """All (question, reply) pairs about one image packed into one training row: (ids, labels, positions, segments).

    The row is the shared prefix "<s>USER: <image>\\n" (image placeholder expanded to VISION_TOKENS tokens,
    segment 0) followed by one segment per question, "{question} ASSISTANT: {reply}</s>" (segments 1, 2, ...).
    With `segment_mask` each segment attends only to the prefix and to itself, and its positions continue
    from the prefix, so every segment is computed exactly as the single-turn prompt + answer it came from
    (no question sees another's answer), while the image is encoded once per row. Labels are -100 except on
    the answer tokens and their </s>.
    """
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN)
    prefix: list[int] | None = None
    ids: list[int] = []
    labels: list[int] = []
    segments: list[int] = []
    for number, (question, reply) in enumerate(pairs, start=1):
        message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        prompt = processor.apply_chat_template([message], add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + " " + reply)["input_ids"] + [tokenizer.eos_token_id]
        if full[: len(prompt_ids)] != prompt_ids:
            raise RuntimeError(f"the prompt does not tokenize as a prefix of its answer: {prompt!r}")
        cut = prompt_ids.index(image_id) + 2  # <s> USER: <image> \n: the same for every question
        if prefix is None:
            prefix = full[:cut]
        elif full[:cut] != prefix:
            raise RuntimeError(f"unexpected prompt prefix for {question!r}")
        ids += full[cut:]
        labels += [-100] * (len(prompt_ids) - cut) + full[len(prompt_ids) :]
        segments += [number] * (len(full) - cut)
    assert prefix is not None, "no questions"
    expanded = [token for token in prefix for _ in range(VISION_TOKENS if token == image_id else 1)]
    positions = list(range(len(expanded)))
    for number in range(1, len(pairs) + 1):
        positions += range(len(expanded), len(expanded) + segments.count(number))
    return (
        expanded + ids,
        [-100] * len(expanded) + labels,
        positions,
        [0] * len(expanded) + segments,
    )


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """(batch, 1, L, L) boolean attention mask for packed rows: causal, within a segment or onto segment 0.

    Padding carries segment -1 and attends only to itself (a fully masked row would give NaNs).
    """
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = segments[:, :, None] == segments[:, None, :]
    onto_prefix = (segments[:, None, :] == 0) & (segments[:, :, None] >= 0)
    padding_self = (segments[:, :, None] < 0) & torch.eye(length, dtype=torch.bool)
    return (((same | onto_prefix) & causal) | padding_self)[:, None]


def _pixel_values(processor: LlavaProcessor, paths: list[str]) -> torch.Tensor:
    images = [Image.open(path).convert("RGB") for path in paths]
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def rebalance_yes_no(
    pairs: list[tuple[str, str]],
    attributes: tuple[str | None, str | None],
    rng: random.Random,
    match_share: float = 0.3,
) -> list[tuple[str, str]]:
    """Yes/no questions re-asked about the image's own shape or colour `match_share` of the time.

    In easy-vqa's train split only 12% of the yes/no colour questions name the shape's actual colour (34% for
    shapes), and the decoder settled on "a colour I was asked about is absent" (88% right without looking).
    Each yes/no question that names one shape or colour gets that word redrawn: the image's own
    (`image_attributes`, from this image's train answers) with probability `match_share`, else another of
    its kind, and the answer is recomputed. Templates, images and labels all stay the train split's.

    Why 0.3 and not 0.5: at 0.5 every single cue (the negation, the asked word, the seen word) leaves yes and
    no equally likely, and the answer is a three-way parity of them, which the decoder did not start to learn
    in 700 to 900 steps (two reply formats). At 0.3 "not" alone predicts the answer 70% of the time; the
    decoder picks that up first, then the comparison (a sudden drop of the loss near step 650 in our runs).
    """
    shape, colour = attributes
    rebalanced = []
    for question, answer in pairs:
        named, negated = yes_no_subject(question)
        truth = shape if named in SHAPES else colour
        if answer in YES_NO and named is not None and truth is not None:
            kind = SHAPES if named in SHAPES else COLOURS
            drawn = truth if rng.random() < match_share else rng.choice([word for word in kind if word != truth])
            question = re.sub(rf"\b{named}\b", drawn, question)
            answer = "yes" if (drawn == truth) != negated else "no"
        rebalanced.append((question, answer))
    return rebalanced


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to MAX_SHIFT pixels, filled with each image's background.

    Both keep every answer true: easy-vqa's triangles point up, so a left-right mirror is still the same shape,
    and the background is one flat colour (the median of the border pixels). `pixels` is (batch, 3, H, W).
    """
    batch = pixels.shape[0]
    flip = torch.rand(batch, generator=generator) < 0.5
    pixels = torch.where(flip[:, None, None, None], pixels.flip(3), pixels)
    border = torch.cat([pixels[:, :, 0], pixels[:, :, -1], pixels[:, :, :, 0], pixels[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]  # (batch, 3, 1, 1)
    height, width = pixels.shape[2:]
    padded = torch.nn.functional.pad(pixels - background, [MAX_SHIFT] * 4) + background
    shifts = torch.randint(0, 2 * MAX_SHIFT + 1, (batch, 2), generator=generator).tolist()
    return torch.stack(
        [image[:, dy : dy + height, dx : dx + width] for image, (dy, dx) in zip(padded, shifts, strict=True)]
    )


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


def _batch(samples: list[tuple[torch.Tensor, list[int], list[int], list[int], list[int]]], pad_id: int) -> dict:
    length = max(len(sample[1]) for sample in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), -100, dtype=torch.long)
    positions = torch.zeros((len(samples), length), dtype=torch.long)
    segments = torch.full((len(samples), length), -1, dtype=torch.long)
    for row, (_pixels, ids, label, position, segment) in enumerate(samples):  # right padding: training only
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(label)
        positions[row, : len(ids)] = torch.tensor(position)
        segments[row, : len(ids)] = torch.tensor(segment)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": positions,
        "segments": segments,
        "pixel_values": torch.stack([sample[0] for sample in samples]),
    }


def vision_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """(batch, VISION_TOKENS, hidden): what LLaVA puts at the image tokens (last tower layer, CLS dropped,
    projected), as `LlavaModel.get_image_features` computes it for this config."""
    tower_out = model.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
    return model.model.multi_modal_projector(tower_out.hidden_states[-1][:, 1:])


def packed_loss(
    model: LlavaForConditionalGeneration,
    batch: dict,
    *,
    image_start: int,
    vision_tokens: torch.Tensor | None = None,
    withdraw_at: int | None = None,
) -> torch.Tensor:
    """Mean next-token loss over the answer tokens of packed rows (`_batch`), with two training-only options.

    vision_tokens (batch, S): keep only these of each row's VISION_TOKENS vision tokens (sorted indices); they
        keep their original position ids, so the decoder sees a sparse copy of the image at its true positions.
    withdraw_at = K: run decoder layers 0..K-1 on every token and K..N-1 on the text alone, exactly VTW's
        inference (`vtw_core.engine.decoder`): the text keeps its position ids and no longer attends to the image.

    With neither, this equals `LlavaForConditionalGeneration(**batch).loss` (tests/test_train_default.py).
    Every row has its image tokens at image_start .. image_start + VISION_TOKENS - 1.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    positions, segments = batch["position_ids"], batch["segments"]
    rows, length = input_ids.shape
    features = vision_features(model, batch["pixel_values"])  # (rows, VISION_TOKENS, hidden)
    if vision_tokens is not None:
        before = torch.arange(image_start).expand(rows, -1)
        after = torch.arange(image_start + VISION_TOKENS, length).expand(rows, -1)
        columns = torch.cat([before, image_start + vision_tokens, after], dim=1)  # (rows, length')
        input_ids, labels, positions, segments = (
            tensor.gather(1, columns) for tensor in (input_ids, labels, positions, segments)
        )
        features = features.gather(1, vision_tokens[..., None].expand(-1, -1, features.shape[-1]))
    image_count = features.shape[1]
    language_model = model.model.language_model
    embeds = language_model.embed_tokens(input_ids)
    hidden = torch.cat([embeds[:, :image_start], features.to(embeds.dtype), embeds[:, image_start + image_count :]], 1)
    mask = segment_mask(segments)
    cos, sin = language_model.rotary_emb(hidden, positions)
    for index, layer in enumerate(language_model.layers):
        if index == withdraw_at:  # VTW: drop the vision tokens from the sequence, the mask and the rotary tables
            text = torch.cat([torch.arange(image_start), torch.arange(image_start + image_count, hidden.shape[1])])
            hidden, positions, labels = hidden[:, text], positions[:, text], labels[:, text]
            mask, cos, sin = mask[:, :, text][..., text], cos[:, text], sin[:, text]
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin))
    logits = model.lm_head(language_model.norm(hidden))
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


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
) -> dict:
    """Train from scratch and save the model + processor to `out` (fp16 weights). Returns a summary dict."""
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
    for name, parameter in model.named_parameters():
        in_tower = name.startswith("model.vision_tower.") and (vision_epochs > 0 or token_epochs > 0)
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
            samples.append((augmented[row], *encode_image_questions(processor, replies)))
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
        "train_images": len(data),
        "parameters": sum(p.numel() for p in model.parameters()),
        "wall_s": round(time.time() - started, 1),
        "threads": torch.get_num_threads(),
    }
    _save(model, processor, Path(out), summary)
    return summary


def _save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: Path, summary: dict) -> None:
    """Save an fp16 copy of the weights (the training model stays fp32), the processor and a summary."""
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
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")


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
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
