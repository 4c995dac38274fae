"""The default model's training pieces: labels read from the train answers, question rebalancing, augmentation."""

from __future__ import annotations

import random
import re
from collections import Counter

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from vtw_core.models.prompts import assistant_message, build_model_inputs, user_message
from vtw_core.training.data import (
    MAX_SHIFT,
    _batch,
    augment,
    build_processor,
    encode_image_conversations,
    encode_image_questions,
    rebalance_yes_no,
    split_conversations,
    training_replies,
)
from vtw_core.training.data import load_split as load_images
from vtw_core.training.easyvqa import COLOURS, SHAPES, image_attributes, load_split, yes_no_subject
from vtw_core.training.loss import packed_loss, segment_mask
from vtw_core.training.model import VISION_TOKENS, build_config


def test_yes_no_subject():
    assert yes_no_subject("is there a red shape?") == ("red", False)
    assert yes_no_subject("does the image not contain a circle?") == ("circle", True)
    assert yes_no_subject("is no gray shape present?") == ("gray", True)
    assert yes_no_subject("what is the red shape?") == ("red", False)
    assert yes_no_subject("what color is the shape?") == (None, False)


def test_image_attributes_agree_with_the_direct_answers():
    """On every train image that has a "what shape" or "what colour" answer, the yes/no questions alone give the
    same attribute whenever they give one, and they cover most images."""
    images = load_images("train")
    agreed = derived = 0
    for _path, pairs in images:
        direct = {answer for _question, answer in pairs if answer in SHAPES or answer in COLOURS}
        from_yes_no = image_attributes([(q, a) for q, a in pairs if a in ("yes", "no")])
        for value, kind in zip(from_yes_no, (SHAPES, COLOURS), strict=True):
            stated = [answer for answer in direct if answer in kind]
            if value is not None and stated:
                derived += 1
                agreed += stated == [value]
    assert derived > 2000 and agreed == derived
    labelled = [image_attributes(pairs) for _path, pairs in images]
    assert sum(shape is not None for shape, _ in labelled) > 0.85 * len(images)
    assert sum(colour is not None for _, colour in labelled) > 0.85 * len(images)


def _truth(question: str, shape: str, colour: str) -> str:
    """An independent reading of a yes/no question: which word it names, whether it is negated."""
    named = next(word for word in re.findall(r"[a-z]+", question) if word in SHAPES + COLOURS)
    present = named in (shape, colour)
    negated = " not " in f" {question} " or question.startswith("is no ")
    return "yes" if present != negated else "no"


def test_rebalanced_questions_are_answered_correctly_and_half_match():
    items = load_split("train")[:4000]
    by_image: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        by_image.setdefault(item.image, []).append((item.question, item.answer))
    rng = random.Random(0)
    matches = Counter()
    for pairs in by_image.values():
        shape, colour = image_attributes(pairs)
        if shape is None or colour is None:
            continue
        rebalanced = rebalance_yes_no(pairs, (shape, colour), rng, match_share=0.5)
        assert len(rebalanced) == len(pairs)
        for (question, answer), (new_question, new_answer) in zip(pairs, rebalanced, strict=True):
            if answer not in ("yes", "no"):
                assert (new_question, new_answer) == (question, answer)  # open questions are untouched
                continue
            assert _truth(question, shape, colour) == answer  # the dataset's own answer, read independently
            assert _truth(new_question, shape, colour) == new_answer
            named, _negated = yes_no_subject(new_question)
            matches[named in (shape, colour)] += 1
    share = matches[True] / (matches[True] + matches[False])
    assert 0.45 < share < 0.55, share  # the train split itself: 12% for colours, 34% for shapes


