"""The end-to-end training loss of the default model: packed rows, and VTW's withdrawal during training."""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration

from vtw_core.training.model import VISION_TOKENS, vision_features


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
