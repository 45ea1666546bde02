from .reference import Attention, DecoderConfig, ReferenceDecoder

__all__ = ["Attention", "DecoderConfig", "ReferenceDecoder"]
