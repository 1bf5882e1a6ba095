"""The U2++ MoE model: Conformer encoder, CTC, bidirectional decoder, MoE feed-forward blocks."""
from u2moe.model.asr_model import U2Model
from u2moe.model.config import DecoderConfig, EncoderConfig, FeedForwardConfig, ModelConfig

__all__ = ["U2Model", "ModelConfig", "EncoderConfig", "DecoderConfig", "FeedForwardConfig"]