def test_augment_moves_and_mirrors_without_changing_colours():
    generator = torch.Generator().manual_seed(0)
    image = torch.full((3, 60, 60), 0.8)
    image[:, 20:30, 10:16] = torch.tensor([-1.0, 0.5, 0.25])[:, None, None]  # a coloured rectangle
    out = augment(image.expand(64, -1, -1, -1), generator)
    assert out.shape == (64, 3, 60, 60)
    offsets = set()
    for view in out:
        inside = (view[0] < 0).nonzero()
        top, left = inside.min(dim=0).values.tolist()
        bottom, right = inside.max(dim=0).values.tolist()
        assert (bottom - top + 1, right - left + 1) == (10, 6)  # same size: moved, not cut or stretched
        patch = view[:, top : bottom + 1, left : right + 1]
        assert torch.allclose(patch, image[:, 20:30, 10:16], atol=1e-6)  # same colour
        assert torch.allclose(view[:, view[0] >= 0], torch.tensor(0.8), atol=1e-6)  # the rest is background
        offsets.add((top - 20, left - 10, left - (60 - 16)))
    dy = {offset[0] for offset in offsets}
    assert max(abs(value) for value in dy) <= MAX_SHIFT and len(dy) > 3
    # Mirrored copies start near column 60 - 16 = 44 (the rectangle spans 10..15), plain ones near column 10.
    plain = [o for o in offsets if abs(o[1]) <= MAX_SHIFT]
    mirrored = [o for o in offsets if abs(o[2]) <= MAX_SHIFT]
    assert plain and mirrored


def test_training_replies_say_what_the_image_shows_before_yes_or_no():
    pairs = [("is there a red shape?", "yes"), ("what shape is in the image?", "circle")]
    assert training_replies(pairs, ("circle", "red")) == [
        ("is there a red shape?", "Red. Is it red? Yes."),
        ("what shape is in the image?", "Circle."),
    ]
    # Without the colour, the yes/no reply could not say what the image shows: that question is left out.
    assert training_replies(pairs, ("circle", None)) == [("what shape is in the image?", "Circle.")]


def tiny_model_and_image():
    """The default model's processor, a seeded 2-layer model of its shape, the first test image and its pixels."""
    processor = build_processor()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(
        build_config(processor.tokenizer, layers=2, hidden=32, vision_hidden=32, vision_layers=1)
    ).eval()
    image = Image.open(load_images("test")[0][0]).convert("RGB")
    return processor, model, image, processor.image_processor([image], return_tensors="pt")["pixel_values"]


