"""The tiny families' chat templates: the real checkpoints' formats (LLaVA's USER/ASSISTANT, ChatML, Idefics3's
User/Assistant turns), so prompts tokenize as they would for the real models."""

from __future__ import annotations


def _media_items(image: str, video: str) -> str:
    """A turn's image and video items, in order, each as its placeholder text."""
    return (
        "{% for content in message['content'] %}"
        f"{{% if content['type'] == 'image' %}}{{{{ '{image}' }}}}"
        f"{{% elif content['type'] == 'video' %}}{{{{ '{video}' }}}}{{% endif %}}"
        "{% endfor %}"
    )


def _user_assistant_template(media: str, lower_user_text: bool = False) -> str:
    """LLaVA's "USER: {media}{text} ASSISTANT:" turns; `media` is the Jinja loop that writes a turn's images and
    videos before its text. `lower_user_text`: the user's text in lower case (replies keep theirs)."""

    def text(value: str) -> str:
        return f"({value} | lower if message['role'] == 'user' else {value})" if lower_user_text else value

    whole, part = text("message['content']"), text("content['text']")
    return (
        "{% for message in messages %}"
        "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
        f"{{% if message['content'] is string %}}{{{{ {whole} + ' ' }}}}"
        "{% else %}"
        f"{media}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        f"{{{{ {part} + ' ' }}}}"
        "{% endfor %}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )


def _chatml_template(image: str, video: str) -> str:
    """ChatML (LLaVA-OneVision, InternVL): each turn's images and videos first, then its text."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        f"{{% else %}}{_media_items(image, video)}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# llava-hf/llava-1.5-7b-hf's template ("USER: <image>\n{text} ASSISTANT:"; images of a turn first, then its
# text), extended to accept plain-string content.
_LLAVA_IMAGES = (
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
)
LLAVA_CHAT_TEMPLATE = _user_assistant_template(_LLAVA_IMAGES)
# The same with the user's text in lower case: the embedded default model's (vtw_core/training/data.py says why).
LLAVA_LOWER_CASE_CHAT_TEMPLATE = _user_assistant_template(_LLAVA_IMAGES, lower_user_text=True)

# Qwen/Qwen2-VL-7B-Instruct's ChatML template (also used by Qwen2.5-VL), verbatim.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Idefics3's "User:<image>question<end_of_utterance>\nAssistant:" turns.
IDEFICS3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

CHAT_TEMPLATES = {
    "llava": LLAVA_CHAT_TEMPLATE,
    "llava_next": LLAVA_CHAT_TEMPLATE,
    "qwen2_vl": QWEN_CHAT_TEMPLATE,
    "qwen2_5_vl": QWEN_CHAT_TEMPLATE,
    "qwen3_vl": QWEN_CHAT_TEMPLATE,
    "idefics3": IDEFICS3_CHAT_TEMPLATE,
    "smolvlm": IDEFICS3_CHAT_TEMPLATE,
    # Video-LLaVA and LLaVA-NeXT-Video: LLaVA's format with image and video items.
    "llava_next_video": _user_assistant_template(_media_items("<image>\\n", "<video>\\n")),
    "video_llava": _user_assistant_template(_media_items("<image>\\n", "<video>\\n")),
    "llava_onevision": _chatml_template("<image>\\n", "<video>\\n"),
    "internvl": _chatml_template("<IMG_CONTEXT>\\n", "<video>\\n"),
}
