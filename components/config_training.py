"""Settings of a training stage (cpt, sft, reward, alignment): what trains, with which optimizer, how.

Part of the pipeline config (components.config re-exports every name; import them from there).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from components.config_base import Strict


class LoraSettings(Strict):
    """The adapter of finetuning lora and qlora."""

    r: int = Field(8, ge=1, description="Rank of the low-rank update.")
    alpha: int = Field(16, ge=1, description="Scale of the update: alpha / r (alpha / sqrt(r) with use_rslora).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or explicit module names.")
    use_rslora: bool = Field(
        False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r), so higher ranks keep learning."
    )
    use_dora: bool = Field(
        False, description="DoRA: learn each weight's magnitude apart from its direction; often closer to full "
        "fine-tuning at low rank, for slower steps."
    )
    loraplus_lr_ratio: float | None = Field(
        None, ge=1.0, description="LoRA+: the B matrices learn at learning_rate x this ratio (the paper suggests 16). "
        "Null: one learning rate for A and B."
    )
    init: Literal["default", "pissa", "pissa_niter_4"] = Field(
        "default", description="default: B = 0, the adapter starts as a no-op. pissa: A and B start from the "
        "weight's principal singular vectors (faster convergence; the saved adapter is converted so that it applies "
        "to the unchanged base); pissa_niter_4: the same with a fast randomized SVD. Not with qlora."
    )
    train_new_tokens: bool = Field(
        True, description="When the base has tokens added by model.extra_tokens, also train their embedding rows "
        "(peft trainable tokens; saved with the adapter). Off: their mean-initialised rows stay as they are."
    )


class FreezeSettings(Strict):
    """What finetuning: freeze trains; every other weight stays as it is."""

    trainable_layers: int = Field(2, ge=0, description="Train the last N decoder layers entirely; 0: none.")
    trainable_modules: list[str] = Field(
        [], description="Also train these modules wherever they occur, by name or dotted suffix "
        "('lm_head', 'norm', 'mlp', 'self_attn.o_proj')."
    )


class QLoraSettings(Strict):
    """The 4-bit base of finetuning: qlora (bitsandbytes; runs on CPU too, in fp32 compute)."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.4 bits per weight less).")
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Dtype the 4-bit weights are dequantized to for matmuls; auto: the hardware precision."
    )


class GaloreSettings(Strict):
    """GaLore (optimizer: galore_*): full-rank weights, gradients projected to a low-rank subspace."""

    rank: int = Field(128, ge=1, description="Rank of the gradient projection.")
    update_proj_gap: int = Field(200, ge=1, description="Steps between recomputing the projection (an SVD).")
    scale: float = Field(0.25, gt=0, description="Scale of the projected update.")
    target_modules: list[str] = Field(
        ["self_attn", "mlp"], description="Linear layers whose names contain one of these get projected gradients; "
        "the rest train with the plain optimizer."
    )


class DeepSpeedSettings(Strict):
    """DeepSpeed ZeRO for a training stage (components/training/deepspeed.py builds the config).

    The stage then runs under the `deepspeed` launcher in its own process group
    (components/training/launch.py): one GPU, several GPUs or several nodes run the same code.
    """

    stage: Literal[0, 2, 3] = Field(
        0, description="ZeRO stage: 0 off (plain Trainer, default); 2 shards optimizer states and gradients; "
        "3 also shards the weights (models that do not fit one device).",
    )
    offload: bool = Field(
        False, description="Offload to CPU RAM: optimizer states (stage 2 and 3) and weights (stage 3). "
        "Fits larger models on fewer GPUs for slower steps; needs host RAM of about 12-16 bytes per trained parameter.",
    )


class TrainConfig(Strict):
    enabled: bool = True
    learning_rate: float = Field(2e-4, gt=0)
    max_steps: int = Field(40, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(20, ge=1, description="Checkpoint every N steps; a crashed run resumes from the last complete one.")
    seed: int = 42
    finetuning: Literal["full", "freeze", "lora", "qlora"] = Field(
        "lora", description="What trains: full (every weight), freeze (the layers and modules in `freeze`), lora "
        "(adapters from `lora` on the frozen base), qlora (the same adapters on a 4-bit base from `qlora`). lora and "
        "qlora save an adapter; full and freeze save the whole model."
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "lion", "adafactor", "galore_adamw",
                       "galore_adafactor", "lomo", "adalomo"] = Field(
        "adamw", description="adamw (torch); adamw_8bit / paged_adamw_8bit (bitsandbytes 8-bit states, paged on "
        "GPU); lion (bitsandbytes, one state: use ~3-10x lower learning rate); adafactor (factored second moments); "
        "galore_adamw / galore_adafactor (GaLore low-rank gradient projection, finetuning full or freeze, needs "
        "galore-torch); lomo / adalomo (update fused into the backward pass, no optimizer state, finetuning full "
        "or freeze, grad_accum 1, needs lomo-optim)."
    )
    lora: LoraSettings = Field(LoraSettings(), description="Used by finetuning lora and qlora.")
    freeze: FreezeSettings = Field(FreezeSettings(), description="Used by finetuning: freeze.")
    qlora: QLoraSettings = Field(QLoraSettings(), description="Used by finetuning: qlora (with the lora settings).")
    galore: GaloreSettings = Field(GaloreSettings(), description="Used by the galore_* optimizers.")
    use_liger: bool = Field(
        False, description="Patch the model with Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused "
        "cross-entropy); needs a GPU and the liger-kernel package."
    )
    deepspeed: DeepSpeedSettings = Field(DeepSpeedSettings(), description="DeepSpeed ZeRO stage and CPU offload.")
    gradient_checkpointing: bool = Field(
        False,
        description="Keep only each decoder layer's input during the forward pass and recompute the rest in "
        "the backward pass: activation memory falls to about one layer's worth, for roughly a third more compute.",
    )
    packing: bool = Field(
        False,
        description="Padding-free packing: each micro-batch's examples are concatenated into one row whose "
        "position ids restart per example, so no pad token is computed and examples attend only within "
        "themselves. Pays off with model.attn_implementation=flash_attention_2 on a GPU; on CPU the default "
        "(length-grouped rows, right-padded) is faster.",
    )

    @model_validator(mode="after")
    def _method_fits(self):
        galore, lomo = self.optimizer.startswith("galore_"), self.optimizer in ("lomo", "adalomo")
        if (galore or lomo) and self.finetuning not in ("full", "freeze"):
            raise ValueError(f"optimizer {self.optimizer} updates whole weight matrices: use finetuning full or "
                             f"freeze with it (finetuning is {self.finetuning!r}), or another optimizer")
        if lomo and self.grad_accum != 1:
            raise ValueError(f"optimizer {self.optimizer} applies each gradient in the backward pass and cannot "
                             f"accumulate: set grad_accum to 1 (it is {self.grad_accum})")
        if self.finetuning == "qlora" and self.lora.init != "default":
            raise ValueError(f"lora.init {self.lora.init} decomposes full-precision weights and cannot start from a "
                             "4-bit base: use finetuning lora with it, or lora.init default")
        return self
