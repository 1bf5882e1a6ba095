"""Streaming recognition: chunk-by-chunk encoding with caches, and a real-time recognizer."""
from .encoder_stream import ChunkGeometry, EncoderStream, encode_chunk_by_chunk
from .recognizer import StreamingRecognizer

__all__ = ["ChunkGeometry", "EncoderStream", "encode_chunk_by_chunk", "StreamingRecognizer"]
