"""Using a trained model: the model file, decoding, streaming recognition and runtime export."""
