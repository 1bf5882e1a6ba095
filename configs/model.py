"""Model configuration: the `model:` section of an experiment yaml, validated at load."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .loading import ConfigError

Activation = Literal["relu", "swish", "gelu"]


@dataclass
class FeedForwardConfig:
    """One feed-forward block: a dense FFN or a Mixture of Experts of FFNs of the same shape."""

    type: Literal["dense", "moe"] = "dense"
    hidden_units: int = 2048
    activation: Activation = "swish"
    dropout_rate: float = 0.1
    num_experts: int = 8
    top_k: int = 2
    # Off by default, as in U2++ MoE: the paper trains without any balancing loss or noise.
    aux_loss_weight: float = 0.0
    router_noise_std: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden_units <= 0:
            raise ConfigError("hidden_units must be positive")
        if self.type == "moe" and not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.aux_loss_weight < 0 or self.router_noise_std < 0:
            raise ConfigError("aux_loss_weight and router_noise_std must be >= 0")


@dataclass
class EncoderConfig:
    input_size: int = 80
    output_size: int = 256
    attention_heads: int = 4
    num_blocks: int = 12
    subsampling: Literal[4, 6, 8] = 4
    # Channels of the front-end's Conv2d layers (0: output_size, as in WeNet). The second 3x3
    # convolution costs channels^2 per output pixel: on a CPU it can be a third of a small
    # model's step, and fewer channels (icefall's front-ends use 8-128) cut that.
    subsampling_channels: int = 0
    dropout_rate: float = 0.1
    positional_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    macaron_style: bool = True
    cnn_module_kernel: int = 15
    # Causal convolution makes chunk-by-chunk streaming exactly equal to the chunk-masked forward.
    causal: bool = True
    cnn_module_norm: Literal["batch_norm", "layer_norm"] = "layer_norm"
    ffn: FeedForwardConfig = field(default_factory=FeedForwardConfig)
    # Dynamic chunk training (U2/U2++): a random chunk size per batch, or full context.
    use_dynamic_chunk: bool = True
    use_dynamic_left_chunk: bool = False
    max_chunk_size: int = 25
    full_context_prob: float = 0.5
    # > 0: always train with this chunk size (streaming-only model); overrides dynamic chunks.
    static_chunk_size: int = 0
    # Recompute each layer's activations in the backward pass instead of keeping them: less
    # memory for about one more forward pass of compute (docs/training.md).
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.output_size % self.attention_heads:
            raise ConfigError(f"output_size={self.output_size} is not divisible by attention_heads")
        if not self.causal and self.cnn_module_kernel % 2 == 0:
            raise ConfigError("a non-causal cnn_module_kernel must be odd (symmetric padding)")
        if self.causal and self.cnn_module_norm == "batch_norm":
            # Batch statistics mix future frames into the past: streaming would differ from training.
            raise ConfigError("causal convolution needs cnn_module_norm: layer_norm")
        if not 0.0 <= self.full_context_prob <= 1.0:
            raise ConfigError("full_context_prob must be in [0, 1]")
        if self.subsampling_channels < 0:
            raise ConfigError("subsampling_channels must be >= 0 (0: output_size)")
        if self.max_chunk_size < 1 or self.static_chunk_size < 0:
            raise ConfigError("max_chunk_size must be >= 1 and static_chunk_size >= 0")


@dataclass
class DecoderConfig:
    attention_heads: int = 4
    num_blocks: int = 3
    # Right-to-left blocks of the bidirectional decoder; 0 gives a left-to-right decoder only.
    r_num_blocks: int = 3
    dropout_rate: float = 0.1
    positional_dropout_rate: float = 0.1
    self_attention_dropout_rate: float = 0.0
    src_attention_dropout_rate: float = 0.0
    ffn: FeedForwardConfig = field(default_factory=lambda: FeedForwardConfig(activation="relu"))
    gradient_checkpointing: bool = False  # as the encoder's

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.r_num_blocks < 0:
            raise ConfigError("decoder needs num_blocks >= 1 and r_num_blocks >= 0")


@dataclass
class ModelConfig:
    # Output units including <blank>=0 and <sos/eos>=vocab_size-1; `u2moe train` takes it from
    # the units file unless the user set it, and refuses a size the user set that differs.
    vocab_size: int = 5000
    ctc_weight: float = 0.3
    reverse_weight: float = 0.3
    lsm_weight: float = 0.1
    length_normalized_loss: bool = False
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        if self.vocab_size < 3:
            raise ConfigError("vocab_size must hold at least <blank>, <unk> and <sos/eos>")
        if not 0.0 <= self.ctc_weight <= 1.0 or not 0.0 <= self.reverse_weight <= 1.0:
            raise ConfigError("ctc_weight and reverse_weight must be in [0, 1]")
        if self.reverse_weight > 0 and self.decoder.r_num_blocks == 0:
            raise ConfigError("reverse_weight > 0 needs decoder.r_num_blocks > 0")
