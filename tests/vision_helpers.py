"""A tiny Qwen2-VL, its processor and a few generated images, built in-process (no downloads). Needs Pillow."""

from __future__ import annotations

from typing import Any

import torch

from kto_plugin.demo import build_tokenizer

IMAGE_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
# renders {"type": "image"} content items as Qwen2-VL's placeholder, which the processor expands per image
VLM_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_processor(texts: list[str]) -> Any:
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(Qwen2VLProcessor):
        """Qwen2-VL's processor without its video processor (which needs torchvision, not installed here)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = build_tokenizer(texts, vocab_size=384)
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS)})
    tokenizer.image_token = "<|image_pad|>"
    tokenizer.chat_template = VLM_CHAT_TEMPLATE
    # 28x28 pixels per merged token: a 56x56 image is 4 image tokens
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=VLM_CHAT_TEMPLATE)


def build_tiny_vlm(processor: Any, seed: int = 0, head_scale: float = 1.0) -> Any:
    """A randomly initialised `Qwen2VLForConditionalGeneration`: 2 text and 2 vision layers, hidden 32.

    `head_scale` multiplies the LM head's weights: at 30, next-token distributions are far from uniform.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in IMAGE_TOKENS}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


def images(n: int, seed: int = 0) -> list[Any]:
    """`n` small RGB images of random colours and sizes (28 to 56 pixels a side)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w, h = (28 * int(torch.randint(1, 3, (1,), generator=g)) for _ in range(2))
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        out.append(Image.fromarray(pixels, "RGB"))
    return out


def vision_rows(base_rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """Conversational vision rows: each text row's prompt with one image, its completion and label."""
    pics = images(n, seed)
    return [
        {
            "images": [pics[i]],
            "prompt": [{"role": "user", "content": r["prompt"][-120:]}],
            "completion": [{"role": "assistant", "content": r["completion"][:80]}],
            "label": r["label"],
        }
        for i, r in enumerate(base_rows[:n])
    ]
