"""A LoRA run's adapters merged into a plain `DiaNAModel`: what gets exported and published
(`diana export --adapter_dir`), and what a LoRA training run saves beside its adapters."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from diana.modeling_diana import DiaNAModel


def load_and_merge(base: str | Path | DiaNAModel, adapter_dir: str | Path) -> DiaNAModel:
    """Base folder (or model) + adapter folder -> a plain `DiaNAModel` with the adapters merged in."""
    base_model = base if isinstance(base, DiaNAModel) else DiaNAModel.from_pretrained(base)
    merged = PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
    if not isinstance(merged, DiaNAModel):
        raise TypeError(f"merging gave {type(merged).__name__}, expected DiaNAModel")
    return merged
