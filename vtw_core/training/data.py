"""The default model's training data, all from easy-vqa's train split: the tokenizer and processor trained on
it, the question/answer sampling (reply sentences, yes/no rebalancing), image augmentation, and the packing of all
questions about one image into one training row.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch
from PIL import Image
from transformers import LlamaTokenizer, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vtw_core.models.prompts import assistant_message, render_prompt, user_message
from vtw_core.testing.templates import LLAVA_LOWER_CASE_CHAT_TEMPLATE
from vtw_core.testing.tokenizers import LLAVA_IMAGE_TOKEN, llava_tokenizer
from vtw_core.training import easyvqa
from vtw_core.training.easyvqa import COLOURS, SHAPES, YES_NO, answer_sentence, image_attributes, yes_no_subject
from vtw_core.training.model import IMAGE_SIZE, PATCH_SIZE, VISION_TOKENS

BPE_PIECES = 640  # upper bound for the trained BPE (specials + 256 bytes + merges); it stops earlier
MAX_SHIFT = 4  # pixels (of 72) an augmented image moves in each direction
MAX_TURNS = 12  # turns per training conversation: 12 easy-vqa turns + the image stay well inside 1,024 positions


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


# LLaVA-1.5's template, with the user's text in lower case: easy-vqa's questions are, and so is everything the
# model was trained on, so "What shape is in the image?" reaches it as the question it knows (the tokenizer,
# trained on that text, would otherwise spell the capitals byte by byte). Replies keep their case.
DEFAULT_MODEL_CHAT_TEMPLATE = LLAVA_LOWER_CASE_CHAT_TEMPLATE


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
        chat_template=DEFAULT_MODEL_CHAT_TEMPLATE,
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
    the answer tokens and their </s>. This is `encode_image_conversations` with one turn per conversation.
    """
    return encode_image_conversations(processor, [[pair] for pair in pairs])


def encode_image_conversations(
    processor: LlavaProcessor, conversations: list[list[tuple[str, str]]]
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Conversations about one image packed into one training row: (ids, labels, positions, segments).

    Each conversation is a list of (question, reply) turns, rendered exactly as the app and the server send a
    chat to the model (`vtw_core.models.prompts.render_prompt` with the model's own chat template): the image in
    the first user message only, the earlier replies as plain assistant text, so turn 3 reads
    "<s>USER: <image>\\n{q1} ASSISTANT: {r1} USER: {q2} ASSISTANT: {r2} USER: {q3} ASSISTANT: {r3}</s>".
    The row is the shared prefix "<s>USER: <image>\\n" (segment 0, the image placeholder expanded to
    VISION_TOKENS tokens), then one segment per conversation (1, 2, ...); with `segment_mask` a segment is causal
    over the prefix and itself only, and its positions continue from the prefix, so every turn's reply is
    computed exactly as the model computes it when that turn is asked, with the conversation so far as its
    prompt. Labels cover every reply's tokens and what ends it at inference, </s>: after an earlier turn's
    reply the row goes on with " USER:" (the history as the app re-sends it), but the label there is </s>,
    the token the model must emit to end that reply when it was the last turn. Everything else is -100.
    """
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN)
    eos = tokenizer.eos_token_id
    prefix: list[int] | None = None
    ids: list[int] = []
    labels: list[int] = []
    segments: list[int] = []
    for number, turns in enumerate(conversations, start=1):
        if not turns:
            raise ValueError("an empty conversation")
        messages: list[dict] = []
        turn_ids: list[tuple[list[int], list[int]]] = []  # (prompt, prompt + reply) of each turn, as tokenized
        for turn, (question, reply) in enumerate(turns):
            messages.append(user_message(question, 1 if turn == 0 else 0))
            prompt = render_prompt(processor, messages)
            prompt_ids = tokenizer(prompt)["input_ids"]
            with_reply = tokenizer(prompt + " " + reply)["input_ids"]
            if with_reply[: len(prompt_ids)] != prompt_ids:
                raise RuntimeError(f"the prompt does not tokenize as a prefix of its answer: {prompt!r}")
            turn_ids.append((prompt_ids, with_reply))
            messages.append(assistant_message(reply))
        full = turn_ids[-1][1] + [eos]
        for _prompt_ids, with_reply in turn_ids:
            # Each turn's prompt, and the reply the model generates after it, are what the later turns re-send.
            if full[: len(with_reply)] != with_reply:
                raise RuntimeError(f"a reply does not tokenize the same in the history: {turns!r}")
        answered = [(len(prompt_ids), len(with_reply)) for prompt_ids, with_reply in turn_ids]
        cut = full.index(image_id) + 2  # <s> USER: <image> \n: the same for every conversation
        if prefix is None:
            prefix = full[:cut]
        elif full[:cut] != prefix:
            raise RuntimeError(f"unexpected prompt prefix for {turns[0][0]!r}")
        row_labels = [-100] * len(full)
        for start, end in answered:
            row_labels[start:end] = full[start:end]
            if end < len(full):
                row_labels[end] = eos  # the reply ends here at inference
        ids += full[cut:]
        labels += row_labels[cut:]
        segments += [number] * (len(full) - cut)
    assert prefix is not None, "no conversations"
    expanded = [token for token in prefix for _ in range(VISION_TOKENS if token == image_id else 1)]
    positions = list(range(len(expanded)))
    for number in range(1, len(conversations) + 1):
        positions += range(len(expanded), len(expanded) + segments.count(number))
    return (
        expanded + ids,
        [-100] * len(expanded) + labels,
        positions,
        [0] * len(expanded) + segments,
    )


def split_conversations(replies: list[tuple[str, str]], max_turns: int = MAX_TURNS) -> list[list[tuple[str, str]]]:
    """An image's (question, reply) pairs as consecutive conversations of at most `max_turns` turns, as even
    in length as possible (13 pairs with max_turns 12: 7 + 6)."""
    count = -(-len(replies) // max_turns)
    sizes = [len(replies) // count + (index < len(replies) % count) for index in range(count)]
    starts = [sum(sizes[:index]) for index in range(count)]
    return [replies[start : start + size] for start, size in zip(starts, sizes, strict=True)]


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
