"""Serving exports: one family, each built on the adapter's exact `delta_weight`.

    export                 file                              built from                     reports
    ---------------------  --------------------------------  -----------------------------  ---------------------------
    PEFT LoRA  (peft)      adapter dir, PEFT/rankwise load    SVD of ΔW  (rankwise.convert)  per-layer SVD error, Δy
    vLLM LoRA  (vllm)      adapter dir vLLM accepts           SVD of ΔW, rank rounded up     + dropped modules
    GGUF LoRA  (gguf)      one .gguf for llama.cpp runtimes   SVD of ΔW, q/k rows permuted   + read-back check
    merged     (merged)    full transformers model dir        W + ΔW folded in               per-layer rounding, Δy

Every export loads the adapter onto a copy of the base it was trained on, measures the exported thing
against the adapted model on sample inputs, and writes `conversion_report.json` (the GGUF file gets
`<name>.report.json` next to it). Methods whose update is not a weight change (DePT's soft prompt) are
refused with the reason.
"""
from rankwise.export.gguf_lora import export_gguf_lora
from rankwise.export.merged import export_merged
from rankwise.export.vllm_lora import VLLM_RANKS, export_vllm_lora

__all__ = ["VLLM_RANKS", "export_gguf_lora", "export_merged", "export_vllm_lora"]
