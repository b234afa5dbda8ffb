"""LoRA and DoRA through peft, on the timm module names every backbone shares."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .config import TuningConfig


# Full-match regexes over timm VisionTransformer module names. Anchored on ``blocks.N`` so the
# patch-embedding ``proj`` convolution and modules added later (adapters, head) are never touched.
ATTENTION_TARGETS = r".*blocks\.\d+\.attn\.(qkv|proj)"
ATTENTION_MLP_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


def inject_lora(vit: nn.Module, cfg: TuningConfig, use_dora: bool) -> nn.Module:
    """Add LoRA (or DoRA) adapters to ``vit`` in place and leave only them trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft annotates int; it only multiplies by it
        lora_dropout=cfg.dropout,
        target_modules=ATTENTION_MLP_TARGETS if cfg.lora_mlp else ATTENTION_TARGETS,
        use_dora=use_dora,
        bias="none",
    )
    vit = inject_adapter_in_model(config, vit)
    injected = [name for name, _ in vit.named_parameters() if "lora_" in name]
    if not injected:  # guard against the silent no-op seen in other tools
        raise RuntimeError("peft injected no LoRA parameters; the target module names did not match.")
    for name, param in vit.named_parameters():
        param.requires_grad_("lora_" in name)
    return vit
