"""DiaNA's data side: the processor that ships with the weights (`processing_diana`), the one image
loader (`image_loading`), the tokenizer set-up, the data set builders (`data/`), gallery search
(`search/`), model loading for inference and the command-line conventions (`cli_errors`)."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoTokenizer, ViTImageProcessor

from .processing_diana import (
    CUHK_PEDES_MEAN,
    CUHK_PEDES_STD,
    DIALOGUE_CHAT_TEMPLATE,
    MALS_MEAN,
    MALS_STD,
    PAD_TOKEN,
    DiaNAProcessor,
)
from .tokenizer_setup import default_tokenizer_dir, missing_tokenizer_message

PROCESSOR_PROFILES = {
    # As in the paper: ChatPedes fine-tuning uses CUHK-PEDES statistics and 400 tokens. MALS
    # pretraining uses the MALS statistics; its "56" budget is the caption's: the dialogue template
    # around a caption (BOS + system prompt + the longest pool question + "USER:") is already 68
    # tokens, so a total limit of 56 would cut every caption away. 128 = 68 + 56 caption tokens
    # (+ slack); captions are also cut to 56 words before tokenising (augmentation.clean_caption).
    "finetune": {"max_length": 400, "stats": "cuhk_pedes"},
    "pretrain": {"max_length": 128, "stats": "mals"},
}


def build_processor(
    tokenizer_dir: str | os.PathLike | None = None,
    profile: str = "finetune",
    image_size: tuple[int, int] = (384, 192),
    tokenization: str = "rounds",
) -> DiaNAProcessor:
    """Build DiaNA's processor from a Llama-3.2 tokenizer folder.

    Args:
        tokenizer_dir: A folder with the Llama-3.2 tokenizer (`tokenizer.json` + config): the one
            made by `python -m diana.processing.tokenizer_setup` (the default,
            `default_tokenizer_dir()`), or a user's own download of meta-llama/Llama-3.2-1B.
        profile: the normalisation statistics and token limit, out of `PROCESSOR_PROFILES`:
            "finetune" (ChatPedes: CUHK-PEDES statistics, 400 tokens) or "pretrain" (MALS
            statistics, 128 tokens = template + 56 caption tokens).
        image_size: (height, width) of the model input.
        tokenization: "rounds" (round by round) or "official" (each prefix as one string, for converted
            official weights); see `DiaNAProcessor`.

    Returns:
        A `DiaNAProcessor` (right padding with `<|finetune_right_pad_id|>`, DiaNA chat template).
    """
    if profile not in PROCESSOR_PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROCESSOR_PROFILES)}, got {profile!r}")
    height, width = (int(v) for v in image_size)
    path = Path(tokenizer_dir) if tokenizer_dir is not None else default_tokenizer_dir()
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(missing_tokenizer_message(path))

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    # Meta's own Llama-3.2 files define no pad token and other Llama tokenizers pad on the left;
    # DiaNA pools the last non-pad token of right-padded input.
    if tokenizer.pad_token != PAD_TOKEN:
        tokenizer.pad_token = PAD_TOKEN
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"
    tokenizer.chat_template = DIALOGUE_CHAT_TEMPLATE

    mean, std = (CUHK_PEDES_MEAN, CUHK_PEDES_STD) if PROCESSOR_PROFILES[profile]["stats"] == "cuhk_pedes" else (MALS_MEAN, MALS_STD)
    image_processor = ViTImageProcessor(
        size={"height": height, "width": width},
        do_resize=True, resample=2,  # PILImageResampling.BILINEAR, as torchvision's Resize in the paper code
        do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(mean), image_std=list(std),
        do_convert_rgb=False,  # the processor converts every mode to RGB itself (16-bit, alpha...)
    )
    return DiaNAProcessor(
        image_processor, tokenizer, max_length=PROCESSOR_PROFILES[profile]["max_length"], tokenization=tokenization
    )


__all__ = ["PROCESSOR_PROFILES", "build_processor"]
