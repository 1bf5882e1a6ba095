"""DeepSpeed training: ZeRO-1/2 with expert parallelism, checkpoints and resume, export."""