def packed_logits(processor, model, pixels, row) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of one packed training row (ids, labels, positions, segments) under its block mask, and the
    segment number of each position."""
    batch = _batch([(pixels[0], *row)], processor.tokenizer.pad_token_id)
    inputs = {name: value for name, value in batch.items() if name not in ("labels", "segments")}
    with torch.no_grad():
        packed = model(**inputs, attention_mask=segment_mask(batch["segments"])).logits[0]
    return packed, torch.tensor(row[3])


def test_a_packed_row_computes_each_question_as_its_own_single_turn_prompt():
    """Training packs ~10 questions behind one image with a block mask; each must see exactly what the
    single-turn prompt at inference sees, so the logits of every segment equal a separate forward pass."""
    processor, model, image, pixels = tiny_model_and_image()
    pairs = [("what color is the shape?", "Red."), ("is there a circle?", "Triangle. Is it a circle? No.")]
    row = encode_image_questions(processor, pairs)
    packed, segment_ids = packed_logits(processor, model, pixels, row)
    with torch.no_grad():
        for number, (question, reply) in enumerate(pairs, start=1):
            message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
            prompt = processor.apply_chat_template([message], add_generation_prompt=True, tokenize=False)
            single = processor(text=[prompt + " " + reply], images=[image], return_tensors="pt")
            alone = model(**single).logits[0]
            mine = packed[segment_ids == number]
            # The packed segment starts after the shared prefix and ends with </s>, which the text lacks.
            assert torch.allclose(mine[:-1], alone[len(alone) - len(mine) + 1 :], atol=1e-5)
    assert packed.shape[0] == len(row[0])


CHAT = [
    ("what is the red shape?", "Triangle."),
    ("what color is the shape?", "Red."),
    ("is there a blue shape?", "Red. Is it blue? No."),
]


def test_a_conversation_row_is_the_chat_the_app_sends():
    """A conversation is trained on the very tokens the app sends for a chat (`build_model_inputs` on
    `user_message`s, the image in the first one only, the earlier replies as `assistant_message`s): every turn's
    prompt is a prefix of the row, every reply follows it as the model generates it, and the labels are the
    replies and their </s>, also where the row goes on with the next turn."""
    processor = build_processor()
    tokenizer = processor.tokenizer
    image = Image.open(load_images("test")[0][0]).convert("RGB")
    ids, labels, positions, segments = encode_image_conversations(processor, [CHAT])
    first = segments.index(1)  # the conversation follows the shared prefix "<s> USER: <image x 576> \\n"
    assert positions == list(range(len(ids))) and segments == [0] * first + [1] * (len(ids) - first)
    assert VISION_TOKENS < first <= VISION_TOKENS + 4
    messages, ends = [], []
    for turn, (question, reply) in enumerate(CHAT):
        messages.append(user_message(question, 1 if turn == 0 else 0))
        prompt = build_model_inputs(processor, [messages], [[image]], "cpu", torch.float32)["input_ids"][0].tolist()
        assert ids[: len(prompt)] == prompt  # the app's prompt for this turn, vision tokens expanded
        generated = tokenizer(" " + reply, add_special_tokens=False)["input_ids"]
        assert ids[len(prompt) : len(prompt) + len(generated)] == generated
        assert labels[len(prompt) : len(prompt) + len(generated)] == generated
        assert tokenizer.decode(generated) == reply
        ends.append(len(prompt) + len(generated))
        messages.append(assistant_message(reply))
    eos = tokenizer.eos_token_id
    assert [labels[end] for end in ends] == [eos] * 3  # the reply ends there at inference
    assert ids[ends[-1]] == eos and len(ids) == ends[-1] + 1
    assert tokenizer.convert_ids_to_tokens(ids[ends[0]]) == "▁USER:"  # the history goes on with the next turn
    answer_positions = {index for end in ends for index in range(end - 8, end + 1) if labels[index] != -100}
    assert {index for index, label in enumerate(labels) if label != -100} == answer_positions


def test_packed_conversations_compute_each_turn_as_the_chat_alone():
    """Two conversations and a single question behind one image: each is computed as its own chat (logits of a
    separate forward pass of the last turn's whole prompt + reply), blind to the others."""
    processor, model, _image, pixels = tiny_model_and_image()
    conversations = [CHAT, [("what shape is in the image?", "Triangle.")], CHAT[1:]]
    row = encode_image_conversations(processor, conversations)
    packed, segment_ids = packed_logits(processor, model, pixels, row)
    with torch.no_grad():
        for number, turns in enumerate(conversations, start=1):
            alone_ids, *_ = encode_image_conversations(processor, [turns])
            alone = model(input_ids=torch.tensor([alone_ids]), pixel_values=pixels).logits[0]
            mine = packed[segment_ids == number]
            assert torch.allclose(mine, alone[len(alone) - len(mine) :], atol=1e-5)
    # A one-turn conversation is exactly the blind single-question segment.
    single = [("what color is the shape?", "Red."), ("is there a circle?", "Triangle. Is it a circle? No.")]
    one_turn_each = encode_image_conversations(processor, [[pair] for pair in single])
    assert encode_image_questions(processor, single) == one_turn_each


def test_split_conversations_keeps_the_order_and_evens_the_lengths():
    pairs = [(f"q{i}", f"r{i}") for i in range(13)]
    chats = split_conversations(pairs, 12)
    assert [len(chat) for chat in chats] == [7, 6] and [pair for chat in chats for pair in chat] == pairs
    assert split_conversations(pairs[:5], 12) == [pairs[:5]]
    assert [len(chat) for chat in split_conversations(pairs[:7], 3)] == [3, 2, 2]


def _small_packed_batch(rows: int = 2):
    processor = build_processor()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(
        build_config(processor.tokenizer, layers=4, hidden=32, vision_hidden=32, vision_layers=1)
    ).eval()
    with torch.no_grad():  # sharp attention, so that position ids and masks move the loss, as in a trained model
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    images = load_images("train")[:rows]
    pixels = processor.image_processor(
        [Image.open(path).convert("RGB") for path, _pairs in images], return_tensors="pt"
    )["pixel_values"]
    samples = []
    for row, (_path, pairs) in enumerate(images):
        replies = training_replies(pairs, image_attributes(pairs))[: 2 + row]  # rows of different lengths
        samples.append((pixels[row], *encode_image_questions(processor, replies)))
    batch = _batch(samples, processor.tokenizer.pad_token_id)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    image_start = int((batch["input_ids"][0] == image_id).nonzero()[0])
    return model, batch, image_start


def test_packed_loss_equals_the_stock_model_loss():
    model, batch, image_start = _small_packed_batch()
    inputs = {name: value for name, value in batch.items() if name != "segments"}
    with torch.no_grad():
        stock = model(**inputs, attention_mask=segment_mask(batch["segments"])).loss
        mine = packed_loss(model, batch, image_start=image_start)
        every = torch.arange(VISION_TOKENS).expand(2, -1)  # "a subset" that is every token: the same
        subset_of_all = packed_loss(model, batch, image_start=image_start, vision_tokens=every)
    assert torch.allclose(mine, stock, atol=1e-5) and torch.allclose(subset_of_all, stock, atol=1e-5)


def test_a_sparse_subset_of_vision_tokens_keeps_their_true_positions():
    """Reference written here: the stock model on inputs_embeds where only the chosen vision tokens stand, each
    with the feature the stock get_image_features gives it and its original position id."""
    model, batch, image_start = _small_packed_batch()
    generator = torch.Generator().manual_seed(0)
    chosen = torch.stack([torch.randperm(VISION_TOKENS, generator=generator)[:7].sort().values for _ in range(2)])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        keep = [
            torch.cat([torch.arange(image_start), image_start + row, torch.arange(image_start + VISION_TOKENS,
                       batch["input_ids"].shape[1])])
            for row in chosen
        ]  # fmt: skip
        picked = {name: torch.stack([batch[name][row, columns] for row, columns in enumerate(keep)])
                  for name in ("input_ids", "labels", "position_ids", "segments")}  # fmt: skip
        embeds = model.model.language_model.embed_tokens(picked["input_ids"])
        for row, tokens in enumerate(chosen):
            embeds[row, image_start : image_start + len(tokens)] = features[row][tokens]
        reference = model(
            inputs_embeds=embeds,
            position_ids=picked["position_ids"],
            attention_mask=segment_mask(picked["segments"]),
            labels=picked["labels"],
        ).loss
        mine = packed_loss(model, batch, image_start=image_start, vision_tokens=chosen)
    assert torch.allclose(mine, reference, atol=1e-5)


def test_withdrawal_in_training_equals_masking_the_image_from_layer_k():
    """Reference written here: the full sequence through every layer, where from layer K on no text token may
    attend to a vision token (what withdrawing them means for the text); the loss reads text positions only."""
    model, batch, image_start = _small_packed_batch()
    k = 2
    language_model = model.model.language_model
    with torch.no_grad():
        features = model.model.multi_modal_projector(
            model.model.vision_tower(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states[-1][
                :, 1:
            ]
        )
        hidden = language_model.embed_tokens(batch["input_ids"])
        hidden[:, image_start : image_start + VISION_TOKENS] = features
        shallow = segment_mask(batch["segments"])
        is_image = torch.zeros(hidden.shape[1], dtype=torch.bool)
        is_image[image_start : image_start + VISION_TOKENS] = True
        deep = shallow & ~is_image[None, None, None, :] | torch.eye(hidden.shape[1], dtype=torch.bool)
        rotary = language_model.rotary_emb(hidden, batch["position_ids"])
        for index, layer in enumerate(language_model.layers):
            mask = shallow if index < k else deep
            hidden = layer(hidden, attention_mask=mask, position_ids=batch["position_ids"], position_embeddings=rotary)
        logits = model.lm_head(language_model.norm(hidden))
        reference = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()
        )  # vision positions carry label -100, so they drop out
        mine = packed_loss(model, batch, image_start=image_start, withdraw_at=k)
        full = packed_loss(model, batch, image_start=image_start)
    assert torch.allclose(mine, reference, atol=1e-5)
    assert (mine - full).abs() > 1e-4  # withdrawal does change what the text sees (random weights: a little)
